"""Vectorised PyTorch selective scan (CPU, and fallback everywhere).

The sequence is cut into chunks of T steps. Inside a chunk the linear recurrence
h_t = a_t h_{t-1} + b_t is solved for all T steps at once by a Hillis-Steele doubling scan over the
pairs (a, b): log2(T) element-wise passes, every multiplier a product of decays <= 1, so no exponent
is ever positive and nothing divides by a cumulative decay. Chunks are visited in order carrying the
state, which bounds memory by one (batch, dim, T, N) block instead of (batch, dim, L, N).

Eager forward (``_blocked_forward``; not under tracing) uses a cheaper two-level form instead of the doubling
scan, which reads and writes its (.., T, N) block log2(T) times: a block of ``n_sub * steps`` tokens is laid
out (steps, batch, G, n_sub, Dg, N), so that step t of all n_sub sub-chunks is one contiguous slab. Every
sub-chunk is scanned from a zero state by ``steps`` fused slab updates (h_t = a_t h_{t-1} + b_t, and in the same
sweep the running product of the decays); the states entering the sub-chunks are then carried across them
(n_sub small updates) and added back as (product of decays) x (entering state); y = C . h is one batched matmul.
About seven passes over the block instead of 2 log2(T) + 3, all multipliers still products of decays <= 1.

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
    t = int(_BLOCK_ELEMENTS // max(1, int(batch) * int(dim) * int(dstate)))  # ints also when traced
    t = 1 << max(4, min(11, t.bit_length() - 1))  # power of two in [16, 2048]
    return max(1, min(t, length))


# Eager forward (``_blocked_forward``): sequential steps per sub-chunk and elements per slab (one step of all
# sub-chunks of a block); chosen by timing the networks' scan shapes on one CPU core (scripts/bench_kernels.py
# --cpu-scan-sweep).
_FWD_STEPS = 16
_FWD_SLAB = 1 << 16


def _doubling_scan(a, b, h0=None):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along dim -2 of (..., T, N) blocks.

    Returns (prod a_0..a_t, h_t); h0 (..., N) is the state before the block. Never writes a or b: each
    doubling step is one fused pass per tensor into one of two alternating buffers.
    """
    T = a.shape[-2]
    if torch.jit.is_tracing():  # a traced graph must stay differentiable: no out= ops
        k = 1
        while k < T:
            b = torch.cat([b[..., :k, :], torch.addcmul(b[..., k:, :], a[..., k:, :], b[..., :-k, :])], -2)
            a = torch.cat([a[..., :k, :], a[..., k:, :] * a[..., :-k, :]], -2)
            k <<= 1
        return a, (b + a * h0.unsqueeze(-2) if h0 is not None else b)
    bufs = [(torch.empty_like(a), torch.empty_like(b)), (torch.empty_like(a), torch.empty_like(b))] if T > 1 else []
    k, i = 1, 0
    while k < T:
        da, db = bufs[i]
        torch.addcmul(b[..., k:, :], a[..., k:, :], b[..., :-k, :], out=db[..., k:, :])
        torch.mul(a[..., k:, :], a[..., :-k, :], out=da[..., k:, :])
        db[..., :k, :] = b[..., :k, :]
        da[..., :k, :] = a[..., :k, :]
        a, b, i, k = da, db, i ^ 1, k << 1
    if h0 is not None:
        b = b.addcmul_(a, h0.unsqueeze(-2)) if bufs else b + a * h0.unsqueeze(-2)
    return a, b


