"""The selective scans as PyTorch operators (``torch.ops.medmamba.*``), with fake kernels and autograd.

Registered with ``torch.library.custom_op``, each scan is one opaque node to ``torch.compile`` (no graph
breaks: inductor compiles around it with ``fullgraph=True``), its output shapes are known to meta and
FakeTensor propagation, and ``torch.export`` keeps it as a call. Forward and backward are separate ops
(the backward reads the forward's saved states), joined by ``register_autograd``.

    medmamba::selective_scan_fwd(u, delta, A, B, C, D?, z?, delta_bias?, softplus, backend, tile, parts)
        -> (y, last_state, saved)
    medmamba::selective_scan_bwd(..., saved, dout, dlast?, softplus, backend, tile, parts)
        -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)
    medmamba::routed_scan_fwd / routed_scan_bwd: the routed Triton scan (``routed_scan``)

``backend`` is "torch" or "triton"; ``saved`` is that backend's own layout (chunk-start states for the
PyTorch scan, tile-end states for Triton). Absent optional gradients come back as empty tensors and are
mapped to None. ``tile``/``parts`` (0: automatic) pin the Triton launch shape; tests use them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import scan_torch

_EMPTY = (0,)


def _triton():
    from . import scan_triton
    return scan_triton


def _empty_like_or(x, ref):
    return x if x is not None else ref.new_empty(_EMPTY, dtype=torch.float32)


# --- plain scan --------------------------------------------------------------------------------------------

@torch.library.custom_op("medmamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool, backend: str,
                       tile: int = 0, parts: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        st = _triton()
        y, sumH = st._scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, tile or None, parts or None)
        # a fresh tensor, never a view of sumH (an operator's outputs must not alias each other)
        last = sumH[:, :, :A.shape[1], -1].clone(memory_format=torch.contiguous_format)
        return y, last, sumH
    y, last, starts, _ = scan_torch._scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus)
    return y, last.contiguous(), starts


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, backend, tile=0, parts=0):
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    last = u.new_empty((batch, dim, dstate), dtype=torch.float32)
    if backend == "triton":
        NP, _, n_tiles = _triton().tiling(dstate, length, tile or None)
        saved = u.new_empty((batch, dim, NP, n_tiles), dtype=torch.float32)
    else:
        T = scan_torch.chunk_length(batch, dim, dstate, length)
        saved = u.new_empty((batch, groups, dim // groups, -(-length // T), dstate), dtype=torch.float32)
    return torch.empty_like(u), last, saved


@torch.library.custom_op("medmamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], saved: Tensor, dout: Tensor,
                       dlast: Optional[Tensor], softplus: bool, backend: str, tile: int = 0,
                       parts: int = 0) -> list[Tensor]:
    if backend == "triton":
        grads = _triton()._scan_backward(u, delta, A, B, C, D, z, delta_bias, saved, dout, dlast, softplus,
                                         tile or None, parts or None)
    else:
        grads = scan_torch._scan_backward(u, delta, A, B, C, D, z, delta_bias, saved, dout.contiguous(), dlast,
                                          softplus)
    return [_empty_like_or(g, u) for g in grads]


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, saved, dout, dlast, softplus, backend, tile=0, parts=0):
    like = lambda x: torch.empty_like(x) if x is not None else u.new_empty(_EMPTY, dtype=torch.float32)  # noqa
    return [like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias)]


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, backend, tile, parts = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.args = (softplus, backend, tile, parts)
    ctx.set_materialize_grads(False)  # an unused last state sends no gradient (None), not zeros


def _scan_backward(ctx, dy, dlast, _dsaved):
    u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    softplus, backend, tile, parts = ctx.args
    grads = torch.ops.medmamba.selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, saved, dy, dlast, softplus,
                                                  backend, tile, parts)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None, None, None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan_op(u, delta, A, B, C, D, z, delta_bias, softplus, backend, tile=None, parts=None):
    """(y, last_state) through the operator; inputs checked and normalised (B, C as (batch, G, N, L))."""
    y, last, _ = torch.ops.medmamba.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(softplus), backend,
                                                       int(tile or 0), int(parts or 0))
    return y, last


# --- routed scan (Triton) ----------------------------------------------------------------------------------

@torch.library.custom_op("medmamba::routed_scan_fwd", mutates_args=())
def routed_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    delta_bias: Optional[Tensor], index: Tensor, softplus: bool, tile: int = 0,
                    parts: int = 0) -> tuple[Tensor, Tensor]:
    routes = B.shape[1]
    routes_per_u = routes // (u.shape[1] // (delta.shape[1] // routes))
    y, sumH = _triton()._scan_forward(u, delta, A, B, C, D, None, delta_bias, softplus, tile or None, parts or None,
                                      index, routes_per_u)
    return y.view(u.shape[0], routes, delta.shape[1] // routes, u.shape[2]), sumH


@routed_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, index, softplus, tile=0, parts=0):
    batch, dim, length = delta.shape
    routes = B.shape[1]
    NP, _, n_tiles = _triton().tiling(A.shape[1], length, tile or None)
    return (u.new_empty((batch, routes, dim // routes, length), dtype=torch.float32),
            u.new_empty((batch, dim, NP, n_tiles), dtype=torch.float32))


@torch.library.custom_op("medmamba::routed_scan_bwd", mutates_args=())
def routed_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    delta_bias: Optional[Tensor], index: Tensor, saved: Tensor, dout: Tensor, softplus: bool,
                    dout_shared: bool, tile: int = 0, parts: int = 0) -> list[Tensor]:
    routes = B.shape[1]
    routes_per_u = routes // (u.shape[1] // (delta.shape[1] // routes))
    du, ddelta, dA, dB, dC, dD, _, dbias = _triton()._scan_backward(
        u, delta, A, B, C, D, None, delta_bias, saved, dout, None, softplus, tile or None, parts or None, index,
        routes_per_u, dout_shared=dout_shared)
    return [du, ddelta, dA, dB, dC, _empty_like_or(dD, u), _empty_like_or(dbias, u)]


@routed_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, index, saved, dout, softplus, dout_shared, tile=0, parts=0):
    like = lambda x: torch.empty_like(x) if x is not None else u.new_empty(_EMPTY, dtype=torch.float32)  # noqa
    return [like(u), like(delta), like(A), like(B), like(C), like(D), like(delta_bias)]


def _routed_setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, index, softplus, tile, parts = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, index, output[1])
    ctx.args = (softplus, tile, parts)
    ctx.set_materialize_grads(False)


def _routed_backward(ctx, dy, _dsaved):
    u, delta, A, B, C, D, delta_bias, index, saved = ctx.saved_tensors
    softplus, tile, parts = ctx.args
    if dy is None:
        dy = torch.zeros(delta.shape, device=u.device, dtype=torch.float32)
    # d(y.sum(1)) is one (batch, Dc, L) tensor expanded over the routes: read it in place, not R copies
    shared = dy.dim() == 4 and dy.shape[1] > 1 and dy.stride(1) == 0
    dout = dy[:, 0].contiguous() if shared else dy.reshape(delta.shape).contiguous()
    du, ddelta, dA, dB, dC, dD, dbias = torch.ops.medmamba.routed_scan_bwd(
        u, delta, A, B, C, D, delta_bias, index, saved, dout, softplus, shared, tile, parts)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None, None, None)


routed_scan_fwd.register_autograd(_routed_backward, setup_context=_routed_setup)


def routed_scan_op(u, delta, A, B, C, D, delta_bias, index, softplus, tile=None, parts=None):
    """y (batch, R, Dc, L) float32 through the operator (Triton backend; inputs checked, contiguous)."""
    return torch.ops.medmamba.routed_scan_fwd(u, delta, A, B, C, D, delta_bias, index, bool(softplus),
                                              int(tile or 0), int(parts or 0))[0]
