"""``medmamba demo``: plan, preprocess, train, predict and evaluate with nnU-Net and our trainer.

Runs nnU-Net's own command-line tools exactly as a user would, on a synthetic CT-like dataset generated
on the fly (the default: works on any fresh machine, nothing downloaded) or on real data (``--data``).
Everything goes into one output folder (nnUNet_raw / nnUNet_preprocessed / nnUNet_results, predictions,
evaluation, logs), so nothing outside it is touched.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "MedMambaDemo"
DEFAULT_TRAINER = "nnUNetTrainerUMamba_demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="plan, train, predict and evaluate nnUNetTrainerUMamba end to end "
                                    "(synthetic data by default, or --data)")
    p.add_argument("--data", default=None,
                   help="folder of image/label NIfTI pairs (imagesTr+labelsTr, or one sub-folder per case with "
                        "*image* and *mask* files, e.g. ../shared/data/ibsi_sts); default: synthetic phantoms")
    p.add_argument("--out", default="medmamba_demo", help="output folder (default: ./medmamba_demo)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--trainer", default=DEFAULT_TRAINER,
                   help=f"nnU-Net trainer (default {DEFAULT_TRAINER}: a few short epochs; "
                        "nnUNetTrainerUMamba is the full 1000-epoch schedule)")
    p.add_argument("--cases", type=int, default=6, help="synthetic cases to generate (default 6)")
    p.add_argument("--test-cases", type=int, default=1, help="cases held back for prediction (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines while training (steps only)")
    p.add_argument("--json-progress", action="store_true", help="per-epoch lines as JSON objects")
    p.set_defaults(func=cmd_demo)


def synthetic_cases(folder: Path, n: int) -> list[tuple[str, str, str]]:
    from medmamba.demo.phantom import make_phantom, write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        image, label, spacing = make_phantom(seed=i)
        img, lab = folder / f"phantom_{i:03d}_image.nii.gz", folder / f"phantom_{i:03d}_mask.nii.gz"
        write_nifti(img, image, spacing)
        write_nifti(lab, label, spacing)
        cases.append((f"phantom_{i:03d}", str(img), str(lab)))
    return cases


def run_demo(out: str, data: str | None = None, device: str = "cpu", trainer: str = DEFAULT_TRAINER,
             n_cases: int = 6, n_test: int = 1, overwrite: bool = False, epoch_lines: str | None = "text") -> dict:
    """``epoch_lines``: "text" (one line per epoch: loss, pseudo-Dice, epoch time, ETA), "json" or None."""
    from medmamba.clinic.evaluate import evaluate
    from medmamba.nnunet import dataset as nn

    if device == "cuda":   # fail at once, not after minutes of planning
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here (use --device cpu)")
    out_dir = Path(out).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it, "
                                  "or choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "nnunet_commands.log"
    t0 = time.perf_counter()
    if data:
        cases = nn.find_cases(data)
        source = f"{len(cases)} cases from {data}"
    else:
        if n_cases < 3:
            raise ValueError("--cases must be at least 3 (nnU-Net needs 2 training cases besides the held-out one)")
        cases = synthetic_cases(out_dir / "synthetic", n_cases)
        source = f"{n_cases} synthetic CT phantoms (32x96x96 voxels, 3x1x1 mm)"
    if not 1 <= n_test <= len(cases) - 2:
        raise ValueError(f"--test-cases must be between 1 and {len(cases) - 2} for {len(cases)} cases")
    train_cases, test_cases = cases[:-n_test], cases[-n_test:]
    print(f"medmamba demo: {source}; {len(train_cases)} for training (fold 0 of nnU-Net's 5-fold split), "
          f"{len(test_cases)} held out; trainer {trainer}; device {device}\n  output: {out_dir}\n"
          f"  nnU-Net's own output goes to {log}", flush=True)
    env = nn.nnunet_env(out_dir, n_proc_da=2)
    env["PYTHONUNBUFFERED"] = "1"   # nnU-Net prints without flushing: unbuffered, its epoch lines arrive as they happen
    raw = nn.build_raw_dataset(train_cases, env["nnUNet_raw"], DEMO_DATASET_ID, DEMO_DATASET_NAME,
                               test_cases=test_cases, labels={"background": 0, "lesion": 1}, link=bool(data))
    times = {}

    def step(name, fn, *args, **kw):
        print(f"[{len(times) + 1}/4] {name} ...", flush=True)
        times[name] = fn(*args, log=log, **kw)
        print(f"      done in {times[name]:.0f} s", flush=True)

    step("plan + preprocess", nn.plan_and_preprocess, DEMO_DATASET_ID, env, num_processes=2,
         extra=["--verify_dataset_integrity"])
    from medmamba.nnunet.progress import EpochProgress

    epochs = EpochProgress(stream=sys.stdout if epoch_lines else None, json_lines=epoch_lines == "json")
    step("train", nn.train, DEMO_DATASET_ID, "3d_fullres", 0, trainer, env, device=device, on_line=epochs)
    pred_dir = out_dir / "predictions"
    step("predict", nn.predict, raw / "imagesTs", pred_dir, DEMO_DATASET_ID, "3d_fullres", trainer, env,
         device=device, extra=["--disable_tta"])
    print("[4/4] evaluate ...", flush=True)
    start = time.perf_counter()
    summary = evaluate(str(pred_dir), str(raw / "labelsTs"), str(out_dir / "evaluation"), images=str(raw / "imagesTs"),
                       progress=False)
    times["evaluate"] = time.perf_counter() - start
    result = {"source": source, "trainer": trainer, "device": device, "seconds": times, "epochs": epochs.epochs,
              "total_seconds": time.perf_counter() - t0,
              "dice": {name: entry["metrics"]["1"]["dice"] for name, entry in summary["cases"].items()
                       if entry.get("status") == "ok" and "1" in entry.get("metrics", {})},
              "mean": summary["mean"].get("1")}
    (out_dir / "demo_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, d in result["dice"].items():
        print(f"      {name}: Dice {d:.3f}")
    mean = result["mean"]
    if mean:
        print(f"      mean Dice {mean['dice']:.3f}, NSD@2mm {mean['nsd']:.3f}"
              + (f", HD95 {mean['hd95_mm']:.1f} mm" if mean.get("hd95_mm") is not None else ""))
    print(f"done in {result['total_seconds']:.0f} s. Report: {out_dir / 'evaluation' / 'report.html'}; "
          f"model: {env['nnUNet_results']}", flush=True)
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        run_demo(args.out, data=args.data, device=args.device, trainer=args.trainer, n_cases=args.cases,
                 n_test=args.test_cases, overwrite=args.overwrite,
                 epoch_lines=None if args.quiet else ("json" if args.json_progress else "text"))
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"medmamba demo: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failing nnU-Net step: its message names the command and the log
        from medmamba.nnunet.dataset import NnUNetCommandError

        if isinstance(exc, NnUNetCommandError):
            print(f"medmamba demo: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
