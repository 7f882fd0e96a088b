"""The Triton kernels under the compiled code's reduction order, and the launch grid at CUDA's limits.

The interpreter (how the kernel tests run on CPU) folds ``tl.reduce`` in sequence order; compiled code
folds per thread, strided, then across lanes in butterfly order (``compiled_order``). Every Triton kernel
test shape is re-run here in that order against the float64 reference, so an order-sensitive reduction
fails on the CPU before a GPU ever runs it.
"""
import pytest
import torch
import triton
import triton.language as tl

import test_kernels as tk
import test_routed_scan as tr
from compiled_order import compiled_order
from medmamba.kernels import scan_triton as st
from medmamba.kernels import selective_scan_ref

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpu_order(device):
    if device.type == "cuda":
        yield  # natively compiled: the real order already
        return
    with compiled_order():
        yield


@triton.jit
def _affine(a1, b1, a2, b2):  # h -> a2 (a1 h + b1) + b2: associative, not commutative
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _reduce_and_scan_kernel(a_ptr, b_ptr, out_ptr, T: tl.constexpr):
    t = tl.arange(0, T)
    a = tl.load(a_ptr + t)
    b = tl.load(b_ptr + t)
    _, h_red = tl.reduce((a, b), axis=0, combine_fn=_affine)
    _, h_scan = tl.associative_scan((a, b), axis=0, combine_fn=_affine)
    tl.store(out_ptr, h_red)
    tl.store(out_ptr + 1, tl.sum(tl.where(t == T - 1, h_scan, 0.0), axis=0))


def test_compiled_order_breaks_a_non_commutative_reduce_but_not_a_scan():
    """The fixture itself: the same non-commutative reduce is right in sequence order and wrong in compiled
    order, while the last step of an associative scan is right in both."""
    if torch.cuda.is_available():
        pytest.skip("checks the interpreter patch; on a GPU the kernel tests run compiled")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, generator=g) * 0.5 + 0.5, torch.randn(64, generator=g)
    h = torch.zeros((), dtype=torch.float64)
    for ai, bi in zip(a.double(), b.double()):
        h = ai * h + bi
    for patched, reduce_ok in ((False, True), (True, False)):
        out = torch.empty(2)
        if patched:
            with compiled_order():
                _reduce_and_scan_kernel[(1,)](a, b, out, T=64)
        else:
            _reduce_and_scan_kernel[(1,)](a, b, out, T=64)
        assert abs(out[1].item() - h.item()) < 1e-4 * (1 + abs(h.item()))
        assert (abs(out[0].item() - h.item()) < 1e-4 * (1 + abs(h.item()))) == reduce_ok


@pytest.mark.parametrize("shape", tk.TRITON_SHAPES + [(1, 2, 4100, 2, None, 16, None)])  # + > 256 tiles
def test_triton_matches_reference_in_compiled_order(shape, device, gpu_order):
    tk.test_triton_backend_matches_reference(shape, device)


def test_triton_optional_inputs_and_bf16_in_compiled_order(device, gpu_order):
    tk.test_triton_no_optional_inputs(device)
    tk.test_triton_public_entry_point(device)


@pytest.mark.parametrize("case", list(tr.CASES))
def test_routed_matches_reference_in_compiled_order(case, device, gpu_order):
    tr.test_triton_matches_composition_and_reference(case, device)


def test_last_state_gradient_in_compiled_order(device, gpu_order):
    """Only the last state carries a gradient: the backward's carry starts from d(last) alone."""
    xs = tk.make_inputs(1, 3, 150, 4, device=device, seed=7)
    y, last = tk._triton(16)(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True)
    y_r, last_r = selective_scan_ref(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True,
                                     return_last_state=True)
    got = torch.autograd.grad(last.sum(), [x for x in xs])
    ref = torch.autograd.grad(last_r.sum(), [x for x in xs], allow_unused=True)  # C, D and z do not reach it
    torch.testing.assert_close(last, last_r.float(), rtol=6e-4, atol=2e-3)
    for name, gr, r in zip(tk.NAMES, got, ref):
        r = torch.zeros_like(gr) if r is None else r
        torch.testing.assert_close(gr, r.to(gr.dtype), rtol=3e-3, atol=2e-3 * (r.abs().max().item() + 1), msg=name)


# --- the launch grid at CUDA's limits (planned on meta tensors: nothing runs) --------------------------

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def _scan_meta(batch, dim, length, dstate, groups=1, routed=False, dtype=torch.bfloat16):
    m = dict(device="meta")
    u = torch.empty(batch, dim, length, dtype=dtype, **m)
    A = torch.empty(dim, dstate, **m)
    B = torch.empty(batch, groups, dstate, length, dtype=dtype, **m)
    D = torch.empty(dim, **m)
    index = torch.empty(groups, length, dtype=torch.int32, **m) if routed else None
    z = None if routed else u
    ud = dim // groups if routed else dim
    uu = torch.empty(batch, ud, length, dtype=dtype, **m) if routed else u
    y, sumH = st._scan_forward(uu, u, A, B, B, D, z, D, True, None, None, index, groups if routed else 1)
    st._scan_backward(uu, u, A, B, B, D, z, D, sumH, y if not routed else u.float(), None, True, None, None, index,
                      groups if routed else 1)


@pytest.mark.parametrize("length", [4_194_241, 256 ** 3, 2 ** 31 - 64])
@pytest.mark.parametrize("routed", [False, True])
def test_launch_grid_respects_cuda_limits(length, routed):
    """Every launch of a scan longer than 65,535 tiles (a 256^3 volume as one sequence) fits CUDA's grid."""
    with st.launch_recorder(sm_count=132) as rec:
        _scan_meta(2, 8 if routed else 4, length, 16, groups=4 if routed else 1, routed=routed)
    assert {k.fn.__name__ for k, *_ in rec.launches} == {"_fwd_kernel", "_carry_kernel", "_bwd_summary_kernel",
                                                        "_bwd_kernel"}
    for kernel, grid, args, kw in rec.launches:
        assert len(grid) <= 3 and all(0 < g <= lim for g, lim in zip(grid, CUDA_GRID_LIMITS)), (kernel, grid)
        if kernel is not st._carry_kernel:  # every tile of every (part, batch) gets exactly one program
            n_tiles = triton.cdiv(length, kw["T"])
            assert grid[0] % n_tiles == 0


def test_grid_over_the_limit_is_refused():
    cfg = st._launch_config(1, 64, 16, 2 ** 31 - 64, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="grid limit"):
        st._grid(cfg, 1, 65)
