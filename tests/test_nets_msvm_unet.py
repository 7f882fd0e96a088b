import numpy as np
import pytest
import torch

from conftest import plans_kwargs
import torch.nn.functional as F
from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable as submodules_loadable
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

import medmamba.nets
from medmamba.layers.cross_scan import CrossScan
from medmamba.nets.msvm_unet import FLKPE, LKPE, MSFFN, MSVMUNet, pixel_shuffle_nd
from medmamba.layers.vss import Mlp

TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "decoder_depths": (1, 1, 1)}
SMALL3 = {"dims": (8, 16, 32), "depths": (1, 1, 1), "decoder_depths": (1, 1)}  # total stride 16
CLASS = "medmamba.nets.msvm_unet.MSVMUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 2, 64, 96)), (3, (1, 1, 32, 32, 64))])
def test_forward_backward(spatial_dims, shape):
    torch.manual_seed(0)
    net = MSVMUNet(shape[1], 3, spatial_dims, **TINY)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:  # (deep-supervision heads do not while it is off)
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert name.startswith("decoder.seg_layers.") and p.grad is None, name


@pytest.mark.parametrize("spatial_dims,shape", [(2, (1, 1, 48, 80)), (3, (1, 2, 16, 48, 80))])
def test_odd_multiples_of_the_stride(spatial_dims, shape):
    net = MSVMUNet(shape[1], 2, spatial_dims, **SMALL3)
    assert net.divisor == 16
    assert net(torch.randn(shape)).shape == (shape[0], 2, *shape[2:])


def test_topology_matches_msvm_unet():
    net = MSVMUNet(3, 9, 2)  # the published defaults
    assert net.dims == [96, 192, 384, 768] and net.depths == [2, 2, 8, 2] and net.decoder_depths == [2, 2, 2]
    stem = net.encoder.stem
    assert (stem[0].in_channels, stem[0].out_channels, stem[0].stride) == (3, 48, (2, 2))
    assert isinstance(stem[2], torch.nn.GELU) and (stem[3].out_channels, stem[3].stride) == (96, (2, 2))
    assert [len(s) for s in net.encoder.stages] == [2, 2, 8, 2]
    assert [(d.conv.kernel_size, d.conv.stride) for d in net.encoder.downsamples] == [((3, 3), (2, 2))] * 3
    blk = net.encoder.stages[2][0]
    assert isinstance(blk.mixer, CrossScan) and not blk.mixer.gated and blk.mixer.d_inner == 384
    assert blk.mixer.d_state == 1 and blk.mixer.conv.bias is None and len(blk.mixer.routes) == 4
    assert isinstance(blk.ffn, Mlp) and blk.ffn.fc1.out_features == 4 * 384
    ups = net.decoder.up_blocks
    assert [(u.up.dim_in, u.up.dim_out) for u in ups] == [(768, 384), (384, 192), (192, 96)]
    assert ups[0].up.expand[0].out_channels == 1536  # 2D LKPE: 1x1 Cin -> 2 Cin, shuffle 2 -> Cin / 2
    assert isinstance(ups[0].up.expand[1], torch.nn.BatchNorm2d) and ups[0].up.expand[3].groups == 1536
    assert ups[0].concat.in_features == 768 and ups[0].concat.out_features == 384
    dec_blocks = [b for u in ups for b in u.blocks]
    assert len(dec_blocks) == 6 and all(isinstance(b.ffn, MSFFN) and isinstance(b.mixer, CrossScan) for b in dec_blocks)
    assert [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in dec_blocks][0] == \
        pytest.approx(0.2)
    final = net.decoder.final
    assert len(final.steps) == 1 and final.steps[0].expand[0].out_channels == 1536 and final.steps[0].scale == 4
    assert net.decoder.seg_layers[0].in_channels == 96 and net.decoder.seg_layers[0].out_channels == 9


def test_3d_expansions():
    net = MSVMUNet(1, 2, 3, dims=(16, 32), depths=(1, 1), decoder_depths=(1,))
    up = net.decoder.up_blocks[0].up
    assert up.expand[0].out_channels == 4 * 32 and isinstance(up.expand[1], torch.nn.BatchNorm3d)  # 8 * 32 / 2
    final = net.decoder.final
    assert [s.scale for s in final.steps] == [2, 2]  # two x2 steps instead of one x4
    assert [s.expand[0].out_channels for s in final.steps] == [8 * 16, 8 * 16]
    f = FLKPE(4, 3, out_channels=5)
    assert f(torch.randn(1, 2, 3, 4, 4)).shape == (1, 5, 8, 12, 16)
    lk = LKPE(8, 4, 3)
    assert lk(torch.randn(2, 3, 2, 5, 8)).shape == (2, 6, 4, 10, 4)


def test_pixel_shuffle_nd():
    x = torch.randn(2, 12, 3, 5)
    torch.testing.assert_close(pixel_shuffle_nd(x, 2), F.pixel_shuffle(x, 2))
    x = torch.randn(1, 2 * 8, 2, 3, 4)
    y = pixel_shuffle_nd(x, 2)
    assert y.shape == (1, 2, 4, 6, 8)
    # channel c * 8 + (i * 4 + j * 2 + k) lands at (2d + i, 2h + j, 2w + k) of channel c
    for c, i, j, k, d, h, w in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 1, 2, 3), (1, 0, 1, 1, 0, 1, 2)]:
        assert y[0, c, 2 * d + i, 2 * h + j, 2 * w + k] == x[0, c * 8 + i * 4 + j * 2 + k, d, h, w]


