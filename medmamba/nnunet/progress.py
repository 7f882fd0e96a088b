"""Epoch progress from nnU-Net's console output, for people watching a training run.

``nnUNetv2_train`` prints each epoch as several log lines (``Epoch 3``, ``train_loss -0.41``, ``val_loss ...``,
``Pseudo dice [np.float32(0.71)]``, ``Epoch time: 41.2 s``). Training runs in a subprocess whose output goes to a
log file, so without this a person sees nothing for the whole run. :class:`EpochProgress` is a line callback for
:func:`medmamba.nnunet.dataset.run_nnunet`: it collects one epoch's values and prints one line when the epoch
ends (``Epoch time``), with an ETA from the mean epoch time so far. The total number of epochs comes from our
trainers' ``medmamba: {... 'epochs': N ...}`` line (or ``total=``); without it the ETA is omitted.
"""
from __future__ import annotations

import json
import re
import sys
import time

_NUM = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"
_PATTERNS = {
    "epoch": re.compile(r"\bEpoch (\d+)\s*$"),
    "train_loss": re.compile(r"\btrain_loss " + _NUM),
    "val_loss": re.compile(r"\bval_loss " + _NUM),
    "pseudo_dice": re.compile(r"\bPseudo dice \[(.*)\]"),
    "epoch_time": re.compile(r"\bEpoch time: " + _NUM + r" s"),
    "total": re.compile(r"'epochs': (\d+)"),
}


def _floats(text: str) -> list[float]:
    """``np.float32(0.71), 0.5`` -> ``[0.71, 0.5]`` (numpy 2 prints scalars with their type)."""
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", re.sub(r"np\.float\d+", "", text))]


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EpochProgress:
    """Callable on each output line; prints one summary line per finished epoch.

    ``json_lines=True`` prints each epoch as a JSON object instead (machine-readable); ``stream=None`` prints
    nothing but still collects :attr:`epochs`.
    """

    def __init__(self, total: int | None = None, stream=sys.stdout, json_lines: bool = False, prefix: str = "      ",
                 final_validation: bool = True):
        self.total, self.stream, self.json_lines, self.prefix = total, stream, json_lines, prefix
        self.final_validation = final_validation  # False: "Training done." is the end (no validation line)
        self.epochs: list[dict] = []
        self._cur: dict = {}
        self._start = time.perf_counter()

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n")
        if self.total is None and (m := _PATTERNS["total"].search(line)):
            self.total = int(m.group(1))
        if m := _PATTERNS["epoch"].search(line):
            self._cur = {"epoch": int(m.group(1))}
        elif m := _PATTERNS["train_loss"].search(line):
            self._cur["train_loss"] = float(m.group(1))
        elif m := _PATTERNS["val_loss"].search(line):
            self._cur["val_loss"] = float(m.group(1))
        elif m := _PATTERNS["pseudo_dice"].search(line):
            self._cur["pseudo_dice"] = _floats(m.group(1))
        elif (m := _PATTERNS["epoch_time"].search(line)) and "epoch" in self._cur:
            self._cur["epoch_seconds"] = float(m.group(1))
            self._finish()
        elif "Training done." in line and self.final_validation and self.stream is not None and not self.json_lines:
            # nnU-Net then predicts its validation cases: minutes without epoch lines on a CPU
            self.stream.write(self.prefix + "training done; nnU-Net's final validation of the fold ...\n")
            self.stream.flush()

    def _finish(self) -> None:
        e, self._cur = self._cur, {}
        self.epochs.append(e)
        mean = sum(x["epoch_seconds"] for x in self.epochs) / len(self.epochs)
        if self.total:
            e["eta_seconds"] = round(max(0, self.total - e["epoch"] - 1) * mean, 1)
        if self.stream is None:
            return
        if self.json_lines:
            self.stream.write(json.dumps(e) + "\n")
        else:
            of = f"/{self.total}" if self.total else ""
            dice = ", ".join(f"{d:.3f}" for d in e.get("pseudo_dice", []))
            parts = [f"epoch {e['epoch'] + 1}{of}"]
            if "train_loss" in e:
                parts.append(f"loss {e['train_loss']:.4f}")
            if "val_loss" in e:
                parts.append(f"val {e['val_loss']:.4f}")
            if dice:
                parts.append(f"pseudo-Dice {dice}")
            parts.append(f"{e['epoch_seconds']:.1f} s/epoch")
            if "eta_seconds" in e:
                parts.append(f"ETA {format_seconds(e['eta_seconds'])}")
            self.stream.write(self.prefix + "  ".join(parts) + "\n")
        self.stream.flush()
