"""VM-UNet with MHS-VM's Multi-Head Scan mixer, or with VM-UNet's own SS2D mixer (2D as published, and 3D).

``VMUNetMHS`` is VM-UNet (Ruan & Xiang, 2024) whose VSS blocks use MHS-VM's gated Multi-Head Scan mixer
(``medmamba.layers.multi_head_scan.MHSMixer``) instead of SS2D, as in MHS-VM (Ji, 2024);
``VMUNetMHS(..., mixer="ss2d")`` is the plain VM-UNet (its VSS blocks mix with SS2D / SS3D,
``medmamba.layers.cross_scan.CrossScan``, the layer Swin-UMamba's blocks use). Also defined here,
and shared with ``medmamba.nets.msvm_unet``: ``validate_plans_topology`` (nnU-Net plans arguments
checked against a fixed-topology network), ``native_scales`` and ``trunc_normal_linear_init``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures

from medmamba.layers.cross_scan import CrossScan
from medmamba.layers.multi_head_scan import MHSMixer
from medmamba.nets.conventions import DeepSupervisionSwitch, check_input, resolve_channels, resolve_spatial_dims
from medmamba.layers.vss import FinalPatchExpand, PatchEmbed, PatchExpand, PatchMerging, VSSBlock

__all__ = ["VMUNetMHS", "validate_plans_topology", "native_scales", "trunc_normal_linear_init"]


# --------------------------------------------------------------------------------------------------
# Shared helpers for the fixed-topology VMamba-style U-Nets (VM-UNet, MSVM-UNet)
# --------------------------------------------------------------------------------------------------

def native_scales(num_stages: int, first: int = 4) -> list[int]:
    """Cumulative downsampling of the resolutions a patch-embedding U-Net works at.

    Full resolution (1), the patch embedding (``first``), then x2 per further stage:
    4 stages -> [1, 4, 8, 16, 32]. Decoder outputs exist at all but the last.
    """
    return [1] + [first * 2 ** i for i in range(num_stages)]


def _per_axis(value, spatial_dims: int, what: str, cls_name: str) -> list[int]:
    if not hasattr(value, "__len__"):  # one int (or numpy integer) for every axis
        return [int(value)] * spatial_dims
    value = list(value)
    if len(value) != spatial_dims:
        raise ValueError(f"{cls_name}: every entry of {what} needs {spatial_dims} values (one per spatial axis), "
                         f"got {value}")
    return [int(v) for v in value]


def validate_plans_topology(cls_name: str, spatial_dims: int, scales: Sequence[int], deep_supervision: bool, *,
                            n_stages=None, features_per_stage=None, kernel_sizes=None, strides=None,
                            n_conv_per_stage=None, n_conv_per_stage_decoder=None, n_blocks_per_stage=None) -> None:
    """Check nnU-Net plans arguments against a network whose topology is fixed.

    ``scales``: the network's cumulative downsampling per resolution level, full resolution first (see
    :func:`native_scales`); its decoder produces outputs at ``scales[:-1]``.

    * per-stage lists (``features_per_stage, kernel_sizes, strides, n_conv_per_stage,
      n_blocks_per_stage``) must have ``n_stages`` entries, ``n_conv_per_stage_decoder`` ``n_stages - 1``;
      their values are otherwise not used (the widths come from the network's ``dims``);
    * ``strides`` must downsample by ``scales[-1]`` in total on every axis (the input must be divisible
      by it); any split is accepted when deep supervision is off, since then only the total matters;
    * with deep supervision, nnU-Net builds one target per stage but the deepest, at the cumulative
      strides, so those must be exactly ``scales[:-1]`` on every axis.

    Raises ``ValueError`` with the strides the network can follow.
    """
    d = spatial_dims
    suggestion = [[1] * d] + [[scales[i + 1] // scales[i]] * d for i in range(len(scales) - 1)]
    lists = {"features_per_stage": features_per_stage, "kernel_sizes": kernel_sizes, "strides": strides,
             "n_conv_per_stage": n_conv_per_stage, "n_blocks_per_stage": n_blocks_per_stage}
    lengths = {k: len(v) for k, v in lists.items() if v is not None and hasattr(v, "__len__")}
    if n_stages is not None:
        if int(n_stages) != n_stages or n_stages < 1:
            raise ValueError(f"{cls_name}: n_stages must be a positive integer, got {n_stages!r}")
        expected = int(n_stages)
    elif lengths:
        expected = lengths.get("strides", next(iter(lengths.values())))
    else:
        expected = None
    for key, n in lengths.items():
        if n != expected:
            raise ValueError(f"{cls_name}: {key} has {n} entries but the plans have {expected} stages")
    if n_conv_per_stage_decoder is not None and hasattr(n_conv_per_stage_decoder, "__len__") and expected is not None:
        if len(n_conv_per_stage_decoder) != expected - 1:
            raise ValueError(f"{cls_name}: n_conv_per_stage_decoder has {len(n_conv_per_stage_decoder)} entries, "
                             f"expected n_stages - 1 = {expected - 1}")
    if kernel_sizes is not None:
        for k in (kernel_sizes if hasattr(kernel_sizes, "__len__") else [kernel_sizes]):
            _per_axis(k, d, "kernel_sizes", cls_name)
    if strides is None:
        return
    if not hasattr(strides, "__len__"):  # one int for every stage (dynamic_network_architectures allows it)
        strides = [strides] * (expected or 1)
    per_stage = [_per_axis(s, d, "strides", cls_name) for s in strides]
    if any(v < 1 for s in per_stage for v in s):
        raise ValueError(f"{cls_name}: strides must be positive, got {strides}")
    cum, acc = [], [1] * d
    for s in per_stage:
        acc = [a * v for a, v in zip(acc, s)]
        cum.append(tuple(acc))
    total = scales[-1]
    if cum[-1] != (total,) * d:
        raise ValueError(f"{cls_name}: the plans' strides {strides} downsample by {list(cum[-1])} in total, but this "
                         f"network has a fixed topology (patch embedding /{scales[1]}, then /2 per stage: {total} on "
                         f"every axis). Use strides {suggestion} (and a patch size divisible by {total} on every axis).")
    if deep_supervision:
        need = [(s,) * d for s in scales[:-1]]
        have = cum[:-1]
        if have != need:
            raise ValueError(f"{cls_name}: deep supervision needs one output per plans stage at the cumulative strides "
                             f"{[list(c) for c in have]}, but this network's decoder outputs are at downsampling "
                             f"{list(scales[:-1])} on every axis. Use strides {suggestion}, or turn deep supervision "
                             f"off (deep_supervision=False; in nnU-Net a trainer that disables it).")


def trunc_normal_linear_init(module: nn.Module, std: float = 0.02) -> None:
    """VMamba / Swin initialisation: Linear weights truncated-normal(std), biases 0; LayerNorm (1, 0).

    The selective-scan parameters (x_proj, dt_proj, A, D) are plain parameters, not ``nn.Linear``, and
    keep their Mamba initialisation.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_sequence(cls_name: str, name: str, value, length: int | None = None) -> list[int]:
    try:
        value = [int(v) for v in value]
    except TypeError:
        raise TypeError(f"{cls_name}: {name} must be a sequence of integers, got {value!r}") from None
    if length is not None and len(value) != length:
        raise ValueError(f"{cls_name}: {name} needs {length} entries, got {value}")
    if any(v < 1 for v in value):
        raise ValueError(f"{cls_name}: every entry of {name} must be >= 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# VM-UNet with the MHS-VM mixer
# --------------------------------------------------------------------------------------------------

class _Encoder(nn.Module):
    """Patch embedding /4 + LN, then per stage: VSS blocks, patch merging (all stages but the last).

    ``forward`` returns (deepest output, skips) with ``skips[i]`` the input of stage ``i`` (channels-last),
    as VM-UNet keeps them.
    """

    def __init__(self, in_channels, spatial_dims, dims, depths, dpr, mixer_factory):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dims[0], spatial_dims, patch_size=4)
        self.stages = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = [VSSBlock(dim, spatial_dims, drop_path=dpr[start + j], mixer=mixer_factory) for j in range(depth)]
            start += depth
            down = PatchMerging(dim, spatial_dims, out_dim=dims[i + 1]) if i < len(dims) - 1 else nn.Identity()
            self.stages.append(nn.ModuleDict({"blocks": nn.Sequential(*blocks), "downsample": down}))

    def forward(self, x):
        x = self.patch_embed(x)
        skips = []
        for stage in self.stages:
            skips.append(x)
            x = stage["downsample"](stage["blocks"](x))
        return x, skips


class _Decoder(DeepSupervisionSwitch, nn.Module):
    """VM-UNet decoder: stage 0 = VSS blocks at the bottleneck; stage i > 0 = (x + skip) -> patch expand
    -> VSS blocks; then final x4 patch expand + 1x1 conv (``seg_layers[0]``). With deep supervision,
    ``seg_layers[1:]`` are 1x1 heads on the outputs of stages n-1, n-2, ..., 1 (highest resolution first).
    nnU-Net toggles ``deep_supervision`` on this module.
    """

    def __init__(self, out_channels, spatial_dims, dims, depths, dpr, mixer_factory, deep_supervision):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.deep_supervision = bool(deep_supervision)
        dec_dims = list(reversed(dims))
        self.stages = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dec_dims, depths)):
            up = PatchExpand(dec_dims[i - 1], spatial_dims, scale=2, out_dim=dim) if i > 0 else nn.Identity()
            blocks = [VSSBlock(dim, spatial_dims, drop_path=dpr[start + j], mixer=mixer_factory) for j in range(depth)]
            start += depth
            self.stages.append(nn.ModuleDict({"upsample": up, "blocks": nn.Sequential(*blocks)}))
        self.final_expand = FinalPatchExpand(dims[0], spatial_dims)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        # seg_layers[0] is the output head; then deep-supervision heads on stage n-1 (highest resolution,
        # dims[0]) down to stage 1: always built (strict loading either way), trainable only while in use
        heads = [conv(self.final_expand.out_dim, out_channels, 1)]
        heads += [conv(dec_dims[i], out_channels, 1) for i in range(len(dec_dims) - 1, 0, -1)]
        self.seg_layers = nn.ModuleList(heads)
        self.num_ds_heads = len(heads)
        self.deep_supervision = bool(deep_supervision)

    def _deep_supervision_only_modules(self):
        return list(self.seg_layers)[1:]

    def forward(self, x, skips):
        stage_outputs = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = x + skips[-i]
            x = stage["blocks"](stage["upsample"](x))
            stage_outputs.append(x)
        out = self.seg_layers[0](self.final_expand(x).movedim(-1, 1))
        if not self.deep_supervision:
            return out
        aux = [head(stage_outputs[-1 - k].movedim(-1, 1)) for k, head in enumerate(self.seg_layers[1:])]
        return [out, *aux]


