"""Cross-scan selective state-space layer (VMamba's SS2D, and its 3D analogue SS3D).

API (stable):

* ``CrossScan(d_model, spatial_dims=3, d_state=16, d_conv=3, expand=2, dt_rank="auto", routes=None,
  gated=True, conv_bias=True, out_norm=True, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
  scan_backend=None, dt_scale=1.0, bias=False, fused_routes=None)``: ``forward(x)`` maps channels-last
  ``(B, *S, d_model)`` to ``(B, *S, d_model)``. ``routes`` defaults to
  ``medmamba.layers.scan_routes.CROSS_SCAN_ROUTES[spatial_dims]`` (4 in 2D, 6 in 3D); any route names of
  ``medmamba.layers.scan_routes`` are accepted. Attributes: ``d_model, d_inner, d_state, dt_rank, routes,
  spatial_dims, gated``; submodules ``in_proj, conv, act, scan_routes, out_norm, out_proj``; per-route
  parameters stacked: ``x_proj_weight (R, dt_rank + 2N, d_inner)``, ``dt_projs_weight (R, d_inner,
  dt_rank)``, ``dt_projs_bias (R, d_inner)``, ``A_logs (R*d_inner, N)``, ``Ds (R*d_inner,)``.
  ``gated=False, expand=1`` gives MSVM-UNet's variant (no z branch, d_inner = d_model).
  ``fused_routes``: True scans the routes with ``fused_multi_route_scan`` (no gathered copies, see below),
  False with gather / ``multi_route_scan`` / merge, None (default) fuses when the scan runs on the Triton
  backend (``medmamba.kernels.resolve_backend``). Same parameters, same outputs (fp32 rounding) either way.
* ``init_route_params(num_routes, d_inner, dt_rank, d_state, ...) -> dict`` of those five tensors with
  mamba_ssm-style initialisation (for layers that hold the same parameter set, e.g. Multi-Head Scan).
* ``multi_route_scan(xs, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend=None)``:
  ``xs (B, R, d_inner, L)`` routed sequences -> ``(B, R, d_inner, L)`` float32, every route scanned in
  ONE ``medmamba.kernels.selective_scan`` call (channels R*d_inner, grouped B/C with one group per
  route), autocast disabled, fp32 throughout.
* ``fused_multi_route_scan(x, route_index, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
  backend=None)``: the same scan with ``x (B, K*d_inner, L)`` in RASTER order (K channel blocks, routes
  in K consecutive blocks of R/K; K = 1 for cross-scan) and ``route_index (R, L)``: x_proj/dt_proj run
  pointwise in raster order and ``medmamba.kernels.routed_selective_scan`` scans through the index
  table. Returns ``(B, R, d_inner, L)`` float32 with every route's output in RASTER order (merge =
  ``.sum(1)``).

Forward: in_proj (C -> 2*d_inner split x, z; C -> d_inner when not gated); depthwise conv 3^d + SiLU on
x; gather x along R routes; per route x_proj -> (dt, B, C), dt_proj; one batched selective scan with
delta softplus and per-route delta bias; undo each route and sum; LayerNorm(d_inner); * SiLU(z) when
gated; out_proj d_inner -> C. Fused (``fused_routes``): x_proj/dt_proj on x in raster order, one routed
scan reading through the route index table, sum of the raster-ordered route outputs.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medmamba.kernels import resolve_backend, routed_selective_scan, selective_scan
from medmamba.layers.mamba import fp32_region
from medmamba.layers.scan_routes import CROSS_SCAN_ROUTES, ScanRoutes

__all__ = ["CrossScan", "init_route_params", "multi_route_scan", "fused_multi_route_scan", "use_fused_routes"]


def init_route_params(num_routes: int, d_inner: int, dt_rank: int, d_state: int, dt_min: float = 0.001,
                      dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                      device=None) -> dict[str, torch.Tensor]:
    """Per-route SSM parameters, initialised route by route like ``mamba_ssm.Mamba``.

    x_proj: nn.Linear default (U(+-1/sqrt(d_inner))); dt_proj weight U(+-dt_rank^-0.5 * dt_scale);
    dt bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] clamped at dt_init_floor; A = -(1..N)
    (S4D-real, stored as log); D = 1.
    """
    if dt_min <= 0 or dt_max < dt_min:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    bound = 1.0 / math.sqrt(d_inner)
    x_proj = torch.empty(num_routes, dt_rank + 2 * d_state, d_inner, device=device).uniform_(-bound, bound)
    std = dt_rank ** -0.5 * dt_scale
    dt_w = torch.empty(num_routes, d_inner, dt_rank, device=device).uniform_(-std, std)
    dt = torch.exp(torch.rand(num_routes, d_inner, device=device) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_b = dt + torch.log(-torch.expm1(-dt))
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(num_routes * d_inner, 1)
    return {"x_proj_weight": x_proj, "dt_projs_weight": dt_w, "dt_projs_bias": dt_b,
            "A_logs": torch.log(A), "Ds": torch.ones(num_routes * d_inner, device=device)}


def multi_route_scan(xs: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor,
                     dt_projs_bias: torch.Tensor, A_logs: torch.Tensor, Ds: torch.Tensor,
                     backend=None) -> torch.Tensor:
    """Scan R routed sequences ``xs (B, R, d_inner, L)`` with their own parameters in one kernel call.

    Returns ``(B, R, d_inner, L)`` float32. Runs with autocast disabled and fp32 inputs.
    """
    b, r, d, length = xs.shape
    n = A_logs.shape[1]
    dt_rank = dt_projs_weight.shape[2]
    if x_proj_weight.shape != (r, dt_rank + 2 * n, d):
        raise ValueError(f"multi_route_scan: x_proj_weight must be {(r, dt_rank + 2 * n, d)}, "
                         f"got {tuple(x_proj_weight.shape)}")
    with fp32_region(xs):
        xs = xs.float()
        x_dbl = torch.einsum("brdl,rcd->brcl", xs, x_proj_weight.float())
        dts, Bs, Cs = torch.split(x_dbl, [dt_rank, n, n], dim=2)
        dts = torch.einsum("brkl,rdk->brdl", dts, dt_projs_weight.float())
        y = selective_scan(
            xs.reshape(b, r * d, length), dts.reshape(b, r * d, length),
            -torch.exp(A_logs.float()), Bs.contiguous(), Cs.contiguous(), D=Ds.float(),
            delta_bias=dt_projs_bias.reshape(-1).float(), delta_softplus=True, backend=backend)
    return y.view(b, r, d, length)


def fused_multi_route_scan(x: torch.Tensor, route_index: torch.Tensor, x_proj_weight: torch.Tensor,
                           dt_projs_weight: torch.Tensor, dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                           Ds: torch.Tensor, backend=None) -> torch.Tensor:
    """``multi_route_scan`` without routed copies: ``x (B, K*d_inner, L)`` in raster order, ``route_index
    (R, L)`` (route r visits raster position route_index[r, t] at step t; routes in K blocks of R/K, block
    k reading channels k*d_inner..). Returns ``(B, R, d_inner, L)`` float32, each route's output in raster
    order. x_proj and dt_proj are pointwise, so they run on x in raster order (x read once per block, not
    once per route); the scan loads through the index table (``routed_selective_scan``).
    """
    b, kd, length = x.shape
    r = route_index.shape[0]
    n = A_logs.shape[1]
    dt_rank = dt_projs_weight.shape[2]
    d = x_proj_weight.shape[2]
    k = kd // d if d else 0
    if x_proj_weight.shape != (r, dt_rank + 2 * n, d) or k * d != kd or k == 0 or r % k:
        raise ValueError(f"fused_multi_route_scan: x_proj_weight {tuple(x_proj_weight.shape)} does not fit "
                         f"x {tuple(x.shape)} and route_index {tuple(route_index.shape)} (expected "
                         f"(R, dt_rank + 2N, d_inner) with x channels K*d_inner, K dividing R)")
    with fp32_region(x):
        x = x.float()
        w = x_proj_weight.float().view(k, r // k, dt_rank + 2 * n, d)
        x_dbl = torch.einsum("bkdl,kicd->bkicl", x.view(b, k, d, length), w).reshape(b, r, -1, length)
        dts, Bs, Cs = torch.split(x_dbl, [dt_rank, n, n], dim=2)
        dts = torch.einsum("brkl,rdk->brdl", dts, dt_projs_weight.float())
        return routed_selective_scan(
            x, dts.reshape(b, r * d, length), -torch.exp(A_logs.float()), Bs.contiguous(), Cs.contiguous(),
            route_index, D=Ds.float(), delta_bias=dt_projs_bias.reshape(-1).float(), delta_softplus=True,
            backend=backend)


def use_fused_routes(fused_routes, device, scan_backend) -> bool:
    """``fused_routes`` if set, else the environment variable MEDMAMBA_FUSED_ROUTES (0/1) if set, else
    whether the scan would run on the Triton backend for this device. The variable switches every layer
    of a network at once (e.g. to compare fused and unfused on a GPU without rebuilding the network)."""
    if fused_routes is not None:
        return bool(fused_routes)
    env = os.environ.get("MEDMAMBA_FUSED_ROUTES", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return resolve_backend(device, scan_backend) == "triton"


class CrossScan(nn.Module):
    """SS2D / SS3D: selective scan of a 2D or 3D feature map along several routes, channels-last."""

    def __init__(self, d_model: int, spatial_dims: int = 3, d_state: int = 16, d_conv: int = 3, expand=2,
                 dt_rank="auto", routes: Sequence[str] | None = None, gated: bool = True, conv_bias: bool = True,
                 out_norm: bool = True, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan_backend=None, dt_scale: float = 1.0, bias: bool = False, fused_routes: bool | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"CrossScan: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"CrossScan: d_conv must be odd and positive (same-size depthwise conv), got {d_conv}")
        self.d_model = int(d_model)
        self.spatial_dims = spatial_dims
        self.d_state = int(d_state)
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.gated = bool(gated)
        self.scan_backend = scan_backend
        self.fused_routes = fused_routes
        self.routes = list(routes) if routes is not None else list(CROSS_SCAN_ROUTES[spatial_dims])
        self.scan_routes = ScanRoutes(self.routes)
        r = len(self.routes)

        self.in_proj = nn.Linear(self.d_model, self.d_inner * (2 if self.gated else 1), bias=bias)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(self.d_inner, self.d_inner, d_conv, padding=d_conv // 2, groups=self.d_inner,
                         bias=conv_bias)
        self.act = nn.SiLU()
        p = init_route_params(r, self.d_inner, self.dt_rank, self.d_state, dt_min, dt_max, dt_init_floor, dt_scale)
        for name, value in p.items():
            setattr(self, name, nn.Parameter(value))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.dt_projs_bias._no_reinit = True
        self.out_norm = nn.LayerNorm(self.d_inner) if out_norm else nn.Identity()
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"spatial_dims={self.spatial_dims}, gated={self.gated}, routes={self.routes}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"CrossScan: expected channels-last input (B, {'D, ' if self.spatial_dims == 3 else ''}"
                             f"H, W, {self.d_model}), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[1:-1])
        if self.gated:
            x, z = self.in_proj(x).chunk(2, dim=-1)
        else:
            x, z = self.in_proj(x), None
        x = x.movedim(-1, 1).contiguous()  # (B, d_inner, *S)
        x = self.act(self.conv(x))
        if use_fused_routes(self.fused_routes, x.device, self.scan_backend):
            idx = self.scan_routes.route_index(spatial, x.device)
            ys = fused_multi_route_scan(x.flatten(2), idx, self.x_proj_weight, self.dt_projs_weight,
                                        self.dt_projs_bias, self.A_logs, self.Ds, backend=self.scan_backend)
            y = ys.sum(1).view(x.shape).movedim(1, -1)  # (B, *S, d_inner) fp32, routes in raster order
        else:
            xs = self.scan_routes.gather(x)  # (B, R, d_inner, L)
            ys = multi_route_scan(xs, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs,
                                  self.Ds, backend=self.scan_backend)
            y = self.scan_routes.merge(ys, spatial).movedim(1, -1)  # (B, *S, d_inner) fp32
        y = self.out_norm(y)
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)
