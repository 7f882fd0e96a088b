"""Both selective-scan backends against the float64 sequential reference: outputs and every gradient."""
import os

import pytest
import torch

from medmamba.kernels import ScanInputError, selective_scan, selective_scan_ref
from medmamba.kernels import scan_torch

# (rtol, atol) per input dtype, as mamba_ssm's own tests; gradients looser.
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-3, 5e-3)}
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(batch, dim, length, dstate, groups=None, dtype=torch.float32, device="cpu", seed=0,
                has_d=True, has_z=True, has_bias=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale)

    u = rnd(batch, dim, length).to(dtype)
    delta = rnd(batch, dim, length, scale=0.5).to(dtype)
    A = -(torch.rand(dim, dstate, generator=g) * 2 + 0.1)
    shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    B = rnd(*shape).to(dtype)
    C = rnd(*shape).to(dtype)
    D = rnd(dim) if has_d else None
    z = rnd(batch, dim, length).to(dtype) if has_z else None
    bias = rnd(dim, scale=0.5) if has_bias else None
    xs = [u, delta, A, B, C, D, z, bias]
    return [x.to(device).requires_grad_() if x is not None else None for x in xs]


def run_and_grad(fn, xs, softplus, seed=1, **kw):
    y, last = fn(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=softplus, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.device)
    gl = torch.randn(last.shape, generator=g).to(y.device)
    loss = (y.float() * gy).sum() + (last * gl).sum()
    present = [x for x in xs if x is not None]
    grads = torch.autograd.grad(loss, present)
    return y, last, grads


def assert_matches_reference(xs, softplus, dtype, **kw):
    y, last, grads = run_and_grad(selective_scan, xs, softplus, **kw)
    y_ref, last_ref, grads_ref = run_and_grad(selective_scan_ref, xs, softplus)
    rtol, atol = TOL[dtype]
    assert y.dtype == xs[0].dtype and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref.float(), rtol=rtol, atol=atol)
    names = [n for n, x in zip(NAMES, xs) if x is not None]
    for name, g, r in zip(names, grads, grads_ref):
        assert g.dtype == r.dtype, name
        # gradients summed over long sequences grow: compare relative to their scale
        scale = r.float().abs().max().item() + 1.0
        f = 5 if name in ("delta", "delta_bias") else 1
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol * f, atol=atol * f * 10 * scale, msg=name)


TORCH_SHAPES = [  # batch, dim, L, N, groups
    (2, 3, 1, 1, None),
    (2, 5, 37, 16, None),
    (1, 6, 300, 16, 2),
    (2, 4, 2100, 4, None),  # two chunks at the default chunk length
    (1, 3, 1025, 16, 3),
]


@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_torch_backend_matches_reference(shape):
    b, d, L, n, g = shape
    assert_matches_reference(make_inputs(b, d, L, n, g), True, torch.float32, backend="torch")


@pytest.mark.parametrize("has_d,has_z,has_bias,softplus", [(False, False, False, False), (True, False, True, False),
                                                           (False, True, False, True)])
def test_torch_backend_optional_inputs(has_d, has_z, has_bias, softplus):
    xs = make_inputs(2, 4, 50, 8, has_d=has_d, has_z=has_z, has_bias=has_bias)
    assert_matches_reference(xs, softplus, torch.float32, backend="torch")


def test_torch_backend_many_chunks(monkeypatch):
    monkeypatch.setattr(scan_torch, "_BLOCK_ELEMENTS", 16 * 2 * 3 * 4)  # chunk length 16
    assert scan_torch.chunk_length(2, 3, 4, 1000) == 16
    assert_matches_reference(make_inputs(2, 3, 333, 4, seed=3), True, torch.float32, backend="torch")


