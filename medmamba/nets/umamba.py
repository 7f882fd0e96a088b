"""U-Mamba (Ma, Li & Wang 2024): nnU-Net's residual U-Net with Mamba layers, 2D and 3D.

``UMambaBot`` puts one Mamba layer on the bottleneck; ``UMambaEnc`` puts one after every encoder stage
(3D; in 2D after alternate stages, always the last). Both follow the published structure:

* encoder: a stem (residual block in -> C0 at stride 1, then more blocks) and one stage per plans
  entry: residual block with a strided 1x1-conv shortcut, then ``BasicBlockD`` blocks; InstanceNorm
  (affine), LeakyReLU, conv bias, He init (negative slope 1e-2);
* the published block schedule overrides the plans: encoder stages >= ceil(n/2) get 1 block, decoder
  stages (deepest first) ceil((n-1)/2 + 0.5) .. n-2 get 1 block (``published_block_schedule=False``
  keeps the plans' numbers);
* decoder: nearest upsampling by the stride + 1x1 conv to the skip width, concatenation with the skip,
  residual blocks, a 1x1 head per stage; the 2D code leaves the full-resolution skip out of its last
  stage (``concat_full_resolution_skip``, default as published per dimension); with ``deep_supervision`` the outputs come as a list, highest
  resolution first, otherwise one tensor of logits (no softmax).

Module names follow the published code (``encoder.stem``, ``encoder.stages``, ``encoder.mamba_layers``,
``mamba_layer``, ``decoder.upsample_layers``/``stages``/``seg_layers``), so its state dicts map one to one.

Constructors take MONAI keywords (``in_channels, out_channels, spatial_dims``) or nnU-Net's
``dynamic_network_architectures`` keywords (``input_channels, num_classes, conv_op, ...``), so an nnU-Net
plans file can name ``medmamba.nets.umamba.UMambaBot`` in ``architecture.network_class_name``.
"""
from __future__ import annotations

import math
import pydoc
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.initialization.weight_init import InitWeights_He

from medmamba.layers.cnn_mamba import MambaLayer, NearestUpsampleConv, ResidualBlock
from medmamba.nets.conventions import DeepSupervisionSwitch, check_input, resolve_channels, resolve_spatial_dims

