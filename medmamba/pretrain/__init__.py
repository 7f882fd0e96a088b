"""MambaMIM self-supervised pretraining (masked image modelling) for the hybrid CNN-Mamba networks.

* ``build_downstream_network(arch, plans=None, configuration=None, in_channels=1, out_channels=2)``:
  the segmentation network a pretraining checkpoint is for (``network.py``);
* ``MambaMIM``: masked encoder + TOKI + light decoder + loss (``model.py``); masking in ``masking.py``,
  TOKI in ``toki.py``, sparse execution of the network's modules in ``sparse.py``/``encoders.py``;
* ``discover_ct`` / ``CTCropStream``: CT discovery and crop streaming (``data.py``);
* ``PretrainConfig`` / ``run_pretraining``: the training loop behind ``medmamba pretrain`` (``train.py``).

See docs/pretraining.md. Submodules are imported lazily.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_downstream_network": "network", "SUPPORTED": "network", "check_arch": "network",
    "MambaMIM": "model", "export_network_weights": "model",
    "MaskPyramid": "masking", "TOKI": "toki", "toki_fill": "toki",
    "discover_ct": "data", "CTCropStream": "data", "NoCTFoundError": "data",
    "PretrainConfig": "train", "run_pretraining": "train",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medmamba.pretrain.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medmamba.pretrain' has no attribute {name!r}")


__all__ = list(_EXPORTS)
