"""Scan routes: orders in which a 2D (H, W) or 3D (D, H, W) grid is flattened into a token sequence.

API (stable):

* ``route_permutation(shape, route, reverse=False) -> LongTensor (prod(shape),)`` with
  ``tokens = flat[..., perm]`` where ``flat`` is the row-major raster flattening (last axis fastest):
  token ``t`` of the route is grid voxel ``perm[t]`` (a raster index). A route name may end in
  ``"_rev"`` (the route read backwards); ``reverse=True`` reverses once more.
* ``inverse_permutation(perm) -> LongTensor``: ``inv[perm[t]] = t``, so ``tokens[..., inv] == flat``.
* ``route_coords(shape, route, reverse=False) -> LongTensor (L, ndim)``: grid coordinates in scan order.
* ``available_routes(ndim) -> list[str]`` (without the ``_rev`` variants).
* ``CROSS_SCAN_ROUTES = {2: [4 names], 3: [6 names]}``: VMamba's cross-scan (2D: row-major,
  column-major, both reversed) and its 3D analogue (each axis fastest once, times 2 directions).
* ``MHS_FAMILIES = {"snake": (...), "diagonal": (...), "spiral": (...), "raster": (...)}``: the
  Multi-Head Scan route pairs of MHS-VM; each head uses its pair plus the two reverses.
* ``class ScanRoutes(nn.Module)(routes)``: ``gather(x (B, C, *S)) -> (B, R, C, L)`` and
  ``merge(y (B, R, C, L), spatial_shape) -> (B, C, *S)`` (each route un-permuted, then summed);
  ``permutations(shape, device) -> (perm (R, L), inv (R, L))``; ``route_index(shape, device) -> (R, L)
  int32`` (``perm`` as the index table of ``medmamba.kernels.routed_selective_scan``). Index tables are cached per
  (shape, device) in a plain dict: no buffers, nothing in the state dict, and the cache is dropped
  whenever the module is moved (``.to``/``.cuda``), new tables being built on the tensor's device.

Route definitions (``n`` = number of spatial axes, axes numbered 0..n-1, the last one fastest in the
raster order; every route is a bijection for any shape, including size-1 axes):

* ``"raster"``: row-major, last axis fastest (U-Mamba's order). ``"axis{i}"``: axis ``i`` fastest, the
  other axes in raster order (``axis{n-1} == raster``; in 2D ``axis0`` is column-major).
* ``"snake_rows"``: boustrophedon with the last axis fastest. The fastest axis changes direction on
  every row, and in 3D the middle axis also changes direction on every plane (a reflected mixed-radix
  Gray code), so consecutive tokens are always face neighbours. ``"snake_cols"``: the transposed one
  (axis order reversed: axis 0 fastest, the last axis slowest); in 2D, a snake down the columns.
* ``"diag"``: anti-diagonal zigzag. Tokens are grouped by s = sum of coordinates (anti-diagonals in 2D,
  planes i+j+k = s in 3D), s increasing; inside a group the points are ordered lexicographically by
  their coordinates (first axis first), ascending when s is odd and descending when s is even. In 2D
  this is the JPEG zigzag: (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), ... ``"diag_mirror"``: the same on
  the grid mirrored along the last axis (starts at the top-right corner).
* ``"spiral"``: 2D: clockwise spiral from outside in, starting at (0, 0) and going along the first row
  (right, down, left, up, next ring). 3D: the 2D spiral of every (H, W) slice, slices taken along
  axis 0, alternately outside-in (even slices) and inside-out (odd slices, the inward spiral read
  backwards) so the sequence stays continuous across slices. ``"spiral_mirror"``: the same on the grid
  mirrored along the ROW axis (axis -2: the rows are flipped, as MHS-VM's ``routegen.py`` does for its
  second spiral: counter-clockwise, starting at the bottom-left corner and going right along the last
  row).
* ``"raster_rows"`` == ``"raster"``; ``"raster_cols"``: the transposed raster (axis 0 fastest, the last
  axis slowest); 2D: column-major.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["CROSS_SCAN_ROUTES", "MHS_FAMILIES", "ScanRoutes", "available_routes", "inverse_permutation",
           "route_coords", "route_permutation"]

CROSS_SCAN_ROUTES = {
    2: ["raster", "axis0", "raster_rev", "axis0_rev"],
    3: ["raster", "axis1", "axis0", "raster_rev", "axis1_rev", "axis0_rev"],
}

MHS_FAMILIES = {
    "snake": ("snake_rows", "snake_cols"),
    "diagonal": ("diag", "diag_mirror"),
    "spiral": ("spiral", "spiral_mirror"),
    "raster": ("raster_rows", "raster_cols"),
}

_BASE_ROUTES = ("raster", "snake_rows", "snake_cols", "diag", "diag_mirror", "spiral", "spiral_mirror",
                "raster_rows", "raster_cols")


def available_routes(ndim: int) -> list[str]:
    """Route names valid for an ``ndim``-dimensional grid (append ``"_rev"`` to read any backwards)."""
    return list(_BASE_ROUTES) + [f"axis{i}" for i in range(ndim)]


# --------------------------------------------------------------------------------------------------
# Route builders: numpy int64 arrays of raster indices, for a normalised shape tuple.
# --------------------------------------------------------------------------------------------------

def _raster_index(shape, coords):
    return np.ravel_multi_index(tuple(coords), shape).astype(np.int64)


def _axes_order(shape, order):
    """Raster over the axes listed slowest -> fastest in ``order``."""
    idx = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.ascontiguousarray(idx.transpose(order)).reshape(-1)


def _boustrophedon(shape, order):
    """Reflected mixed-radix Gray code over axes ``order`` (slowest -> fastest)."""
    sizes = [shape[a] for a in order]
    counters = np.indices(sizes).reshape(len(sizes), -1)  # raster counters over the permuted axes
    coords = [None] * len(shape)
    outer = np.zeros(counters.shape[1], dtype=np.int64)  # mixed-radix value of the outer counters
    for k, (axis, size) in enumerate(zip(order, sizes)):
        c = counters[k]
        coords[axis] = np.where(outer % 2 == 1, size - 1 - c, c)
        outer = outer * size + c
    return _raster_index(shape, coords)


def _diag(shape):
    coords = np.indices(shape).reshape(len(shape), -1)
    s = coords.sum(0)
    sign = np.where(s % 2 == 1, 1, -1)
    # np.lexsort: last key is primary. Primary s, then coordinates (first axis first), signed.
    keys = [sign * coords[a] for a in reversed(range(len(shape)))] + [s]
    order = np.lexsort(keys)
    return np.ravel_multi_index(tuple(coords[:, order]), shape).astype(np.int64)


def _spiral2d_coords(h, w):
    rows, cols = [], []
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        c = np.arange(left, right + 1)
        rows.append(np.full_like(c, top)); cols.append(c)  # right along the top row
        r = np.arange(top + 1, bottom + 1)
        rows.append(r); cols.append(np.full_like(r, right))  # down the right column
        if bottom > top:
            c = np.arange(right - 1, left - 1, -1)
            rows.append(np.full_like(c, bottom)); cols.append(c)  # left along the bottom row
        if right > left:
            r = np.arange(bottom - 1, top, -1)
            rows.append(r); cols.append(np.full_like(r, left))  # up the left column
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def _spiral(shape):
    if len(shape) == 2:
        r, c = _spiral2d_coords(*shape)
        return r * shape[1] + c
    d, h, w = shape
    plane = _spiral2d_coords(h, w)
    plane = plane[0] * w + plane[1]
    slices = [k * h * w + (plane if k % 2 == 0 else plane[::-1]) for k in range(d)]
    return np.concatenate(slices).astype(np.int64)


def _mirror_last(shape, perm, axis=-1):
    coords = list(np.unravel_index(perm, shape))
    coords[axis] = shape[axis] - 1 - coords[axis]
    return _raster_index(shape, coords)


def _build(shape, base):
    n = len(shape)
    if base in ("raster", "raster_rows"):
        return np.arange(math.prod(shape), dtype=np.int64)
    if base == "raster_cols":
        return _axes_order(shape, tuple(reversed(range(n))))
    if base.startswith("axis") and base[4:].isdigit():
        i = int(base[4:])
        if i >= n:
            raise ValueError(f"route {base!r}: a {n}D grid has axes 0..{n - 1}")
        return _axes_order(shape, tuple(a for a in range(n) if a != i) + (i,))
    if base == "snake_rows":
        return _boustrophedon(shape, tuple(range(n)))
    if base == "snake_cols":
        return _boustrophedon(shape, tuple(reversed(range(n))))
    if base == "diag":
        return _diag(shape)
    if base == "diag_mirror":
        return _mirror_last(shape, _diag(shape))
    if base == "spiral":
        return _spiral(shape)
    if base == "spiral_mirror":
        return _mirror_last(shape, _spiral(shape), axis=-2)  # MHS-VM mirrors the rows (h - 1 - i)
    raise ValueError(f"unknown scan route {base!r}; available for {n}D: {', '.join(available_routes(n))} "
                     f"(each also with a '_rev' suffix)")


def _normalise_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"scan routes: shape must be a sequence of ints, got {shape!r}") from None
    if len(shape) not in (2, 3):
        raise ValueError(f"scan routes: shape must be 2D (H, W) or 3D (D, H, W), got {shape}")
    if any(s < 1 for s in shape):
        raise ValueError(f"scan routes: every axis must have size >= 1, got {shape}")
    return shape


def _split_route(route: str, reverse: bool) -> tuple[str, bool]:
    if not isinstance(route, str):
        raise TypeError(f"scan route must be a string, got {route!r}")
    while route.endswith("_rev"):
        route, reverse = route[:-4], not reverse
    return route, reverse


@lru_cache(maxsize=256)
def _cached(shape: tuple[int, ...], base: str, reverse: bool) -> np.ndarray:
    perm = _build(shape, base)
    if reverse:
        perm = perm[::-1]
    perm = np.ascontiguousarray(perm)
    perm.setflags(write=False)
    return perm


def route_permutation(shape: Sequence[int], route: str, reverse: bool = False) -> torch.LongTensor:
    """Token order of ``route`` on a grid of ``shape`` as raster indices (see the module docstring)."""
    base, rev = _split_route(route, bool(reverse))
    return torch.from_numpy(_cached(_normalise_shape(shape), base, rev).copy())


def route_coords(shape: Sequence[int], route: str, reverse: bool = False) -> torch.LongTensor:
    """(L, ndim) grid coordinates of the route's tokens, in scan order."""
    shape = _normalise_shape(shape)
    perm = route_permutation(shape, route, reverse).numpy()
    return torch.from_numpy(np.stack(np.unravel_index(perm, shape), axis=1).astype(np.int64))