__all__ = ["UMambaBot", "UMambaEnc", "UMambaEncoder", "UMambaDecoder"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
# nnU-Net's caps on the feature width (3d_fullres: 320, 2d: 512) and its typical patch sizes.
_MAX_FEATURES = {2: 512, 3: 320}
_DEFAULT_PATCH = {2: (256, 256), 3: (128, 128, 128)}


def _locate(cls_name: str, key: str, value):
    """nnU-Net plans name classes by dotted path; resolve strings, pass classes through."""
    if value is None or not isinstance(value, str):
        return value
    found = pydoc.locate(value)
    if found is None:
        raise ValueError(f"{cls_name}: {key}={value!r} cannot be imported")
    return found


def _per_stage_ints(cls_name: str, key: str, value, n_stages: int, minimum: int = 1) -> list[int]:
    values = [int(value)] * n_stages if isinstance(value, (int, np.integer)) else [int(v) for v in value]
    if len(values) != n_stages:
        raise ValueError(f"{cls_name}: {key} must have {n_stages} entries (one per stage), got {list(value)}")
    if any(v < minimum for v in values):
        raise ValueError(f"{cls_name}: every entry of {key} must be >= {minimum}, got {values}")
    return values


def _per_stage_axes(cls_name: str, key: str, value, n_stages: int, dims: int) -> list[list[int]]:
    """Kernel sizes / strides: an int, one int per stage, or one list per stage (nnU-Net plans)."""
    if isinstance(value, (int, np.integer)):
        value = [value] * n_stages
    value = list(value)
    if len(value) != n_stages:
        raise ValueError(f"{cls_name}: {key} must have {n_stages} entries (one per stage), got {value}")
    out = []
    for v in value:
        axes = [int(v)] * dims if isinstance(v, (int, np.integer)) else [int(a) for a in v]
        if len(axes) != dims or any(a < 1 for a in axes):
            raise ValueError(f"{cls_name}: {key} entries must be positive ints or lists of {dims}, got {value}")
        out.append(axes)
    return out


class UMambaEncoder(nn.Module):
    """Residual encoder of U-Mamba with an optional Mamba layer after each stage.

    (batch, input_channels, *S) -> list of stage outputs, stage s of shape
    (batch, features_per_stage[s], *S / prod(strides[:s+1])); the last entry is the bottleneck.
    ``mamba_layers``: one module (or None) per stage, applied to the stage output; its output replaces
    the map, both as skip and as input of the next stage.
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], conv_op, kernel_sizes, strides,
                 n_blocks_per_stage: Sequence[int], conv_bias: bool = True, norm_op=None, norm_op_kwargs=None,
                 dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 mamba_layers: Sequence[nn.Module | None] | None = None):
        super().__init__()
        n_stages = len(features_per_stage)
        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                      dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)

        def stage(c_in, c_out, kernel, stride, n_blocks):
            return nn.Sequential(
                ResidualBlock(conv_op, c_in, c_out, kernel, stride, projection=True, **common),
                *[BasicBlockD(conv_op, c_out, c_out, kernel, 1, **common) for _ in range(n_blocks - 1)])

        self.stem = stage(input_channels, features_per_stage[0], kernel_sizes[0], 1, n_blocks_per_stage[0])
        self.stages = nn.ModuleList(
            stage(features_per_stage[s - 1] if s else features_per_stage[0], features_per_stage[s], kernel_sizes[s],
                  strides[s], n_blocks_per_stage[s]) for s in range(n_stages))
        if mamba_layers is not None:
            if len(mamba_layers) != n_stages:
                raise ValueError(f"UMambaEncoder: mamba_layers needs {n_stages} entries, got {len(mamba_layers)}")
            self.mamba_layers = nn.ModuleList(m if m is not None else nn.Identity() for m in mamba_layers)
        else:
            self.mamba_layers = None

        # what a decoder needs (same attribute names as dynamic_network_architectures' encoders)
        self.output_channels = list(features_per_stage)
        self.strides = [list(s) for s in strides]
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.dropout_op, self.dropout_op_kwargs = dropout_op, dropout_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is not None:
                x = self.mamba_layers[s](x)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = _blocks_feature_map_size(self.stem, input_size)
        for s, stage in enumerate(self.stages):
            output += _blocks_feature_map_size(stage, input_size)
            input_size = [i // j for i, j in zip(input_size, self.strides[s])]
            if self.mamba_layers is not None:
                output += _mamba_feature_map_size(self.mamba_layers[s], self.output_channels[s], input_size)
        return output


class UMambaDecoder(DeepSupervisionSwitch, nn.Module):
    """U-Mamba's residual decoder: per stage, upsample (nearest + 1x1), concat skip, residual blocks, head.

    Takes the encoder's skips (bottleneck last). Returns (batch, num_classes, *S) logits, or with
    ``deep_supervision`` a list of len(skips) - 1 logit maps, highest resolution first. The heads are
    always built, so a checkpoint trained with deep supervision loads into a network without it.
    nnU-Net flips ``network.decoder.deep_supervision``; while it is off the heads it alone uses do not
    require grad (:class:`DeepSupervisionSwitch`, for DDP).
    """

    def __init__(self, encoder: UMambaEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 deep_supervision: bool = False, concat_full_resolution_skip: bool = True):
        super().__init__()
        # The published 2D code (UMambaBot_2d.py / UMambaEnc_2d.py) does not concatenate the highest-
        # resolution skip in its last decoder stage (input C0, not 2 C0); the 3D code does.
        self.concat_full_resolution_skip = bool(concat_full_resolution_skip)
        self.deep_supervision = deep_supervision
        self.encoder = encoder  # as in dynamic_network_architectures: the decoder reads the encoder's layout
        self.num_classes = num_classes
        n_enc = len(encoder.output_channels)
        if len(n_conv_per_stage) != n_enc - 1:
            raise ValueError(f"UMambaDecoder: n_conv_per_stage_decoder needs {n_enc - 1} entries, "
                             f"got {list(n_conv_per_stage)}")
        common = dict(conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                      dropout_op=encoder.dropout_op, dropout_op_kwargs=encoder.dropout_op_kwargs,
                      nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)
        conv_op = encoder.conv_op
        upsample_layers, stages, seg_layers = [], [], []
        for s in range(1, n_enc):
            below, skip = encoder.output_channels[-s], encoder.output_channels[-(s + 1)]
            kernel = encoder.kernel_sizes[-(s + 1)]
            upsample_layers.append(NearestUpsampleConv(conv_op, below, skip, encoder.strides[-s]))
            concat = s < n_enc - 1 or self.concat_full_resolution_skip
            stages.append(nn.Sequential(
                ResidualBlock(conv_op, (2 if concat else 1) * skip, skip, kernel, 1, projection=True, **common),
                *[BasicBlockD(conv_op, skip, skip, kernel, 1, **common) for _ in range(n_conv_per_stage[s - 1] - 1)]))
            seg_layers.append(conv_op(skip, num_classes, 1, 1, 0, bias=True))
        self.upsample_layers = nn.ModuleList(upsample_layers)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.deep_supervision = deep_supervision

    def _deep_supervision_only_modules(self):
        return list(self.seg_layers)[:-1]

    def forward(self, skips: Sequence[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for s, stage in enumerate(self.stages):
            skip = skips[-(s + 2)]
            x = self.upsample_layers[s](x, size=skip.shape[2:])
            if s < len(self.stages) - 1 or self.concat_full_resolution_skip:
                x = torch.cat((x, skip), dim=1)
            x = stage(x)
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                outputs.append(self.seg_layers[-1](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """input_size is the encoder's input size."""
        skip_sizes = []
        for stride in self.encoder.strides[:-1]:
            input_size = [i // j for i, j in zip(input_size, stride)]
            skip_sizes.append(input_size)
        output = np.int64(0)
        for s, stage in enumerate(self.stages):
            size = skip_sizes[-(s + 1)]
            output += _blocks_feature_map_size(stage, size)
            output += np.prod([self.encoder.output_channels[-(s + 2)], *size], dtype=np.int64)  # upsampled
            if self.deep_supervision or s == len(self.stages) - 1:
                output += np.prod([self.num_classes, *size], dtype=np.int64)
        return output


def _blocks_feature_map_size(seq: nn.Sequential, input_size: Sequence[int]) -> np.int64:
    output = np.int64(0)
    for block in seq:
        output += block.compute_conv_feature_map_size(input_size)
        input_size = [i // j for i, j in zip(input_size, block.stride)]
    return output


def _mamba_feature_map_size(layer: nn.Module, channels: int, size: Sequence[int]) -> np.int64:
    """Rough activation count of a Mamba layer over a (channels, *size) map: tokens x d_model = channels x
    voxels either way, times (LN out 1 + in_proj 2E + conv E + scan out E + out_proj 1) for expand E.

    The chunked scan's own workspace is not included.
    """
    if not isinstance(layer, MambaLayer):
        return np.int64(0)
    return np.prod([channels, *size], dtype=np.int64) * np.int64(2 + 4 * layer.mamba.expand)


class _UMamba(AbstractDynamicNetworkArchitectures):
    """Shared constructor of UMambaBot / UMambaEnc (see the module docstring)."""

    _placement = "bottleneck"

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None,
                 spatial_dims: int | None = None, *,
                 features_per_stage: Sequence[int] | int | None = None,
                 kernel_sizes=3, strides=None, n_blocks_per_stage=None, n_conv_per_stage_decoder=None,
                 deep_supervision: bool = False, patch_size: Sequence[int] | int | None = None,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, published_block_schedule: bool = True,
                 concat_full_resolution_skip: bool | None = None,
                 # nnU-Net / dynamic_network_architectures names
                 input_channels: int | None = None, num_classes: int | None = None, n_stages: int | None = None,
                 conv_op=None, n_conv_per_stage=None, conv_bias: bool = True, norm_op=None,
                 norm_op_kwargs: dict | None = None, dropout_op=None, dropout_op_kwargs: dict | None = None,
                 nonlin=None, nonlin_kwargs: dict | None = None):
        super().__init__()
        name = type(self).__name__
        self.in_channels, self.out_channels = resolve_channels(name, in_channels, out_channels, input_channels,
                                                               num_classes)
        conv_op = _locate(name, "conv_op", conv_op)
        dims = self.spatial_dims = resolve_spatial_dims(name, spatial_dims, conv_op)
        conv_op = conv_op or _CONV[dims]

        # stages: from n_stages, features_per_stage or strides, whichever is given (default 5)
        if n_stages is None:
            if features_per_stage is not None and not isinstance(features_per_stage, (int, np.integer)):
                n_stages = len(features_per_stage)
            elif strides is not None and not isinstance(strides, (int, np.integer)):
                n_stages = len(strides)
            else:
                n_stages = 5
        if int(n_stages) < 2:
            raise ValueError(f"{name}: n_stages must be >= 2 (a U-Net needs a bottleneck), got {n_stages}")
        n_stages = int(n_stages)
        if features_per_stage is None:
            features_per_stage = [min(32 * 2 ** i, _MAX_FEATURES[dims]) for i in range(n_stages)]
        features = _per_stage_ints(name, "features_per_stage", features_per_stage, n_stages)
        if strides is None:
            strides = [1] + [2] * (n_stages - 1)
        strides = _per_stage_axes(name, "strides", strides, n_stages, dims)
        kernel_sizes = _per_stage_axes(name, "kernel_sizes", kernel_sizes, n_stages, dims)
        if any(k % 2 == 0 for ks in kernel_sizes for k in ks):
            raise ValueError(f"{name}: kernel sizes must be odd (same padding), got {kernel_sizes}")

        # ResEnc plans say n_blocks_per_stage, plain plans n_conv_per_stage: blocks per stage either way
        if n_blocks_per_stage is not None and n_conv_per_stage is not None and \
                _per_stage_ints(name, "n_blocks_per_stage", n_blocks_per_stage, n_stages) != \
                _per_stage_ints(name, "n_conv_per_stage", n_conv_per_stage, n_stages):
            raise ValueError(f"{name}: n_blocks_per_stage={n_blocks_per_stage} contradicts "
                             f"n_conv_per_stage={n_conv_per_stage} (give one of them)")
        blocks = n_blocks_per_stage if n_blocks_per_stage is not None else n_conv_per_stage
        blocks = _per_stage_ints(name, "n_blocks_per_stage", 2 if blocks is None else blocks, n_stages)
        dec_blocks = _per_stage_ints(name, "n_conv_per_stage_decoder",
                                     2 if n_conv_per_stage_decoder is None else n_conv_per_stage_decoder, n_stages - 1)
        if published_block_schedule:
            for s in range(math.ceil(n_stages / 2), n_stages):
                blocks[s] = 1
            for s in range(math.ceil((n_stages - 1) / 2 + 0.5), n_stages - 1):
                dec_blocks[s] = 1

        norm_op = _locate(name, "norm_op", norm_op)
        nonlin = _locate(name, "nonlin", nonlin)
        dropout_op = _locate(name, "dropout_op", dropout_op)
        if norm_op is None:
            norm_op = _INSTANCE_NORM[dims]
            norm_op_kwargs = {"eps": 1e-5, "affine": True} if norm_op_kwargs is None else norm_op_kwargs
        if nonlin is None:
            nonlin = nn.LeakyReLU
            nonlin_kwargs = {"negative_slope": 1e-2, "inplace": True} if nonlin_kwargs is None else nonlin_kwargs
        if dropout_op is not None and dropout_op_kwargs is None:
            dropout_op_kwargs = {}

        self.n_stages, self.features_per_stage = n_stages, features
        self.strides, self.kernel_sizes = strides, kernel_sizes
        self.n_blocks_per_stage, self.n_conv_per_stage_decoder = blocks, dec_blocks
        # the input must be divisible by the product of all strides, per axis
        self.divisor = tuple(int(np.prod([s[a] for s in strides])) for a in range(dims))
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand)

        self.patch_size = self._resolve_patch_size(name, patch_size, dims)
        # voxel count per stage at the build-time patch size (stage s after its stride)
        size, self.stage_sizes = list(self.patch_size), []
        for st in strides:
            size = [i // j for i, j in zip(size, st)]
            self.stage_sizes.append(tuple(size))

        enc_mamba = None
        self.channel_token = [False] * n_stages
        if self._placement == "encoder":
            enc_mamba = []
            for s in range(n_stages):
                if dims == 2 and (n_stages - 1 - s) % 2:  # 2D: alternate stages, always the last
                    enc_mamba.append(None)
                    continue
                voxels = int(np.prod(self.stage_sizes[s]))
                self.channel_token[s] = voxels <= features[s]
                enc_mamba.append(MambaLayer(voxels if self.channel_token[s] else features[s],
                                            channel_token=self.channel_token[s], **mamba_kwargs))

        self.encoder = UMambaEncoder(self.in_channels, features, conv_op, kernel_sizes, strides, blocks, conv_bias,
                                     norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                                     mamba_layers=enc_mamba)
        if self._placement == "bottleneck":
            self.mamba_layer = MambaLayer(features[-1], **mamba_kwargs)
        if concat_full_resolution_skip is None:  # as published: 3D concatenates it, 2D does not
            concat_full_resolution_skip = dims == 3
        self.concat_full_resolution_skip = bool(concat_full_resolution_skip)
        self.decoder = UMambaDecoder(self.encoder, self.out_channels, dec_blocks, deep_supervision,
                                     concat_full_resolution_skip=self.concat_full_resolution_skip)

        # dynamic_network_architectures transfer keys. The stem's first block also has a 1x1 shortcut
        # conv that takes the input channels: encoder.stem.0.conv3 (not listed: its shape differs).
        self.key_to_encoder = "encoder"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.0.conv1",)
        self.apply(self.initialize)

    @staticmethod
    def _resolve_patch_size(name, patch_size, dims):
        if patch_size is None:
            return _DEFAULT_PATCH[dims]
        ps = [int(patch_size)] * dims if isinstance(patch_size, (int, np.integer)) else [int(p) for p in patch_size]
        if len(ps) != dims or any(p < 1 for p in ps):
            raise ValueError(f"{name}: patch_size must be a positive int or {dims} positive ints, got {patch_size!r}")
        return tuple(ps)

    def forward(self, x: torch.Tensor):
        """(batch, in_channels, *S) -> logits (batch, out_channels, *S), or a list with deep supervision."""
        check_input(type(self).__name__, x, self.spatial_dims, self.in_channels, self.divisor)
        self._check_channel_tokens(x)
        skips = self.encoder(x)
        if self._placement == "bottleneck":
            skips[-1] = self.mamba_layer(skips[-1])
        return self.decoder(skips)

    def _check_channel_tokens(self, x: torch.Tensor) -> None:
        if not any(self.channel_token):
            return
        size = list(x.shape[2:])
        for s, st in enumerate(self.strides):
            size = [i // j for i, j in zip(size, st)]
            if self.channel_token[s] and tuple(size) != self.stage_sizes[s]:
                raise ValueError(
                    f"{type(self).__name__}: stage {s} was built with channels as tokens for patch_size="
                    f"{self.patch_size} (feature map {self.stage_sizes[s]}, {int(np.prod(self.stage_sizes[s]))} "
                    f"voxels), so its input size is fixed; got input spatial shape {tuple(x.shape[2:])}. Feed "
                    f"patches of that size (e.g. sliding-window inference with roi_size={self.patch_size}) or "
                    f"build the network with patch_size equal to your input size.")

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements for a (batch 1) input of spatial size ``input_size`` (nnU-Net's VRAM proxy).

        Counts conv outputs as dynamic_network_architectures does, plus a rough term per Mamba layer.
        """
        if len(input_size) != self.spatial_dims:
            raise ValueError(f"{type(self).__name__}: give the spatial size only, e.g. (D, H, W); got {input_size}")
        output = self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
        if self._placement == "bottleneck":
            size = list(input_size)
            for st in self.strides:
                size = [i // j for i, j in zip(size, st)]
            output += _mamba_feature_map_size(self.mamba_layer, self.features_per_stage[-1], size)
        return output

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init (negative slope 1e-2) of every Conv2d/3d, as U-Mamba; Mamba's Conv1d/Linear keep theirs."""
        InitWeights_He(1e-2)(module)


_ARGS_DOC = """
    Args (MONAI names):
        in_channels, out_channels: input channels and classes (nnU-Net: ``input_channels``, ``num_classes``).
        spatial_dims: 2 or 3 (or implied by nnU-Net's ``conv_op``).
        features_per_stage: channels per stage; default min(32 * 2^i, 320 in 3D / 512 in 2D).
        kernel_sizes, strides: per stage (int, or one list per stage); default 3 and (1, 2, 2, 2, 2). The
            input's spatial size must be divisible by the product of the strides (16 by default).
        n_blocks_per_stage (nnU-Net: also ``n_conv_per_stage``), n_conv_per_stage_decoder: blocks per
            stage, default 2; see ``published_block_schedule``.
        deep_supervision: return a list of logits (highest resolution first) instead of one tensor.
        patch_size: the training patch size; only UMambaEnc uses it (channels-as-tokens rule); default
            128^3 (3D) / 256^2 (2D).
        d_state, d_conv, expand: Mamba settings (16, 4, 2 as published).
        published_block_schedule: force U-Mamba's 1-block stages (True as published).
        concat_full_resolution_skip: whether the last decoder stage concatenates the highest-resolution
            skip (input 2 C0) or works on the upsampled map alone (input C0). Default (None) as published:
            True in 3D (UMambaBot_3d.py / UMambaEnc_3d.py), False in 2D (UMambaBot_2d.py /
            UMambaEnc_2d.py). Either way the module names (and, at the default, shapes) are the
            published ones.
        n_stages, conv_op, conv_bias, norm_op(_kwargs), dropout_op(_kwargs), nonlin(_kwargs): nnU-Net
            plans keys; defaults InstanceNorm (eps 1e-5, affine), LeakyReLU(0.01), conv bias, no dropout.
"""


class UMambaBot(_UMamba):
    """U-Mamba Bot: nnU-Net residual U-Net with one Mamba layer (LN + Mamba) on the bottleneck.

    The bottleneck (batch, C_last, *S/16) is flattened to S/16 voxel tokens of width C_last; its Mamba
    output replaces the map. ``patch_size`` is accepted (for a uniform trainer) and ignored.
    Input (batch, in_channels, *S), S divisible by the total stride; output (batch, out_channels, *S).
    """
    _placement = "bottleneck"


class UMambaEnc(_UMamba):
    """U-Mamba Enc: a Mamba layer after every encoder stage (3D); in 2D after alternate stages ending at the last.

    A stage whose feature map (at the build-time ``patch_size``) has no more voxels than channels uses
    the channels as tokens (d_model = voxel count), which fixes that stage's spatial size: such a
    network only accepts inputs of ``patch_size`` (clear error otherwise). With no such stage any
    input divisible by the total stride works. Stage 0 runs at full resolution: at 128^3 its Mamba
    layer scans 2M tokens, which dominates the cost.
    Input (batch, in_channels, *S); output (batch, out_channels, *S).
    """
    _placement = "encoder"


UMambaBot.__doc__ += _ARGS_DOC
UMambaEnc.__doc__ += _ARGS_DOC
