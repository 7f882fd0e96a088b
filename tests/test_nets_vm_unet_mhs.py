import numpy as np
import pytest
import torch

from conftest import plans_kwargs
from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable as submodules_loadable
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

import medmamba.nets
from medmamba.layers.multi_head_scan import MHSMixer
from medmamba.nets.vm_unet_mhs import VMUNetMHS, validate_plans_topology
from medmamba.layers.vss import FinalPatchExpand, PatchExpand, PatchMerging, VSSBlock

TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "decoder_depths": (1, 1, 1, 1), "d_state": 4}
SMALL3 = {"dims": (8, 16, 32), "depths": (1, 1, 1), "decoder_depths": (1, 1, 1), "d_state": 2}  # total stride 16
CLASS = "medmamba.nets.vm_unet_mhs.VMUNetMHS"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 2, 64, 96)), (3, (1, 1, 32, 32, 64))])
def test_forward_backward(spatial_dims, shape):
    torch.manual_seed(0)
    net = VMUNetMHS(shape[1], 3, spatial_dims, **TINY)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:  # (deep-supervision heads do not while it is off)
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert name.startswith("decoder.seg_layers.") and p.grad is None, name
    # every token mixer is MHS-VM's gated mixer, inside plain VSS blocks without MLP
    blocks = [m for m in net.modules() if isinstance(m, VSSBlock)]
    assert len(blocks) == 8 and all(isinstance(b.mixer, MHSMixer) and b.ffn is None for b in blocks)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (1, 1, 48, 80)), (3, (1, 2, 16, 48, 80))])
def test_odd_multiples_of_the_stride(spatial_dims, shape):
    net = VMUNetMHS(shape[1], 2, spatial_dims, **SMALL3)
    assert net.divisor == 16
    y = net(torch.randn(shape))
    assert y.shape == (shape[0], 2, *shape[2:])


def test_topology_matches_vm_unet():
    net = VMUNetMHS(3, 4, 2)  # the published defaults
    assert net.dims == [96, 192, 384, 768] and net.depths == [2, 2, 2, 2] and net.decoder_depths == [2, 2, 2, 1]
    assert [len(s["blocks"]) for s in net.decoder.stages] == [2, 2, 2, 1]
    assert net.encoder.patch_embed.proj.kernel_size == (4, 4) and net.encoder.patch_embed.proj.stride == (4, 4)
    merges = [s["downsample"] for s in net.encoder.stages]
    assert [isinstance(m, PatchMerging) for m in merges] == [True, True, True, False]
    expands = [s["upsample"] for s in net.decoder.stages]
    assert isinstance(expands[0], torch.nn.Identity)
    assert [(e.dim, e.out_dim) for e in expands[1:]] == [(768, 384), (384, 192), (192, 96)]
    assert isinstance(net.decoder.final_expand, FinalPatchExpand) and net.decoder.final_expand.out_dim == 24
    assert net.decoder.final_expand.expand.out_features == 384  # Linear 96 -> 384, shuffle 4 -> 24
    assert net.decoder.seg_layers[0].in_channels == 24 and len(net.decoder.seg_layers) == 4
    mixer = net.encoder.stages[0]["blocks"][0].mixer
    assert mixer.mhs.num_heads == 4 and mixer.mhs.d_head == 24 and mixer.mhs.d_state == 16
    assert mixer.mhs.threshold == 0.5
    # 3D: 4^3 patch embedding, x2 expand Linear C -> 4C, final x4 expand Linear C -> 16C
    net3 = VMUNetMHS(1, 2, 3, dims=(16, 32), depths=(1, 1), decoder_depths=(1, 1))
    assert net3.encoder.patch_embed.proj.kernel_size == (4, 4, 4)
    assert isinstance(net3.decoder.stages[1]["upsample"], PatchExpand)
    assert net3.decoder.stages[1]["upsample"].expand.out_features == 4 * 32 // 2 * 2
    assert net3.decoder.final_expand.expand.out_features == 16 * 16
    # drop path: rising over the encoder, falling over the decoder
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in net.encoder.stages for b in s["blocks"]]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.2) < 1e-6 and rates == sorted(rates)


