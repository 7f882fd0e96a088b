"""LightM-UNet (Liao et al. 2024): a light U-Net whose encoder is made of Residual Vision Mamba layers.

Structure, as released (2D and 3D; ``init_filters`` = 32 in the authors' nnU-Net trainer):

* stem: depthwise 3^d conv + pointwise 1x1 to 32 channels, no norm (optional dropout after it);
* encoder level 0: 1 ResMamba block at 32 channels; levels 1..3: an RVM layer C -> 2C at the current
  resolution, 2x max-pool, then 2, 2 and 4 ResMamba blocks (64, 128, 256 channels); 3 downsamplings;
* ResMamba block(C) = GN(8)-ReLU-RVM-GN(8)-ReLU-RVM + identity; RVM = LN, Mamba(16, 4, 2) + s * x, the
  same LN, Linear (see ``medmamba.layers.cnn_mamba.RVMLayer``);
* decoder x3: 1x1 conv C -> C/2 (no bias), x2 (bi/tri)linear upsampling, ADD the skip, then
  GN-ReLU-(depthwise 3^d + pointwise) + s * identity, GN-ReLU;
* head: GN-ReLU-(depthwise 1x1 + pointwise 1x1, both with bias) -> classes, as in the released code (the
  depthwise 1x1 is a per-channel affine in front of the 1x1 head).

Parameter count, measured: 5.0M in 3D (the released default; a public issue reports 5.01M), not the
~1M of the paper's abstract; see docs/model_card.md. No deep supervision as published; ``deep_supervision``
adds 1x1 heads on the two lower decoder levels (always built, a few hundred parameters, so checkpoints
load either way). Norm, activation, kernel sizes and block counts of an nnU-Net plans file are ignored
(the topology is fixed); its strides must be LightM-UNet's (1, 2, 2, 2).
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures

from medmamba.layers.cnn_mamba import DepthwiseSeparableConv, RVMLayer
from medmamba.nets.conventions import DeepSupervisionSwitch, check_input, resolve_channels, resolve_spatial_dims

__all__ = ["LightMUNet", "ResMambaBlock", "ResUpBlock"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}


class ResMambaBlock(nn.Module):
    """GN-ReLU-RVM-GN-ReLU-RVM + identity. (batch, C, *S) -> (batch, C, *S)."""

    def __init__(self, channels: int, num_groups: int = 8, mamba_kwargs: dict | None = None):
        super().__init__()
        mamba_kwargs = mamba_kwargs or {}
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv1 = RVMLayer(channels, channels, **mamba_kwargs)
        self.conv2 = RVMLayer(channels, channels, **mamba_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act(self.norm1(x)))
        y = self.conv2(self.act(self.norm2(y)))
        return y + x


class ResUpBlock(nn.Module):
    """GN-ReLU-(depthwise k^d + pointwise) + s * identity, then GN-ReLU. (batch, C, *S) -> (batch, C, *S)."""

    def __init__(self, conv_op, channels: int, num_groups: int = 8, kernel_size: int = 3):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv = DepthwiseSeparableConv(conv_op, channels, channels, kernel_size)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.act(self.norm1(x))) + self.skip_scale * x
        return self.act(self.norm2(y))


class LightMUNetEncoder(nn.Module):
    """Stem + levels; returns the output of every level (full resolution first, bottleneck last)."""

    def __init__(self, conv_op, in_channels: int, init_filters: int, blocks_down: Sequence[int], num_groups: int,
                 mamba_kwargs: dict, dropout: nn.Module | None = None):
        super().__init__()
        dims = 3 if conv_op is nn.Conv3d else 2
        self.stem = DepthwiseSeparableConv(conv_op, in_channels, init_filters, 3)
        self.dropout = dropout
        levels = []
        for i, n_blocks in enumerate(blocks_down):
            c = init_filters * 2 ** i
            down = [] if i == 0 else [RVMLayer(c // 2, c, **mamba_kwargs), _MAXPOOL[dims](2, 2)]
            levels.append(nn.Sequential(*down, *[ResMambaBlock(c, num_groups, mamba_kwargs) for _ in range(n_blocks)]))
        self.levels = nn.ModuleList(levels)
        self.output_channels = [init_filters * 2 ** i for i in range(len(blocks_down))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        if self.dropout is not None:
            x = self.dropout(x)
        skips = []
        for level in self.levels:
            x = level(x)
            skips.append(x)
        return skips


class LightMUNetDecoder(DeepSupervisionSwitch, nn.Module):
    """Per level: 1x1 conv C -> C/2, x2 linear upsampling, add the skip, ResUp blocks; then the head.

    Returns logits at full resolution, or with ``deep_supervision`` a list (full resolution first) with
    one extra 1x1 head per lower decoder level. nnU-Net sets ``network.decoder.deep_supervision``; while
    it is off the extra heads do not require grad (:class:`DeepSupervisionSwitch`, for DDP).
    """

    def __init__(self, conv_op, channels: Sequence[int], out_channels: int, blocks_up: Sequence[int],
                 num_groups: int, deep_supervision: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.mode = "trilinear" if conv_op is nn.Conv3d else "bilinear"
        up_convs, up_layers, ds_heads = [], [], []
        for i, n_blocks in enumerate(blocks_up):
            c = channels[-(i + 1)]  # input width, deepest first
            up_convs.append(conv_op(c, c // 2, 1, bias=False))
            up_layers.append(nn.Sequential(*[ResUpBlock(conv_op, c // 2, num_groups) for _ in range(n_blocks)]))
            if i < len(blocks_up) - 1:
                ds_heads.append(conv_op(c // 2, out_channels, 1, bias=True))
        self.up_convs = nn.ModuleList(up_convs)
        self.up_layers = nn.ModuleList(up_layers)
        c0 = channels[0]
        self.head = nn.Sequential(nn.GroupNorm(num_groups, c0), nn.ReLU(inplace=True),
                                  DepthwiseSeparableConv(conv_op, c0, out_channels, 1, bias=True))
        self.ds_heads = nn.ModuleList(ds_heads)  # lowest resolution first, like up_layers
        self.deep_supervision = deep_supervision

    def _deep_supervision_only_modules(self):
        return list(self.ds_heads)

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        features = []
        for i, (conv, layer) in enumerate(zip(self.up_convs, self.up_layers)):
            skip = skips[-(i + 2)]
            x = F.interpolate(conv(x), size=skip.shape[2:], mode=self.mode, align_corners=False) + skip
            x = layer(x)
            features.append(x)
        out = self.head(x)
        if not self.deep_supervision:
            return out
        extra = [head(f) for head, f in zip(self.ds_heads, features[:-1])]
        return [out, *extra[::-1]]


class LightMUNet(AbstractDynamicNetworkArchitectures):
    """LightM-UNet: RVM/ResMamba encoder (32-64-128-256, 3 x2 downsamplings), light conv decoder.

    Input (batch, in_channels, *S) with S divisible by 8; output (batch, out_channels, *S) logits, or a
    list (full resolution first) with ``deep_supervision``. Parameters: 5.0M in 3D with the defaults
    (not the abstract's ~1M; see the module docstring).

    Args (MONAI names):
        in_channels, out_channels: input channels and classes (nnU-Net: ``input_channels``, ``num_classes``).
        spatial_dims: 2 or 3 (or implied by nnU-Net's ``conv_op``).
        init_filters: stem width (32 as in the authors' nnU-Net trainer); level i has init_filters * 2^i.
        blocks_down: ResMamba blocks per encoder level, (1, 2, 2, 4); its length - 1 downsamplings.
        blocks_up: ResUp blocks per decoder level, deepest first, (1, 1, 1).
        num_groups: GroupNorm groups (8).
        dropout_prob: dropout after the stem (None: none).
        deep_supervision: also return logits at 1/2 and 1/4 resolution (not published; off by default).
        d_state, d_conv, expand: Mamba settings (16, 4, 2).
        nnU-Net keys: ``features_per_stage`` must be (f, 2f, 4f, 8f) and sets ``init_filters``;
            ``n_stages`` must be len(blocks_down); ``strides`` must be (1, 2, 2, 2) (per axis lists allowed);
            ``dropout_op``/``dropout_op_kwargs`` add dropout after the stem; ``kernel_sizes``,
            ``n_conv_per_stage``, ``n_blocks_per_stage``, ``n_conv_per_stage_decoder``, ``conv_bias``,
            ``norm_op(_kwargs)``, ``nonlin(_kwargs)`` are accepted and ignored (fixed topology, GroupNorm,
            ReLU).
    """

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None,
                 spatial_dims: int | None = None, *, init_filters: int = 32,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1), num_groups: int = 8,
                 dropout_prob: float | None = None, deep_supervision: bool = False,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 # nnU-Net / dynamic_network_architectures names
                 input_channels: int | None = None, num_classes: int | None = None, n_stages: int | None = None,
                 features_per_stage: Sequence[int] | None = None, conv_op=None, kernel_sizes=None, strides=None,
                 n_conv_per_stage=None, n_blocks_per_stage=None, n_conv_per_stage_decoder=None, conv_bias=None,
                 norm_op=None, norm_op_kwargs=None, dropout_op=None, dropout_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None):
        super().__init__()
        name = type(self).__name__
        self.in_channels, self.out_channels = resolve_channels(name, in_channels, out_channels, input_channels,
                                                               num_classes)
        if isinstance(conv_op, str):
            conv_op = pydoc.locate(conv_op) or conv_op
        dims = self.spatial_dims = resolve_spatial_dims(name, spatial_dims, conv_op)
        conv_op = _CONV[dims]

        blocks_down, blocks_up = [int(b) for b in blocks_down], [int(b) for b in blocks_up]
        if len(blocks_down) < 2 or len(blocks_up) != len(blocks_down) - 1 or min(blocks_down + blocks_up) < 1:
            raise ValueError(f"{name}: blocks_down needs >= 2 levels and blocks_up one entry fewer, all >= 1; got "
                             f"blocks_down={blocks_down}, blocks_up={blocks_up}")
        n_levels = len(blocks_down)
        if n_stages is not None and int(n_stages) != n_levels:
            raise ValueError(f"{name}: has {n_levels} resolution levels (blocks_down={tuple(blocks_down)}), "
                             f"the plans ask for n_stages={n_stages}; LightM-UNet's topology is fixed")
        if features_per_stage is not None:
            f = [int(c) for c in features_per_stage] if np.ndim(features_per_stage) else [int(features_per_stage)]
            if len(f) != n_levels or f != [f[0] * 2 ** i for i in range(n_levels)]:
                raise ValueError(f"{name}: features_per_stage must have {n_levels} entries doubling at every level, "
                                 f"(f, 2f, 4f, ...), got {features_per_stage!r}")
            init_filters = f[0]
        if strides is not None:
            want = [[1] * dims] + [[2] * dims] * (n_levels - 1)
            got = [[int(a)] * dims if np.isscalar(a) else [int(b) for b in a] for a in
                   ([strides] * n_levels if np.isscalar(strides) else strides)]
            if got != want:
                raise ValueError(f"{name}: supports only its fixed downsampling, strides {want} (one x2 max-pool "
                                 f"per level after the first); got strides={[list(map(int, g)) for g in got]}. "
                                 f"Set the plans' strides and patch size accordingly.")
        if init_filters < num_groups or init_filters % num_groups:
            raise ValueError(f"{name}: init_filters={init_filters} must be a multiple of num_groups={num_groups}")

        if dropout_op is not None:
            op = pydoc.locate(dropout_op) if isinstance(dropout_op, str) else dropout_op
            dropout = op(**(dropout_op_kwargs or {}))
        elif dropout_prob is not None:
            dropout = _DROPOUT[dims](dropout_prob)
        else:
            dropout = None

        self.init_filters, self.blocks_down, self.blocks_up = init_filters, tuple(blocks_down), tuple(blocks_up)
        self.divisor = 2 ** (n_levels - 1)
        self._expand = expand
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.encoder = LightMUNetEncoder(conv_op, self.in_channels, init_filters, blocks_down, num_groups,
                                         mamba_kwargs, dropout)
        self.decoder = LightMUNetDecoder(conv_op, self.encoder.output_channels, self.out_channels, blocks_up,
                                         num_groups, deep_supervision)
        # transfer keys; the stem's depthwise conv (encoder.stem.depthwise) also depends on in_channels.
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.pointwise",)

    def forward(self, x: torch.Tensor):
        """(batch, in_channels, *S) -> logits (batch, out_channels, *S), or a list with deep supervision."""
        check_input(type(self).__name__, x, self.spatial_dims, self.in_channels, self.divisor)
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Rough count of stored feature-map elements for a batch-1 input (nnU-Net's VRAM proxy).

        Per encoder block: 2 GN/ReLU outputs + 2 RVM layers x (tokens x (2 + 4 * expand)) x C; per
        decoder level: the upsampled map and 3 block maps; stem and head.
        """
        if len(input_size) != self.spatial_dims:
            raise ValueError(f"LightMUNet: give the spatial size only, e.g. (D, H, W); got {input_size}")
        vox = int(np.prod(input_size))
        out = np.int64(self.init_filters * vox * 2)  # stem (depthwise keeps in_channels; ignored)
        rvm = 2 + 4 * self._expand
        for i, n in enumerate(self.blocks_down):
            v, c = vox // (2 ** i) ** self.spatial_dims, self.encoder.output_channels[i]
            if i:
                out += np.int64((vox // (2 ** (i - 1)) ** self.spatial_dims) * c // 2 * rvm + v * c)
            out += np.int64(n * v * c * (2 + 2 * rvm))
        for i in range(len(self.blocks_up)):
            lvl = len(self.blocks_down) - 2 - i
            v, c = vox // (2 ** lvl) ** self.spatial_dims, self.encoder.output_channels[lvl]
            out += np.int64(v * c * (2 + 3 * self.blocks_up[i]))
        return out + np.int64(vox * (self.init_filters * 2 + self.out_channels))
