"""MSVM-UNet (Chen et al., 2024): VMamba-v2 encoder, multi-scale VSS decoder with large-kernel patch
expanding; 2D as published, and 3D.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures

from medmamba.layers.cross_scan import CrossScan
from medmamba.nets.conventions import DeepSupervisionSwitch, check_input, resolve_channels, resolve_spatial_dims
from medmamba.nets.vm_unet_mhs import (_check_sequence, native_scales, trunc_normal_linear_init,
                                       validate_plans_topology)
from medmamba.layers.vss import Mlp, VSSBlock

__all__ = ["MSVMUNet", "LKPE", "FLKPE", "MSFFN", "pixel_shuffle_nd"]


def _conv(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def pixel_shuffle_nd(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Channels-first pixel shuffle in 2D or 3D: (B, C * r^d, *S) -> (B, C, *S * r).

    Channel ``c * r^d + (i, j[, k])`` (row-major over the sub-positions) goes to sub-position (i, j[, k])
    of output channel ``c``; in 2D this is exactly ``torch.nn.functional.pixel_shuffle``.
    """
    b, c_all, *spatial = x.shape
    n = len(spatial)
    c = c_all // scale ** n
    if c * scale ** n != c_all:
        raise ValueError(f"pixel_shuffle_nd: {c_all} channels are not divisible by {scale}^{n}")
    x = x.reshape(b, c, *([scale] * n), *spatial)
    # (B, C, r0, r1, [r2,] s0, s1, [s2]) -> (B, C, s0, r0, s1, r1, [s2, r2])
    order = [0, 1]
    for i in range(n):
        order += [2 + n + i, 2 + i]
    return x.permute(order).reshape(b, c, *[s * scale for s in spatial])


