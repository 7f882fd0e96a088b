"""Float64 sequential selective scan: the independent reference every backend is tested against.

Deliberately the plainest possible reading of the recurrence (a Python loop over L), so that it
shares no code and no tricks with the fast paths. Differentiable through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Reference selective scan with ``mamba_ssm.selective_scan_fn`` semantics, computed in float64.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,). Returns y (batch, dim, L) in u's dtype and, if asked, the last state
    (batch, dim, N) in float32.
    """
    out_dtype = u.dtype
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, :, :, t] * u[:, :, t, None]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    y = y.to(out_dtype)
    return (y, h.float()) if return_last_state else y
