"""Masked-encoder wrappers: a segmentation network's own encoder modules run with MambaMIM masking.

A wrapper holds the downstream network's encoder submodules under the network's attribute names
(``encoder``, and ``mamba_layer`` for U-Mamba Bot), so ``wrapper.state_dict()`` has exactly the keys of
those parts of the segmentation network and loads into it strictly. ``forward(x, pyramid)`` returns the
encoder's feature maps (highest resolution first, the bottleneck last), sparse: zero at masked positions.
With ``pyramid=None`` it computes exactly what the network's encoder computes.

* U-Mamba Bot / Enc: stem and residual stages sparse (zeroed masked voxels, norm statistics over visible
  voxels), each ``MambaLayer`` on the visible voxel tokens only (raster order), see ``sparse.py``.
* Swin-UMamba: conv stem sparse, patch embedding and patch merging per token (masked tokens re-zeroed),
  every VSS block's cross-scan over the visible tokens only (each route's order).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from medmamba.pretrain.masking import MaskPyramid
from medmamba.pretrain.network import check_arch
from medmamba.pretrain.sparse import (MaskStore, apply_channels_last_mask, masked_mamba_layer, masked_vss_block,
                                      sparsify_cnn)

__all__ = ["MaskedEncoder", "UMambaMaskedEncoder", "SwinUMambaMaskedEncoder", "masked_encoder_for"]


def _axes(v, dims=3) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * dims
    return tuple(int(a) for a in v)


class MaskedEncoder(nn.Module):
    arch = ""

    def __init__(self):
        super().__init__()
        self.store = MaskStore()

    # --- layout -------------------------------------------------------------------------------------
    def level_scales(self) -> list[tuple[int, ...]]:
        """Per feature level (highest resolution first): the downsampling factor per axis vs the input."""
        raise NotImplementedError

    def level_channels(self) -> list[int]:
        raise NotImplementedError

    @property
    def total_stride(self) -> tuple[int, ...]:
        return self.level_scales()[-1]

    def grid(self, patch: Sequence[int]) -> tuple[int, ...]:
        return tuple(p // s for p, s in zip(patch, self.total_stride))

    def check_patch(self, patch: Sequence[int]) -> None:
        patch = tuple(int(p) for p in patch)
        stride = self.total_stride
        if len(patch) != len(stride) or any(p % s for p, s in zip(patch, stride)):
            raise ValueError(f"{self.arch}: every patch axis must be a multiple of the network's total stride "
                             f"{stride}; got patch {patch}")
        grid = self.grid(patch)
        if int(np.prod(grid)) < 2:
            raise ValueError(f"{self.arch}: patch {patch} gives a bottleneck grid {grid} with a single token; "
                             f"masking needs at least 2 tokens (use a patch of at least twice the total stride "
                             f"{stride} along one axis)")

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pyramid: MaskPyramid | None = None) -> list[torch.Tensor]:
        self.store.pyramid = pyramid
        try:
            if pyramid is not None:
                x = x * pyramid.mask(x.shape[2:], dtype=x.dtype)
            return self._forward(x)
        finally:
            self.store.pyramid = None

    def _forward(self, x):
        raise NotImplementedError


class UMambaMaskedEncoder(MaskedEncoder):
    """U-Mamba Bot / Enc encoder (``encoder`` [+ ``mamba_layer``]) with masking."""

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.arch = arch
        self.encoder = net.encoder
        if arch == "umamba_bot":
            self.mamba_layer = net.mamba_layer
        self._strides = [_axes(s) for s in net.strides]
        self._channels = list(net.features_per_stage)
        self._channel_token = list(getattr(net, "channel_token", [False] * len(self._strides)))
        self._stage_sizes = list(getattr(net, "stage_sizes", []))
        self._build_patch = tuple(getattr(net, "patch_size", ()))
        self._hooks = sparsify_cnn(self.encoder.stem, self.store)
        for stage in self.encoder.stages:
            self._hooks += sparsify_cnn(stage, self.store)

    def level_scales(self):
        return [tuple(int(v) for v in row) for row in np.cumprod(np.array(self._strides), axis=0)]

    def level_channels(self):
        return list(self._channels)

    def check_patch(self, patch):
        super().check_patch(patch)
        scales = self.level_scales()
        for s, ct in enumerate(self._channel_token):
            if ct:
                size = tuple(p // k for p, k in zip(patch, scales[s]))
                if size != tuple(self._stage_sizes[s]):
                    raise ValueError(
                        f"{self.arch}: the network was built with channels as tokens at stage {s} for patch_size "
                        f"{self._build_patch} (feature map {tuple(self._stage_sizes[s])}), so it only accepts that "
                        f"patch size; pretrain with --patch {' '.join(map(str, self._build_patch))} or build the "
                        f"network for your patch (network keyword patch_size={list(patch)}).")

    def _forward(self, x):
        from medmamba.layers.cnn_mamba import MambaLayer

        x = self.encoder.stem(x)
        skips = []
        for s, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if self.encoder.mamba_layers is not None:
                layer = self.encoder.mamba_layers[s]
                x = masked_mamba_layer(layer, x, self.store) if isinstance(layer, MambaLayer) else layer(x)
            skips.append(x)
        if hasattr(self, "mamba_layer"):
            skips[-1] = masked_mamba_layer(self.mamba_layer, skips[-1], self.store)
        return skips


class SwinUMambaMaskedEncoder(MaskedEncoder):
    """Swin-UMamba's ``encoder`` (conv stem + VMamba stages) with masking."""

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.arch = arch
        self.encoder = enc = net.encoder
        scales, channels = [], []
        base = (1, 1, 1)
        self._hooks = []
        if enc.stem is not None:
            conv = enc.stem[0]
            base = _axes(conv.stride)
            scales.append(base)
            channels.append(conv.out_channels)
            self._hooks += sparsify_cnn(enc.stem, self.store)
        pe = _axes(enc.patch_embed.proj.stride)
        base = tuple(b * p for b, p in zip(base, pe))
        self._hooks += sparsify_cnn(enc.patch_embed, self.store)
        dims = [enc.patch_embed.proj.out_channels] + [d.out_dim for d in enc.downsamples]
        for i in range(len(enc.layers)):
            scales.append(tuple(b * 2 ** i for b in base))
            channels.append(dims[i])
        self._scales, self._channels = scales, channels

    def level_scales(self):
        return list(self._scales)

    def level_channels(self):
        return list(self._channels)

    def _forward(self, x):
        from medmamba.layers.vss import to_channels_first

        enc = self.encoder
        feats = []
        if enc.stem is not None:
            x = enc.stem(x)
            feats.append(x)
        x = apply_channels_last_mask(enc.patch_embed(x), self.store)
        for i, layer in enumerate(enc.layers):
            for blk in layer.blocks:
                x = masked_vss_block(blk, x, self.store)
            if layer.downsample is not None:
                x = apply_channels_last_mask(layer.downsample(x), self.store)
            feats.append(to_channels_first(x).contiguous())
            if i < len(enc.downsamples):
                x = apply_channels_last_mask(enc.downsamples[i](x), self.store)
        return feats


def masked_encoder_for(net: nn.Module, arch: str) -> MaskedEncoder:
    """Wrap ``net``'s encoder (in place: its norms become mask-aware, see ``sparse.sparsify_cnn``)."""
    name = check_arch(arch)
    if name in ("umamba_bot", "umamba_enc"):
        return UMambaMaskedEncoder(net, name)
    return SwinUMambaMaskedEncoder(net, name)
