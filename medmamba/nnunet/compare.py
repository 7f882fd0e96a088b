"""``medmamba compare``: train several nnU-Net trainers under one budget on one dataset, predict a separate test
set with each, and compare them (Dice, HD95, NSD, paired Wilcoxon tests, cost).

Fairness: every contender sees the same training cases, nnU-Net's same fold split (its seeded 5-fold
``splits_final.json``, shared by all plans of the dataset), the same seed, the same budget (set on the trainer
before it initialises, so each learning-rate schedule ends with the budget: :mod:`medmamba.nnunet.budget`), the
same inference settings (nnU-Net's predictor, step 0.5, Gaussian weighting, test-time mirroring on or off for
all) and the same evaluation (:func:`medmamba.clinic.evaluate.evaluate`). Planning and preprocessing run once per
plans (nnU-Net's default ``nnUNetPlans``, the ResEnc presets, our ``nnUNetPlans_<arch>``).

Everything lives in ``OUT``: nnU-Net's three folders, the held-out split (``split.json``), one folder per
contender (``contenders/<name>/``: train.json, predict.json, predictions/, evaluation/) and the report
(:mod:`medmamba.nnunet.compare_report`). Rerunning the same command resumes: finished contenders are not
retrained, a killed training resumes from nnU-Net's ``checkpoint_latest.pth`` (saved every epoch), failed ones
are retried; contenders may be added to a finished comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medmamba.nnunet.budget import write_json_atomic

__all__ = ["Budget", "Contender", "parse_budget", "parse_contender", "run_compare", "add_parser"]

COMPARE_DATASET_ID = 991
NNUNET_EPOCHS, NNUNET_ITERATIONS = 1000, 250
_PLANNERS = {"nnUNetPlans": "ExperimentPlanner", "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
             "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL", "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL"}


class CompareError(ValueError):
    """A problem with the user's arguments or data, reported as one line (exit 2)."""


# -- arguments --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Per contender: ``epochs`` x ``iterations`` training iterations (+ ``val_iterations`` per epoch), and/or a
    wall-clock ``time_limit`` in seconds. ``None`` keeps the trainer's own value."""
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    time_limit: float | None = None

    def describe(self) -> str:
        parts = []
        if self.epochs or self.iterations:
            parts.append(f"{self.epochs or 'trainer default'} epochs x {self.iterations or 'trainer default'} iterations"
                         + (f" (+{self.val_iterations} validation)" if self.val_iterations is not None else ""))
        if self.time_limit:
            parts.append(f"at most {self.time_limit / 60:.0f} min of training per contender")
        return ", ".join(parts) or "each trainer's own schedule"

    def total_iterations(self) -> int:
        return (self.epochs or NNUNET_EPOCHS) * (self.iterations or NNUNET_ITERATIONS)


def parse_budget(text: str | None) -> Budget:
    """``"5x10"`` (epochs x iterations), ``"5x10x2"`` (+ validation iterations), ``"30m"`` / ``"2h"`` / ``"900s"``
    (wall-clock limit per contender), both comma-separated (``"50x250,2h"``), or ``"trainer"`` (each trainer's own
    schedule)."""
    if text is None or text.strip().lower() in ("", "trainer", "default"):
        return Budget()
    fields: dict = {}
    for part in (p.strip().lower() for p in text.split(",")):
        if m := re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", part):
            if "epochs" in fields:
                raise CompareError(f"--budget {text!r}: two epoch x iteration parts")
            fields.update(epochs=int(m[1]), iterations=int(m[2]))
            if m[3] is not None:
                fields["val_iterations"] = int(m[3])
            if not fields["epochs"] or not fields["iterations"]:
                raise CompareError(f"--budget {text!r}: epochs and iterations must be at least 1")
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h)", part):
            if "time_limit" in fields:
                raise CompareError(f"--budget {text!r}: two time limits")
            fields["time_limit"] = float(m[1]) * {"s": 1, "m": 60, "min": 60, "h": 3600}[m[2]]
            if fields["time_limit"] <= 0:
                raise CompareError(f"--budget {text!r}: the time limit must be positive")
        else:
            raise CompareError(f"--budget {text!r}: cannot read {part!r} (examples: 5x10, 5x10x2, 30m, 50x250,2h)")
    return Budget(**fields)