def inverse_permutation(perm: torch.Tensor) -> torch.LongTensor:
    """``inv`` with ``inv[perm] = arange``; works on any device, along the last dimension."""
    perm = torch.as_tensor(perm)
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    return inv.scatter_(-1, perm, ar)


class ScanRoutes(nn.Module):
    """Gather a feature map along several routes and merge the routed sequences back.

    ``gather(x)``: (B, C, *S) -> (B, R, C, L), route r's tokens ``x.flatten(2)[..., perm_r]``.
    ``merge(y, spatial_shape)``: (B, R, C, L) -> (B, C, *S), the sum over routes of each route's
    sequence put back in raster order. Both are plain index gathers (deterministic, differentiable).
    """

    def __init__(self, routes: Sequence[str]):
        super().__init__()
        routes = list(routes)
        if not routes:
            raise ValueError("ScanRoutes: at least one route is required")
        for r in routes:
            base, _ = _split_route(r, False)
            if base not in _BASE_ROUTES and not (base.startswith("axis") and base[4:].isdigit()):
                raise ValueError(f"ScanRoutes: unknown route {r!r}; available: {', '.join(available_routes(3))} "
                                 f"(each also with a '_rev' suffix)")
        self.routes = routes
        self._cache: dict = {}

    @property
    def num_routes(self) -> int:
        return len(self.routes)

    def extra_repr(self) -> str:
        return f"routes={self.routes}"

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half(): rebuild tables lazily on the new device
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def permutations(self, shape: Sequence[int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inv), each (R, L) int64 on ``device``; cached per (shape, device)."""
        shape = _normalise_shape(shape)
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (shape, str(device))
        hit = self._cache.get(key)
        if hit is None:
            perm = torch.stack([route_permutation(shape, r) for r in self.routes])
            inv = inverse_permutation(perm)
            hit = (perm.to(device), inv.to(device))
            self._cache[key] = hit
        return hit

    def route_index(self, shape: Sequence[int], device=None) -> torch.Tensor:
        """``perm`` of ``permutations`` as a contiguous (R, L) int32 tensor on ``device`` (the routed-scan
        kernels' index table: route r visits raster position ``perm[r, t]`` at step t); cached likewise."""
        shape = _normalise_shape(shape)
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = ("route_index", shape, str(device))
        hit = self._cache.get(key)
        if hit is None:
            if math.prod(shape) >= 2 ** 31:
                raise ValueError(f"ScanRoutes.route_index: {math.prod(shape)} positions do not fit int32")
            hit = self.permutations(shape, device)[0].to(torch.int32).contiguous()
            self._cache[key] = hit
        return hit

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 4:
            raise ValueError(f"ScanRoutes.gather: expected (B, C, *spatial) with 2 or 3 spatial axes, "
                             f"got shape {tuple(x.shape)}")
        b, c = x.shape[:2]
        perm, _ = self.permutations(x.shape[2:], x.device)
        flat = x.reshape(b, c, -1)
        routed = flat.index_select(2, perm.reshape(-1))  # (B, C, R*L)
        return routed.view(b, c, perm.shape[0], perm.shape[1]).transpose(1, 2)

    def merge(self, y: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        spatial_shape = _normalise_shape(spatial_shape)
        _, inv = self.permutations(spatial_shape, y.device)
        r, length = inv.shape
        if y.dim() != 4 or y.shape[1] != r or y.shape[3] != length:
            raise ValueError(f"ScanRoutes.merge: expected (B, R={r}, C, L={length}) for spatial shape "
                             f"{spatial_shape}, got {tuple(y.shape)}")
        b, _, c, _ = y.shape
        # route r's raster-ordered values are y[:, r, :, inv[r]]: index the (R*L) concatenation.
        offsets = (torch.arange(r, device=y.device) * length)[:, None]
        idx = (inv + offsets).reshape(-1)
        cat = y.transpose(1, 2).reshape(b, c, r * length)
        out = cat.index_select(2, idx).view(b, c, r, length).sum(2)
        return out.view(b, c, *spatial_shape)
