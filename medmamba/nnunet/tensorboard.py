"""TensorBoard logging for nnU-Net trainers through nnU-Net 2.8's ``MetaLogger`` extension point.

``MetaLogger.loggers`` takes any object with ``log(key, value, step)``, ``log_summary(key, value)`` and
``update_config(config)``; nnU-Net logs one value per epoch for ``train_losses``, ``val_losses``,
``mean_fg_dice``, ``ema_fg_dice``, ``dice_per_class_or_region`` (split into ``.../class_<i>`` by the
MetaLogger), ``lrs`` and the epoch start/end timestamps. :class:`TensorBoardLogger` writes them as

    loss/train, loss/val, pseudo_dice/mean, pseudo_dice/ema, pseudo_dice/class_<i>, lr, time/epoch_s

plus the final validation Dice (``final_val/...``) and the configuration as text, into an event file
under ``<fold folder>/tensorboard`` (``tensorboard --logdir $nnUNet_results``). The writer opens lazily
on the first value, with ``purge_step`` so a resumed run replaces the events after its checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

__all__ = ["TensorBoardLogger", "attach_tensorboard", "TAGS"]

TAGS = {
    "train_losses": "loss/train",
    "val_losses": "loss/val",
    "mean_fg_dice": "pseudo_dice/mean",
    "ema_fg_dice": "pseudo_dice/ema",
    "lrs": "lr",
}


class TensorBoardLogger:
    """A ``MetaLogger`` logger writing scalars to TensorBoard under ``log_dir``."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self.log_dir = log_dir
        self.enabled = enabled
        self._writer = None
        self._epoch_start: dict[int, float] = {}
        self._last_step = 0
        self._pending_text: list[tuple[str, str]] = []
        self._opened = False

    # -- writer ---------------------------------------------------------------------------------
    def _get_writer(self, step: int):
        if not self.enabled:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # tensorboard missing or broken: training must go on
                warnings.warn(f"TensorBoard logging disabled: {exc}")
                self.enabled = False
                return None
            os.makedirs(self.log_dir, exist_ok=True)
            # a resumed run (first value at step > 0) drops stale events from that step on; reopening after
            # close() (final validation after training) must not purge anything
            purge = step if step > 0 and not self._opened else None
            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge)
            self._opened = True
            for tag, text in self._pending_text:
                self._writer.add_text(tag, text, 0)
            self._pending_text.clear()
        return self._writer

    # -- MetaLogger interface -------------------------------------------------------------------
    def log(self, key: str, value: Any, step: int) -> None:
        if not self.enabled:
            return
        self._last_step = max(self._last_step, int(step))
        if key == "epoch_start_timestamps":
            self._epoch_start[int(step)] = float(value)
            return
        if key == "epoch_end_timestamps":
            start = self._epoch_start.pop(int(step), None)
            w = self._get_writer(step)
            if w is not None:
                if start is not None:
                    w.add_scalar("time/epoch_s", float(value) - start, step)
                w.flush()  # one flush per epoch: the curves are current while training runs
            return
        if key.startswith("dice_per_class_or_region/"):
            tag = "pseudo_dice/" + key.split("/", 1)[1]
        else:
            tag = TAGS.get(key, key)
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        if math.isnan(v):
            return  # e.g. the Dice of a class absent from the validation batches
        w = self._get_writer(step)
        if w is not None:
            w.add_scalar(tag, v, step)

    def log_summary(self, key: str, value: Any) -> None:
        if not self.enabled:
            return
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        w = self._get_writer(self._last_step)
        if w is not None and not math.isnan(v):
            w.add_scalar(key, v, self._last_step)
            w.flush()

    def update_config(self, config: dict) -> None:
        if not self.enabled:
            return
        for name, value in config.items():
            try:
                text = json.dumps(value, indent=2, sort_keys=False, default=str)
            except Exception:
                text = str(value)
            item = (f"config/{name}", "```\n" + text + "\n```")
            if self._writer is None:
                self._pending_text.append(item)  # written when the writer opens (first epoch)
            else:
                self._writer.add_text(*item, self._last_step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def attach_tensorboard(trainer, subdir: str = "tensorboard") -> TensorBoardLogger | None:
    """Add a :class:`TensorBoardLogger` writing to ``<trainer.output_folder>/<subdir>`` to the trainer's
    ``MetaLogger`` (rank 0 only; ``MEDMAMBA_TENSORBOARD=0`` disables it). Returns the logger or None."""
    if os.environ.get("MEDMAMBA_TENSORBOARD", "1").lower() in ("0", "false", "f", "no"):
        return None
    if getattr(trainer, "local_rank", 0) != 0 or trainer.output_folder is None:
        return None
    meta = getattr(trainer, "logger", None)
    if meta is None or not hasattr(meta, "loggers"):
        return None
    tb = TensorBoardLogger(os.path.join(trainer.output_folder, subdir))
    meta.loggers.append(tb)
    return tb