@dataclass(frozen=True)
class Contender:
    trainer: str
    plans: str = "nnUNetPlans"

    @property
    def name(self) -> str:
        return self.trainer if self.plans == "nnUNetPlans" else f"{self.trainer}@{self.plans}"

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name.replace("@", "__"))


def parse_contender(spec: str) -> Contender:
    """``TRAINER`` or ``TRAINER@PLANS`` (e.g. ``nnUNetTrainer@nnUNetResEncUNetMPlans``)."""
    trainer, _, plans = spec.partition("@")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", trainer):
        raise CompareError(f"contender {spec!r}: not a trainer class name (TRAINER or TRAINER@PLANS)")
    plans = plans or "nnUNetPlans"
    if plans not in _PLANNERS and not _preset_arch(plans):
        raise CompareError(f"contender {spec!r}: unknown plans {plans!r}; known: {', '.join(_PLANNERS)}, "
                           "nnUNetPlans_<arch> (our presets: medmamba plan)")
    return Contender(trainer, plans)


def _preset_arch(plans: str) -> str | None:
    from medmamba.nnunet.presets import available_presets

    if plans.startswith("nnUNetPlans_"):
        arch = plans[len("nnUNetPlans_"):]
        return arch if arch in available_presets() else None
    return None


# -- data ---------------------------------------------------------------------------------------------------------
def _nnunet_layout(folder: Path, images: str, labels: str) -> dict[str, tuple[list[str], str]]:
    """{case: ([channel files], label)} from an nnU-Net-style pair of folders (``case_XXXX.nii.gz`` images)."""
    from medmamba.nnunet.dataset import _NII, _strip_ext

    cases: dict[str, tuple[list[str], str]] = {}
    img_dir, lab_dir = folder / images, folder / labels
    chans: dict[str, dict[int, str]] = {}
    for p in sorted(img_dir.iterdir()):
        m = re.fullmatch(r"(.+)_(\d{4})\.nii(\.gz)?", p.name)
        if m:
            chans.setdefault(m[1], {})[int(m[2])] = str(p)
    for lab in sorted(lab_dir.iterdir()):
        if lab.name.startswith(".") or not lab.name.endswith(_NII):
            continue
        case = _strip_ext(lab.name)
        if case in chans:
            c = chans[case]
            cases[case] = ([c[k] for k in sorted(c)], str(lab))
    return cases


