import math

import pytest
import torch
import torch.nn.functional as F

import medmamba.layers.cross_scan as cross_scan_mod
from medmamba.kernels import selective_scan
from medmamba.layers.multi_head_scan import MHSMixer, MultiHeadScan, scan_route_attention
from medmamba.layers.scan_routes import MHS_FAMILIES, inverse_permutation, route_permutation


pytestmark = pytest.mark.usefixtures("one_thread")


def slow_forward(m: MultiHeadScan, x: torch.Tensor) -> torch.Tensor:
    """MultiHeadScan with one ungrouped selective_scan call per (head, route) and SRA written out."""
    spatial = tuple(x.shape[1:-1])
    b = x.shape[0]
    h, d, n, k = m.num_heads, m.d_head, m.d_state, m.dt_rank
    xh = m.in_proj(x).movedim(-1, 1).reshape(b, h, d, -1)  # (B, h, d, L)
    heads = []
    for head in range(h):
        a, bb = MHS_FAMILIES[m.families[head]]
        ys = []
        for i, (route, rev) in enumerate([(a, False), (a, True), (bb, False), (bb, True)]):
            s = head * 4 + i
            perm = route_permutation(spatial, route, reverse=rev)
            u = xh[:, head][..., perm]
            x_dbl = torch.einsum("bdl,cd->bcl", u, m.x_proj_weight[s])
            dt, B, C = torch.split(x_dbl, [k, n, n], dim=1)
            dt = torch.einsum("bkl,dk->bdl", dt, m.dt_projs_weight[s])
            rows = slice(s * d, (s + 1) * d)
            y = selective_scan(u, dt, -torch.exp(m.A_logs[rows]), B.contiguous(), C.contiguous(), D=m.Ds[rows],
                               delta_bias=m.dt_projs_bias[s], delta_softplus=True)
            ys.append(y[..., inverse_permutation(perm)])
        ys = torch.stack(ys)  # (4, B, d, L)
        std = ys.std(0, unbiased=True)
        cv = std / ((ys - ys.min(0).values).mean(0) + 1e-5)
        heads.append(ys.sum(0) * torch.relu(cv - m.threshold))
    z = torch.cat(heads, 1).transpose(1, 2)  # (B, L, h*d)
    return m.out_proj(m.out_norm(z)).view(b, *spatial, m.d_model)


@pytest.mark.parametrize("spatial_dims,shape,heads", [
    (2, (2, 5, 7), 4), (2, (1, 6, 4), 3), (3, (2, 3, 4, 5), 4), (3, (1, 2, 5, 3), 2), (3, (1, 1, 1, 4), 1)])
def test_shapes(spatial_dims, shape, heads):
    torch.manual_seed(0)
    m = MultiHeadScan(12, spatial_dims, num_heads=heads, d_state=4)
    assert m.d_head == 12 // heads and len(m.routes) == heads
    assert m.x_proj_weight.shape == (4 * heads, m.dt_rank + 8, m.d_head)
    assert m.A_logs.shape == (4 * heads * m.d_head, 4) and m.Ds.shape == (4 * heads * m.d_head,)
    assert m.in_proj.bias is None and m.out_proj.bias is None
    x = torch.randn(*shape, 12)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    mixer = MHSMixer(12, spatial_dims, num_heads=heads, d_state=4)
    assert mixer(x).shape == x.shape


def test_default_families_and_route_order():
    m = MultiHeadScan(16, 2)
    assert m.families == ["snake", "diagonal", "spiral", "raster"]
    assert m.routes[0] == ["snake_rows", "snake_rows_rev", "snake_cols", "snake_cols_rev"]
    assert m.routes[3] == ["raster_rows", "raster_rows_rev", "raster_cols", "raster_cols_rev"]
    assert MultiHeadScan(16, 3, num_heads=2).families == ["snake", "diagonal"]
    assert MultiHeadScan(16, 3, num_heads=2, families=["spiral", "spiral"]).families == ["spiral", "spiral"]


@pytest.mark.parametrize("spatial_dims,shape,kwargs", [
    (2, (2, 5, 7), {}),
    (2, (1, 4, 6), {"num_heads": 3, "threshold": 0.0, "d_state": 3}),
    (3, (1, 3, 4, 5), {"d_state": 4}),
    (3, (2, 2, 3, 4), {"num_heads": 2, "families": ["raster", "spiral"]}),
])
def test_one_batched_call_equals_per_route_reference(spatial_dims, shape, kwargs):
    torch.manual_seed(1)
    m = MultiHeadScan(16, spatial_dims, **kwargs)
    x = torch.randn(*shape, 16)
    torch.testing.assert_close(m(x), slow_forward(m, x), rtol=1e-4, atol=1e-5)


