"""Vectorised PyTorch selective scan (CPU, and fallback everywhere).

The sequence is cut into chunks of T steps. Inside a chunk the linear recurrence
h_t = a_t h_{t-1} + b_t is solved for all T steps at once by a Hillis-Steele doubling scan over the
pairs (a, b): log2(T) element-wise passes, every multiplier a product of decays <= 1, so no exponent
is ever positive and nothing divides by a cumulative decay. Chunks are visited in order carrying the
state, which bounds memory by one (batch, dim, T, N) block instead of (batch, dim, L, N).

Backward is hand-written: the state at every chunk start is saved (batch, dim, L/T, N), each chunk's
states are recomputed from it, and the adjoint recurrence dh_t = C_t dy_t + a_{t+1} dh_{t+1} is
solved by the same doubling scan run backwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one (batch, dim, T, N) block; a few such blocks live at once.
_BLOCK_ELEMENTS = 1 << 21


def chunk_length(batch: int, dim: int, dstate: int, length: int) -> int:
    t = _BLOCK_ELEMENTS // max(1, batch * dim * dstate)
    t = 1 << max(4, min(11, t.bit_length() - 1))  # power of two in [16, 2048]
    return max(1, min(t, length))


def _doubling_scan(a, b, h0=None):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along dim 2 of (batch, dim, T, N) blocks.

    Returns (prod a_0..a_t, h_t); h0 (batch, dim, N) is the state before the block.
    """
    a = a.clone()
    b = b.clone()
    T = a.shape[2]
    k = 1
    while k < T:
        # new values at t >= k read old values at t - k: compute from the old tensors first.
        b_add = a[:, :, k:] * b[:, :, :-k]
        a_mul = a[:, :, k:] * a[:, :, :-k]
        b[:, :, k:] += b_add
        a[:, :, k:] = a_mul
        k *= 2
    if h0 is not None:
        b = b + a * h0[:, :, None, :]
    return a, b


def _expand_groups(M, dim, start, stop):
    """(batch, G, N, L) -> (batch, dim, T, N) fp32 for steps [start, stop)."""
    batch, groups, dstate, _ = M.shape
    m = M[..., start:stop].float()
    m = m[:, :, None].expand(batch, groups, dim // groups, dstate, stop - start)
    return m.reshape(batch, dim, dstate, stop - start).transpose(2, 3)


def _reduce_groups(x, groups):
    """(batch, dim, T, N) -> (batch, G, N, T) summing the channels of each group."""
    batch, dim, T, dstate = x.shape
    return x.reshape(batch, groups, dim // groups, T, dstate).sum(2).transpose(2, 3)


def _delta(delta, delta_bias, softplus):
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if softplus else dt


class _SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        T = chunk_length(batch, dim, dstate, length)
        A32 = A.float()
        y = torch.empty(batch, dim, length, dtype=torch.float32, device=u.device)
        n_chunks = (length + T - 1) // T
        starts = torch.empty(batch, dim, n_chunks, dstate, dtype=torch.float32, device=u.device)
        h = torch.zeros(batch, dim, dstate, dtype=torch.float32, device=u.device)
        for c, s in enumerate(range(0, length, T)):
            e = min(s + T, length)
            starts[:, :, c] = h
            dt = _delta(delta[:, :, s:e], delta_bias, softplus)
            a = torch.exp(dt[..., None] * A32[:, None, :])
            b = (dt * u[:, :, s:e].float())[..., None] * _expand_groups(B, dim, s, e)
            _, hs = _doubling_scan(a, b, h)
            y[:, :, s:e] = (hs * _expand_groups(C, dim, s, e)).sum(-1)
            h = hs[:, :, -1]
        if D is not None:
            y += D.float()[:, None] * u.float()
        if z is not None:
            y *= F.silu(z.float())
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.softplus = softplus
        ctx.chunk = T
        return y.to(u.dtype), h

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        softplus, T = ctx.softplus, ctx.chunk
        batch, dim, length = u.shape
        groups = B.shape[1]
        A32 = A.float()
        D32 = D.float() if D is not None else None
        du = torch.empty(batch, dim, length, dtype=torch.float32, device=u.device)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if z is not None else None
        dA = torch.zeros_like(A32)
        dB = torch.empty(B.shape, dtype=torch.float32, device=u.device)
        dC = torch.empty(C.shape, dtype=torch.float32, device=u.device)
        dD = torch.zeros(dim, dtype=torch.float32, device=u.device) if D is not None else None
        # carry = a_{t1} dh_{t1}: what the chunk after this one sends back to the last step of this one.
        carry = dlast.float() if dlast is not None else torch.zeros_like(starts[:, :, 0])
        dout = dout.float()
        for c in reversed(range(starts.shape[2])):
            s = c * T
            e = min(s + T, length)
            uc = u[:, :, s:e].float()
            dt = _delta(delta[:, :, s:e], delta_bias, softplus)
            a = torch.exp(dt[..., None] * A32[:, None, :])
            Bc = _expand_groups(B, dim, s, e)
            Cc = _expand_groups(C, dim, s, e)
            h0 = starts[:, :, c]
            _, hs = _doubling_scan(a, (dt * uc)[..., None] * Bc, h0)
            g = dout[:, :, s:e]
            if z is not None:
                zc = z[:, :, s:e].float()
                sz = torch.sigmoid(zc)
                pre = (hs * Cc).sum(-1)
                if D32 is not None:
                    pre = pre + D32[:, None] * uc
                dz[:, :, s:e] = g * pre * sz * (1 + zc * (1 - sz))
                g = g * zc * sz
            if D32 is not None:
                dD += (g * uc).sum((0, 2))
            # adjoint scan, run backwards: dh_t = C_t g_t + a_{t+1} dh_{t+1}
            a_next = torch.cat([a[:, :, 1:], torch.ones_like(a[:, :, :1])], 2)
            _, dh = _doubling_scan(a_next.flip(2), (Cc * g[..., None]).flip(2), carry)
            dh = dh.flip(2)
            carry = a[:, :, 0] * dh[:, :, 0]
            h_prev = torch.cat([h0[:, :, None], hs[:, :, :-1]], 2)
            dlog_a = dh * h_prev * a  # gradient w.r.t. dt * A
            dhB = (dh * Bc).sum(-1)
            ddt = (dlog_a * A32[:, None, :]).sum(-1) + dhB * uc
            dA += (dlog_a * dt[..., None]).sum((0, 2))
            du[:, :, s:e] = dhB * dt + (g * D32[:, None] if D32 is not None else 0)
            dB[..., s:e] = _reduce_groups(dh * (dt * uc)[..., None], groups)
            dC[..., s:e] = _reduce_groups(hs * g[..., None], groups)
            if softplus:
                raw = delta[:, :, s:e].float()
                if delta_bias is not None:
                    raw = raw + delta_bias.float()[:, None]
                ddt = ddt * torch.sigmoid(raw)
            ddelta[:, :, s:e] = ddt
        ddelta_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if D is not None else None, dz.to(z.dtype) if z is not None else None,
                ddelta_bias.to(delta_bias.dtype) if delta_bias is not None else None, None)


def selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Checked, normalised inputs (B and C as (batch, G, N, L)); returns (y, last_state)."""
    return _SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
