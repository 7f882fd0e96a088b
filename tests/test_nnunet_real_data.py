"""nnU-Net on real CT (IBSI soft-tissue sarcoma): plan, preprocess, train, validate and predict through
nnU-Net's own command-line tools, with trainer discovery through the installed startup hook.

Data: ``$MEDMAMBA_DATA/ibsi_sts/STS_*/CT_image.nii.gz`` + ``CT_mask.nii.gz`` (default MEDMAMBA_DATA:
``<repo>/../shared/data``), read in place (symlinked into a temporary nnU-Net raw folder). The module
plans the dataset once (``nnUNetv2_plan_and_preprocess``, about 45 s on 2 cores); the end-to-end test
trains ``nnUNetTrainerUMamba_debug`` on a reduced preset (patch 32x64x64, 4 stages, widths 8-64,
batch 1) written by ``medmamba plan``.
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medmamba.nnunet import dataset as ds
from medmamba.nnunet import trainers as T

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDMAMBA_DATA", REPO.parent / "shared" / "data")) / "ibsi_sts"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent (set MEDMAMBA_DATA to "
                                                          f"the folder that holds ibsi_sts/)")
DATASET_ID, DATASET = 901, "Dataset901_Sarcoma"
ALL_TRAINERS = ["nnUNetTrainerUMamba", "nnUNetTrainerUMambaEnc", "nnUNetTrainerLightMUNet", "nnUNetTrainerSwinUMamba",
                "nnUNetTrainerSwinUMambaD", "nnUNetTrainerMSVMUNet", "nnUNetTrainerVMUNetMHS", "nnUNetTrainerHyMamba"]
# reduced presets for CPU forward passes, written from the real plans (U-Mamba: 4 stages, small widths)
CI_OVERRIDES = {"umamba_bot": dict(patch_size=[32, 64, 64], n_stages=4, features_per_stage=[8, 16, 32, 64]),
                "umamba_enc": dict(patch_size=[32, 64, 64], n_stages=4, features_per_stage=[8, 16, 32, 64]),
                "lightm_unet": dict(patch_size=[32, 32, 32]),
                "swin_umamba": dict(patch_size=[32, 32, 32]), "swin_umamba_d": dict(patch_size=[32, 32, 32]),
                "msvm_unet": dict(patch_size=[32, 32, 32]), "vm_unet_mhs": dict(patch_size=[32, 32, 32]),
                "hymamba": dict(patch_size=[32, 32, 32])}


def _clean_env(env):
    env = dict(env)
    env.pop("nnUNet_extTrainer", None)  # discovery must come from the startup hook
    env.pop("MEDMAMBA_NO_NNUNET_HOOK", None)
    env.pop("nnUNet_compile", None)
    return env


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    cases = ds.find_cases(DATA)
    assert len(cases) >= 6, f"need 6 cases in {DATA}, found {len(cases)}"
    env = _clean_env(ds.nnunet_env(root, n_proc_da=1, nnUNet_def_n_proc="2"))
    raw = ds.build_raw_dataset(cases[:5], env["nnUNet_raw"], DATASET_ID, "Sarcoma", test_cases=cases[5:6],
                               labels={"background": 0, "tumour": 1})
    start = time.perf_counter()
    ds.plan_and_preprocess(DATASET_ID, env, configurations=("3d_fullres",), num_processes=1, log=root / "plan.log")
    pre = Path(env["nnUNet_preprocessed"]) / DATASET
    return SimpleNamespace(root=root, env=env, raw=raw, pre=pre, test_case=cases[5],
                           plan_seconds=time.perf_counter() - start)


@pytest.fixture
def nnunet_paths(planned, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, planned.env[var])
    return planned


def _plans(planned, name="nnUNetPlans"):
    with open(planned.pre / f"{name}.json") as f:
        return json.load(f)


def _dataset_json(planned):
    with open(planned.pre / "dataset.json") as f:
        return json.load(f)


def _trainer(planned, name, plans):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return getattr(T, name)(plans, "3d_fullres", 0, _dataset_json(planned), torch.device("cpu"))


def test_real_plans(planned):
    conf = _plans(planned)["configurations"]["3d_fullres"]
    assert conf["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert len(conf["patch_size"]) == 3 and (planned.pre / conf["data_identifier"]).is_dir()
    print(f"plan + preprocess: {planned.plan_seconds:.0f} s, patch {conf['patch_size']}")


@pytest.mark.parametrize("name", ALL_TRAINERS)
def test_every_trainer_builds_from_the_real_plans(nnunet_paths, name):
    """Each trainer on the dataset's own nnUNetPlans: in-memory adaptation, network, DS scales, optimiser."""
    tr = _trainer(nnunet_paths, name, _plans(nnunet_paths))
    tr.initialize()  # builds the network and checks its deep-supervision scales against the targets
    preset = T.load_preset(tr.arch)
    cm = tr.configuration_manager
    assert type(tr.network).__name__ == preset["network_class_name"].rsplit(".", 1)[1]
    if preset["topology"] == "fixed":
        assert all(p % preset["patch_size_divisor"] == 0 for p in cm.patch_size)
        assert [s[0] for s in cm.pool_op_kernel_sizes] == preset["strides"]
    else:
        assert list(cm.patch_size) == _plans(nnunet_paths)["configurations"]["3d_fullres"]["patch_size"]
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tr.OPTIMIZER]
    assert isinstance(tr.optimizer, opt)
    if name == "nnUNetTrainerMSVMUNet":
        assert (tr.loss.weight_ce, tr.loss.weight_dice) == (0.4, 0.6)
    scales = tr._get_deep_supervision_scales()
    assert (scales is not None) == tr.enable_deep_supervision
    # nnUNetv2_predict rebuilds the network from the saved plans with the class's staticmethod, DS off
    net = type(tr).build_network_architecture(tr.plans_manager, cm, 1, 2, False)
    assert net.decoder.deep_supervision is False
    own = {k: v.shape for k, v in tr.network.state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items() if k in own} == \
        {k: v for k, v in own.items() if k in net.state_dict()}


