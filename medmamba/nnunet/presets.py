"""Plans presets: adapt an nnU-Net plans file to one of our architectures (``medmamba plan``).

A preset (``plans/<arch>.json``, installed as package data ``medmamba.plans``) says which class to name
in ``architecture.network_class_name`` and how the configuration must change for it:

* ``topology: "plans"`` (U-Mamba Bot/Enc): the network follows the plans' stages, kernels and strides;
  only the class changes (U-Mamba Enc also gets ``arch_kwargs.patch_size``, which it needs at build time);
* ``topology: "fixed"`` (LightM-UNet, Swin-UMamba(-D), MSVM-UNet, VM-UNet-MHS, HyMamba): the per-stage lists are
  rewritten to the network's own isotropic ``strides`` (so nnU-Net's deep-supervision targets, derived
  from the strides, sit at the network's output scales) and ``patch_size`` is rounded to a multiple of
  ``patch_size_divisor`` on every axis.

``data_identifier``, spacing and normalisation are kept, so the preprocessed data is reused as is. The
same adaptation runs in memory in our trainers, so they also work on the plain ``nnUNetPlans``.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["available_presets", "load_preset", "adapt_configuration", "apply_preset", "preset_plans_name",
           "find_dataset_folder", "write_preset_plans", "PresetError"]

_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}


class PresetError(ValueError):
    """A preset cannot be applied (unknown arch, missing plans, incompatible override, existing output)."""


def _presets_dir() -> Path:
    try:
        from importlib.resources import files

        d = files("medmamba.plans")
        if d.joinpath("umamba_bot.json").is_file():
            return Path(str(d))
    except (ModuleNotFoundError, TypeError):
        pass
    # source checkout without an install: <repo>/plans
    here = Path(__file__).resolve().parents[2] / "plans"
    if (here / "umamba_bot.json").is_file():
        return here
    raise PresetError("the plans presets (medmamba.plans package data / <repo>/plans) are missing from this install")


def available_presets() -> list[str]:
    """Architecture names with a preset (``umamba_bot``, ``swin_umamba``, ...)."""
    return sorted(p.stem for p in _presets_dir().glob("*.json"))


def load_preset(arch: str) -> dict:
    """The preset dict for ``arch`` (registry name, e.g. ``"umamba_bot"``, or class name ``"UMambaBot"``)."""
    names = available_presets()
    if arch not in names:
        by_class = {}
        for n in names:
            with open(_presets_dir() / f"{n}.json") as f:
                by_class[json.load(f)["network_class_name"].rsplit(".", 1)[-1]] = n
        if arch not in by_class:
            raise PresetError(f"no plans preset for architecture {arch!r}; available: {', '.join(names)}")
        arch = by_class[arch]
    with open(_presets_dir() / f"{arch}.json") as f:
        return json.load(f)


def preset_plans_name(arch: str, source_plans: str = "nnUNetPlans") -> str:
    """File stem (= ``plans_name``) of the adapted plans: ``nnUNetPlans_<arch>``."""
    return f"{source_plans}_{load_preset(arch)['arch']}"


def _dims(arch_kwargs: dict, patch_size) -> int:
    conv = str(arch_kwargs.get("conv_op", ""))
    if conv.endswith("Conv2d"):
        return 2
    if conv.endswith("Conv3d"):
        return 3
    return len(patch_size)


def _round_patch(patch: Sequence[int], divisor: int) -> list[int]:
    """Every axis to the nearest multiple of ``divisor`` (halves round up), at least ``divisor``."""
    return [max(divisor, int((int(p) + divisor // 2) // divisor) * divisor) for p in patch]


def adapt_configuration(config: dict, preset: dict | str, *, patch_size: Sequence[int] | None = None,
                        batch_size: int | None = None, n_stages: int | None = None,
                        features_per_stage: Sequence[int] | None = None, width_factor: float | None = None) -> dict:
    """A copy of a (resolved) plans configuration adapted to ``preset``.

    Optional overrides (e.g. a reduced CPU preset): ``patch_size`` (must suit the topology), ``batch_size``,
    ``n_stages`` and ``features_per_stage`` (``topology: "plans"`` only: keep the first ``n_stages``
    stages of the plans; set the channels per stage, or scale the plans' channels by ``width_factor``).
    Idempotent: adapting an adapted configuration changes nothing.
    """
    preset = load_preset(preset) if isinstance(preset, str) else preset
    config = copy.deepcopy(config)
    if "architecture" not in config or "patch_size" not in config:
        raise PresetError("the configuration has no 'architecture' / 'patch_size' (not an nnU-Net v2 plans "
                          "configuration?)")
    arch = config["architecture"]
    kw = arch["arch_kwargs"]
    patch = [int(p) for p in (patch_size if patch_size is not None else config["patch_size"])]
    dims = _dims(kw, patch)
    if len(patch) != dims:
        raise PresetError(f"patch_size {patch} does not have {dims} axes")

    if preset["topology"] == "plans":
        if n_stages is not None:
            n_old = int(kw["n_stages"])
            if not 2 <= n_stages <= n_old:
                raise PresetError(f"n_stages must be in 2..{n_old} (the plans' stages), got {n_stages}")
            kw["n_stages"] = int(n_stages)
            for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
                if isinstance(kw.get(key), list):
                    kw[key] = kw[key][:n_stages]
            if isinstance(kw.get("n_conv_per_stage_decoder"), list):
                kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][: n_stages - 1]
        if features_per_stage is not None:
            feats = [int(f) for f in features_per_stage]
            if len(feats) != int(kw["n_stages"]) or min(feats) < 1:
                raise PresetError(f"features_per_stage needs {kw['n_stages']} positive entries, got {feats}")
            kw["features_per_stage"] = feats
        if width_factor is not None:
            if not 0 < width_factor <= 1:
                raise PresetError(f"width_factor must be in (0, 1], got {width_factor}")
            kw["features_per_stage"] = [max(4, int(round(int(f) * width_factor))) for f in kw["features_per_stage"]]
        strides = kw["strides"]
        total = [1] * dims
        for s in strides:
            s = [int(s)] * dims if isinstance(s, int) else [int(a) for a in s]
            total = [t * a for t, a in zip(total, s)]
        bad = [p for p, t in zip(patch, total) if p % t]
        if bad:
            raise PresetError(f"patch_size {patch} is not divisible by the plans' total strides {total}")
        if preset.get("pass_patch_size"):
            kw["patch_size"] = list(patch)
        else:
            kw.pop("patch_size", None)
    elif preset["topology"] == "fixed":
        if n_stages is not None and n_stages != len(preset["strides"]):
            raise PresetError(f"{preset['arch']} has a fixed topology of {len(preset['strides'])} stages; "
                              f"n_stages={n_stages} is not possible")
        if features_per_stage is not None or width_factor is not None:
            raise PresetError(f"{preset['arch']} has fixed widths; features_per_stage / width_factor cannot be "
                              f"overridden (set the network's own keywords in arch_kwargs instead)")
        div = int(preset["patch_size_divisor"])
        if patch_size is not None:
            if any(p % div for p in patch):
                raise PresetError(f"{preset['arch']} needs every patch axis divisible by {div}; got {patch}")
        else:
            patch = _round_patch(patch, div)
        n = len(preset["strides"])
        feats = preset.get("features_per_stage") or [min(32 * 2 ** i, 320 if dims == 3 else 512) for i in range(n)]
        kw.update({
            "n_stages": n,
            "features_per_stage": list(feats),
            "kernel_sizes": [[3] * dims for _ in range(n)],
            "strides": [[int(s)] * dims for s in preset["strides"]],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
        })
        kw.pop("n_blocks_per_stage", None)  # ResEnc plans: would contradict n_conv_per_stage's length
        kw.pop("patch_size", None)
    else:
        raise PresetError(f"preset {preset['arch']}: unknown topology {preset['topology']!r}")

    for k, v in preset.get("arch_kwargs", {}).items():
        kw.setdefault(k, copy.deepcopy(v))
    arch["network_class_name"] = preset["network_class_name"]
    arch["arch_kwargs"] = kw
    arch.setdefault("_kw_requires_import", ["conv_op", "norm_op", "dropout_op", "nonlin"])
    config["patch_size"] = patch
    if batch_size is not None:
        if int(batch_size) < 1:
            raise PresetError(f"batch_size must be >= 1, got {batch_size}")
        config["batch_size"] = int(batch_size)
    return config


def _resolved(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain merged (as nnU-Net's PlansManager does)."""
    confs = plans["configurations"]
    if name not in confs:
        raise PresetError(f"configuration {name!r} is not in the plans; available: {', '.join(confs)}")
    conf = copy.deepcopy(confs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in confs:
            raise PresetError(f"configuration {name!r}: broken inherits_from chain at {parent!r}")
        seen.add(parent)
        base = copy.deepcopy(confs[parent])
        base.update(conf)
        conf = base
    return conf


def apply_preset(plans: dict, arch: str, *, configurations: Sequence[str] | None = None,
                 plans_name: str | None = None, **overrides) -> dict:
    """A copy of ``plans`` with ``configurations`` (default: all) adapted to ``arch``.

    Configurations that inherit from an adapted one and set neither ``architecture`` nor ``patch_size``
    stay as they are (they inherit the adapted values). ``plans_name`` renames the plans (file stem);
    ``overrides`` go to :func:`adapt_configuration`.
    """
    preset = load_preset(arch)
    out = copy.deepcopy(plans)
    confs = out["configurations"]
    names = list(confs) if configurations is None else list(configurations)
    for c in names:
        if c not in confs:
            raise PresetError(f"configuration {c!r} is not in the plans; available: {', '.join(confs)}")
    # parents first, so that an inheriting configuration is checked against its adapted parent
    order = sorted(names, key=lambda c: "inherits_from" in confs[c])
    for c in order:
        own = confs[c]
        inherits = "inherits_from" in own
        if inherits and not {"architecture", "patch_size"} & set(own) and own["inherits_from"] in names:
            continue  # inherits the adapted values of its parent
        try:
            adapted = adapt_configuration(_resolved(out, c), preset, **overrides)
        except PresetError as exc:
            raise PresetError(f"configuration {c!r}: {exc}") from None
        if inherits:
            own["architecture"], own["patch_size"] = adapted["architecture"], adapted["patch_size"]
            if "batch_size" in own or overrides.get("batch_size") is not None:
                own["batch_size"] = adapted["batch_size"]
        else:
            confs[c] = {**own, **{k: adapted[k] for k in ("architecture", "patch_size", "batch_size")}}
    if plans_name is not None:
        out["plans_name"] = plans_name
    return out


def find_dataset_folder(dataset: str | int, preprocessed_dir: str | os.PathLike | None = None) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name`` from an id (``901``, ``"901"``) or a name."""
    root = preprocessed_dir or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise PresetError("nnUNet_preprocessed is not set (and no preprocessed folder was given)")
    root = Path(root)
    s = str(dataset)
    if s.startswith("Dataset"):
        folder = root / s
        if not folder.is_dir():
            raise PresetError(f"{folder} does not exist; run nnUNetv2_plan_and_preprocess first")
        return folder
    try:
        did = int(s)
    except ValueError:
        raise PresetError(f"dataset must be an id (e.g. 901) or a name (Dataset901_Name), got {dataset!r}") from None
    hits = sorted(root.glob(f"Dataset{did:03d}_*"))
    if not hits:
        raise PresetError(f"no Dataset{did:03d}_* in {root}; run nnUNetv2_plan_and_preprocess -d {did} first")
    if len(hits) > 1:
        raise PresetError(f"several folders for dataset id {did} in {root}: {[h.name for h in hits]}")
    return hits[0]


def _atomic_write_json(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=4, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_preset_plans(dataset: str | int, arch: str, *, source_plans: str = "nnUNetPlans",
                       configurations: Sequence[str] | None = None, overwrite: bool = False,
                       preprocessed_dir: str | os.PathLike | None = None, output_name: str | None = None,
                       **overrides) -> Path:
    """Write ``<preprocessed>/<Dataset>/<source_plans>_<arch>.json`` (atomically) and return its path.

    Refuses to replace an existing file unless ``overwrite``. ``plans_name`` inside equals the file stem.
    """
    folder = find_dataset_folder(dataset, preprocessed_dir)
    src = folder / f"{source_plans}.json"
    if not src.is_file():
        raise PresetError(f"{src} does not exist; run nnUNetv2_plan_and_preprocess (or pick --source-plans)")
    name = output_name or preset_plans_name(arch, source_plans)
    if not name or os.sep in name or name.endswith(".json"):
        raise PresetError(f"plans name must be a file stem (no folder, no .json), got {name!r}")
    dst = folder / f"{name}.json"
    if dst.exists() and not overwrite:
        raise PresetError(f"{dst} exists; pass --overwrite to replace it")
    try:
        with open(src) as f:
            plans = json.load(f)
    except ValueError as exc:     # json.JSONDecodeError
        raise PresetError(f"{src}: not valid JSON ({exc})") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise PresetError(f"{src}: not nnU-Net plans (no 'configurations')")
    new = apply_preset(plans, arch, configurations=configurations, plans_name=name, **overrides)
    _atomic_write_json(new, dst)
    return dst
