"""VMamba-style building blocks for 2D and 3D networks (Swin-UMamba, VM-UNet, MSVM-UNet).

Convention: every module here works on CHANNELS-LAST tensors ``(B, *S, C)`` (S = (H, W) or
(D, H, W)), as VMamba does, except ``PatchEmbed`` whose input is the usual channels-first image
``(B, C_in, *S)`` (its output is channels-last). Use ``to_channels_first`` / ``to_channels_last`` at
the boundaries with convolutional code.

API (stable):

* ``to_channels_last(x)``: (B, C, *S) -> (B, *S, C); ``to_channels_first(x)``: the inverse.
* ``PatchEmbed(in_channels, embed_dim, spatial_dims=3, patch_size=4, norm=True)``: conv with
  kernel = stride = patch_size, then LayerNorm; (B, C_in, *S) -> (B, *S/p, embed_dim).
* ``PatchMerging(dim, spatial_dims=3, out_dim=None)``: concatenates each 2^d neighbourhood,
  LayerNorm(2^d dim), Linear(2^d dim -> out_dim = 2 dim, no bias); odd sizes are zero-padded first.
  (B, *S, dim) -> (B, *ceil(S/2), out_dim). Neighbour order as VMamba's / Swin-UMamba's / MHS-VM's
  ``PatchMerging2D``: the FIRST spatial axis varies fastest, 2D: x[0::2, 0::2], x[1::2, 0::2],
  x[0::2, 1::2], x[1::2, 1::2] (``merge_order(spatial_dims)``); 3D: the same rule, (d, h, w) offsets
  (0,0,0), (1,0,0), (0,1,0), (1,1,0), (0,0,1), ..., so 3D block 2k + i is 2D block k at depth offset i
  (what ``medmamba.weights`` uses to inflate 2D merging weights).
* ``PatchExpand(dim, spatial_dims=3, scale=2, out_dim=None)``: Linear(dim -> scale^d * out_dim, no bias)
  then pixel shuffle by ``scale`` per axis, then LayerNorm(out_dim). Default out_dim = dim // 2 for
  scale 2 (2D: Linear dim -> 2 dim; 3D: Linear dim -> 4 dim), and dim // scale in general.
  (B, *S, dim) -> (B, *S*scale, out_dim).
* ``FinalPatchExpand(dim, spatial_dims=3, out_dim=None)``: PatchExpand with scale 4, default
  out_dim = dim // 4 (2D: Linear dim -> 4 dim as in VM-UNet; 3D: Linear dim -> 16 dim).
* ``Mlp(dim, hidden_dim, act=nn.GELU, drop=0.0)``: Linear - act - Linear (channels-last).
* ``VSSBlock(dim, spatial_dims=3, drop_path=0.0, mixer=None, mlp_ratio=0.0, ffn=None, d_state=16,
  norm_eps=1e-5, **mixer_kwargs)``: ``x = x + DropPath(mixer(LN(x)))`` and, when ``mlp_ratio > 0`` or
  ``ffn`` is given, ``x = x + DropPath(ffn(LN(x)))``. ``mixer``: None -> ``CrossScan(dim, spatial_dims,
  d_state=d_state, **mixer_kwargs)``; an ``nn.Module`` (channels-last in and out); or a callable
  ``(dim, spatial_dims) -> nn.Module``. ``ffn``: None -> ``Mlp(dim, int(dim * mlp_ratio))`` when
  ``mlp_ratio > 0``; an ``nn.Module``; or a callable ``(dim, spatial_dims) -> nn.Module``.
* ``VSSLayer(dim, depth, spatial_dims=3, drop_path=0.0 (float or list), downsample=None, **block_kwargs)``:
  ``depth`` VSSBlocks (``mixer``/``ffn`` given as factories are called once per block), then the
  optional ``downsample`` module. Attributes ``blocks`` (ModuleList) and ``downsample``.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import DropPath

from medmamba.layers.cross_scan import CrossScan

__all__ = ["FinalPatchExpand", "Mlp", "PatchEmbed", "PatchExpand", "PatchMerging", "VSSBlock", "VSSLayer",
           "merge_order", "to_channels_first", "to_channels_last"]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1)


def _check_dims(name, spatial_dims):
    if spatial_dims not in (2, 3):
        raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _check_last(name, x, spatial_dims, dim):
    if x.dim() != spatial_dims + 2 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected a channels-last tensor (B, *spatial[{spatial_dims}], C={dim}), "
                         f"got shape {tuple(x.shape)}")


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv k = s = patch_size + LayerNorm; channels-first in, channels-last out."""

    def __init__(self, in_channels: int, embed_dim: int, spatial_dims: int = 3, patch_size=4, norm: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        _check_dims("PatchEmbed", spatial_dims)
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"PatchEmbed: expected a channels-first ({self.spatial_dims + 2}D) tensor, "
                             f"got shape {tuple(x.shape)}")
        return self.norm(to_channels_last(self.proj(x)))


