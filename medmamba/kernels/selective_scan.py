"""The one public selective-scan entry point: input checks and dispatch by device."""
from __future__ import annotations

import os
import shutil

import torch

from .scan_torch import selective_scan_torch

BACKENDS = ("torch", "triton")
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


class ScanInputError(ValueError):
    """Raised for inputs that do not match the selective-scan contract."""


def triton_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the Triton backend can run on tensors of this device, and why not."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        # Triton builds a small C launcher the first time a kernel runs: without a C compiler (slim
        # runtime containers) it would fail mid-forward, so fall back to the PyTorch path instead.
        cc = os.environ.get("CC")
        if not (shutil.which(cc) if cc else any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
            return False, "no C compiler found (Triton needs one to build its kernel launcher; set CC)"
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, ""
        return False, "Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 " \
                      "before medmamba.kernels is first used"
    return False, f"no Triton backend for device type {device.type!r}"


def resolve_backend(device: torch.device | str, backend: str | None = None, op: str = "selective_scan") -> str:
    """The backend a scan of tensors on ``device`` runs on: ``backend`` if given, else the environment
    variable MEDMAMBA_SCAN_BACKEND, else Triton for CUDA tensors (when it can run) and PyTorch otherwise."""
    if backend is None:
        backend = os.environ.get("MEDMAMBA_SCAN_BACKEND") or None
    if backend is None:
        device = torch.device(device)
        backend = "triton" if device.type == "cuda" and triton_available(device)[0] else "torch"
    if backend not in BACKENDS:
        raise ScanInputError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS} or None")
    return backend


def _check(u, delta, A, B, C, D, z, delta_bias, op="selective_scan"):
    def fail(msg):
        raise ScanInputError(f"{op}: {msg}")

    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        fail(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        fail("sequence length L is 0")
    if delta.shape != u.shape:
        fail(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        fail(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    if A.dtype != torch.float32:
        fail(f"A must be float32, got {A.dtype}")
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            fail(f"{name} of shape (dim, N) (input-independent) is not supported; pass (batch, N, L) or "
                 f"(batch, G, N, L)")
        if M.dim() not in (3, 4):
            fail(f"{name} must be (batch, N, L) or (batch, G, N, L), got shape {tuple(M.shape)}")
        groups = 1 if M.dim() == 3 else M.shape[1]
        expect = (batch, dstate, length) if M.dim() == 3 else (batch, groups, dstate, length)
        if tuple(M.shape) != expect:
            fail(f"{name} must be {expect} for u {tuple(u.shape)} and A {tuple(A.shape)}, got {tuple(M.shape)}")
        if dim % groups:
            fail(f"{name} has {groups} groups, which does not divide dim={dim}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            if not isinstance(v, torch.Tensor) or v.shape != (dim,):
                fail(f"{name} must be a ({dim},) tensor, got {getattr(v, 'shape', type(v).__name__)}")
            if v.dtype != torch.float32:
                fail(f"{name} must be float32, got {v.dtype}")
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype not in _FLOAT_INPUTS:
            fail(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if t.device != u.device:
            fail(f"{name} is on {t.device} but u is on {u.device}: all inputs must be on one device")
    for name in ("delta", "z"):
        t = tensors[name]
        if t is not None and t.dtype != u.dtype:
            fail(f"{name} has dtype {t.dtype} but u has {u.dtype}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend=None):
    """Selective scan with the semantics of ``mamba_ssm.selective_scan_fn``.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t . h_t + D u_t,  y *= silu(z),
    with delta = softplus(delta + delta_bias) when ``delta_softplus``.

    Shapes: u, delta, z (batch, dim, L); A (dim, N) float32; B, C (batch, N, L) or grouped
    (batch, G, N, L), group g serving channels g*dim/G ... (g+1)*dim/G - 1; D, delta_bias (dim,)
    float32. Returns y (batch, dim, L) in u's dtype, and the float32 last state (batch, dim, N) when
    ``return_last_state``. State and accumulation are float32 whatever the input dtype.

    backend: None picks Triton for CUDA tensors (when Triton and a C compiler are there) and PyTorch
    otherwise, unless the environment variable MEDMAMBA_SCAN_BACKEND names one; "triton" forces the
    Triton kernels (on CPU tensors only under TRITON_INTERPRET=1); "torch" forces the PyTorch path.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    backend = resolve_backend(u.device, backend)
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    if backend == "triton":
        ok, why = triton_available(u.device)
        if not ok:
            raise RuntimeError(f"selective_scan: backend='triton' is unavailable here: {why}")
        from .scan_triton import selective_scan_triton
        y, last = selective_scan_triton(u, delta, A, B4, C4, D, z, delta_bias, bool(delta_softplus))
    else:
        y, last = selective_scan_torch(u, delta, A, B4, C4, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y
