"""CNN-Mamba networks (U-Mamba Bot/Enc, LightM-UNet): shapes, gradients, deep supervision, state dicts,
MONAI and nnU-Net construction, input checks, fp32 Mamba under autocast. Tiny widths and inputs: CPU, fast.
"""
from __future__ import annotations

import pytest
import torch

import medmamba.nets
from medmamba import Mamba
from medmamba.layers.cnn_mamba import MambaLayer, RVMLayer
from medmamba.nets.lightm_unet import LightMUNet
from medmamba.nets.umamba import UMambaBot, UMambaEnc

# Tiny configurations (MONAI keywords) and an odd-but-divisible input per class and dimensionality.
TINY = {
    UMambaBot: dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1),
    UMambaEnc: dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1),
    LightMUNet: dict(init_filters=8, blocks_down=(1, 1, 1, 1)),
}
INPUT = {  # UMamba total stride 4, LightMUNet 8; LightM-UNet and U-Mamba Enc scan at full resolution.
    (UMambaBot, 3): (16, 24, 40), (UMambaBot, 2): (20, 36),
    (UMambaEnc, 3): (4, 12, 20), (UMambaEnc, 2): (12, 20),
    (LightMUNet, 3): (8, 8, 24), (LightMUNet, 2): (16, 24),
}
CLASSES = [UMambaBot, UMambaEnc, LightMUNet]


