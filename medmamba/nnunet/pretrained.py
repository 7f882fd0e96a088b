"""``-pretrained_weights`` for our trainers: nnU-Net checkpoints and MambaMIM (encoder-only) checkpoints.

nnU-Net 2.8 loads ``nnUNetv2_train ... -pretrained_weights FILE`` in ``run/run_training.py:
maybe_load_checkpoint`` through the module-level function ``load_pretrained_weights(network, fname,
verbose)``, which asserts that every key of the network (but ``.seg_layers.``) is in the checkpoint, so
encoder-only checkpoints fail there. :func:`install` wraps that module attribute once per process: when
the network belongs to one of our trainers the trainer's :meth:`load_pretrained_weights` runs
(:func:`load_weights`), otherwise nnU-Net's original function, unchanged.

:func:`load_weights` accepts

* nnU-Net checkpoints of the same architecture (``network_weights`` with every key): everything but
  the segmentation heads is loaded (as nnU-Net does; the heads depend on the task's classes);
* encoder-only checkpoints (MambaMIM: ``network_weights`` holding only the encoder's keys, under the
  segmentation network's names), or full state dicts that list their pretrained part in
  ``pretrained_keys`` (``medmamba pretrain``'s final checkpoint): the encoder is loaded, the decoder
  keeps its fresh initialisation.

Any missing key or shape mismatch raises :class:`PretrainedWeightsError` listing the offending keys.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, Iterable

import torch

from medmamba.weights.convert import clean_key, extract_state_dict

__all__ = ["PretrainedWeightsError", "load_weights", "install", "unwrap", "head_keys_by_rebuild"]

_MAX_LIST = 25


class PretrainedWeightsError(ValueError):
    """The pretrained checkpoint does not fit the network; the message lists the offending keys."""


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    mod = network
    for _ in range(3):
        if hasattr(mod, "module") and isinstance(getattr(mod, "module"), torch.nn.Module):
            mod = mod.module
        if hasattr(mod, "_orig_mod"):
            mod = mod._orig_mod
    return mod


def _read_checkpoint(src) -> tuple[dict, dict]:
    """(state dict with cleaned keys, the whole checkpoint dict) from a path or an already loaded object
    (unwrapping and key cleaning shared with ``medmamba weights import``: ``extract_state_dict``)."""
    if isinstance(src, (str, os.PathLike)):
        if not os.path.isfile(src):
            raise PretrainedWeightsError(f"pretrained weights file {src} does not exist")
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    else:
        ckpt = src
    sd = extract_state_dict(ckpt, str(src), PretrainedWeightsError)
    return sd, dict(ckpt)


def _canonical(mod: torch.nn.Module) -> tuple[dict, dict]:
    """(canonical state-dict entries, alias key -> canonical key).

    A module reachable twice (U-Mamba's decoder holds the encoder: ``decoder.encoder.*`` = ``encoder.*``)
    appears twice in ``state_dict``; the first name is canonical.
    """
    sd = mod.state_dict()
    seen: dict[tuple, str] = {}
    canonical, alias = {}, {}
    for k, v in sd.items():
        ident = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if ident is not None and ident in seen:
            alias[k] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = k
        canonical[k] = v
    return canonical, alias


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _fmt(title: str, items: list) -> str:
    if not items:
        return ""
    shown = "\n".join(f"    {i}" for i in items[:_MAX_LIST])
    more = f"\n    ... and {len(items) - _MAX_LIST} more" if len(items) > _MAX_LIST else ""
    return f"\n  {title} ({len(items)}):\n{shown}{more}"


def load_weights(network: torch.nn.Module, src, *, encoder_modules: Iterable[str] = ("encoder",),
                 head_keys: Iterable[str] | None = None, verbose: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Load pretrained weights (path or checkpoint dict) into ``network``; see the module docstring.

    ``encoder_modules``: submodule names that make up the encoder (what MambaMIM pretrains);
    ``head_keys``: the network's task-specific keys (segmentation heads), never transferred; default:
    keys containing ``.seg_layers.`` (nnU-Net's rule). Returns a report dict (mode, loaded keys, ...).
    """
    name = src if isinstance(src, (str, os.PathLike)) else "<checkpoint>"
    weights, ckpt = _read_checkpoint(src)
    mod = unwrap(network)
    model, alias = _canonical(mod)
    encoder_modules = tuple(encoder_modules)
    heads = set(head_keys) if head_keys is not None else {k for k in model if ".seg_layers." in k}

    # checkpoint keys onto canonical names (drop aliases whose canonical twin is present)
    given: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        c = alias.get(k, k)
        if c != k and c in weights:
            continue
        given.setdefault(c, v)
    listed = ckpt.get("pretrained_keys")
    if listed is not None:
        listed = {alias.get(clean_key(k), clean_key(k)) for k in listed}
        given = {k: v for k, v in given.items() if k in listed}

    enc_keys = {k for k in model if _under(k, encoder_modules)}
    encoder_only = listed is not None or (bool(given) and all(_under(k, encoder_modules) for k in given))
    if encoder_only:
        mode, required = "encoder", enc_keys
    else:
        mode, required = "full", {k for k in model if k not in heads}

    missing = sorted(k for k in required if k not in given)
    mismatched = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs network {tuple(model[k].shape)}"
                        for k in required if k in given and tuple(given[k].shape) != tuple(model[k].shape))
    unexpected = sorted(k for k in given if k not in model)
    if missing or mismatched:
        hint = ""
        heads_of = {k.split(".", 1)[0] for k in unexpected if "." in k}
        for pre in sorted(heads_of):
            stripped = {k[len(pre) + 1:] for k in unexpected if k.startswith(pre + ".")}
            if stripped and len(stripped & set(model) | stripped & set(alias)) >= 0.5 * len(stripped):
                hint = (f"\n  The checkpoint's keys carry the prefix '{pre}.': strip it (e.g. "
                        f"{{k.removeprefix('{pre}.'): v for k, v in sd.items()}}) and save again.")
                break
        what = ("encoder-only (MambaMIM-style) checkpoint: every encoder key "
                f"(under {', '.join(m + '.' for m in encoder_modules)}) must be present with the same shape"
                if mode == "encoder" else
                "full checkpoint: every key of the network except the segmentation heads must be present with "
                "the same shape")
        raise PretrainedWeightsError(
            f"pretrained weights {name} do not fit {type(mod).__name__} ({what})."
            + _fmt("missing in the checkpoint", missing)
            + _fmt("shape mismatch", mismatched)
            + _fmt("in the checkpoint but not in the network", unexpected)
            + hint
            + "\n  Was the checkpoint made for another architecture, plans/configuration (stages, widths, patch "
              "size for U-Mamba Enc) or number of input channels? Keys may carry 'module.'/'_orig_mod.' "
              "prefixes; other renames are not guessed.")

    to_load = {k: given[k] for k in required}
    if mode == "full":  # like nnU-Net's loader: the task-specific heads are never transferred
        skipped_heads = sorted(k for k in heads if k in model)
    else:
        skipped_heads = []
    result = mod.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen (required is a subset of the model's keys)
        raise PretrainedWeightsError(f"unexpected keys while loading: {result.unexpected_keys[:10]}")
    fresh = sorted(k for k in model if k not in to_load)
    report = {"file": str(name), "mode": mode, "loaded": len(to_load), "fresh": len(fresh),
              "skipped_heads": skipped_heads, "ignored_extra_keys": unexpected}
    log(f"medmamba: loaded pretrained weights from {name}: {mode} checkpoint, {len(to_load)} tensors loaded, "
        f"{len(fresh)} kept fresh" + (f" (segmentation heads: {len(skipped_heads)})" if skipped_heads else "")
        + (f"; {len(unexpected)} checkpoint keys not in the network ignored" if unexpected else ""))
    if verbose:
        for k in sorted(to_load):
            log(f"  loaded {k} {tuple(to_load[k].shape)}")
    return report


def head_keys_by_rebuild(network: torch.nn.Module, build: Callable[[int], torch.nn.Module],
                         num_classes: int) -> set[str] | None:
    """Keys whose shape depends on the number of classes: the network rebuilt with one more class on the
    meta device (no memory, no compute) and compared. ``build(num_classes)`` returns the network.
    None if the rebuild fails (callers then fall back to nnU-Net's ``.seg_layers.`` rule)."""
    try:
        with torch.device("meta"):
            other = build(num_classes + 1)
        model, _ = _canonical(unwrap(network))
        other_sd = other.state_dict()
        return {k for k, v in model.items() if k not in other_sd or tuple(other_sd[k].shape) != tuple(v.shape)}
    except Exception:
        return None


# -- hooking nnU-Net's -pretrained_weights -----------------------------------------------------------
_TRAINERS: "weakref.WeakSet" = weakref.WeakSet()
_ORIGINAL = None


def _dispatch(network, fname, verbose=False):
    for trainer in list(_TRAINERS):
        if trainer.network is not None and unwrap(trainer.network) is unwrap(network):
            return trainer.load_pretrained_weights(fname, verbose=verbose)
    return _ORIGINAL(network, fname, verbose=verbose)


def install(trainer=None) -> bool:
    """Route ``nnunetv2.run.run_training.load_pretrained_weights`` through :func:`_dispatch` (once per
    process) and register ``trainer``. Returns False if nnU-Net's module could not be patched."""
    global _ORIGINAL
    if trainer is not None:
        _TRAINERS.add(trainer)
    try:
        import nnunetv2.run.run_training as rt
    except Exception:
        return False
    current = getattr(rt, "load_pretrained_weights", None)
    if current is _dispatch:
        return True
    if current is None:
        return False
    _ORIGINAL = current
    rt.load_pretrained_weights = _dispatch
    return True