def test_single_scan_call_with_one_group_per_head_and_route(monkeypatch):
    calls = []

    def spy(u, delta, A, B, C, *args, **kwargs):
        calls.append((u.shape, B.shape, C.shape))
        return selective_scan(u, delta, A, B, C, *args, **kwargs)

    monkeypatch.setattr(cross_scan_mod, "selective_scan", spy)
    m = MultiHeadScan(16, 3, num_heads=4, d_state=5)
    m(torch.randn(2, 2, 3, 4, 16))
    assert len(calls) == 1
    (u_shape, b_shape, c_shape), = calls
    assert u_shape == (2, 16 * 4, 24)  # 4 heads x 4 routes x d_head 4 channels
    assert b_shape == c_shape == (2, 16, 5, 24)  # one B/C group per (head, route)


def test_gradients_flow():
    torch.manual_seed(2)
    m = MHSMixer(8, 3, num_heads=4, d_state=4)
    x = torch.randn(2, 3, 4, 3, 8, requires_grad=True)
    m(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_scan_route_attention_hand_example():
    ys = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1)
    # sum 12; unbiased std of (1, 2, 3, 6) = sqrt(14 / 3); y - min = (0, 1, 2, 5), mean 2
    cv = math.sqrt(14 / 3) / (2 + 1e-5)
    expected = 12 * (cv - 0.5)
    assert abs(expected - 6.96148) < 1e-4
    out = scan_route_attention(ys, threshold=0.5, dim=1)
    assert out.shape == (1, 1)
    torch.testing.assert_close(out, torch.tensor([[expected]]))
    torch.testing.assert_close(scan_route_attention(ys, 0.0, dim=1), torch.tensor([[12 * cv]]))
    # all routes equal: cv = 0, gate closed; one outlier: cv = 2 (scale-free); threshold above cv closes it
    assert scan_route_attention(torch.full((4, 3), 2.5), 0.0, dim=0).abs().max() == 0
    torch.testing.assert_close(scan_route_attention(torch.tensor([0.0, 0.0, 0.0, 8.0]), 0.5, dim=0),
                               torch.tensor(8 * (4 / (2 + 1e-5) - 0.5)))  # std 4, shifted mean 2
    assert scan_route_attention(torch.tensor([0.0, 0.0, 0.0, 8.0]), 2.5, dim=0) == 0
    # element-wise over the other axes
    many = torch.randn(3, 4, 5, 6)
    got = scan_route_attention(many, 0.5, dim=1)
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(got[i, j], scan_route_attention(many[i, :, j], 0.5, dim=0))


def test_mixer_composition():
    torch.manual_seed(3)
    m = MHSMixer(8, 2, num_heads=2, d_state=4)
    x = torch.randn(2, 4, 6, 8)
    xi, z = m.in_proj(x).chunk(2, -1)
    xi = F.silu(m.conv(xi.movedim(-1, 1))).movedim(1, -1)
    expected = m.out_norm(m.mhs(xi)) * F.silu(z)
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-4)
    assert m.in_proj.bias is None and m.conv.bias is not None and m.conv.groups == 8
    assert m.conv.kernel_size == (3, 3)
    assert MHSMixer(8, 3).conv.kernel_size == (3, 3, 3)


def test_autocast_bf16_runs():
    torch.manual_seed(4)
    m = MHSMixer(8, 2, num_heads=4, d_state=4)
    x = torch.randn(1, 4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


def test_index_tables_cached_and_dropped_on_move():
    m = MultiHeadScan(8, 2, num_heads=2, d_state=2)
    m(torch.randn(1, 3, 5, 8))
    m(torch.randn(1, 3, 5, 8))
    assert len(m._tables) == 1
    gather_idx, merge_idx = next(iter(m._tables.values()))
    assert gather_idx.shape == merge_idx.shape == (2 * 4 * 15,)
    m.float()
    assert m._tables == {} and not any("table" in k for k in m.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="families"):
        MultiHeadScan(16, 2, num_heads=5)
    with pytest.raises(ValueError, match="unknown route family"):
        MultiHeadScan(16, 2, num_heads=2, families=["snake", "zigzag"])
    with pytest.raises(ValueError, match="one family per head"):
        MultiHeadScan(16, 2, num_heads=2, families=["snake"])
    with pytest.raises(ValueError, match="spatial_dims"):
        MultiHeadScan(16, 1)
    with pytest.raises(ValueError, match="smaller than num_heads"):
        MultiHeadScan(3, 2, num_heads=4)
    m = MultiHeadScan(8, 3)
    with pytest.raises(ValueError, match="channels-last"):
        m(torch.randn(1, 8, 2, 3, 4))
    with pytest.raises(ValueError, match="channels-last"):
        MHSMixer(8, 2)(torch.randn(1, 2, 3, 4, 8))
