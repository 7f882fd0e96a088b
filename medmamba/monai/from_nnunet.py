"""nnU-Net fold checkpoints as bundle networks: read the checkpoint, rebuild its network and preprocessing
from the plans, and load the weights."""
from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

from medmamba.monai.checks import BundleError


def nnunet_network(plans_file: str, dataset_json_file: str, configuration: str, trainer_name: str | None = None):
    """Rebuild the network of an nnU-Net model (deep supervision off) from the plans and dataset.json copied
    into the bundle: the trainer's ``build_network_architecture`` when the trainer can be found, else the plans'
    network class. Used when the network cannot be written as a plain ``_target_``."""
    net, _ = _build_nnunet_network(_load_json(plans_file), _load_json(dataset_json_file), configuration, trainer_name)
    return net


def _load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _find_trainer(trainer_name: str | None):
    """The trainer class: medmamba's nnU-Net plugin first, then nnU-Net's own search; None if not found."""
    if not trainer_name:
        return None
    for module in ("medmamba.nnunet.trainers", "medmamba.nnunet"):
        try:
            mod = importlib.import_module(module)
        except Exception:
            continue
        if hasattr(mod, trainer_name):
            return getattr(mod, trainer_name)
    try:
        import contextlib
        import io

        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(trainer_name)
    except Exception:
        return None


def _adapt_plans(plans: dict, configuration: str, trainer_name: str | None) -> dict:
    """medmamba's nnU-Net trainers adapt the configuration to their architecture's preset (patch size,
    strides) before nnU-Net reads it; checkpoints and plans.json normally hold the adapted plans already, and
    adapting is idempotent, so do it here too in case they do not."""
    trainer = _find_trainer(trainer_name)
    arch = getattr(trainer, "arch", None)
    if trainer is None or arch is None or not trainer.__module__.startswith("medmamba."):
        return plans
    from medmamba.nnunet.presets import apply_preset

    return apply_preset(plans, arch, configurations=[configuration])


def _nnunet_num_inputs(dataset_json: dict) -> int:
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise BundleError("dataset.json has no channel_names")
    return len(names)