def _two_level_states(a, b, h0=None):
    """The states of h_t = a_t h_{t-1} + b_t along dim -2 of (..., T, N) blocks, h0 (..., N) the state before
    (None: zero), by the two-level form of ``_blocked_forward`` on sub-chunks of ``_FWD_STEPS`` steps (strided
    slabs here; the doubling scan for N < 8). Eager only (writes in place): b must be a fresh contiguous tensor,
    which it may overwrite; a is never written."""
    T, N = a.shape[-2], a.shape[-1]
    if N < 8:  # slabs of N < 8 contiguous values are too thin: the doubling scan is faster there
        return _doubling_scan(a, b, h0)[1]
    S = min(_FWD_STEPS, T)
    nc = -(-T // S)
    if nc * S != T or not b.is_contiguous():
        pad = (0, 0, 0, nc * S - T)
        a, b = F.pad(a, pad, value=1.0), F.pad(b, pad)
    lead = a.shape[:-2]
    a4, b4 = a.reshape(*lead, nc, S, N), b.view(*lead, nc, S, N)
    p = torch.empty_like(b4)  # running products of the decays inside each sub-chunk
    p[..., 0, :] = a4[..., 0, :]
    for t in range(1, S):
        b4[..., t, :].addcmul_(a4[..., t, :], b4[..., t - 1, :])
        torch.mul(a4[..., t, :], p[..., t - 1, :], out=p[..., t, :])
    entering = torch.empty(*lead, nc + 1, N, dtype=b.dtype, device=b.device)
    entering[..., 0, :] = 0 if h0 is None else h0
    for c in range(nc):
        torch.addcmul(b4[..., c, S - 1, :], p[..., c, S - 1, :], entering[..., c, :], out=entering[..., c + 1, :])
    b4.addcmul_(p, entering[..., :nc, None, :])
    return b4.view(*lead, nc * S, N)[..., :T, :]


def _group_view(x, groups):
    """(batch, dim, ...) -> (batch, G, dim/G, ...) without copying."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])


def _bc_chunk(M, start, stop):
    """(batch, G, N, L) -> (batch, G, 1, T, N) fp32 for steps [start, stop): broadcasts over a group's channels."""
    return M[..., start:stop].float().transpose(-1, -2).unsqueeze(2).contiguous()


def _delta(delta, delta_bias, softplus):
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if softplus else dt


def _blocked_forward(u, delta, A, B, C, delta_bias, softplus, T):
    """Eager forward without D and z: (y float32 (batch, dim, L), last state (batch, G, Dg, N), the states at
    the backward's chunk starts (batch, G, Dg, ceil(L / T), N)). See the module docstring."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dg = dim // groups
    steps = max(1, min(_FWD_STEPS, length))
    per_step = batch * dim * dstate  # elements of one sub-chunk step
    n_sub = max(1, _FWD_SLAB // per_step)
    if T >= steps:  # every backward chunk start (a multiple of T) must be a block start
        n_sub = min(n_sub, T // steps)
    n_sub = 1 << (n_sub.bit_length() - 1)  # with T and steps powers of two, n_sub * steps divides T
    block = n_sub * steps
    dev = u.device
    A_v = A.float().reshape(1, groups, 1, dg, dstate)
    y = torch.empty(batch, dim, length, dtype=torch.float32, device=dev)
    starts = torch.empty(batch, groups, dg, -(-length // T), dstate, dtype=torch.float32, device=dev)
    a_buf = torch.empty(steps, batch, groups, n_sub, dg, dstate, dtype=torch.float32, device=dev)
    b_buf = torch.empty_like(a_buf)
    y_buf = torch.empty(steps, batch, groups, n_sub, dg, 1, dtype=torch.float32, device=dev)
    h = torch.zeros(batch, groups, dg, dstate, dtype=torch.float32, device=dev)
    for s in range(0, length, block):
        e = min(s + block, length)
        if s % T == 0:
            starts[:, :, :, s // T] = h
        dt = _delta(delta[:, :, s:e], delta_bias, softplus)
        dtu = dt * u[:, :, s:e].float()
        Bc, Cc = B[..., s:e].float(), C[..., s:e].float()
        ns = n_sub
        if e - s < block:  # last block: pad to whole sub-chunks with dt = 0 (decay 1, input 0: the state carries)
            ns = -(-(e - s) // steps)
            pad = (0, ns * steps - (e - s))
            dt, dtu, Bc, Cc = (F.pad(t, pad) for t in (dt, dtu, Bc, Cc))
        a, b, yv = a_buf[:, :, :, :ns], b_buf[:, :, :, :ns], y_buf[:, :, :, :ns]

        def steps_first(t, inner):  # (batch, G, inner, ns * steps) -> contiguous (steps, batch, G, ns, inner)
            return t.reshape(batch, groups, inner, ns, steps).permute(4, 0, 1, 3, 2).contiguous()
        # the big (.., Dg, N) products read contiguous small operands (strided ones make them several times slower)
        torch.mul(steps_first(dt, dg).unsqueeze(-1), A_v, out=a)
        a.exp_()
        torch.mul(steps_first(dtu, dg).unsqueeze(-1), steps_first(Bc, dstate).unsqueeze(-2), out=b)
        a_t, b_t = a.unbind(0), b.unbind(0)
        for t in range(1, steps):  # every sub-chunk from a zero state; a becomes the running product
            b_t[t].addcmul_(a_t[t], b_t[t - 1])
            a_t[t].mul_(a_t[t - 1])
        # states entering the sub-chunks: entering[c + 1] = prod(a over c) * entering[c] + (zero-start end of c)
        entering = torch.empty(batch, groups, ns + 1, dg, dstate, dtype=torch.float32, device=dev)
        entering[:, :, 0] = h
        ends, decays, ent = b_t[steps - 1].unbind(2), a_t[steps - 1].unbind(2), entering.unbind(2)
        for c in range(ns):
            torch.addcmul(ends[c], decays[c], ent[c], out=ent[c + 1])
        h = ent[ns].clone()
        b.addcmul_(a, entering[:, :, :ns].unsqueeze(0))
        torch.matmul(b, steps_first(Cc, dstate).unsqueeze(-1), out=yv)
        yc = yv.reshape(steps, batch, groups, ns, dg).permute(1, 2, 4, 3, 0).reshape(batch, groups, dg, -1)
        _group_view(y, groups)[..., s:e] = yc[..., :e - s]
    return y, h, starts


# Traced forward (``_traced_forward``, ONNX export): elements of one (sub-chunks, batch, dim, N) slab, the
# largest tensor the traced scan holds (a few live at once: 64 MiB each). A block of tokens is ``_FWD_STEPS``
# slabs; fewer, larger blocks give a smaller graph (the trace unrolls the loop over blocks).
_TRACED_SLAB_ELEMENTS = 1 << 24

# The loops over the steps of a sub-chunk are TorchScript functions (``_scripted``), exported as ONNX Loop
# operators. Unrolled, ONNX Runtime's execution order (by node index) computes the independent per-step products
# (decays, inputs, outputs) long before the recurrence needs them and keeps them all alive: the scan of
# LightM-UNet's first stage (dim 64, 204,800 tokens) ran at about 2 GB above the session's memory unrolled,
# 0.01 GB in loops (0.26 GB with ONNX Runtime's arena); scripts/bench_traced_scan.py.
_SCRIPTED: dict = {}


def _scripted(fn):
    """``fn`` compiled by ``torch.jit.script`` on first use (so importing medmamba neither compiles nor warns)."""
    if fn.__name__ not in _SCRIPTED:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, ONNX Loop export not
            _SCRIPTED[fn.__name__] = torch.jit.script(fn)
    return _SCRIPTED[fn.__name__]


def _loop_ends(a2: torch.Tensor, b2: torch.Tensor):
    """(S, nc, ...) decays and inputs of S steps of nc sub-chunks -> (product of the decays, state after the S steps
    from a zero state), (nc, ...) each."""
    p, h = a2[0], b2[0]
    for t in range(1, a2.shape[0]):
        h = h * a2[t] + b2[t]
        p = p * a2[t]
    return p, h


def _loop_states(a2: torch.Tensor, b2: torch.Tensor, h: torch.Tensor):
    """The states after each of S steps of nc sub-chunks entered with states h (nc, ...): (nc, S, ...)."""
    hs = []
    for t in range(a2.shape[0]):
        h = h * a2[t] + b2[t]
        hs.append(h)
    return torch.stack(hs, 1)


def _loop_scan_ends(dtS: torch.Tensor, dtuS: torch.Tensor, BS: torch.Tensor, A: torch.Tensor):
    """Decays exp(dt A) and inputs dt u B made step by step from (S, nc, batch, G, Dg) dt and dt u and
    (S, nc, batch, G, N) B; A (G, Dg, N). Returns the state after the S steps of each sub-chunk from zero."""
    h = dtuS[0].unsqueeze(-1) * BS[0].unsqueeze(-2)
    for t in range(1, dtS.shape[0]):
        h = h * torch.exp(dtS[t].unsqueeze(-1) * A) + dtuS[t].unsqueeze(-1) * BS[t].unsqueeze(-2)
    return h


def _loop_scan_outputs(dtS: torch.Tensor, dtuS: torch.Tensor, BS: torch.Tensor, CS: torch.Tensor,
                       A: torch.Tensor, h: torch.Tensor):
    """As ``_loop_scan_ends`` from the entering states h (nc, batch, G, Dg, N); returns C_t . h_t of every step,
    (nc, S, batch, G, Dg)."""
    ys = []
    for t in range(dtS.shape[0]):
        h = h * torch.exp(dtS[t].unsqueeze(-1) * A) + dtuS[t].unsqueeze(-1) * BS[t].unsqueeze(-2)
        ys.append(torch.matmul(h, CS[t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, 1)


def _entering(ends, h0):
    """States entering the sub-chunks from the true states at their ends (nc, ...) and the state before (None: 0)."""
    first = torch.zeros_like(ends[:1]) if h0 is None else h0.unsqueeze(0)
    return torch.cat([first, ends[:-1]]) if ends.shape[0] > 1 else first


def _traced_states(a, b, h0=None):
    """The states of h_t = a_t h_{t-1} + b_t along dim 0 of (n, ...) tensors, h0 (...) the state before (None:
    zero); out of place, for tracing. Two passes over sub-chunks of ``_FWD_STEPS`` steps, all sub-chunks at once:
    each from a zero state (its end and product of decays), then, from the states entering them (this function
    on the ends, recursively: log_S(n) levels), again. Every multiplier is a product of decays <= 1."""
    n = a.shape[0]
    S = _FWD_STEPS
    if n <= S:
        h0 = torch.zeros_like(b[0]) if h0 is None else h0
        return _scripted(_loop_states)(a.unsqueeze(1), b.unsqueeze(1), h0)[0]
    nc = (n + S - 1) // S  # not -(-n // S): sizes traced for ONNX floor-divide negatives towards zero
    rest = a.shape[1:]
    if nc * S != n:  # pad with decay 1, input 0
        a = torch.cat([a, torch.ones((nc * S - n, *rest), dtype=a.dtype, device=a.device)])
        b = torch.cat([b, torch.zeros((nc * S - n, *rest), dtype=b.dtype, device=b.device)])
    a2 = a.reshape(nc, S, *rest).transpose(0, 1)  # (S, nc, ...): step t of every sub-chunk
    b2 = b.reshape(nc, S, *rest).transpose(0, 1)
    p, hz = _scripted(_loop_ends)(a2, b2)
    ends = _traced_states(p, hz, h0)  # the true states at the sub-chunk ends
    return _scripted(_loop_states)(a2, b2, _entering(ends, h0)).reshape(nc * S, *rest)[:n]


def _traced_forward(u, delta, A, B, C, delta_bias, softplus):
    """Forward without D and z for tracing (ONNX export): out-of-place ops only, outputs concatenated, no saved
    states. A block of tokens is cut into sub-chunks of ``_FWD_STEPS`` steps laid out (steps, sub-chunks, batch,
    G, Dg); the two passes (``_loop_scan_ends``, then ``_loop_scan_outputs`` from the entering states that
    ``_traced_states`` gives from the sub-chunk ends) make each step's decays and inputs (sub-chunks, batch, G,
    Dg, N) from these small tensors inside their loops, so no (tokens, ..., N) tensor exists. The product of a
    sub-chunk's decays is exp(A sum(dt)).
    Returns (y float32 (batch, dim, L), last state (batch, G, Dg, N), None)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    dg = dim // groups
    S = _FWD_STEPS
    block = S * max(1, _TRACED_SLAB_ELEMENTS // (batch * dim * dstate))
    A_v = A.float().reshape(groups, dg, dstate)
    h, ys = None, []
    for s in range(0, length, block):
        e = min(s + block, length)
        n = e - s
        nc = (n + S - 1) // S
        dt = _delta(delta[:, :, s:e], delta_bias, softplus)
        dtu = dt * u[:, :, s:e].float()
        Bc, Cc = B[..., s:e].float(), C[..., s:e].float()
        if nc * S != n:  # pad with dt = 0 (decay 1, input 0: the state carries)
            pad = (0, nc * S - n)
            dt, dtu, Bc, Cc = (F.pad(x, pad) for x in (dt, dtu, Bc, Cc))

        def steps_first(x, inner):  # (batch, G, inner, nc * S) -> (S, nc, batch, G, inner)
            return x.reshape(batch, groups, inner, nc, S).permute(4, 3, 0, 1, 2).contiguous()
        dtS, dtuS = steps_first(dt, dg), steps_first(dtu, dg)
        BS, CS = steps_first(Bc, dstate), steps_first(Cc, dstate)
        p = torch.exp(dtS.sum(0).unsqueeze(-1) * A_v)  # (nc, batch, G, Dg, N)
        ends = _traced_states(p, _scripted(_loop_scan_ends)(dtS, dtuS, BS, A_v), h)
        y = _scripted(_loop_scan_outputs)(dtS, dtuS, BS, CS, A_v, _entering(ends, h))  # (nc, S, batch, G, Dg)
        ys.append(y.reshape(nc * S, batch, groups, dg)[:n])
        h = ends[-1]
    y = torch.cat(ys) if len(ys) > 1 else ys[0]  # (L, batch, G, Dg)
    return y.permute(1, 2, 3, 0).reshape(batch, dim, length), h, None


def _doubling_forward(u, delta, A, B, C, delta_bias, softplus, T):
    """Forward without D and z by the chunked doubling scan: (y float32 (batch, dim, L), last state (batch, G,
    Dg, N), chunk-start states or None under tracing). What runs under tracing (ONNX export: out-of-place ops
    only, chunk outputs concatenated, no saved states; ONNX's exporter does not follow writes into views of an
    empty tensor); in eager mode, the pre-``_blocked_forward`` path, kept for comparison (bench_kernels.py)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    A32 = _group_view(A.float()[None], groups)[:, :, :, None, :]  # (1, G, Dg, 1, N)
    traced = torch.jit.is_tracing()
    n_chunks = (length + T - 1) // T
    starts = None if traced else \
        torch.empty(batch, groups, dim // groups, n_chunks, dstate, dtype=torch.float32, device=u.device)
    y = None if traced else torch.empty(batch, dim, length, dtype=torch.float32, device=u.device)
    h, ys = None, []
    for c, s in enumerate(range(0, length, T)):
        e = min(s + T, length)
        if not traced:
            starts[:, :, :, c] = 0 if h is None else h
        dt = _group_view(_delta(delta[:, :, s:e], delta_bias, softplus), groups)
        a = torch.exp(dt.unsqueeze(-1) * A32)
        b = (dt * _group_view(u[:, :, s:e].float(), groups)).unsqueeze(-1) * _bc_chunk(B, s, e)
        _, hs = _doubling_scan(a, b, h)
        yc = torch.einsum("bgdtn,bgotn->bgdt", hs, _bc_chunk(C, s, e))
        if traced:
            ys.append(yc)
        else:
            _group_view(y, groups)[..., s:e] = yc
        h = hs[..., -1, :]
    if traced:
        y = (torch.cat(ys, -1) if len(ys) > 1 else ys[0]).reshape(batch, dim, length)
    return y, h, starts


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, method=None):
    """Forward pass: (y in u's dtype, last state, chunk-start states, chunk length).

    Every (batch, dim, ...) tensor is viewed as (batch, G, dim/G, ...) so that B and C, shared by a
    group's channels, broadcast instead of being copied per channel. ``method``: "blocked" (eager default),
    "traced" (always under tracing; out of place) or "doubling" (the chunked doubling scan, the code before
    ``_blocked_forward``, kept for comparison).
    """
    batch, dim, length = u.shape
    dstate = A.shape[1]
    T = chunk_length(batch, dim, dstate, length)
    traced = torch.jit.is_tracing()
    if method == "doubling":
        y, h, starts = _doubling_forward(u, delta, A, B, C, delta_bias, softplus, T)
    elif traced or method == "traced":
        y, h, starts = _traced_forward(u, delta, A, B, C, delta_bias, softplus)
    else:
        y, h, starts = _blocked_forward(u, delta, A, B, C, delta_bias, softplus, T)
    if traced:
        if D is not None:
            y = y + D.float()[:, None] * u.float()
        if z is not None:
            y = y * F.silu(z.float())
    else:
        if D is not None:
            y += D.float()[:, None] * u.float()
        if z is not None:
            y *= F.silu(z.float())
    return y.to(u.dtype), h.reshape(batch, dim, dstate), starts, T


def _scan_backward(u, delta, A, B, C, D, z, delta_bias, starts, dout, dlast, softplus):
    """Backward pass from the chunk-start states ``starts``: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in
    the inputs' dtypes (None for absent inputs). ``dlast`` (the last state's gradient) may be None."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    T = chunk_length(batch, dim, dstate, length)
    gv = lambda x: _group_view(x, groups)  # noqa: E731
    A32 = gv(A.float()[None])[:, :, :, None, :]
    D32 = D.float()[:, None] if D is not None else None
    du = torch.empty(batch, dim, length, dtype=torch.float32, device=u.device)
    ddelta = torch.empty_like(du)
    dz = torch.empty_like(du) if z is not None else None
    dA = torch.zeros_like(A32)
    dB = torch.empty(B.shape, dtype=torch.float32, device=u.device)
    dC = torch.empty(C.shape, dtype=torch.float32, device=u.device)
    dD = torch.zeros(dim, dtype=torch.float32, device=u.device) if D is not None else None
    # carry = a_{t1} dh_{t1}: what the chunk after this one sends back to the last step of this one.
    carry = gv(dlast.float()) if dlast is not None else torch.zeros_like(starts[:, :, :, 0])
    dout = dout.float()
    for c in reversed(range(starts.shape[3])):
        s = c * T
        e = min(s + T, length)
        uc = u[:, :, s:e].float()
        dt = _delta(delta[:, :, s:e], delta_bias, softplus)
        a = torch.exp(gv(dt).unsqueeze(-1) * A32)
        Bc, Cc = _bc_chunk(B, s, e), _bc_chunk(C, s, e)
        dtu = gv(dt * uc).unsqueeze(-1)
        h0 = starts[:, :, :, c]
        hs = _two_level_states(a, dtu * Bc, h0)
        g = dout[:, :, s:e]
        if z is not None:
            zc = z[:, :, s:e].float()
            sz = torch.sigmoid(zc)
            pre = gv(torch.einsum("bgdtn,bgotn->bgdt", hs, Cc)).reshape(batch, dim, -1)
            if D32 is not None:
                pre = pre + D32 * uc
            dz[:, :, s:e] = g * pre * sz * (1 + zc * (1 - sz))
            g = g * zc * sz
        if D32 is not None:
            dD += (g * uc).sum((0, 2))
        gg = gv(g).unsqueeze(-1)
        # adjoint scan, run backwards: dh_t = C_t g_t + a_{t+1} dh_{t+1}
        a_next = torch.cat([a[..., 1:, :], torch.ones_like(a[..., :1, :])], -2)
        dh = _two_level_states(a_next.flip(-2), (Cc * gg).flip(-2), carry)
        dh = dh.flip(-2)
        carry = a[..., 0, :] * dh[..., 0, :]
        h_prev = torch.cat([h0.unsqueeze(-2), hs[..., :-1, :]], -2)
        dlog_a = dh * h_prev * a  # gradient w.r.t. dt * A
        dhB = (dh * Bc).sum(-1)  # (batch, G, Dg, T)
        ddt = (dlog_a * A32).sum(-1) + dhB * gv(uc)
        dA += (dlog_a * gv(dt).unsqueeze(-1)).sum((0, 3), keepdim=True)
        du_c = dhB * gv(dt)
        du[:, :, s:e] = du_c.reshape(batch, dim, -1) + (g * D32 if D32 is not None else 0)
        dB[..., s:e] = torch.einsum("bgdtn,bgdt->bgnt", dh, gv(dt * uc))
        dC[..., s:e] = torch.einsum("bgdtn,bgdt->bgnt", hs, gv(g))
        ddt = ddt.reshape(batch, dim, -1)
        if softplus:
            raw = delta[:, :, s:e].float()
            if delta_bias is not None:
                raw = raw + delta_bias.float()[:, None]
            ddt = ddt * torch.sigmoid(raw)
        ddelta[:, :, s:e] = ddt
    ddelta_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
    dA = dA.reshape(dim, dstate)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.to(D.dtype) if D is not None else None, dz.to(z.dtype) if z is not None else None,
            ddelta_bias.to(delta_bias.dtype) if delta_bias is not None else None)


def selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Checked, normalised inputs (B and C as (batch, G, N, L)); returns (y, last_state), through the
    ``medmamba::selective_scan_fwd`` operator.

    Under ``torch.jit.trace`` the forward is recorded as plain tensor ops instead (TorchScript would need
    medmamba's operators registered to load the model), so traced networks export for inference.
    """
    if torch.jit.is_tracing():
        return _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[:2]
    from .ops import selective_scan_op

    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, "torch")