def test_skips_are_added_before_expanding():
    torch.manual_seed(1)
    net = VMUNetMHS(1, 2, 2, **TINY).eval()
    expand_inputs, stage_outputs, skips = {}, {}, []
    for i, stage in enumerate(net.decoder.stages):
        stage["upsample"].register_forward_hook(lambda m, inp, out, i=i: expand_inputs.__setitem__(i, inp[0]))
        stage["blocks"].register_forward_hook(lambda m, inp, out, i=i: stage_outputs.__setitem__(i, out))
    net.encoder.register_forward_hook(lambda m, inp, out: skips.extend(out[1]))
    net(torch.randn(1, 1, 64, 64))
    n = len(net.dims)
    for i in range(1, n):  # stage i expands (previous decoder output + input of encoder stage n - i)
        torch.testing.assert_close(expand_inputs[i], stage_outputs[i - 1] + skips[n - i])
    assert skips[0].shape[1:3] == (16, 16)  # the patch-embedding output is not used, as in VM-UNet


def test_deep_supervision_on_off_and_toggle():
    torch.manual_seed(2)
    net = VMUNetMHS(1, 3, 2, deep_supervision=True, **TINY)
    x = torch.randn(2, 1, 64, 96)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert [tuple(o.shape[2:]) for o in outs] == [(64, 96), (16, 24), (8, 12), (4, 6)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.decoder.seg_layers.parameters())
    net.eval()
    assert isinstance(net(x), list)  # nnU-Net convention: the flag alone decides
    net.decoder.deep_supervision = False
    y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 64, 96)
    torch.testing.assert_close(y, outs[0].detach(), rtol=1e-4, atol=1e-5)  # eval == train w/o drop path
    plain = VMUNetMHS(1, 3, 2, **TINY)
    assert not plain.deep_supervision and isinstance(plain(x), torch.Tensor)
    # the heads exist either way (strict loading of DS-trained weights), trainable only with DS on
    assert not any(p.requires_grad for p in plain.decoder.seg_layers[1:].parameters())
    plain.load_state_dict(net.state_dict())
    plain.decoder.deep_supervision = True
    assert all(p.requires_grad for p in plain.parameters())
    assert isinstance(plain(x), list)


def test_state_dict_round_trip():
    torch.manual_seed(3)
    a = VMUNetMHS(2, 3, 3, **SMALL3).eval()
    torch.manual_seed(4)
    b = VMUNetMHS(2, 3, 3, **SMALL3).eval()
    x = torch.randn(1, 2, 16, 16, 32)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(a(x), b(x))
    assert not any("_tables" in k or "perm" in k for k in a.state_dict())


def test_registry_create():
    net = medmamba.nets.create("vm_unet_mhs", 1, 2, spatial_dims=2, **SMALL3)
    assert isinstance(net, VMUNetMHS) and net.spatial_dims == 2 and net.out_channels == 2
    assert net(torch.randn(1, 1, 32, 16)).shape == (1, 2, 32, 16)
    assert medmamba.nets.get_class("VMUNetMHS") is VMUNetMHS


