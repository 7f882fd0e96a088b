"""medmamba.Mamba: mamba_ssm.Mamba's parameter names, shapes and init, and its forward semantics."""
import math

import pytest
import torch
import torch.nn.functional as F

from medmamba import Mamba
from medmamba.kernels import selective_scan_ref


def expected_shapes(d_model, d_state=16, d_conv=4, expand=2):
    d_inner = expand * d_model
    R = math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state), "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv), "conv1d.bias": (d_inner,),
        "x_proj.weight": (R + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, R), "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("d_model,d_state", [(32, 16), (48, 8), (7, 1)])
def test_parameter_names_and_shapes_match_mamba_ssm(d_model, d_state):
    m = Mamba(d_model, d_state=d_state)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_shapes(d_model, d_state)


def test_published_style_state_dict_loads_strictly():
    # a checkpoint written by mamba_ssm.Mamba has exactly these keys; load one made from the shapes
    shapes = expected_shapes(64)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    m = Mamba(64)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.A_log, sd["A_log"])


def test_initialisation():
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
    assert torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    R = m.dt_rank
    assert m.dt_proj.weight.abs().max() <= R ** -0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.in_proj.bias is None and m.out_proj.bias is None


def plain_forward(m, x):
    """The Mamba v1 forward written out directly, scanning with the float64 reference."""
    L = x.shape[1]
    xz = x @ m.in_proj.weight.t()
    xi, z = xz.chunk(2, dim=-1)
    xi = F.conv1d(xi.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :L]
    xi = F.silu(xi)
    proj = xi.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = proj.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.softplus(dt @ m.dt_proj.weight.t() + m.dt_proj.bias).transpose(1, 2)
    y = selective_scan_ref(xi, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D,
                           z=z.transpose(1, 2))
    return y.transpose(1, 2) @ m.out_proj.weight.t()


@pytest.mark.parametrize("length", [1, 17, 130])
def test_forward_matches_plain_reimplementation(length):
    torch.manual_seed(1)
    m = Mamba(24, d_state=8)
    x = torch.randn(2, length, 24)
    torch.testing.assert_close(m(x), plain_forward(m, x), rtol=1e-4, atol=1e-5)


def test_backward_matches_plain_reimplementation():
    torch.manual_seed(2)
    m = Mamba(16, d_state=4)
    x = torch.randn(2, 40, 16, requires_grad=True)
    g1 = torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()])
    g2 = torch.autograd.grad(plain_forward(m, x).square().sum(), [x, *m.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_triton_backend_inside_block(device):
    torch.manual_seed(3)
    m = Mamba(8, d_state=4, scan_backend="triton").to(device)
    x = torch.randn(1, 20, 8, device=device)
    ref = Mamba(8, d_state=4, scan_backend="torch").to(device)
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_keeps_state_fp32():
    torch.manual_seed(4)
    m = Mamba(32)
    x = torch.randn(2, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.1, atol=0.1)


def test_bad_input_shape_is_named():
    with pytest.raises(ValueError, match=r"expected input \(batch, L, d_model=8\)"):
        Mamba(8)(torch.randn(2, 5, 9))
    with pytest.raises(NotImplementedError, match="inference_params"):
        Mamba(8)(torch.randn(2, 5, 8), inference_params=object())


def test_traced_block_exports_to_torchscript(tmp_path):
    torch.manual_seed(5)
    m = Mamba(8, d_state=4).eval()
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        traced = torch.jit.trace(m, x)
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    torch.testing.assert_close(loaded(x), m(x))


def test_torch_compile_matches_eager(one_thread):
    """torch.compile (dynamo + AOTAutograd) over the block, scan included, computes what eager does."""
    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=4)
    x = torch.randn(2, 37, 16, requires_grad=True)
    ref = m(x)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    want_x = x.grad.clone()
    m.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, want_x)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)
