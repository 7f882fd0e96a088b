"""Swin-UMamba and Swin-UMamba-dagger ("D"), in 2D (as published) and 3D.

API (stable):

* ``SwinUMamba(in_channels, out_channels, spatial_dims=3, feature_size=48, dims=(96, 192, 384, 768),
  depths=(2, 2, 9, 2), drop_path_rate=0.2, deep_supervision=False, d_state=16, norm_name="instance",
  block_kwargs=None, **nnunet_kwargs)``. ``block_kwargs``: extra ``VSSBlock`` keywords for every VSS
  block (e.g. ``{"routes": [...]}`` for the CrossScan mixer, or ``{"mixer": factory}``).
  Conv stem (k7 s2, in -> feature_size, InstanceNorm) -> VMamba encoder (PatchEmbed 2x2 s2 -> dims[0],
  VSS stages, PatchMerging between them); encoder features 48@H/2, 96@H/4, 192@H/8, 384@H/16,
  768@H/32 (defaults). UNETR-style residual skip blocks: in -> 48 on the input (H), 48 -> 96 on the
  stem output (H/2), 96 -> 192 (H/4), 192 -> 384 (H/8), 384 -> 768 (H/16); decoder of transposed
  conv k2 s2 + concat + residual block 768@H/32 -> 768@H/16 -> 384 -> 192 -> 96@H/2 -> 48@H, a last
  residual block at H, 1x1 heads. Deep-supervision outputs at H, H/2, H/4, H/8 (highest resolution
  first). Default 2D size: 59.88M parameters (published: 59.89M).
* ``SwinUMambaD(..., decoder_depth=2, final_dim=None)`` (same arguments; ``feature_size`` unused):
  PatchEmbed 4x4 -> dims[0] at H/4, the same VSS encoder, a Mamba decoder (per level: PatchExpand,
  concat skip, Linear 2C -> C, ``decoder_depth`` VSS blocks, stochastic depth decreasing from
  ``drop_path_rate`` to 0), FinalPatchExpand x4 -> ``final_dim`` channels (default dims[0] in 2D as
  published, dims[0] // 4 in 3D to bound memory) and a 1x1 head at H. Deep-supervision outputs at H,
  H/4, H/8, H/16 (1x1 heads on the decoder levels). Default 2D size: 27.49M (published: 27.50M).
* Both: input ``(B, C_in, *S)`` with every spatial size divisible by 32 (``divisor`` attribute),
  output ``(B, out_channels, *S)`` or, with deep supervision, a list of such tensors at the scales
  above. ``net.decoder.deep_supervision`` (and ``net.deep_supervision``) can be toggled after
  construction (nnU-Net does so). Submodules: ``encoder`` (returns channels-first features, highest
  resolution first), ``decoder``. ``ds_scales``: the downsampling factor of each DS output.
* nnU-Net keywords: ``input_channels``/``num_classes`` (aliases of ``in_channels``/``out_channels``),
  ``deep_supervision`` and the ``dynamic_network_architectures`` set (``n_stages, features_per_stage,
  conv_op, kernel_sizes, strides, n_conv_per_stage, n_conv_per_stage_decoder, n_blocks_per_stage,
  conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs``).
  ``spatial_dims`` comes from ``conv_op``; ``norm_op`` (instance/batch) picks the norm of the UNETR
  blocks; ``strides`` are validated against the fixed isotropic topology (see ``_check_plan_strides``);
  the remaining plans keywords (channels, kernels, blocks, dropout, nonlinearity) do not apply to this
  topology and are accepted and ignored.

Channels-last is used inside the VSS encoder/decoder (see ``medmamba.layers.vss``); everything a
caller sees is channels-first.
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

from medmamba.nets.conventions import (DecoderOwnsDeepSupervision, DeepSupervisionSwitch, check_input,
                                        resolve_channels, resolve_spatial_dims)
from medmamba.layers.vss import (FinalPatchExpand, PatchEmbed, PatchExpand, PatchMerging, VSSLayer,
                               to_channels_first, to_channels_last)

__all__ = ["SwinUMamba", "SwinUMambaD", "VSSEncoder"]

# nnU-Net keywords that do not apply to this topology: accepted (plans always pass them) and ignored.
_IGNORED_PLAN_KEYS = ("features_per_stage", "kernel_sizes", "n_conv_per_stage", "n_conv_per_stage_decoder",
                      "n_blocks_per_stage", "conv_bias", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
                      "nonlin", "nonlin_kwargs")


def _norm_name(cls_name, norm_op):
    if norm_op is None:
        return None
    op = pydoc.locate(norm_op) if isinstance(norm_op, str) else norm_op
    name = getattr(op, "__name__", str(op)).lower()
    if "instancenorm" in name:
        return "instance"
    if "batchnorm" in name:
        return "batch"
    raise ValueError(f"{cls_name}: norm_op {norm_op!r} is not supported; use InstanceNorm or BatchNorm")


def _check_plan_strides(cls_name, strides, n_stages, spatial_dims, out_scales, total, deep_supervision):
    """Refuse nnU-Net plans strides this fixed topology cannot follow.

    Accepted: isotropic strides whose product is ``total`` and, with deep supervision, whose cumulative
    products (the scales nnU-Net downsamples the targets to) start with ``out_scales``.
    """
    if strides is None:
        if n_stages is not None and n_stages < len(out_scales) + 1:
            raise ValueError(f"{cls_name}: n_stages={n_stages} is too few for this topology")
        return
    rows = []
    for s in strides:
        row = [int(v) for v in s] if isinstance(s, (list, tuple)) else [int(s)] * spatial_dims
        if len(row) != spatial_dims:
            raise ValueError(f"{cls_name}: stride {s!r} does not have {spatial_dims} entries")
        rows.append(row)
    if n_stages is not None and n_stages != len(rows):
        raise ValueError(f"{cls_name}: n_stages={n_stages} but {len(rows)} strides were given")
    cum = np.cumprod(np.array(rows), axis=0)
    scales = [int(v) for v in cum[:, 0]]
    ok = all(len(set(r)) == 1 for r in cum.tolist()) and scales[-1] == total
    if ok and deep_supervision:
        ok = scales[:len(out_scales)] == list(out_scales)
    if not ok:
        example = [1] + [out_scales[i + 1] // out_scales[i] for i in range(len(out_scales) - 1)]
        rest = total // out_scales[-1]
        while rest > 1:
            example.append(2)
            rest //= 2
        raise ValueError(
            f"{cls_name}: the plans strides {rows} cannot be followed. This network downsamples every axis "
            f"by a fixed total of {total} (isotropic) and its deep-supervision outputs are at scales "
            f"{list(out_scales)}; nnU-Net derives the target scales from the strides, so use e.g. strides "
            f"{[[s] * spatial_dims for s in example]} (cumulative {list(np.cumprod(example))}) with a patch size "
            f"divisible by {total}.")


class VSSEncoder(nn.Module):
    """Optional conv stem + PatchEmbed + VSS stages with PatchMerging; returns channels-first features.

    Features, highest resolution first: [stem output (if a stem)] + one per VSS stage (before merging).
    """

    def __init__(self, in_channels: int, spatial_dims: int, dims: Sequence[int], depths: Sequence[int],
                 patch_size: int, stem_channels: int | None = None, drop_path_rate: float = 0.2, d_state: int = 16,
                 block_kwargs: dict | None = None):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.stem = None
        if stem_channels:
            self.stem = nn.Sequential(conv(in_channels, stem_channels, 7, stride=2, padding=3),
                                      norm(stem_channels, eps=1e-5, affine=True))
        self.patch_embed = PatchEmbed(stem_channels or in_channels, dims[0], spatial_dims, patch_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.layers.append(VSSLayer(dim, depth, spatial_dims, drop_path=rates[start:start + depth],
                                        d_state=d_state, **(block_kwargs or {})))
            start += depth
            if i < len(dims) - 1:
                self.downsamples.append(PatchMerging(dim, spatial_dims, out_dim=dims[i + 1]))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """VMamba's encoder init: Linear weights trunc-normal(0.02), biases 0; LayerNorm 1/0."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        if self.stem is not None:
            x = self.stem(x)
            feats.append(x)
        x = self.patch_embed(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            feats.append(to_channels_first(x).contiguous())
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return feats


def _prepare(cls_name, in_channels, out_channels, spatial_dims, input_channels, num_classes, conv_op,
             dims, depths, norm_name, norm_op, extra):
    unknown = sorted(k for k in extra if k not in _IGNORED_PLAN_KEYS)
    if unknown:
        raise TypeError(f"{cls_name}: unexpected keyword argument(s) {unknown}")
    cin, cout = resolve_channels(cls_name, in_channels, out_channels, input_channels, num_classes)
    sd = resolve_spatial_dims(cls_name, spatial_dims, conv_op)
    if isinstance(dims, int):
        dims = [dims * 2 ** i for i in range(4)]
    dims, depths = [int(d) for d in dims], [int(d) for d in depths]
    if len(dims) != len(depths) or not dims:
        raise ValueError(f"{cls_name}: dims {dims} and depths {depths} must be non-empty and of equal length")
    if any(d < 1 for d in dims) or any(d < 0 for d in depths):
        raise ValueError(f"{cls_name}: dims must be >= 1 and depths >= 0, got {dims}, {depths}")
    plan_norm = _norm_name(cls_name, norm_op)
    return cin, cout, sd, dims, depths, plan_norm or norm_name


class _UNETRDecoder(DeepSupervisionSwitch, nn.Module):
    """Residual skip blocks + transposed-conv up blocks + 1x1 heads (Swin-UMamba's decoder).

    ``enc_channels``: channels of the encoder features, highest resolution first (stem output at H/2,
    then one per VSS stage; the last is the bottleneck). Level 0 (H) gets a skip block on the raw
    input (in -> enc_channels[0]); level l >= 1 gets a skip block enc_channels[l-1] -> enc_channels[l]
    on the feature at its resolution, so the skip widths are one stage "ahead" (48@H, 96@H/2, ...,
    768@H/16) as in the published network; the bottleneck feature goes to the decoder as it is.
    """

    def __init__(self, spatial_dims, in_channels, out_channels, enc_channels, norm_name, deep_supervision,
                 num_heads=4):
        super().__init__()
        self.deep_supervision = deep_supervision
        block = dict(spatial_dims=spatial_dims, kernel_size=3, norm_name=norm_name, res_block=True)
        n = len(enc_channels)  # number of levels below H; the bottleneck is level n
        skip_w = list(enc_channels)  # widths of levels 0 .. n-1
        self.skips = nn.ModuleList(
            [UnetrBasicBlock(in_channels=in_channels, out_channels=skip_w[0], stride=1, **block)]
            + [UnetrBasicBlock(in_channels=enc_channels[l - 1], out_channels=skip_w[l], stride=1, **block)
               for l in range(1, n)])
        below = [skip_w[l + 1] if l + 1 < n else enc_channels[-1] for l in range(n)]
        self.ups = nn.ModuleList(UnetrUpBlock(in_channels=below[l], out_channels=skip_w[l], upsample_kernel_size=2,
                                              **block) for l in range(n))
        self.final = UnetrBasicBlock(in_channels=skip_w[0], out_channels=skip_w[0], stride=1, **block)
        k = min(num_heads, n)
        self.heads = nn.ModuleList(UnetOutBlock(spatial_dims, skip_w[l], out_channels) for l in range(k))
        self.ds_scales = [2 ** l for l in range(k)]
        self.deep_supervision = deep_supervision  # heads 1.. need grads only with deep supervision

    def _deep_supervision_only_modules(self):
        return list(self.heads)[1:]

    def forward(self, x_in, feats):
        skips = [self.skips[0](x_in)] + [blk(f) for blk, f in zip(self.skips[1:], feats)]
        x = feats[-1]
        outs = [None] * len(self.heads)
        for l in reversed(range(len(self.ups))):
            x = self.ups[l](x, skips[l])
            if l == 0:
                x = self.final(x)
            if l < len(self.heads) and (self.deep_supervision or l == 0):
                outs[l] = self.heads[l](x)
        return outs if self.deep_supervision else outs[0]


class _NetBase(DecoderOwnsDeepSupervision, nn.Module):
    divisor = 32

    def _check(self, x):
        check_input(type(self).__name__, x, self.spatial_dims, self.in_channels, divisor=self.divisor)


class SwinUMamba(_NetBase):
    """Swin-UMamba: conv stem + VMamba encoder + UNETR-style CNN decoder (2D or 3D)."""

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None,
                 feature_size: int = 48, dims: Sequence[int] | int = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 9, 2), drop_path_rate: float = 0.2, deep_supervision: bool = False,
                 d_state: int = 16, norm_name: str | tuple = "instance", block_kwargs: dict | None = None, *,
                 input_channels: int | None = None, num_classes: int | None = None, n_stages: int | None = None,
                 conv_op=None, strides=None, norm_op=None, **plans_kwargs):
        super().__init__()
        name = type(self).__name__
        cin, cout, sd, dims, depths, norm_name = _prepare(name, in_channels, out_channels, spatial_dims,
                                                          input_channels, num_classes, conv_op, dims, depths,
                                                          norm_name, norm_op, plans_kwargs)
        self.in_channels, self.out_channels, self.spatial_dims = cin, cout, sd
        self.divisor = 4 * 2 ** (len(dims) - 1)
        enc_channels = [feature_size] + dims
        n_heads = min(4, len(enc_channels))
        _check_plan_strides(name, strides, n_stages, sd, [2 ** i for i in range(n_heads)], self.divisor,
                            deep_supervision)
        self.encoder = VSSEncoder(cin, sd, dims, depths, patch_size=2, stem_channels=feature_size,
                                  drop_path_rate=drop_path_rate, d_state=d_state, block_kwargs=block_kwargs)
        self.decoder = _UNETRDecoder(sd, cin, cout, enc_channels, norm_name, bool(deep_supervision), n_heads)

    def forward(self, x: torch.Tensor):
        self._check(x)
        return self.decoder(x, self.encoder(x))


