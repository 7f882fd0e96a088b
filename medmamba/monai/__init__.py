"""MONAI bundles for medmamba networks.

``medmamba bundle create OUT --arch NAME ...`` writes a standard MONAI bundle (``configs/metadata.json``,
``configs/inference.json``, ``configs/train.json``, ``configs/logging.conf``, ``models/model.pt``,
``docs/README.md``, ``LICENSE``) that MONAI's own CLI runs::

    python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT \\
        --dataset_dir IN --output_dir SEG

* ``checks``: what the configs reference besides MONAI (``CheckImaged``, ``list_images``, ``msd_datalist``,
  ``split_datalist``) and ``BundleError``;
* ``from_nnunet``: nnU-Net fold checkpoints (network, preprocessing, weights; ``nnunet_network`` for
  networks that cannot be written as a plain ``_target_``);
* ``create``: ``create_bundle`` and ``check_metadata``; ``run``: ``run_bundle``, ``verify_bundle``;
* ``cli``: ``medmamba bundle ...``.

The old module ``medmamba.bundle`` is this package (see ``medmamba/__init__.py``), so every name it had is
reachable here. Importing the package imports neither MONAI nor nnU-Net; submodules load on first use.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("checks", "from_nnunet", "create", "run", "cli")
_EXPORTS = {
    "NIFTI_SUFFIXES": "checks", "BundleError": "checks", "CheckImaged": "checks", "list_images": "checks",
    "msd_datalist": "checks", "split_datalist": "checks",
    "nnunet_network": "from_nnunet",
    "META_SCHEMA_URL": "create", "REQUIRED_META_KEYS": "create", "REQUIRED_TENSOR_KEYS": "create",
    "RANDOM_INIT_WARNING": "create", "check_metadata": "create", "create_bundle": "create",
    "run_bundle": "run", "verify_bundle": "run",
    "add_parser": "cli",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"medmamba.monai.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medmamba.monai.{_EXPORTS[name]}"), name)
    if not name.startswith("__"):  # private helpers of the old single module, wherever they live now
        for sub in _SUBMODULES:
            module = importlib.import_module(f"medmamba.monai.{sub}")
            if name in vars(module):
                return vars(module)[name]
    raise AttributeError(f"module 'medmamba.monai' has no attribute {name!r}")


__all__ = list(_EXPORTS)
