"""Triton selective scan, forward and backward, parallel over the sequence.

Built for volumes, where L is huge (64^3 .. 128^3 tokens) and dim is small: mamba_ssm runs one
(batch, channel) row per block and walks L serially, which leaves a GPU idle at 3D lengths. Here L is
cut into tiles of T steps and every tile is its own program (grid: channel parts x tiles x batch):

forward   1. each tile reduces its steps to a summary (P = prod a, H = local end state)   (_fwd_kernel)
          2. a short scan over the tile summaries gives every tile's incoming state      (_carry_kernel)
          3. each tile rescans from that state and writes y (with D, z gate fused)       (_fwd_kernel)
backward  1. each tile reduces its adjoint contribution R = sum_t (prod_{<=t} a) C_t dy_t (_bwd_summary_kernel)
          2. the carry scan runs backwards over tiles                                   (_carry_kernel)
          3. each tile recomputes its states from the saved tile-boundary state, runs the
             adjoint scan and writes every gradient                                     (_bwd_kernel)

State and accumulation are float32; inputs may be fp32/bf16/fp16. Nothing of size (batch, dim, L, N)
touches memory: the saved states are (batch, dim, N, L/T). A program covers a range of channels of
one group, so the group's B/C tile is loaded once and dB/dC are reduced in registers. Every exponent
is dt*A <= 0 and padding is (a=1, b=0): nothing divides by a decay.

Routed mode (HAS_INDEX, ``routed_selective_scan_triton``): the same kernels scan R routes of one
spatially ordered tensor without gathering it. Group g is route g; a program's step t is read from, and
its y / du / ddelta / dB / dC are written to, position ``route_index[g, t]`` instead of ``t`` (u being
shared by the routes, at its own channel offset). The HAS_INDEX=False code is the plain scan unchanged.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2. With reverse=True the later step comes first.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_dt(delta_ptr, bias_ptr, off, d, mask, md, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta tile -> (dt after bias/softplus with padding at 0, raw pre-softplus value)."""
    raw = tl.load(delta_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + d, mask=md, other=0.0)[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _program_range(n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group):
    """This program's tile, batch, group and channel range [d_lo, d_hi) (inside one B/C group).

    The grid is one axis (see ``_grid``): CUDA caps axes y and z at 65,535, which tiles of a long scan
    (L > 4.2M) would exceed. Channel parts vary fastest, then tiles, then batch.
    """
    pid = tl.program_id(0)
    parts = n_groups * parts_per_group
    pid_p = pid % parts
    pid_c = (pid // parts) % n_tiles
    pid_b = pid // (parts * n_tiles)
    g = pid_p // parts_per_group
    d_lo = g * dims_per_group + (pid_p % parts_per_group) * dims_per_part
    d_hi = tl.minimum(d_lo + dims_per_part, (g + 1) * dims_per_group)
    return pid_c, pid_b, d_lo, d_hi, g


@triton.jit
def _last_step(x, T: tl.constexpr):
    """The last step of a (BD, T, NP) block, as a sum with every other step masked to 0.

    Used instead of ``tl.reduce`` with ``_combine``: a compiled reduce folds in any order (per-thread
    strided elements, then lanes in butterfly order), so its combine must be commutative, which
    ``_combine`` is not. The last step of an ``associative_scan`` is order-exact, and a masked sum of
    one non-zero entry is exact in any order.
    """
    return tl.sum(tl.where((tl.arange(0, T) == T - 1)[None, :, None], x, 0.0), axis=1)


@triton.jit
def _positions(idx_ptr, g, t, mt, length, HAS_INDEX: tl.constexpr):
    """Memory position of every step t of this tile: t itself, or (routed scan, group g = route g) the
    spatial position route_index[g, t] the route visits at step t."""
    pos = t
    if HAS_INDEX:
        pos = tl.load(idx_ptr + g.to(tl.int64) * length + t, mask=mt, other=0)
    return pos


@triton.jit
def _bc_tile(pid_b, g, pos, mt, length, n_groups, N: tl.constexpr, NP: tl.constexpr):
    """Offsets and mask of this tile's (T, NP) block of B or C (batch pid_b, group g; steps at ``pos``)."""
    n = tl.arange(0, NP)
    mn = n < N
    bc_off = ((pid_b * n_groups + g) * N + n[None, :]).to(tl.int64) * length + pos[:, None]
    return n, mn, bc_off, mt[:, None] & mn[None, :]


@triton.jit
def _channel_block(delta_ptr, bias_ptr, A_ptr, d0, d_hi, pid_b, dim, length, pos, mt, n, mn, N: tl.constexpr,
                   BD: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Channels d0..d0+BD of this tile: offsets and masks into (batch, dim, L), dt (and its raw value), A."""
    d = d0 + tl.arange(0, BD)
    md = d < d_hi
    off = (pid_b * dim + d[:, None]).to(tl.int64) * length + pos[None, :]
    m2 = md[:, None] & mt[None, :]
    dt, raw = _load_dt(delta_ptr, bias_ptr, off, d, m2, md, HAS_BIAS, SOFTPLUS)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=md[:, None] & mn[None, :], other=0.0)
    return d, md, off, m2, dt, raw, A


@triton.jit
def _u_offsets(off, pid_b, d, g, dims_per_group, u_dim, routes_per_u, length, pos, HAS_INDEX: tl.constexpr):
    """Offsets of u. Plain scan: u is laid out like delta. Routed scan: u (batch, u_dim, L) is shared, route g
    reading channel block g // routes_per_u (its channel d - g * dims_per_group) at the route's positions."""
    u_off = off
    if HAS_INDEX:
        c = (g // routes_per_u - g) * dims_per_group + d
        u_off = (pid_b * u_dim + c[:, None]).to(tl.int64) * length + pos[None, :]
    return u_off


@triton.jit
def _dout_offsets(off, pid_b, d, g, dims_per_group, n_groups, length, pos, DOUT_SHARED: tl.constexpr):
    """Offsets of d(y). Routed scan whose output is summed over the routes: every route's d(y) is the same
    (batch, dims_per_group, L) tensor, read at the route's positions instead of materialising R copies."""
    dout_off = off
    if DOUT_SHARED:
        dout_off = _u_offsets(off, pid_b, d, g, dims_per_group, dims_per_group, n_groups, length, pos, True)
    return dout_off


@triton.jit
def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, sumP_ptr, sumH_ptr, idx_ptr,
                dim, length, n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group, u_dim, routes_per_u,
                N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                WRITE_Y: tl.constexpr, HAS_INDEX: tl.constexpr):
    pid_c, pid_b, d_lo, d_hi, g = _program_range(n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group)
    t = pid_c * T + tl.arange(0, T)
    mt = t < length
    pos = _positions(idx_ptr, g, t, mt, length, HAS_INDEX)
    n, mn, bc_off, m_bc = _bc_tile(pid_b, g, pos, mt, length, n_groups, N, NP)
    Bt = tl.load(B_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)  # (T, NP)
    if WRITE_Y:
        Ct = tl.load(C_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d, md, off, m2, dt, raw, A = _channel_block(delta_ptr, bias_ptr, A_ptr, d0, d_hi, pid_b, dim, length, pos,
                                                    mt, n, mn, N, BD, HAS_BIAS, SOFTPLUS)
        u_off = _u_offsets(off, pid_b, d, g, dims_per_group, u_dim, routes_per_u, length, pos, HAS_INDEX)
        u = tl.load(u_ptr + u_off, mask=m2, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, :, None] * A[:, None, :])  # (BD, T, NP)
        bx = (dt * u)[:, :, None] * Bt[None, :, :]
        s_off = ((pid_b * dim + d[:, None]) * NP + n[None, :]).to(tl.int64) * n_tiles + pid_c  # (BD, NP)
        m_s = md[:, None] & (n[None, :] < NP)
        acum, hloc = tl.associative_scan((a, bx), axis=1, combine_fn=_combine)
        if WRITE_Y:
            h0 = tl.load(sumH_ptr + s_off - 1, mask=m_s & (pid_c > 0), other=0.0)
            h = hloc + acum * h0[:, None, :]
            y = tl.sum(h * Ct[None, :, :], axis=2)  # (BD, T)
            if HAS_D:
                y += tl.load(D_ptr + d, mask=md, other=0.0)[:, None] * u
            if HAS_Z:
                z = tl.load(z_ptr + off, mask=m2, other=0.0).to(tl.float32)
                y *= z * _sigmoid(z)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m2)
        else:
            # the tile's summary is the scan's last step (padding steps are the identity (1, 0))
            tl.store(sumP_ptr + s_off, _last_step(acum, T), mask=m_s)
            tl.store(sumH_ptr + s_off, _last_step(hloc, T), mask=m_s)


@triton.jit
def _carry_kernel(sumP_ptr, sumH_ptr, init_ptr, n_tiles, NP: tl.constexpr, CB: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """Inclusive scan over tiles of h -> P h + H, per (batch, channel, state); result replaces sumH."""
    row = tl.program_id(0)
    n = tl.arange(0, NP)
    if HAS_INIT:
        carry = tl.load(init_ptr + row * NP + n)
    else:
        carry = tl.zeros([NP], dtype=tl.float32)
    for c0 in range(0, n_tiles, CB):
        k = c0 + tl.arange(0, CB)
        mk = k < n_tiles
        if REVERSE:
            c = n_tiles - 1 - k
        else:
            c = k
        off = (row * NP + n[:, None]).to(tl.int64) * n_tiles + c[None, :]
        m = mk[None, :] & (n[:, None] < NP)
        P = tl.load(sumP_ptr + off, mask=m, other=1.0)
        H = tl.load(sumH_ptr + off, mask=m, other=0.0)
        accP, accH = tl.associative_scan((P, H), axis=1, combine_fn=_combine)
        h = accH + accP * carry[:, None]
        tl.store(sumH_ptr + off, h, mask=m)
        # the new carry is the last column (order-exact; masked tiles past the end are the identity (1, 0))
        carry = tl.sum(tl.where((tl.arange(0, CB) == CB - 1)[None, :], h, 0.0), axis=1)


@triton.jit
def _gate_grad(dout, u, y_ssm, z, Dv, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """From d(out) to d(y_ssm) and d(z) for out = (y_ssm + D u) * silu(z)."""
    if HAS_Z:
        sz = _sigmoid(z)
        pre = y_ssm
        if HAS_D:
            pre += Dv[:, None] * u
        dz = dout * pre * sz * (1.0 + z * (1.0 - sz))
        dy = dout * z * sz
    else:
        dz = dout
        dy = dout
    return dy, dz


@triton.jit
def _bwd_summary_kernel(u_ptr, delta_ptr, A_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, sumH_ptr,
                        sumP_ptr, sumR_ptr, B_ptr, idx_ptr,
                        dim, length, n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group, u_dim,
                        routes_per_u, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, DOUT_SHARED: tl.constexpr):
    """Per tile: P = prod a and R = sum_t (prod_{s<=t} a_s) C_t dy_t (the adjoint sent to the tile before)."""
    pid_c, pid_b, d_lo, d_hi, g = _program_range(n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group)
    t = pid_c * T + tl.arange(0, T)
    mt = t < length
    pos = _positions(idx_ptr, g, t, mt, length, HAS_INDEX)
    n, mn, bc_off, m_bc = _bc_tile(pid_b, g, pos, mt, length, n_groups, N, NP)
    Ct = tl.load(C_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)
    if HAS_Z:
        Bt = tl.load(B_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d, md, off, m2, dt, raw, A = _channel_block(delta_ptr, bias_ptr, A_ptr, d0, d_hi, pid_b, dim, length, pos,
                                                    mt, n, mn, N, BD, HAS_BIAS, SOFTPLUS)
        logcum = tl.cumsum(dt[:, :, None] * A[:, None, :], axis=1)  # <= 0
        dout_off = _dout_offsets(off, pid_b, d, g, dims_per_group, n_groups, length, pos, DOUT_SHARED)
        dout = tl.load(dout_ptr + dout_off, mask=m2, other=0.0).to(tl.float32)
        s_off = ((pid_b * dim + d[:, None]) * NP + n[None, :]).to(tl.int64) * n_tiles + pid_c
        m_s = md[:, None] & (n[None, :] < NP)
        if HAS_Z:
            # the gate needs y_ssm: recompute the tile's states
            u_off = _u_offsets(off, pid_b, d, g, dims_per_group, u_dim, routes_per_u, length, pos, HAS_INDEX)
            u = tl.load(u_ptr + u_off, mask=m2, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + off, mask=m2, other=0.0).to(tl.float32)
            if HAS_D:
                Dv = tl.load(D_ptr + d, mask=md, other=0.0)
            else:
                Dv = tl.zeros([BD], dtype=tl.float32)
            a = tl.exp(dt[:, :, None] * A[:, None, :])
            bx = (dt * u)[:, :, None] * Bt[None, :, :]
            h0 = tl.load(sumH_ptr + s_off - 1, mask=m_s & (pid_c > 0), other=0.0)
            acum, hloc = tl.associative_scan((a, bx), axis=1, combine_fn=_combine)
            y_ssm = tl.sum((hloc + acum * h0[:, None, :]) * Ct[None, :, :], axis=2)
            dy, dz = _gate_grad(dout, u, y_ssm, z, Dv, HAS_D, HAS_Z)
        else:
            dy = dout
        R = tl.sum(tl.exp(logcum) * Ct[None, :, :] * dy[:, :, None], axis=1)
        P = tl.exp(tl.sum(dt[:, :, None] * A[:, None, :], axis=1))
        tl.store(sumP_ptr + s_off, P, mask=m_s)
        tl.store(sumR_ptr + s_off, R, mask=m_s)


@triton.jit
def _bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, sumH_ptr, sumE_ptr,
                dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
                idx_ptr, dim, length, n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group, u_dim,
                routes_per_u, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_DLAST: tl.constexpr, ATOMIC_BC: tl.constexpr, HAS_INDEX: tl.constexpr,
                DOUT_SHARED: tl.constexpr):
    pid_c, pid_b, d_lo, d_hi, g = _program_range(n_tiles, n_groups, dims_per_group, dims_per_part, parts_per_group)
    tl_ = tl.arange(0, T)
    t = pid_c * T + tl_
    mt = t < length
    # a_{t+1} inside the tile; the last step's successor is folded into the incoming adjoint E
    m_next = (tl_ < T - 1) & (t + 1 < length)
    pos = _positions(idx_ptr, g, t, mt, length, HAS_INDEX)
    if HAS_INDEX:  # routed: step t+1 lives at route_index[g, t+1], not next to step t
        pos_next = tl.load(idx_ptr + g.to(tl.int64) * length + t + 1, mask=m_next, other=0)
    n, mn, bc_off, m_bc = _bc_tile(pid_b, g, pos, mt, length, n_groups, N, NP)
    Bt = tl.load(B_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_off, mask=m_bc, other=0.0).to(tl.float32)
    dB_acc = tl.zeros([T, NP], dtype=tl.float32)
    dC_acc = tl.zeros([T, NP], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d, md, off, m2, dt, raw, A = _channel_block(delta_ptr, bias_ptr, A_ptr, d0, d_hi, pid_b, dim, length, pos,
                                                    mt, n, mn, N, BD, HAS_BIAS, SOFTPLUS)
        if HAS_INDEX:
            off_next = off + (pos_next - pos)[None, :]
        else:
            off_next = off + 1
        dt_next, raw_next = _load_dt(delta_ptr, bias_ptr, off_next, d, md[:, None] & m_next[None, :], md,
                                     HAS_BIAS, SOFTPLUS)
        u_off = _u_offsets(off, pid_b, d, g, dims_per_group, u_dim, routes_per_u, length, pos, HAS_INDEX)
        u = tl.load(u_ptr + u_off, mask=m2, other=0.0).to(tl.float32)
        dout_off = _dout_offsets(off, pid_b, d, g, dims_per_group, n_groups, length, pos, DOUT_SHARED)
        dout = tl.load(dout_ptr + dout_off, mask=m2, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=md, other=0.0)
        else:
            Dv = tl.zeros([BD], dtype=tl.float32)
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        bx = (dt * u)[:, :, None] * Bt[None, :, :]
        s_off = ((pid_b * dim + d[:, None]) * NP + n[None, :]).to(tl.int64) * n_tiles + pid_c
        m_s = md[:, None] & (n[None, :] < NP)
        h0 = tl.load(sumH_ptr + s_off - 1, mask=m_s & (pid_c > 0), other=0.0)
        acum, hloc = tl.associative_scan((a, bx), axis=1, combine_fn=_combine)
        hs = hloc + acum * h0[:, None, :]
        y_ssm = tl.sum(hs * Ct[None, :, :], axis=2)
        if HAS_Z:
            z = tl.load(z_ptr + off, mask=m2, other=0.0).to(tl.float32)
        else:
            z = dout
        dy, dz = _gate_grad(dout, u, y_ssm, z, Dv, HAS_D, HAS_Z)
        # incoming adjoint from the tiles after this one: E = a_{t1} dh_{t1}
        is_last = pid_c == n_tiles - 1
        E = tl.load(sumE_ptr + s_off + 1, mask=m_s & (pid_c + 1 < n_tiles), other=0.0)
        if HAS_DLAST:
            E += tl.load(dlast_ptr + (pid_b * dim + d[:, None]) * N + n[None, :],
                         mask=md[:, None] & mn[None, :] & is_last, other=0.0)
        a_next = tl.exp(dt_next[:, :, None] * A[:, None, :])
        gC = Ct[None, :, :] * dy[:, :, None]
        rprod, racc = tl.associative_scan((a_next, gC), axis=1, combine_fn=_combine, reverse=True)
        dh = racc + rprod * E[:, None, :]
        dlog_a = dh * (hs - bx)  # dh_t * a_t h_{t-1}: gradient w.r.t. dt_t * A
        dhB = tl.sum(dh * Bt[None, :, :], axis=2)
        ddt = tl.sum(dlog_a * A[:, None, :], axis=2) + dhB * u
        du = dhB * dt
        if HAS_D:
            du += dy * Dv[:, None]
        dB_acc += tl.sum(dh * (dt * u)[:, :, None], axis=0)
        dC_acc += tl.sum(hs * dy[:, :, None], axis=0)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_Z:
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
        part = (pid_b * n_tiles + pid_c).to(tl.int64) * dim
        tl.store(dA_part_ptr + (part + d[:, None]) * N + n[None, :], tl.sum(dlog_a * dt[:, :, None], axis=1),
                 mask=md[:, None] & mn[None, :])
        if HAS_D:
            tl.store(dD_part_ptr + part + d, tl.sum(tl.where(m2, dy * u, 0.0), axis=1), mask=md)
        if HAS_BIAS:
            tl.store(dbias_part_ptr + part + d, tl.sum(ddt, axis=1), mask=md)
    if ATOMIC_BC:
        tl.atomic_add(dB_ptr + bc_off, dB_acc, mask=m_bc)
        tl.atomic_add(dC_ptr + bc_off, dC_acc, mask=m_bc)
    else:
        tl.store(dB_ptr + bc_off, dB_acc, mask=m_bc)
        tl.store(dC_ptr + bc_off, dC_acc, mask=m_bc)


# CUDA's launch limit on grid axis x; the kernels use that axis alone (axes y and z stop at 65,535).
MAX_GRID_X = 2 ** 31 - 1


def _sm_count(device):
    """Streaming multiprocessors of the device (None for the interpreter). ``launch_recorder`` overrides it
    to plan launches for a GPU that is not there."""
    if _RECORDER is not None:
        return _RECORDER.sm_count
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def tiling(dstate, length, tile=None):
    """(NP, T, n_tiles): the state padded to a power of two, the tile length and the number of tiles."""
    T = tile or min(64, max(16, triton.next_power_of_2(length)))
    return triton.next_power_of_2(dstate), T, triton.cdiv(length, T)


def _launch_config(batch, dim, dstate, length, groups, device, tile=None, parts=None):
    """Tile length T, channels per step BD, and how many programs share one group's channels."""
    NP, T, n_tiles = tiling(dstate, length, tile)
    BD = max(1, min(16, 4096 // (T * NP)))
    dims_per_group = dim // groups
    sm_count = _sm_count(device)
    # the interpreter runs programs one by one: fewer, fuller programs are faster
    target = 4 * sm_count if sm_count else 1
    if parts is None:
        parts = triton.cdiv(target, batch * n_tiles * groups)
    parts = max(1, min(triton.cdiv(dims_per_group, BD), parts))
    dims_per_part = triton.cdiv(dims_per_group, parts)
    parts = triton.cdiv(dims_per_group, dims_per_part)
    # The backward holds about ten (BD, T, NP) fp32 blocks at once: from 1024 elements a block, 4 warps
    # spill (ptxas, sm_80/sm_90: 100-600 bytes at 4096); 8 warps hold them (`medmamba check --compile`,
    # docs/kernels.md).
    bwd_warps = 8 if BD * T * NP >= 1024 else 4
    return dict(NP=NP, T=T, BD=BD, n_tiles=n_tiles, dims_per_group=dims_per_group,
                dims_per_part=dims_per_part, parts_per_group=parts, bwd_warps=bwd_warps)


def _grid(cfg, groups, batch):
    """One grid axis of (channel parts x tiles x batch) programs, checked against CUDA's limit."""
    programs = groups * cfg["parts_per_group"] * cfg["n_tiles"] * batch
    if programs > MAX_GRID_X:
        raise ValueError(f"selective scan: {programs} programs exceed CUDA's grid limit ({MAX_GRID_X}); "
                         f"split the batch")
    return (programs,)


class LaunchRecorder:
    """Collects the launches the dispatch makes instead of running them (see ``launch_recorder``)."""

    def __init__(self, sm_count):
        self.sm_count = sm_count
        self.launches = []  # (kernel, grid, args, kwargs)


_RECORDER = None


@contextlib.contextmanager
def launch_recorder(sm_count=132):
    """Plan, do not run: every kernel launch inside is recorded (kernel, grid, arguments) and skipped, and
    launch configurations are chosen for a GPU with ``sm_count`` SMs (132: H100/H200; 108: A100). With
    tensors on the meta device this walks the dispatch without a GPU: the compile check and the grid
    limit tests use it."""
    global _RECORDER
    prev, _RECORDER = _RECORDER, LaunchRecorder(sm_count)
    try:
        yield _RECORDER
    finally:
        _RECORDER = prev


def _launch(kernel, grid, *args, **kwargs):
    if _RECORDER is not None:
        _RECORDER.launches.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def _carry(sumP, sumH, init, n_tiles, NP, reverse):
    rows = sumP.shape[0] * sumP.shape[1]
    CB = min(256, triton.next_power_of_2(n_tiles))
    _launch(_carry_kernel, (rows,), sumP, sumH, init if init is not None else sumH, n_tiles, NP=NP, CB=CB,
            REVERSE=reverse, HAS_INIT=init is not None)


def _on_input_device(fn):
    """Triton launches on the current CUDA device: make it the inputs' device, so a process whose current
    device is another GPU (DDP, several models on several GPUs) still launches where its tensors are."""
    @functools.wraps(fn)
    def run(u, *args, **kwargs):
        if u.device.type == "cuda":
            with torch.cuda.device(u.device):
                return fn(u, *args, **kwargs)
        return fn(u, *args, **kwargs)
    return run


@_on_input_device
def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, tile, parts, index=None, routes_per_u=1):
    """The three forward passes. Returns (y, sumH): y like delta (u's dtype; float32 for a routed scan) and
    sumH (batch, dim, NP, n_tiles), every tile's end state.

    ``index`` (R, L) int32 makes it the routed scan: every input is in spatial order, group g of B/C and
    channels g*dim/R.. are route g, whose step t reads (and whose y is written at) position index[g, t];
    u (batch, u_dim, L) is shared, route g reading channel block g // routes_per_u.
    """
    batch, dim, length = delta.shape
    groups, dstate = B.shape[1], A.shape[1]
    cfg = _launch_config(batch, dim, dstate, length, groups, u.device, tile, parts)
    NP, n_tiles = cfg["NP"], cfg["n_tiles"]
    sumP = torch.empty(batch, dim, NP, n_tiles, device=u.device, dtype=torch.float32)
    sumH = torch.empty_like(sumP)
    y = torch.empty_like(u) if index is None else torch.empty(delta.shape, device=u.device, dtype=torch.float32)
    grid = _grid(cfg, groups, batch)
    common = dict(N=dstate, NP=NP, BD=cfg["BD"], T=cfg["T"], HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_INDEX=index is not None)
    args = (dim, length, n_tiles, groups, cfg["dims_per_group"], cfg["dims_per_part"], cfg["parts_per_group"],
            u.shape[1], routes_per_u)
    dummy = u  # stands in for absent optional pointers; never read
    ptrs = (u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy)
    idx = index if index is not None else dummy
    _launch(_fwd_kernel, grid, *ptrs, y, sumP, sumH, idx, *args, WRITE_Y=False, **common)
    _carry(sumP, sumH, None, n_tiles, NP, reverse=False)  # sumH now holds every tile's end state
    _launch(_fwd_kernel, grid, *ptrs, y, sumP, sumH, idx, *args, WRITE_Y=True, **common)
    return y, sumH


@_on_input_device
def _scan_backward(u, delta, A, B, C, D, z, delta_bias, sumH, dout, dlast, softplus, tile, parts, index=None,
                   routes_per_u=1, dout_shared=False):
    """The three backward passes. Returns (du, ddelta, dA, dB, dC, dD, dz, dbias) in the inputs' dtypes.

    Routed (``index`` given): du is first written per route, like delta, in float32, then summed over the
    routes that share a channel block of u. ``dout_shared``: dout is one (batch, dim/G, L) tensor that is
    every route's d(y) (the output was summed over the routes).
    """
    dout = dout.contiguous()
    if parts is None and torch.are_deterministic_algorithms_enabled():
        parts = 1  # one program per channel group: dB/dC written once, no atomic reduction
    batch, dim, length = delta.shape
    groups, dstate = B.shape[1], A.shape[1]
    cfg = _launch_config(batch, dim, dstate, length, groups, u.device, tile, parts)
    NP, n_tiles = cfg["NP"], cfg["n_tiles"]
    grid = _grid(cfg, groups, batch)
    common = dict(N=dstate, NP=NP, BD=cfg["BD"], T=cfg["T"], HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_INDEX=index is not None,
                  DOUT_SHARED=dout_shared)
    args = (dim, length, n_tiles, groups, cfg["dims_per_group"], cfg["dims_per_part"], cfg["parts_per_group"],
            u.shape[1], routes_per_u)
    dummy = u
    Dp = D if D is not None else dummy
    zp = z if z is not None else dummy
    bp = delta_bias if delta_bias is not None else dummy
    idx = index if index is not None else dummy
    sumP = torch.empty_like(sumH)
    sumE = torch.empty_like(sumH)
    _launch(_bwd_summary_kernel, grid, u, delta, A, C, Dp, zp, bp, dout, sumH, sumP, sumE, B, idx, *args, **common)
    has_dlast = dlast is not None  # (checking it for zeros would synchronise with the GPU)
    init = None
    if has_dlast:
        dlast = dlast.float().contiguous()
        init = torch.zeros(batch, dim, NP, device=u.device, dtype=torch.float32)
        init[:, :, :dstate] = dlast
    _carry(sumP, sumE, init, n_tiles, NP, reverse=True)  # sumE[c] = a dh at the first step of tile c
    del sumP
    du = torch.empty_like(u) if index is None else torch.empty(delta.shape, device=u.device, dtype=torch.float32)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    atomic = cfg["parts_per_group"] > 1
    alloc = torch.zeros if atomic else torch.empty
    dB = alloc(B.shape, device=u.device, dtype=torch.float32)
    dC = alloc(C.shape, device=u.device, dtype=torch.float32)
    dA_part = torch.empty(batch * n_tiles, dim, dstate, device=u.device, dtype=torch.float32)
    dD_part = torch.empty(batch * n_tiles, dim, device=u.device, dtype=torch.float32) if D is not None else None
    dbias_part = torch.empty(batch * n_tiles, dim, device=u.device, dtype=torch.float32) \
        if delta_bias is not None else None
    _launch(_bwd_kernel, grid, u, delta, A, B, C, Dp, zp, bp, dout, sumH, sumE, dlast if has_dlast else dummy,
                      du, ddelta, dz if dz is not None else dummy, dB, dC, dA_part,
                      dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
                      idx, *args, HAS_DLAST=has_dlast, ATOMIC_BC=atomic, num_warps=cfg["bwd_warps"], **common)
    if index is not None:  # per-route du -> sum over the routes sharing each channel block of u
        du = du.view(batch, u.shape[1] // (dim // groups), routes_per_u, dim // groups, length).sum(2)
        du = du.view(u.shape).to(u.dtype)
    dA = dA_part.sum(0)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, tile=None, parts=None):
    """Checked, normalised inputs (B and C as (batch, G, N, L)); returns (y, last_state), through the
    ``medmamba::selective_scan_fwd`` operator.

    ``tile`` overrides the tile length (a power of two) and ``parts`` the number of programs sharing a
    group's channels (> 1 reduces dB/dC with atomics); tests use them to reach every code path.
    """
    from .ops import selective_scan_op

    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    z = z.contiguous() if z is not None else None
    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, "triton", tile, parts)


def routed_selective_scan_triton(u, delta, A, B, C, D, delta_bias, index, delta_softplus, tile=None, parts=None):
    """Routed scan on checked inputs (see ``medmamba.kernels.routed_selective_scan``): u (batch, K*Dc, L),
    delta (batch, R*Dc, L), B/C (batch, R, N, L), all in spatial order, index (R, L) int32. Returns y
    (batch, R, Dc, L) float32 in spatial order. No gathered copy of any input is made: the kernels load
    and store through ``index``; a d(y) that is one tensor expanded over the routes (the gradient of
    ``y.sum(1)``) is read in place.
    """
    from .ops import routed_scan_op

    u, delta, A, B, C, index = (t.contiguous() for t in (u, delta, A, B, C, index))
    return routed_scan_op(u, delta, A, B, C, D, delta_bias, index, delta_softplus, tile, parts)