class _MambaDecoder(DeepSupervisionSwitch, nn.Module):
    """Swin-UMamba-dagger decoder: PatchExpand, concat skip, Linear 2C -> C, VSS blocks; final x4 expand."""

    def __init__(self, spatial_dims, out_channels, dims, depth, deep_supervision, d_state, block_kwargs,
                 drop_path_rate=0.2, final_dim=None, num_heads=4):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.spatial_dims = spatial_dims
        n = len(dims)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # level i (i = n-2 .. 0) receives dims[i+1] at H/2^(i+3) and produces dims[i] at H/2^(i+2)
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], spatial_dims, out_dim=dims[i]) for i in range(n - 1))
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(n - 1))
        # stochastic depth decreasing from drop_path_rate (deepest decoder block) to 0 (last block)
        rates = torch.linspace(drop_path_rate, 0, depth * (n - 1), device="cpu").tolist()
        self.layers = nn.ModuleList(
            VSSLayer(dims[i], depth, spatial_dims, drop_path=rates[(n - 2 - i) * depth:(n - 1 - i) * depth],
                     d_state=d_state, **(block_kwargs or {}))
            for i in range(n - 1))
        if final_dim is None:
            final_dim = dims[0] if spatial_dims == 2 else max(1, dims[0] // 4)
        self.final_expand = FinalPatchExpand(dims[0], spatial_dims, out_dim=final_dim)
        self.final_head = conv(final_dim, out_channels, 1)
        n_aux = min(num_heads - 1, n - 1)
        self.heads = nn.ModuleList(conv(dims[i], out_channels, 1) for i in range(n_aux))
        self.ds_scales = [1] + [4 * 2 ** i for i in range(n_aux)]
        self.deep_supervision = deep_supervision  # the aux heads need grads only with deep supervision

    def _deep_supervision_only_modules(self):
        return list(self.heads)

    def forward(self, feats):
        x = to_channels_last(feats[-1])
        aux = [None] * len(self.heads)
        for i in reversed(range(len(self.expands))):
            x = self.expands[i](x)
            x = self.concat_back[i](torch.cat([x, to_channels_last(feats[i])], dim=-1))
            x = self.layers[i](x)
            if self.deep_supervision and i < len(self.heads):
                aux[i] = self.heads[i](to_channels_first(x))
        out = self.final_head(to_channels_first(self.final_expand(x)))
        return [out] + aux if self.deep_supervision else out


class SwinUMambaD(_NetBase):
    """Swin-UMamba-dagger: 4x4 patch embed + VMamba encoder + Mamba decoder + x4 final expand (2D or 3D)."""

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None,
                 feature_size: int = 48, dims: Sequence[int] | int = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 9, 2), drop_path_rate: float = 0.2, deep_supervision: bool = False,
                 d_state: int = 16, norm_name: str | tuple = "instance", block_kwargs: dict | None = None,
                 decoder_depth: int = 2, final_dim: int | None = None, *, input_channels: int | None = None, num_classes: int | None = None,
                 n_stages: int | None = None, conv_op=None, strides=None, norm_op=None, **plans_kwargs):
        super().__init__()
        name = type(self).__name__
        cin, cout, sd, dims, depths, _ = _prepare(name, in_channels, out_channels, spatial_dims, input_channels,
                                                  num_classes, conv_op, dims, depths, norm_name, norm_op,
                                                  plans_kwargs)
        self.in_channels, self.out_channels, self.spatial_dims = cin, cout, sd
        self.divisor = 4 * 2 ** (len(dims) - 1)
        self.encoder = VSSEncoder(cin, sd, dims, depths, patch_size=4, stem_channels=None,
                                  drop_path_rate=drop_path_rate, d_state=d_state, block_kwargs=block_kwargs)
        self.decoder = _MambaDecoder(sd, cout, dims, decoder_depth, bool(deep_supervision), d_state, block_kwargs,
                                     drop_path_rate=drop_path_rate, final_dim=final_dim)
        _check_plan_strides(name, strides, n_stages, sd, self.decoder.ds_scales, self.divisor, deep_supervision)

    def forward(self, x: torch.Tensor):
        self._check(x)
        return self.decoder(self.encoder(x))
