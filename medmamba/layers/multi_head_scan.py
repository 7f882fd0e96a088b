"""Multi-Head Scan (MHS-VM) and its gated mixer, for 2D and 3D feature maps, channels-last.

API (stable):

* ``MultiHeadScan(d_model, spatial_dims=3, num_heads=4, d_state=16, families=None, threshold=0.5,
  dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0, out_norm=True,
  scan_backend=None, fused_routes=None)``: ``(B, *S, d_model) -> (B, *S, d_model)``. ``fused_routes``: as
  ``CrossScan``'s (True: one routed scan through the (4h, L) index table, no gathered copies; False:
  gather / scan / un-permute; None: fused when the scan runs on the Triton backend). Same outputs.
* ``MHSMixer(d_model, spatial_dims=3, num_heads=4, d_state=16, families=None, threshold=0.5, d_conv=3,
  conv_bias=True, bias=False, **scan_kwargs)``: MHS-VM's gated token mixer (the drop-in replacement
  for SS2D inside a VSS block), ``(B, *S, d_model) -> (B, *S, d_model)``.
* ``scan_route_attention(ys, threshold, dim)``: the Scan Route Attention fusion on its own.

Multi-Head Scan, as in MHS-VM (Ji, 2024):

1. ``in_proj``: Linear without bias, ``C -> h * (C // h)``; the result is split into ``h`` heads of
   ``d_head = C // h`` channels (a subspace per head).
2. Head ``k`` scans its route family ``(a, b)`` from ``medmamba.layers.scan_routes.MHS_FAMILIES``
   (``families`` lists the family names, default ``["snake", "diagonal", "spiral", "raster"][:h]``):
   4 sequences ``a, reverse(a), b, reverse(b)``, each with its own x_proj / dt_proj / A / D (d_inner =
   d_head, ``d_state`` 16). ALL heads and routes go through ONE batched selective-scan call
   (``medmamba.layers.cross_scan.multi_route_scan``: ``4 h * d_head`` channels, grouped B/C with one group per
   (head, route)), in float32 with autocast disabled.
3. Each route's output is put back in raster order (inverse index tables) and the 4 outputs of a head
   are fused by Scan Route Attention (SRA)::

       z = (sum_i y_i) * ReLU(cv - t),   cv = std_i(y) / (mean_i(y - min_i y) + 1e-5)

   **Axis.** The statistics are taken over the route axis ``i`` (the 4 sequences of the head), element
   by element: one ``cv`` per (batch, channel, voxel), the unbiased (n - 1) standard deviation of the 4
   route outputs at that voxel. This is our reading of the note's formula (``cv`` carries no route
   index and multiplies the route sum), and it is what the released MHS-VM code computes (its fusion
   unit reduces the stacked (b, k, d, l) outputs over ``k``). ``cv`` is scale-invariant: for 4 values
   that are not all equal it lies in [2/3, 2], and it is 0 when they are equal; with ``t = 0.5`` the
   gate is positive almost everywhere, ``t = 0`` makes it ``sum * cv``.
4. The heads are concatenated (``h * d_head`` channels), LayerNorm, Linear without bias -> C.

In 3D the families use the 3D routes of ``medmamba.layers.scan_routes`` (snake = reflected Gray code, diagonal
= zigzag over the planes i + j + k = s, spiral = slice-by-slice spirals; see that module).

MHSMixer (MHS-VM's gated VSS mixer): ``in_proj`` C -> 2C (no bias) split into x, z; depthwise conv
3^d (bias) + SiLU on x; MultiHeadScan(x); LayerNorm(C); ``* SiLU(z)``. There is no output projection
after the gate, as published (MultiHeadScan ends with its own projection).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medmamba.layers.cross_scan import fused_multi_route_scan, init_route_params, multi_route_scan, use_fused_routes
from medmamba.layers.mamba import fp32_region
from medmamba.layers.scan_routes import MHS_FAMILIES, inverse_permutation, route_permutation

__all__ = ["MultiHeadScan", "MHSMixer", "scan_route_attention", "DEFAULT_FAMILIES"]

DEFAULT_FAMILIES = ("snake", "diagonal", "spiral", "raster")
ROUTES_PER_HEAD = 4


def scan_route_attention(ys: torch.Tensor, threshold: float = 0.5, dim: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """Scan Route Attention: fuse route outputs stacked along ``dim`` into one tensor (``dim`` removed).

    ``z = sum(ys) * relu(cv - threshold)`` with ``cv = std(ys) / (mean(ys - min(ys)) + eps)``, every
    statistic taken over ``dim`` (unbiased std), element by element.
    """
    if ys.shape[dim] < 2:
        raise ValueError(f"scan_route_attention: need at least 2 routes along dim {dim}, got shape {tuple(ys.shape)}")
    total = ys.sum(dim)
    std = ys.std(dim, unbiased=True)
    shifted = ys - ys.amin(dim, keepdim=True)
    cv = std / (shifted.mean(dim) + eps)
    return total * F.relu(cv - threshold)


class MultiHeadScan(nn.Module):
    """Multi-Head Scan: per-head route families, one batched scan, Scan Route Attention (see module doc)."""

    def __init__(self, d_model: int, spatial_dims: int = 3, num_heads: int = 4, d_state: int = 16,
                 families: Sequence[str] | None = None, threshold: float = 0.5, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 out_norm: bool = True, scan_backend=None, fused_routes: bool | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"MultiHeadScan: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if int(num_heads) != num_heads or num_heads < 1:
            raise ValueError(f"MultiHeadScan: num_heads must be a positive integer, got {num_heads!r}")
        num_heads = int(num_heads)
        if families is None:
            if num_heads > len(DEFAULT_FAMILIES):
                raise ValueError(f"MultiHeadScan: num_heads={num_heads} > {len(DEFAULT_FAMILIES)} default route "
                                 f"families {DEFAULT_FAMILIES}; pass `families` (one name per head, from "
                                 f"{tuple(MHS_FAMILIES)})")
            families = list(DEFAULT_FAMILIES[:num_heads])
        families = list(families)
        if len(families) != num_heads:
            raise ValueError(f"MultiHeadScan: {len(families)} families {families} for num_heads={num_heads}; "
                             f"give one family per head")
        unknown = [f for f in families if f not in MHS_FAMILIES]
        if unknown:
            raise ValueError(f"MultiHeadScan: unknown route family {unknown}; available: {tuple(MHS_FAMILIES)}")
        if d_model < num_heads:
            raise ValueError(f"MultiHeadScan: d_model={d_model} is smaller than num_heads={num_heads}")
        self.d_model = int(d_model)
        self.spatial_dims = spatial_dims
        self.num_heads = num_heads
        self.d_head = self.d_model // num_heads
        self.d_state = int(d_state)
        self.dt_rank = math.ceil(self.d_head / 16) if dt_rank == "auto" else int(dt_rank)
        self.threshold = float(threshold)
        self.families = families
        self.scan_backend = scan_backend
        self.fused_routes = fused_routes
        # Per head: route a, a reversed, route b, b reversed (the order of the published code).
        self.routes = [[a, a + "_rev", b, b + "_rev"] for a, b in (MHS_FAMILIES[f] for f in families)]
        inner = num_heads * self.d_head
        num_seq = num_heads * ROUTES_PER_HEAD

        self.in_proj = nn.Linear(self.d_model, inner, bias=False)
        # Sequence s = k * 4 + i (head k, route i) owns rows s * d_head ... of A_logs / Ds.
        p = init_route_params(num_seq, self.d_head, self.dt_rank, self.d_state, dt_min, dt_max, dt_init_floor,
                              dt_scale)
        for name, value in p.items():
            setattr(self, name, nn.Parameter(value))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.dt_projs_bias._no_reinit = True
        self.out_norm = nn.LayerNorm(inner) if out_norm else nn.Identity()
        self.out_proj = nn.Linear(inner, self.d_model, bias=False)
        self._tables: dict = {}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, d_head={self.d_head}, d_state={self.d_state}, "
                f"dt_rank={self.dt_rank}, spatial_dims={self.spatial_dims}, families={self.families}, "
                f"threshold={self.threshold}")

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): index tables are rebuilt on the new device
        self._tables = {}
        return super()._apply(fn, *args, **kwargs)

    def index_tables(self, spatial_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather_idx, merge_idx), each (h * 4 * L,) int64, cached per (shape, device).

        gather: ``(B, d, h * L)`` (heads side by side) -> ``(B, d, h * 4 * L)`` sequences in scan order;
        merge: ``(B, d, h * 4 * L)`` scan-ordered outputs -> the same layout with each sequence back in
        raster order.
        """
        shape = tuple(int(s) for s in spatial_shape)
        key = (shape, str(device))
        hit = self._tables.get(key)
        if hit is None:
            length = math.prod(shape)
            perm = torch.stack([torch.stack([route_permutation(shape, r) for r in head]) for head in self.routes])
            inv = inverse_permutation(perm)  # (h, 4, L)
            head_off = (torch.arange(self.num_heads) * length)[:, None, None]
            seq_off = (torch.arange(self.num_heads * ROUTES_PER_HEAD) * length).view(self.num_heads,
                                                                                  ROUTES_PER_HEAD, 1)
            hit = ((perm + head_off).reshape(-1).to(device), (inv + seq_off).reshape(-1).to(device))
            self._tables[key] = hit
        return hit

    def route_index(self, spatial_shape, device) -> torch.Tensor:
        """(4h, L) int32 routed-scan index table (sequence s = head * 4 + route), cached per (shape, device)."""
        shape = tuple(int(s) for s in spatial_shape)
        key = ("route_index", shape, str(device))
        hit = self._tables.get(key)
        if hit is None:
            perm = torch.stack([route_permutation(shape, r) for head in self.routes for r in head])
            hit = perm.to(device=device, dtype=torch.int32).contiguous()
            self._tables[key] = hit
        return hit

    def scan_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h * d_head, *S) channels-first head inputs -> (B, h, 4, d_head, L) float32 route outputs,
        each put back in raster order (before Scan Route Attention)."""
        b = x.shape[0]
        spatial = tuple(x.shape[2:])
        length = math.prod(spatial)
        h, d = self.num_heads, self.d_head
        if use_fused_routes(self.fused_routes, x.device, self.scan_backend):
            # heads are the K channel blocks of the routed scan, each read by its 4 routes
            ys = fused_multi_route_scan(x.reshape(b, h * d, length), self.route_index(spatial, x.device),
                                        self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                                        self.Ds, backend=self.scan_backend)  # (B, 4h, d, L) fp32, raster order
            return ys.view(b, h, ROUTES_PER_HEAD, d, length)
        gather_idx, merge_idx = self.index_tables(spatial, x.device)
        flat = x.reshape(b, h, d, length).transpose(1, 2).reshape(b, d, h * length)
        xs = flat.index_select(2, gather_idx).view(b, d, h * ROUTES_PER_HEAD, length).transpose(1, 2)
        ys = multi_route_scan(xs, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                              self.Ds, backend=self.scan_backend)  # (B, 4h, d, L) fp32, one scan call
        ys = ys.transpose(1, 2).reshape(b, d, h * ROUTES_PER_HEAD * length).index_select(2, merge_idx)
        return ys.view(b, d, h, ROUTES_PER_HEAD, length).permute(0, 2, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.d_model:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise ValueError(f"MultiHeadScan: expected channels-last input (B, {axes}, {self.d_model}), "
                             f"got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[1:-1])
        xh = self.in_proj(x).movedim(-1, 1)  # (B, h * d_head, *S)
        ys = self.scan_heads(xh)  # (B, h, 4, d_head, L)
        with fp32_region(x):
            z = scan_route_attention(ys, self.threshold, dim=2)  # (B, h, d_head, L) fp32
            z = z.flatten(1, 2).transpose(1, 2)  # (B, L, h * d_head): heads concatenated
            z = self.out_norm(z)
        y = self.out_proj(z)
        return y.view(x.shape[0], *spatial, self.d_model)


class MHSMixer(nn.Module):
    """MHS-VM gated mixer: in_proj C -> 2C (x, z); SiLU(depthwise conv(x)); MultiHeadScan; LN; * SiLU(z)."""

    def __init__(self, d_model: int, spatial_dims: int = 3, num_heads: int = 4, d_state: int = 16,
                 families: Sequence[str] | None = None, threshold: float = 0.5, d_conv: int = 3,
                 conv_bias: bool = True, bias: bool = False, **scan_kwargs):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"MHSMixer: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"MHSMixer: d_conv must be odd and positive (same-size depthwise conv), got {d_conv}")
        self.d_model = int(d_model)
        self.spatial_dims = spatial_dims
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_model, bias=bias)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(self.d_model, self.d_model, d_conv, padding=d_conv // 2, groups=self.d_model, bias=conv_bias)
        self.act = nn.SiLU()
        self.mhs = MultiHeadScan(self.d_model, spatial_dims, num_heads=num_heads, d_state=d_state, families=families,
                                 threshold=threshold, **scan_kwargs)
        self.out_norm = nn.LayerNorm(self.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.d_model:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise ValueError(f"MHSMixer: expected channels-last input (B, {axes}, {self.d_model}), "
                             f"got shape {tuple(x.shape)}")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv(x.movedim(-1, 1).contiguous())).movedim(1, -1)
        y = self.out_norm(self.mhs(x))
        return y * F.silu(z)