class VMUNetMHS(AbstractDynamicNetworkArchitectures):
    """VM-UNet whose VSS blocks mix tokens with MHS-VM's gated Multi-Head Scan; 2D and 3D.

    Topology (VM-UNet): patch embedding 4^d conv -> ``dims[0]`` + LayerNorm; encoder stages of VSS blocks
    (``depths``, default [2, 2, 2, 2]) with patch merging (LN(2^d C) + Linear 2^d C -> 2C) between
    them; decoder over ``reversed(dims)`` ([768, 384, 192, 96]) with ``decoder_depths`` ([2, 2, 2, 1]):
    stage 0 refines the bottleneck, stage i > 0 ADDS the skip (the input of encoder stage n - i) and
    then patch-expands (Linear C -> 2^d C/2, pixel shuffle 2, LN) before its blocks; final x4 patch
    expansion to ``dims[0] // 4`` channels + 1x1 conv. The first skip (patch-embedding output) is not
    used, as in VM-UNet. Every VSS block is ``x + DropPath(MHSMixer(LN x))`` (no MLP): in_proj C -> 2C,
    depthwise 3^d conv + SiLU, MultiHeadScan (``num_heads`` heads, ``d_state``, route ``families``,
    SRA ``threshold``), LN, * SiLU(z). With ``mixer="ss2d"`` (plain VM-UNet, JCruan519/VM-UNet) every
    VSS block is ``x + DropPath(SS2D(LN x))`` instead: ``CrossScan(dim, d_state=d_state)`` (in_proj C ->
    4C split x, z; depthwise 3^d + SiLU; 4 cross-scan routes in 2D, 6 in 3D; LN(2C); * SiLU(z);
    out_proj 2C -> C); ``num_heads, families, threshold`` are then unused. Stochastic depth rises linearly to ``drop_path_rate`` over the
    encoder and falls back to 0 over the decoder. Linear layers get truncated-normal(0.02) init.

    Total downsampling ``4 * 2^(len(dims) - 1)`` (32 by default): every input size must be divisible by
    it. In 3D, the patch embedding is 4^3, patch merging concatenates 8 neighbours, patch expansion is
    Linear C -> 4C + x2 shuffle, and the final expansion Linear C -> 16C + x4 shuffle (C/4 channels).

    MONAI-style: ``VMUNetMHS(in_channels, out_channels, spatial_dims=3, dims=..., depths=...,
    decoder_depths=..., num_heads=4, d_state=16, families=None, threshold=0.5, drop_path_rate=0.2,
    deep_supervision=False, mixer="mhs")``. nnU-Net-style: ``input_channels, num_classes, deep_supervision`` and the
    ``dynamic_network_architectures`` keywords; ``conv_op`` gives the spatial dims, the per-stage lists
    and ``strides`` are validated (:func:`validate_plans_topology`: total stride 32 on every axis; with
    deep supervision, strides [[1]*d, [4]*d, [2]*d, [2]*d, [2]*d]); the widths come from ``dims``, and
    ``features_per_stage, kernel_sizes, n_conv_per_stage(_decoder), conv_bias, norm_op(_kwargs),
    dropout_op(_kwargs), nonlin(_kwargs)`` are accepted but do not change the network (its norms,
    kernels and activations are those of the paper).

    Deep supervision (not in the paper; our addition): with ``deep_supervision=True`` the decoder gets
    1x1 heads on decoder stages n-1 .. 1, and ``forward`` returns a list of ``len(dims)`` tensors,
    highest resolution first, at downsampling [1, 4, 8, 16] (default dims), in train AND eval mode
    (nnU-Net's convention: its validation step takes ``output[0]``); ``net.decoder.deep_supervision =
    False`` returns the single full-resolution tensor. Otherwise ``forward`` returns one tensor
    ``(B, out_channels, *spatial)`` (logits, no softmax).
    """

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None,
                 dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 2, 2),
                 decoder_depths: Sequence[int] = (2, 2, 2, 1), num_heads: int = 4, d_state: int = 16,
                 families: Sequence[str] | None = None, threshold: float = 0.5, drop_path_rate: float = 0.2,
                 deep_supervision: bool = False, scan_backend=None, mixer: str = "mhs",
                 # nnU-Net (dynamic_network_architectures) keywords
                 input_channels: int | None = None, num_classes: int | None = None, n_stages=None,
                 features_per_stage=None, conv_op=None, kernel_sizes=None, strides=None, n_conv_per_stage=None,
                 n_conv_per_stage_decoder=None, n_blocks_per_stage=None, conv_bias=None, norm_op=None,
                 norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 nonlin_first=None):
        super().__init__()
        name = type(self).__name__
        self.in_channels, self.out_channels = resolve_channels(name, in_channels, out_channels, input_channels,
                                                               num_classes)
        self.spatial_dims = resolve_spatial_dims(name, spatial_dims, conv_op)
        dims = _check_sequence(name, "dims", dims)
        if len(dims) < 2:
            raise ValueError(f"{name}: dims needs at least 2 stages, got {dims}")
        for a, b in zip(dims, dims[1:]):
            if b != 2 * a:
                raise ValueError(f"{name}: dims must double from stage to stage (patch merging 2^d C -> 2C and patch "
                                 f"expanding C -> C/2 meet the skips, which are added), got {dims}")
        if dims[0] % 4:
            raise ValueError(f"{name}: dims[0]={dims[0]} must be divisible by 4 (final x4 expansion to dims[0] // 4)")
        if mixer not in ("mhs", "ss2d"):
            raise ValueError(f"{name}: mixer must be 'mhs' (MHS-VM's Multi-Head Scan) or 'ss2d' (VM-UNet's SS2D), "
                             f"got {mixer!r}")
        self.mixer = mixer
        if mixer == "mhs" and any(d < num_heads for d in dims):
            raise ValueError(f"{name}: every stage width must be >= num_heads={num_heads}, got dims {dims}")
        depths = _check_sequence(name, "depths", depths, len(dims))
        decoder_depths = _check_sequence(name, "decoder_depths", decoder_depths, len(dims))
        self.dims, self.depths, self.decoder_depths = dims, depths, decoder_depths
        self.scales = native_scales(len(dims))
        self.divisor = self.scales[-1]
        validate_plans_topology(name, self.spatial_dims, self.scales, bool(deep_supervision), n_stages=n_stages,
                                features_per_stage=features_per_stage, kernel_sizes=kernel_sizes, strides=strides,
                                n_conv_per_stage=n_conv_per_stage, n_conv_per_stage_decoder=n_conv_per_stage_decoder,
                                n_blocks_per_stage=n_blocks_per_stage)
        self.num_heads, self.d_state, self.threshold = int(num_heads), int(d_state), float(threshold)
        sd = self.spatial_dims

        def mixer_factory(dim, spatial_dims):
            if mixer == "ss2d":
                return CrossScan(dim, spatial_dims=spatial_dims, d_state=d_state, scan_backend=scan_backend)
            return MHSMixer(dim, spatial_dims, num_heads=num_heads, d_state=d_state, families=families,
                            threshold=threshold, scan_backend=scan_backend)

        enc_dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dec_dpr = torch.linspace(0, drop_path_rate, sum(decoder_depths), device="cpu").tolist()[::-1]
        self.encoder = _Encoder(self.in_channels, sd, dims, depths, enc_dpr, mixer_factory)
        self.decoder = _Decoder(self.out_channels, sd, dims, decoder_depths, dec_dpr, mixer_factory, deep_supervision)
        self.apply(trunc_normal_linear_init)

        # dynamic_network_architectures conventions (pretrained-encoder transfer across channel counts)
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.patch_embed"
        self.keys_to_in_proj = ("encoder.patch_embed.proj",)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    def forward(self, x: torch.Tensor):
        check_input(type(self).__name__, x, self.spatial_dims, self.in_channels, self.divisor)
        x, skips = self.encoder(x)
        return self.decoder(x, skips)
