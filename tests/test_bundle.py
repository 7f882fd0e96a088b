"""MONAI bundles (medmamba.monai): creation, MONAI's own CLI on a real CT, bad inputs, nnU-Net checkpoints.

Real data is read in place from ``$MEDMAMBA_DATA`` (default ``<repo>/../shared/data``); inputs are symlinked
into temporary folders. The slow parts run MONAI's CLI (``python -m monai.bundle ...``) in subprocesses.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmamba import monai as mb

DATA = Path(os.environ.get("MEDMAMBA_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
STS = DATA / "ibsi_sts"
CT = STS / "STS_002" / "CT_image.nii.gz"
PLANS = Path(__file__).resolve().parent / "data" / "bundle_sts_nnUNetPlans.json"
needs_data = pytest.mark.skipif(not CT.exists(), reason=f"real CT not found under {DATA} (set MEDMAMBA_DATA)")

# cheap network and geometry: STS_002 (161 x 143 x 48 at 0.98 x 0.98 x 3.27 mm) becomes 53 x 47 x 40 voxels
TINY = dict(arch="umamba_bot", in_channels=1, out_channels=2, random_init=True, roi=(64, 64, 32),
            spacing=(3.0, 3.0, 4.0), net_kwargs={"features_per_stage": [8, 16, 32, 64], "strides": [1, 2, 2, 2]})


def _monai(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())
    return dst


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return mb.create_bundle(tmp_path_factory.mktemp("tiny") / "bundle", **TINY)


# ----------------------------------------------------------------------------------------------------------
# bundle layout, metadata, overwrite
# ----------------------------------------------------------------------------------------------------------

def test_layout_and_metadata(tiny_bundle):
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                "models/model.pt", "docs/README.md", "LICENSE"):
        assert (tiny_bundle / rel).is_file(), rel
    meta = json.loads((tiny_bundle / "configs/metadata.json").read_text())
    assert mb.check_metadata(meta) == []
    assert meta["random_init"] is True and "RANDOM WEIGHTS" in meta["description"]
    assert "RANDOM WEIGHTS" in (tiny_bundle / "docs/README.md").read_text()
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and pred["num_channels"] == 2 and image["spatial_shape"] == [64, 64, 32]
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    assert "medmamba" in meta["required_packages_version"]
    cfg = json.loads((tiny_bundle / "configs/inference.json").read_text())
    assert cfg["network_def"]["_target_"] == "medmamba.nets.umamba.UMambaBot"
    assert cfg["inferer"]["mode"] == "gaussian" and cfg["overlap"] == 0.5
    assert cfg["inferer"]["sw_device"] == "@device" and cfg["inferer"]["device"] == "@data_device"
    names = [t["_target_"] for t in cfg["preprocessing"]["transforms"]]
    assert names[:5] == ["medmamba.monai.checks.CheckImaged", "LoadImaged", "EnsureChannelFirstd", "Orientationd",
                         "Spacingd"]
    # the weights load into the configured network
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(tiny_bundle / "configs/inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(tiny_bundle / "models/model.pt", weights_only=True))


def test_check_metadata_reports_missing_keys():
    assert "missing key 'task'" in mb.check_metadata({"version": "1"})
    meta = {k: "x" for k in mb.REQUIRED_META_KEYS}
    meta.update(required_packages_version={}, network_data_format={"inputs": {"image": {}}, "outputs": {}})
    problems = mb.check_metadata(meta)
    assert "missing network_data_format.outputs.pred" in problems
    assert "missing network_data_format.inputs.image.num_channels" in problems


def test_overwrite_refused_then_atomic_replace(tmp_path):
    kw = dict(TINY, roi=(32, 32, 32))
    out = mb.create_bundle(tmp_path / "b", **kw)
    (out / "marker").write_text("old")
    with pytest.raises(mb.BundleError, match="exists; pass --overwrite"):
        mb.create_bundle(tmp_path / "b", **kw)
    assert (out / "marker").exists()
    mb.create_bundle(tmp_path / "b", overwrite=True, **kw)
    assert not (out / "marker").exists() and (out / "configs/inference.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folders left behind


def test_cli_create(tmp_path):
    parser = argparse.ArgumentParser()
    mb.add_parser(parser.add_subparsers(dest="command"))

    def cli(*argv):
        args = parser.parse_args(["bundle", *map(str, argv)])
        return args.func(args)

    base = ["create", tmp_path / "c", "--arch", "lightm_unet", "--in-channels", "1", "--out-channels", "3",
            "--roi", "32", "32", "32", "--net-kwargs", '{"init_filters": 8}']
    with pytest.raises(SystemExit):  # neither --checkpoint nor --random-init
        cli(*base)
    assert cli(*base, "--random-init", "--intensity", "mri", "--labels", "bg", "a", "b") == 0
    cfg = json.loads((tmp_path / "c/configs/inference.json").read_text())
    assert cfg["network_def"]["_target_"] == "medmamba.nets.lightm_unet.LightMUNet"
    assert {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True} in \
        cfg["preprocessing"]["transforms"]
    assert cli(*base, "--random-init") == 2  # exists
    assert cli(*base, "--random-init", "--overwrite", "--roi", "36", "32", "32") == 2  # not divisible by 8


def test_arguments_are_checked(tmp_path):
    with pytest.raises(mb.BundleError, match="--checkpoint PATH .* or --random-init"):
        mb.create_bundle(tmp_path / "x", "umamba_bot", 1, 2)
    with pytest.raises(mb.BundleError, match="unknown network"):
        mb.create_bundle(tmp_path / "x", "nope", 1, 2, random_init=True)
    with pytest.raises(mb.BundleError, match="not divisible"):
        mb.create_bundle(tmp_path / "x", **dict(TINY, roi=(60, 64, 32)))
    with pytest.raises(mb.BundleError, match="checkpoint not found"):
        mb.create_bundle(tmp_path / "x", "umamba_bot", 1, 2, checkpoint=str(tmp_path / "missing.pt"))
    assert not (tmp_path / "x").exists()


def test_plain_state_dict(tmp_path):
    import medmamba.nets as nets

    net = nets.create("umamba_bot", 1, 2, **TINY["net_kwargs"])
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "w.pt")
    kw = dict(arch="umamba_bot", in_channels=1, out_channels=2, checkpoint=str(tmp_path / "w.pt"),
              roi=(32, 32, 32), net_kwargs=TINY["net_kwargs"])
    with pytest.raises(mb.BundleError, match="--spacing is required"):
        mb.create_bundle(tmp_path / "b", **kw)
    with pytest.raises(mb.BundleError, match="does not fit the network"):
        mb.create_bundle(tmp_path / "b", **dict(kw, out_channels=3, spacing=(1, 1, 1), intensity="ct"))
    out = mb.create_bundle(tmp_path / "b", spacing=(1, 1, 2), intensity="ct", **kw)
    saved = torch.load(out / "models/model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["random_init"] is False and meta["medmamba"]["source"]["kind"] == "state dict"


def test_import_has_no_heavy_side_effects():
    code = "import sys, medmamba.monai.cli; print('monai' in sys.modules, 'nnunetv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------------------
# MONAI's CLI on a real CT
# ----------------------------------------------------------------------------------------------------------

@needs_data
def test_monai_bundle_run_keeps_geometry(tiny_bundle, tmp_path):
    import nibabel as nib

    inp = tmp_path / "in"
    _link(CT, inp / "STS_002.nii.gz")
    # an uncompressed .nii too (a crop of another patient, written to the temporary folder)
    src = nib.load(STS / "STS_003" / "CT_image.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[10:110, 20:120, 5:40], src.affine @ np.array(
        [[1, 0, 0, 10], [0, 1, 0, 20], [0, 0, 1, 5], [0, 0, 0, 1]])), inp / "crop.nii")
    out = tmp_path / "out"
    proc = _monai("run", "--config_file", tiny_bundle / "configs/inference.json",
                  "--meta_file", tiny_bundle / "configs/metadata.json", "--bundle_root", tiny_bundle,
                  "--dataset_dir", inp, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, seg_name in (("STS_002.nii.gz", "STS_002_seg.nii.gz"), ("crop.nii", "crop_seg.nii.gz")):
        image, seg = nib.load(inp / name), nib.load(out / seg_name)
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@needs_data
def test_bad_inputs_give_clear_errors(tiny_bundle, tmp_path):
    import nibabel as nib

    src = nib.load(CT)
    crop = np.asarray(src.dataobj)[:48, :48, :16]
    # a time series (4D) through MONAI's CLI: the error names the file and the problem
    (tmp_path / "ts").mkdir()
    nib.save(nib.Nifti1Image(np.stack([crop] * 3, -1), src.affine), tmp_path / "ts" / "series.nii.gz")
    proc = _monai("run", "--config_file", tiny_bundle / "configs/inference.json", "--bundle_root", tiny_bundle,
                  "--dataset_dir", tmp_path / "ts", "--output_dir", tmp_path / "o")
    assert proc.returncode != 0
    assert "series.nii.gz: is a 4D image with 3 volumes" in proc.stderr
    assert "time series" in proc.stderr

    # missing folder, missing file, empty folder, wrong channel count: before any inference
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        mb.run_bundle(tiny_bundle, tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no NIfTI files"):
        mb.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: file not found"):
        mb.CheckImaged("image", 1)({"image": str(tmp_path / "missing.nii.gz")})
    nib.save(nib.Nifti1Image(np.stack([crop] * 2, -1), src.affine), tmp_path / "two.nii.gz")
    status = mb.run_bundle(tiny_bundle, tmp_path / "two.nii.gz", tmp_path / "o")   # reported, not raised
    assert list(status.values()) == [status[str(tmp_path / "two.nii.gz")]]
    assert "is a 4D image with 2 volumes" in status[str(tmp_path / "two.nii.gz")]
    with pytest.raises(ValueError, match="has 1 channel.*takes 2 channels"):
        mb.CheckImaged("image", 2)({"image": str(CT)})
    mb.CheckImaged("image", 2)({"image": str(tmp_path / "two.nii.gz")})  # a 2-channel model takes it
    with pytest.raises(ValueError, match="STS_002/CT_image.nii.gz: is a 4D image with 3 volumes"):
        from monai.data import MetaTensor

        mb.CheckImaged("image", 1)({"image": MetaTensor(torch.zeros(3, 8, 8, 8), meta={"filename_or_obj": str(CT)})})
    assert not (tmp_path / "o").exists()


@needs_data
def test_medmamba_bundle_run(tiny_bundle, tmp_path, capsys):
    """``medmamba bundle run BUNDLE IN OUT``: MONAI's run in-process after the input checks."""
    import nibabel as nib

    src = nib.load(CT)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:64, :64, :24], src.affine), tmp_path / "in" / "small.nii.gz")
    parser = argparse.ArgumentParser()
    mb.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bundle", "run", str(tiny_bundle), str(tmp_path / "in"), str(tmp_path / "out"),
                              "--device", "cpu"])
    assert args.func(args) == 0
    seg = nib.load(tmp_path / "out" / "small_seg.nii.gz")
    assert seg.shape == (64, 64, 24)
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    args = parser.parse_args(["bundle", "run", str(tiny_bundle), str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "error: input not found" in capsys.readouterr().err


@needs_data
def test_verify_net_in_out(tiny_bundle):
    proc = _monai("verify_net_in_out", "network_def", "--meta_file", tiny_bundle / "configs/metadata.json",
                  "--config_file", tiny_bundle / "configs/inference.json", "--bundle_root", tiny_bundle,
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified with no error" in proc.stdout + proc.stderr


def test_ckpt_export(tiny_bundle, tmp_path):
    """MONAI's ckpt_export (the function behind ``python -m monai.bundle ckpt_export``, called in-process to
    save a subprocess): scripting fails; tracing works only if the selective scan stops being a Python op."""
    from monai.bundle import ckpt_export

    ts = tmp_path / "model.ts"
    kw = dict(net_id="network_def", filepath=str(ts), ckpt_file=str(tiny_bundle / "models/model.pt"),
              meta_file=str(tiny_bundle / "configs/metadata.json"),
              config_file=str(tiny_bundle / "configs/inference.json"), bundle_root=str(tiny_bundle))
    with pytest.raises(Exception, match="BasicBlockD|TorchScript|compile"):
        ckpt_export(**kw)  # torch.jit.script
    try:
        ckpt_export(use_trace=True, input_shape=[1, 1, 64, 64, 32], **kw)
        error = None
    except Exception as exc:  # noqa: BLE001
        error = str(exc)
    if error is None:  # exportable: the TorchScript model must match the eager one
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(tiny_bundle / "configs/inference.json"))
        net = parser.get_parsed_content("network_def").eval()
        net.load_state_dict(torch.load(tiny_bundle / "models/model.pt", weights_only=True))
        x = torch.randn(1, 1, 64, 64, 32)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(str(ts))(x), net(x), atol=1e-4, rtol=1e-4)
    else:  # not exportable: the bundle says so and why
        assert "Could not export Python function call" in error or "bit_length" in error, error
        assert "TorchScript: not available" in (tiny_bundle / "docs/README.md").read_text()


@needs_data
def test_train_config_runs_one_epoch(tmp_path):
    bundle = mb.create_bundle(tmp_path / "b", **dict(TINY, roi=(32, 32, 32)))
    data = tmp_path / "Task01_STS"
    for case in ("STS_002", "STS_003"):
        _link(STS / case / "CT_image.nii.gz", data / "imagesTr" / f"{case}.nii.gz")
        _link(STS / case / "CT_mask.nii.gz", data / "labelsTr" / f"{case}.nii.gz")
    proc = _monai("run", "--config_file", bundle / "configs/train.json", "--meta_file",
                  bundle / "configs/metadata.json", "--bundle_root", bundle, "--dataset_dir", data,
                  "--max_epochs", 1, "--val_interval", 1, "--num_samples", 1, "--batch_size", 1,
                  "--spacing", "[6.0, 6.0, 8.0]")  # coarse: validation is one 32^3 window
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((bundle / "eval").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (bundle / "models/finetuned/model.pt").is_file()
    assert "val_mean_dice" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------
# nnU-Net checkpoints
# ----------------------------------------------------------------------------------------------------------

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 3,
                "file_ending": ".nii.gz"}


def _fake_nnunet_fold(root: Path, plans: dict, with_init_args: bool = True) -> Path:
    """An nnU-Net results fold as nnU-Net writes it, for a trainer nobody can import (so the network comes
    from the plans' class, here medmamba's UMambaBot with small features)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, True)
    fold = root / "Dataset901_STS" / "nnUNetTrainerBundleTestFake__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold.parent / "plans.json").write_text(json.dumps(plans))
    (fold.parent / "dataset.json").write_text(json.dumps(DATASET_JSON))
    init = {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": DATASET_JSON, "device": "cpu"}
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerBundleTestFake",
                "init_args": init if with_init_args else {}, "inference_allowed_mirroring_axes": (0, 1, 2),
                "current_epoch": 1}, fold / "checkpoint_final.pth")
    return fold / "checkpoint_final.pth"


def _sts_plans(transpose_forward=None) -> dict:
    """Plans from nnUNetv2 2.8.1's planner on three ibsi_sts cases (tests/data), with medmamba's UMambaBot
    as the network class, small features."""
    plans = json.loads(PLANS.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "medmamba.nets.umamba.UMambaBot"
    arch["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 16, 16, 16]
    if transpose_forward is not None:
        plans["transpose_forward"] = list(transpose_forward)
        plans["transpose_backward"] = [int(i) for i in np.argsort(transpose_forward)]
        cfg = plans["configurations"]["3d_fullres"]
        # the native spacing (z, y, x) = (3.27, 0.977, 0.977) in the transposed order: no resampling
        native = [3.2699999809265137, 0.9765620231628418, 0.9765620231628418]
        cfg["spacing"] = [native[i] for i in transpose_forward]
    return plans


def _compare_with_nnunet_preprocessing(bundle: Path, image: Path, perm: list[int]):
    """The bundle's preprocessed tensor equals nnU-Net's DefaultPreprocessor output up to the RAS flips."""
    import nibabel as nib
    from monai.bundle import ConfigParser
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser["bundle_root"] = str(bundle)
    ours = np.asarray(parser.get_parsed_content("preprocessing")({"image": str(image)})["image"])
    plans = json.loads((bundle / "configs/nnunet/plans.json").read_text())
    pm = PlansManager(plans)
    theirs, _, _ = DefaultPreprocessor(verbose=False).run_case([str(image)], None, pm,
                                                              pm.get_configuration("3d_fullres"), DATASET_JSON)
    codes = nib.aff2axcodes(nib.load(image).affine)
    flips = [1 + n for n in range(3) if codes[perm[n]] != "RAS"[perm[n]]]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.flip(ours, flips), theirs, atol=1e-4)


@needs_data
def test_nnunet_checkpoint_mirrors_the_plans(tmp_path):
    plans = _sts_plans()
    ckpt = _fake_nnunet_fold(tmp_path / "results", plans)
    bundle = mb.create_bundle(tmp_path / "bundle", checkpoint=str(ckpt))
    cfg = json.loads((bundle / "configs/inference.json").read_text())
    # SimpleITK (z, y, x) spacing (3.27, 0.977, 0.977) -> RAS (x, y, z); ROI = patch size in network axes
    np.testing.assert_allclose(cfg["spacing"], [0.9765620231628418, 0.9765620231628418, 3.2699999809265137])
    assert cfg["roi_size"] == plans["configurations"]["3d_fullres"]["patch_size"] == [56, 160, 160]
    tfs = {t["_target_"]: t for t in cfg["preprocessing"]["transforms"]}
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    clip = tfs["ScaleIntensityRanged"]
    assert (clip["a_min"], clip["a_max"], clip["b_min"], clip["b_max"], clip["clip"]) == \
        (props["percentile_00_5"], props["percentile_99_5"], props["percentile_00_5"], props["percentile_99_5"], True)
    assert (tfs["NormalizeIntensityd"]["subtrahend"], tfs["NormalizeIntensityd"]["divisor"]) == \
        (props["mean"], props["std"])
    assert tfs["Transposed"]["indices"] == [0, 3, 2, 1]
    assert cfg["network_def"]["_target_"] == "medmamba.nets.umamba.UMambaBot"
    assert cfg["network_def"]["deep_supervision"] is False
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["medmamba"]["nnunet"]["configuration"] == "3d_fullres" and meta["random_init"] is False
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "CT"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "tumour"}
    # the weights are the checkpoint's, in the network the config builds
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
    weights = torch.load(ckpt, weights_only=False)["network_weights"]
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    # preprocessing = nnU-Net's, voxel for voxel (after Orientationd's flips)
    _compare_with_nnunet_preprocessing(bundle, CT, perm=[2, 1, 0])
    # plans next to the fold instead of in the checkpoint; channel counts are checked
    ckpt2 = _fake_nnunet_fold(tmp_path / "results2", plans, with_init_args=False)
    mb.create_bundle(tmp_path / "bundle2", checkpoint=str(ckpt2), in_channels=1, out_channels=2)
    with pytest.raises(mb.BundleError, match="--out-channels 3 contradicts"):
        mb.create_bundle(tmp_path / "bundle3", checkpoint=str(ckpt2), out_channels=3)
    with pytest.raises(mb.BundleError, match="come from the nnU-Net plans"):
        mb.create_bundle(tmp_path / "bundle3", checkpoint=str(ckpt2), spacing=(1, 1, 1))


@needs_data
def test_nnunet_transpose_forward(tmp_path):
    plans = _sts_plans(transpose_forward=[2, 0, 1])
    bundle = mb.create_bundle(tmp_path / "bundle", checkpoint=str(_fake_nnunet_fold(tmp_path / "r", plans)))
    cfg = json.loads((bundle / "configs/inference.json").read_text())
    # network axis n = original (z, y, x) axis tf[n] = RAS axis 2 - tf[n]
    assert [t for t in cfg["preprocessing"]["transforms"] if t["_target_"] == "Transposed"][0]["indices"] == \
        [0, 1, 3, 2]
    np.testing.assert_allclose(cfg["spacing"], [0.9765620231628418, 0.9765620231628418, 3.2699999809265137])
    _compare_with_nnunet_preprocessing(bundle, CT, perm=[0, 2, 1])


def test_nnunet_preprocessing_mapping_nibabel_reader():
    plans = _sts_plans(transpose_forward=[1, 2, 0])
    plans["image_reader_writer"] = "NibabelIO"
    pre = mb._nnunet_preprocessing(plans, "3d_fullres", 1)
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    # Nibabel arrays are in NIfTI voxel order: original axis a = RAS axis a
    assert pre["perm"] == [1, 2, 0]
    assert pre["pixdim"] == [spacing[2], spacing[0], spacing[1]]
    with pytest.raises(mb.BundleError, match="2D"):
        mb._nnunet_preprocessing(plans, "2d", 1)


@needs_data
def test_nnunet_bundle_runs_with_monai_cli(tmp_path):
    import nibabel as nib

    bundle = mb.create_bundle(tmp_path / "bundle", checkpoint=str(_fake_nnunet_fold(tmp_path / "r", _sts_plans())))
    inp = tmp_path / "in"
    _link(CT, inp / "STS_002.nii.gz")
    # a smaller ROI and coarser spacing than the plans' (the network takes any size divisible by 8 x 32 x 32)
    proc = _monai("run", "--config_file", bundle / "configs/inference.json", "--bundle_root", bundle,
                  "--dataset_dir", inp, "--output_dir", tmp_path / "out", "--roi_size", "[24, 64, 64]",
                  "--spacing", "[3.0, 3.0, 6.54]")  # one window
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg, image = nib.load(tmp_path / "out" / "STS_002_seg.nii.gz"), nib.load(CT)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)


def test_nnunet_checkpoint_of_a_medmamba_trainer(tmp_path):
    """A checkpoint of medmamba's nnU-Net plugin: the trainer's builder (after its preset) makes the network."""
    trainers = pytest.importorskip("medmamba.nnunet.trainers")
    from medmamba.nnunet.presets import apply_preset
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer = trainers.nnUNetTrainerLightMUNet
    plans = apply_preset(json.loads(PLANS.read_text()), trainer.arch, configurations=["3d_fullres"])
    pm = PlansManager(plans)
    net = trainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, True)
    fold = tmp_path / "Dataset901_STS" / "nnUNetTrainerLightMUNet__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerLightMUNet",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": DATASET_JSON,
                              "device": "cpu"}}, fold / "checkpoint_final.pth")
    bundle = mb.create_bundle(tmp_path / "bundle", checkpoint=str(fold / "checkpoint_final.pth"))
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["medmamba"]["nnunet"]["network_builder"].endswith("nnUNetTrainerLightMUNet.build_network_architecture")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    rebuilt = parser.get_parsed_content("network_def")
    rebuilt.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
    assert type(rebuilt) is type(net)
    assert parser["roi_size"] == list(pm.get_configuration("3d_fullres").patch_size)


def test_nnunet_network_factory(tmp_path):
    """The fallback network_def for nnU-Net networks that are no plain _target_: rebuilt from the plans."""
    plans = _sts_plans()
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    net = mb.nnunet_network(str(tmp_path / "plans.json"), str(tmp_path / "dataset.json"), "3d_fullres",
                            "nnUNetTrainerBundleTestFake")
    assert type(net).__name__ == "UMambaBot" and net.decoder.deep_supervision is False
    assert (net.in_channels, net.out_channels) == (1, 2)


def test_split_datalist():
    assert mb.split_datalist([1]) == ([1], [1])
    assert mb.split_datalist([1, 2]) == ([1], [2])
    assert mb.split_datalist(list(range(10)), 0.2) == (list(range(8)), [8, 9])
    with pytest.raises(ValueError):
        mb.split_datalist([])


def test_copy_is_not_shared():
    # the train and inference configs get their own transform dicts (the parser mutates them)
    tf = [{"_target_": "X"}]
    a, b = mb._deterministic(["image"], tf, [0, 1, 2]), mb._deterministic(["image"], tf, [0, 1, 2])
    a[5]["_target_"] = "Y"
    assert b[5]["_target_"] == "X" and tf[0]["_target_"] == "X"
    assert copy.deepcopy(a) == a
