"""``medmamba bundle create``: the bundle writer (configs, metadata, README, LICENSE, weights)."""
from __future__ import annotations

import copy
import importlib.metadata
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from medmamba.monai.checks import BundleError
from medmamba.monai.from_nnunet import (_adapt_plans, _as_target, _build_nnunet_network, _jsonable, _load_weights,
                                        _nnunet_num_inputs, _nnunet_preprocessing, _read_nnunet_checkpoint)

META_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
# What MONAI's metadata schema and the MONAI Bundle specification require, checked offline by
# check_metadata() (monai.bundle.verify_metadata downloads the schema). MONAI >= 1.4 renames a metadata key
# "optional_packages_version" to "required_packages_version" on load (overwriting the latter), so the bundles
# only have required_packages_version.
REQUIRED_META_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                      "task", "description", "authors", "copyright", "network_data_format")
REQUIRED_TENSOR_KEYS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                        "is_patch_data", "channel_def")
RANDOM_INIT_WARNING = ("RANDOM WEIGHTS: this bundle was created with --random-init for smoke tests only; its "
                       "predictions are meaningless.")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _divisor(net, dims: int = 3) -> list[int]:
    d = getattr(net, "divisor", 1)
    return [int(d)] * dims if isinstance(d, int) else [int(x) for x in d]


def _intensity_transforms(key: str, intensity: str | None, ct_window, nn_norm: dict | None,
                          num_channels: int) -> tuple[list[dict], dict]:
    """(transforms, description) of the intensity normalisation."""
    if nn_norm is not None:
        schemes = nn_norm["schemes"]
        if len(set(schemes)) != 1:
            raise BundleError(f"channels with different nnU-Net normalisations {schemes} are not supported")
        scheme = schemes[0]
        if scheme == "CTNormalization":
            if num_channels != 1:
                raise BundleError("nnU-Net CTNormalization with several channels is not supported (one clip "
                                  "range per channel)")
            st = nn_norm["ct_stats"][0]
            lo, hi = float(st["percentile_00_5"]), float(st["percentile_99_5"])
            mean, std = float(st["mean"]), max(float(st["std"]), 1e-8)
            # ScaleIntensityRanged with equal in/out ranges is a clip; then (x - mean) / std as nnU-Net does
            return ([{"_target_": "ScaleIntensityRanged", "keys": key, "a_min": lo, "a_max": hi, "b_min": lo,
                      "b_max": hi, "clip": True},
                     {"_target_": "NormalizeIntensityd", "keys": key, "subtrahend": mean, "divisor": std}],
                    {"scheme": f"nnU-Net CTNormalization: clip to [{lo:g}, {hi:g}], then (x - {mean:g}) / {std:g}",
                     "clip": [lo, hi], "mean": mean, "std": std, "modality": "CT", "format": "hounsfield"})
        if scheme == "ZScoreNormalization":
            nonzero = bool(nn_norm["use_mask_for_norm"][0])
            return ([{"_target_": "NormalizeIntensityd", "keys": key, "nonzero": nonzero, "channel_wise": True}],
                    {"scheme": "nnU-Net ZScoreNormalization: z-score per image and channel" +
                               (" over non-zero voxels" if nonzero else ""),
                     "nonzero": nonzero, "modality": "MR", "format": "magnitude"})
        if scheme == "RescaleTo01Normalization":
            return ([{"_target_": "ScaleIntensityd", "keys": key, "minv": 0.0, "maxv": 1.0, "channel_wise": True}],
                    {"scheme": "nnU-Net RescaleTo01Normalization", "modality": "n/a", "format": "magnitude"})
        if scheme == "NoNormalization":
            return [], {"scheme": "none", "modality": "n/a", "format": "magnitude"}
        raise BundleError(f"nnU-Net normalisation {scheme!r} is not supported")
    if intensity == "ct":
        lo, hi = (float(v) for v in ct_window)
        return ([{"_target_": "ScaleIntensityRanged", "keys": key, "a_min": lo, "a_max": hi, "b_min": 0.0,
                  "b_max": 1.0, "clip": True}],
                {"scheme": f"CT window [{lo:g}, {hi:g}] HU scaled to [0, 1]", "modality": "CT",
                 "format": "hounsfield"})
    if intensity == "mri":
        return ([{"_target_": "NormalizeIntensityd", "keys": key, "nonzero": True, "channel_wise": True}],
                {"scheme": "z-score per image and channel over non-zero voxels", "modality": "MR",
                 "format": "magnitude"})
    raise BundleError(f"--intensity must be 'ct' or 'mri', got {intensity!r}")


