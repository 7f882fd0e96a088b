"""``medmamba predict`` on real scans (NIfTI and a DICOM series) with a tiny MONAI bundle, and input reading."""
import json
import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medmamba.clinic import imageio
from medmamba.cli import main

from conftest import DATA_DIR

TS = os.path.join(DATA_DIR, "totalsegmentator")
DICOM = os.path.join(TS, "example_ct_dicom")
STS_CT = [os.path.join(DATA_DIR, "ibsi_sts", c, "CT_image.nii.gz") for c in ("STS_002", "STS_008")]
needs_data = pytest.mark.skipif(not (os.path.isdir(DICOM) and all(map(os.path.isfile, STS_CT))),
                                reason=f"real data not found under {DATA_DIR} (set MEDMAMBA_DATA)")


def make_threshold_bundle(root) -> str:
    """A standard MONAI bundle whose 1x1x1 convolution labels voxels above -500 HU (body vs air): known output.

    Its preprocessing reorients to RAS and resamples to 3 mm, so the prediction only lands on the input grid if
    the bundle's Invertd (run by ``medmamba predict``) undoes both."""
    bundle = os.path.join(root, "threshold_bundle")
    os.makedirs(os.path.join(bundle, "configs"))
    os.makedirs(os.path.join(bundle, "models"))
    config = {
        "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [3.0, 3.0, 3.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1500, "a_max": 500, "b_min": -1.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"}]},
    }
    with open(os.path.join(bundle, "configs", "inference.json"), "w") as f:
        json.dump(config, f, indent=1)
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1, 1))
        net.bias.zero_()
    torch.save(net.state_dict(), os.path.join(bundle, "models", "model.pt"))
    return bundle


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two real CTs (symlinked, read in place), a DICOM series folder (symlinked), and a corrupt NIfTI."""
    root = tmp_path_factory.mktemp("predict")
    inp = root / "in"
    inp.mkdir()
    for path in STS_CT:
        os.symlink(path, inp / f"{path.split(os.sep)[-2]}.nii.gz")
    os.symlink(DICOM, inp / "patient_dicom")
    (inp / "broken.nii.gz").write_bytes(b"not a NIfTI file at all" * 20)
    return root, make_threshold_bundle(str(root))


@needs_data
def test_dicom_series_geometry():
    cases = imageio.find_cases(TS)
    dicom = [c for c in cases if c.kind == "dicom"]
    assert [c.name for c in dicom] == ["example_ct_dicom"] and len(dicom[0].files) == 20
    img = imageio.read_case(dicom[0])
    seg = sitk.ReadImage(os.path.join(TS, "example_seg_dicom.nii.gz"))
    assert img.GetSize() == (512, 512, 20)
    # the reference segmentation is y-flipped in index space but in the same physical space
    assert imageio.geometry_problems(img, seg)    # raw grids differ ...
    flipped = sitk.Flip(seg, [False, True, False])
    assert imageio.geometry_problems(img, flipped) == []      # ... the same physical grid once flipped
    for idx in [(0, 0, 0), (511, 511, 19), (100, 300, 7)]:
        p = img.TransformIndexToPhysicalPoint(idx)
        assert seg.TransformPhysicalPointToIndex(p) == (idx[0], 511 - idx[1], idx[2])
    assert imageio.read_image(DICOM).GetSize() == (512, 512, 20)


@needs_data
def test_predict_bundle_nifti_and_dicom(inputs, capsys):
    root, bundle = inputs
    out = root / "out"
    rc = main(["predict", "--model", bundle, "--input", str(root / "in"), "--output", str(out), "--device", "cpu"])
    assert rc == 1                                            # the broken file failed ...
    log = json.loads((out / "predict_log.json").read_text())["cases"]
    assert log["broken"]["status"] == "failed" and "cannot read" in log["broken"]["error"]
    assert "FAILED broken" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["STS_002.nii.gz", "STS_008.nii.gz", "patient_dicom.nii.gz", "predict_log.json"]
    for name, src in [("STS_002", STS_CT[0]), ("STS_008", STS_CT[1]), ("patient_dicom", DICOM)]:   # ... the others ran
        assert log[name]["status"] == "ok"
        image = imageio.read_image(src)
        seg = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert imageio.geometry_problems(seg, image, names=("seg", "input")) == []
        assert seg.GetPixelID() == sitk.sitkUInt8
        # the network labels voxels above -500 HU (at 3 mm): agrees with thresholding the input on its own grid,
        # and far better than with the threshold flipped in any axis (a lost orientation would show there)
        expected = sitk.GetArrayFromImage(image) > -500
        got = sitk.GetArrayFromImage(seg)
        assert set(np.unique(got)) <= {0, 1}
        d = dice(got > 0, expected)
        assert d > 0.95, name
        for axis in range(3):
            assert d > dice(got > 0, np.flip(expected, axis)) + 0.01, (name, axis)
    assert not [p for p in os.listdir(out) if p.startswith(".")]      # no temporary files left


@needs_data
def test_predict_never_overwrites(inputs, tmp_path, capsys):
    root, bundle = inputs
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(STS_CT[1], inp / "STS_008_0000.nii.gz")        # nnU-Net-style name: output STS_008.nii.gz
    out = tmp_path / "out"
    out.mkdir()
    (out / "STS_008.nii.gz").write_bytes(b"old")
    args = ["predict", "--model", bundle, "--input", str(inp), "--output", str(out), "--device", "cpu"]
    assert main(args) == 1
    assert (out / "STS_008.nii.gz").read_bytes() == b"old"
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert sitk.ReadImage(str(out / "STS_008.nii.gz")).GetSize() == sitk.ReadImage(STS_CT[1]).GetSize()


@needs_data
def test_predict_bad_arguments(inputs, tmp_path, capsys):
    root, bundle = inputs
    assert main(["predict", "--model", str(tmp_path), "--input", str(root / "in"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "neither a MONAI bundle" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--model", bundle, "--input", str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "no NIfTI files or DICOM series" in capsys.readouterr().err
    if os.geteuid() == 0:      # root ignores permission bits: use a file system that refuses writes
        out = "/proc/medmamba_predict_out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = str(ro)
    assert main(["predict", "--model", bundle, "--input", str(root / "in"), "--output", out, "--device", "cpu"]) == 2
    assert "output folder" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("MEDMAMBA_NNUNET_MODEL"),
                    reason="set MEDMAMBA_NNUNET_MODEL to an nnU-Net results folder (Trainer__plans__config with "
                           "fold_*/checkpoint_final.pth, 1 CT channel) to test the nnU-Net path: training one takes "
                           "longer than this test suite may on CPU")
@needs_data
def test_predict_nnunet(tmp_path):
    model = os.environ["MEDMAMBA_NNUNET_MODEL"]
    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.ReadImage(STS_CT[0])
    crop = img[40:104, 40:104, 16:40]        # a real CT crop keeps the CPU run short
    sitk.WriteImage(crop, str(inp / "crop_0000.nii.gz"))
    out = tmp_path / "out"
    assert main(["predict", "--model", model, "--input", str(inp), "--output", str(out), "--device", "cpu",
                 "--no-mirroring"]) == 0
    seg = sitk.ReadImage(str(out / "crop.nii.gz"))
    assert imageio.geometry_problems(seg, crop) == []