@pytest.mark.parametrize("steps,slab,block", [(4, 2 * 6 * 4 * 4, 64), (8, 1, 1 << 21), (16, 1 << 16, 1 << 21)])
@pytest.mark.parametrize("shape", [(2, 6, 333, 4, 3), (1, 5, 97, 16, None), (1, 4, 3, 2, None)])
def test_torch_blocked_forward_sub_chunks(monkeypatch, steps, slab, block, shape):
    """The eager forward's blocks of sub-chunks (several blocks, several sub-chunks per block, a padded last
    block, groups, fewer steps than one sub-chunk) against the reference, forward and gradients (the backward
    starts from the forward's saved chunk states, here at chunk length 16 when block is 64)."""
    monkeypatch.setattr(scan_torch, "_FWD_STEPS", steps)
    monkeypatch.setattr(scan_torch, "_FWD_SLAB", slab)
    monkeypatch.setattr(scan_torch, "_BLOCK_ELEMENTS", block)
    b, d, L, n, g = shape
    assert_matches_reference(make_inputs(b, d, L, n, g, seed=5), True, torch.float32, backend="torch")


def test_torch_forward_methods_agree():
    xs = [x.detach() for x in make_inputs(2, 6, 1000, 16, 2, seed=6)]
    ya, ha, sa, _ = scan_torch._scan_forward(*xs, True, method="doubling")
    yb, hb, sb, _ = scan_torch._scan_forward(*xs, True)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,block", [(4, 2 * 6 * 4 * 50), (16, 1 << 26), (3, 1)])
@pytest.mark.parametrize("shape", [(2, 6, 333, 4, 3), (1, 5, 97, 16, None), (1, 4, 3, 2, None)])
def test_torch_traced_forward(monkeypatch, steps, block, shape):
    """The forward recorded under tracing (ONNX export): several levels of sub-chunks, padding, several blocks,
    groups; against the reference."""
    monkeypatch.setattr(scan_torch, "_FWD_STEPS", steps)
    monkeypatch.setattr(scan_torch, "_TRACED_SLAB_ELEMENTS", block)
    b, d, L, n, g = shape
    xs = [x.detach() if x is not None else None for x in make_inputs(b, d, L, n, g, seed=7)]
    if g is None:
        xs[3], xs[4] = xs[3].unsqueeze(1), xs[4].unsqueeze(1)
    y, last, starts, _ = scan_torch._scan_forward(*xs, True, method="traced")
    y_ref, last_ref = selective_scan_ref(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True,
                                         return_last_state=True)
    assert starts is None
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)


def test_torch_backend_long_sequence():
    # longer than one 2048-step chunk, strongly decaying and slowly decaying channels alike
    xs = make_inputs(1, 2, 5000, 16, seed=4)
    assert_matches_reference(xs, True, torch.float32, backend="torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_half_inputs(dtype):
    assert_matches_reference(make_inputs(2, 4, 70, 16, dtype=dtype), True, dtype, backend="torch")


def test_large_decays_stay_finite(device):
    # dt*A of -1e4 per step: any formula dividing by cumulative decays overflows here
    xs = make_inputs(1, 2, 200, 4, has_bias=False, device=device)
    with torch.no_grad():
        xs[1].fill_(50.0)
        xs[2].mul_(100)
    for backend in ("torch", "triton"):
        y, last, grads = run_and_grad(selective_scan, xs, True, backend=backend)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)


# --- Triton kernels (native on CUDA, interpreter on CPU: small shapes) -------------------------------

TRITON_SHAPES = [  # batch, dim, L, N, groups, tile, parts
    (2, 3, 1, 1, None, None, None),
    (2, 5, 37, 16, None, 16, None),
    (1, 6, 70, 4, 2, 16, None),
    (1, 40, 50, 16, None, 16, 3),  # channels split over programs: dB/dC reduced with atomics
    (1, 3, 300, 16, None, 64, None),
]


def _triton(tile=None, parts=None):
    from medmamba.kernels.scan_triton import selective_scan_triton

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=True):
        B4 = B if B.dim() == 4 else B.unsqueeze(1)
        C4 = C if C.dim() == 4 else C.unsqueeze(1)
        return selective_scan_triton(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, tile, parts)
    return fn


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_backend_matches_reference(shape, device):
    b, d, L, n, g, tile, parts = shape
    xs = make_inputs(b, d, L, n, g, device=device)
    y, last, grads = run_and_grad(_triton(tile, parts), xs, True)
    y_ref, last_ref, grads_ref = run_and_grad(selective_scan_ref, xs, True)
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)
    for name, gr, r in zip(NAMES, grads, grads_ref):
        scale = r.abs().max().item() + 1.0
        torch.testing.assert_close(gr, r, rtol=3e-3, atol=2e-3 * scale, msg=name)


