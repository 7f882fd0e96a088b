"""Routed selective scan: R scans of one spatially ordered tensor along R routes, without gathered copies.

Cross-scan layers (SS2D/SS3D, Multi-Head Scan) scan the same feature map along several routes (orders of
the voxels). Done naively that gathers R permuted copies of the input, scans them, and scatters R
outputs back. ``routed_selective_scan`` takes every input in spatial (raster) order plus the routes'
index table and returns every output in spatial order:

    route r visits spatial position route_index[r, t] at step t;
    y[b, r, c, route_index[r, t]] = step t's output of route r's scan,

which is exactly ``gather -> selective_scan (R*Dc channels, B/C grouped one group per route) -> scatter``.
The Triton backend reads and writes through the table inside its kernels (see ``scan_triton``); the
PyTorch backend is that composition, written out (it is also the test oracle).
"""
from __future__ import annotations

import torch

from .selective_scan import ScanInputError, _check, resolve_backend, selective_scan, triton_available

_OP = "routed_selective_scan"


def _fail(msg):
    raise ScanInputError(f"{_OP}: {msg}")


def _check_routed(u, delta, A, B, C, route_index, D, delta_bias):
    """Shapes: see ``routed_selective_scan``. Returns (R, Dc, K)."""
    for name, t in (("u", u), ("delta", delta), ("route_index", route_index), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if route_index.dim() != 2 or route_index.dtype not in (torch.int32, torch.int64):
        _fail(f"route_index must be an int32/int64 (R, L) tensor, got {route_index.dtype} of shape "
              f"{tuple(route_index.shape)}")
    if route_index.device != u.device:
        _fail(f"route_index is on {route_index.device} but u is on {u.device}")
    routes, length = route_index.shape
    if u.dim() != 3 or delta.dim() != 3:
        _fail(f"u and delta must be (batch, channels, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    if u.shape[2] != length or routes == 0:
        _fail(f"route_index {tuple(route_index.shape)} must be (R >= 1, L={u.shape[2]}) for u {tuple(u.shape)}")
    if delta.shape[0] != u.shape[0] or delta.shape[2] != length or delta.shape[1] % routes:
        _fail(f"delta must be (batch={u.shape[0]}, R*Dc, L={length}) with R={routes}, got {tuple(delta.shape)}")
    dc = delta.shape[1] // routes
    k, rem = divmod(u.shape[1], dc) if dc else (0, 1)
    if rem or k == 0 or routes % k:
        _fail(f"u has {u.shape[1]} channels: expected Dc={dc} (delta's {delta.shape[1]} channels / R={routes}) "
              f"or K*Dc with K dividing R")
    if u.dtype != delta.dtype:
        _fail(f"delta has dtype {delta.dtype} but u has {u.dtype}")
    for name, M in (("B", B), ("C", C)):
        if M.dim() != 4 or M.shape[1] != routes:
            _fail(f"{name} must be (batch, R={routes}, N, L) (one group per route), got {tuple(M.shape)}")
    # the rest (A, B/C sizes, D, delta_bias, dtypes, devices) as a grouped scan of R*Dc channels
    _check(delta, delta, A, B, C, D, None, delta_bias, op=_OP)
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(f"u has dtype {u.dtype}; expected float32, float16 or bfloat16")
    if route_index.device.type == "cpu" and not torch.jit.is_tracing():
        _check_permutation(route_index)  # on a GPU it would synchronise: not checked there
    return routes, dc, k


def _check_permutation(route_index):
    """Every route must visit every position exactly once."""
    routes, length = route_index.shape
    ar = torch.arange(length, dtype=route_index.dtype, device=route_index.device)
    if not torch.equal(route_index.sort(dim=1).values, ar.expand(routes, length)):
        _fail("every row of route_index must be a permutation of 0..L-1")


def inverse_route_index(route_index: torch.Tensor) -> torch.Tensor:
    """``inv`` (R, L) int64 with ``inv[r, route_index[r, t]] = t``."""
    idx = route_index.long()
    ar = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, ar)


def routed_selective_scan_composed(u, delta, A, B, C, route_index, D=None, delta_bias=None, delta_softplus=False,
                                   backend="torch"):
    """The routed scan as gather -> ``selective_scan`` -> scatter, in float32 (shapes unchecked).

    Gathers u (each channel block to its routes), delta, B and C along ``route_index``, runs one
    grouped ``selective_scan`` (R*Dc channels, one B/C group per route) and puts every route's output back
    in spatial order. Differentiable through ordinary autograd (du sums over the routes).
    """
    batch, ud, length = u.shape
    routes = route_index.shape[0]
    dc = delta.shape[1] // routes
    k = ud // dc
    idx = route_index.long()
    # (batch, K, 1, Dc, L) against (1, K, R/K, 1, L): every channel block gathered for each of its routes
    us = torch.take_along_dim(u.float().view(batch, k, 1, dc, length), idx.view(1, k, routes // k, 1, length), -1)
    ds = torch.take_along_dim(delta.float().view(batch, routes, dc, length), idx.view(1, routes, 1, length), -1)
    Bs = torch.take_along_dim(B.float(), idx.view(1, routes, 1, length), -1)
    Cs = torch.take_along_dim(C.float(), idx.view(1, routes, 1, length), -1)
    y = selective_scan(us.reshape(batch, routes * dc, length), ds.reshape(batch, routes * dc, length), A, Bs, Cs,
                       D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, backend=backend)
    inv = inverse_route_index(idx)
    return torch.take_along_dim(y.view(batch, routes, dc, length), inv.view(1, routes, 1, length), -1)


def routed_selective_scan(u, delta, A, B, C, route_index, D=None, delta_bias=None, delta_softplus=False,
                          backend=None):
    """Selective scans of one spatially ordered tensor along R routes; inputs and outputs in spatial order.

    u: (batch, Dc, L), shared by all routes (or (batch, K*Dc, L) with K dividing R: routes come in K
    consecutive blocks of R/K, block k scanning channels k*Dc..(k+1)*Dc-1, as in Multi-Head Scan);
    delta: (batch, R*Dc, L), channels r*Dc.. belonging to route r; A: (R*Dc, N) float32; B, C:
    (batch, R, N, L); D, delta_bias: (R*Dc,) float32; route_index: (R, L) int32/int64, route r visits
    spatial position route_index[r, t] at step t (every row a permutation of 0..L-1; checked for CPU
    tensors only). Everything but route_index and the parameters is in spatial order.

    Returns y (batch, R, Dc, L) float32 in spatial order: y[b, r, c, route_index[r, t]] is step t of route
    r's scan, so summing the routes is ``y.sum(1)``. Equal to gathering every input along the routes,
    ``selective_scan`` with R*Dc channels and grouped B/C, and scattering back; differentiable in u, delta,
    A, B, C, D and delta_bias (du sums over the routes).

    backend: as ``selective_scan`` (None: Triton for CUDA tensors when it can run, else PyTorch; the
    variable MEDMAMBA_SCAN_BACKEND overrides). "triton" loads and stores through route_index inside the
    kernels, so no gathered copy of u, delta, B, C or y exists; "torch" is the gather/scan/scatter
    composition (float32).
    """
    routes, dc, k = _check_routed(u, delta, A, B, C, route_index, D, delta_bias)
    backend = resolve_backend(u.device, backend, op=_OP)
    if backend == "triton":
        ok, why = triton_available(u.device)
        if not ok:
            raise RuntimeError(f"{_OP}: backend='triton' is unavailable here: {why}")
        if route_index.shape[1] >= 2 ** 31:
            _fail("L must be below 2**31 for the Triton backend")
        from .scan_triton import routed_selective_scan_triton
        return routed_selective_scan_triton(u, delta, A, B, C, D, delta_bias, route_index.to(torch.int32),
                                            bool(delta_softplus))
    return routed_selective_scan_composed(u, delta, A, B, C, route_index, D, delta_bias, bool(delta_softplus),
                                          backend="torch")