def test_ms_ffn_formula():
    torch.manual_seed(5)
    m = MSFFN(4, 2)
    x = torch.randn(2, 5, 6, 4)
    h = F.gelu(m.fc1(x)).movedim(-1, 1)
    convs = m.ms_conv.dw_convs
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (5, 5)] and all(c.bias is None for c in convs)
    expected = m.fc2((h + convs[0](h) + convs[1](h) + convs[2](h)).movedim(1, -1))
    torch.testing.assert_close(m(x), expected)


def test_deep_supervision_on_off_and_toggle():
    torch.manual_seed(2)
    net = MSVMUNet(1, 3, 2, deep_supervision=True, **TINY)
    x = torch.randn(2, 1, 64, 96)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert [tuple(o.shape[2:]) for o in outs] == [(64, 96), (16, 24), (8, 12), (4, 6)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.decoder.seg_layers.parameters())
    net.eval()
    outs = net(x)
    assert isinstance(outs, list)  # nnU-Net convention: the flag alone decides
    net.decoder.deep_supervision = False
    y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 64, 96)
    torch.testing.assert_close(y, outs[0])
    plain = MSVMUNet(1, 3, 2, **TINY)
    assert not plain.deep_supervision and isinstance(plain(x), torch.Tensor)
    # the heads exist either way (strict loading of DS-trained weights), trainable only with DS on
    assert not any(p.requires_grad for p in plain.decoder.seg_layers[1:].parameters())
    plain.load_state_dict(net.state_dict())
    plain.decoder.deep_supervision = True
    assert all(p.requires_grad for p in plain.parameters())
    assert isinstance(plain(x), list)


def test_state_dict_round_trip():
    torch.manual_seed(3)
    a = MSVMUNet(2, 3, 3, **SMALL3)
    a(torch.randn(2, 2, 16, 16, 32))  # move the BatchNorm running statistics away from their init
    a.eval()
    torch.manual_seed(4)
    b = MSVMUNet(2, 3, 3, **SMALL3).eval()
    x = torch.randn(1, 2, 16, 16, 32)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(a(x), b(x))


def test_registry_create():
    net = medmamba.nets.create("msvm_unet", 1, 2, spatial_dims=2, **SMALL3)
    assert isinstance(net, MSVMUNet) and net.spatial_dims == 2 and net.out_channels == 2
    assert net(torch.randn(1, 1, 32, 16)).shape == (1, 2, 32, 16)
    assert medmamba.nets.get_class("MSVMUNet") is MSVMUNet


def test_nnunet_get_network_from_plans():
    strides = [[1, 1, 1], [4, 4, 4], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    net = get_network_from_plans(CLASS, plans_kwargs(3, strides, **TINY), REQ_IMPORT, 1, 3, allow_init=True,
                                 deep_supervision=True)
    assert isinstance(net, MSVMUNet) and net.spatial_dims == 3 and net.decoder.deep_supervision
    submodules_loadable(net)
    x = torch.randn(1, 1, 32, 32, 64)
    outs = net(x)
    scales = list(1 / np.cumprod(np.vstack(strides), axis=0))[:-1]  # nnU-Net's deep-supervision scales
    assert len(outs) == len(scales)
    for o, s in zip(outs, scales):
        assert tuple(o.shape[2:]) == tuple(int(round(a * b)) for a, b in zip(x.shape[2:], s))
    net.decoder.deep_supervision = False
    assert net(x).shape == (1, 3, 32, 32, 64)


def test_nnunet_strides_checks():
    six = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="deep supervision needs"):
        get_network_from_plans(CLASS, plans_kwargs(2, six, **TINY), REQ_IMPORT, 1, 2, deep_supervision=True)
    net = get_network_from_plans(CLASS, plans_kwargs(2, six, **TINY), REQ_IMPORT, 1, 2, deep_supervision=False)
    assert net.spatial_dims == 2 and isinstance(net(torch.randn(1, 1, 32, 64)), torch.Tensor)
    with pytest.raises(ValueError, match=r"downsample by \[64, 64\] in total"):
        get_network_from_plans(CLASS, plans_kwargs(2, six + [[2, 2]], **TINY), REQ_IMPORT, 1, 2,
                               deep_supervision=False)
    aniso = [[1, 1, 1], [2, 4, 4], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="fixed topology"):
        get_network_from_plans(CLASS, plans_kwargs(3, aniso, **TINY), REQ_IMPORT, 1, 2, deep_supervision=False)
    with pytest.raises(ValueError, match="contradicts conv_op"):
        MSVMUNet(1, 2, spatial_dims=3, conv_op="torch.nn.Conv2d", **TINY)
    with pytest.raises(ValueError, match="spatial_dims must be one of"):
        MSVMUNet(1, 2, conv_op=torch.nn.Conv1d, **TINY)


def test_bad_inputs_and_arguments():
    net = MSVMUNet(1, 2, 3, **SMALL3)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 16, 16, 24))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="decoder_depths needs 2"):
        MSVMUNet(1, 2, 2, dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1))
    with pytest.raises(ValueError, match="in_channels"):
        MSVMUNet(out_channels=2, spatial_dims=2)
