import pytest
import torch
import torch.nn.functional as F

import medmamba.layers.cross_scan as cross_scan_mod
from medmamba.layers.cross_scan import CrossScan, init_route_params, multi_route_scan
from medmamba.kernels import selective_scan
from medmamba.layers.scan_routes import CROSS_SCAN_ROUTES, inverse_permutation, route_permutation


def slow_forward(m: CrossScan, x: torch.Tensor) -> torch.Tensor:
    """CrossScan forward with one selective_scan call per route (ungrouped B/C)."""
    spatial = x.shape[1:-1]
    if m.gated:
        xi, z = m.in_proj(x).chunk(2, dim=-1)
    else:
        xi, z = m.in_proj(x), None
    xi = F.silu(m.conv(xi.movedim(-1, 1)))
    flat = xi.flatten(2)
    d, n, k = m.d_inner, m.d_state, m.dt_rank
    out = 0
    for r, route in enumerate(m.routes):
        perm = route_permutation(spatial, route)
        u = flat[..., perm]
        x_dbl = torch.einsum("bdl,cd->bcl", u, m.x_proj_weight[r])
        dt, B, C = torch.split(x_dbl, [k, n, n], dim=1)
        dt = torch.einsum("bkl,dk->bdl", dt, m.dt_projs_weight[r])
        sl = slice(r * d, (r + 1) * d)
        y = selective_scan(u, dt, -torch.exp(m.A_logs[sl]), B.contiguous(), C.contiguous(), D=m.Ds[sl],
                           delta_bias=m.dt_projs_bias[r], delta_softplus=True)
        out = out + y[..., inverse_permutation(perm)]
    y = m.out_norm(out.view(*out.shape[:2], *spatial).movedim(1, -1))
    if z is not None:
        y = y * F.silu(z)
    return m.out_proj(y)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 6, 10)), (3, (2, 3, 4, 6))])
def test_forward_backward(spatial_dims, shape):
    torch.manual_seed(0)
    m = CrossScan(16, spatial_dims=spatial_dims, d_state=4)
    assert len(m.routes) == {2: 4, 3: 6}[spatial_dims] and m.routes == CROSS_SCAN_ROUTES[spatial_dims]
    r = len(m.routes)
    assert m.x_proj_weight.shape == (r, m.dt_rank + 8, 32)
    assert m.dt_projs_weight.shape == (r, 32, m.dt_rank) and m.dt_projs_bias.shape == (r, 32)
    assert m.A_logs.shape == (r * 32, 4) and m.Ds.shape == (r * 32,)
    assert m.A_logs._no_weight_decay and m.Ds._no_weight_decay
    x = torch.randn(*shape, 16, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_init_matches_mamba_conventions():
    p = init_route_params(3, 8, 2, 5, dt_min=0.01, dt_max=0.05)
    dt = F.softplus(p["dt_projs_bias"])
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    torch.testing.assert_close(p["A_logs"], torch.log(torch.arange(1, 6.0)).repeat(24, 1))
    torch.testing.assert_close(p["Ds"], torch.ones(24))
    assert p["dt_projs_weight"].abs().max() <= 2 ** -0.5


@pytest.mark.parametrize("spatial_dims,shape,kwargs", [
    (2, (2, 5, 7), {}),
    (3, (1, 3, 4, 5), {}),
    (2, (1, 4, 6), {"gated": False, "expand": 1, "d_state": 1, "conv_bias": False}),
    (3, (1, 2, 3, 5), {"routes": ["snake_rows", "diag_mirror", "spiral_rev"]}),
])
def test_batched_call_equals_per_route_loop(spatial_dims, shape, kwargs):
    torch.manual_seed(1)
    m = CrossScan(12, spatial_dims=spatial_dims, **kwargs)
    x = torch.randn(*shape, 12)
    torch.testing.assert_close(m(x), slow_forward(m, x), rtol=1e-4, atol=1e-5)


def test_one_scan_call_with_one_group_per_route(monkeypatch):
    calls = []

    def spy(u, delta, A, B, C, **kw):
        calls.append((u.shape, u.dtype, delta.dtype, B.shape, C.shape, A.shape))
        return selective_scan(u, delta, A, B, C, **kw)

    monkeypatch.setattr(cross_scan_mod, "selective_scan", spy)
    m = CrossScan(8, spatial_dims=3, d_state=3)
    m(torch.randn(2, 2, 3, 4, 8))
    assert len(calls) == 1
    u_shape, u_dtype, d_dtype, b_shape, c_shape, a_shape = calls[0]
    assert u_shape == (2, 6 * 16, 24) and b_shape == c_shape == (2, 6, 3, 24) and a_shape == (96, 3)


def test_scan_stays_fp32_under_bf16_autocast(monkeypatch):
    dtypes = []

    def spy(u, delta, A, B, C, **kw):
        dtypes.append({t.dtype for t in (u, delta, A, B, C, kw["D"], kw["delta_bias"])})
        return selective_scan(u, delta, A, B, C, **kw)

    monkeypatch.setattr(cross_scan_mod, "selective_scan", spy)
    torch.manual_seed(2)
    m = CrossScan(16, spatial_dims=3, d_state=4)
    x = torch.randn(1, 3, 4, 5, 16)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert dtypes[-1] == {torch.float32}
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_multi_route_scan_shapes_and_errors():
    p = init_route_params(2, 4, 1, 3)
    xs = torch.randn(1, 2, 4, 10)
    y = multi_route_scan(xs, **p)
    assert y.shape == xs.shape and y.dtype == torch.float32
    with pytest.raises(ValueError, match="x_proj_weight"):
        multi_route_scan(torch.randn(1, 3, 4, 10), **p)


def test_bad_inputs():
    with pytest.raises(ValueError, match="spatial_dims"):
        CrossScan(8, spatial_dims=1)
    with pytest.raises(ValueError, match="d_conv"):
        CrossScan(8, d_conv=4)
    m = CrossScan(8, spatial_dims=2)
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(1, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(1, 8, 4, 5))


def test_state_dict_has_no_route_tables():
    m = CrossScan(8, spatial_dims=3)
    m(torch.randn(1, 2, 2, 2, 8))
    keys = set(m.state_dict())
    assert keys == {"x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds", "in_proj.weight",
                    "conv.weight", "conv.bias", "out_norm.weight", "out_norm.bias", "out_proj.weight"}
    m2 = CrossScan(8, spatial_dims=3)
    m2.load_state_dict(m.state_dict(), strict=True)


def test_fused_routes_environment_switch(monkeypatch):
    from medmamba.layers.cross_scan import use_fused_routes
    monkeypatch.delenv("MEDMAMBA_FUSED_ROUTES", raising=False)
    assert use_fused_routes(None, "cpu", None) is False  # the PyTorch backend on CPU
    assert use_fused_routes(None, "cpu", "triton") is True
    monkeypatch.setenv("MEDMAMBA_FUSED_ROUTES", "0")
    assert use_fused_routes(None, "cpu", "triton") is False
    assert use_fused_routes(True, "cpu", "torch") is True  # the layer's own setting wins
    monkeypatch.setenv("MEDMAMBA_FUSED_ROUTES", "1")
    assert use_fused_routes(None, "cpu", None) is True