def build(cls, dims, out_channels=3, **kwargs):
    torch.manual_seed(0)
    return cls(in_channels=2, out_channels=out_channels, spatial_dims=dims, **{**TINY[cls], **kwargs})


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cls", CLASSES)
def test_forward_backward_deep_supervision(cls, dims):
    net = build(cls, dims, deep_supervision=True)
    size = INPUT[(cls, dims)]
    x = torch.randn(1, 2, *size)
    outs = net(x)
    # deep supervision: one output per decoder stage, highest resolution first, halving each time
    assert isinstance(outs, list) and len(outs) == (2 if cls is not LightMUNet else 3)
    for k, o in enumerate(outs):
        assert o.shape == (1, 3, *[s // 2 ** k for s in size])
    sum(o.square().mean() for o in outs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    mamba = [m for m in net.modules() if isinstance(m, Mamba)]
    assert mamba and all(m.A_log.grad.abs().sum() > 0 for m in mamba)

    net.eval()
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, *size)
    assert torch.allclose(y, outs[0].detach(), atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip(cls):
    net = build(cls, 3).eval()
    x = torch.randn(1, 2, *INPUT[(cls, 3)])
    torch.manual_seed(1)
    fresh = cls(in_channels=2, out_channels=3, spatial_dims=3, **TINY[cls]).eval()
    fresh.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


@pytest.mark.parametrize("name,cls", [("umamba_bot", UMambaBot), ("umamba_enc", UMambaEnc),
                                      ("lightm_unet", LightMUNet)])
def test_create_from_registry(name, cls):
    net = medmamba.nets.create(name, in_channels=1, out_channels=2, spatial_dims=2, **TINY[cls])
    assert type(net) is cls and net.in_channels == 1 and net.out_channels == 2 and net.spatial_dims == 2
    assert medmamba.nets.get_class(cls.__name__) is cls


def test_default_parameter_counts():
    # LightM-UNet's released default has ~5.0M parameters (not the abstract's ~1M).
    assert 4.9e6 < n_params(LightMUNet(1, 2, 3)) < 5.1e6
    assert 4.9e6 < n_params(LightMUNet(1, 2, 2)) < 5.1e6


def _plans_kwargs(dims, n_stages, features, strides, blocks_key="n_blocks_per_stage"):
    nd = f"{dims}d"
    return {
        "n_stages": n_stages, "features_per_stage": features,
        "conv_op": f"torch.nn.modules.conv.Conv{nd}",
        "kernel_sizes": [[3] * dims] * n_stages, "strides": strides,
        blocks_key: [1] + [2] * (n_stages - 1), "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{nd}",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


@pytest.mark.parametrize("cls,blocks_key", [(UMambaBot, "n_blocks_per_stage"), (UMambaEnc, "n_conv_per_stage"),
                                            (LightMUNet, "n_blocks_per_stage")])
def test_nnunet_get_network_from_plans(cls, blocks_key):
    from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if cls is LightMUNet:
        kwargs = _plans_kwargs(3, 4, [8, 16, 32, 64], [[1, 1, 1]] + [[2, 2, 2]] * 3, blocks_key)
        size = (8, 8, 16)
    else:
        kwargs = _plans_kwargs(3, 3, [4, 8, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], blocks_key)
        kwargs["patch_size"] = [8, 16, 16]  # ignored by UMambaBot; UMambaEnc's channels-as-tokens rule
        size = (8, 16, 16)
    net = get_network_from_plans(arch_class_name=f"{cls.__module__}.{cls.__name__}", arch_kwargs=kwargs,
                                 arch_kwargs_req_import=["conv_op", "norm_op", "dropout_op", "nonlin"],
                                 input_channels=1, output_channels=3, allow_init=True, deep_supervision=True)
    assert type(net) is cls
    test_submodules_loadable(net)
    assert net.compute_conv_feature_map_size(size) > 0
    with torch.no_grad():
        outs = net(torch.randn(1, 1, *size))
    assert isinstance(outs, list) and len(outs) == kwargs["n_stages"] - 1
    assert outs[0].shape == (1, 3, *size)
    if cls is not LightMUNet:
        # anisotropic strides [1, 2, 2] then [2, 2, 2]: second output at (8, 8) / (1, 2, 2)
        assert outs[1].shape == (1, 3, 8, 8, 8)
        # the plans' blocks arrive (n_blocks_per_stage or n_conv_per_stage), U-Mamba's schedule on top
        assert [len(s) for s in net.encoder.stages] == [1, 2, 1]


def test_published_block_schedule_and_names():
    net = UMambaBot(1, 2, 3, n_stages=6, features_per_stage=(2, 2, 4, 4, 4, 4))
    assert [len(s) for s in net.encoder.stages] == [2, 2, 2, 1, 1, 1]
    assert [len(s) for s in net.decoder.stages] == [2, 2, 2, 1, 1]  # deepest first
    keys = set(net.state_dict())
    for key in ("encoder.stem.0.conv1.weight", "encoder.stem.0.conv3.weight", "encoder.stages.1.1.conv1.conv.weight",
                "mamba_layer.norm.weight", "mamba_layer.mamba.A_log", "decoder.upsample_layers.0.conv.weight",
                "decoder.seg_layers.4.weight"):
        assert key in keys, key
    plain = UMambaBot(1, 2, 3, n_stages=6, features_per_stage=(2, 2, 4, 4, 4, 4), published_block_schedule=False)
    assert [len(s) for s in plain.encoder.stages] == [2] * 6


def test_enc_mamba_placement_and_channel_tokens():
    # 3D, patch 8^3, strides 1,2,2: the last stage is 2^3 = 8 voxels <= 16 channels -> channels are tokens
    net = UMambaEnc(1, 2, 3, features_per_stage=(4, 8, 16), n_blocks_per_stage=1, patch_size=8)
    assert net.channel_token == [False, False, True]
    layers = net.encoder.mamba_layers
    assert [m.dim for m in layers] == [4, 8, 8] and layers[2].mamba.d_model == 8
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"patch_size=\(8, 8, 8\)"):
        net(torch.randn(1, 1, 8, 8, 16))
    # 2D: alternate stages ending at the last one; 16 voxels <= 32 channels at the bottleneck
    net2 = UMambaEnc(1, 2, 2, features_per_stage=(4, 8, 16, 32), n_blocks_per_stage=1, patch_size=32)
    kinds = [type(m).__name__ for m in net2.encoder.mamba_layers]
    assert kinds == ["Identity", "MambaLayer", "Identity", "MambaLayer"]
    assert net2.channel_token == [False, False, False, True]
    # Bot: no Mamba in the encoder, one on the bottleneck
    bot = UMambaBot(1, 2, 3, features_per_stage=(4, 8, 16))
    assert bot.encoder.mamba_layers is None and bot.mamba_layer.dim == 16


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_inputs(cls):
    net = build(cls, 3).eval()
    div = 8 if cls is LightMUNet else 4
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="2 input channel"):
        net(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=rf"divisible by \({div}, {div}, {div}\)"):
        net(torch.randn(1, 2, 16, 16, 16 + div // 2))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="contradicts"):
        UMambaBot(in_channels=1, input_channels=2, out_channels=2)
    with pytest.raises(ValueError, match="out_channels"):
        UMambaBot(in_channels=1)
    with pytest.raises(ValueError, match="spatial_dims"):
        UMambaEnc(1, 2, spatial_dims=4)
    with pytest.raises(ValueError, match="strides must have 3 entries"):
        UMambaBot(1, 2, 3, features_per_stage=(4, 8, 16), strides=(1, 2))
    with pytest.raises(ValueError, match="odd"):
        UMambaBot(1, 2, 3, features_per_stage=(4, 8, 16), kernel_sizes=2)
    with pytest.raises(ValueError, match="n_blocks_per_stage=.*contradicts"):
        UMambaBot(1, 2, 3, n_blocks_per_stage=2, n_conv_per_stage=3)
    with pytest.raises(ValueError, match="strides"):
        LightMUNet(1, 2, 3, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    with pytest.raises(ValueError, match="n_stages=6"):
        LightMUNet(1, 2, 3, n_stages=6)
    with pytest.raises(ValueError, match="doubling"):
        LightMUNet(1, 2, 3, features_per_stage=[32, 64, 128, 320])


def _dtype_probe(module, seen):
    def hook(mod, args, out):
        seen.append((args[0].dtype, out.dtype))
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("layer", [MambaLayer(8), RVMLayer(8, 4)])
def test_mamba_runs_fp32_under_autocast(layer, monkeypatch):
    import medmamba.layers.mamba as mamba_module

    seen, scan_inputs = [], []
    real_scan = mamba_module.selective_scan
    monkeypatch.setattr(mamba_module, "selective_scan",
                        lambda u, delta, *a, **k: scan_inputs.append((u.dtype, delta.dtype)) or real_scan(u, delta, *a, **k))
    h1 = _dtype_probe(layer.mamba, seen)
    x = torch.randn(2, 8, 4, 6, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    h1.remove()
    assert seen == [(torch.float32, torch.float32)]
    # the in-projection (weight @ x) and dt projection: autocast would have made them bf16
    assert scan_inputs == [(torch.float32, torch.float32)]
    assert y.dtype == torch.bfloat16 and y.shape[2:] == x.shape[2:]


def test_network_mamba_fp32_under_autocast():
    net = build(UMambaBot, 3).eval()
    seen = []
    handle = _dtype_probe(net.mamba_layer.mamba, seen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(1, 2, 8, 8, 8))
    handle.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(y.float()).all()


def test_mamba_layer_token_order_is_raster():
    # tokens must run with the last spatial axis fastest: check via causality of the scan
    layer = MambaLayer(4).eval()
    x = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        y = layer(x)
        x2 = x.clone()
        x2[0, :, 2, 3, 4] += 1.0  # the very last token in raster order
        y2 = layer(x2)
    changed = (y - y2).abs().sum(1)[0] > 0
    assert changed.sum() == 1 and changed[2, 3, 4]