class PatchMerging(nn.Module):
    """2^d neighbours concatenated, LayerNorm(2^d C), Linear 2^d C -> 2C (Swin / VMamba downsampling)."""

    def __init__(self, dim: int, spatial_dims: int = 3, out_dim: int | None = None, norm_eps: float = 1e-5):
        super().__init__()
        _check_dims("PatchMerging", spatial_dims)
        self.dim = dim
        self.spatial_dims = spatial_dims
        self.out_dim = out_dim if out_dim is not None else 2 * dim
        k = 2 ** spatial_dims
        self.norm = nn.LayerNorm(k * dim, eps=norm_eps)
        self.reduction = nn.Linear(k * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last("PatchMerging", x, self.spatial_dims, self.dim)
        spatial = x.shape[1:-1]
        pad = []
        for s in reversed(spatial):  # F.pad lists the last dimension first; channels (last) unpadded
            pad += [0, s % 2]
        if any(pad):
            x = F.pad(x, [0, 0] + pad)
        x = torch.cat([x[(slice(None),) + tuple(slice(o, None, 2) for o in offsets)]
                       for offsets in merge_order(self.spatial_dims)], dim=-1)
        return self.reduction(self.norm(x))


def merge_order(spatial_dims: int) -> list[tuple[int, ...]]:
    """Neighbour offsets of ``PatchMerging``'s channel blocks, in order: the first axis varies fastest.

    2D: [(0, 0), (1, 0), (0, 1), (1, 1)] as VMamba's ``PatchMerging2D`` (x0 = x[0::2, 0::2], x1 =
    x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2]).
    """
    return [tuple(reversed(o)) for o in itertools.product((0, 1), repeat=spatial_dims)]


def _space_to_depth_last(x: torch.Tensor, scale: int, spatial_dims: int) -> torch.Tensor:
    """(B, *S, C) -> (B, *S/scale, scale^d * C), channels-last; channel layout (r0, r1, [r2,] C), C fastest."""
    b, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    small = [s // scale for s in spatial]
    view = [b]
    for s in small:
        view += [s, scale]
    x = x.reshape(*view, c)
    n = spatial_dims
    # (B, s0, r0, s1, r1, [s2, r2,] C) -> (B, s0, s1, [s2,] r0, r1, [r2,] C)
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]
    return x.permute(order).reshape(b, *small, (scale ** n) * c)


def _pixel_shuffle_last(x: torch.Tensor, scale: int, spatial_dims: int) -> torch.Tensor:
    """(B, *S, scale^d * C) -> (B, *S*scale, C), channels-last; inverse of ``_space_to_depth_last``."""
    b, spatial, c_all = x.shape[0], x.shape[1:-1], x.shape[-1]
    c = c_all // scale ** spatial_dims
    x = x.reshape(b, *spatial, *([scale] * spatial_dims), c)
    n = spatial_dims
    # (B, s0, s1, [s2,] r0, r1, [r2,] C) -> (B, s0, r0, s1, r1, [s2, r2,] C)
    order = [0]
    for i in range(n):
        order += [1 + i, 1 + n + i]
    order.append(1 + 2 * n)
    return x.permute(order).reshape(b, *[s * scale for s in spatial], c)


class PatchExpand(nn.Module):
    """Linear dim -> scale^d * out_dim, pixel shuffle by ``scale`` per axis, LayerNorm(out_dim)."""

    def __init__(self, dim: int, spatial_dims: int = 3, scale: int = 2, out_dim: int | None = None,
                 norm_eps: float = 1e-5):
        super().__init__()
        _check_dims("PatchExpand", spatial_dims)
        if out_dim is None:
            if dim % scale:
                raise ValueError(f"PatchExpand: dim={dim} is not divisible by scale={scale}; pass out_dim")
            out_dim = dim // scale
        self.dim, self.out_dim, self.scale, self.spatial_dims = dim, out_dim, scale, spatial_dims
        self.expand = nn.Linear(dim, (scale ** spatial_dims) * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last(type(self).__name__, x, self.spatial_dims, self.dim)
        return self.norm(_pixel_shuffle_last(self.expand(x), self.scale, self.spatial_dims))


class FinalPatchExpand(PatchExpand):
    """x4 patch expansion (default out_dim = dim // 4)."""

    def __init__(self, dim: int, spatial_dims: int = 3, out_dim: int | None = None, norm_eps: float = 1e-5):
        super().__init__(dim, spatial_dims, scale=4, out_dim=out_dim, norm_eps=norm_eps)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _make(spec, dim, spatial_dims):
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec(dim, spatial_dims)
        if not isinstance(module, nn.Module):
            raise TypeError(f"VSSBlock: factory {spec!r} returned {type(module).__name__}, not an nn.Module")
        return module
    raise TypeError(f"VSSBlock: expected None, an nn.Module or a factory (dim, spatial_dims) -> nn.Module, got {spec!r}")


class VSSBlock(nn.Module):
    """x + DropPath(mixer(LN x)) [then x + DropPath(ffn(LN x))]; channels-last.

    LayerNorm eps 1e-5: the official VMamba / Swin-UMamba / MSVM-UNet / MHS-VM layers pass
    ``norm_layer=nn.LayerNorm`` to their blocks (the 1e-6 default of VMamba's ``VSSBlock`` signature is
    overridden there).
    """

    def __init__(self, dim: int, spatial_dims: int = 3, drop_path: float = 0.0, mixer=None, mlp_ratio: float = 0.0,
                 ffn=None, d_state: int = 16, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        _check_dims("VSSBlock", spatial_dims)
        self.dim = dim
        self.spatial_dims = spatial_dims
        if mixer is None:
            mixer = CrossScan(dim, spatial_dims=spatial_dims, d_state=d_state, **mixer_kwargs)
        elif mixer_kwargs:
            raise TypeError(f"VSSBlock: mixer keyword arguments {sorted(mixer_kwargs)} only apply to the default "
                            f"CrossScan mixer")
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = _make(mixer, dim, spatial_dims)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        ffn = _make(ffn, dim, spatial_dims)
        if ffn is None and mlp_ratio and mlp_ratio > 0:
            ffn = Mlp(dim, int(dim * mlp_ratio))
        self.ffn = ffn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if ffn is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last("VSSBlock", x, self.spatial_dims, self.dim)
        x = x + self.drop_path(self.mixer(self.norm(x)))
        if self.ffn is not None:
            x = x + self.drop_path(self.ffn(self.norm2(x)))
        return x


class VSSLayer(nn.Module):
    """``depth`` VSSBlocks (stochastic depth per block) followed by an optional downsample module."""

    def __init__(self, dim: int, depth: int, spatial_dims: int = 3, drop_path: float | Sequence[float] = 0.0,
                 downsample: nn.Module | None = None, **block_kwargs):
        super().__init__()
        for key in ("mixer", "ffn"):
            if isinstance(block_kwargs.get(key), nn.Module) and depth > 1:
                raise TypeError(f"VSSLayer: pass {key} as a factory (dim, spatial_dims) -> nn.Module, not a module "
                                f"instance, so that each of the {depth} blocks gets its own")
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * depth
        if len(rates) != depth:
            raise ValueError(f"VSSLayer: {len(rates)} drop-path rates for depth {depth}")
        self.blocks = nn.ModuleList(VSSBlock(dim, spatial_dims, drop_path=r, **block_kwargs) for r in rates)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x
