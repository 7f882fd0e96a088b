"""An ONNX-exportable form of the PyTorch selective scan, used only while exporting.

Under ``torch.jit.trace`` the kernels record their PyTorch scan as plain tensor ops (chunked doubling scan,
see ``medmamba/kernels/scan_torch.py``), which ONNX can express: no custom operator is needed. But the forward
writes each chunk's output into a view of a preallocated tensor (``yg[..., s:e] = ...`` on a grouped view of
``y``, then ``y += ...``/``y *= ...`` in place). TorchScript's ONNX exporter does not follow writes through a
view of an ``empty`` tensor reliably: the exported graph silently lost the scan term (relative errors of 1-10 %
on the logits, seen on U-Mamba Enc and LightM-UNet). :func:`functional_scan` is the same computation with the
chunk outputs concatenated and no in-place op; :func:`exportable_scan` swaps it in for the duration of an
export. Numerically it is the traced forward (same chunk length, same doubling scan).

Kernel-side fix that would make this module unnecessary: in ``scan_torch._scan_forward``, when
``torch.jit.is_tracing()``, collect the chunk outputs in a list and ``torch.cat`` them, and use out-of-place
``y = y + ...``/``y = y * ...`` (the ``starts`` tensor is not needed for inference).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def functional_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """``scan_torch._scan_forward`` without in-place writes; returns (y, last_state, None, T)."""
    from medmamba.kernels import scan_torch as st

    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    T = st.chunk_length(batch, dim, dstate, length)
    A32 = st._group_view(A.float()[None], groups)[:, :, :, None, :]
    h, ys = None, []
    for s in range(0, length, T):
        e = min(s + T, length)
        dt = st._group_view(st._delta(delta[:, :, s:e], delta_bias, softplus), groups)
        a = torch.exp(dt.unsqueeze(-1) * A32)
        b = (dt * st._group_view(u[:, :, s:e].float(), groups)).unsqueeze(-1) * st._bc_chunk(B, s, e)
        _, hs = st._doubling_scan(a, b, h)
        ys.append(torch.einsum("bgdtn,bgotn->bgdt", hs, st._bc_chunk(C, s, e)))
        h = hs[..., -1, :]
    y = (torch.cat(ys, -1) if len(ys) > 1 else ys[0]).reshape(batch, dim, length)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h.reshape(batch, dim, dstate), None, T


@contextlib.contextmanager
def exportable_scan():
    """Within the block, traced selective scans record :func:`functional_scan`."""
    from medmamba.kernels import scan_torch as st

    saved = st._scan_forward
    st._scan_forward = functional_scan
    try:
        yield
    finally:
        st._scan_forward = saved