@pytest.mark.parametrize("arch", sorted(CI_OVERRIDES))
def test_forward_shapes_on_reduced_real_plans(nnunet_paths, arch, one_thread):
    """At the (reduced) plans' patch size: our trainer's network with deep supervision on and off, and
    the same plans through nnU-Net's own nnUNetTrainer.build_network_architecture (``-p`` preset path)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.nnunet.presets import apply_preset

    plans = apply_preset(_plans(nnunet_paths), arch, configurations=["3d_fullres"], batch_size=1,
                         plans_name="nnUNetPlans_ci", **CI_OVERRIDES[arch])
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    trainer_cls = T.ARCH_TO_TRAINER[arch]
    patch = list(cm.patch_size)
    x = torch.randn(1, 1, *patch)
    torch.manual_seed(0)
    # nnU-Net's own trainer: deep supervision always on; targets at the cumulative strides
    plain = nnUNetTrainer.build_network_architecture(pm, cm, 1, 2, True).eval()
    cum = np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0)
    targets = [[int(p // c) for p, c in zip(patch, row)] for row in cum[:-1]]
    with torch.no_grad():
        out = plain(x)
    shapes = [list(o.shape[2:]) for o in out]
    assert all(o.shape[:2] == (1, 2) for o in out)
    # the network's outputs are the first targets (nnU-Net's loss zips outputs and targets)
    assert shapes == targets[:len(shapes)], (shapes, targets)
    assert len(shapes) >= 2
    # our trainer's builder gives the same network; with DS off (set as nnU-Net does) one full-size tensor
    ours = trainer_cls.build_network_architecture(pm, cm, 1, 2, True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.decoder.deep_supervision = False
    with torch.no_grad():
        single = plain(x)
    assert isinstance(single, torch.Tensor) and list(single.shape) == [1, 2, *patch]
    torch.testing.assert_close(single, out[0])
    if not T.load_preset(arch)["deep_supervision"]:  # its trainer builds it without DS (extra heads optional)
        bare = trainer_cls.build_network_architecture(pm, cm, 1, 2, False)
        assert set(bare.state_dict()) <= set(plain.state_dict()) and bare.decoder.deep_supervision is False


def test_medmamba_plan_on_real_plans_loads_in_nnunet(nnunet_paths):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.cli import main

    for arch in sorted(CI_OVERRIDES):
        assert main(["plan", str(DATASET_ID), "--arch", arch, "--overwrite"]) == 0
        plans = _plans(nnunet_paths, f"nnUNetPlans_{arch}")
        assert plans["plans_name"] == f"nnUNetPlans_{arch}"
        pm = PlansManager(plans)
        cm = pm.get_configuration("3d_fullres")
        assert cm.data_identifier == "nnUNetPlans_3d_fullres"
        with torch.device("meta"):  # full size: build only
            net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 2, True)
        assert type(net).__module__.startswith("medmamba.nets")


def test_pretrained_weights_through_nnunets_entry_point(nnunet_paths, tmp_path):
    """``nnUNetv2_train -pretrained_weights`` calls run_training.maybe_load_checkpoint -> our loader."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from medmamba.nnunet.presets import apply_preset
    from medmamba.nnunet.pretrained import PretrainedWeightsError

    plans = apply_preset(_plans(nnunet_paths), "umamba_bot", configurations=["3d_fullres"], plans_name="nnUNetPlans_pt",
                         **CI_OVERRIDES["umamba_bot"])
    donor = _trainer(nnunet_paths, "nnUNetTrainerUMamba", plans)
    donor.initialize()
    sd = donor.network.state_dict()
    enc = {k: v for k, v in sd.items() if k.split(".")[0] in T.ENCODER_MODULES["umamba_bot"]}
    torch.save({"network_weights": enc}, tmp_path / "mambamim.pth")
    torch.save({"network_weights": sd, "trainer_name": "nnUNetTrainerUMamba"}, tmp_path / "nnunet.pth")

    tr = _trainer(nnunet_paths, "nnUNetTrainerUMamba", plans)
    maybe_load_checkpoint(tr, False, False, str(tmp_path / "mambamim.pth"))  # initializes, then loads
    got = tr.network.state_dict()
    assert all(torch.equal(got[k], enc[k]) for k in enc)
    assert not torch.equal(got["decoder.seg_layers.0.weight"], sd["decoder.seg_layers.0.weight"])  # fresh decoder
    assert tr.pretrained_weights_loaded

    tr2 = _trainer(nnunet_paths, "nnUNetTrainerUMamba", plans)
    maybe_load_checkpoint(tr2, False, False, str(tmp_path / "nnunet.pth"))
    got = tr2.network.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd if ".seg_layers." not in k)

    # a checkpoint of another architecture: clear error naming the keys
    other = apply_preset(_plans(nnunet_paths), "umamba_bot", configurations=["3d_fullres"],
                         patch_size=[32, 64, 64], n_stages=4, features_per_stage=[8, 16, 32, 128])
    big = _trainer(nnunet_paths, "nnUNetTrainerUMamba", other)
    big.initialize()
    torch.save({"network_weights": big.network.state_dict()}, tmp_path / "other.pth")
    tr3 = _trainer(nnunet_paths, "nnUNetTrainerUMamba", plans)
    with pytest.raises(PretrainedWeightsError, match="shape mismatch") as err:
        maybe_load_checkpoint(tr3, False, False, str(tmp_path / "other.pth"))
    assert "mamba_layer.mamba.in_proj.weight" in str(err.value)


