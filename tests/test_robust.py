"""Issue 14: real CT/masks from ``$MEDMAMBA_DATA`` made bad on purpose (truncated, NaN, non-integer, renamed,
a DICOM slice dropped). Every command must give one clear message naming the file, a non-zero exit, and never a
number computed from a damaged file. Small crops keep it fast."""
import gzip
import json
import os
import shutil
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from medmamba.cli import main
from medmamba.clinic import imageio, validate

from conftest import DATA_DIR
from test_predict import make_threshold_bundle

STS = os.path.join(DATA_DIR, "ibsi_sts", "STS_002")
DICOM = os.path.join(DATA_DIR, "totalsegmentator", "example_ct_dicom")
needs_data = pytest.mark.skipif(not (os.path.isdir(STS) and os.path.isdir(DICOM)),
                                reason=f"real data not found under {DATA_DIR} (set MEDMAMBA_DATA)")
pytestmark = needs_data


def _crop(path):
    img = sitk.ReadImage(path)
    return img[40:104, 40:104, 10:26]          # 64 x 64 x 16 voxels of the real scan, geometry kept


def _save(img, path, arr=None):
    if arr is not None:
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        img = out
    sitk.WriteImage(img, str(path))
    return str(path)


def _truncate(path, keep=0.6):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    ct, mask = _crop(os.path.join(STS, "CT_image.nii.gz")), _crop(os.path.join(STS, "CT_mask.nii.gz"))
    if sitk.GetArrayViewFromImage(mask).max() == 0:      # make sure the crop holds foreground
        arr = sitk.GetArrayFromImage(mask)
        arr[6:10, 20:40, 20:40] = 1
        mask = sitk.GetImageFromArray(arr)
        mask.CopyInformation(ct)
    return root, ct, mask, make_threshold_bundle(str(root))


def _predict(bundle, inp, out, *extra):
    return main(["predict", "--model", bundle, "--input", str(inp), "--output", str(out), "--device", "cpu", *extra])


# ------------------------------------------------------------------------------------------------ reading checks
def test_truncated_nifti_is_refused(real, tmp_path):
    """Item 1: SimpleITK reads a truncated .nii.gz as zeros; read_case refuses it, naming the file."""
    _, ct, mask, _ = real
    path = _save(mask, tmp_path / "m.nii.gz")
    assert validate.nifti_problem(path) is None
    _truncate(path)
    sitk.ReadImage(path)                                  # the trap: no error from SimpleITK
    assert "truncated" in validate.nifti_problem(path)
    with pytest.raises(validate.VolumeError, match=r"m\.nii\.gz.*truncated"):
        imageio.read_image(path)
    raw = _save(ct, tmp_path / "ct.nii")                  # uncompressed: file shorter than the header says
    with open(raw, "r+b") as f:
        f.truncate(os.path.getsize(raw) - 1000)
    assert "truncated" in validate.nifti_problem(raw)


def test_nan_is_counted():
    """Item 3: SimpleITK reads NaN as 0, so NaN is counted on the file (nibabel)."""
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    assert validate.nonfinite_count(arr) == 2


def test_dicom_missing_and_truncated_slice(tmp_path):
    """Item 8: a series with a dropped or truncated slice is refused before stacking."""
    files = imageio.find_cases(DICOM)[0].files
    assert validate.dicom_series_problem(files) is None
    gap = tmp_path / "gap"
    gap.mkdir()
    for i, f in enumerate(files):
        if i != 9:
            shutil.copy(f, gap / os.path.basename(f))
    with pytest.raises(validate.VolumeError, match="1 slice.*missing"):
        imageio.read_image(str(gap))
    short = tmp_path / "short"
    shutil.copytree(gap, short)
    shutil.copy(files[9], short / os.path.basename(files[9]))
    _truncate(short / os.path.basename(files[9]), keep=0.5)
    with pytest.raises(validate.VolumeError, match="truncated|missing|unreadable"):
        imageio.read_image(str(short))


# ------------------------------------------------------------------------------------------------------ evaluate
def _evaluate(pred, ref, out):
    return main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out), "--slices", "1"])


