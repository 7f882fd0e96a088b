"""Routed selective scan (no gathered copies) against the gather/scan/scatter composition and the float64
reference, both backends; CrossScan and MultiHeadScan fused vs unfused.

The Triton cases run under Triton's interpreter on CPU, whose generic scans cost per element of a
(channel block, tile, state) array: shapes are small and chosen to reach every path (tile crossings,
R = 2/4/6, N = 1/3/16, shared u blocks, atomic dB/dC, bf16) in a few seconds each.
"""
import pytest
import torch

import medmamba.layers.cross_scan as cross_scan_mod
from medmamba.layers.cross_scan import CrossScan, use_fused_routes
from medmamba.kernels import ScanInputError, routed_selective_scan, selective_scan_ref
from medmamba.kernels.routed_scan import inverse_route_index, routed_selective_scan_composed
from medmamba.layers.multi_head_scan import MultiHeadScan
from medmamba.layers.scan_routes import CROSS_SCAN_ROUTES, ScanRoutes

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["u", "delta", "A", "B", "C", "D", "delta_bias"]


def random_routes(routes, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g) for _ in range(routes)])


def make_inputs(batch, dc, routes, length, dstate, k=1, dtype=torch.float32, has_d=True, has_bias=True, seed=0,
                device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    xs = [rnd(batch, k * dc, length).to(dtype), rnd(batch, routes * dc, length, scale=0.5).to(dtype),
          -(torch.rand(routes * dc, dstate, generator=g) * 2 + 0.1), rnd(batch, routes, dstate, length).to(dtype),
          rnd(batch, routes, dstate, length).to(dtype), rnd(routes * dc) if has_d else None,
          rnd(routes * dc, scale=0.5) if has_bias else None]
    return [x.to(device).requires_grad_() if x is not None else None for x in xs]


def reference64(u, delta, A, B, C, idx, D=None, delta_bias=None, delta_softplus=False):
    """Float64: gather every input along the routes, plain-loop reference scan, scatter back."""
    batch, ud, length = u.shape
    routes = idx.shape[0]
    dc = delta.shape[1] // routes
    k = ud // dc
    idx = idx.long().to(u.device)
    pick = lambda t, i: t.double()[..., idx[i]]  # noqa: E731
    block = lambda i: slice(i // (routes // k) * dc, (i // (routes // k) + 1) * dc)  # noqa: E731  u channels of route i
    us = torch.cat([pick(u[:, block(i)], i) for i in range(routes)], 1)
    ds = torch.cat([pick(delta[:, i * dc:(i + 1) * dc], i) for i in range(routes)], 1)
    Bs = torch.stack([pick(B[:, i], i) for i in range(routes)], 1)
    Cs = torch.stack([pick(C[:, i], i) for i in range(routes)], 1)
    y = selective_scan_ref(us, ds, A.double(), Bs, Cs, D=D.double() if D is not None else None,
                           delta_bias=delta_bias.double() if delta_bias is not None else None,
                           delta_softplus=delta_softplus)
    inv = inverse_route_index(idx)
    y = y.view(batch, routes, dc, length)
    return torch.stack([y[:, i][..., inv[i]] for i in range(routes)], 1)


def run_and_grad(fn, xs, idx, softplus, seed=1, **kw):
    y = fn(*xs[:5], idx, D=xs[5], delta_bias=xs[6], delta_softplus=softplus, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.device)
    present = [x for x in xs if x is not None]
    grads = torch.autograd.grad((y.double() * gy).sum(), present)
    return y, grads


def assert_close_all(got, ref, xs, rtol, atol, grad_rtol, grad_atol):
    y, grads = got
    y_ref, grads_ref = ref
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref.double(), rtol=rtol, atol=atol)
    names = [n for n, x in zip(NAMES, xs) if x is not None]
    for name, x, g, r in zip(names, [x for x in xs if x is not None], grads, grads_ref):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        scale = r.double().abs().max().item() + 1.0
        f = 5 if name in ("delta", "delta_bias") else 1
        torch.testing.assert_close(g.double(), r.double(), rtol=grad_rtol * f, atol=grad_atol * f * scale, msg=name)


def cross_routes(shape):
    return ScanRoutes(CROSS_SCAN_ROUTES[len(shape)]).route_index(shape)


# id: batch, Dc, K, route table, N, tile, parts, D, delta_bias, softplus
CASES = {
    "L1_R2_N1": (2, 3, 1, lambda: random_routes(2, 1, 0), 1, None, None, True, True, True),
    "L7_R4_N1_bare": (1, 3, 1, lambda: random_routes(4, 7, 1), 1, None, None, False, False, False),
    "L61_R2_N16_atomic": (1, 8, 1, lambda: random_routes(2, 61, 2), 16, None, 2, True, True, True),
    "L130_R4_N1_tiles": (1, 5, 1, lambda: random_routes(4, 130, 3), 1, 16, None, True, False, True),
    "3d_345_R6_N2": (1, 4, 1, lambda: cross_routes((3, 4, 5)), 2, 16, None, True, True, True),
    "L20_R4_K2_N3": (1, 3, 2, lambda: random_routes(4, 20, 4), 3, 16, None, True, True, False),
}


def _triton_fn(tile, parts):
    from medmamba.kernels.scan_triton import routed_selective_scan_triton

    def fn(u, delta, A, B, C, idx, D=None, delta_bias=None, delta_softplus=False):
        return routed_selective_scan_triton(u, delta, A, B, C, D, delta_bias, idx.to(u.device, torch.int32),
                                            delta_softplus, tile, parts)
    return fn


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_composition_and_reference(case, device):
    b, dc, k, routes, n, tile, parts, has_d, has_bias, softplus = CASES[case]
    idx = routes().to(device)
    xs = make_inputs(b, dc, idx.shape[0], idx.shape[1], n, k=k, has_d=has_d, has_bias=has_bias, device=device)
    got = run_and_grad(_triton_fn(tile, parts), xs, idx, softplus)
    ref = run_and_grad(reference64, xs, idx, softplus)
    assert_close_all(got, ref, xs, 6e-4, 2e-3, 3e-3, 2e-3)
    composed = run_and_grad(routed_selective_scan_composed, xs, idx, softplus)
    assert_close_all(got, composed, xs, 1e-4, 1e-4, 1e-4, 1e-4)


def test_triton_public_entry_point_bf16(device):
    idx = random_routes(2, 40, 5).to(device)
    xs = make_inputs(1, 3, 2, 40, 4, dtype=torch.bfloat16, device=device)
    got = run_and_grad(routed_selective_scan, xs, idx, True, backend="triton")
    ref = run_and_grad(reference64, xs, idx, True)
    assert_close_all(got, ref, xs, 3e-2, 5e-2, 3e-2, 5e-2)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_reference(case):
    b, dc, k, routes, n, _, _, has_d, has_bias, softplus = CASES[case]
    idx = routes()
    xs = make_inputs(b, dc, idx.shape[0], idx.shape[1], n, k=k, has_d=has_d, has_bias=has_bias)
    got = run_and_grad(routed_selective_scan, xs, idx, softplus, backend="torch")
    assert_close_all(got, run_and_grad(reference64, xs, idx, softplus), xs, 6e-4, 2e-3, 3e-3, 2e-3)


def test_torch_backend_bf16_and_default_backend():
    idx = cross_routes((2, 3, 4))
    xs = make_inputs(2, 3, 6, 24, 16, dtype=torch.bfloat16)
    got = run_and_grad(routed_selective_scan, xs, idx, True)  # CPU tensors: the PyTorch path
    assert_close_all(got, run_and_grad(reference64, xs, idx, True), xs, 3e-2, 5e-2, 3e-2, 5e-2)


def test_semantics_spelled_out():
    """y[b, r, c, route_index[r, t]] is step t of route r's scan of the gathered inputs."""
    shape = (2, 3, 4)
    routes = ScanRoutes(CROSS_SCAN_ROUTES[3])
    idx = routes.route_index(shape)
    u, delta, A, B, C, D, bias = [x.detach() for x in make_inputs(1, 2, 6, 24, 3)]
    y = routed_selective_scan(u, delta, A, B, C, idx, D=D, delta_bias=bias, delta_softplus=True)
    for r in range(6):
        p = idx[r].long()
        sl = slice(2 * r, 2 * r + 2)
        y_r = selective_scan_ref(u[..., p], delta[:, sl][..., p], A[sl], B[:, r][..., p], C[:, r][..., p], D=D[sl],
                                 delta_bias=bias[sl], delta_softplus=True)
        torch.testing.assert_close(y[:, r][..., p], y_r, rtol=1e-5, atol=1e-5)
    # merging is a sum: equal to ScanRoutes.merge of the routed outputs
    xs = routes.gather(u.view(1, 2, *shape))
    assert torch.equal(xs[:, 2].reshape(1, 2, -1), u[..., idx[2].long()])
    routed = torch.stack([y[:, r][..., idx[r].long()] for r in range(6)], 1)
    torch.testing.assert_close(y.sum(1).view(1, 2, *shape), routes.merge(routed, shape))


def test_input_checks():
    u, delta, A, B, C, D, bias = [x.detach() for x in make_inputs(1, 2, 3, 10, 4)]
    idx = random_routes(3, 10, 0)
    base = dict(u=u, delta=delta, A=A, B=B, C=C, route_index=idx, D=D, delta_bias=bias)
    bad_perm = idx.clone()
    bad_perm[1, 0] = bad_perm[1, 1]
    cases = [
        (dict(route_index=bad_perm), "permutation of 0..L-1"),
        (dict(route_index=idx.float()), "int32/int64"),
        (dict(route_index=idx[:, :5]), "route_index"),
        (dict(delta=delta[:, :5]), "delta must be"),
        (dict(u=u[:, :1]), "u has 1 channels"),
        (dict(B=B[:, 0]), "B must be"),
        (dict(C=C[:, :2]), "C must be"),
        (dict(A=A.double()), "A must be float32"),
        (dict(D=D[:2]), "D must be a"),
        (dict(delta=delta.half()), "delta has dtype"),
    ]
    for change, msg in cases:
        with pytest.raises(ScanInputError, match=msg):
            routed_selective_scan(**{**base, **change})
    with pytest.raises(ScanInputError, match="unknown backend"):
        routed_selective_scan(**base, backend="cuda")


def test_scan_routes_index_table():
    sr = ScanRoutes(CROSS_SCAN_ROUTES[3])
    idx = sr.route_index((2, 3, 4), "cpu")
    assert idx.dtype == torch.int32 and idx.shape == (6, 24) and idx.is_contiguous()
    assert torch.equal(idx.long(), sr.permutations((2, 3, 4), "cpu")[0])
    assert sr.route_index([2, 3, 4]) is idx
    sr.float()  # moving the module drops the cached tables
    assert sr.route_index((2, 3, 4)) is not idx


# --- layers: fused vs unfused ---------------------------------------------------------------------------

def _grads(m, x):
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in m.parameters()]
    return y, torch.autograd.grad((y * g).sum(), [x, *params])