def _sub_pixel_cf(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Channels-first sub-pixel expansion with MSVM-UNet's channel layout: (B, r^d * C, *S) -> (B, C, *S * r),
    input channel ``((r0 * r + r1)[* r + r2]) * C + c`` going to sub-position (r0, r1[, r2]) of channel c
    (the official einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'). Same numbers as
    ``vss._pixel_shuffle_last`` on the channels-last tensor; done channels-first so that the gradient
    reaching the convolutions (and a SyncBatchNorm under DDP) stays in the standard memory format."""
    b, c_all, *spatial = x.shape
    n = len(spatial)
    c = c_all // scale ** n
    x = x.reshape(b, *([scale] * n), c, *spatial)
    # (B, r0, r1, [r2,] C, s0, s1, [s2]) -> (B, C, s0, r0, s1, r1, [s2, r2])
    order = [0, 1 + n]
    for i in range(n):
        order += [2 + n + i, 1 + i]
    return x.permute(order).reshape(b, c, *[s * scale for s in spatial])


class _LayerNormCF(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first tensor (B, C, *S)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class _ConvDown(nn.Module):
    """VMamba-v2 downsampling, channels-last in and out: conv 3^d stride 2 (bias) + LayerNorm."""

    def __init__(self, dim_in, dim_out, spatial_dims):
        super().__init__()
        self.conv = _conv(spatial_dims)(dim_in, dim_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x):
        return self.norm(self.conv(x.movedim(-1, 1)).movedim(1, -1))


class LKPE(nn.Module):
    """Large-kernel patch expanding, channels-last in and out (B, *S, dim_in) -> (B, *S * scale, dim_out):
    1x1 conv dim_in -> scale^d * dim_out (bias) - BatchNorm - ReLU - depthwise 3^d conv (bias) - pixel
    shuffle by ``scale`` (channel = (r0, r1[, r2], c), c fastest, as the official einops rearrange) -
    LayerNorm(dim_out). In 2D with dim_out = dim_in / 2 the expansion is
    dim_in -> 2 dim_in, as published; in 3D it is dim_in -> 4 dim_in."""

    def __init__(self, dim_in: int, dim_out: int, spatial_dims: int, scale: int = 2):
        super().__init__()
        conv = _conv(spatial_dims)
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        hidden = dim_out * scale ** spatial_dims
        self.scale = scale
        self.dim_in, self.dim_out = dim_in, dim_out
        self.expand = nn.Sequential(conv(dim_in, hidden, 1), bn(hidden), nn.ReLU(inplace=True),
                                    conv(hidden, hidden, 3, padding=1, groups=hidden))
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sub-pixel layout as published (einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'): the channel index
        # is (r0, r1[, r2], c) with c fastest -- NOT torch's pixel_shuffle layout (c, r0, r1).
        y = _sub_pixel_cf(self.expand(x.movedim(-1, 1)), self.scale)
        return self.norm(y.movedim(1, -1))


class FLKPE(nn.Module):
    """Final large-kernel patch expanding to full resolution (x4 per axis), channels-last in, channels-first
    out: 2D: one LKPE step x4 (dim -> 16 dim, shuffle 4, LN(dim)); 3D: two x2 LKPE steps (dim -> 8 dim,
    shuffle 2, LN(dim) each); then, when ``out_channels`` is given, the 1x1 conv dim -> classes
    (``head``). MSVMUNet keeps that 1x1 conv in ``decoder.seg_layers[0]`` instead."""

    def __init__(self, dim: int, spatial_dims: int, out_channels: int | None = None):
        super().__init__()
        steps = [4] if spatial_dims == 2 else [2, 2]
        self.steps = nn.ModuleList(LKPE(dim, dim, spatial_dims, scale=s) for s in steps)
        self.head = _conv(spatial_dims)(dim, out_channels, 1) if out_channels is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return self.head(x.movedim(-1, 1))


class _MSConv(nn.Module):
    """h + DW1(h) + DW3(h) + DW5(h): depthwise convs (no bias), channels-first."""

    def __init__(self, dim, spatial_dims, kernel_sizes=(1, 3, 5)):
        super().__init__()
        conv = _conv(spatial_dims)
        self.dw_convs = nn.ModuleList(conv(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in kernel_sizes)

    def forward(self, x):
        return x + sum(c(x) for c in self.dw_convs)


class MSFFN(nn.Module):
    """Multi-scale FFN of MSVM-UNet, channels-last: fc1 C -> ratio C - GELU - (h + DW1 + DW3 + DW5) - fc2."""

    def __init__(self, dim: int, spatial_dims: int, mlp_ratio: float = 4.0, kernel_sizes=(1, 3, 5)):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.ms_conv = _MSConv(hidden, spatial_dims, kernel_sizes)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = self.ms_conv(h.movedim(-1, 1)).movedim(1, -1)
        return self.fc2(h)


def _ss2d_noz(d_state, scan_backend):
    """VMamba v2 'v05_noz' SS2D: no z gate, d_inner = C, depthwise 3^d without bias, out LN, out_proj."""
    def make(dim, spatial_dims):
        return CrossScan(dim, spatial_dims, d_state=d_state, expand=1, gated=False, conv_bias=False,
                         scan_backend=scan_backend)
    return make


class _Encoder(nn.Module):
    """Stem (conv3 s2 - LN - GELU - conv3 s2 - LN) /4, stages of VSS blocks (SS2D + MLP), conv downsampling.

    ``forward`` returns the stage outputs (channels-last), highest resolution first."""

    def __init__(self, in_channels, spatial_dims, dims, depths, dpr, d_state, mlp_ratio, scan_backend):
        super().__init__()
        conv = _conv(spatial_dims)
        half = max(dims[0] // 2, 1)
        self.stem = nn.Sequential(conv(in_channels, half, 3, stride=2, padding=1), _LayerNormCF(half), nn.GELU(),
                                  conv(half, dims[0], 3, stride=2, padding=1), _LayerNormCF(dims[0]))
        mixer = _ss2d_noz(d_state, scan_backend)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.stages.append(nn.Sequential(*[
                VSSBlock(dim, spatial_dims, drop_path=dpr[start + j], mixer=mixer,
                         ffn=lambda d, s: Mlp(d, int(d * mlp_ratio))) for j in range(depth)]))
            start += depth
            if i < len(dims) - 1:
                self.downsamples.append(_ConvDown(dim, dims[i + 1], spatial_dims))

    def forward(self, x):
        x = self.stem(x).movedim(1, -1)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return feats


class _UpBlock(nn.Module):
    """LKPE x2 (dim_in -> dim_out), concat the skip, 1x1 (Linear) 2 dim_out -> dim_out, MSVSS blocks."""

    def __init__(self, dim_in, dim_out, depth, spatial_dims, dpr, d_state, mlp_ratio, scan_backend):
        super().__init__()
        self.up = LKPE(dim_in, dim_out, spatial_dims, scale=2)
        self.concat = nn.Linear(2 * dim_out, dim_out)
        mixer = _ss2d_noz(d_state, scan_backend)
        self.blocks = nn.Sequential(*[
            VSSBlock(dim_out, spatial_dims, drop_path=dpr[j], mixer=mixer,
                     ffn=lambda d, s: MSFFN(d, s, mlp_ratio)) for j in range(depth)])

    def forward(self, x, skip):
        x = self.concat(torch.cat([self.up(x), skip], dim=-1))
        return self.blocks(x)


class _Decoder(DeepSupervisionSwitch, nn.Module):
    """Up-blocks from the bottleneck to 1/4, FLKPE to full resolution (its 1x1 conv is ``seg_layers[0]``);
    ``seg_layers[1:]`` are 1x1 heads on the up-block outputs, highest resolution first, used with deep
    supervision. They are always built (a checkpoint trained with deep supervision loads strictly into a
    network without it) and require grad only while it is on. nnU-Net toggles ``deep_supervision`` on
    this module."""

    def __init__(self, out_channels, spatial_dims, dims, depths, dpr, d_state, mlp_ratio, scan_backend,
                 deep_supervision):
        super().__init__()
        self.deep_supervision = bool(deep_supervision)
        rdims = list(reversed(dims))
        self.up_blocks = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.up_blocks.append(_UpBlock(rdims[i], rdims[i + 1], depth, spatial_dims, dpr[start:start + depth],
                                           d_state, mlp_ratio, scan_backend))
            start += depth
        conv = _conv(spatial_dims)
        heads = [conv(dims[0], out_channels, 1)] + [conv(dims[i], out_channels, 1) for i in range(len(dims) - 1)]
        self.final = FLKPE(dims[0], spatial_dims)
        self.seg_layers = nn.ModuleList(heads)
        self.deep_supervision = bool(deep_supervision)

    def _deep_supervision_only_modules(self):
        return list(self.seg_layers)[1:]

    def forward(self, feats):
        x = feats[-1]
        outs = []
        for i, block in enumerate(self.up_blocks):
            x = block(x, feats[-2 - i])
            outs.append(x)
        out = self.seg_layers[0](self.final(x))
        if not self.deep_supervision:
            return out
        # up-block outputs, highest resolution first: outs[-1] (dims[0]), outs[-2] (dims[1]), ...
        aux = [head(outs[-1 - k].movedim(-1, 1)) for k, head in enumerate(self.seg_layers[1:])]
        return [out, *aux]


class MSVMUNet(AbstractDynamicNetworkArchitectures):
    """MSVM-UNet: VMamba-v2 encoder + multi-scale VSS decoder with large-kernel patch expanding; 2D and 3D.

    Encoder (VMamba v2 "tiny_0230s" style): stem conv 3^d stride 2 (in -> dims[0]/2) - LN - GELU - conv
    3^d stride 2 (-> dims[0]) - LN (/4); stages ``dims`` (96, 192, 384, 768) with ``depths`` (2, 2, 8, 2)
    of VSS blocks ``x + DropPath(SS2D(LN x))``, ``x + DropPath(MLP(LN x))`` (MLP ratio 4), SS2D without
    the z gate (d_inner = C, depthwise 3^d without bias + SiLU, cross-scan routes: 4 in 2D, 6 in 3D,
    ``d_state`` 1, out LN, out_proj); downsampling conv 3^d stride 2 + LN between stages.

    Decoder: per level (768 -> 384 -> 192 -> 96) an up-block: LKPE (1x1 conv Cin -> 2^d Cout - BN -
    ReLU - depthwise 3^d - pixel shuffle 2 - LN; Cout = Cin / 2), concat the encoder skip, 1x1 (Linear)
    2C -> C, then ``decoder_depths`` (2) MSVSS blocks: VSS blocks (same SS2D) whose FFN is the MS-FFN
    fc1 C -> 4C - GELU - (h + DW1(h) + DW3(h) + DW5(h)) - fc2. Final FLKPE to full resolution, LN, 1x1
    conv -> ``out_channels``.

    **3D deviation**: the published FLKPE expands 96 -> 1536 channels and pixel-shuffles by 4 in one
    step (16 sub-pixels per channel in 2D). A x4 shuffle in 3D needs 64 C channels, so in 3D the FLKPE is
    TWO x2 steps, each a full LKPE (1x1 C -> 8C - BN - ReLU - depthwise 3^3 - shuffle 2 - LN(C)), before
    the 1x1 head; the up-blocks' LKPE likewise expands Cin -> 4 Cin in 3D (8 sub-voxels) so that the
    shuffle still yields Cin / 2. The encoder's routes in 3D are the 6 cross-scan routes (each axis
    fastest, both directions).

    Total downsampling ``4 * 2^(len(dims) - 1)`` (32 by default): every input size must be divisible by
    it. Stochastic depth: linear 0 -> ``drop_path_rate`` over the encoder, ``drop_path_rate`` -> 0 over
    the decoder, as published. Encoder Linear layers get truncated-normal(0.02) init (VMamba); the
    decoder keeps PyTorch defaults, as published. Single-channel inputs are NOT repeated to 3 channels
    (the published code does so for its ImageNet-pretrained encoder, which we do not load).

    MONAI-style: ``MSVMUNet(in_channels, out_channels, spatial_dims=3, dims=..., depths=...,
    decoder_depths=(2, 2, 2), d_state=1, mlp_ratio=4.0, drop_path_rate=0.2, deep_supervision=False)``.
    nnU-Net-style: ``input_channels, num_classes, deep_supervision`` and the
    ``dynamic_network_architectures`` keywords, handled as in ``VMUNetMHS`` (``conv_op`` gives the
    spatial dims; strides must total 32 on every axis, and be [[1]*d, [4]*d, [2]*d, [2]*d, [2]*d] with
    deep supervision; the other keywords are accepted and validated for length but do not change the
    network).

    Deep supervision (our addition; the paper has none): 1x1 heads on the up-block outputs;
    ``forward`` returns a list of ``len(dims)`` tensors, highest resolution first, at downsampling
    [1, 4, 8, 16] (default dims), in train and eval mode (nnU-Net's convention); otherwise one tensor
    ``(B, out_channels, *spatial)`` (logits).
    """

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None,
                 dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 8, 2),
                 decoder_depths: Sequence[int] = (2, 2, 2), d_state: int = 1, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, deep_supervision: bool = False, scan_backend=None,
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
        depths = _check_sequence(name, "depths", depths, len(dims))
        decoder_depths = _check_sequence(name, "decoder_depths", decoder_depths, len(dims) - 1)
        if mlp_ratio <= 0:
            raise ValueError(f"{name}: mlp_ratio must be > 0, got {mlp_ratio}")
        self.dims, self.depths, self.decoder_depths = dims, depths, decoder_depths
        self.d_state = int(d_state)
        self.scales = native_scales(len(dims))
        self.divisor = self.scales[-1]
        validate_plans_topology(name, self.spatial_dims, self.scales, bool(deep_supervision), n_stages=n_stages,
                                features_per_stage=features_per_stage, kernel_sizes=kernel_sizes, strides=strides,
                                n_conv_per_stage=n_conv_per_stage, n_conv_per_stage_decoder=n_conv_per_stage_decoder,
                                n_blocks_per_stage=n_blocks_per_stage)
        sd = self.spatial_dims
        enc_dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        dec_dpr = torch.linspace(drop_path_rate, 0, sum(decoder_depths), device="cpu").tolist()
        self.encoder = _Encoder(self.in_channels, sd, dims, depths, enc_dpr, d_state, mlp_ratio, scan_backend)
        self.encoder.apply(trunc_normal_linear_init)
        self.decoder = _Decoder(self.out_channels, sd, dims, decoder_depths, dec_dpr, d_state, mlp_ratio,
                                scan_backend, deep_supervision)

        # dynamic_network_architectures conventions (pretrained-encoder transfer across channel counts)
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.0",)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    def forward(self, x: torch.Tensor):
        check_input(type(self).__name__, x, self.spatial_dims, self.in_channels, self.divisor)
        return self.decoder(self.encoder(x))
