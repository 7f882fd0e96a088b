"""Converters from official checkpoints to medmamba state dicts (see ``medmamba.weights``)."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from medmamba import nets

__all__ = ["CheckpointError", "Converted", "SOURCES", "REFUSED", "convert", "inflate_2d_to_3d", "load_checkpoint",
           "save", "extract_state_dict", "clean_key"]

#: source name -> registry names it can produce
SOURCES = {
    "umamba": ("umamba_bot", "umamba_enc"),
    "lightm_unet": ("lightm_unet",),
    "swin_umamba": ("swin_umamba", "swin_umamba_d"),
    "vmamba": ("swin_umamba", "swin_umamba_d"),
    "msvm_unet": ("msvm_unet",),
    "vm_unet": ("vm_unet_mhs",),
    "mhs_vm": ("vm_unet_mhs",),
    "mambamim": ("hymamba",),
}
#: sources recognised but refused: our networks cannot represent them (see the converter's message); none now
REFUSED = ()
_MAX_LIST = 12


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not fit the requested network; the message says why."""


@dataclass
class Converted:
    state_dict: dict
    arch: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    net_kwargs: dict
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def load_checkpoint(path) -> object:
    """``torch.load`` on CPU; any failure becomes one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt zip, truncated pickle, not a torch file ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {msg})") from None


#: wrapper prefixes stripped from checkpoint keys: DistributedDataParallel / DataParallel, torch.compile
STRIP_PREFIXES = ("module.", "_orig_mod.")


def clean_key(k: str) -> str:
    """``k`` without DDP / torch.compile wrapper prefixes (``module.``, ``_orig_mod.``, in any order and
    number, and ``._orig_mod.`` inside a key)."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if k.startswith(p):
                k, changed = k[len(p):], True
        if "._orig_mod." in k:
            k, changed = k.replace("._orig_mod.", "."), True
    return k


#: where checkpoints keep the network's state dict, first found wins: nnU-Net / medmamba, Lightning and
#: many repositories, VM-UNet / MHS-VM ``latest.pth``, VMamba / Swin / MSVM-style ``{"model": ...}``,
#: MambaMIM's ``*_withdecoder_ct_pretrained.pth`` (``{"module": MambaMIM state dict, "optimizer": ...}``)
_STATE_KEYS = ("network_weights", "state_dict", "model_state_dict", "model", "module")


def extract_state_dict(ckpt, name: str, error: type[Exception] = None) -> dict:
    """The tensors of a loaded checkpoint, keys cleaned (:func:`clean_key`): its ``network_weights``
    (nnU-Net, medmamba), ``state_dict``, ``model_state_dict``, ``model`` or ``module`` (MambaMIM) dict, or the
    checkpoint itself when it is a bare
    state dict. Anything else raises ``error`` (default :class:`CheckpointError`) naming ``name``.
    Shared with ``medmamba.nnunet.pretrained``."""
    error = error or CheckpointError
    if not isinstance(ckpt, Mapping):
        raise error(f"{name}: expected a checkpoint dict, got {type(ckpt).__name__}")
    for key in _STATE_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    else:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            sd = ckpt
        else:
            raise error(f"{name}: no 'network_weights' (nnU-Net / medmamba), 'state_dict', 'model_state_dict', "
                        f"'model' or 'module' (MambaMIM) in the checkpoint; its keys are {sorted(map(str, ckpt))[:10]}")
    return {clean_key(str(k)): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _fmt(items) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LIST])
    return shown + (f", ... ({len(items) - _MAX_LIST} more)" if len(items) > _MAX_LIST else "")


def _require(sd: dict, keys, source: str, what: str, name: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"{name}: not a {what} checkpoint (source '{source}'): missing key(s) {_fmt(missing)}; "
                              f"its first keys are {_fmt(sorted(sd)[:8])}")


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in sd for m in [rx.match(k)] if m}
    return len(found)


def _plans_config(ckpt) -> dict:
    """The nnU-Net configuration dict stored in ``init_args`` (plans + configuration), or {}."""
    try:
        init = ckpt["init_args"]
        plans, cfg = init["plans"], init["configuration"]
        conf = dict(plans["configurations"][cfg])
        while "inherits_from" in conf and not {"pool_op_kernel_sizes", "patch_size"} <= set(conf):
            parent = dict(plans["configurations"][conf.pop("inherits_from")])
            parent.update(conf)
            conf = parent
        return conf
    except Exception:
        return {}


# ------------------------------------------------------------------------------------------------
# assembling
# ------------------------------------------------------------------------------------------------

def _map_keys(sd: Mapping, key_fn: Callable, name: str, arch: str) -> tuple[dict, dict]:
    """Official key -> ours for every tensor: (ours -> tensor, ours -> official key); a key with no counterpart
    is an error naming it."""
    mapped, origin, unplaced = {}, {}, []
    for k, v in sd.items():
        ours = key_fn(k)
        if ours is None:
            unplaced.append(k)
            continue
        mapped[ours], origin[ours] = v, k
    if unplaced:
        raise CheckpointError(f"{name}: keys with no counterpart in {arch}: {_fmt(unplaced)}")
    return mapped, origin