def _deterministic(keys: list[str], intensity_tf: list[dict], perm: list[int]) -> list[dict]:
    label = len(keys) > 1
    tf = [{"_target_": "medmamba.monai.checks.CheckImaged", "keys": "image", "num_channels": "@num_channels"},
          {"_target_": "LoadImaged", "keys": keys, "image_only": True},
          {"_target_": "EnsureChannelFirstd", "keys": keys},
          # explicit labels (NIfTI/RAS world): MONAI >= 1.5 warns that the default is changing to the tensor's space
          {"_target_": "Orientationd", "keys": keys, "axcodes": "@orientation",
           "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
          {"_target_": "Spacingd", "keys": keys, "pixdim": "@spacing",
           "mode": ["bilinear", "nearest"] if label else "bilinear"},
          *copy.deepcopy(intensity_tf)]
    if perm != [0, 1, 2]:
        tf.append({"_target_": "Transposed", "keys": keys, "indices": [0] + [p + 1 for p in perm]})
    tf.append({"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32"})
    return tf


def _common(num_channels: int, num_classes: int, roi, pixdim, network_def: dict) -> dict:
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "data_device": "@device",
        "amp": False,
        "num_channels": num_channels,
        "num_classes": num_classes,
        "orientation": "RAS",
        "spacing": [float(p) for p in pixdim],
        "roi_size": [int(r) for r in roi],
        "sw_batch_size": 1,
        "overlap": 0.5,
        "num_workers": 0,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
    }


def _inferer() -> dict:
    return {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": "@sw_batch_size",
            "overlap": "@overlap", "mode": "gaussian", "sw_device": "@device", "device": "@data_device"}


def _inference_config(common: dict, deterministic: list[dict]) -> dict:
    cfg = dict(common)
    cfg.update({
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8",
        "separate_folder": False,
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "datalist": {"_target_": "medmamba.monai.checks.list_images", "dataset_dir": "@dataset_dir",
                     "num_channels": "@num_channels"},
        "preprocessing": {"_target_": "Compose", "transforms": deterministic},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": _inferer(),
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix", "resample": False,
             "separate_folder": "@separate_folder", "print_log": True}]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@data_device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "@amp"},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "@ckpt_path",
                             "load_dict": {"model": "@network"}, "map_location": "@device"},
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    })
    return cfg


