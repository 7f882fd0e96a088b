"""``medmamba export --format onnx`` and ``medmamba predict --runtime onnxruntime``: the exported network runs in
the same sliding-window pipeline and gives PyTorch's result on a real CT (tiny random-weight bundle)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from medmamba.cli import main  # noqa: E402
from medmamba.clinic.export import CHECK_TOLERANCE, export_network  # noqa: E402
from medmamba.clinic.onnx_runtime import OnnxNetwork  # noqa: E402

from conftest import DATA_DIR  # noqa: E402

CT = os.path.join(DATA_DIR, "ibsi_sts", "STS_002", "CT_image.nii.gz")


@pytest.mark.parametrize("name, kwargs, shape", [
    ("umamba_enc", dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1), (8, 8, 16)),
    ("swin_umamba", dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4), (32, 32, 32)),
    # group norms after the scan's Loop operators, whose output sizes the exporter does not know
    ("lightm_unet", dict(init_filters=8, blocks_down=(1, 1, 1, 1)), (16, 16, 32)),
    # a token grid (2x2x3) other than img_size's: the sin-cos position embedding is computed in the graph
    ("hymamba", dict(channels=(4, 8, 8, 12, 12), depths=(1, 1, 1, 1, 1), mamba_depth=1, d_state=4, img_size=32),
     (32, 32, 48)),
])
def test_registry_network_exports(tmp_path, name, kwargs, shape):
    import medmamba.nets as nets

    torch.manual_seed(0)
    net = nets.create(name, 1, 2, **kwargs)
    check = export_network(net, (1, 1, *shape), str(tmp_path / "m.onnx"))
    assert check["relative"] <= CHECK_TOLERANCE
    x = torch.randn(2, 1, *shape)      # a batch of windows runs one window at a time
    with torch.no_grad():
        ref = net.eval()(x)
    out = OnnxNetwork(str(tmp_path / "m.onnx"))(x)
    assert torch.allclose(out, ref, rtol=0, atol=CHECK_TOLERANCE * ref.abs().max())
    assert check["max_relative"] <= CHECK_TOLERANCE and check["argmax_agreement"] >= 0.999
    assert "relative L2" in check["criterion"]


def test_onnxruntime_memory_arena_switch(tmp_path, monkeypatch):
    from medmamba.clinic.onnx_runtime import session

    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    torch.onnx.export(net, (torch.randn(1, 1, 4, 4, 4),), str(tmp_path / "c.onnx"), dynamo=False)
    monkeypatch.delenv("MEDMAMBA_ORT_MEMORY_ARENA", raising=False)
    assert session(str(tmp_path / "c.onnx")).get_session_options().enable_cpu_mem_arena  # default: on
    assert not session(str(tmp_path / "c.onnx"), memory_arena=False).get_session_options().enable_cpu_mem_arena
    monkeypatch.setenv("MEDMAMBA_ORT_MEMORY_ARENA", "0")
    assert not session(str(tmp_path / "c.onnx")).get_session_options().enable_cpu_mem_arena


@pytest.mark.skipif(not os.path.isfile(CT), reason=f"{CT} not found (set MEDMAMBA_DATA)")
def test_export_bundle_and_predict_with_onnxruntime(tmp_path, capsys):
    from medmamba.monai import create as mb

    bundle = mb.create_bundle(tmp_path / "bundle", arch="umamba_bot", in_channels=1, out_channels=2, random_init=True,
                              roi=(32, 32, 32), spacing=(3.0, 3.0, 4.0),
                              net_kwargs={"features_per_stage": [8, 16, 32, 64], "strides": [1, 2, 2, 2]})
    out = tmp_path / "onnx"
    assert main(["export", str(bundle), "--format", "onnx", str(out)]) == 0
    info = json.loads((out / "models" / "onnx.json").read_text())
    assert info["opset"] == 17 and info["input_shape"] == [1, 1, 32, 32, 32]
    assert info["check"]["relative"] <= CHECK_TOLERANCE
    assert main(["export", str(bundle), "--format", "onnx", str(out)]) == 2        # exists, no --overwrite

    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(CT, inp / "STS_002.nii.gz")
    for runtime, model in (("torch", bundle), ("onnxruntime", out)):
        assert main(["predict", "--model", str(model), "--input", str(inp), "--output", str(tmp_path / runtime),
                     "--device", "cpu", "--runtime", runtime, "--quiet"]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch" / "STS_002.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onnxruntime" / "STS_002.nii.gz")))
    assert a.shape == b.shape and 0 < a.mean() < 1            # not a constant prediction
    assert (a != b).mean() <= 1e-4                            # labels: argmax of logits equal within 1e-3
    # a torch-runtime bundle is refused by --runtime onnxruntime with a clear message
    assert main(["predict", "--model", str(bundle), "--input", str(inp), "--output", str(tmp_path / "x"),
                 "--device", "cpu", "--runtime", "onnxruntime", "--quiet"]) == 2
    assert "not an ONNX export" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isfile(CT), reason=f"{CT} not found (set MEDMAMBA_DATA)")
def test_export_nnunet_folder_and_predict_with_onnxruntime(tmp_path):
    """An nnU-Net results folder (plans from nnU-Net's planner on ibsi_sts, UMambaBot with small features): the
    ONNX folds run in nnUNetPredictor's own sliding window; labels equal PyTorch's on a real CT crop."""
    from pathlib import Path

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((Path(__file__).parent / "data" / "bundle_sts_nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["architecture"]["network_class_name"] = "medmamba.nets.umamba.UMambaBot"
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 16, 16, 16]
    cfg["patch_size"] = [24, 64, 64]            # small windows: several per crop, static ONNX shape
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, False)
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 3,
               "file_ending": ".nii.gz"}
    (model / "dataset.json").write_text(json.dumps(dataset))
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               model / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "onnx"
    assert main(["export", str(model), "--format", "onnx", str(out)]) == 0
    info = json.loads((out / "onnx.json").read_text())
    assert info["files"] == {"0": "fold_0/model.onnx"} and info["input_shape"] == [1, 1, 24, 64, 64]

    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.ReadImage(CT)
    sitk.WriteImage(img[30:130, 30:120, 8:40], str(inp / "crop_0000.nii.gz"))
    for runtime, m in (("torch", model), ("onnxruntime", out)):
        assert main(["predict", "--model", str(m), "--input", str(inp), "--output", str(tmp_path / runtime),
                     "--device", "cpu", "--runtime", runtime, "--no-mirroring", "--quiet"]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "torch" / "crop.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onnxruntime" / "crop.nii.gz")))
    assert a.shape == b.shape and 0 < a.mean() < 1
    assert (a != b).mean() <= 1e-4


@pytest.mark.parametrize("block_tokens", [1 << 20, 48])
def test_traced_scan_exports_as_loops(tmp_path, monkeypatch, block_tokens):
    """The exported selective scan: the per-step work sits in ONNX Loop bodies (unrolled, ONNX Runtime computes
    every step's decays before the recurrence needs them and keeps them all), and ONNX Runtime's result equals
    the float64 recurrence: odd length (padding), groups, several recursion levels, several blocks (48 tokens)."""
    import collections

    import onnx

    from medmamba.clinic.onnx_runtime import session
    from medmamba.kernels import scan_torch, selective_scan_ref

    dim, length, dstate, groups = 6, 1234, 4, 2
    monkeypatch.setattr(scan_torch, "_TRACED_SLAB_ELEMENTS", block_tokens // scan_torch._FWD_STEPS * dim * dstate)
    g = torch.Generator().manual_seed(3)
    u, delta = torch.randn(1, dim, length, generator=g), torch.randn(1, dim, length, generator=g) - 2
    A = -torch.rand(dim, dstate, generator=g) * 4
    B, C = torch.randn(1, groups, dstate, length, generator=g), torch.randn(1, groups, dstate, length, generator=g)
    bias = torch.randn(dim, generator=g) * 0.1

    class Scan(torch.nn.Module):
        def forward(self, u, delta, B, C):
            y, last, _ = scan_torch._traced_forward(u, delta, A, B, C, bias, True)
            return y, last

    path = str(tmp_path / "scan.onnx")
    with torch.no_grad():
        torch.onnx.export(Scan(), (u, delta, B, C), path, input_names=["u", "delta", "B", "C"], dynamo=False)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert ops["Loop"] >= 3 and ops["Exp"] <= 2 * (length // block_tokens + 1), ops
    y, last = session(path).run(None, dict(u=u.numpy(), delta=delta.numpy(), B=B.numpy(), C=C.numpy()))
    ref, h = selective_scan_ref(*(t.double() for t in (u, delta, A, B, C)), delta_bias=bias.double(),
                                delta_softplus=True, return_last_state=True)
    ref, h = ref[0], h[0].double()
    assert float((torch.from_numpy(y)[0].double() - ref).norm() / ref.norm()) < 1e-6
    torch.testing.assert_close(torch.from_numpy(last)[0].double().reshape(dim, dstate), h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [torch.nn.InstanceNorm3d(4, affine=True), torch.nn.GroupNorm(2, 4),
                                  torch.nn.InstanceNorm3d(4)])
def test_norms_export_with_short_sums(tmp_path, norm):
    """Instance and group norms leave as ReduceMean one axis at a time, not ONNX InstanceNormalization (ONNX
    Runtime's CPU kernel sums each instance in one float32 accumulator: at 1.4M voxels 1.3e-5 from float64, which
    U-Mamba Enc's decoder amplified to 3e-3 in its logits); here 300k voxels with a mean far from 0."""
    import onnx

    from medmamba.clinic.export import _onnx_export_context
    from medmamba.clinic.onnx_runtime import session

    torch.manual_seed(0)
    x = torch.randn(1, 4, 48, 80, 80) * 2 + 3
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(0, 0.5)
        with _onnx_export_context(17):
            torch.onnx.export(norm.eval(), (x,), str(tmp_path / "n.onnx"), dynamo=False, opset_version=17,
                              input_names=["x"])
        ref = norm.double()(x.double())
    assert "InstanceNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "n.onnx")).graph.node}
    out = torch.from_numpy(session(str(tmp_path / "n.onnx")).run(None, {"x": x.numpy()})[0])
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-7