def _pair(factory, **kw):
    torch.manual_seed(0)
    a = factory(fused_routes=False, **kw)
    b = factory(fused_routes=True, **kw)
    b.load_state_dict(a.state_dict(), strict=True)
    return a, b


def _assert_same(a, b, x, rtol=1e-5, atol=1e-5):
    ya, ga = _grads(a, x)
    yb, gb = _grads(b, x)
    torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
    names = ["x"] + [n for n, _ in a.named_parameters()]
    for name, p, q in zip(names, gb, ga):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol * (q.abs().max().item() + 1), msg=name)


def test_cross_scan_fused_equals_unfused_triton(device, monkeypatch):
    import medmamba.kernels.scan_triton as st

    a, b = _pair(lambda **kw: CrossScan(6, spatial_dims=3, d_state=2, scan_backend="triton", **kw).to(device))

    def no_gather(*args, **kw):
        raise AssertionError("the fused path must not gather routed copies")

    x = torch.randn(1, 2, 3, 4, 6, device=device, requires_grad=True)
    ya, ga = _grads(a, x)
    monkeypatch.setattr(ScanRoutes, "gather", no_gather)
    monkeypatch.setattr(ScanRoutes, "merge", no_gather)
    shared = []
    backward = st._scan_backward
    monkeypatch.setattr(st, "_scan_backward", lambda *a, **kw: shared.append(kw["dout_shared"]) or backward(*a, **kw))
    yb, gb = _grads(b, x)
    assert shared == [True]  # the merge's gradient is read once, not copied per route
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    for p, q in zip(gb, ga):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * (q.abs().max().item() + 1))