def test_swin_umamba_freezes_a_pretrained_encoder(nnunet_paths, tmp_path):
    from medmamba.nnunet.presets import apply_preset

    plans = apply_preset(_plans(nnunet_paths), "swin_umamba", configurations=["3d_fullres"], plans_name="nnUNetPlans_sw",
                         **CI_OVERRIDES["swin_umamba"])
    tr = _trainer(nnunet_paths, "nnUNetTrainerSwinUMamba", plans)
    tr.initialize()
    tr._update_encoder_freeze()
    assert all(p.requires_grad for p in tr.network.parameters())  # from scratch: nothing frozen
    enc = {k: v for k, v in tr.network.state_dict().items() if k.startswith("encoder.")}
    torch.save({"network_weights": enc}, tmp_path / "enc.pth")
    tr.load_pretrained_weights(str(tmp_path / "enc.pth"))
    tr._update_encoder_freeze()
    # as SwinUMamba.freeze_encoder: the VSS stages and merging layers; stem and patch embedding train
    enc = tr.network.encoder
    assert not any(p.requires_grad for m in (enc.layers, enc.downsamples) for p in m.parameters())
    assert all(p.requires_grad for m in (enc.stem, enc.patch_embed) for p in m.parameters())
    assert all(p.requires_grad for p in tr.network.decoder.parameters())
    tr.current_epoch = tr.FREEZE_ENCODER_EPOCHS
    tr._update_encoder_freeze()
    assert all(p.requires_grad for p in tr.network.parameters())


