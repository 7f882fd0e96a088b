"""Convolutional blocks with a channels-first LayerNorm (ConvNeXt / MedNeXt style), 3D.

* ``ChannelsFirstLayerNorm(C, eps=1e-6)``: LayerNorm over the channel axis of a (B, C, *S) tensor, at
  every voxel (ConvNeXt's ``data_format="channels_first"``); parameters ``weight``/``bias`` of shape (C,).
  Not MONAI's MedNeXt norms: its ``"group"`` is GroupNorm(C, C) (each channel over space) and its
  ``"layer"`` normalises over (C, k, k, k).
* ``MedNeXtBlock(C, expansion, kernel_size)``: x + conv3(GELU(conv2(norm(conv1(x))))) with conv1 depthwise
  k^3, conv2 1x1 C -> expansion*C, conv3 1x1 back to C (all with bias).
* ``LNResBlock(C_in, C_out, kernel_size=3)``: conv1 k^3 - norm1 - LeakyReLU(0.01) - conv2 k^3 - norm2, plus
  the input (through a 1x1 conv3 + norm3 when C_in != C_out), LeakyReLU(0.01); convs with bias, norms
  channels-first LayerNorms. The nnU-Net/DynUNet residual block with LayerNorms instead of instance norms.

These are the blocks of HyMamba (``medmamba.nets.hymamba``); submodule names follow it, so its checkpoints
load into them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ChannelsFirstLayerNorm", "MedNeXtBlock", "LNResBlock"]


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over axis 1 of (B, C, *S) (biased variance, ``eps`` inside the square root)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.normalized_shape[0]:
            raise ValueError(f"ChannelsFirstLayerNorm: expected (B, {self.normalized_shape[0]}, *S), got shape "
                             f"{tuple(x.shape)}")
        # the last axis is channels for F.layer_norm: move C there and back (same arithmetic as mean/var over C)
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class MedNeXtBlock(nn.Module):
    """Residual MedNeXt block (3D): depthwise conv - channels-first LN - 1x1 expand - GELU - 1x1 compress."""

    def __init__(self, channels: int, expansion: int = 4, kernel_size: int = 3, eps: float = 1e-6):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelsFirstLayerNorm(channels, eps)
        self.conv2 = nn.Conv3d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.conv3 = nn.Conv3d(expansion * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv3(self.act(self.conv2(self.norm(self.conv1(x)))))


class LNResBlock(nn.Module):
    """Two k^3 convs with channels-first LayerNorms and LeakyReLU(0.01), residual (projected if C changes)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, eps: float = 1e-6):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.lrelu = nn.LeakyReLU(0.01)
        self.norm1 = ChannelsFirstLayerNorm(out_channels, eps)
        self.norm2 = ChannelsFirstLayerNorm(out_channels, eps)
        if in_channels != out_channels:
            self.conv3 = nn.Conv3d(in_channels, out_channels, 1)
            self.norm3 = ChannelsFirstLayerNorm(out_channels, eps)
        else:
            self.conv3 = self.norm3 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        res = x if self.conv3 is None else self.norm3(self.conv3(x))
        return self.lrelu(out + res)
