"""Train any nnU-Net trainer under a fixed budget, and predict with per-case timing: the two subprocess jobs of
``medmamba compare``.

Run as ``python -m medmamba.nnunet.budget train|predict JOB.json`` (one process per contender and job, so a
crash, an out-of-memory or a leaked CUDA context of one contender cannot touch the others, and peak memory is
per contender). The job file holds the arguments; the result is written atomically to ``job["result"]``.

Training goes through nnU-Net's own pieces: ``get_trainer_from_args`` finds the trainer exactly as
``nnUNetv2_train`` does (nnU-Net's trainers, ours through ``nnUNet_extTrainer``, anyone's), and
``maybe_load_checkpoint`` resumes from ``checkpoint_latest.pth``. The budget is set on the trainer before it
initialises, so its learning-rate schedule ends with the budget (``num_epochs``, ``num_iterations_per_epoch``,
``num_val_iterations_per_epoch``). :func:`run_training_budgeted` is nnU-Net 2.8's ``run_training`` loop with one
addition: it stops between epochs once the wall-clock limit is spent (the schedule does not shrink; the report
says where it stopped). Then nnU-Net's final validation of the fold runs as with ``nnUNetv2_train``.

Seeds: Python, NumPy and torch are seeded before the trainer is built (weights initialise identically for
identical networks). With ``nnUNet_n_proc_DA=0`` nnU-Net samples and augments batches in this process, so the
batches are seeded too; with background workers nnU-Net passes ``seeds=None`` and the batch order and
augmentation stay random. On CUDA, nnU-Net sets ``cudnn.benchmark`` (non-deterministic kernels).
"""
from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from pathlib import Path

__all__ = ["run_training_budgeted", "seconds_trained", "write_json_atomic", "main"]


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """JSON to ``path`` through a temporary file and a rename (a killed run never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory_mb(device) -> tuple[float, str]:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size (RSS) on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # KiB on Linux


def _log(trainer) -> dict:
    """nnU-Net's per-epoch log: ``trainer.logger.my_fantastic_logging`` (up to 2.6) or the ``MetaLogger``'s
    ``local_logger`` (2.7+)."""
    logger = trainer.logger
    return getattr(logger, "my_fantastic_logging", None) or logger.local_logger.my_fantastic_logging


def seconds_trained(trainer) -> float:
    """Sum of the finished epochs' durations, from nnU-Net's own log (it travels in the checkpoint, so a resumed
    run counts the time spent before the interruption)."""
    log = _log(trainer)
    starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
    return float(sum(e - s for s, e in zip(starts, ends)))


def run_training_budgeted(trainer, time_limit: float | None = None, mirroring: bool = True) -> dict:
    """nnU-Net 2.8's ``nnUNetTrainer.run_training`` with a wall-clock stop between epochs.

    ``mirroring=False`` clears the trainer's test-time mirroring axes (used by its final validation and saved in
    the checkpoint for prediction), so every contender of a comparison predicts alike.
    """
    import torch

    trainer.on_train_start()
    if not mirroring:
        trainer.inference_allowed_mirroring_axes = None
    used = seconds_trained(trainer)
    stopped = False
    for _ in range(trainer.current_epoch, trainer.num_epochs):
        if time_limit is not None and used >= time_limit:
            stopped = True
            trainer.print_to_log_file(f"medmamba compare: time limit of {time_limit:.0f} s reached after "
                                      f"{trainer.current_epoch} epochs; stopping", also_print_to_console=True)
            break
        t0 = time.perf_counter()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val = [trainer.validation_step(next(trainer.dataloader_val))
                   for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(val)
        trainer.on_epoch_end()   # writes checkpoint_latest.pth (save_every = 1)
        used += time.perf_counter() - t0
        print(f"medmamba compare: epoch {trainer.current_epoch} saved", flush=True)
    trainer.on_train_end()
    return {"stopped_by_time_limit": stopped, "epochs_done": int(trainer.current_epoch)}


def _train(job: dict) -> dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    device = torch.device(job["device"])
    _seed(int(job["seed"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer = get_trainer_from_args(str(job["dataset"]), job["configuration"], job["fold"], job["trainer"],
                                    job["plans"], device=device)
    if job.get("epochs"):
        trainer.num_epochs = int(job["epochs"])
    if job.get("iterations"):
        trainer.num_iterations_per_epoch = int(job["iterations"])
    if job.get("val_iterations") is not None:
        trainer.num_val_iterations_per_epoch = int(job["val_iterations"])
    trainer.save_every = 1  # checkpoint_latest after every epoch: a killed comparison resumes where it stopped
    resume = any((Path(trainer.output_folder) / n).is_file() for n in ("checkpoint_final.pth", "checkpoint_latest.pth"))
    maybe_load_checkpoint(trainer, continue_training=resume, validation_only=False)
    resumed_at = int(trainer.current_epoch)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True  # as nnUNetv2_train
    run = run_training_budgeted(trainer, job.get("time_limit"), mirroring=bool(job.get("mirroring", True)))
    train_seconds = seconds_trained(trainer)
    val_start = time.perf_counter()
    validation = None
    if job.get("final_validation", True):
        trainer.perform_actual_validation(False)
        summary = Path(trainer.output_folder) / "validation" / "summary.json"
        if summary.is_file():
            validation = json.loads(summary.read_text()).get("foreground_mean")
    log = _log(trainer)
    peak, kind = _peak_memory_mb(device)
    return {
        "status": "ok", "trainer": job["trainer"], "plans": job["plans"], "fold": job["fold"],
        "epochs_budget": int(trainer.num_epochs), "iterations_per_epoch": int(trainer.num_iterations_per_epoch),
        "val_iterations_per_epoch": int(trainer.num_val_iterations_per_epoch), "time_limit_s": job.get("time_limit"),
        "resumed_at_epoch": resumed_at, **run,
        "train_seconds": round(train_seconds, 2), "final_validation_seconds": round(time.perf_counter() - val_start, 2),
        "process_seconds": round(time.perf_counter() - start, 2),
        "parameters": int(sum(p.numel() for p in trainer.network.parameters())),
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind,
        "last_train_loss": float(log["train_losses"][-1]) if log.get("train_losses") else None,
        "last_pseudo_dice": [float(v) for v in log["dice_per_class_or_region"][-1]]
        if log.get("dice_per_class_or_region") else None,
        "fold_validation": validation, "output_folder": str(trainer.output_folder),
        "model_folder": str(trainer.output_folder_base), "seed": int(job["seed"]),
        "mirroring": bool(job.get("mirroring", True)),
    }


def _predict(job: dict) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(job["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(job["mirroring"]),
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(job["model_folder"], use_folds=(job["fold"],),
                                                   checkpoint_name="checkpoint_final.pth")
    out = Path(job["output"])
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for case, files in sorted(job["cases"].items()):
        t0 = time.perf_counter()
        predictor.predict_from_files_sequential([files], [str(out / case)], save_probabilities=False, overwrite=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[case] = round(time.perf_counter() - t0, 3)
        print(f"predicted {case} in {seconds[case]:.1f} s", flush=True)
    peak, kind = _peak_memory_mb(device)
    return {"status": "ok", "seconds_per_case": seconds, "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind,
            "mirroring": bool(job["mirroring"]), "tile_step_size": 0.5}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("train", "predict"):
        print("usage: python -m medmamba.nnunet.budget train|predict JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[1]).read_text())
    result = (_train if argv[0] == "train" else _predict)(job)
    write_json_atomic(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