def _assemble(net: torch.nn.Module, mapped: dict, origin: dict, name: str, source: str, arch: str,
              fresh: tuple = (), official: Callable | None = None) -> dict:
    """Load ``mapped`` (our key -> tensor) into ``net`` strictly; keys under ``fresh`` prefixes may be
    absent (they keep the network's seeded initialisation). ``origin``: our key -> official key;
    ``official``: our key -> the official key expected for it (names the keys a checkpoint lacks)."""
    ours = net.state_dict()
    inv = {k: (official(k) if official else None) or k for k in ours}
    unexpected = [origin.get(k, k) for k in mapped if k not in ours]
    missing = [k for k in ours if k not in mapped and not any(k.startswith(p) for p in fresh)]
    if missing or unexpected:
        msg = f"{name}: the checkpoint does not fit {arch} (source '{source}')."
        if missing:
            msg += f" Missing in the checkpoint ({len(missing)}): {_fmt(inv[k] for k in missing)}."
        if unexpected:
            msg += f" Not placed in {arch} ({len(unexpected)}): {_fmt(unexpected)}."
        msg += " Is it a checkpoint of another network or configuration?"
        raise CheckpointError(msg)
    bad = [f"{origin.get(k, k)} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        raise CheckpointError(f"{name}: shape mismatch for {arch} (source '{source}'): {_fmt(bad)}")
    full = dict(ours)
    full.update({k: v.to(ours[k].dtype) for k, v in mapped.items()})
    net.load_state_dict(full, strict=True)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# 2D -> 3D inflation
# ------------------------------------------------------------------------------------------------

#: 2D cross-scan routes (VMamba: row-major, column-major, both reversed) feeding each 3D route of
#: CROSS_SCAN_ROUTES[3] = raster, axis1, axis0, raster_rev, axis1_rev, axis0_rev.
_ROUTES_2D_TO_3D = (0, 1, 1, 2, 3, 3)
_ROUTE_KEYS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


#: sub-pixel expansions whose output channels are laid out (r0, r1[, r2], c), c fastest: VM-UNet / MHS-VM /
#: Swin-UMamba-D PatchExpand (Linear), MSVM-UNet LKPE (1x1 conv - BN - ReLU - depthwise, all per output channel)
_SUB_PIXEL = re.compile(r"(\.upsample\.expand\.weight|\.expands\.\d+\.expand\.weight|\.final_expand\.expand\.weight|"
                        r"\.up\.expand\.\d+\.\w+)$")
#: patch merging (2^d neighbours concatenated): Swin-UMamba's ``encoder.downsamples.i``, VM-UNet's
#: ``encoder.stages.i.downsample``
_MERGE_NORM = re.compile(r"(downsamples\.\d+|stages\.\d+\.downsample)\.norm\.(weight|bias)$")
_MERGE_RED = re.compile(r"(downsamples\.\d+|stages\.\d+\.downsample)\.reduction\.weight$")


def inflate_2d_to_3d(key: str, t: torch.Tensor, shape3d, mode: str = "average") -> torch.Tensor:
    """A 2D tensor of our 2D network -> the tensor of the same key in our 3D network (documented rules).

    * conv kernels (out, in, kH, kW) get a depth axis of size kD in front of kH: ``average`` repeats the
      kernel kD times divided by kD (a depth-constant input gives the 2D response away from the depth
      borders); ``centre`` puts it in the middle slice, zeros elsewhere (odd kD; even kD falls back to
      average). Non-overlapping patch convs (kernel = stride, ``patch_embed.proj``) are always averaged,
      transposed convs (``transp_conv``) are repeated without division (each output voxel gets exactly
      one contribution, as in 2D).
    * patch merging (``encoder.downsamples.i`` / ``encoder.stages.i.downsample``): 3D channel block
      2k + i (i the depth offset) takes 2D block k (``medmamba.nets.vss.merge_order``): LayerNorm(4C)
      weights repeated per depth offset, Linear 4C -> 2C split over the two depth offsets (halved), so a
      depth-constant input merges exactly as in 2D.
    * sub-pixel expansions (VM-UNet / MHS-VM ``PatchExpand`` and final x4 expansion, MSVM-UNet's LKPE
      1x1 conv, BatchNorm and depthwise conv of the up-blocks): output channels are laid out (r0, r1[,
      r2], c) with the depth offset r0 slowest in 3D, so the 2D rows (r1, r2, c) are repeated once per
      depth offset (no division: each output voxel still gets one value); a depth-constant input
      expands exactly as in 2D. Kernels among them are then inflated as above.
    * cross-scan per-route parameters (4 routes -> 6): the 6 3D routes take, in order, the 2D routes
      (row-major, column-major, column-major, and the same reversed): W fastest <- row-major,
      H fastest <- column-major, and the new D-fastest route <- column-major too.
    * everything else (linear layers, norms, Mamba and Multi-Head Scan parameters, whose shapes do not
      depend on the dimension) is copied.
    """
    shape3d = tuple(shape3d)
    if tuple(t.shape) == shape3d:
        return t.clone()
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _ROUTE_KEYS:
        r2 = 4
        blocks = t.reshape(r2, -1, *t.shape[1:]) if leaf in ("A_logs", "Ds") else t
        out = torch.stack([blocks[i] for i in _ROUTES_2D_TO_3D])
        return out.reshape(shape3d)
    if _MERGE_NORM.search(key):
        c = t.shape[0] // 4
        return t.view(4, c).repeat_interleave(2, dim=0).reshape(shape3d)
    if _MERGE_RED.search(key):
        o, c = t.shape[0], t.shape[1] // 4
        return (t.view(o, 4, c).repeat_interleave(2, dim=1) / 2).reshape(shape3d)
    if _SUB_PIXEL.search(key) and t.dim() >= 1 and shape3d and shape3d[0] % t.shape[0] == 0 \
            and shape3d[0] > t.shape[0]:
        reps = shape3d[0] // t.shape[0]
        t = torch.cat([t] * reps, dim=0)
        if tuple(t.shape) == shape3d:
            return t
    if t.dim() == 4 and len(shape3d) == 5:
        kd = shape3d[2]
        w = t.unsqueeze(2)
        if tuple(w.shape[:2]) + tuple(w.shape[3:]) != shape3d[:2] + shape3d[3:]:
            raise CheckpointError(f"cannot inflate {key}: 2D {tuple(t.shape)} vs 3D {shape3d}")
        if "transp_conv" in key:
            return w.repeat(1, 1, kd, 1, 1).clone()
        if mode == "centre" and kd % 2 == 1 and "patch_embed.proj" not in key:
            out = torch.zeros(shape3d, dtype=t.dtype)
            out[:, :, kd // 2] = t
            return out
        return w.repeat(1, 1, kd, 1, 1) / kd
    raise CheckpointError(f"cannot inflate {key}: 2D shape {tuple(t.shape)}, 3D shape {shape3d}")


def _inflate_state(sd2d: dict, net3d: torch.nn.Module, mode: str, fresh: tuple = ()) -> dict:
    """Every tensor of our 2D state dict inflated to ``net3d``'s shapes; keys under ``fresh`` prefixes
    (structurally different in 3D) are dropped, so they keep ``net3d``'s seeded initialisation."""
    ours = net3d.state_dict()
    return {k: inflate_2d_to_3d(k, v, ours[k].shape, mode) if k in ours else v for k, v in sd2d.items()
            if not any(k.startswith(p) for p in fresh)}


def _convert_2d_then_inflate(make_net, mapped, origin, name, source, arch, spatial_dims, inflate, fresh2d=(),
                             official=None, fresh3d=(), what="every weight"):
    """Load ``mapped`` into our 2D network strictly; for ``spatial_dims == 3`` inflate it into our 3D network
    (``fresh3d``: prefixes left at the 3D network's seeded initialisation). Returns (state, notes)."""
    net2 = make_net(2)
    state2 = _assemble(net2, mapped, origin, name, source, arch, fresh=fresh2d, official=official)
    if spatial_dims != 3:
        return state2, []
    net3 = make_net(3)
    inflated = _inflate_state({k: state2[k] for k in mapped}, net3, inflate, fresh=fresh3d)
    state3 = _assemble(net3, inflated, {}, name, source, arch, fresh=fresh2d + tuple(fresh3d))
    notes = [f"2D -> 3D inflation ({inflate}) of {what}, rules in medmamba.weights.inflate_2d_to_3d "
             f"(docs/model_card.md)"]
    if fresh3d:
        left = sorted(k for k in state3 if any(k.startswith(p) for p in fresh3d))
        notes.append(f"structurally different in 3D, left at the seeded initialisation ({len(left)} tensors): "
                     f"{_fmt(left)}")
    return state3, notes


# ------------------------------------------------------------------------------------------------
# U-Mamba (bowang-lab/U-Mamba, nnU-Net fork): the module names are ours, one to one
# ------------------------------------------------------------------------------------------------

def _from_umamba(sd, ckpt, arch, spatial_dims, net_kwargs, name, **_):
    _require(sd, ["encoder.stem.0.conv1.weight", "encoder.stages.0.0.conv1.weight", "decoder.seg_layers.0.weight"],
             "umamba", "U-Mamba (nnU-Net fork)", name)
    kind = "umamba_bot" if any(k.startswith("mamba_layer.") for k in sd) else \
        "umamba_enc" if any(k.startswith("encoder.mamba_layers.") for k in sd) else None
    if kind is None:
        raise CheckpointError(f"{name}: a residual U-Net without Mamba layers (no mamba_layer.* or "
                              f"encoder.mamba_layers.*): not a U-Mamba checkpoint")
    if arch != kind:
        raise CheckpointError(f"{name}: this is a {kind} checkpoint; use --arch {kind} (got --arch {arch})")
    w = sd["encoder.stem.0.conv1.weight"]
    dims = w.dim() - 2
    if spatial_dims not in (None, dims):
        raise CheckpointError(f"{name}: a {dims}D U-Mamba checkpoint; U-Mamba has official 2D and 3D code, "
                              f"convert the {spatial_dims}D one (no inflation for U-Mamba)")
    n = _count(sd, r"encoder\.stages\.(\d+)\.0\.conv1\.weight$")
    features = [int(sd[f"encoder.stages.{s}.0.conv1.weight"].shape[0]) for s in range(n)]
    kernels = [list(sd[f"encoder.stages.{s}.0.conv1.weight"].shape[2:]) for s in range(n)]
    blocks = [_count(sd, rf"encoder\.stages\.{s}\.(\d+)\.") for s in range(n)]
    dec_blocks = [_count(sd, rf"decoder\.stages\.{s}\.(\d+)\.") for s in range(n - 1)]
    last_in = int(sd[f"decoder.stages.{n - 2}.0.conv1.weight"].shape[1])
    kw = dict(features_per_stage=features, kernel_sizes=kernels, n_blocks_per_stage=blocks,
              n_conv_per_stage_decoder=dec_blocks, published_block_schedule=False,
              concat_full_resolution_skip=last_in == 2 * features[0])
    conf = _plans_config(ckpt)
    if "pool_op_kernel_sizes" in conf:
        kw["strides"] = [list(s) for s in conf["pool_op_kernel_sizes"]]
    if kind == "umamba_enc" and "patch_size" in conf:
        kw["patch_size"] = list(conf["patch_size"])
    kw.update(net_kwargs)
    kw.setdefault("strides", [1] + [2] * (n - 1))
    in_ch, out_ch = int(w.shape[1]), int(sd["decoder.seg_layers.0.weight"].shape[0])
    try:
        net = nets.create(arch, in_ch, out_ch, dims, **kw)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc} (pass the training patch size / strides with --net-kwargs)") from None
    notes = [] if "strides" in net_kwargs or "pool_op_kernel_sizes" in conf else \
        ["strides not in the checkpoint (no nnU-Net init_args): assumed (1, 2, 2, ...); pass --net-kwargs "
         "'{\"strides\": ...}' if the plans differ"]
    state = _assemble(net, dict(sd), {}, name, "umamba", arch)
    return Converted(state, arch, dims, in_ch, out_ch, _jsonable(kw), notes)


# ------------------------------------------------------------------------------------------------
# LightM-UNet (MrBlankness/LightM-UNet, nnU-Net fork, nets/LightMUNet.py)
# ------------------------------------------------------------------------------------------------

def lightm_unet_key(k: str) -> str | None:
    """Official LightM-UNet key -> ours (None: no counterpart)."""
    rules = [
        (r"convInit\.0\.conv\.(.+)$", r"encoder.stem.depthwise.\1"),
        (r"convInit\.1\.conv\.(.+)$", r"encoder.stem.pointwise.\1"),
        (r"up_samples\.(\d+)\.0\.conv\.(.+)$", r"decoder.up_convs.\1.\2"),
        (r"up_layers\.(\d+)\.(\d+)\.conv\.0\.conv\.(.+)$", r"decoder.up_layers.\1.\2.conv.depthwise.\3"),
        (r"up_layers\.(\d+)\.(\d+)\.conv\.1\.conv\.(.+)$", r"decoder.up_layers.\1.\2.conv.pointwise.\3"),
        (r"up_layers\.(\d+)\.(\d+)\.(norm1|norm2|skip_scale)(.*)$", r"decoder.up_layers.\1.\2.\3\4"),
        (r"conv_final\.0\.(.+)$", r"decoder.head.0.\1"),
        (r"conv_final\.2\.0\.conv\.(.+)$", r"decoder.head.2.depthwise.\1"),
        (r"conv_final\.2\.1\.conv\.(.+)$", r"decoder.head.2.pointwise.\1"),
    ]
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    m = re.match(r"down_layers\.(\d+)\.(\d+)\.(.+)$", k)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if i == 0:  # down_layers.0.0 is an Identity; blocks from index 1
            return f"encoder.levels.0.{j - 1}.{rest}" if j >= 1 else None
        if j == 0:  # Sequential(RVM layer, MaxPool): the RVM layer is .0
            return f"encoder.levels.{i}.0.{rest[2:]}" if rest.startswith("0.") else None
        return f"encoder.levels.{i}.{j + 1}.{rest}"  # ours: RVM, MaxPool, blocks
    return None


def _from_lightm_unet(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, **_):
    _require(sd, ["convInit.0.conv.weight", "convInit.1.conv.weight", "conv_final.2.1.conv.weight"],
             "lightm_unet", "LightM-UNet", name)
    w = sd["convInit.0.conv.weight"]
    dims = w.dim() - 2
    if spatial_dims not in (None, dims):
        raise CheckpointError(f"{name}: a {dims}D LightM-UNet checkpoint; LightM-UNet has official 2D and 3D "
                              f"code, convert the {spatial_dims}D one")
    n = _count(sd, r"down_layers\.(\d+)\.")
    blocks_down = [_count(sd, r"down_layers\.0\.(\d+)\.")] + \
                  [_count(sd, rf"down_layers\.{i}\.(\d+)\.") - 1 for i in range(1, n)]
    blocks_up = [_count(sd, rf"up_layers\.{i}\.(\d+)\.") for i in range(_count(sd, r"up_layers\.(\d+)\."))]
    kw = dict(init_filters=int(sd["convInit.1.conv.weight"].shape[0]), blocks_down=blocks_down, blocks_up=blocks_up)
    kw.update(net_kwargs)
    in_ch, out_ch = int(w.shape[0]), int(sd["conv_final.2.1.conv.weight"].shape[0])
    torch.manual_seed(seed)
    net = nets.create(arch, in_ch, out_ch, dims, **kw)
    mapped, origin = _map_keys(sd, lightm_unet_key, name, arch)
    state = _assemble(net, mapped, origin, name, "lightm_unet", arch, fresh=("decoder.ds_heads.",))
    return Converted(state, arch, dims, in_ch, out_ch, kw,
                     ["decoder.ds_heads.* (our deep-supervision heads, not in the official network) keep their "
                      f"seeded initialisation (seed {seed}); they are unused without deep supervision"])


# ------------------------------------------------------------------------------------------------
# Swin-UMamba (JiarunLiu/Swin-UMamba nets/SwinUMamba.py) and VMamba v0 ImageNet weights
# ------------------------------------------------------------------------------------------------

def _vss_key(rest: str) -> str:
    """``layers.i.blocks.j.<VMamba v0 names>`` -> ours."""
    rest = re.sub(r"\.ln_1\.", ".norm.", rest)
    rest = re.sub(r"\.self_attention\.conv2d\.", ".mixer.conv.", rest)
    return re.sub(r"\.self_attention\.", ".mixer.", rest)


def swin_umamba_key(k: str) -> str | None:
    """Official Swin-UMamba key -> ours (None: no counterpart)."""
    m = re.match(r"stem\.(\d)\.(.+)$", k)
    if m:
        return f"encoder.stem.{m.group(1)}.{m.group(2)}"
    if k.startswith("vssm_encoder.patch_embed."):
        return "encoder." + k[len("vssm_encoder."):]
    if k.startswith("vssm_encoder.layers."):
        return "encoder." + _vss_key(k[len("vssm_encoder."):])
    if k.startswith("vssm_encoder.downsamples."):
        return "encoder." + k[len("vssm_encoder."):]
    m = re.match(r"encoder([1-5])\.(.+)$", k)
    if m:
        return f"decoder.skips.{int(m.group(1)) - 1}.{m.group(2)}"
    m = re.match(r"decoder([2-6])\.(.+)$", k)
    if m:
        return f"decoder.ups.{int(m.group(1)) - 2}.{m.group(2)}"
    if k.startswith("decoder1."):
        return "decoder.final." + k[len("decoder1."):]
    m = re.match(r"out_layers\.(\d+)\.(.+)$", k)
    if m:
        return f"decoder.heads.{m.group(1)}.{m.group(2)}"
    return None


def vmamba_key(k: str) -> str | None:
    """VMamba v0 ImageNet key -> our Swin-UMamba encoder key, as Swin-UMamba's ``load_pretrained_ckpt``
    (None: skipped). Its skip list names ``patch_embed.norm.weight`` twice and never its bias, so the
    ImageNet ``patch_embed.norm.bias`` IS loaded while the weight is not; we do the same."""
    if k in ("norm.weight", "norm.bias", "head.weight", "head.bias", "patch_embed.proj.weight",
             "patch_embed.proj.bias", "patch_embed.norm.weight"):
        return None
    m = re.match(r"layers\.(\d+)\.downsample\.(.+)$", k)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{m.group(2)}"
    if k.startswith("layers."):
        return "encoder." + _vss_key(k)
    if k == "patch_embed.norm.bias":
        return "encoder.patch_embed.norm.bias"
    return None


def _swin_net(arch, in_ch, out_ch, dims, net_kwargs, seed):
    torch.manual_seed(seed)
    return nets.create(arch, in_ch, out_ch, dims, **net_kwargs)


def _dims_depths(sd, prefix):
    n = _count(sd, rf"{prefix}layers\.(\d+)\.blocks\.")
    depths = [_count(sd, rf"{prefix}layers\.{i}\.blocks\.(\d+)\.") for i in range(n)]
    dims = [int(sd[f"{prefix}layers.{i}.blocks.0.ln_1.weight"].shape[0]) for i in range(n)]
    return dims, depths


def _from_swin_umamba(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, inflate="average", **_):
    d_layout = "decoder.expand_layers.0.expand.weight" in sd
    if arch == "swin_umamba_d" or d_layout:
        if arch != "swin_umamba_d":
            raise CheckpointError(f"{name}: a Swin-UMamba-D checkpoint (decoder.expand_layers.*): use --arch "
                                  f"swin_umamba_d")
        if "stem.0.weight" in sd:
            raise CheckpointError(f"{name}: a Swin-UMamba checkpoint (conv stem 'stem.*', UNETR decoder): use --arch "
                                  f"swin_umamba")
        return _from_swin_umamba_d(sd, arch, spatial_dims, net_kwargs, name, seed, inflate)
    _require(sd, ["stem.0.weight", "vssm_encoder.patch_embed.proj.weight", "out_layers.0.conv.conv.weight"],
             "swin_umamba", "Swin-UMamba (nnU-Net fork)", name)
    dims = spatial_dims or 2
    in_ch = int(sd["stem.0.weight"].shape[1])
    out_ch = int(sd["out_layers.0.conv.conv.weight"].shape[0])
    vdims, depths = _dims_depths(sd, "vssm_encoder.")
    kw = dict(feature_size=int(sd["stem.0.weight"].shape[0]), dims=vdims, depths=depths)
    kw.update(net_kwargs)
    mapped, origin = _map_keys(sd, swin_umamba_key, name, arch)
    notes = []
    if dims == 3:
        net2 = _swin_net(arch, in_ch, out_ch, 2, kw, seed)
        mapped = _assemble(net2, mapped, origin, name, "swin_umamba", arch)
        origin = {}
        net = _swin_net(arch, in_ch, out_ch, 3, kw, seed)
        mapped = _inflate_state(mapped, net, inflate)
        notes.append(f"2D -> 3D inflation ({inflate}) of every weight, see medmamba.weights.inflate_2d_to_3d")
    else:
        net = _swin_net(arch, in_ch, out_ch, 2, kw, seed)
    state = _assemble(net, mapped, origin, name, "swin_umamba", arch)
    return Converted(state, arch, dims, in_ch, out_ch, kw, notes)


def _from_vmamba(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, inflate="average", in_channels=1,
                 out_channels=2, **_):
    _require(sd, ["layers.0.blocks.0.ln_1.weight", "layers.0.blocks.0.self_attention.x_proj_weight"],
             "vmamba", "VMamba v0 (SS2D 'self_attention', ImageNet)", name)
    dims = spatial_dims or 2
    vdims, depths = _dims_depths(sd, "")
    kw = dict(dims=vdims, depths=depths)
    kw.update(net_kwargs)
    mapped, origin = {}, {}
    for k, v in sd.items():
        ours = vmamba_key(k)
        if ours is not None:
            mapped[ours], origin[ours] = v, k
    if arch == "swin_umamba_d":
        return _from_vmamba_d(sd, mapped, origin, kw, dims, name, seed, inflate, in_channels, out_channels)
    fresh = ("encoder.stem.", "encoder.patch_embed.", "decoder.")
    notes = ["ImageNet VMamba encoder loaded as Swin-UMamba's load_pretrained_ckpt does: stem, patch_embed.proj, "
             "patch_embed.norm.weight and the decoder keep their seeded initialisation (seed "
             f"{seed}); patch_embed.norm.bias is loaded (the official skip list misses it)",
             "train with nnUNetTrainerSwinUMamba and -pretrained_weights: the encoder is frozen for the first "
             "10 epochs, as the paper"]
    if dims == 3:
        net2 = _swin_net(arch, in_channels, out_channels, 2, kw, seed)
        enc2 = _assemble(net2, mapped, origin, name, "vmamba", arch, fresh=fresh)
        net = _swin_net(arch, in_channels, out_channels, 3, kw, seed)
        mapped = {k: v for k, v in _inflate_state({k: enc2[k] for k in mapped}, net, inflate).items()}
        origin = {}
        notes.append(f"2D -> 3D inflation ({inflate}) of the encoder, see medmamba.weights.inflate_2d_to_3d")
    else:
        net = _swin_net(arch, in_channels, out_channels, 2, kw, seed)
    state = _assemble(net, mapped, origin, name, "vmamba", arch, fresh=fresh)
    return Converted(state, arch, dims, in_channels, out_channels, kw, notes)


# ------------------------------------------------------------------------------------------------
# Swin-UMamba-D (JiarunLiu/Swin-UMamba swin_umamba/nnunetv2/nets/SwinUMambaD.py @ 2c1f72e1):
# vssm_encoder (patch_embed 4x4, layers.i.blocks.j, downsamples.i) + decoder (UNetResDecoder: expand_layers,
# concat_back_dim, stages.k.blocks.j, seg_layers), decoder step k (0 = deepest) = our level i = n - 2 - k
# ------------------------------------------------------------------------------------------------

def swin_umamba_d_key(k: str, n: int) -> str | None:
    """Official Swin-UMamba-D key -> ours (``n`` encoder stages; None: no counterpart)."""
    if k.startswith(("vssm_encoder.patch_embed.", "vssm_encoder.downsamples.")):
        return "encoder." + k[len("vssm_encoder."):]
    if k.startswith("vssm_encoder.layers."):
        return "encoder." + _vss_key(k[len("vssm_encoder."):])
    m = re.match(r"decoder\.expand_layers\.(\d+)\.(expand\.weight|norm\.weight|norm\.bias)$", k)
    if m:
        return _decoder_step_key(int(m.group(1)), n, "final_expand", "expands", m.group(2))
    m = re.match(r"decoder\.concat_back_dim\.(\d+)\.(weight|bias)$", k)
    if m and int(m.group(1)) < n - 1:
        return f"decoder.concat_back.{n - 2 - int(m.group(1))}.{m.group(2)}"
    m = re.match(r"decoder\.stages\.(\d+)\.(blocks\..+)$", k)
    if m and int(m.group(1)) < n - 1:
        return _vss_key(f"decoder.layers.{n - 2 - int(m.group(1))}.{m.group(2)}")
    m = re.match(r"decoder\.seg_layers\.(\d+)\.(weight|bias)$", k)
    if m:
        return _decoder_step_key(int(m.group(1)), n, "final_head", "heads", m.group(2))
    return None


def _decoder_step_key(step: int, n: int, final: str, per_level: str, rest: str):
    """Swin-UMamba-D decoder step (deepest first) -> ours: the last step is ``final``, step k < n - 1 is level
    n - 2 - k of ``per_level``; beyond: None."""
    if step == n - 1:
        return f"decoder.{final}.{rest}"
    return f"decoder.{per_level}.{n - 2 - step}.{rest}" if step < n - 1 else None


def _swin_d_fresh3d(make) -> tuple:
    """Our 3D Swin-UMamba-D's final x4 expansion differs from the 2D one when ``final_dim`` differs (default:
    dims[0] // 4 in 3D, dims[0] in 2D; its Linear can even have the 2D shape): leave it and the head fresh."""
    n2, n3 = make(2), make(3)
    if n2.decoder.final_expand.out_dim == n3.decoder.final_expand.out_dim:
        return ()
    return ("decoder.final_expand.", "decoder.final_head.")


def _from_swin_umamba_d(sd, arch, spatial_dims, net_kwargs, name, seed, inflate):
    _require(sd, ["vssm_encoder.patch_embed.proj.weight", "vssm_encoder.layers.0.blocks.0.ln_1.weight",
                  "decoder.expand_layers.0.expand.weight", "decoder.seg_layers.0.weight"],
             "swin_umamba", "Swin-UMamba-D (SwinUMambaD.py)", name)
    vdims, depths = _dims_depths(sd, "vssm_encoder.")
    n = len(vdims)
    dec = {_count(sd, rf"decoder\.stages\.{k}\.blocks\.(\d+)\.") for k in range(n - 1)}
    if len(dec) != 1:
        raise CheckpointError(f"{name}: decoder stages of different depths {sorted(dec)}; our SwinUMambaD has one "
                              f"decoder_depth")
    in_ch = int(sd["vssm_encoder.patch_embed.proj.weight"].shape[1])
    out_ch = int(sd["decoder.seg_layers.0.weight"].shape[0])
    kw = dict(dims=vdims, depths=depths, decoder_depth=dec.pop(),
              d_state=int(sd["vssm_encoder.layers.0.blocks.0.self_attention.A_logs"].shape[1]))
    kw.update(net_kwargs)
    mapped, origin = _map_keys(sd, lambda k: swin_umamba_d_key(k, n), name, arch)
    make = _net_maker(arch, in_ch, out_ch, kw, seed, name)
    fresh3d = _swin_d_fresh3d(make) if spatial_dims == 3 else ()
    state, notes = _convert_2d_then_inflate(make, mapped, origin, name, "swin_umamba", arch, spatial_dims, inflate,
                                            fresh3d=fresh3d)
    if fresh3d:
        notes.append("pass --net-kwargs '{\"final_dim\": %d}' to inflate the final x4 expansion as well (its rows "
                     "repeated per depth offset; 4x the memory of the default 3D final_dim)" % vdims[0])
    return Converted(state, arch, spatial_dims or 2, in_ch, out_ch, _jsonable(kw), notes)


def _from_vmamba_d(sd, mapped, origin, kw, dims, name, seed, inflate, in_channels, out_channels):
    """VMamba ImageNet weights into Swin-UMamba-D as its ``load_pretrained_ckpt`` (SwinUMambaD.py) loads them:
    every encoder key, the patch embedding (proj and norm) only when its input channels equal ours."""
    if "patch_embed.proj.weight" in sd and int(sd["patch_embed.proj.weight"].shape[1]) == in_channels:
        for k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"):
            if k in sd:
                mapped["encoder." + k], origin["encoder." + k] = sd[k], k
        pe = "loaded (its input channels equal --in-channels)"
    else:
        for k in ("encoder.patch_embed.norm.bias",):
            mapped.pop(k, None)
            origin.pop(k, None)
        pe = "not loaded (ImageNet has 3 input channels, ours %d), seeded" % in_channels
    make = _net_maker("swin_umamba_d", in_channels, out_channels, kw, seed, name)
    fresh = ("encoder.patch_embed.", "decoder.")
    state, notes = _convert_2d_then_inflate(make, mapped, origin, name, "vmamba", "swin_umamba_d", dims, inflate,
                                            fresh2d=fresh, what="the encoder")
    notes.insert(0, f"ImageNet VMamba encoder loaded as Swin-UMamba-D's load_pretrained_ckpt does: the patch "
                    f"embedding {pe}; norm / head skipped; the decoder keeps its seeded initialisation (seed {seed})")
    notes.append("train with nnUNetTrainerSwinUMambaD and -pretrained_weights: the encoder is frozen for the first "
                 "10 epochs, as the paper")
    return Converted(state, "swin_umamba_d", dims, in_channels, out_channels, kw, notes)


# ------------------------------------------------------------------------------------------------
# MSVM-UNet (gndlwch2w/msvm-unet model/__init__.py, model/encoder.py, model/decoder.py,
# model/vmamba/vmamba.py @ 52e3474f): VMamba v2 "tiny_0230s" encoder, channels-first (ln2d)
# ------------------------------------------------------------------------------------------------

def _vss_v2_key(rest: str) -> str | None:
    """One VMamba-v2 / MSVSS block's sub-key (``norm``, ``op`` = SS2D v05_noz, ``norm2``, ``mlp``) -> ours."""
    m = re.match(r"(norm|norm2)\.(weight|bias)$", rest)
    if m:
        return rest
    m = re.match(r"op\.conv2d\.weight$", rest)
    if m:
        return "mixer.conv.weight"
    m = re.match(r"op\.(in_proj\.weight|out_proj\.weight|out_norm\.(?:weight|bias)|x_proj_weight|dt_projs_weight|"
                 r"dt_projs_bias|A_logs|Ds)$", rest)
    if m:
        return f"mixer.{m.group(1)}"
    m = re.match(r"mlp\.(fc1|fc2)\.(weight|bias)$", rest)
    if m:
        return f"ffn.{m.group(1)}.{m.group(2)}"
    m = re.match(r"mlp\.multiscale_conv\.dw_convs\.(\d+)\.weight$", rest)
    if m:
        return f"ffn.ms_conv.dw_convs.{m.group(1)}.weight"
    return None


#: official MSVM-UNet stem: encoder.layer0 = patch_embed[0:5] (conv, Identity, LN2d, Identity, GELU),
#: encoder.layer1 = patch_embed[5:8] (conv, Identity, LN2d); ours: encoder.stem.{0 conv, 1 LN, 2 GELU, 3 conv, 4 LN}
_MSVM_STEM = {"layer0.0": "0", "layer0.2": "1", "layer1.0": "3", "layer1.2": "4"}


def msvm_unet_key(k: str) -> str | None:
    """Official MSVM-UNet key -> ours (None: no counterpart)."""
    m = re.match(r"encoder\.(layer[01]\.\d)\.(weight|bias)$", k)
    if m:
        return f"encoder.stem.{_MSVM_STEM[m.group(1)]}.{m.group(2)}" if m.group(1) in _MSVM_STEM else None
    m = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        rest = _vss_v2_key(m.group(3))
        return f"encoder.stages.{m.group(1)}.{m.group(2)}.{rest}" if rest else None
    m = re.match(r"encoder\.downsamples\.(\d+)\.([13])\.(weight|bias)$", k)  # Sequential(Identity, conv, Identity, LN2d)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{'conv' if m.group(2) == '1' else 'norm'}.{m.group(3)}"
    m = re.match(r"decoder\.layers\.(\d+)\.up\.(expand\.[013]\.\w+|norm\.(?:weight|bias))$", k)
    if m:
        return f"decoder.up_blocks.{m.group(1)}.up.{m.group(2)}"
    m = re.match(r"decoder\.layers\.(\d+)\.concat_layer\.(weight|bias)$", k)
    if m:
        return f"decoder.up_blocks.{m.group(1)}.concat.{m.group(2)}"
    m = re.match(r"decoder\.layers\.(\d+)\.vss_layer\.blocks\.(\d+)\.(.+)$", k)
    if m:
        rest = _vss_v2_key(m.group(3))
        return f"decoder.up_blocks.{m.group(1)}.blocks.{m.group(2)}.{rest}" if rest else None
    m = re.match(r"decoder\.out_layers\.0\.(expand\.[013]\.\w+|norm\.(?:weight|bias))$", k)
    if m:
        return f"decoder.final.steps.0.{m.group(1)}"
    m = re.match(r"decoder\.out_layers\.0\.out\.(weight|bias)$", k)
    if m:
        return f"decoder.seg_layers.0.{m.group(1)}"
    return None


#: our Linear layers that are ``Linear2d`` (1x1 conv over channels-first maps) in the official code; its
#: state dict holds them as (out, in), but ``Linear2d._load_from_state_dict`` also accepts (out, in, 1, 1)
_LINEAR2D = re.compile(r"(mixer\.(in_proj|out_proj)|ffn\.fc[12]|\.concat)\.weight$")


def _first_sub(rules, k: str) -> str | None:
    for pat, rep in rules:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return None


_VSS_V2_BACK = [(r"mixer\.conv\.weight$", "op.conv2d.weight"), (r"mixer\.(.+)$", r"op.\1"),
                (r"ffn\.ms_conv\.(.+)$", r"mlp.multiscale_conv.\1"), (r"ffn\.(.+)$", r"mlp.\1"), (r"(.+)$", r"\1")]


def msvm_unet_official_key(k: str) -> str | None:
    """Our MSVM-UNet key -> the official key (the inverse of :func:`msvm_unet_key`), for error messages."""
    stem = {v: f for f, v in _MSVM_STEM.items()}
    m = re.match(r"encoder\.stem\.(\d)\.(.+)$", k)
    if m and m.group(1) in stem:
        return f"encoder.{stem[m.group(1)]}.{m.group(2)}"
    m = re.match(r"(encoder\.stages\.(\d+)\.(\d+)|decoder\.up_blocks\.(\d+)\.blocks\.(\d+))\.(.+)$", k)
    if m:
        head = f"encoder.layers.{m.group(2)}.blocks.{m.group(3)}" if m.group(2) is not None else \
            f"decoder.layers.{m.group(4)}.vss_layer.blocks.{m.group(5)}"
        return f"{head}.{_first_sub(_VSS_V2_BACK, m.group(6))}"
    return _first_sub([(r"encoder\.downsamples\.(\d+)\.conv\.(.+)$", r"encoder.downsamples.\1.1.\2"),
                       (r"encoder\.downsamples\.(\d+)\.norm\.(.+)$", r"encoder.downsamples.\1.3.\2"),
                       (r"decoder\.up_blocks\.(\d+)\.up\.(.+)$", r"decoder.layers.\1.up.\2"),
                       (r"decoder\.up_blocks\.(\d+)\.concat\.(.+)$", r"decoder.layers.\1.concat_layer.\2"),
                       (r"decoder\.final\.steps\.0\.(.+)$", r"decoder.out_layers.0.\1"),
                       (r"decoder\.seg_layers\.0\.(.+)$", r"decoder.out_layers.0.out.\1")], k)


def _from_msvm_unet(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, inflate="average", **_):
    _require(sd, ["encoder.layer0.0.weight", "encoder.layers.0.blocks.0.op.x_proj_weight",
                  "decoder.out_layers.0.out.weight"], "msvm_unet", "MSVM-UNet", name)
    n = _count(sd, r"encoder\.layers\.(\d+)\.blocks\.")
    dims = [int(sd[f"encoder.layers.{i}.blocks.0.norm.weight"].shape[0]) for i in range(n)]
    depths = [_count(sd, rf"encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(n)]
    dec_depths = [_count(sd, rf"decoder\.layers\.{i}\.vss_layer\.blocks\.(\d+)\.") for i in range(n - 1)]
    fc1 = sd["encoder.layers.0.blocks.0.mlp.fc1.weight"] if "encoder.layers.0.blocks.0.mlp.fc1.weight" in sd else None
    kw = dict(dims=dims, depths=depths, decoder_depths=dec_depths,
              d_state=int(sd["encoder.layers.0.blocks.0.op.A_logs"].shape[1]))
    if fc1 is not None:
        kw["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    kw.update(net_kwargs)
    in_ch = int(sd["encoder.layer0.0.weight"].shape[1])
    out_ch = int(sd["decoder.out_layers.0.out.weight"].shape[0])
    mapped, origin = _map_keys(sd, msvm_unet_key, name, arch)
    for k, v in mapped.items():
        if _LINEAR2D.search(k) and v.dim() == 4 and tuple(v.shape[2:]) == (1, 1):
            mapped[k] = v.flatten(1)
    make = _net_maker(arch, in_ch, out_ch, kw, seed, name)
    # 3D: the final FLKPE is two x2 steps instead of one x4 step (docs/model_card.md): no rule maps it
    state, notes3 = _convert_2d_then_inflate(make, mapped, origin, name, "msvm_unet", arch, spatial_dims, inflate,
                                             fresh2d=_ds_heads(make(2)), official=msvm_unet_official_key,
                                             fresh3d=("decoder.final.",),
                                             what="the encoder and the up-blocks (LKPE, MSVSS)")
    notes = [f"decoder.seg_layers.1..: our deep-supervision heads (not in the official network) keep their seeded "
             f"initialisation (seed {seed}); unused without deep supervision"] + notes3
    if in_ch == 3:
        notes.append("the official MSVMUNet.forward repeats a 1-channel input to 3 channels; ours does not: feed "
                     "3 channels (or sum encoder.stem.0.weight over its input axis for 1-channel images)")
    return Converted(state, arch, spatial_dims or 2, in_ch, out_ch, _jsonable(kw), notes)


def _net_maker(arch, in_ch, out_ch, kw, seed, name):
    """``make(spatial_dims)``: our network, seeded, errors as CheckpointError."""
    def make(dims):
        torch.manual_seed(seed)
        try:
            return nets.create(arch, in_ch, out_ch, dims, **kw)
        except ValueError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
    return make


def _ds_heads(net) -> tuple:
    n = len(net.decoder.seg_layers)
    return tuple(f"decoder.seg_layers.{i}." for i in range(1, n))


# ------------------------------------------------------------------------------------------------
# MHS-VM (PixDeep/MHS-VM models/vmunet/vmamba.py @ 77508281, models/vmunet/mhsm.py as
# .ipynb_checkpoints/mhsm-checkpoint.py @ 3e4241e9) and VM-UNet (JCruan519/VM-UNet
# models/vmunet/vmunet.py, vmamba.py @ 032efd7f): VMUNet.vmunet = VSSM (layers, layers_up, final_up, final_conv)
# ------------------------------------------------------------------------------------------------

#: MHSM scan heads in the order MHSM.forward splits x_ssproj's output (C, X, S[, Z]); route_dict rows 0-1, 2-3,
#: 4-5, 6-7 of routegen.py. Ours: MultiHeadScan families DEFAULT_FAMILIES[:h] = snake, diagonal, spiral, raster.
MHS_HEAD_ORDER = ("C", "X", "S", "Z")
_MHS_SCAN_PARAMS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def _mhs_block_key(rest: str) -> str | None:
    """One MHS-VM VSSBlock sub-key -> ours (the scan-head tensors are merged separately)."""
    rules = [
        (r"ln_1\.(weight|bias)$", r"norm.\1"),
        (r"self_attention\.in_proj\.weight$", "mixer.in_proj.weight"),
        (r"self_attention\.conv2d\.(weight|bias)$", r"mixer.conv.\1"),
        (r"self_attention\.out_norm\.(weight|bias)$", r"mixer.out_norm.\1"),
        (r"self_attention\.mhs\.x_ssproj\.weight$", "mixer.mhs.in_proj.weight"),
        (r"self_attention\.mhs\.cat_norm\.(weight|bias)$", r"mixer.mhs.out_norm.\1"),
        (r"self_attention\.mhs\.y_proj\.weight$", "mixer.mhs.out_proj.weight"),
    ]
    for pat, rep in rules:
        if re.match(pat, rest):
            return re.sub(pat, rep, rest)
    return None


def _vm_unet_block_prefix(k: str) -> tuple[str, str] | None:
    """``layers.i.blocks.j.REST`` / ``layers_up.i.blocks.j.REST`` -> (our block prefix, REST)."""
    m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        return f"encoder.stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
    m = re.match(r"layers_up\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        return f"decoder.stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
    return None


def mhs_vm_key(k: str) -> str | None:
    """Official MHS-VM VSSM key (without the ``vmunet.`` prefix) -> ours, scan-head tensors excepted (None)."""
    m = re.match(r"patch_embed\.(proj|norm)\.(weight|bias)$", k)
    if m:
        return f"encoder.patch_embed.{m.group(1)}.{m.group(2)}"
    m = re.match(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$", k)
    if m:
        return f"encoder.stages.{m.group(1)}.downsample.{m.group(2)}"
    m = re.match(r"layers_up\.(\d+)\.upsample\.(norm\.weight|norm\.bias|expand\.weight)$", k)
    if m:
        return f"decoder.stages.{m.group(1)}.upsample.{m.group(2)}"
    m = re.match(r"final_up\.(norm\.weight|norm\.bias|expand\.weight)$", k)
    if m:
        return f"decoder.final_expand.{m.group(1)}"
    m = re.match(r"final_conv\.(weight|bias)$", k)
    if m:
        return f"decoder.seg_layers.0.{m.group(1)}"
    blk = _vm_unet_block_prefix(k)
    if blk:
        rest = _mhs_block_key(blk[1])
        return blk[0] + rest if rest else None
    return None


_MHS_BLOCK_BACK = [(r"norm\.(.+)$", r"ln_1.\1"), (r"mixer\.conv\.(.+)$", r"self_attention.conv2d.\1"),
                   (r"mixer\.mhs\.in_proj\.weight$", "self_attention.mhs.x_ssproj.weight"),
                   (r"mixer\.mhs\.out_norm\.(.+)$", r"self_attention.mhs.cat_norm.\1"),
                   (r"mixer\.mhs\.out_proj\.weight$", "self_attention.mhs.y_proj.weight"),
                   (r"mixer\.mhs\.(\w+)$", r"self_attention.mhs.scanhead_*.mambaeng.\1"),
                   (r"mixer\.(.+)$", r"self_attention.\1")]


def mhs_vm_official_key(k: str) -> str | None:
    """Our VMUNetMHS key -> the official MHS-VM VSSM key (without ``vmunet.``), for error messages."""
    m = re.match(r"(encoder|decoder)\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        layer = "layers" if m.group(1) == "encoder" else "layers_up"
        return f"{layer}.{m.group(2)}.blocks.{m.group(3)}.{_first_sub(_MHS_BLOCK_BACK, m.group(4))}"
    return _first_sub([(r"encoder\.patch_embed\.(.+)$", r"patch_embed.\1"),
                       (r"encoder\.stages\.(\d+)\.downsample\.(.+)$", r"layers.\1.downsample.\2"),
                       (r"decoder\.stages\.(\d+)\.upsample\.(.+)$", r"layers_up.\1.upsample.\2"),
                       (r"decoder\.final_expand\.(.+)$", r"final_up.\1"),
                       (r"decoder\.seg_layers\.0\.(.+)$", r"final_conv.\1")], k)


def _strip_vmunet(sd: dict) -> dict:
    """VMUNet keeps the VSSM under ``vmunet.``; a bare VSSM state dict is accepted as well."""
    if any(k.startswith("vmunet.") for k in sd):
        return {k[len("vmunet."):]: v for k, v in sd.items() if k.startswith("vmunet.")} | \
            {k: v for k, v in sd.items() if not k.startswith("vmunet.")}
    return dict(sd)


def _merge_mhs_heads(sd: dict, name: str) -> tuple[dict, dict, dict, int]:
    """Pull the per-head MambaEngine tensors out of ``sd``: (rest of sd, ours -> tensor, ours -> official key,
    number of heads). Head tensors are concatenated along dim 0 in the order C, X, S, Z (sequence
    s = head * 4 + route in our MultiHeadScan). The alias ``mhs.x_ssproj_W`` (the same Parameter as
    ``mhs.x_ssproj.weight``, registered twice by the official code) is dropped after checking it is equal."""
    rx = re.compile(r"(.+\.self_attention\.mhs)\.scanhead_([A-Z])\.mambaeng\.(\w+)$")
    rest, groups = {}, {}
    for k, v in sd.items():
        m = rx.match(k)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (k, v)
            continue
        if k.endswith(".self_attention.mhs.x_ssproj_W"):
            twin = k[:-len("x_ssproj_W")] + "x_ssproj.weight"
            if twin in sd and not torch.equal(sd[twin], v):
                raise CheckpointError(f"{name}: {k} differs from {twin} (the official code registers one Parameter "
                                      f"under both names): damaged checkpoint")
            if twin in sd:
                continue
            k = twin  # only the alias was saved
        rest[k] = v
    mapped, origin, n_heads = {}, {}, set()
    for (prefix, param), heads in sorted(groups.items()):
        letters = "".join(sorted(heads, key=lambda c: MHS_HEAD_ORDER.index(c) if c in MHS_HEAD_ORDER else 99))
        if param not in _MHS_SCAN_PARAMS or letters not in ("CXS", "CXSZ"):
            raise CheckpointError(f"{name}: unexpected MHS scan heads/parameter under {prefix}: scanhead_"
                                  f"{'/'.join(letters)}.mambaeng.{param} (expected scanhead_C/X/S[/Z] with "
                                  f"{', '.join(_MHS_SCAN_PARAMS)})")
        n_heads.add(len(letters))
        blk = _vm_unet_block_prefix(prefix + ".")
        ours = f"{blk[0]}mixer.mhs.{param}"
        mapped[ours] = torch.cat([heads[c][1] for c in letters], dim=0)
        origin[ours] = f"{prefix}.scanhead_{{{','.join(letters)}}}.mambaeng.{param}"
    if len(n_heads) > 1:
        raise CheckpointError(f"{name}: blocks with different numbers of scan heads ({sorted(n_heads)}); our "
                              f"network uses one num_heads for every block")
    return rest, mapped, origin, (n_heads.pop() if n_heads else 0)


def _vm_unet_dims(sd):
    n = _count(sd, r"layers\.(\d+)\.blocks\.")
    dims = [int(sd[f"layers.{i}.blocks.0.ln_1.weight"].shape[0]) for i in range(n)]
    depths = [_count(sd, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(n)]
    dec = [_count(sd, rf"layers_up\.{i}\.blocks\.(\d+)\.") for i in range(_count(sd, r"layers_up\.(\d+)\."))]
    return dims, depths, dec


def _from_mhs_vm(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, inflate="average", **_):
    sd = _strip_vmunet(sd)
    if "layers.0.blocks.0.self_attention.x_proj_weight" in sd:
        raise CheckpointError(f"{name}: this is a VM-UNet (SS2D) checkpoint, not MHS-VM: use --from vm_unet")
    _require(sd, ["patch_embed.proj.weight", "layers.0.blocks.0.ln_1.weight", "final_conv.weight"],
             "mhs_vm", "MHS-VM (VMUNet with VSSGate / MHSM)", name)
    rest, mapped, origin, heads = _merge_mhs_heads(sd, name)
    if not heads:
        raise CheckpointError(f"{name}: no MHS scan heads (layers.*.blocks.*.self_attention.mhs.scanhead_*): "
                              f"not an MHS-VM checkpoint")
    no_proj = sorted(k[:-len("x_ssproj.weight")] for k in rest if k.endswith(".mhs.x_ssproj.weight")
                     and k[:-len("x_ssproj.weight")] + "y_proj.weight" not in rest)
    if no_proj:
        raise CheckpointError(f"{name}: MHS blocks without cat_norm / y_proj (para_dict 'with_proj': False): our "
                              f"MultiHeadScan always normalises and projects the heads, so these blocks cannot be "
                              f"represented: {_fmt(p + 'y_proj.weight' for p in no_proj)} absent")
    from medmamba.layers.multi_head_scan import DEFAULT_FAMILIES
    fam = list(DEFAULT_FAMILIES[:heads])
    if "families" in net_kwargs and list(net_kwargs["families"]) != fam:
        raise CheckpointError(f"{name}: the official heads scan C, X, S{', Z' if heads == 4 else ''} = {fam}; "
                              f"--net-kwargs families {list(net_kwargs['families'])} would scan other routes")
    if net_kwargs.get("mixer", "mhs") != "mhs":
        raise CheckpointError(f"{name}: an MHS-VM checkpoint needs mixer='mhs', not --net-kwargs mixer "
                              f"{net_kwargs['mixer']!r}")
    if "num_heads" in net_kwargs and int(net_kwargs["num_heads"]) != heads:
        raise CheckpointError(f"{name}: the checkpoint has {heads} scan heads per block, not num_heads="
                              f"{net_kwargs['num_heads']}")
    dims, depths, dec = _vm_unet_dims(rest)
    kw = dict(dims=dims, depths=depths, decoder_depths=dec, num_heads=heads, families=fam,
              d_state=int(next(v for k, v in mapped.items() if k.endswith("mhs.A_logs")).shape[1]))
    kw.update(net_kwargs)
    in_ch = int(rest["patch_embed.proj.weight"].shape[1])
    out_ch = int(rest["final_conv.weight"].shape[0])
    m2, o2 = _map_keys(rest, mhs_vm_key, name, arch)
    mapped.update(m2)
    origin.update(o2)
    make = _net_maker(arch, in_ch, out_ch, kw, seed, name)
    state, notes3 = _convert_2d_then_inflate(make, mapped, origin, name, "mhs_vm", arch, spatial_dims, inflate,
                                             fresh2d=_ds_heads(make(2)), official=mhs_vm_official_key)
    if notes3:
        notes3.append("Multi-Head Scan parameters are copied head by head: in 3D each head scans the 3D routes of "
                      "its family (snake, diagonal, spiral, raster; medmamba.layers.scan_routes)")
    notes = notes3 + [f"threshold (the SRA 'gfu_t' of para_dict) is not stored in the checkpoint: {kw.get('threshold', 0.5)} "
             f"is used (the released config: 0.5 for ISIC18, 0.0 for ISIC17); pass --net-kwargs "
             f"'{{\"threshold\": T}}' with the value of the training config",
             f"decoder.seg_layers.1..: our deep-supervision heads keep their seeded initialisation (seed {seed})"]
    if out_ch == 1:
        notes.append("num_classes 1: the official VMUNet.forward applies a sigmoid; ours returns logits")
    if in_ch == 3:
        notes.append("the official VMUNet.forward repeats a 1-channel input to 3 channels; ours does not")
    return Converted(state, arch, spatial_dims or 2, in_ch, out_ch, _jsonable(kw), notes)


_SS2D_BLOCK = [(r"ln_1\.(weight|bias)$", r"norm.\1"), (r"self_attention\.conv2d\.(weight|bias)$", r"mixer.conv.\1"),
               (r"self_attention\.(in_proj\.weight|out_proj\.weight|out_norm\.weight|out_norm\.bias|x_proj_weight|"
                r"dt_projs_weight|dt_projs_bias|A_logs|Ds)$", r"mixer.\1")]
_SS2D_BLOCK_BACK = [(r"norm\.(.+)$", r"ln_1.\1"), (r"mixer\.conv\.(.+)$", r"self_attention.conv2d.\1"),
                    (r"mixer\.(.+)$", r"self_attention.\1")]


def vm_unet_key(k: str) -> str | None:
    """Official VM-UNet VSSM key (without ``vmunet.``) -> ours in ``VMUNetMHS(mixer="ss2d")`` (None: no counterpart).
    VSSBlock = ln_1 + SS2D ``self_attention`` (VMamba v0 names, as Swin-UMamba's)."""
    blk = _vm_unet_block_prefix(k)
    if blk:
        rest = _first_sub(_SS2D_BLOCK, blk[1])
        return blk[0] + rest if rest else None
    return mhs_vm_key(k)


def vm_unet_official_key(k: str) -> str | None:
    """Our ``VMUNetMHS(mixer="ss2d")`` key -> the official VM-UNet VSSM key, for error messages."""
    m = re.match(r"(encoder|decoder)\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        layer = "layers" if m.group(1) == "encoder" else "layers_up"
        return f"{layer}.{m.group(2)}.blocks.{m.group(3)}.{_first_sub(_SS2D_BLOCK_BACK, m.group(4))}"
    return mhs_vm_official_key(k)


def _vm_unet_load_from(sd: dict, depths, dec_depths) -> tuple[dict, dict, list]:
    """VM-UNet's ``VMUNet.load_from`` on a VMamba v0 ImageNet ``{"model": ...}`` state dict, as our keys:
    the encoder takes every key its modules have (patch_embed, layers.i.blocks.j for j < depths[i],
    layers.i.downsample); decoder stage i takes blocks j < dec_depths[i] of ImageNet layer n-1-i (its
    ``layers.k`` -> ``layers_up.(n-1-k)`` renaming). The rest (ImageNet blocks beyond our depths, norm,
    head) is skipped, as ``load_from``'s ``k in model_dict`` filter does. Returns (mapped, origin, skipped)."""
    n = len(depths)
    mapped, origin, skipped = {}, {}, []
    for k, v in sd.items():
        placed = False
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), _first_sub(_SS2D_BLOCK, m.group(3))
            if rest and i < n and j < depths[i]:
                mapped[f"encoder.stages.{i}.blocks.{j}.{rest}"], placed = v, True
                origin[f"encoder.stages.{i}.blocks.{j}.{rest}"] = k
            d = n - 1 - i
            if rest and 0 <= d < len(dec_depths) and j < dec_depths[d]:
                mapped[f"decoder.stages.{d}.blocks.{j}.{rest}"], placed = v, True
                origin[f"decoder.stages.{d}.blocks.{j}.{rest}"] = k
        else:
            m = re.match(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$", k)
            if m and int(m.group(1)) < n - 1:
                ours = f"encoder.stages.{m.group(1)}.downsample.{m.group(2)}"
                mapped[ours], origin[ours], placed = v, k, True
            m = re.match(r"patch_embed\.(proj|norm)\.(weight|bias)$", k)
            if m:
                ours = f"encoder.patch_embed.{m.group(1)}.{m.group(2)}"
                mapped[ours], origin[ours], placed = v, k, True
        if not placed:
            skipped.append(k)
    return mapped, origin, skipped


def _group_blocks(keys) -> list:
    """Keys with every ``layers.i.blocks.j.<...>`` collapsed to ``layers.i.blocks.j.*`` (order kept, no repeats)."""
    return list(dict.fromkeys(re.sub(r"^(layers\.\d+\.blocks\.\d+)\..*$", r"\1.*", k) for k in keys))


def _from_vm_unet(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, inflate="average", out_channels=2, **_):
    sd = _strip_vmunet(sd)
    _require(sd, ["patch_embed.proj.weight", "layers.0.blocks.0.ln_1.weight"], "vm_unet", "VM-UNet", name)
    if any(".self_attention.mhs." in k for k in sd):
        raise CheckpointError(f"{name}: this is an MHS-VM checkpoint (self_attention.mhs.*): use --from mhs_vm")
    _require(sd, ["layers.0.blocks.0.self_attention.x_proj_weight", "layers.0.blocks.0.self_attention.out_proj.weight"],
             "vm_unet", "VM-UNet (VSS blocks with SS2D 'self_attention')", name)
    if net_kwargs.get("mixer", "ss2d") != "ss2d":
        raise CheckpointError(f"{name}: a VM-UNet checkpoint needs mixer='ss2d', not --net-kwargs mixer "
                              f"{net_kwargs['mixer']!r}")
    imagenet = not any(k.startswith(("layers_up.", "final_conv.", "final_up.")) for k in sd)
    n = _count(sd, r"layers\.(\d+)\.blocks\.")
    dims = [int(sd[f"layers.{i}.blocks.0.ln_1.weight"].shape[0]) for i in range(n)]
    kw = dict(dims=dims, d_state=int(sd["layers.0.blocks.0.self_attention.A_logs"].shape[1]), mixer="ss2d")
    in_ch = int(sd["patch_embed.proj.weight"].shape[1])
    notes = []
    if imagenet:
        # VMamba ImageNet weights as VMUNet.load_from reads them: depths from the VM-UNet config (not the file)
        # (VM-UNet's configs: depths [2, 2, 2, 2], depths_decoder [2, 2, 2, 1], our defaults)
        kw.update(net_kwargs)
        if n != 4 and not {"depths", "decoder_depths"} <= set(kw):
            raise CheckpointError(f"{name}: a {n}-stage VMamba checkpoint; VM-UNet's depths [2, 2, 2, 2] / [2, 2, 2, 1] "
                                  f"need 4 stages: pass --net-kwargs '{{\"depths\": [...], \"decoder_depths\": [...]}}'")
        kw.setdefault("depths", [2, 2, 2, 2])
        kw.setdefault("decoder_depths", [2, 2, 2, 1])
        kw["mixer"] = "ss2d"
        mapped, origin, skipped = _vm_unet_load_from(sd, kw["depths"], kw["decoder_depths"])
        out_ch = out_channels
        notes.append(f"VMamba ImageNet weights loaded as VM-UNet's VMUNet.load_from does: encoder (patch embedding, "
                     f"blocks.j < depths {kw['depths']}, merging) and decoder VSS blocks from ImageNet layers "
                     f"n-1-i; {len(skipped)} ImageNet tensors skipped ({_fmt(_group_blocks(skipped))}); the patch expansions, final "
                     f"expansion and head keep their seeded initialisation (seed {seed})")
    else:
        _require(sd, ["final_conv.weight", "final_up.expand.weight"], "vm_unet", "VM-UNet (VMUNet.vmunet VSSM)", name)
        _, depths, dec = _vm_unet_dims(sd)
        kw.update(depths=depths, decoder_depths=dec)
        kw.update(net_kwargs)
        kw["mixer"] = "ss2d"
        mapped, origin = _map_keys(sd, vm_unet_key, name, arch)
        out_ch = int(sd["final_conv.weight"].shape[0])
    make = _net_maker(arch, in_ch, out_ch, kw, seed, name)
    net2 = make(2)
    ds = _ds_heads(net2)
    fresh = ()
    if imagenet:  # the decoder tensors load_from does not fill keep the seeded initialisation
        fresh = tuple(k for k in net2.state_dict() if k.startswith("decoder.") and k not in mapped)
    state, notes3 = _convert_2d_then_inflate(make, mapped, origin, name, "vm_unet", arch, spatial_dims, inflate,
                                             fresh2d=ds + tuple(fresh), official=vm_unet_official_key)
    notes = notes3 + notes + [f"decoder.seg_layers.1..: our deep-supervision heads keep their seeded initialisation "
                              f"(seed {seed})"]
    if out_ch == 1:
        notes.append("num_classes 1: the official VMUNet.forward applies a sigmoid; ours returns logits")
    if in_ch == 3:
        notes.append("the official VMUNet.forward repeats a 1-channel input to 3 channels; ours does not: feed 3 "
                     "channels (or sum encoder.patch_embed.proj.weight over its input axis for 1-channel images)")
    return Converted(state, arch, spatial_dims or 2, in_ch, out_ch, _jsonable(kw), notes)


# ------------------------------------------------------------------------------------------------
# MambaMIM (FengheTan9/MambaMIM @ 8b96c053): HyMamba checkpoints (models/network/hymamba.py build_hybird).
# main.py saves two files per epoch: ``<model>_ct_pretrained_mambamim_timm_style.pth`` = the SparseEncoder's
# state dict (``embeddings.*``, ``mae.*`` incl. the pretraining ``mae.mask_token``), which the readme loads
# into build_hybird with strict=False (the published ``mambamim_mask75.pth``, 87 MB, is this encoder-only
# kind: 22.7M float32 tensors = 86.7 MiB), and ``<model>_withdecoder_ct_pretrained.pth`` = {"module":
# MambaMIM state dict (``sparse_encoder.embeddings.*``, ``sparse_encoder.mae.*``, light decoder
# ``dense_decoder.*``, ``densify_projs.*``, ``mask_tokens.*``, ``A_interpolation``, "config"), "optimizer",
# "args", "arch", "epoch", ...}. A fine-tuned Hybird state dict (``embeddings.*``, ``mae.*``, ``decoder.*``)
# is read too (e.g. under "state_dict", as the UNETR BTCV pipeline the readme points to saves it).
# ------------------------------------------------------------------------------------------------

#: pretraining-only parts of a MambaMIM checkpoint (dropped, named in the notes)
_MAMBAMIM_PRETRAIN = ("dense_decoder.", "densify_projs.", "densify_norms.", "mask_tokens.", "A_interpolation")


def _hymamba_kwargs(sd: dict, name: str) -> dict:
    """build_hybird's keywords read from the tensors (channels, depths, kernels, exp_r, Mamba depth/state, grid)."""
    channels = [int(sd["embeddings.stem.weight"].shape[0])] + \
        [int(sd[f"embeddings.expend{i}.weight"].shape[0]) for i in range(1, 5)]
    depths, kernels, exp_r = [1], [3], [2]  # entry 0: unused by the network (build_hybird's values)
    for i in range(2, 6):
        n = _count(sd, rf"embeddings\.layer{i}\.(\d+)\.")
        depths.append(n)
        if n:
            kernels.append(int(sd[f"embeddings.layer{i}.0.conv1.weight"].shape[-1]))
            exp_r.append(int(sd[f"embeddings.layer{i}.0.conv2.weight"].shape[0]) // channels[i - 1])
        else:
            kernels.append(3)
            exp_r.append(4)
    kw = dict(channels=channels, depths=depths, kernels=kernels, exp_r=exp_r,
              mamba_depth=_count(sd, r"mae\.blocks\.(\d+)\."))
    if "mae.blocks.0.mamba.A_log" in sd:
        a = sd["mae.blocks.0.mamba.A_log"]
        kw["d_state"] = int(a.shape[1])
        kw["expand"] = int(a.shape[0]) // channels[4]
        kw["d_conv"] = int(sd["mae.blocks.0.mamba.conv1d.weight"].shape[-1])
    if "mae.pos_embed" in sd:
        n = int(sd["mae.pos_embed"].shape[1])
        g = round(n ** (1 / 3))
        if g ** 3 != n:
            raise CheckpointError(f"{name}: mae.pos_embed has {n} tokens, not a cubic grid (MambaMIM builds g^3)")
        kw["img_size"] = 16 * g
    return kw


def _from_mambamim(sd, ckpt, arch, spatial_dims, net_kwargs, name, seed=0, out_channels=2, **_):
    fmt = ckpt.get("format") if isinstance(ckpt, Mapping) else None
    if isinstance(fmt, str) and fmt.startswith("medmamba.pretrain"):
        raise CheckpointError(f"{name}: a medmamba pretraining checkpoint ({fmt}): it needs no conversion; use its "
                              f"exported network_weights with nnUNetv2_train -pretrained_weights (docs/pretraining.md)")
    if spatial_dims not in (None, 3):
        raise CheckpointError(f"{name}: HyMamba is 3D only; --spatial-dims {spatial_dims} is not possible")
    notes = []
    if any(k.startswith("sparse_encoder.") for k in sd):  # the with-decoder pretraining file
        dropped = sorted(k for k in sd if not k.startswith("sparse_encoder."))
        other = [k for k in dropped if not k.startswith(_MAMBAMIM_PRETRAIN)]
        if other:
            raise CheckpointError(f"{name}: a MambaMIM pretraining state dict with keys outside sparse_encoder.* "
                                  f"and the pretraining decoder: {_fmt(other)}")
        sd = {k[len("sparse_encoder."):]: v for k, v in sd.items() if k.startswith("sparse_encoder.")}
        if sd and all(k.startswith("sp_cnn.") for k in sd):  # SparK / HySparK's layout (sparse_encoder.sp_cnn.*)
            sd = {k[len("sp_cnn."):]: v for k, v in sd.items()}
        if dropped:
            groups = list(dict.fromkeys(re.sub(r"^(dense_decoder|densify_projs|densify_norms|mask_tokens)\..*$",
                                               r"\1.*", k) for k in dropped))
            notes.append(f"MambaMIM pretraining-only tensors dropped ({len(dropped)}: {', '.join(groups)}): the "
                         f"reconstruction decoder, densify projections, mask tokens and TOKI's A_interpolation")
    if not any(k.startswith(("embeddings.", "mae.")) for k in sd):
        hint = ""
        if any(k.startswith(("encoder.", "mamba_layer.", "decoder.seg_layers")) for k in sd):
            hint = " (it looks like one of our networks' state dicts: a medmamba checkpoint needs no conversion)"
        raise CheckpointError(f"{name}: not a MambaMIM (HyMamba) checkpoint: no embeddings.* / mae.* keys{hint}; "
                              f"its first keys are {_fmt(sorted(sd)[:8])}")
    _require(sd, ["embeddings.stem.weight"] + [f"embeddings.expend{i}.weight" for i in range(1, 5)],
             "mambamim", "MambaMIM HyMamba", name)
    if "mae.mask_token" in sd:
        sd = {k: v for k, v in sd.items() if k != "mae.mask_token"}
        notes.append("mae.mask_token dropped: MambaMIM's pretraining mask token (the segmentation network, "
                     "build_hybird, has none)")
    kw = _hymamba_kwargs(sd, name)
    kw.update(net_kwargs)
    in_ch = int(sd["embeddings.stem.weight"].shape[1])
    has_dec = any(k.startswith("decoder.") for k in sd)
    out_ch = int(sd["decoder.out.conv.weight"].shape[0]) if "decoder.out.conv.weight" in sd else out_channels
    make = _net_maker(arch, in_ch, out_ch, kw, seed, name)
    net = make(3)
    fresh = ("decoder.ds_heads.",)
    if not has_dec:
        fresh = ("decoder.",)
        notes.append(f"encoder-only checkpoint (embeddings.*, mae.*): the segmentation decoder (decoder.decoder5..1, "
                     f"decoder.out: {out_ch} classes) keeps its seeded initialisation (seed {seed}), as build_hybird "
                     f"+ load_state_dict(strict=False) leaves it in MambaMIM's fine-tuning")
    else:
        notes.append(f"decoder.ds_heads.*: our deep-supervision heads (not in the official network) keep their "
                     f"seeded initialisation (seed {seed}); unused without deep supervision")
    if "mae.pos_embed" in sd:
        ref = net.state_dict()["mae.pos_embed"]
        if ref.shape == sd["mae.pos_embed"].shape and not torch.allclose(sd["mae.pos_embed"].float(), ref, atol=1e-5):
            notes.append("mae.pos_embed differs from the fixed 3D sin-cos embedding: the checkpoint's values are kept "
                         "(used at the img_size grid; other grids use the formula)")
    mapped = dict(sd)
    origin = {k: k for k in sd}
    state = _assemble(net, mapped, origin, name, "mambamim", arch, fresh=fresh)
    return Converted(state, arch, 3, in_ch, out_ch, _jsonable(kw), notes)


# ------------------------------------------------------------------------------------------------

_CONVERTERS: dict[str, Callable] = {
    "umamba": _from_umamba,
    "lightm_unet": _from_lightm_unet,
    "swin_umamba": _from_swin_umamba,
    "vmamba": _from_vmamba,
    "msvm_unet": _from_msvm_unet,
    "mhs_vm": _from_mhs_vm,
    "vm_unet": _from_vm_unet,
    "mambamim": _from_mambamim,
}


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def fold_input_channels(conv: Converted, in_channels: int, name: str = "<checkpoint>") -> Converted:
    """``conv`` for a 1-channel input: every tensor that reads the network's input summed over its input axis.

    Convolutions and linear maps are linear in their input, so a network with summed input weights computes on a
    1-channel image exactly what the checkpoint's network computes on that image repeated C times: the official
    MSVM-UNet and VM-UNet forwards repeat 1-channel inputs to 3, and a 3-channel ImageNet-shaped stem is otherwise
    unusable for CT (nnU-Net's ``-pretrained_weights`` refuses the shape). Only C -> 1 is exact; other changes
    are refused. The tensors are found by shape: those that differ from our 1-channel network's only in axis 1.
    """
    have = conv.in_channels
    if in_channels != 1:
        raise CheckpointError(
            f"{name}: the checkpoint's network reads {have} input channels; --in-channels {in_channels} cannot be "
            f"made from it exactly (only {have} -> 1, by summing the input weights, computes what repeating a "
            f"1-channel image {have} times computes). Omit --in-channels to keep {have}.")
    try:
        torch.manual_seed(0)
        ours = nets.create(conv.arch, 1, conv.out_channels, conv.spatial_dims, **conv.net_kwargs)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    target = ours.state_dict()
    state, folded = dict(conv.state_dict), []
    for key, value in conv.state_dict.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            continue
        if (value.dim() >= 2 and value.shape[1] == have and want.shape[1] == 1
                and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]):
            state[key] = value.sum(1, keepdim=True)
            folded.append(key)
        else:
            raise CheckpointError(f"{name}: {key} {tuple(value.shape)} depends on the input channels in a way "
                                  f"summation cannot fold (ours with 1 input channel: {tuple(want.shape)})")
    try:
        ours.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: after folding the input channels the weights do not load: {exc}") from None
    notes = list(conv.notes) + [
        f"input channels folded {have} -> 1: {', '.join(folded)} summed over the input axis (computes on a "
        f"1-channel image what the checkpoint computes on it repeated {have} times, as the official forward "
        f"of MSVM-UNet / VM-UNet does)"]
    return Converted(state, conv.arch, conv.spatial_dims, 1, conv.out_channels, conv.net_kwargs, notes)


def convert(source: str, ckpt, arch: str, spatial_dims: int | None = None, net_kwargs: dict | None = None,
            seed: int = 0, inflate: str = "average", in_channels: int | None = None,
            out_channels: int = 2) -> Converted:
    """Convert an official checkpoint (path or loaded object) of ``source`` into a state dict of ``arch``.

    ``in_channels``: for encoder-only sources (``vmamba``) our network's input channels (default 1); for a
    checkpoint that fixes them (e.g. 3), 1 folds the input weights (:func:`fold_input_channels`), None keeps
    them. ``out_channels`` only matters for encoder-only sources. ``spatial_dims=3`` on a 2D-only network
    inflates (``inflate``: average|centre).
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if arch not in SOURCES[source]:
        if source == "mambamim":
            raise CheckpointError(f"source 'mambamim': MambaMIM checkpoints are HyMamba networks (MambaMIM's "
                                  f"build_hybird encoder), so they convert to --arch hymamba only, not {arch!r}")
        raise CheckpointError(f"source '{source}' converts to {', '.join(SOURCES[source])}, not {arch!r}")
    if spatial_dims not in (None, 2, 3):
        raise CheckpointError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if inflate not in ("average", "centre"):
        raise CheckpointError(f"inflate must be 'average' or 'centre', got {inflate!r}")
    name = str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else "<checkpoint>"
    obj = load_checkpoint(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    sd = extract_state_dict(obj, name)
    converted = _CONVERTERS[source](sd, obj if isinstance(obj, Mapping) else {}, arch, spatial_dims,
                                    dict(net_kwargs or {}), name, seed=seed, inflate=inflate,
                                    in_channels=1 if in_channels is None else in_channels,
                                    out_channels=out_channels)
    if in_channels is not None and converted.in_channels != in_channels:
        converted = fold_input_channels(converted, in_channels, name)
    return converted


def save(converted: Converted, out, overwrite: bool = False, source: str = "", ckpt_name: str = "") -> Path:
    """Write ``{"network_weights": ..., "medmamba_weights": {...}}`` atomically; never overwrite silently."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"network_weights": converted.state_dict,
               "medmamba_weights": {"arch": converted.arch, "spatial_dims": converted.spatial_dims,
                                    "in_channels": converted.in_channels, "out_channels": converted.out_channels,
                                    "net_kwargs": converted.net_kwargs, "source": source,
                                    "checkpoint": ckpt_name, "notes": list(converted.notes)}}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