def _build_nnunet_network(plans: dict, dataset_json: dict, configuration: str, trainer_name: str | None):
    """(network, how) for an nnU-Net model; ``how`` says which builder was used."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    num_in = _nnunet_num_inputs(dataset_json)
    num_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    trainer = _find_trainer(trainer_name)
    if trainer is not None:
        how = f"{trainer.__module__}.{trainer.__name__}.build_network_architecture"
    else:
        how = (f"nnUNetTrainer.build_network_architecture, i.e. the plans' network class (trainer "
               f"{trainer_name!r} not importable)")
    builder = trainer if trainer is not None else nnUNetTrainer
    return builder.build_network_architecture(pm, cm, num_in, num_out, False), how


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _load_weights(net, state: dict, source: str) -> list[str]:
    """Load ``state`` into ``net``: missing keys or shape mismatches are errors, extra keys (e.g. deep
    supervision heads the inference network does not build) are dropped and returned."""
    import torch

    state = _strip_prefixes(state)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}" for k in own
           if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or bad:
        lines = ([f"missing in the checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"]
                 if missing else []) + [f"shape mismatch {b}" for b in bad[:8]]
        raise BundleError(f"{source} does not fit the network ({type(net).__name__}):\n  " + "\n  ".join(lines) +
                          "\n  (check --arch, --in-channels, --out-channels and --net-kwargs)")
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    return [k for k in state if k not in own]


def _nnunet_preprocessing(plans: dict, configuration: str, num_in: int) -> dict:
    """Spacing, ROI, axis permutation and normalisation of an nnU-Net configuration, in MONAI's terms.

    nnU-Net works in the axes of the array its reader returns, after ``transpose_forward``; the spacing and
    patch size in the plans are in that transposed order. SimpleITKIO (nnU-Net's reader for NIfTI) returns
    (z, y, x), the reverse of the NIfTI voxel axes (i, j, k) that MONAI's LoadImaged and Orientationd use; the
    Nibabel readers return (i, j, k). So MONAI axis m is nnU-Net original axis ``2 - m`` (SimpleITK) or ``m``
    (Nibabel), and network axis n is original axis ``transpose_forward[n]``. Returns ``pixdim`` (MONAI axes,
    for Spacingd), ``roi`` (network axes: the plans' patch size) and ``perm`` (network axis n = MONAI axis
    ``perm[n]``, for Transposed).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise BundleError(f"nnU-Net configuration {configuration!r} is 2D; bundles support 3D configurations "
                          f"(3d_fullres, 3d_lowres)")
    if cm.previous_stage_name is not None:
        raise BundleError(f"nnU-Net configuration {configuration!r} is a cascade stage (it needs the "
                          f"{cm.previous_stage_name} segmentation as input); use 3d_fullres or 3d_lowres")
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    tf = [int(i) for i in pm.transpose_forward]
    if "nibabel" in reader.lower():
        def to_orig(m):
            return m
    else:
        def to_orig(m):
            return 2 - m
    spacing_orig = [0.0] * 3
    for n, a in enumerate(tf):
        spacing_orig[a] = float(cm.spacing[n])
    pixdim = [spacing_orig[to_orig(m)] for m in range(3)]
    monai_axis = {to_orig(m): m for m in range(3)}
    perm = [monai_axis[a] for a in tf]
    schemes = list(cm.normalization_schemes)
    if len(schemes) != num_in:
        raise BundleError(f"the plans have {len(schemes)} normalisation schemes for {num_in} input channels")
    props = pm.foreground_intensity_properties_per_channel
    norm = {"schemes": schemes, "use_mask_for_norm": list(cm.use_mask_for_norm),
            "ct_stats": [props.get(str(c), props.get(c)) if s == "CTNormalization" else None
                         for c, s in enumerate(schemes)]}
    return {"pixdim": pixdim, "roi": [int(p) for p in cm.patch_size], "perm": perm, "norm": norm, "reader": reader,
            "transpose_forward": tf, "plans_spacing": [float(s) for s in cm.spacing]}


def _read_nnunet_checkpoint(path: str) -> dict | None:
    """The parts of an nnU-Net fold checkpoint, or None if ``path`` is not one (no ``network_weights``)."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(ckpt, dict) and "network_weights" in ckpt):
        return None
    fold_dir = Path(path).resolve().parent
    init = ckpt.get("init_args") or {}
    plans, dataset_json = init.get("plans"), init.get("dataset_json")
    if plans is None and (fold_dir.parent / "plans.json").exists():
        plans = _load_json(fold_dir.parent / "plans.json")
    if dataset_json is None and (fold_dir.parent / "dataset.json").exists():
        dataset_json = _load_json(fold_dir.parent / "dataset.json")
    if plans is None or dataset_json is None:
        raise BundleError(f"{path} is an nnU-Net checkpoint, but its plans/dataset.json are neither in the "
                          f"checkpoint's init_args nor in {fold_dir.parent}")
    parts = fold_dir.parent.name.split("__")
    configuration = init.get("configuration") or (parts[2] if len(parts) == 3 else None)
    if configuration is None:
        raise BundleError(f"{path}: cannot tell the nnU-Net configuration (no init_args.configuration and the "
                          f"folder is not <trainer>__<plans>__<configuration>/fold_X)")
    return {"weights": ckpt["network_weights"], "plans": plans, "dataset_json": dataset_json,
            "configuration": configuration, "trainer_name": ckpt.get("trainer_name") or parts[0],
            "fold_dir": str(fold_dir), "mirror_axes": ckpt.get("inference_allowed_mirroring_axes")}


def _as_target(net, plans: dict, configuration: str, num_in: int, num_out: int) -> dict | None:
    """``{"_target_": class, **kwargs}`` that rebuilds ``net`` exactly (same repr and parameter shapes) from the
    plans' architecture kwargs, or None. Only for medmamba's own classes."""
    cls = type(net)
    if not cls.__module__.startswith("medmamba."):
        return None
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    base = dict(copy.deepcopy(cm.network_arch_init_kwargs))
    base.update(input_channels=num_in, num_classes=num_out, deep_supervision=False)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for extra in ({}, {"patch_size": [int(p) for p in cm.patch_size]}):
        kwargs = {**base, **extra}
        try:
            twin = cls(**kwargs)
        except Exception:
            continue
        if repr(twin) == repr(net) and {k: tuple(v.shape) for k, v in twin.state_dict().items()} == shapes:
            return {"_target_": f"{cls.__module__}.{cls.__name__}", **_jsonable(kwargs)}
    return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj
