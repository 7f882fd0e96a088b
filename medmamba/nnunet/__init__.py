"""nnU-Net v2 plugin: trainers, plans presets, pretrained weights, TensorBoard, discovery.

* ``medmamba.nnunet.trainers``: ``nnUNetTrainerUMamba`` (U-Mamba Bot, the recommended default) and one
  trainer per architecture, each with ``_5epochs`` and ``_debug`` variants;
* ``medmamba.nnunet.presets``: ``medmamba plan`` (plans presets from ``plans/``);
* ``medmamba.nnunet.pretrained``: ``-pretrained_weights`` for nnU-Net and MambaMIM checkpoints;
* ``medmamba.nnunet.tensorboard``: a logger for nnU-Net's ``MetaLogger``;
* ``medmamba.nnunet.env``: where nnU-Net finds the trainers (``nnUNet_extTrainer``);
* ``medmamba.nnunet.dataset``: raw dataset building and ``nnUNetv2_*`` runners.

Importing this package is cheap (no torch, no nnU-Net); submodules load on first use. See docs/nnunet.md.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("trainers", "presets", "pretrained", "tensorboard", "env", "dataset")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"medmamba.nnunet.{name}")
    raise AttributeError(f"module 'medmamba.nnunet' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
