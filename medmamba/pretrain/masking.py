"""Bottom-up hybrid masking (MambaMIM): one random mask on the bottleneck token grid, per sample,
nearest-upsampled to every encoder resolution and to the input.

A :class:`MaskPyramid` holds, for one batch:

* ``grid``: the bottleneck token grid (spatial shape) and ``visible`` ``(B, L)`` bool, L = prod(grid),
  tokens in raster order (last axis fastest), True = visible. Every sample has exactly the same number of
  visible tokens (``n_visible``), drawn independently per sample (no count is shared or summed over
  the batch);
* ``mask(shape)``: the ``(B, 1, *shape)`` float mask (1 visible, 0 masked) at any resolution that is an
  integer multiple of the grid per axis, obtained by repeating every grid cell (nearest upsampling), so
  all scales agree: a voxel is visible iff the bottleneck token that covers it is visible;
* ``visible_index(shape)``: ``(B, n_visible * cells)`` raster indices of the visible voxels at that
  resolution, ascending (the visible subsequence in raster order), cached.

``patchify``/``unpatchify`` cut an input-resolution tensor into the footprints of the bottleneck tokens
(the reconstruction-loss patches).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["MaskPyramid", "random_grid_mask", "upsample_mask", "patchify", "unpatchify"]


def random_grid_mask(batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """(B, L) bool, True = visible: per sample exactly ``round(ratio * L)`` masked tokens (at least one
    masked and one visible), chosen uniformly at random and independently for every sample.

    The noise is drawn on the CPU (with ``generator`` if given), so masks are reproducible on any device.
    """
    length = 1
    for g in grid:
        length *= int(g)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if length < 2:
        raise ValueError(f"the bottleneck token grid {tuple(grid)} has {length} token(s); masking needs at least 2. "
                         f"Use a larger patch (every axis a multiple of the network's total stride, at least twice "
                         f"it along one axis).")
    n_mask = min(max(int(round(ratio * length)), 1), length - 1)
    scores = torch.rand(batch, length, generator=generator)
    masked_idx = scores.argsort(dim=1)[:, :n_mask]
    visible = torch.ones(batch, length, dtype=torch.bool)
    visible.scatter_(1, masked_idx, False)
    return visible.to(device) if device is not None else visible


def upsample_mask(mask: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling by integer factors per axis: (B, C, *S) -> (B, C, *S * factors), exact repeat."""
    for axis, f in enumerate(factors):
        if int(f) != 1:
            mask = mask.repeat_interleave(int(f), dim=2 + axis)
    return mask


class MaskPyramid:
    """The masks of one batch at every resolution (see the module docstring)."""

    def __init__(self, visible: torch.Tensor, grid: Sequence[int]):
        self.grid = tuple(int(g) for g in grid)
        length = 1
        for g in self.grid:
            length *= g
        if visible.dim() != 2 or visible.shape[1] != length:
            raise ValueError(f"visible must be (B, prod(grid)) for grid {self.grid}, got {tuple(visible.shape)}")
        counts = visible.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every sample must have the same number of visible tokens")
        if int(counts[0]) < 1:
            raise ValueError("every sample needs at least one visible token")
        self.visible = visible.bool()
        self.batch = visible.shape[0]
        self.n_visible = int(counts[0])
        self._grid_mask = self.visible.float().view(self.batch, 1, *self.grid)
        self._masks: dict[tuple, torch.Tensor] = {self.grid: self._grid_mask}
        self._index: dict[tuple, torch.Tensor] = {}

    @classmethod
    def random(cls, batch: int, grid: Sequence[int], ratio: float, generator=None, device=None) -> "MaskPyramid":
        return cls(random_grid_mask(batch, grid, ratio, generator, device), grid)

    @property
    def device(self):
        return self.visible.device

    @property
    def masked(self) -> torch.Tensor:
        """(B, L) bool, True = masked bottleneck token."""
        return ~self.visible

    def factors(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(self.grid) or any(s % g for s, g in zip(shape, self.grid)):
            raise ValueError(f"resolution {shape} is not an integer multiple of the bottleneck grid {self.grid}")
        return tuple(s // g for s, g in zip(shape, self.grid))

    def mask(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """(B, 1, *shape), 1 = visible."""
        shape = tuple(int(s) for s in shape)
        m = self._masks.get(shape)
        if m is None:
            m = upsample_mask(self._grid_mask, self.factors(shape))
            self._masks[shape] = m
        return m if m.dtype == dtype else m.to(dtype)

    def visible_flat(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, prod(shape)) bool, raster order."""
        return self.mask(shape).flatten(1).bool()

    def visible_index(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, n) int64 raster indices of the visible positions at ``shape``, ascending (same n per sample)."""
        shape = tuple(int(s) for s in shape)
        idx = self._index.get(shape)
        if idx is None:
            vis = self.visible_flat(shape)
            n = int(vis[0].sum())
            # a stable sort of the "masked" flags puts the visible positions first, in ascending order
            idx = torch.argsort((~vis).to(torch.uint8), dim=1, stable=True)[:, :n].contiguous()
            self._index[shape] = idx
        return idx

    def to(self, device) -> "MaskPyramid":
        return MaskPyramid(self.visible.to(device), self.grid)

    def select(self, samples: Sequence[int]) -> "MaskPyramid":
        """The pyramid of some samples of the batch (a distributed process's slice of the global batch)."""
        index = torch.as_tensor(list(samples), dtype=torch.long, device=self.visible.device)
        return MaskPyramid(self.visible.index_select(0, index), self.grid)


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, *(g * p)) -> (B, L, C * prod(p)); row l is the footprint of bottleneck token l (raster order)."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    grid = [s // p for s, p in zip(spatial, patch)]
    n = len(patch)
    view = [b, c]
    for g, p in zip(grid, patch):
        view += [g, p]
    x = x.reshape(view)
    # (B, C, g0, p0, g1, p1, g2, p2) -> (B, g0, g1, g2, C, p0, p1, p2)
    order = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
    x = x.permute(order)
    length = 1
    for g in grid:
        length *= g
    return x.reshape(b, length, -1)


def unpatchify(t: torch.Tensor, patch: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, C * prod(p)) -> (B, C, *(g * p))."""
    b = t.shape[0]
    n = len(patch)
    x = t.reshape(b, *grid, channels, *patch)
    # (B, g0, g1, g2, C, p0, p1, p2) -> (B, C, g0, p0, g1, p1, g2, p2)
    order = [0, 1 + n]
    for i in range(n):
        order += [1 + i, 2 + n + i]
    x = x.permute(order)
    return x.reshape(b, channels, *[g * p for g, p in zip(grid, patch)])