@pytest.mark.parametrize("spatial_dims,shape,kwargs", [
    (2, (2, 5, 7), {}),
    (3, (1, 3, 4, 5), {}),
    (2, (1, 4, 6), {"gated": False, "expand": 1, "d_state": 1, "conv_bias": False}),
    (3, (1, 2, 3, 5), {"routes": ["snake_rows", "diag_mirror", "spiral_rev"]}),
])
def test_cross_scan_fused_equals_unfused_torch(spatial_dims, shape, kwargs):
    a, b = _pair(lambda **kw: CrossScan(8, spatial_dims=spatial_dims, scan_backend="torch", **kw), **kwargs)
    _assert_same(a, b, torch.randn(*shape, 8, requires_grad=True))


def test_cross_scan_fused_under_bf16_autocast():
    a, b = _pair(lambda **kw: CrossScan(8, spatial_dims=3, d_state=4, **kw))
    x = torch.randn(1, 2, 3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)


def test_fused_routes_automatic(monkeypatch):
    monkeypatch.delenv("MEDMAMBA_SCAN_BACKEND", raising=False)
    assert use_fused_routes(None, torch.device("cpu"), None) is False
    assert use_fused_routes(None, torch.device("cpu"), "triton") is True
    assert use_fused_routes(False, torch.device("cpu"), "triton") is False
    assert use_fused_routes(True, torch.device("cpu"), "torch") is True
    monkeypatch.setenv("MEDMAMBA_SCAN_BACKEND", "triton")
    assert use_fused_routes(None, torch.device("cpu"), None) is True
    monkeypatch.delenv("MEDMAMBA_SCAN_BACKEND")
    calls = []

    def spy(*args, backend=None, **kw):
        calls.append(backend)
        return routed_selective_scan(*args, backend="torch", **kw)

    monkeypatch.setattr(cross_scan_mod, "routed_selective_scan", spy)
    m = CrossScan(4, spatial_dims=2, scan_backend="triton")  # fused_routes=None: fused, as Triton would run
    assert m.fused_routes is None
    m(torch.randn(1, 3, 3, 4))
    assert calls == ["triton"]
    CrossScan(4, spatial_dims=2)(torch.randn(1, 3, 3, 4))  # CPU default backend: unfused
    assert calls == ["triton"]