def _any_layout(folder: Path) -> dict[str, tuple[list[str], str]]:
    """Cases of a folder in any layout the demo accepts (nnU-Net/MSD ``images*``+``labels*``, or one sub-folder per
    case with ``*image*`` and ``*mask|label|seg*`` NIfTI files)."""
    from medmamba.nnunet.dataset import find_cases

    for images, labels in (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr"), ("images", "labels")):
        if (folder / images).is_dir() and (folder / labels).is_dir():
            cases = _nnunet_layout(folder, images, labels)
            if cases:
                return cases
    try:
        return {c: ([img], lab) for c, img, lab in find_cases(folder)}
    except FileNotFoundError as exc:
        raise CompareError(str(exc)) from None


def _label_values(paths) -> list[int]:
    import nibabel as nib
    import numpy as np

    found: set[int] = set()
    for p in paths:
        try:
            arr = np.asanyarray(nib.load(p).dataobj)
        except Exception as exc:
            raise CompareError(f"{p}: cannot read the label file ({type(exc).__name__}: {exc})") from None
        found |= {int(v) for v in np.unique(arr)}
    return sorted(found)


def resolve_dataset(spec: str) -> tuple[str, dict, dict]:
    """(name, dataset.json, {case: ([channel files], label)}) of an nnU-Net raw dataset (id, name or folder) or of
    any folder the demo accepts."""
    folder = Path(spec)
    if not folder.is_dir():
        raw = os.environ.get("nnUNet_raw")
        hits = []
        if raw and re.fullmatch(r"\d{1,3}", spec):
            hits = sorted(Path(raw).glob(f"Dataset{int(spec):03d}_*"))
        elif raw and spec.startswith("Dataset"):
            hits = [Path(raw) / spec] if (Path(raw) / spec).is_dir() else []
        if len(hits) != 1:
            where = f"in $nnUNet_raw ({raw})" if raw else "($nnUNet_raw is not set)"
            raise CompareError(f"dataset {spec!r}: not a folder, and no single nnU-Net raw dataset of that id/name "
                               f"{where}")
        folder = hits[0]
    if (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir():
        try:
            meta = json.loads((folder / "dataset.json").read_text())
        except ValueError as exc:
            raise CompareError(f"{folder / 'dataset.json'}: not valid JSON ({exc})") from None
        cases = _nnunet_layout(folder, "imagesTr", "labelsTr")
        m = re.fullmatch(r"Dataset(\d{3})_(.+)", folder.name)
        name = m[2] if m else folder.name
        meta = {**meta, "_id": int(m[1]) if m else COMPARE_DATASET_ID}
    else:
        cases = _any_layout(folder)
        values = _label_values([lab for _, lab in cases.values()])
        meta = {"channel_names": {"0": "CT"},
                "labels": {"background": 0, **{f"label_{v}": v for v in values if v != 0}},
                "file_ending": ".nii.gz" if next(iter(cases.values()))[0][0].endswith(".nii.gz") else ".nii",
                "_id": COMPARE_DATASET_ID}
        name = folder.name
    if not cases:
        raise CompareError(f"{folder}: no cases with both an image and a label")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "Compare"
    return name, meta, cases


def _write_cases(cases: dict, images: Path, labels: Path, ending: str) -> None:
    from medmamba.nnunet.dataset import _place

    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case, (chans, lab) in cases.items():
        for i, f in enumerate(chans):
            _place(f, images / f"{case}_{i:04d}{ending}", link=True)
        _place(lab, labels / f"{case}{ending}", link=True)


# -- the comparison ---------------------------------------------------------------------------------------------
def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("medmamba", "nnunetv2", "torch", "triton", "monai"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"{device} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _plan(out: Path, dataset_id: int, plans_needed: list[str], configuration: str, env: dict, log: Path,
          processes: int, planner_options: list[str]) -> None:
    from medmamba.nnunet import dataset as nn
    from medmamba.nnunet.presets import write_preset_plans

    pre = Path(env["nnUNet_preprocessed"])
    ds_dirs = sorted(pre.glob(f"Dataset{dataset_id:03d}_*"))
    if not (ds_dirs and (ds_dirs[0] / "dataset_fingerprint.json").is_file()):
        print("[plan] fingerprint of the training cases ...", flush=True)
        t = nn.run_nnunet("extract_fingerprint", ["-d", dataset_id, "-np", processes, "--verify_dataset_integrity"],
                          env, log=log)
        print(f"      done in {t:.0f} s", flush=True)
        ds_dirs = sorted(pre.glob(f"Dataset{dataset_id:03d}_*"))
    folder = ds_dirs[0]
    order = sorted(set(plans_needed), key=lambda p: (p != "nnUNetPlans", p))
    if any(_preset_arch(p) for p in order) and "nnUNetPlans" not in order:
        order.insert(0, "nnUNetPlans")   # our presets start from nnU-Net's default plans
    for plans in order:
        plans_file = folder / f"{plans}.json"
        if not plans_file.is_file():
            if plans in _PLANNERS:
                print(f"[plan] {plans} ({_PLANNERS[plans]}) ...", flush=True)
                nn.run_nnunet("plan_experiment", ["-d", dataset_id, "-pl", _PLANNERS[plans], *planner_options], env,
                              log=log)
            else:
                write_preset_plans(dataset_id, _preset_arch(plans), configurations=[configuration],
                                   preprocessed_dir=pre, output_name=plans)
        conf = json.loads(plans_file.read_text())["configurations"].get(configuration)
        if conf is None:
            raise CompareError(f"{plans} has no configuration {configuration!r} for this dataset")
        data_id = conf.get("data_identifier")
        while data_id is None and conf.get("inherits_from"):
            conf = json.loads(plans_file.read_text())["configurations"][conf["inherits_from"]]
            data_id = conf.get("data_identifier")
        done = folder / f".medmamba_preprocessed_{data_id}"
        if not done.is_file():
            print(f"[plan] preprocess {plans} {configuration} ...", flush=True)
            t = nn.run_nnunet("preprocess", ["-d", dataset_id, "-plans_name", plans, "-c", configuration,
                                             "-np", processes], env, log=log)
            done.write_text("ok\n")
            print(f"      done in {t:.0f} s", flush=True)


def _network_summary(model_folder: str, configuration: str) -> dict:
    """Network class, patch size and batch size from the plans the trainer saved with its results (our trainers
    save their adapted plans there, so this is what was trained)."""
    try:
        plans = json.loads((Path(model_folder) / "plans.json").read_text())
        conf = plans["configurations"][configuration]
        while "inherits_from" in conf and ("architecture" not in conf or "patch_size" not in conf):
            conf = {**plans["configurations"][conf.pop("inherits_from")], **conf}
        arch = conf.get("architecture", {})
        return {"network": str(arch.get("network_class_name", "?")).rsplit(".", 1)[-1],
                "patch_size": conf.get("patch_size"), "batch_size": conf.get("batch_size"),
                "spacing": conf.get("spacing")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _error_line(exc) -> str:
    """The most telling line of a failed worker's output (the last exception line), else its last line."""
    tail = getattr(exc, "tail", None) or str(exc)
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b.*:", ln) or ln.startswith("RuntimeError"):
            return ln[:300]
    return (lines[-1] if lines else str(exc))[:300]


def run_compare(dataset: str, contenders: list[str], out: str, *, test: str | None = None, budget: str | None = None,
                device: str = "cpu", configuration: str = "3d_fullres", fold: str = "0", seed: int = 0,
                test_cases: int | None = None, mirroring: bool = True, da_workers: int | None = None,
                final_validation: bool = True, overwrite: bool = False, processes: int = 2,
                target_spacing: list[float] | None = None, gpu_memory_target: float | None = None,
                command: str | None = None, epoch_lines: bool = True) -> dict:
    """Run (or resume) a comparison; returns the report document (see :mod:`medmamba.nnunet.compare_report`).
    Raises :class:`CompareError` for bad arguments or data; failing contenders are reported, not raised."""
    from medmamba.clinic.evaluate import evaluate
    from medmamba.nnunet import dataset as nn
    from medmamba.nnunet.compare_report import case_metrics, write_report
    from medmamba.nnunet.progress import EpochProgress, format_seconds

    if not contenders:
        raise CompareError("no contenders given (--contenders TRAINER[@PLANS] ...)")
    parsed = [parse_contender(c) for c in contenders]
    if len({c.name for c in parsed}) != len(parsed):
        raise CompareError(f"a contender is listed twice: {contenders}")
    bud = parse_budget(budget)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CompareError("--device cuda: CUDA is not available here (use --device cpu)")
    fold_value: int | str = "all" if str(fold) == "all" else int(fold)
    name, meta, cases = resolve_dataset(dataset)
    out_dir = Path(out).resolve()
    settings = {"dataset": str(Path(dataset).resolve()) if Path(dataset).is_dir() else dataset,
                "test": str(Path(test).resolve()) if test else None, "budget": asdict(bud), "device": device,
                "configuration": configuration, "fold": fold_value, "seed": seed, "test_cases": test_cases,
                "mirroring": mirroring, "da_workers": da_workers, "final_validation": final_validation,
                "target_spacing": [float(v) for v in target_spacing] if target_spacing else None,
                "gpu_memory_target": gpu_memory_target}
    planner_options: list[str] = []
    if target_spacing:
        if len(target_spacing) != 3 or any(v <= 0 for v in target_spacing):
            raise CompareError(f"--target-spacing needs three positive numbers (z y x in mm), got {target_spacing}")
        planner_options += ["-overwrite_target_spacing", *[str(float(v)) for v in target_spacing]]
    if gpu_memory_target is not None:
        if gpu_memory_target <= 0:
            raise CompareError(f"--gpu-memory-target must be positive, got {gpu_memory_target}")
        planner_options += ["-gpu_memory_target", str(float(gpu_memory_target))]
    settings_file = out_dir / "compare_settings.json"
    if settings_file.is_file() and not overwrite:
        before = json.loads(settings_file.read_text())
        diff = [k for k in settings if before.get(k) != settings[k]]
        if diff:
            raise CompareError(f"{out_dir} holds a comparison made with other settings ({', '.join(diff)} differ); "
                               "rerun with the same settings to resume or add contenders, or use another --out "
                               "(or --overwrite to start again)")
    elif out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise CompareError(f"{out_dir} exists, is not empty and holds no comparison; choose another --out or "
                               "pass --overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_file, settings)

    # the held-out test set: a separate folder, or a seeded split made once
    split_file = out_dir / "split.json"
    if split_file.is_file():
        split = json.loads(split_file.read_text())
    else:
        if test:
            test_set = _any_layout(Path(test)) if Path(test).is_dir() else None
            if not test_set:
                raise CompareError(f"--test {test}: not a folder with image/label pairs")
            clash = sorted(set(test_set) & set(cases))
            same_files = sorted(c for c, (imgs, _) in test_set.items()
                                if any(os.path.realpath(i) in {os.path.realpath(x) for ch, _ in cases.values()
                                                               for x in ch} for i in imgs))
            if same_files:
                raise CompareError(f"--test {test}: cases {same_files} are also training cases of {dataset}; the test "
                                   "cases must never be used for training or planning")
            if clash:
                raise CompareError(f"--test {test}: case names {clash} also name training cases; rename them")
            split = {"train": sorted(cases), "test": sorted(test_set), "how": f"--test {test}"}
            test_map = test_set
        else:
            n = len(cases)
            k = test_cases if test_cases is not None else max(1, round(0.2 * n))
            names = sorted(cases)
            random.Random(seed).shuffle(names)
            split = {"train": sorted(names[k:]), "test": sorted(names[:k]),
                     "how": f"{k} of {n} cases held out at random (seed {seed}), once"}
            test_map = {c: cases[c] for c in split["test"]}
        n_train = len(split["train"])
        need = 5 if fold_value != "all" else 1
        if n_train < need or not split["test"]:
            raise CompareError(f"{n_train} training and {len(split['test'])} test cases: nnU-Net's 5-fold split needs "
                               f"at least 5 training cases (or --fold all), and at least one test case is needed")
        if fold_value != "all" and not 0 <= fold_value < 5:
            raise CompareError(f"--fold {fold}: nnU-Net's folds are 0-4 or 'all'")
        split["test_files"] = {c: test_map[c] for c in split["test"]}
        ending = meta.get("file_ending", ".nii.gz")
        ds_folder = out_dir / "nnUNet_raw" / nn.dataset_folder_name(meta["_id"], name)
        if ds_folder.exists():
            shutil.rmtree(ds_folder)
        _write_cases({c: cases[c] for c in split["train"]}, ds_folder / "imagesTr", ds_folder / "labelsTr", ending)
        dj = {k: v for k, v in meta.items() if not k.startswith("_")}
        dj["numTraining"] = n_train
        write_json_atomic(ds_folder / "dataset.json", dj)
        _write_cases(test_map, out_dir / "test" / "imagesTs", out_dir / "test" / "labelsTs", ending)
        split["dataset_id"], split["dataset_folder"] = meta["_id"], ds_folder.name
        split["labels"] = sorted(int(v) for v in meta["labels"].values() if not isinstance(v, list) and int(v) != 0)
        write_json_atomic(split_file, split)
    labels = split["labels"]
    dataset_id = split["dataset_id"]

    env = nn.nnunet_env(out_dir, n_proc_da=(0 if device == "cpu" else None) if da_workers is None else da_workers)
    env["PYTHONUNBUFFERED"] = "1"
    log = out_dir / "nnunet_commands.log"
    n_test = len(split["test"])
    print(f"medmamba compare: {name}: {len(split['train'])} training cases "
          f"({'fold ' + str(fold_value) + ' of nnU-Net 5-fold split' if fold_value != 'all' else 'fold all'}), "
          f"{n_test} test cases ({split['how']}); budget {bud.describe()}; device {device}; seed {seed}\n"
          f"  {len(parsed)} contenders: {', '.join(c.name for c in parsed)}\n  output: {out_dir}", flush=True)
    try:
        # nnU-Net's planner sets its thread count from nnUNet_n_proc_DA: it must be at least 1 there
        _plan(out_dir, dataset_id, [c.plans for c in parsed], configuration,
              {**env, "nnUNet_n_proc_DA": str(max(1, processes))}, log, processes, planner_options)
    except Exception as exc:
        if isinstance(exc, nn.NnUNetCommandError):
            raise CompareError(f"planning/preprocessing failed: {_error_line(exc)} (log: {log})") from None
        raise

    py = sys.executable
    results = []
    test_images = out_dir / "test" / "imagesTs"
    test_files = {c: [str(test_images / f"{c}_{i:04d}{meta.get('file_ending', '.nii.gz')}")
                      for i in range(len(split["test_files"][c][0]))] for c in split["test"]}
    for i, con in enumerate(parsed, 1):
        cdir = out_dir / "contenders" / con.folder
        cdir.mkdir(parents=True, exist_ok=True)
        head = f"[{i}/{len(parsed)}] {con.name}"
        entry = {"name": con.name, "trainer": con.trainer, "plans": con.plans}
        stage = "training"
        try:
            train_file = cdir / "train.json"
            if train_file.is_file():
                print(f"{head}: trained before (not retrained)", flush=True)
            else:
                print(f"{head}: training ({bud.describe()}) ...", flush=True)
                job = {"dataset": dataset_id, "configuration": configuration, "fold": fold_value,
                       "trainer": con.trainer, "plans": con.plans, "device": device, "seed": seed,
                       "epochs": bud.epochs, "iterations": bud.iterations, "val_iterations": bud.val_iterations,
                       "time_limit": bud.time_limit, "mirroring": mirroring, "final_validation": final_validation,
                       "result": str(train_file)}
                write_json_atomic(cdir / "train_job.json", job)
                progress = EpochProgress(total=bud.epochs, stream=sys.stdout if epoch_lines else None,
                                         final_validation=final_validation)
                nn.run_command([py, "-m", "medmamba.nnunet.budget", "train", cdir / "train_job.json"], env,
                               log=cdir / "train.log", on_line=progress)
            train = json.loads(train_file.read_text())
            print(f"      trained {train['epochs_done']} epochs in {format_seconds(train['train_seconds'])}"
                  + (" (stopped by the time limit)" if train.get("stopped_by_time_limit") else ""), flush=True)
            stage = "prediction"
            pred_file = cdir / "predict.json"
            if not pred_file.is_file():
                print(f"      predicting {n_test} test cases ...", flush=True)
                pred_dir = cdir / "predictions"
                if pred_dir.exists():
                    shutil.rmtree(pred_dir)
                job = {"model_folder": train["model_folder"], "fold": fold_value, "device": device,
                       "mirroring": mirroring, "cases": test_files, "output": str(pred_dir), "result": str(pred_file)}
                write_json_atomic(cdir / "predict_job.json", job)
                nn.run_command([py, "-m", "medmamba.nnunet.budget", "predict", cdir / "predict_job.json"], env,
                               log=cdir / "predict.log")
            pred = json.loads(pred_file.read_text())
            stage = "evaluation"
            summary = evaluate(str(cdir / "predictions"), str(out_dir / "test" / "labelsTs"), str(cdir / "evaluation"),
                               labels=labels, images=str(test_images), overwrite=True, progress=False)
            per_case = case_metrics(summary, labels)
            missing = sorted(set(split["test"]) - set(per_case))
            if missing:
                raise RuntimeError(f"no metrics for test cases {missing} (see {cdir / 'evaluation' / 'summary.json'})")
            entry.update(status="ok", cases=per_case, train=train, predict=pred,
                         network=_network_summary(train["model_folder"], configuration))
            dice = [v["dice"] for v in per_case.values()]
            secs = list(pred["seconds_per_case"].values())
            print(f"      test Dice {sum(dice) / len(dice):.3f} over {len(dice)} cases; "
                  f"{sum(secs) / len(secs):.1f} s per case to predict", flush=True)
        except Exception as exc:  # one contender failing must not stop the others
            msg = f"{stage} failed: {_error_line(exc) if isinstance(exc, nn.NnUNetCommandError) else exc}"
            log_name = {"training": "train.log", "prediction": "predict.log"}.get(stage)
            entry.update(status="failed", error=msg + (f" (log: {cdir / log_name})" if log_name else ""))
            print(f"      FAILED: {entry['error']}", flush=True)
        results.append(entry)

    caveats = []
    if device == "cpu":
        caveats.append("Trained and run on a CPU: training and inference times are CPU times and do not predict GPU "
                       "times or their ratios.")
    if bud.total_iterations() < NNUNET_EPOCHS * NNUNET_ITERATIONS // 10:
        caveats.append(f"Smoke-level budget: {bud.total_iterations()} training iterations per contender, under a tenth "
                       f"of nnU-Net's {NNUNET_EPOCHS} x {NNUNET_ITERATIONS}; the networks are far from converged and "
                       "the ranking says little about fully trained networks.")
    if bud.time_limit:
        caveats.append("A wall-clock budget favours fast networks: each contender stops at the limit with its "
                       "learning-rate schedule unfinished if it is slower than the epoch budget.")
    if planner_options:
        caveats.append("Every planner ran with " + " ".join(planner_options) + " (the same for all contenders): "
                       "patch sizes and networks differ from nnU-Net's defaults for this dataset.")
    if n_test < 6:
        caveats.append(f"Only {n_test} test cases: a two-sided Wilcoxon test needs at least 6 pairs to reach p < 0.05.")
    elif n_test < 20:
        caveats.append(f"{n_test} test cases: the tests have little power; read the per-case plot.")
    if len({(r.get('train') or {}).get('iterations_per_epoch') for r in results if r.get('status') == 'ok'}) > 1 or \
            len({(r.get('train') or {}).get('epochs_budget') for r in results if r.get('status') == 'ok'}) > 1:
        caveats.append("The contenders trained with different schedules (no epoch x iteration budget was set and "
                       "their trainers differ): not an equal-budget comparison.")
    da = env.get("nnUNet_n_proc_DA")
    repro = [f"Seed {seed} for Python, NumPy and torch in every training process (identical networks start from "
             "identical weights).",
             f"Fold split: nnU-Net's own seeded 5-fold split (splits_final.json), the same for every contender; "
             f"fold {fold_value}. Test split: {split['how']} (split.json).",
             ("Batches are sampled and augmented in the training process (nnUNet_n_proc_DA=0), so they are seeded."
              if da == "0" else
              f"Batches come from nnU-Net's background workers (nnUNet_n_proc_DA={da or 'nnU-Net default'}), which "
              "nnU-Net starts without seeds: batch order and augmentation stay random between runs."),
             "On CUDA nnU-Net enables cudnn.benchmark (non-deterministic kernels); atomics in backward passes also "
             "make GPU runs differ in the last bits.",
             f"Inference: nnU-Net's predictor, step 0.5, Gaussian weighting, test-time mirroring "
             f"{'on' if mirroring else 'off'} for every contender."]
    report_meta = {
        "command": command or "", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dataset_name": name,
        "settings": settings, "split": {k: split[k] for k in ("train", "test", "how")}, "device": device,
        "device_name": _device_name(device), "versions": _versions(), "budget": asdict(bud),
        "budget_summary": bud.describe(),
        "data_summary": f"{name}: {len(split['train'])} training cases, {n_test} test cases ({split['how']}); "
                        f"configuration {configuration}, fold {fold_value}",
        "caveats": caveats, "reproducibility": repro,
    }
    doc = write_report(out_dir, report_meta, results, labels)
    print(f"report: {out_dir / 'comparison.md'} (and .html, .csv, .json)", flush=True)
    return doc


# -- command line -------------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="train several nnU-Net trainers with one budget, predict a held-out test set with each and "
                        "compare them (Dice, HD95, NSD, Wilcoxon tests, cost)",
        description="Example: medmamba compare ../shared/data/ibsi_sts --contenders nnUNetTrainer "
                    "nnUNetTrainer@nnUNetResEncUNetMPlans nnUNetTrainerUMamba --budget 5x10 --out cmp")
    p.add_argument("dataset", help="nnU-Net raw dataset (id or name in $nnUNet_raw, or its folder) or any folder "
                                   "`medmamba demo --data` accepts")
    p.add_argument("--contenders", nargs="+", required=True, metavar="TRAINER[@PLANS]",
                   help="nnU-Net trainers, optionally with plans (nnUNetPlans, nnUNetResEncUNet{M,L,XL}Plans, "
                        "nnUNetPlans_<arch>); the first is the reference of the statistical tests")
    p.add_argument("--test", default=None, help="folder of test cases (images + labels) never used for training or "
                                                "planning; default: hold out cases of DATASET once (seeded)")
    p.add_argument("--test-cases", type=int, default=None,
                   help="without --test: how many cases to hold out (default 20%%, at least 1)")
    p.add_argument("--budget", default=None,
                   help="per contender: EPOCHSxITERATIONS[xVAL_ITERATIONS] and/or a wall-clock limit (30m, 2h), "
                        "comma-separated, e.g. 5x10 or 100x250,2h; default: each trainer's own schedule")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configuration", "-c", default="3d_fullres")
    p.add_argument("--fold", default="0", help="nnU-Net fold to train (0-4, or all); default 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tta", action="store_true", help="no test-time mirroring (for every contender)")
    p.add_argument("--da-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (default: 0 on CPU, so batches are seeded; nnU-Net's on CUDA)")
    p.add_argument("--no-fold-validation", action="store_true",
                   help="skip nnU-Net's final validation of the fold after training")
    p.add_argument("--target-spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="plan every contender at this spacing (nnU-Net's -overwrite_target_spacing, 3d_fullres): "
                        "e.g. a coarser grid for a CPU comparison; the report says so")
    p.add_argument("--gpu-memory-target", type=float, default=None, metavar="GB",
                   help="nnU-Net's -gpu_memory_target for every planner (smaller patches and batches)")
    p.add_argument("-np", "--processes", type=int, default=2, help="processes for planning/preprocessing")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    command = "medmamba " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "medmamba compare"
    try:
        doc = run_compare(args.dataset, args.contenders, args.out, test=args.test, budget=args.budget,
                          device=args.device, configuration=args.configuration, fold=args.fold, seed=args.seed,
                          test_cases=args.test_cases, mirroring=not args.no_tta, da_workers=args.da_workers,
                          final_validation=not args.no_fold_validation, overwrite=args.overwrite,
                          processes=args.processes, target_spacing=args.target_spacing,
                          gpu_memory_target=args.gpu_memory_target, command=command, epoch_lines=not args.quiet)
    except (CompareError, FileExistsError, FileNotFoundError) as exc:
        print(f"medmamba compare: {exc}", file=sys.stderr)
        return 2
    failed = [r["contender"] for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        print(f"medmamba compare: {len(failed)} contender(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