def test_end_to_end_train_validate_predict_with_nnunet_cli(planned):
    """medmamba plan -> nnUNetv2_train -tr nnUNetTrainerUMamba_debug -> nnUNetv2_predict, all as subprocesses
    whose environment has no nnUNet_extTrainer (the startup hook must make the trainer findable)."""
    import SimpleITK as sitk

    env = _clean_env(planned.env)
    env["nnUNet_n_proc_DA"] = "0"  # augmentation in the main process: no worker start-up on 2 cores
    log = planned.root / "e2e.log"
    times = {}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medmamba.cli", "plan", str(DATASET_ID), "--arch", "umamba_bot", "-c",
                    "3d_fullres", "--patch-size", "32", "64", "64", "--batch-size", "1", "--n-stages", "4",
                    "--features", "8", "16", "32", "64", "--name", "nnUNetPlans_ci", "--overwrite"],
                   env=env, check=True, capture_output=True, text=True)
    times["plan preset"] = time.perf_counter() - start
    times["train + validate"] = ds.train(DATASET_ID, "3d_fullres", 0, "nnUNetTrainerUMamba_debug", env,
                                         plans="nnUNetPlans_ci", device="cpu", log=log)
    out = Path(env["nnUNet_results"]) / DATASET / "nnUNetTrainerUMamba_debug__nnUNetPlans_ci__3d_fullres"
    fold = out / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    saved = json.loads((out / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert saved["architecture"]["network_class_name"] == "medmamba.nets.umamba.UMambaBot"
    assert saved["patch_size"] == [32, 64, 64]
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerUMamba_debug" and ckpt["inference_allowed_mirroring_axes"] is None
    # TensorBoard next to progress.png
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(fold / "tensorboard"))
    ea.Reload()
    assert {"loss/train", "loss/val", "pseudo_dice/mean", "pseudo_dice/class_1", "lr", "time/epoch_s",
            "final_val/foreground_dice"} <= set(ea.Tags()["scalars"])

    pred = planned.root / "pred"
    times["predict"] = ds.predict(planned.raw / "imagesTs", pred, DATASET_ID, "3d_fullres", "nnUNetTrainerUMamba_debug",
                                  env, plans="nnUNetPlans_ci", folds=(0,), device="cpu", extra=["-npp", "1", "-nps", "1"],
                                  log=log)
    case = planned.test_case[0]
    img = sitk.ReadImage(str(planned.raw / "imagesTs" / f"{case}_0000.nii.gz"))
    seg = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
    assert seg.GetSize() == img.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), img.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), img.GetDirection(), rtol=0, atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1}
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