def test_multi_head_scan_fused_equals_unfused(device):
    a, b = _pair(lambda **kw: MultiHeadScan(8, spatial_dims=2, num_heads=2, d_state=2, scan_backend="triton",
                                            **kw).to(device))
    x = torch.randn(1, 3, 4, 8, device=device, requires_grad=True)
    # the route outputs (before Scan Route Attention) and their gradients
    xh = torch.randn(1, 8, 3, 4, device=device, requires_grad=True)
    outs = []
    for m in (a, b):
        ys = m.scan_heads(xh)
        g = torch.randn(ys.shape, generator=torch.Generator().manual_seed(4)).to(device)
        outs.append((ys, torch.autograd.grad((ys * g).sum(), [xh, *m.parameters()], allow_unused=True)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for p, q in zip(outs[1][1], outs[0][1]):
        assert (p is None) == (q is None)
        if p is not None:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * (q.abs().max().item() + 1))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims,shape,heads", [(2, (2, 5, 7), 4), (3, (1, 2, 3, 4), 3)])
def test_multi_head_scan_fused_equals_unfused_torch(spatial_dims, shape, heads):
    a, b = _pair(lambda **kw: MultiHeadScan(12, spatial_dims=spatial_dims, num_heads=heads, d_state=3,
                                            scan_backend="torch", **kw))
    # gradients through Scan Route Attention (cv = std / mean spread) amplify fp32 rounding: looser
    _assert_same(a, b, torch.randn(*shape, 12, requires_grad=True), rtol=1e-3, atol=1e-3)


def test_triton_gradient_of_route_sum_read_in_place(device, monkeypatch):
    """d(y.sum(1)) reaches the kernels as one tensor expanded over the routes and is read in place."""
    import medmamba.kernels.scan_triton as st

    seen = []
    backward = st._scan_backward

    def spy(*args, **kw):
        seen.append((kw.get("dout_shared"), tuple(args[9].shape)))
        return backward(*args, **kw)

    monkeypatch.setattr(st, "_scan_backward", spy)
    idx = cross_routes((2, 3, 4))
    xs = make_inputs(1, 3, 6, 24, 2, device=device)
    g = torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(6)).to(device)
    outs = []
    for fn in (_triton_fn(16, None), routed_selective_scan_composed):
        y = fn(*xs[:5], idx.to(device), D=xs[5], delta_bias=xs[6], delta_softplus=True)
        outs.append((y, torch.autograd.grad((y.sum(1) * g).sum(), xs)))
    assert seen == [(True, (1, 3, 24))]
    assert_close_all(outs[0], outs[1], xs, 1e-4, 1e-4, 1e-4, 1e-4)