def test_evaluate_damaged_files(real, tmp_path, capsys):
    """Items 1-3, 7: truncated, non-integer and NaN files refuse their case (exit 1); no number from them."""
    _, ct, mask, _ = real
    arr = sitk.GetArrayFromImage(mask)
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for name in ("good", "trunc", "frac", "nan"):
        _save(mask, ref / f"{name}.nii.gz")
        _save(mask, pred / f"{name}.nii.gz")
    _truncate(pred / "trunc.nii.gz")
    _truncate(ref / "trunc.nii.gz", keep=0.7)
    _save(mask, ref / "frac.nii.gz", arr.astype(np.float32) * 0.6)            # item 2: 0.6 is not a label
    bad = arr.astype(np.float32)
    bad[0, :4, :4] = np.nan
    _save(mask, pred / "nan.nii.gz", bad)
    assert _evaluate(pred, ref, tmp_path / "out") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"]["good"]["status"] == "ok" and summary["mean"]["1"]["dice"] == 1.0
    assert summary["mean"]["1"]["n"] == 1                                       # only the good case counted
    assert sorted(summary["refused"]) == ["frac", "nan", "trunc"]
    assert "truncated" in summary["cases"]["trunc"]["reason"]
    assert "reference holds non-integer" in summary["cases"]["frac"]["reason"]
    assert "NaN" in summary["cases"]["nan"]["reason"]


def test_evaluate_nothing_matched_is_an_error(real, tmp_path, capsys):
    """Item 7: no prediction matches a reference: exit 1, not success."""
    _, _, mask, _ = real
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    _save(mask, ref / "a.nii.gz")
    _save(mask, pred / "b.nii.gz")
    assert _evaluate(pred, ref, tmp_path / "out") == 1
    assert "no case evaluated" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- predict
def test_predict_damaged_and_renamed_inputs(real, tmp_path, capsys):
    """Items 1, 3, 4, 5, 10: each bad case fails with its reason, the good ones run, exit 1."""
    _, ct, _, bundle = real
    inp = tmp_path / "in"
    inp.mkdir()
    arr = sitk.GetArrayFromImage(ct)
    _save(ct, inp / "case_0001.nii.gz")                     # item 4: _NNNN is part of a bundle case name
    _save(ct, inp / "case_0002.nii.gz")
    _save(ct, inp / "pat.nii.gz")                           # item 4: pat and pat_0000 claim the same case
    _save(ct, inp / "pat_0000.nii.gz")
    _save(ct, inp / "trunc.nii.gz")
    _truncate(inp / "trunc.nii.gz")
    nan = arr.astype(np.float32)
    nan[4:8, 10:30, 10:30] = np.nan
    _save(ct, inp / "nan.nii.gz", nan)
    _save(ct[:, :, 5], inp / "flat.nii.gz")                 # item 5: 2D
    vec = sitk.Compose(ct, ct)
    _save(vec, inp / "rgb.nii.gz")                          # item 5: 2 components per voxel
    _save(sitk.JoinSeries([ct, ct]), inp / "series.nii.gz")  # item 5: 4D
    out = tmp_path / "out"
    assert _predict(bundle, inp, out) == 1
    log = json.loads((out / "predict_log.json").read_text())["cases"]
    assert log["case_0001"]["status"] == log["case_0002"]["status"] == "ok"
    assert "pat.nii.gz, pat_0000.nii.gz" in log["pat"]["error"]
    assert "truncated" in log["trunc"]["error"] and "trunc.nii.gz" in log["trunc"]["error"]
    assert "NaN" in log["nan"]["error"]
    assert "2D" in log["flat"]["error"]
    assert "components" in log["rgb"]["error"]
    assert "4D" in log["series"]["error"]
    assert not any("applying transform" in e.get("error", "") for e in log.values())
    assert sorted(p for p in os.listdir(out) if p.endswith(".nii.gz")) == ["case_0001.nii.gz", "case_0002.nii.gz"]
    mode = stat.S_IMODE(os.stat(out / "case_0001.nii.gz").st_mode)
    assert mode == 0o644 & ~imageio._umask()                                  # item 10: not 0600
    # item 10: a rerun that writes nothing keeps what the first run recorded
    assert _predict(bundle, inp, out) == 1
    log2 = json.loads((out / "predict_log.json").read_text())["cases"]
    assert log2["case_0001"]["status"] == "exists" and log2["case_0001"]["previous"]["status"] == "ok"


