import pytest
import torch

from medmamba.layers.scan_routes import (CROSS_SCAN_ROUTES, MHS_FAMILIES, ScanRoutes, available_routes,
                                  inverse_permutation, route_coords, route_permutation)

SHAPES = [(5, 7), (1, 6), (4, 1), (8, 8), (3, 5, 7), (1, 4, 6), (4, 1, 3), (2, 3, 1), (4, 4, 4)]


def all_routes(ndim):
    names = available_routes(ndim)
    return names + [n + "_rev" for n in names]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_route_is_a_bijection_with_exact_inverse(shape):
    n = torch.Size(shape).numel()
    for route in all_routes(len(shape)):
        perm = route_permutation(shape, route)
        assert perm.dtype == torch.int64 and perm.shape == (n,), route
        assert torch.equal(perm.sort().values, torch.arange(n)), route
        inv = inverse_permutation(perm)
        assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n)), route


@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_flag_and_suffix(shape):
    for route in available_routes(len(shape)):
        fwd = route_permutation(shape, route)
        assert torch.equal(route_permutation(shape, route, reverse=True), fwd.flip(0))
        assert torch.equal(route_permutation(shape, route + "_rev"), fwd.flip(0))
        assert torch.equal(route_permutation(shape, route + "_rev", reverse=True), fwd)


@pytest.mark.parametrize("shape", SHAPES)
def test_snake_routes_step_between_face_neighbours(shape):
    for route in ("snake_rows", "snake_cols", "snake_rows_rev", "snake_cols_rev"):
        c = route_coords(shape, route)
        steps = (c[1:] - c[:-1]).abs().sum(1)
        assert torch.all(steps == 1), (route, shape)


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (1, 4, 6), (4, 4, 4)])
def test_spiral_is_continuous(shape):
    for route in ("spiral", "spiral_mirror"):
        c = route_coords(shape, route)
        assert torch.all((c[1:] - c[:-1]).abs().sum(1) == 1), (route, shape)


def test_cross_scan_routes_2d_are_transposes_and_flips():
    h, w = 5, 7
    grid = torch.arange(h * w).view(h, w)
    expect = [grid.flatten(), grid.t().flatten(), grid.flatten().flip(0), grid.t().flatten().flip(0)]
    assert len(CROSS_SCAN_ROUTES[2]) == 4
    for route, e in zip(CROSS_SCAN_ROUTES[2], expect):
        assert torch.equal(route_permutation((h, w), route), e), route


def test_cross_scan_routes_3d_are_axis_fastest():
    d, h, w = 3, 4, 5
    g = torch.arange(d * h * w).view(d, h, w)
    expect = [g.flatten(), g.permute(0, 2, 1).flatten(), g.permute(1, 2, 0).flatten()]
    expect += [e.flip(0) for e in expect]
    assert len(CROSS_SCAN_ROUTES[3]) == 6
    for route, e in zip(CROSS_SCAN_ROUTES[3], expect):
        assert torch.equal(route_permutation((d, h, w), route), e), route
    assert torch.equal(route_permutation((d, h, w), "axis2"), g.flatten())


def test_mhs_routes_2d_exact():
    h, w = 3, 4
    g = torch.arange(h * w).view(h, w)
    snake_rows = torch.cat([g[i] if i % 2 == 0 else g[i].flip(0) for i in range(h)])
    snake_cols = torch.cat([g[:, j] if j % 2 == 0 else g[:, j].flip(0) for j in range(w)])
    assert torch.equal(route_permutation((h, w), "snake_rows"), snake_rows)
    assert torch.equal(route_permutation((h, w), "snake_cols"), snake_cols)
    assert torch.equal(route_permutation((h, w), "raster_rows"), g.flatten())
    assert torch.equal(route_permutation((h, w), "raster_cols"), g.t().flatten())
    # JPEG-style anti-diagonal zigzag and its mirror (the grid flipped left-right).
    assert route_permutation((h, w), "diag").tolist() == [0, 1, 4, 8, 5, 2, 3, 6, 9, 10, 7, 11]
    mirror = g.flip(1).flatten()[route_permutation((h, w), "diag")]
    assert torch.equal(route_permutation((h, w), "diag_mirror"), mirror)
    # Clockwise spiral, outside in, starting top-left.
    assert route_permutation((h, w), "spiral").tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]
    # Its mirror flips the ROWS, as MHS-VM's routegen.py (sscan_1: i -> h - 1 - i): starts bottom-left.
    assert route_permutation((h, w), "spiral_mirror").tolist() == [8, 9, 10, 11, 7, 3, 2, 1, 0, 4, 5, 6]
    assert set(MHS_FAMILIES) == {"snake", "diagonal", "spiral", "raster"}
    assert all(len(v) == 2 for v in MHS_FAMILIES.values())


def test_diag_3d_groups_by_plane():
    shape = (3, 4, 5)
    c = route_coords(shape, "diag")
    s = c.sum(1)
    assert torch.all(s[1:] >= s[:-1])


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (1, 4, 6)])
def test_gather_merge_round_trip(shape):
    routes = all_routes(len(shape))
    sr = ScanRoutes(routes)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    xs = sr.gather(x)
    n = torch.Size(shape).numel()
    assert xs.shape == (2, len(routes), 3, n)
    flat = x.flatten(2)
    for r, route in enumerate(routes):
        assert torch.equal(xs[:, r], flat[..., route_permutation(shape, route)])
    merged = sr.merge(xs, shape)
    assert merged.shape == x.shape
    torch.testing.assert_close(merged, x * len(routes))
    # merge of a per-route signal = sum of each route un-permuted
    y = torch.randn(2, len(routes), 3, n, dtype=torch.float64)
    expect = sum(y[:, r][..., inverse_permutation(route_permutation(shape, rt))] for r, rt in enumerate(routes))
    torch.testing.assert_close(sr.merge(y, shape), expect.view(2, 3, *shape))
    merged.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, float(len(routes))))


def test_cache_not_in_state_dict_and_follows_device():
    sr = ScanRoutes(CROSS_SCAN_ROUTES[3])
    sr.gather(torch.randn(1, 2, 2, 3, 4))
    assert len(sr._cache) == 1
    assert sr.state_dict() == {} and list(sr.buffers()) == []
    sr.to(torch.float64)
    assert sr._cache == {}
    perm, inv = sr.permutations((2, 3, 4), "cpu")
    assert perm.shape == inv.shape == (6, 24) and perm.device.type == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown scan route"):
        route_permutation((3, 4), "zigzag")
    with pytest.raises(ValueError, match="axes"):
        route_permutation((3, 4), "axis2")
    with pytest.raises(ValueError):
        route_permutation((3,), "raster")
    with pytest.raises(ValueError):
        route_permutation((3, 0), "raster")
    with pytest.raises(ValueError, match="unknown route"):
        ScanRoutes(["raster", "bogus"])
    sr = ScanRoutes(["raster", "axis0"])
    with pytest.raises(ValueError, match="expected"):
        sr.merge(torch.randn(1, 3, 2, 12), (3, 4))
