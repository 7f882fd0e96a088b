"""Convolution and Mamba-layer building blocks for the CNN-Mamba networks (U-Mamba, LightM-UNet).

Small modules composed by explicit constructor arguments, in the style of
``dynamic_network_architectures.building_blocks``. Every block states its input and output shapes;
``S`` stands for the spatial axes (H, W) or (D, H, W).
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

from medmamba.layers.mamba import Mamba, fp32_region

__all__ = ["ResidualBlock", "NearestUpsampleConv", "DepthwiseSeparableConv", "MambaLayer", "RVMLayer",
           "fp32_region"]


def _per_axis(conv_op: Type[_ConvNd], value) -> list[int]:
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]
    if isinstance(value, (int, np.integer)):
        return [int(value)] * dims
    value = [int(v) for v in value]
    if len(value) != dims:
        raise ValueError(f"expected {dims} values (one per spatial axis), got {value}")
    return value


class ResidualBlock(nn.Module):
    """U-Mamba's residual block: conv(k, stride)-norm-nonlin-conv(k)-norm + shortcut, nonlin after the add.

    The shortcut is a 1x1 convolution with the block's stride whenever ``projection`` is true (U-Mamba
    uses it for the first block of every stage, even where an identity would fit) or the shapes
    change; otherwise the identity. Unlike ``BasicBlockD`` (ResNet-D: avg-pool + 1x1 conv + norm),
    the published shortcut is one strided 1x1 conv with bias and no norm.

    Attribute names (conv1, norm1, act1, conv2, norm2, act2, conv3) follow the published U-Mamba code
    so its checkpoints map one to one. (batch, in_channels, *S) -> (batch, out_channels, *S / stride).
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 kernel_size: Union[int, Sequence[int]] = 3, stride: Union[int, Sequence[int]] = 1,
                 conv_bias: bool = True, norm_op: Type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 dropout_op: Type[nn.Module] | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = None, nonlin_kwargs: dict | None = None,
                 projection: bool = True):
        super().__init__()
        kernel_size = _per_axis(conv_op, kernel_size)
        stride = _per_axis(conv_op, stride)
        padding = [k // 2 for k in kernel_size]
        self.input_channels, self.output_channels, self.stride = input_channels, output_channels, stride
        norm_op_kwargs = norm_op_kwargs or {}
        nonlin_kwargs = nonlin_kwargs or {}

        def norm():
            return norm_op(output_channels, **norm_op_kwargs) if norm_op is not None else nn.Identity()

        def act():
            return nonlin(**nonlin_kwargs) if nonlin is not None else nn.Identity()

        self.conv1 = conv_op(input_channels, output_channels, kernel_size, stride=stride, padding=padding,
                             bias=conv_bias)
        self.dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else None
        self.norm1, self.act1 = norm(), act()
        self.conv2 = conv_op(output_channels, output_channels, kernel_size, stride=1, padding=padding, bias=conv_bias)
        self.norm2, self.act2 = norm(), act()
        needs_projection = input_channels != output_channels or any(s != 1 for s in stride)
        self.conv3 = (conv_op(input_channels, output_channels, 1, stride=stride, bias=conv_bias)
                      if projection or needs_projection else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.dropout is not None:
            y = self.dropout(y)
        y = self.act1(self.norm1(y))
        y = self.norm2(self.conv2(y))
        y += self.conv3(x) if self.conv3 is not None else x  # in place, as BasicBlockD (the norm keeps no output)
        return self.act2(y)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Voxels x channels of the block's feature maps (nnU-Net's VRAM proxy)."""
        size = [i // s for i, s in zip(input_size, self.stride)]
        n = np.prod([self.output_channels, *size], dtype=np.int64)
        return n * (3 if self.conv3 is not None else 2)


class NearestUpsampleConv(nn.Module):
    """U-Mamba's decoder upsampling: nearest upsampling by the stride, then a 1x1 conv to the skip width.

    The 1x1 conv runs before the upsampling here: for nearest-neighbour upsampling the two orders give
    the same numbers, and this one costs stride^d times fewer FLOPs.
    (batch, in_channels, *S) -> (batch, out_channels, *S * stride).
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int,
                 stride: Union[int, Sequence[int]]):
        super().__init__()
        self.stride = _per_axis(conv_op, stride)
        self.output_channels = output_channels
        self.conv = conv_op(input_channels, output_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        x = self.conv(x)
        if size is None:
            size = [s * k for s, k in zip(x.shape[2:], self.stride)]
        if tuple(size) == tuple(x.shape[2:]):
            return x
        return F.interpolate(x, size=tuple(size), mode="nearest")


class DepthwiseSeparableConv(nn.Module):
    """Depthwise k^d conv (groups = in_channels) followed by a pointwise 1x1 conv, no norm.

    (batch, in_channels, *S) -> (batch, out_channels, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int, kernel_size: int = 3,
                 bias: bool = False):
        super().__init__()
        self.depthwise = conv_op(input_channels, input_channels, kernel_size, padding=kernel_size // 2,
                                 groups=input_channels, bias=bias)
        self.pointwise = conv_op(input_channels, output_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, L, C), tokens in raster order (last spatial axis fastest)."""
    return x.flatten(2).transpose(1, 2)


def _from_tokens(t: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """(B, L, C) -> (B, C, *S), inverse of :func:`_to_tokens`."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *spatial)


class MambaLayer(nn.Module):
    """U-Mamba's Mamba layer: feature map -> tokens -> LayerNorm -> Mamba -> feature map, no residual.

    ``channel_token=False``: tokens are the voxels in raster order (last axis fastest), d_model = ``dim``
    = channels; works for any spatial size. ``channel_token=True``: tokens are the channels and d_model
    = ``dim`` = number of voxels, which U-Mamba Enc uses when a stage has no more voxels than channels;
    the voxel count is then fixed at build time.

    Runs in float32 with autocast disabled (the output is cast back to the input dtype).
    (batch, C, *S) -> (batch, C, *S).
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, channel_token: bool = False):
        super().__init__()
        self.dim = int(dim)
        self.channel_token = bool(channel_token)
        self.norm = nn.LayerNorm(self.dim)
        self.mamba = Mamba(d_model=self.dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channel_token={self.channel_token}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        expected = spatial.numel() if self.channel_token else x.shape[1]
        if expected != self.dim:
            what = "voxels (channels are the tokens)" if self.channel_token else "channels"
            raise ValueError(f"MambaLayer: built for {self.dim} {what}, got a feature map of shape "
                             f"{tuple(x.shape)}")
        in_dtype = x.dtype
        with fp32_region(x):
            h = x.to(torch.promote_types(in_dtype, torch.float32))
            if self.channel_token:
                out = self.mamba(self.norm(h.flatten(2))).reshape(h.shape)  # (B, C, V): C tokens of V features
            else:
                out = _from_tokens(self.mamba(self.norm(_to_tokens(h))), spatial)
        return out.to(in_dtype)


class RVMLayer(nn.Module):
    """LightM-UNet's Residual Vision Mamba layer over voxel tokens in raster order.

    x^ = LN(x); y = Mamba(x^) + s * x (s a learnable scalar, init 1; x un-normalised);
    y = LN(y) with the same LayerNorm; Linear C_in -> C_out. Runs in float32 with autocast disabled.
    (batch, C_in, *S) -> (batch, C_out, *S).
    """

    def __init__(self, input_dim: int, output_dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.norm = nn.LayerNorm(self.input_dim)
        self.mamba = Mamba(d_model=self.input_dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(self.input_dim, self.output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.input_dim:
            raise ValueError(f"RVMLayer: expected {self.input_dim} channels, got shape {tuple(x.shape)}")
        in_dtype = x.dtype
        with fp32_region(x):
            t = _to_tokens(x.to(torch.promote_types(in_dtype, torch.float32)))
            y = self.mamba(self.norm(t)) + self.skip_scale * t
            y = self.proj(self.norm(y))
            out = _from_tokens(y, x.shape[2:])
        return out.to(in_dtype)