def test_predict_dicom_with_missing_slice(real, tmp_path):
    """Item 8: predict refuses a DICOM series with a gap instead of segmenting a wrong grid."""
    _, _, _, bundle = real
    series = tmp_path / "in" / "patient"
    series.mkdir(parents=True)
    for i, f in enumerate(imageio.find_cases(DICOM)[0].files):
        if i != 12:
            shutil.copy(f, series / os.path.basename(f))
    assert _predict(bundle, tmp_path / "in", tmp_path / "out") == 1
    log = json.loads((tmp_path / "out" / "predict_log.json").read_text())["cases"]
    assert "missing" in log["patient"]["error"]
    assert not os.path.exists(tmp_path / "out" / "patient.nii.gz")


def test_predict_corrupt_model(real, tmp_path, capsys):
    """Item 9: a corrupt or mismatched model.pt is one line with exit 2, not a traceback."""
    root, ct, _, bundle = real
    inp = tmp_path / "in"
    inp.mkdir()
    _save(ct, inp / "a.nii.gz")
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    (bad / "models" / "model.pt").write_bytes(b"garbage" * 100)
    assert _predict(str(bad), inp, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    import torch
    torch.save({"weight": torch.zeros(3)}, bad / "models" / "model.pt")
    assert _predict(str(bad), inp, tmp_path / "out2") == 2
    assert "cannot load the model" in capsys.readouterr().err
    (bad / "configs" / "inference.json").write_text('{"network_def": ')          # broken config: named
    assert _predict(str(bad), inp, tmp_path / "out3") == 2
    assert "inference.json: not valid JSON" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- bundle
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from medmamba import monai as mb
    from test_bundle import TINY

    return mb.create_bundle(tmp_path_factory.mktemp("tiny") / "bundle", **TINY)


def test_bundle_run_goes_on_and_keeps_outputs(real, tiny_bundle, tmp_path, capsys):
    """Item 6: a corrupt file is reported in one line and the good case still runs; existing outputs are kept."""
    _, ct, _, _ = real
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _save(ct, inp / "good.nii.gz")
    _save(ct, inp / "bad.nii.gz")
    _truncate(inp / "bad.nii.gz")
    args = ["bundle", "run", str(tiny_bundle), str(inp), str(out), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 1 and "bad.nii.gz" in failed[0] and "truncated" in failed[0]
    # (MONAI's logging.conf may bind a handler to an earlier test's captured stderr: "--- Logging error ---")
    assert err.count("Traceback") == err.count("--- Logging error ---")
    assert os.path.isfile(out / "good_seg.nii.gz") and not os.path.exists(out / "bad_seg.nii.gz")
    (out / "good_seg.nii.gz").write_bytes(b"old")
    os.remove(inp / "bad.nii.gz")
    assert main(args) == 1                                         # exists: kept, counted
    assert (out / "good_seg.nii.gz").read_bytes() == b"old" and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "good_seg.nii.gz").read_bytes() != b"old"


def test_bundle_verify_and_create_errors(tiny_bundle, tmp_path, capsys):
    """Item 9: one line and exit 2 instead of tracebacks; verify checks model.pt."""
    def fails(*argv, match):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and match in err, err
    fails("bundle", "verify", str(tmp_path / "nowhere"), match="not found")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "configs" / "inference.json").write_text("{ not json")
    fails("bundle", "verify", str(broken), match="inference.json: not valid JSON")
    shutil.copy(tiny_bundle / "configs" / "inference.json", broken / "configs" / "inference.json")
    os.remove(broken / "configs" / "metadata.json")
    fails("bundle", "verify", str(broken), match="metadata.json not found")
    shutil.copy(tiny_bundle / "configs" / "metadata.json", broken / "configs" / "metadata.json")
    (broken / "models" / "model.pt").write_bytes(b"garbage" * 50)
    fails("bundle", "verify", str(broken), match="model.pt: does not load")
    import torch
    torch.save({"conv.weight": torch.zeros(2)}, broken / "models" / "model.pt")          # wrong architecture
    fails("bundle", "verify", str(broken), match="model.pt: does not load")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage" * 50)
    fails("bundle", "create", str(tmp_path / "b1"), "--checkpoint", str(garbage), "--arch", "umamba_bot",
          "--in-channels", "1", "--out-channels", "2", "--spacing", "1", "1", "1", "--intensity", "ct",
          match="bundle create")
    fails("bundle", "create", str(tmp_path / "b2"), "--random-init", "--arch", "umamba_bot", "--in-channels", "0",
          "--out-channels", "2", match="at least 1")