def test_triton_public_entry_point(device):
    xs = make_inputs(2, 4, 40, 16, dtype=torch.bfloat16, device=device, has_z=False)
    assert_matches_reference(xs, True, torch.bfloat16, backend="triton")


def test_triton_no_optional_inputs(device):
    xs = make_inputs(1, 3, 33, 2, device=device, has_d=False, has_z=False, has_bias=False)
    y, last, grads = run_and_grad(_triton(16), xs, False)
    y_ref, last_ref, grads_ref = run_and_grad(selective_scan_ref, xs, False)
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    for gr, r in zip(grads, grads_ref):
        torch.testing.assert_close(gr, r, rtol=3e-3, atol=2e-3 * (r.abs().max().item() + 1))


def test_backends_agree_without_last_state(device):
    xs = make_inputs(2, 4, 45, 16, device=device)
    a = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, backend="torch")
    b = selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- input checks ------------------------------------------------------------------------------------

def test_bad_inputs_are_named():
    u, delta, A, B, C, D, z, bias = [x.detach() if x is not None else None for x in make_inputs(2, 4, 10, 3)]
    cases = [
        (dict(u=u[0]), "u must be (batch, dim, L)"),
        (dict(delta=delta[:, :, :5]), "delta must have u's shape"),
        (dict(A=A.double()), "A must be float32"),
        (dict(A=A[:3]), "A must be (dim=4, N)"),
        (dict(B=B[:, :2]), "B must be (2, 3, 10)"),
        (dict(B=torch.randn(4, 3)), "input-independent"),
        (dict(C=C.unsqueeze(1).expand(2, 3, 3, 10)), "does not divide dim=4"),
        (dict(D=D[:2]), "D must be a (4,) tensor"),
        (dict(u=u.long(), delta=delta.long()), "dtype torch.int64"),
        (dict(z=z.half()), "z has dtype torch.float16 but u has torch.float32"),
    ]
    base = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    for change, msg in cases:
        kw = {**base, **change}
        with pytest.raises(ScanInputError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            selective_scan(**kw)
    with pytest.raises(ScanInputError, match="unknown backend"):
        selective_scan(**base, backend="cuda")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xs = [x.detach() if x is not None else None for x in make_inputs(1, 2, 4, 2)]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan(*xs[:5], backend="triton")


def test_backend_from_environment(monkeypatch):
    xs = [x.detach() if x is not None else None for x in make_inputs(1, 2, 5, 2)]
    monkeypatch.setenv("MEDMAMBA_SCAN_BACKEND", "bogus")
    with pytest.raises(ScanInputError, match="unknown backend 'bogus'"):
        selective_scan(*xs[:5])
    monkeypatch.setenv("MEDMAMBA_SCAN_BACKEND", "torch")
    torch.testing.assert_close(selective_scan(*xs[:5]), selective_scan_ref(*xs[:5]), rtol=1e-5, atol=1e-5)


def test_deterministic_mode_avoids_atomic_reduction(monkeypatch):
    """torch.use_deterministic_algorithms(True): the Triton backward asks for one program per B/C group
    (no atomic dB/dC reduction); the forward keeps its launch; gradients are unchanged."""
    from medmamba.kernels import scan_triton

    asked = []
    real = scan_triton._launch_config

    def spy(batch, dim, dstate, length, groups, device, tile=None, parts=None):
        asked.append(parts)
        return real(batch, dim, dstate, length, groups, device, tile, parts)
    monkeypatch.setattr(scan_triton, "_launch_config", spy)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 8, 70, generator=g), torch.rand(1, 8, 70, generator=g), -torch.rand(8, 4, generator=g),
              torch.randn(1, 1, 4, 70, generator=g), torch.randn(1, 1, 4, 70, generator=g)]
    inputs = [t.requires_grad_(True) for t in inputs]

    def grads():
        y = scan_triton.selective_scan_triton(*inputs, None, None, None, False, tile=16)[0]
        return torch.autograd.grad(y.square().sum(), inputs)
    ref = grads()
    assert asked == [None, None]
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert asked[2:] == [None, 1]  # forward, backward
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