def test_nnunet_get_network_from_plans():
    strides = [[1, 1, 1], [4, 4, 4], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    net = get_network_from_plans(CLASS, plans_kwargs(3, strides, **TINY), REQ_IMPORT, 1, 3, allow_init=True,
                                 deep_supervision=True)
    assert isinstance(net, VMUNetMHS) and net.spatial_dims == 3 and net.decoder.deep_supervision
    submodules_loadable(net)
    x = torch.randn(1, 1, 32, 32, 64)
    outs = net(x)
    # nnU-Net's deep-supervision scales: 1 / cumprod(strides), all but the deepest
    scales = list(1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    assert len(outs) == len(scales)
    for o, s in zip(outs, scales):
        assert tuple(o.shape[2:]) == tuple(int(round(a * b)) for a, b in zip(x.shape[2:], s))
    # nnU-Net's set_deep_supervision_enabled
    net.decoder.deep_supervision = False
    assert net(x).shape == (1, 3, 32, 32, 64)


def test_nnunet_strides_checks():
    six = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="deep supervision needs"):
        get_network_from_plans(CLASS, plans_kwargs(2, six, **TINY), REQ_IMPORT, 1, 2, deep_supervision=True)
    net = get_network_from_plans(CLASS, plans_kwargs(2, six, **TINY), REQ_IMPORT, 1, 2, deep_supervision=False)
    assert net.spatial_dims == 2
    with pytest.raises(ValueError, match=r"downsample by \[16, 16\] in total"):
        get_network_from_plans(CLASS, plans_kwargs(2, six[:-1], **TINY), REQ_IMPORT, 1, 2, deep_supervision=False)
    aniso = [[1, 1, 1], [1, 4, 4], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="fixed topology"):
        get_network_from_plans(CLASS, plans_kwargs(3, aniso, **TINY), REQ_IMPORT, 1, 2, deep_supervision=False)
    bad_len = plans_kwargs(2, six, **TINY)
    bad_len["kernel_sizes"] = bad_len["kernel_sizes"][:-1]
    with pytest.raises(ValueError, match="kernel_sizes has 5 entries"):
        get_network_from_plans(CLASS, bad_len, REQ_IMPORT, 1, 2, deep_supervision=False)
    with pytest.raises(ValueError, match="contradicts conv_op"):
        VMUNetMHS(1, 2, spatial_dims=2, conv_op=torch.nn.Conv3d, **TINY)
    with pytest.raises(ValueError, match="contradicts"):
        VMUNetMHS(in_channels=1, input_channels=2, out_channels=2, **TINY)
    validate_plans_topology("X", 2, [1, 4, 8], True, strides=[1, 4, 2])  # int strides are per-axis
    validate_plans_topology("X", 3, [1, 2, 4, 8], False, n_stages=3, strides=2)  # one int for every stage
    with pytest.raises(ValueError, match="fixed topology"):
        validate_plans_topology("X", 3, [1, 4, 8, 16], False, n_stages=3, strides=2)


def test_bad_inputs_and_arguments():
    net = VMUNetMHS(1, 2, 2, **SMALL3)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 32, 40))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4D input"):
        net(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="double"):
        VMUNetMHS(1, 2, 2, dims=(8, 24, 32))
    with pytest.raises(ValueError, match="depths needs 3"):
        VMUNetMHS(1, 2, 2, dims=(8, 16, 32), depths=(1, 1))
    with pytest.raises(ValueError, match="out_channels"):
        VMUNetMHS(in_channels=1, spatial_dims=2)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (1, 3, 32, 32)), (3, (1, 1, 16, 16, 16))])
def test_plain_vm_unet_ss2d_mixer(spatial_dims, shape):
    """mixer='ss2d': VM-UNet's own VSS blocks (SS2D / SS3D cross-scan, the layer Swin-UMamba uses)."""
    from medmamba.layers.cross_scan import CrossScan
    torch.manual_seed(0)
    net = VMUNetMHS(shape[1], 2, spatial_dims, mixer="ss2d", **SMALL3)
    mixers = [m for m in net.modules() if isinstance(m, (CrossScan, MHSMixer))]
    assert mixers and all(isinstance(m, CrossScan) for m in mixers)
    assert mixers[0].d_inner == 2 * 8 and len(mixers[0].routes) == (4 if spatial_dims == 2 else 6)
    y = net(torch.randn(shape))
    assert y.shape == (1, 2, *shape[2:]) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="mixer must be"):
        VMUNetMHS(1, 2, 2, mixer="attention", **SMALL3)


def test_nnunet_plans_build_plain_vm_unet():
    """nnU-Net plans with arch_kwargs mixer 'ss2d' build the network whose state dict `medmamba weights import
    --from vm_unet` writes (net_kwargs with mixer 'ss2d'): a VMUNetMHS(mixer='ss2d') state dict loads strictly."""
    from medmamba.layers.cross_scan import CrossScan
    strides = [[1, 1], [4, 4], [2, 2]]
    kw = {"dims": (8, 16), "depths": (1, 1), "decoder_depths": (1, 1), "mixer": "ss2d"}
    net = get_network_from_plans(CLASS, plans_kwargs(2, strides, **kw), REQ_IMPORT, 3, 2, allow_init=True,
                                 deep_supervision=False)
    assert isinstance(net.encoder.stages[0]["blocks"][0].mixer, CrossScan)
    torch.manual_seed(1)
    other = VMUNetMHS(3, 2, 2, **kw)
    net.load_state_dict(other.state_dict(), strict=True)