def _train_config(common: dict, deterministic: list[dict]) -> dict:
    cfg = dict(common)
    val_post = {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
         "to_onehot": "@num_classes"}]}
    from_loss = "$monai.handlers.from_engine(['loss'], first=True)"
    cfg.update({
        "imports": common["imports"] + ["$import ignite"],
        "output_dir": "$@bundle_root + '/eval'",
        "ckpt_dir": "$@bundle_root + '/models/finetuned'",
        "pretrained_ckpt": "$@bundle_root + '/models/model.pt'",
        "load_pretrained": True,
        "max_epochs": 100,
        "val_interval": 5,
        "val_fraction": 0.2,
        "batch_size": 2,
        "num_samples": 2,
        "learning_rate": 1e-4,
        "datalist": {"_target_": "medmamba.monai.checks.msd_datalist", "dataset_dir": "@dataset_dir",
                     "num_channels": "@num_channels"},
        "split": {"_target_": "medmamba.monai.checks.split_datalist", "datalist": "@datalist",
                  "val_fraction": "@val_fraction"},
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True, "include_background": True,
                 "batch": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": 1e-5},
        "train": {
            "deterministic_transforms": deterministic,
            "random_transforms": [
                {"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": "@roi_size"},
                {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
                 "spatial_size": "@roi_size", "pos": 1, "neg": 1, "num_samples": "@num_samples"},
                {"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 0},
                {"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 1},
                {"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 0.5, "spatial_axis": 2},
                {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
                {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5}],
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
            "dataset": {"_target_": "Dataset", "data": "$@split[0]", "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": True, "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": val_post,
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": from_loss},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": from_loss}],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer",
                        "postprocessing": "@train#postprocessing", "train_handlers": "@train#handlers",
                        "amp": "@amp"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
            "dataset": {"_target_": "Dataset", "data": "$@split[1]", "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": "@num_workers"},
            "inferer": _inferer(),
            "postprocessing": val_post,
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"}],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@data_device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": "@amp"},
        },
        "checkpointloader": {"_target_": "CheckpointLoader", "_disabled_": "$not @load_pretrained",
                             "load_path": "@pretrained_ckpt", "load_dict": {"model": "@network"},
                             "map_location": "@device"},
        "initialize": ["$monai.utils.set_determinism(seed=0)", "$@checkpointloader(@train#trainer)"],
        "run": ["$@train#trainer.run()"],
    })
    return cfg


def _metadata(*, arch_target: str, num_channels: int, num_classes: int, roi, labels: list[str], norm_desc: dict,
              channel_names: list[str], source: dict, random_init: bool, pixdim, nnunet: dict | None) -> dict:
    import monai
    import numpy
    import torch

    from medmamba import __version__

    short = arch_target.rsplit(".", 1)[-1]
    description = (f"medmamba {short} for volumetric segmentation of {norm_desc['modality']} images: "
                   f"sliding-window inference on {tuple(roi)} patches at {tuple(pixdim)} mm (RAS), intensity: "
                   f"{norm_desc['scheme']}.")
    if random_init:
        description = RANDOM_INIT_WARNING + " " + description
    tensor_common = {"type": "image", "spatial_shape": [int(r) for r in roi], "dtype": "float32",
                     "is_patch_data": True}
    required = {"medmamba": __version__, "nibabel": _version("nibabel"), "pytorch-ignite": _version("pytorch-ignite"),
                "fire": _version("fire"), "tensorboard": _version("tensorboard")}
    if nnunet is not None:
        required["nnunetv2"] = _version("nnunetv2")
    meta = {
        "schema": META_SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": "created by `medmamba bundle create`" + (" (random weights)" if random_init else "")},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": required,
        "name": f"medmamba {short} segmentation",
        "task": f"3D segmentation ({num_classes} classes: {', '.join(labels)}) with {short}",
        "description": description,
        "authors": "medmamba bundle creator (fill in the model's authors)",
        "copyright": "Copyright (c) the model's authors (fill in)",
        "data_source": source.get("data_source", "unknown"),
        "data_type": "nibabel",
        "image_classes": f"{num_channels} channel(s): {', '.join(channel_names)}; {norm_desc['scheme']}",
        "label_classes": f"single channel label map: {', '.join(f'{i} {n}' for i, n in enumerate(labels))}",
        "pred_classes": f"{num_classes} channels (logits); the saved segmentation is the argmax of their softmax",
        "intended_use": ("Smoke tests only: random weights, not a model." if random_init else
                         "Research use only; not for diagnostic purposes."),
        "references": ["medmamba: Mamba 3D segmentation networks for nnU-Net v2 and MONAI"],
        "random_init": random_init,
        "network_data_format": {
            "inputs": {"image": {**tensor_common, "format": norm_desc["format"], "modality": norm_desc["modality"],
                                 "num_channels": num_channels, "value_range": [],
                                 "channel_def": {str(i): n for i, n in enumerate(channel_names)}}},
            "outputs": {"pred": {**tensor_common, "format": "labels", "modality": "n/a",
                                 "num_channels": num_classes, "value_range": [],
                                 "channel_def": {str(i): n for i, n in enumerate(labels)}}},
        },
        "medmamba": {"network": arch_target, "source": {k: v for k, v in source.items() if k != "data_source"},
                     "preprocessing": {"orientation": "RAS", "spacing": [float(p) for p in pixdim],
                                       "intensity": norm_desc, "roi_size": [int(r) for r in roi]},
                     "torchscript": _TORCHSCRIPT_NOTE},
    }
    if nnunet is not None:
        meta["medmamba"]["nnunet"] = nnunet
    return meta


def check_metadata(meta: dict) -> list[str]:
    """Problems of a metadata dict against the keys MONAI's schema requires (offline); [] if none."""
    problems = [f"missing key {k!r}" for k in REQUIRED_META_KEYS if k not in meta]
    ndf = meta.get("network_data_format", {})
    for section, name in (("inputs", "image"), ("outputs", "pred")):
        tensor = ndf.get(section, {}).get(name)
        if tensor is None:
            problems.append(f"missing network_data_format.{section}.{name}")
            continue
        problems += [f"missing network_data_format.{section}.{name}.{k}" for k in REQUIRED_TENSOR_KEYS
                     if k not in tensor]
    for k in ("required_packages_version", "changelog"):
        if k in meta and not isinstance(meta[k], dict):
            problems.append(f"{k} must be an object")
    if "version" in meta and meta.get("changelog") and meta["version"] not in meta["changelog"]:
        problems.append(f"changelog has no entry for version {meta['version']}")
    return problems


_TORCHSCRIPT_NOTE = (
    "not available. `ckpt_export` scripts the network (`torch.jit.script`), which fails on the Python-only parts "
    "(the selective scan is a Python `torch.autograd.Function` with Python control flow and optional Triton "
    "kernels; dynamic_network_architectures' residual blocks and the VMamba scan routes do not script either); "
    "`--use_trace true` records the scan's autograd Function as a Python op, which TorchScript cannot save. Use "
    "`models/model.pt` with the config's `network_def` (needs medmamba installed).")

_README = """# {name}

{warning}{description}

Created by `medmamba bundle create` (medmamba {medmamba_version}, MONAI {monai_version}, PyTorch {torch_version}).
Weights: {source}.

## Segment a folder of NIfTI

```bash
python -m monai.bundle run \\
    --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json \\
    --bundle_root BUNDLE --dataset_dir /path/to/images --output_dir /path/to/segmentations
```

Every `*.nii.gz` / `*.nii` in `dataset_dir` (or the single file it names) is segmented; the result
`<name>_seg.nii.gz` (uint8 labels) has the input's shape and affine. `medmamba bundle run BUNDLE IN OUT` does
the same after checking every input (one-line errors).

Preprocessing: LoadImaged, EnsureChannelFirstd, Orientationd `RAS`, Spacingd {spacing} mm (bilinear),
{intensity}{transpose}. Sliding-window inference: ROI {roi}, overlap 0.5, Gaussian blending; softmax, Invertd
back to the input grid, argmax, SaveImaged.

### Devices

* `device` (default: CUDA if available, else CPU) runs the network on each window (`sw_device`).
* `data_device` (default: `device`) holds the whole preprocessed volume and the stitched output. For a large
  CT on a small GPU keep the windows on the GPU and the volume on the CPU:
  `--data_device "\\$torch.device('cpu')"`. CPU only: `--device "\\$torch.device('cpu')"`.
* `--sw_batch_size 4` runs several windows at once (more memory); `--amp true` runs the convolutions in mixed
  precision on GPU (the selective scan always runs in float32).

## Fine-tune

`configs/train.json` fine-tunes from `models/model.pt` with MONAI's `SupervisedTrainer` (DiceCE loss, AdamW,
TensorBoard logs in `eval/`, validation with MeanDice every `val_interval` epochs, best checkpoint in
`models/finetuned/model.pt`) on a dataset in the MSD layout (`DATASET/imagesTr`, `DATASET/labelsTr`):

```bash
python -m monai.bundle run --config_file BUNDLE/configs/train.json --bundle_root BUNDLE \\
    --dataset_dir /path/to/DATASET --max_epochs 50
```

Then segment with `--ckpt_path BUNDLE/models/finetuned/model.pt` added to the inference command.

## Checks and export

```bash
python -m monai.bundle verify_net_in_out network_def --meta_file BUNDLE/configs/metadata.json \\
    --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE
```

TorchScript: {torchscript}

{nnunet_notes}
## Network

`{target}`; input: {num_channels} channel(s) ({channels}), output: {num_classes} classes ({labels}).
Spatial sizes given to the network must be divisible by {divisor} (the sliding-window ROI is).
"""

_NNUNET_NOTES = """## From nnU-Net

This bundle mirrors nnU-Net's preprocessing of `{trainer}__{plans}__{configuration}` ({fold}): the plans'
spacing {plans_spacing} (nnU-Net axis order; reader {reader}, transpose_forward {tf}) is {spacing} mm in RAS
order; normalisation: {intensity}; ROI = the plans' patch size {roi} in the network's axis order{transpose}.
Differences from `nnUNetv2_predict`: MONAI reorients to RAS first (nnU-Net works in the stored axis order; for
axial scans that is a flip, which nnU-Net's mirroring augmentation covers), resamples with trilinear
interpolation (nnU-Net: third-order spline in-plane, nearest across anisotropic slices), and does no mirroring
test-time augmentation (nnU-Net's default mirrors axes {mirror}).
"""

_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _license(random_init: bool, from_nnunet: bool) -> str:
    text = ("The code this bundle runs (medmamba, MONAI) is licensed under the Apache License, Version 2.0\n"
            "(https://www.apache.org/licenses/LICENSE-2.0).\n\n")
    if random_init:
        return text + "The weights in models/model.pt are random (created for smoke tests); no other terms apply.\n"
    return text + ("The weights in models/model.pt were trained by the model's authors" +
                   (" with nnU-Net" if from_nnunet else "") +
                   "; their terms, and those of the training data, are the authors' to state here.\n")


def create_bundle(out: str | os.PathLike, arch: str | None = None, in_channels: int | None = None,
                  out_channels: int | None = None, *, checkpoint: str | None = None, random_init: bool = False,
                  roi: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                  intensity: str | None = None, ct_window: Sequence[float] = (-1000.0, 1000.0),
                  net_kwargs: dict | None = None, labels: Sequence[str] | None = None,
                  overwrite: bool = False, seed: int = 0) -> Path:
    """Write a MONAI bundle to ``out`` (see the module docstring); returns its path.

    ``checkpoint`` is an nnU-Net fold checkpoint (``checkpoint_final.pth``: network, spacing, normalisation and
    ROI come from its plans) or a plain state dict (``arch``, channels, ``spacing`` and ``intensity`` needed);
    ``random_init`` makes a bundle with random weights, for smoke tests. The bundle is built in a temporary
    folder next to ``out`` and renamed into place.
    """
    import torch

    import medmamba.nets as nets

    out = Path(out).absolute()
    if checkpoint is None and not random_init:
        raise BundleError("give --checkpoint PATH (trained weights) or --random-init (random weights, smoke tests only)")
    if checkpoint is not None and random_init:
        raise BundleError("--checkpoint and --random-init exclude each other")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise BundleError(f"parent folder {out.parent} does not exist")
    if roi is not None and (len(roi) != 3 or min(roi) < 1):
        raise BundleError(f"--roi needs 3 positive sizes, got {list(roi)}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise BundleError(f"--spacing needs 3 positive values (mm, RAS order x y z), got {list(spacing)}")

    nn_ckpt = None
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise BundleError(f"checkpoint not found: {checkpoint}")
        nn_ckpt = _read_nnunet_checkpoint(checkpoint)

    nnunet_meta, extra_files, dropped = None, {}, []
    if nn_ckpt is not None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans, dsj, conf = nn_ckpt["plans"], nn_ckpt["dataset_json"], nn_ckpt["configuration"]
        label_manager = PlansManager(plans).get_label_manager(dsj)
        if label_manager.has_regions:
            raise BundleError("region-based nnU-Net models (sigmoid outputs) are not supported")
        if spacing is not None or intensity is not None or roi is not None or net_kwargs:
            raise BundleError("--spacing, --intensity, --roi and --net-kwargs come from the nnU-Net plans; leave "
                              "them out with an nnU-Net checkpoint")
        num_in, num_out = _nnunet_num_inputs(dsj), int(label_manager.num_segmentation_heads)
        for given, name, value in ((in_channels, "--in-channels", num_in), (out_channels, "--out-channels", num_out)):
            if given is not None and int(given) != value:
                raise BundleError(f"{name} {given} contradicts the nnU-Net model ({value})")
        plans = _adapt_plans(plans, conf, nn_ckpt["trainer_name"])
        pre = _nnunet_preprocessing(plans, conf, num_in)
        net, how = _build_nnunet_network(plans, dsj, conf, nn_ckpt["trainer_name"])
        dropped = _load_weights(net, nn_ckpt["weights"], checkpoint)
        in_channels, out_channels = num_in, num_out
        pixdim, roi, perm = pre["pixdim"], pre["roi"], pre["perm"]
        network_def = _as_target(net, plans, conf, num_in, num_out)
        if network_def is None:
            network_def = {"_target_": "medmamba.monai.from_nnunet.nnunet_network",
                           "plans_file": "$@bundle_root + '/configs/nnunet/plans.json'",
                           "dataset_json_file": "$@bundle_root + '/configs/nnunet/dataset.json'",
                           "configuration": conf, "trainer_name": nn_ckpt["trainer_name"]}
        extra_files["configs/nnunet/plans.json"] = plans
        extra_files["configs/nnunet/dataset.json"] = dsj
        label_map = {n: v for n, v in dsj.get("labels", {}).items() if isinstance(v, int) and n != "ignore"}
        labels = list(labels) if labels else [n for n, _ in sorted(label_map.items(), key=lambda t: t[1])]
        channel_names = [str(v) for _, v in sorted(dsj.get("channel_names", {}).items(), key=lambda t: int(t[0]))]
        norm_tf, norm_desc = _intensity_transforms("image", None, ct_window, pre["norm"], num_in)
        fold_dir = Path(nn_ckpt["fold_dir"])
        parts = fold_dir.parent.name.split("__")
        nnunet_meta = {
            "trainer": nn_ckpt["trainer_name"], "plans": plans.get("plans_name", parts[1] if len(parts) == 3 else "?"),
            "configuration": conf, "fold": fold_dir.name, "checkpoint": str(Path(checkpoint).resolve()),
            "dataset": dsj.get("name", plans.get("dataset_name", "?")), "network_builder": how,
            "reader": pre["reader"], "transpose_forward": pre["transpose_forward"],
            "plans_spacing": pre["plans_spacing"], "network_axes_from_ras_axes": perm,
            "inference_allowed_mirroring_axes": _jsonable(nn_ckpt["mirror_axes"]), "dropped_checkpoint_keys": dropped}
        source = {"kind": "nnU-Net checkpoint", "checkpoint": str(Path(checkpoint).resolve()),
                  "data_source": f"nnU-Net dataset {nnunet_meta['dataset']}"}
    else:
        if arch is None or in_channels is None or out_channels is None:
            raise BundleError("--arch, --in-channels and --out-channels are required unless --checkpoint is an "
                              "nnU-Net checkpoint")
        in_channels, out_channels = int(in_channels), int(out_channels)
        if in_channels < 1 or out_channels < 1:
            raise BundleError(f"--in-channels and --out-channels must be at least 1, got {in_channels} and {out_channels}")
        try:
            cls = nets.get_class(arch)
        except KeyError as exc:
            raise BundleError(str(exc).strip("'\"")) from exc
        kwargs = dict(net_kwargs or {})
        roi = [int(r) for r in (roi or (96, 96, 96))]
        if "patch_size" in inspect.signature(cls.__init__).parameters and "patch_size" not in kwargs:
            kwargs["patch_size"] = list(roi)  # U-Mamba Enc sizes its encoder Mamba layers from it
        torch.manual_seed(seed)
        try:
            net = cls(in_channels=in_channels, out_channels=out_channels, spatial_dims=3, **kwargs)
        except TypeError as exc:
            raise BundleError(f"{cls.__name__}: {exc} (check --net-kwargs)") from exc
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            for key in ("state_dict", "model", "network", "network_weights"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
            if not isinstance(state, dict):
                raise BundleError(f"{checkpoint} is neither a state dict nor an nnU-Net checkpoint")
            dropped = _load_weights(net, state, checkpoint)
            if spacing is None:
                raise BundleError("--spacing is required with a plain state dict (the voxel spacing in mm, RAS "
                                  "order x y z, the model was trained at)")
            if intensity is None:
                raise BundleError("--intensity ct|mri is required with a plain state dict")
        spacing = spacing if spacing is not None else (1.5, 1.5, 2.0)
        intensity = intensity if intensity is not None else "ct"
        pixdim, perm = [float(s) for s in spacing], [0, 1, 2]
        network_def = {"_target_": f"{cls.__module__}.{cls.__name__}", "spatial_dims": 3,
                       "in_channels": "@num_channels", "out_channels": "@num_classes", **_jsonable(kwargs)}
        norm_tf, norm_desc = _intensity_transforms("image", intensity, ct_window, None, in_channels)
        labels = list(labels) if labels else ["background"] + [f"class {i}" for i in range(1, out_channels)]
        channel_names = [norm_desc["modality"] if in_channels == 1 else f"channel {i}" for i in range(in_channels)]
        source = ({"kind": "random init", "seed": seed, "data_source": "none (random weights)"} if random_init else
                  {"kind": "state dict", "checkpoint": str(Path(checkpoint).resolve()), "data_source": "unknown"})

    if len(labels) != out_channels:
        raise BundleError(f"{len(labels)} label names for {out_channels} output channels")
    net.eval()
    div = _divisor(net)
    if any(r % d for r, d in zip(roi, div)):
        raise BundleError(f"ROI {list(roi)} is not divisible by the network's total downsampling {div}")
    target = network_def["_target_"]

    common = _common(in_channels, out_channels, roi, pixdim, network_def)
    inference = _inference_config(common, _deterministic(["image"], norm_tf, perm))
    train = _train_config(common, _deterministic(["image", "label"], norm_tf, perm))
    meta = _metadata(arch_target=target, num_channels=in_channels, num_classes=out_channels, roi=roi, labels=labels,
                     norm_desc=norm_desc, channel_names=channel_names, source=source, random_init=random_init,
                     pixdim=pixdim, nnunet=nnunet_meta)
    problems = check_metadata(meta)
    if problems:
        raise AssertionError(f"internal error, metadata incomplete: {problems}")

    import monai

    from medmamba import __version__

    transpose_txt = (f", then Transposed to the network's axis order (indices {[0] + [p + 1 for p in perm]})"
                     if perm != [0, 1, 2] else "")
    nn_notes = ""
    if nnunet_meta is not None:
        nn_notes = _NNUNET_NOTES.format(
            trainer=nnunet_meta["trainer"], plans=nnunet_meta["plans"], configuration=conf, fold=nnunet_meta["fold"],
            plans_spacing=nnunet_meta["plans_spacing"], reader=nnunet_meta["reader"],
            tf=nnunet_meta["transpose_forward"], spacing=pixdim, intensity=norm_desc["scheme"], roi=list(roi),
            transpose=transpose_txt, mirror=nnunet_meta["inference_allowed_mirroring_axes"])
    readme = _README.format(
        name=meta["name"], warning=f"**{RANDOM_INIT_WARNING}**\n\n" if random_init else "",
        description=meta["description"], medmamba_version=__version__, monai_version=monai.__version__,
        torch_version=torch.__version__, source=json.dumps(meta["medmamba"]["source"]), spacing=pixdim,
        intensity=norm_desc["scheme"], transpose=transpose_txt, roi=list(roi), torchscript=_TORCHSCRIPT_NOTE,
        nnunet_notes=nn_notes, target=target, num_channels=in_channels, channels=", ".join(channel_names),
        num_classes=out_channels, labels=", ".join(labels), divisor=div)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        for rel, content in {"configs/metadata.json": meta, "configs/inference.json": inference,
                             "configs/train.json": train, **extra_files}.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(_jsonable(content), indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / "models" / "model.pt")
        (tmp / "docs" / "README.md").write_text(readme)
        (tmp / "LICENSE").write_text(_license(random_init, nnunet_meta is not None))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dropped:
        print(f"note: dropped {len(dropped)} checkpoint tensors the inference network does not have "
              f"(e.g. deep-supervision heads): {', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''}",
              file=sys.stderr)
    return out
