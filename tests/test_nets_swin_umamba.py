import inspect

import pytest
import torch

import medmamba.nets as nets
from medmamba.nets.swin_umamba import SwinUMamba, SwinUMambaD

TINY = dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4)
CLASSES = [SwinUMamba, SwinUMambaD]
EXPECTED_SCALES = {SwinUMamba: [1, 2, 4, 8], SwinUMambaD: [1, 4, 8, 16]}


def _plans_kwargs(spatial_dims, strides):
    conv = f"torch.nn.modules.conv.Conv{spatial_dims}d"
    n = len(strides)
    return {
        "n_stages": n,
        "features_per_stage": [32, 64, 128, 256, 320, 320][:n],
        "conv_op": conv,
        "kernel_sizes": [[3] * spatial_dims] * n,
        "strides": [[s] * spatial_dims for s in strides],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{spatial_dims}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("spatial_dims,shape", [(2, (1, 2, 64, 96)), (3, (1, 2, 32, 32, 64))])
def test_forward_backward_deep_supervision(cls, spatial_dims, shape):
    torch.manual_seed(0)
    net = cls(in_channels=2, out_channels=3, spatial_dims=spatial_dims, deep_supervision=True, **TINY)
    x = torch.randn(*shape)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert net.ds_scales == EXPECTED_SCALES[cls]
    for out, s in zip(outs, net.ds_scales):
        assert out.shape == (shape[0], 3, *[d // s for d in shape[2:]])
        assert torch.isfinite(out).all()
    sum(o.float().mean() for o in outs).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # toggling the flag the way nnU-Net does
    net.decoder.deep_supervision = False
    with torch.no_grad():
        single = net.eval()(x)
    assert isinstance(single, torch.Tensor) and single.shape == (shape[0], 3, *shape[2:])
    assert net.deep_supervision is False
    net.deep_supervision = True
    assert net.decoder.deep_supervision is True


@pytest.mark.parametrize("cls", CLASSES)
def test_odd_multiple_of_32_and_ds_off(cls):
    net = cls(1, 2, spatial_dims=2, **TINY).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 96, 160))  # 3 x 32, 5 x 32
    assert y.shape == (1, 2, 96, 160)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip(cls):
    torch.manual_seed(1)
    a = cls(1, 2, spatial_dims=3, **TINY).eval()
    b = cls(1, 2, spatial_dims=3, **TINY).eval()
    sd = a.state_dict()
    assert not any("_cache" in k or "perm" in k for k in sd)
    b.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_registry_create():
    for name, cls in (("swin_umamba", SwinUMamba), ("swin_umamba_d", SwinUMambaD)):
        net = nets.create(name, 1, 2, spatial_dims=2, **TINY)
        assert type(net) is cls and net.spatial_dims == 2 and net.out_channels == 2


def test_default_sizes_and_published_2d_parameter_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Published 2D counts: Swin-UMamba 59.89M, Swin-UMamba-dagger 27.50M (meta device: no allocation).
    with torch.device("meta"):
        assert abs(n(SwinUMamba(3, 4, spatial_dims=2)) / 1e6 - 59.89) < 0.1
        assert abs(n(SwinUMambaD(3, 4, spatial_dims=2)) / 1e6 - 27.50) < 0.1
        net = SwinUMamba(1, 2)
    assert net.spatial_dims == 3 and net.divisor == 32
    assert [len(layer.blocks) for layer in net.encoder.layers] == [2, 2, 9, 2]


def test_get_network_from_plans():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    params = inspect.signature(get_network_from_plans).parameters
    assert {"arch_class_name", "arch_kwargs", "arch_kwargs_req_import", "input_channels",
            "output_channels", "deep_supervision"} <= set(params)
    req = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    for cls, strides in ((SwinUMamba, [1, 2, 2, 2, 2, 2]), (SwinUMambaD, [1, 4, 2, 2, 2])):
        kwargs = dict(_plans_kwargs(3, strides), **TINY)
        net = get_network_from_plans(f"{cls.__module__}.{cls.__name__}", kwargs, req, input_channels=2,
                                     output_channels=3, deep_supervision=True)
        assert type(net) is cls and net.spatial_dims == 3 and net.in_channels == 2 and net.out_channels == 3
        assert net.decoder.deep_supervision is True
        outs = net(torch.randn(1, 2, 32, 32, 32))
        assert [o.shape[2] for o in outs] == [32 // s for s in EXPECTED_SCALES[cls]]
        # the scales nnU-Net downsamples its targets to, for the first len(outs) outputs
        cum = torch.tensor(strides).cumprod(0).tolist()
        assert cum[:len(outs)] == net.ds_scales
    net2d = get_network_from_plans("medmamba.nets.swin_umamba.SwinUMamba", dict(_plans_kwargs(2, [1, 2, 2, 2, 2, 2]), **TINY),
                                   req, input_channels=1, output_channels=2, deep_supervision=False)
    assert net2d.spatial_dims == 2 and net2d.decoder.deep_supervision is False


def test_plans_strides_refused_with_clear_message():
    kw = _plans_kwargs(3, [1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="cannot be followed"):
        SwinUMamba(input_channels=1, num_classes=2, deep_supervision=True, **kw, **TINY)
    aniso = _plans_kwargs(3, [1, 2, 2, 2, 2, 2])
    aniso["strides"][1] = [1, 2, 2]
    with pytest.raises(ValueError, match="isotropic"):
        SwinUMamba(input_channels=1, num_classes=2, **aniso, **TINY)
    # SwinUMambaD's deep-supervision outputs skip H/2: the standard 2-2-2-2-2 plans do not fit with DS on
    std = _plans_kwargs(3, [1, 2, 2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"\[1, 4, 8, 16\]"):
        SwinUMambaD(input_channels=1, num_classes=2, deep_supervision=True, **std, **TINY)
    SwinUMambaD(input_channels=1, num_classes=2, deep_supervision=False, **std, **TINY)
    bad_n = _plans_kwargs(3, [1, 2, 2, 2, 2, 2])
    bad_n["n_stages"] = 5
    with pytest.raises(ValueError, match="n_stages"):
        SwinUMamba(input_channels=1, num_classes=2, **bad_n, **TINY)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_arguments_and_inputs(cls):
    with pytest.raises(ValueError, match="contradicts"):
        cls(in_channels=1, out_channels=2, spatial_dims=2, conv_op=torch.nn.Conv3d, **TINY)
    with pytest.raises(ValueError, match="contradicts"):
        cls(in_channels=1, input_channels=2, out_channels=2, **TINY)
    with pytest.raises(ValueError, match="required"):
        cls(in_channels=1, **TINY)
    with pytest.raises(TypeError, match="unexpected"):
        cls(1, 2, bogus=3, **TINY)
    with pytest.raises(ValueError, match="norm_op"):
        cls(1, 2, norm_op=torch.nn.LayerNorm, **TINY)
    with pytest.raises(ValueError, match="equal length"):
        cls(1, 2, dims=[8, 16], depths=[1, 1, 1])
    net = cls(1, 2, spatial_dims=2, **TINY)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 64, 48))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4D input"):
        net(torch.randn(1, 1, 32, 32, 32))