# ------------------------------------------------------------------------------------------------------ pretrain
def test_pretrain_skips_damaged_volumes(real, tmp_path):
    """Items 3, 10: NaN and truncated CTs are skipped at discovery, named once, not counted as CT volumes."""
    from medmamba.pretrain.data import discover_ct, load_ct

    _, ct, _, _ = real
    data = tmp_path / "data"
    data.mkdir()
    _save(ct, data / "good_ct.nii.gz")
    nan = sitk.GetArrayFromImage(ct).astype(np.float32)
    nan[2, 5:9, 5:9] = np.nan
    _save(ct, data / "nan_ct.nii.gz", nan)
    _save(ct, data / "trunc_ct.nii.gz")
    _truncate(data / "trunc_ct.nii.gz")
    found = discover_ct(str(data))
    assert [os.path.basename(i.path) for i in found.items] == ["good_ct.nii.gz"]
    assert found.summary().startswith("1 CT volume(s)") and "2 damaged" in found.summary()
    reasons = dict(found.skipped)
    assert "NaN" in reasons[str(data / "nan_ct.nii.gz")] and "truncated" in reasons[str(data / "trunc_ct.nii.gz")]
    with pytest.raises(ValueError, match="nan_ct.nii.gz: 16 voxels are NaN"):
        load_ct(str(data / "nan_ct.nii.gz"))


def test_pretrain_resume_refuses_foreign_checkpoint_and_other_arch(real, tmp_path, capsys):
    """Item 9/10: a foreign checkpoint_latest and --resume with another --arch are one-line errors (exit 2)."""
    import torch

    from medmamba.pretrain.train import CHECKPOINT_FORMAT, PretrainConfig

    out = tmp_path / "run"
    out.mkdir()
    args = ["pretrain", "--data", str(tmp_path), "--out", str(out), "--device", "cpu", "--no-progress", "--resume"]
    torch.save({"state_dict": {}}, out / "checkpoint_latest.pth")
    assert main([*args, "--arch", "umamba_bot"]) == 2
    assert "not a medmamba pretraining checkpoint" in capsys.readouterr().err
    (out / "checkpoint_latest.pth").write_bytes(b"garbage")
    assert main([*args, "--arch", "umamba_bot"]) == 2
    assert "cannot read" in capsys.readouterr().err
    cfg = PretrainConfig(data=[str(tmp_path)], arch="umamba_bot", out=str(out))
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg.to_json()}, out / "checkpoint_latest.pth")
    assert main([*args, "--arch", "umamba_enc"]) == 2
    assert "arch='umamba_enc' differs from the stored run's 'umamba_bot'" in capsys.readouterr().err


