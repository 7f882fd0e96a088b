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

__all__ = ["CheckpointError", "Converted", "SOURCES", "convert", "inflate_2d_to_3d", "load_checkpoint", "save"]

#: source name -> registry names it can produce
SOURCES = {
    "umamba": ("umamba_bot", "umamba_enc"),
    "lightm_unet": ("lightm_unet",),
    "swin_umamba": ("swin_umamba",),
    "vmamba": ("swin_umamba",),
    "msvm_unet": ("msvm_unet",),
    "vm_unet": ("vm_unet_mhs",),
    "mhs_vm": ("vm_unet_mhs",),
    "mambamim": ("umamba_bot", "umamba_enc", "swin_umamba"),
}
_NOT_WRITTEN = ("msvm_unet", "vm_unet", "mhs_vm", "mambamim")
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


def _clean(k: str) -> str:
    for p in ("module.", "_orig_mod."):
        while k.startswith(p):
            k = k[len(p):]
    return k.replace("._orig_mod.", ".")


def _state_dict(ckpt, name: str) -> dict:
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name}: expected a checkpoint dict, got {type(ckpt).__name__}")
    for key in ("network_weights", "model", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            sd = ckpt[key]
            break
    else:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            sd = ckpt
        else:
            raise CheckpointError(f"{name}: no 'network_weights' (nnU-Net), 'model' or 'state_dict' in the checkpoint; "
                                  f"its keys are {sorted(map(str, ckpt))[:10]}")
    return {_clean(str(k)): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


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
              fresh: tuple = ()) -> dict:
    """Load ``mapped`` (our key -> tensor) into ``net`` strictly; keys under ``fresh`` prefixes may be
    absent (they keep the network's seeded initialisation). ``origin``: our key -> official key."""
    ours = net.state_dict()
    inv = {v: k for k, v in origin.items()}
    unexpected = [origin.get(k, k) for k in mapped if k not in ours]
    missing = [k for k in ours if k not in mapped and not any(k.startswith(p) for p in fresh)]
    if missing or unexpected:
        msg = f"{name}: the checkpoint does not fit {arch} (source '{source}')."
        if missing:
            msg += f" Missing in the checkpoint ({len(missing)}): {_fmt(inv.get(k, k) for k in missing)}."
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


def inflate_2d_to_3d(key: str, t: torch.Tensor, shape3d, mode: str = "average") -> torch.Tensor:
    """A 2D tensor of our 2D network -> the tensor of the same key in our 3D network (documented rules).

    * conv kernels (out, in, kH, kW) get a depth axis of size kD in front of kH: ``average`` repeats the
      kernel kD times divided by kD (a depth-constant input gives the 2D response away from the depth
      borders); ``centre`` puts it in the middle slice, zeros elsewhere (odd kD; even kD falls back to
      average). Non-overlapping patch convs (kernel = stride, ``patch_embed.proj``) are always averaged,
      transposed convs (``transp_conv``) are repeated without division (each output voxel gets exactly
      one contribution, as in 2D).
    * patch merging: 3D channel block 2k + i (i the depth offset) takes 2D block k
      (``medmamba.nets.vss.merge_order``): LayerNorm(4C) weights repeated per depth offset, Linear
      4C -> 2C split over the two depth offsets (halved), so a depth-constant input merges exactly as
      in 2D.
    * cross-scan per-route parameters: the 6 3D routes take, in order, the 2D routes
      (row-major, column-major, column-major, and the same reversed): W fastest <- row-major,
      H fastest <- column-major, and the new D-fastest route <- column-major too.
    * everything else (linear layers, norms, Mamba parameters) is copied; its shape does not change.
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
    if re.search(r"downsamples\.\d+\.norm\.(weight|bias)$", key):
        c = t.shape[0] // 4
        return t.view(4, c).repeat_interleave(2, dim=0).reshape(shape3d)
    if re.search(r"downsamples\.\d+\.reduction\.weight$", key):
        o, c = t.shape[0], t.shape[1] // 4
        return (t.view(o, 4, c).repeat_interleave(2, dim=1) / 2).reshape(shape3d)
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


def _inflate_state(sd2d: dict, net3d: torch.nn.Module, mode: str) -> dict:
    ours = net3d.state_dict()
    return {k: inflate_2d_to_3d(k, v, ours[k].shape, mode) if k in ours else v for k, v in sd2d.items()}


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

_CONVERTERS: dict[str, Callable] = {
    "umamba": _from_umamba,
    "lightm_unet": _from_lightm_unet,
    "swin_umamba": _from_swin_umamba,
    "vmamba": _from_vmamba,
}


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def convert(source: str, ckpt, arch: str, spatial_dims: int | None = None, net_kwargs: dict | None = None,
            seed: int = 0, inflate: str = "average", in_channels: int = 1, out_channels: int = 2) -> Converted:
    """Convert an official checkpoint (path or loaded object) of ``source`` into a state dict of ``arch``.

    ``in_channels``/``out_channels`` only matter for encoder-only sources (``vmamba``): the other
    checkpoints fix them. ``spatial_dims=3`` on a 2D-only network inflates (``inflate``: average|centre).
    """
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if arch not in SOURCES[source]:
        raise CheckpointError(f"source '{source}' converts to {', '.join(SOURCES[source])}, not {arch!r}")
    if source in _NOT_WRITTEN:
        raise CheckpointError(f"the '{source}' converter is not written yet (see docs/model_card.md); "
                              f"available: {', '.join(_CONVERTERS)}")
    if spatial_dims not in (None, 2, 3):
        raise CheckpointError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if inflate not in ("average", "centre"):
        raise CheckpointError(f"inflate must be 'average' or 'centre', got {inflate!r}")
    name = str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else "<checkpoint>"
    obj = load_checkpoint(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    sd = _state_dict(obj, name)
    return _CONVERTERS[source](sd, obj if isinstance(obj, Mapping) else {}, arch, spatial_dims,
                               dict(net_kwargs or {}), name, seed=seed, inflate=inflate,
                               in_channels=in_channels, out_channels=out_channels)


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
