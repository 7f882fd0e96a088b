"""Build an nnU-Net raw dataset from image/label NIfTI pairs, and run nnU-Net's own command-line tools.

Used by the tests and meant for ``medmamba demo``:

* :func:`find_cases` finds (case, image, label) triples in a folder (per-case sub-folders such as
  ``STS_002/CT_image.nii.gz`` + ``CT_mask.nii.gz``, or nnU-Net/MSD ``imagesTr`` + ``labelsTr``);
* :func:`build_raw_dataset` writes ``<nnUNet_raw>/DatasetXXX_Name`` (imagesTr, labelsTr, imagesTs,
  dataset.json), symlinking the files by default (the source is read in place, never modified);
* :func:`nnunet_env` / :func:`run_nnunet` and the thin wrappers :func:`plan_and_preprocess`,
  :func:`train`, :func:`predict` run the real ``nnUNetv2_*`` executables in a subprocess whose
  environment points nnU-Net at one root folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = ["find_cases", "build_raw_dataset", "dataset_folder_name", "nnunet_env", "run_nnunet",
           "run_command", "plan_and_preprocess", "train", "predict", "NnUNetCommandError"]

_NII = (".nii.gz", ".nii")


class NnUNetCommandError(RuntimeError):
    """An nnU-Net command failed; the message has the command, its exit status and the end of its output."""


def _strip_ext(name: str) -> str:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def find_cases(data_dir: str | os.PathLike, modality: str | None = "CT") -> list[tuple[str, str, str]]:
    """(case, image path, label path) triples found in ``data_dir``, sorted by case name.

    Layouts:

    * nnU-Net / MSD: ``imagesTr/<case>[_0000].nii.gz`` with ``labelsTr/<case>.nii.gz``;
    * one sub-folder per case holding ``<prefix>image.nii.gz`` and ``<prefix>mask|label|seg.nii.gz``
      (e.g. the IBSI soft-tissue-sarcoma set: ``STS_002/CT_image.nii.gz`` + ``CT_mask.nii.gz``).
      With several modalities in a folder, ``modality`` picks the prefix (``"CT"`` -> ``CT_``).

    Raises ``FileNotFoundError`` when nothing usable is found.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    cases = []
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        for lab in sorted((root / "labelsTr").iterdir()):
            if not lab.name.endswith(_NII) or lab.name.startswith("."):
                continue
            case = _strip_ext(lab.name)
            imgs = [p for p in (root / "imagesTr").glob(case + "*") if re.fullmatch(
                re.escape(case) + r"(_0000)?\.nii(\.gz)?", p.name)]
            if imgs:
                cases.append((case, str(imgs[0]), str(lab)))
        if cases:
            return cases
    label_words = ("mask", "label", "seg")
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [p for p in sub.iterdir() if p.name.endswith(_NII)]
        images = [p for p in files if "image" in _strip_ext(p.name).lower()]
        if modality:
            images = [p for p in images if p.name.lower().startswith(modality.lower() + "_")] or \
                ([] if any(p.name.lower().startswith(modality.lower() + "_") for p in files) else images)
        for img in sorted(images):
            stem = _strip_ext(img.name)
            prefix = stem[: stem.lower().index("image")]
            labels = [p for p in files if p != img and _strip_ext(p.name).lower().startswith(prefix.lower())
                      and any(w in _strip_ext(p.name).lower()[len(prefix):] for w in label_words)]
            if len(labels) == 1:
                cases.append((sub.name if len(images) == 1 else f"{sub.name}_{prefix.strip('_')}",
                              str(img), str(labels[0])))
                break
    if not cases:
        raise FileNotFoundError(f"no image/label NIfTI pairs found in {root} (expected imagesTr/ + labelsTr/, "
                                f"or one folder per case with *image.nii.gz and *mask|label|seg.nii.gz)")
    return cases


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{id:03d}_{name}`` as nnU-Net spells it."""
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"dataset name must be letters, digits, '-' or '_', got {name!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _place(src: str, dst: Path, link: bool) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link:
        try:
            os.symlink(os.path.abspath(src), dst)
            return
        except OSError:  # e.g. no symlink permission: copy instead
            pass
    shutil.copyfile(src, dst)


def build_raw_dataset(cases: Sequence[tuple[str, str, str]], raw_dir: str | os.PathLike, dataset_id: int,
                      name: str, *, test_cases: Sequence[tuple[str, str, str]] = (),
                      channel_names: Mapping[str, str] | None = None, labels: Mapping[str, int] | None = None,
                      link: bool = True, overwrite: bool = False, description: str = "") -> Path:
    """Write ``<raw_dir>/DatasetXXX_Name`` in nnU-Net's raw format and return its path.

    ``cases``/``test_cases``: (case, image, label) triples (one channel per case; the label file of a test
    case goes to ``labelsTs`` for evaluation). Images become ``imagesTr/<case>_0000.nii.gz``.
    ``labels`` defaults to ``{"background": 0, "foreground": 1}``; ``channel_names`` to ``{"0": "CT"}``
    (nnU-Net's CT normalisation). ``link`` symlinks instead of copying (falls back to a copy).
    """
    if not cases:
        raise ValueError("build_raw_dataset: no training cases given")
    names = [c[0] for c in list(cases) + list(test_cases)]
    if len(set(names)) != len(names):
        raise ValueError(f"build_raw_dataset: duplicate case names in {names}")
    folder = Path(raw_dir) / dataset_folder_name(dataset_id, name)
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
        shutil.rmtree(folder)
    ending = ".nii.gz" if cases[0][1].endswith(".nii.gz") else ".nii"
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test_cases else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case, img, lab in cases:
        _place(img, folder / "imagesTr" / f"{case}_0000{ending}", link)
        _place(lab, folder / "labelsTr" / f"{case}{ending}", link)
    for case, img, lab in test_cases:
        _place(img, folder / "imagesTs" / f"{case}_0000{ending}", link)
        if lab:
            _place(lab, folder / "labelsTs" / f"{case}{ending}", link)
    meta = {
        "channel_names": dict(channel_names or {"0": "CT"}),
        "labels": dict(labels or {"background": 0, "foreground": 1}),
        "numTraining": len(cases),
        "file_ending": ending,
        "name": name,
        "description": description or f"built by medmamba from {len(cases)} image/label pairs",
    }
    with open(folder / "dataset.json", "w") as f:
        json.dump(meta, f, indent=2)
    return folder


def nnunet_env(root: str | os.PathLike | None = None, *, base: Mapping[str, str] | None = None,
               n_proc_da: int | None = None, **extra: str) -> dict:
    """An environment for nnU-Net subprocesses: ``base`` (default ``os.environ``) plus
    ``nnUNet_raw/preprocessed/results`` under ``root`` (when given), ``nnUNet_n_proc_DA`` and ``extra``."""
    env = dict(os.environ if base is None else base)
    if root is not None:
        root = Path(root)
        for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                         ("nnUNet_results", "nnUNet_results")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(root / sub)
    if n_proc_da is not None:
        env["nnUNet_n_proc_DA"] = str(int(n_proc_da))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _executable(name: str) -> list[str]:
    """The console script next to this interpreter (so a venv's nnU-Net is used), else from PATH."""
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return [str(cand)]
    found = shutil.which(name)
    if found:
        return [found]
    raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; is nnunetv2 installed?")


def run_command(cmd: Sequence[str], env: Mapping[str, str], *, log: str | os.PathLike | None = None,
                timeout: float | None = None, echo: bool = False, on_line=None) -> float:
    """Run ``cmd`` with ``env``; returns the wall time in seconds.

    Output goes to ``log`` (appended) and, with ``echo``, to stdout as well; ``on_line(line)`` is called for
    each line (e.g. :class:`medmamba.nnunet.progress.EpochProgress`). Raises
    :class:`NnUNetCommandError` with the last 60 lines of output when the command fails.
    """
    cmd = [str(a) for a in cmd]
    start = time.perf_counter()
    lines: list[str] = []
    logf = open(log, "a") if log else None
    try:
        if logf:
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
        proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                del lines[:-200]
                if logf:
                    logf.write(line)
                    logf.flush()   # `tail -f` on the log follows the run
                if echo:
                    sys.stdout.write(line)
                if on_line is not None:
                    on_line(line)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise NnUNetCommandError(f"{' '.join(cmd)} timed out after {timeout} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if logf:
            logf.close()
    if rc != 0:
        tail = "".join(lines[-60:])
        err = NnUNetCommandError(f"{' '.join(cmd)} failed with exit status {rc}"
                                 + (f" (log: {log})" if log else "") + f"; last output:\n{tail}")
        err.returncode, err.tail = rc, tail
        raise err
    return time.perf_counter() - start


def run_nnunet(command: str, args: Iterable, env: Mapping[str, str], *, log: str | os.PathLike | None = None,
               timeout: float | None = None, echo: bool = False, on_line=None) -> float:
    """Run ``nnUNetv2_<command> args...`` with ``env`` (see :func:`run_command`); returns the wall time in seconds."""
    cmd = _executable(command if command.startswith("nnUNetv2_") else "nnUNetv2_" + command) + [str(a) for a in args]
    return run_command(cmd, env, log=log, timeout=timeout, echo=echo, on_line=on_line)


def plan_and_preprocess(dataset_id: int, env: Mapping[str, str], *, configurations: Sequence[str] = ("3d_fullres",),
                        num_processes: int = 1, log=None, extra: Sequence[str] = ()) -> float:
    """``nnUNetv2_plan_and_preprocess -d ID -c ... -np N`` (planning needs ``nnUNet_n_proc_DA`` >= 1)."""
    return run_nnunet("plan_and_preprocess", ["-d", dataset_id, "-c", *configurations, "-np",
                                              *([num_processes] * len(configurations)), *extra], env, log=log)


def train(dataset: int | str, configuration: str, fold: int | str, trainer: str, env: Mapping[str, str], *,
          plans: str = "nnUNetPlans", device: str = "cpu", extra: Sequence[str] = (), log=None,
          on_line=None) -> float:
    """``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS -device DEVICE``."""
    return run_nnunet("train", [dataset, configuration, fold, "-tr", trainer, "-p", plans, "-device", device,
                                *extra], env, log=log, on_line=on_line)


def predict(input_dir, output_dir, dataset: int | str, configuration: str, trainer: str, env: Mapping[str, str], *,
            folds: Sequence = (0,), plans: str = "nnUNetPlans", device: str = "cpu", extra: Sequence[str] = (),
            log=None) -> float:
    """``nnUNetv2_predict -i IN -o OUT -d DATASET -c CONFIGURATION -tr TRAINER -p PLANS -f FOLDS -device D``."""
    return run_nnunet("predict", ["-i", input_dir, "-o", output_dir, "-d", dataset, "-c", configuration, "-tr",
                                  trainer, "-p", plans, "-f", *folds, "-device", device, *extra], env, log=log)