def test_demo_cuda_without_cuda_fails_at_once(tmp_path, capsys):
    """Item 10: ``demo --device cuda`` without CUDA: one line, exit 2, before any planning."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "demo")


def test_plan_with_bad_json(tmp_path, monkeypatch, capsys):
    """Item 9: ``plan`` on a broken plans file: one line naming the file, exit 2."""
    folder = tmp_path / "Dataset901_Sarcoma"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text('{"configurations": ')
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["plan", "901", "--arch", "umamba_bot"]) == 2
    err = capsys.readouterr().err
    assert "nnUNetPlans.json: not valid JSON" in err and "Traceback" not in err


def test_predict_ctrl_c(real, tmp_path, monkeypatch, capsys):
    """Item 9: Ctrl-C in predict: one line, exit 130, no half-written output."""
    _, ct, _, bundle = real
    inp = tmp_path / "in"
    inp.mkdir()
    _save(ct, inp / "a.nii.gz")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "read_case", interrupt)
    assert _predict(bundle, inp, tmp_path / "out") == 130
    err = capsys.readouterr().err
    # (MONAI's logging.conf may bind a handler to an earlier test's captured stderr: "--- Logging error ---")
    assert "interrupted" in err and err.count("Traceback") == err.count("--- Logging error ---")
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".nii.gz")]


# ------------------------------------------------------------------------------------------- leftovers of issue 14
def test_evaluate_missing_prediction_fails_unless_allowed(real, tmp_path, capsys):
    """A reference without prediction: exit 1 naming the case, the report of the cases present is written and
    marked incomplete; ``--allow-missing`` accepts it (exit 0). The Python API only reports (demo, compare)."""
    from medmamba.clinic.evaluate import evaluate

    _, _, mask, _ = real
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for name in ("a", "b", "c"):
        _save(mask, ref / f"{name}.nii.gz")
    _save(mask, pred / "a.nii.gz")
    _save(mask, pred / "b.nii.gz")
    out = tmp_path / "out"
    assert _evaluate(pred, ref, out) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "1 reference case(s) without prediction: c" in lines[0]
    assert "--allow-missing" in lines[0] and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["missing_pred"] == ["c"]
    assert summary["cases"]["c"]["status"] == "missing_pred" and "metrics" not in summary["cases"]["c"]
    assert summary["cases"]["a"]["status"] == summary["cases"]["b"]["status"] == "ok"
    assert summary["cases"]["a"]["metrics"]["1"]["dice"] == 1.0 and summary["mean"]["1"]["n"] == 2
    html = (out / "report.html").read_text()
    assert "INCOMPLETE" in html and "2 case(s) compared" in html
    rows = (out / "metrics.csv").read_text().splitlines()
    assert sum(r.startswith("c,") for r in rows) == 1 and "missing_pred" in [r for r in rows if r.startswith("c,")][0]
    # the explicit, documented opt-out
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "out2"), "--slices", "1",
                 "--allow-missing"]) == 0
    assert "allowed by --allow-missing" in capsys.readouterr().err
    # complete: exit 0, "complete": true
    os.remove(ref / "c.nii.gz")
    assert _evaluate(pred, ref, tmp_path / "out3") == 0
    assert json.loads((tmp_path / "out3" / "summary.json").read_text())["complete"] is True
    # --json does not bypass the policy (nor the "nothing evaluated" rule)
    _save(mask, ref / "c.nii.gz")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "out4"), "--json",
                 "--quiet"]) == 1
    assert json.loads(capsys.readouterr().out)["complete"] is False
    assert main(["evaluate", "--pred", str(tmp_path / "out"), "--ref", str(ref), "--out", str(tmp_path / "out5"),
                 "--json", "--quiet"]) == 1
    # the function itself raises nothing for a missing prediction: the exit policy is the CLI's
    s = evaluate(str(pred), str(ref), str(tmp_path / "out6"), progress=False)
    assert s["cases"]["c"]["status"] == "missing_pred" and s["cases"]["a"]["metrics"]["1"]["nsd"] == 1.0


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_predict_out_of_memory(real, tmp_path, monkeypatch, capsys, error):
    """Out of memory in the network: the case fails with a message naming it and what to change, no partial
    output, the other cases still run, exit 1; ``--sw-batch-size 1`` (the hint) is honoured."""
    import torch
    from monai.inferers import SlidingWindowInferer

    _, ct, _, bundle = real
    inp = tmp_path / "in"
    inp.mkdir()
    _save(ct, inp / "a.nii.gz")
    _save(ct, inp / "b.nii.gz")
    original = SlidingWindowInferer.__call__
    calls = []

    def oom(self, *a, **k):     # out of memory only for the first case, and only with several windows per pass
        calls.append(self.sw_batch_size)
        if self.sw_batch_size > 1 and len(calls) == 1:
            if error == "torch":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: out of memory")
        return original(self, *a, **k)

    monkeypatch.setattr(SlidingWindowInferer, "__call__", oom)
    out = tmp_path / "out"
    assert _predict(bundle, inp, out) == 1
    err = capsys.readouterr().err
    # (MONAI's logging.conf may bind a handler to an earlier test's captured stderr: "--- Logging error ---")
    assert err.count("Traceback") == err.count("--- Logging error ---")
    failed = [line for line in err.splitlines() if "out of memory" in line]
    assert failed and all("case a" in line and "--sw-batch-size 1" in line for line in failed)
    log = json.loads((out / "predict_log.json").read_text())["cases"]
    assert log["a"]["status"] == "failed" and "out of memory while segmenting case a" in log["a"]["error"]
    assert log["b"]["status"] == "ok"                                  # the next case still ran
    assert sorted(os.listdir(out)) == ["b.nii.gz", "predict_log.json"]  # nothing partial, no temporary file
    calls.clear()
    assert _predict(bundle, inp, out, "--sw-batch-size", "1") == 1      # b exists (kept), a now written
    assert calls == [1] and os.path.isfile(out / "a.nii.gz")
    assert _predict(bundle, inp, tmp_path / "o2", "--sw-batch-size", "0") == 2


def test_output_path_is_a_file(real, tmp_path, capsys):
    """--out/--output that is an existing file, or whose parent is a file: one line, exit 2, for predict,
    evaluate and export; nothing written."""
    _, ct, mask, bundle = real
    inp = tmp_path / "in"
    inp.mkdir()
    _save(ct, inp / "a.nii.gz")
    ref = tmp_path / "ref"
    ref.mkdir()
    _save(mask, ref / "a.nii.gz")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, match in ((afile, "is a file, not a folder"), (afile / "sub", f"{afile} is a file, not a folder"),
                       (afile / "sub" / "deeper", f"{afile} is a file, not a folder")):
        for argv in (["predict", "--model", bundle, "--input", str(inp), "--output", str(out), "--device", "cpu"],
                     ["evaluate", "--pred", str(ref), "--ref", str(ref), "--out", str(out)],
                     ["export", bundle, "--format", "onnx", str(out)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err, (argv, err)
            assert err.startswith(f"medmamba {argv[0]}: error:")
    assert afile.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile", "in", "ref"]


def test_pretrain_prints_no_repeated_warnings(tmp_path):
    """A short pretrain on two real CTs (with a data-loader worker) prints no line twice and no warning, in
    particular not MONAI's nvImageCodec notice that LoadImage logged for every volume (~100 lines on a real run).
    A subprocess: pytest's own logging and warnings capture would hide what a user sees on stderr."""
    import subprocess
    import sys

    data = tmp_path / "data"
    for case in ("STS_002", "STS_003"):
        src = os.path.join(DATA_DIR, "ibsi_sts", case, "CT_image.nii.gz")
        if not os.path.isfile(src):
            pytest.skip(f"{src} not found")
        (data / case).mkdir(parents=True)
        os.symlink(src, data / case / "CT_image.nii.gz")
    net = {"features_per_stage": [4, 8, 16], "strides": [1, 2, 2], "n_blocks_per_stage": [1, 1, 1]}
    argv = [sys.executable, "-m", "medmamba", "pretrain", "--data", str(data), "--arch", "umamba_bot",
            "--out", str(tmp_path / "run"), "--patch", "32", "32", "32", "--spacing", "4", "4", "4",
            "--batch-size", "2", "--device", "cpu", "--decoder-width", "16", "--workers", "1", "--steps", "4",
            "--samples-per-volume", "1", "--net-kwargs", json.dumps(net), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if "nvImageCodec" in line], lines
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert not [line for line in lines if "Warning" in line or "warning" in line], lines
