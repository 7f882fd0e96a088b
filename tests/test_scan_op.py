"""The scans as PyTorch operators: opcheck, torch.compile (inductor, fullgraph) == eager for the Mamba block
and every registry network, meta/FakeTensor shape propagation, torch.export."""
import contextlib

import pytest
import torch

import medmamba.nets as nets
from medmamba import Mamba
from medmamba.kernels import ops  # noqa: F401
from compiled_order import compiled_order
from test_distributed import NETS

pytestmark = pytest.mark.usefixtures("one_thread")


def _scan_args(backend, dtype=torch.float32, groups=1, length=40, with_opts=True):
    g = torch.Generator().manual_seed(0)
    b, d, n = 2, 4, 3
    u, delta, z = (torch.randn(b, d, length, generator=g).to(dtype) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.1
    B, C = (torch.randn(b, groups, n, length, generator=g).to(dtype) for _ in range(2))
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    req = lambda t: t.requires_grad_() if t is not None else None  # noqa: E731
    opt = (lambda t: t) if with_opts else (lambda t: None)
    return (req(u), req(delta), req(A), req(B), req(C), req(opt(D)), req(opt(z)), req(opt(bias)), with_opts,
            backend, 16 if backend == "triton" else 0, 0)


@contextlib.contextmanager
def _fast_interpreter(backend):
    """Triton under the interpreter: vectorised (compiled-order) reductions and scans, many times faster."""
    if backend == "triton" and not torch.cuda.is_available():
        with compiled_order():
            yield
    else:
        yield


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_opts", [True, False])
def test_opcheck_selective_scan(backend, with_opts):
    """Schema, fake kernel, autograd registration and dispatch of medmamba::selective_scan_fwd agree."""
    args = _scan_args(backend, with_opts=with_opts, length=20)
    with _fast_interpreter(backend):
        torch.library.opcheck(torch.ops.medmamba.selective_scan_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                          "test_aot_dispatch_dynamic"))


def test_opcheck_routed_scan():
    g = torch.Generator().manual_seed(1)
    b, dc, R, n, L = 1, 3, 2, 2, 20
    index = torch.stack([torch.randperm(L, generator=g) for _ in range(R)]).int()
    args = (torch.randn(b, dc, L, generator=g).requires_grad_(), torch.randn(b, R * dc, L, generator=g).requires_grad_(),
            (-torch.rand(R * dc, n, generator=g) - 0.1).requires_grad_(),
            torch.randn(b, R, n, L, generator=g).requires_grad_(), torch.randn(b, R, n, L, generator=g).requires_grad_(),
            torch.randn(R * dc, generator=g).requires_grad_(), torch.randn(R * dc, generator=g).requires_grad_(),
            index, True, 16, 0)
    with _fast_interpreter("triton"):
        torch.library.opcheck(torch.ops.medmamba.routed_scan_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                          "test_aot_dispatch_dynamic"))


def test_unused_last_state_sends_no_gradient(monkeypatch):
    """Only y used: the backward gets no last-state gradient to add (None, not a tensor of zeros)."""
    seen = []
    real = ops.scan_torch._scan_backward
    monkeypatch.setattr(ops.scan_torch, "_scan_backward", lambda *a: seen.append(a[10]) or real(*a))
    args = _scan_args("torch")
    y, last = ops.selective_scan_op(*args[:10])
    y.sum().backward()
    assert seen == [None]


def _compare_compiled(model, x, backend="inductor"):
    torch.manual_seed(0)
    ref = model(x)
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    ref.float().square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    out.float().square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-3, atol=1e-6 + 1e-4 * want_x.abs().max().item())
    for n, p in model.named_parameters():
        if n in want:
            scale = want[n].abs().max().item()
            torch.testing.assert_close(p.grad, want[n], rtol=1e-3, atol=1e-6 + 1e-4 * scale, msg=n)


def test_mamba_block_inductor_fullgraph_matches_eager():
    torch.manual_seed(0)
    _compare_compiled(Mamba(d_model=16, d_state=4), torch.randn(2, 37, 16, requires_grad=True))


@pytest.mark.parametrize("name", nets.available())
def test_network_compiled_fullgraph_matches_eager(name):
    """Every registry network compiles as one graph (the scans are opaque operators) and computes what eager
    does, outputs and gradients. aot_eager: the same graph capture (fullgraph) and AOT autograd as inductor,
    without its code generation (minutes a network on 2 CPU cores; inductor is tested on the Mamba block)."""
    kwargs, shape = NETS[name]
    torch.manual_seed(0)
    net = nets.create(name, 1, 2, spatial_dims=3, **kwargs)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        net.eval()  # batch statistics of a 1-sample batch: compare the deterministic inference path
    x = torch.randn(1, 1, *shape, requires_grad=True)
    _compare_compiled(net, x, backend="aot_eager")


def test_network_shapes_propagate_on_meta():
    """FakeTensor/meta propagation goes through the scan operators: a whole network runs on meta tensors."""
    kwargs, shape = NETS["swin_umamba"]
    net = nets.create("swin_umamba", 1, 3, spatial_dims=3, **kwargs).to("meta")
    out = net(torch.empty(2, 1, *shape, device="meta"))
    assert out.shape == (2, 3, *shape) and out.device.type == "meta"


def test_network_torch_export():
    kwargs, shape = NETS["umamba_bot"]
    torch.manual_seed(0)
    net = nets.create("umamba_bot", 1, 2, spatial_dims=3, **kwargs).eval()
    x = torch.randn(1, 1, *shape)
    ep = torch.export.export(net, (x,))
    # (the Mamba layer runs in an autocast region: a higher-order op with its own subgraph)
    targets = {str(n.target) for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function"}
    assert "medmamba.selective_scan_fwd.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-5)
