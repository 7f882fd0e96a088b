"""Faithfulness to the official code (issue 15) and the checkpoint converters (medmamba.weights).

Official-format checkpoints are generated here from the official key names and shapes, written down
from reading the official code (repositories and commits in docs/model_card.md); small independent
re-implementations of the official ops (patch merging, sub-pixel expansion, MHS routes, the 2D U-Mamba
decoder, MambaMIM's light decoder) check that our networks compute the same from the same tensors.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from medmamba import nets
from medmamba.nets.vss import PatchMerging, VSSBlock, merge_order
from medmamba.scan_routes import CROSS_SCAN_ROUTES, route_permutation
from medmamba.weights import CheckpointError, convert, inflate_2d_to_3d, save


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _rand(shape, g):
    return torch.randn(shape, generator=g) * 0.2


# ------------------------------------------------------------------------------------------------
# official ops, re-implemented from reading the official code
# ------------------------------------------------------------------------------------------------

def official_patch_merging_2d(x, norm_w, norm_b, red_w):
    """VMamba / Swin-UMamba / MHS-VM PatchMerging2D: cat(x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2])."""
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, 1e-5), red_w)


def official_spiral(h, w):
    """MHS-VM scanutils.spiral_scan (clockwise, outside in), as (i, j) pairs."""
    pos_i, pos_j = [], []
    tl_h, tl_w, br_h, br_w = 0, 0, h - 1, w - 1
    while True:
        pos_i += [tl_h] * (br_w - tl_w) + list(range(tl_h, br_h)) + [br_h] * (br_w - tl_w) + list(range(br_h, tl_h, -1))
        pos_j += list(range(tl_w, br_w)) + [br_w] * (br_h - tl_h) + list(range(br_w, tl_w, -1)) + [tl_w] * (br_h - tl_h)
        tl_h, tl_w, br_h, br_w = tl_h + 1, tl_w + 1, br_h - 1, br_w - 1
        if tl_h > br_h or tl_w > br_w:
            break
        if tl_h == br_h and tl_w == br_w:
            pos_i.append(tl_h)
            pos_j.append(tl_w)
    return list(zip(pos_i[:h * w], pos_j[:h * w]))


# ------------------------------------------------------------------------------------------------
# fixes
# ------------------------------------------------------------------------------------------------

def test_patch_merging_order_matches_official_2d():
    g = torch.Generator().manual_seed(0)
    pm = PatchMerging(3, spatial_dims=2)
    with torch.no_grad():
        for p in pm.parameters():
            p.copy_(_rand(p.shape, g) + (1 if p.dim() == 1 else 0))
    x = torch.randn(2, 6, 4, 3, generator=g)
    ref = official_patch_merging_2d(x, pm.norm.weight, pm.norm.bias, pm.reduction.weight)
    torch.testing.assert_close(pm(x), ref)
    assert merge_order(2) == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_patch_merging_3d_inflation_equals_2d_on_depth_constant_input():
    g = torch.Generator().manual_seed(1)
    pm2, pm3 = PatchMerging(3, spatial_dims=2), PatchMerging(3, spatial_dims=3)
    with torch.no_grad():
        for p in pm2.parameters():
            p.copy_(_rand(p.shape, g) + (1 if p.dim() == 1 else 0))
    sd3 = {k: inflate_2d_to_3d(f"encoder.downsamples.0.{k}", v, pm3.state_dict()[k].shape)
           for k, v in pm2.state_dict().items()}
    pm3.load_state_dict(sd3)
    x2 = torch.randn(1, 4, 6, 3, generator=g)
    x3 = x2.unsqueeze(1).expand(1, 4, 4, 6, 3)  # (B, D, H, W, C), constant along D
    y3 = pm3(x3)
    for d in range(y3.shape[1]):
        torch.testing.assert_close(y3[:, d], pm2(x2))


def test_vss_block_layernorm_eps_is_official():
    assert VSSBlock(8, spatial_dims=2).norm.eps == 1e-5


def test_cross_scan_route_order_matches_vmamba():
    # SS2D.forward_core: xs = [x.view(L), x.transpose(H, W).view(L), and both flipped]
    h, w = 3, 5
    grid = torch.arange(h * w).view(h, w)
    official = [grid.flatten(), grid.t().flatten(), grid.flatten().flip(0), grid.t().flatten().flip(0)]
    for route, ref in zip(CROSS_SCAN_ROUTES[2], official):
        assert torch.equal(route_permutation((h, w), route), ref)


@pytest.mark.parametrize("h,w", [(2, 2), (3, 4), (4, 4), (5, 3), (6, 6), (8, 8)])
def test_mhs_spiral_routes_match_official_generator(h, w):
    spiral = official_spiral(h, w)
    ref = torch.tensor([i * w + j for i, j in spiral])
    mirror = torch.tensor([(h - 1 - i) * w + j for i, j in spiral])  # routegen.py: sscan_1 rows flipped
    assert torch.equal(route_permutation((h, w), "spiral"), ref)
    assert torch.equal(route_permutation((h, w), "spiral_mirror"), mirror)


def test_mhs_spiral_mirror_hand_made_4x4():
    # grid 4x4, raster indices; clockwise spiral then rows flipped (start bottom-left, go right)
    assert route_permutation((4, 4), "spiral_mirror").tolist() == \
        [12, 13, 14, 15, 11, 7, 3, 2, 1, 0, 4, 8, 9, 10, 6, 5]


def test_msvm_lkpe_sub_pixel_layout_matches_official():
    from medmamba.nets.msvm_unet import LKPE
    g = torch.Generator().manual_seed(2)
    m = LKPE(8, 4, spatial_dims=2).eval()
    x = torch.randn(1, 3, 5, 8, generator=g)  # channels-last
    h = m.expand(x.movedim(-1, 1)).movedim(1, -1)  # (B, H, W, 16)
    b, hh, ww, c = h.shape
    # einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'
    ref = h.view(b, hh, ww, 2, 2, c // 4).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * hh, 2 * ww, c // 4)
    ref = F.layer_norm(ref, (c // 4,), m.norm.weight, m.norm.bias, 1e-5)
    torch.testing.assert_close(m(x), ref)


# ------------------------------------------------------------------------------------------------
# U-Mamba (2D): official-format checkpoint, converter, official decoder recomputed
# ------------------------------------------------------------------------------------------------

def _res_block_keys(prefix, cin, cout, k, dims):
    ks = (k,) * dims
    return {f"{prefix}.conv1.weight": (cout, cin, *ks), f"{prefix}.conv1.bias": (cout,),
            f"{prefix}.norm1.weight": (cout,), f"{prefix}.norm1.bias": (cout,),
            f"{prefix}.conv2.weight": (cout, cout, *ks), f"{prefix}.conv2.bias": (cout,),
            f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
            f"{prefix}.conv3.weight": (cout, cin, *(1,) * dims), f"{prefix}.conv3.bias": (cout,)}


def _mamba_keys(prefix, c):
    e, r = 2 * c, math.ceil(c / 16)
    return {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,), f"{prefix}.mamba.A_log": (e, 16),
            f"{prefix}.mamba.D": (e,), f"{prefix}.mamba.in_proj.weight": (2 * e, c),
            f"{prefix}.mamba.conv1d.weight": (e, 1, 4), f"{prefix}.mamba.conv1d.bias": (e,),
            f"{prefix}.mamba.x_proj.weight": (r + 32, e), f"{prefix}.mamba.dt_proj.weight": (e, r),
            f"{prefix}.mamba.dt_proj.bias": (e,), f"{prefix}.mamba.out_proj.weight": (c, e)}


def official_umamba_bot_2d_keys(cin, feats, classes, k=3):
    """UMambaBot_2d.py with one block per stage: key -> shape (decoder holds the encoder: duplicated)."""
    enc = _res_block_keys("encoder.stem.0", cin, feats[0], k, 2)
    for s, c in enumerate(feats):
        enc.update(_res_block_keys(f"encoder.stages.{s}.0", feats[s - 1] if s else feats[0], c, k, 2))
    keys = dict(enc)
    keys.update(_mamba_keys("mamba_layer", feats[-1]))
    keys.update({f"decoder.{k_}": v for k_, v in enc.items()})
    n = len(feats)
    for s in range(1, n):
        below, skip = feats[-s], feats[-(s + 1)]
        keys[f"decoder.upsample_layers.{s - 1}.conv.weight"] = (skip, below, 1, 1)
        keys[f"decoder.upsample_layers.{s - 1}.conv.bias"] = (skip,)
        keys.update(_res_block_keys(f"decoder.stages.{s - 1}.0", 2 * skip if s < n - 1 else skip, skip, k, 2))
        keys[f"decoder.seg_layers.{s - 1}.weight"] = (classes, skip, 1, 1)
        keys[f"decoder.seg_layers.{s - 1}.bias"] = (classes,)
    return keys


def _official_state(keys, g):
    sd = {}
    for k, shape in keys.items():
        if k.startswith("decoder.encoder."):
            continue
        if k.endswith("A_log"):
            sd[k] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif k.endswith((".D", "norm1.weight", "norm2.weight", "norm.weight")):
            sd[k] = 1 + _rand(shape, g)
        else:
            sd[k] = _rand(shape, g)
    for k in keys:
        if k.startswith("decoder.encoder."):
            sd[k] = sd[k[len("decoder."):]]
    return sd


def _official_res_block(x, sd, p):
    y = F.conv2d(x, sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
    y = F.leaky_relu(F.instance_norm(y, weight=sd[f"{p}.norm1.weight"], bias=sd[f"{p}.norm1.bias"], eps=1e-5), 0.01)
    y = F.instance_norm(F.conv2d(y, sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1),
                        weight=sd[f"{p}.norm2.weight"], bias=sd[f"{p}.norm2.bias"], eps=1e-5)
    return F.leaky_relu(y + F.conv2d(x, sd[f"{p}.conv3.weight"], sd[f"{p}.conv3.bias"]), 0.01)


def official_umamba_decoder_2d(skips, sd):
    """UNetResDecoder.forward of UMambaBot_2d.py: no concatenation in the last stage."""
    n = len(skips)
    x = skips[-1]
    for s in range(n - 1):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.conv2d(x, sd[f"decoder.upsample_layers.{s}.conv.weight"], sd[f"decoder.upsample_layers.{s}.conv.bias"])
        if s < n - 2:
            x = torch.cat((x, skips[-(s + 2)]), 1)
        x = _official_res_block(x, sd, f"decoder.stages.{s}.0")
    return F.conv2d(x, sd[f"decoder.seg_layers.{n - 2}.weight"], sd[f"decoder.seg_layers.{n - 2}.bias"])


def test_umamba_2d_checkpoint_converts_and_matches_official_decoder(tmp_path):
    g = torch.Generator().manual_seed(3)
    feats, classes = [4, 8, 16], 3
    sd = _official_state(official_umamba_bot_2d_keys(1, feats, classes), g)
    ckpt = {"network_weights": sd, "trainer_name": "nnUNetTrainerUMambaBot"}
    conv = convert("umamba", ckpt, "umamba_bot")
    assert conv.net_kwargs["concat_full_resolution_skip"] is False
    net = nets.create("umamba_bot", 1, classes, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    x = torch.randn(1, 1, 16, 16, generator=g)
    with torch.no_grad():
        skips = net.encoder(x)
        skips[-1] = net.mamba_layer(skips[-1])
        ref = official_umamba_decoder_2d(skips, sd)
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)
    # the default 2D network has the published shapes (the old one concatenated: 2 C0 inputs)
    assert nets.create("umamba_bot", 1, 2, 2).decoder.stages[-1][0].conv1.in_channels == 32
    assert nets.create("umamba_bot", 1, 2, 3, features_per_stage=[4, 8]).decoder.stages[-1][0].conv1.in_channels == 8
    out = save(conv, tmp_path / "w.pth")
    assert torch.load(out, weights_only=False)["network_weights"].keys() == net.state_dict().keys()


def test_umamba_converter_errors():
    g = torch.Generator().manual_seed(4)
    sd = _official_state(official_umamba_bot_2d_keys(1, [4, 8], 2), g)
    with pytest.raises(CheckpointError, match="use --arch umamba_bot"):
        convert("umamba", {"network_weights": sd}, "umamba_enc")
    broken = {k: v for k, v in sd.items() if k != "decoder.stages.0.0.conv2.weight"}
    with pytest.raises(CheckpointError, match=r"Missing in the checkpoint \(1\): decoder\.stages\.0\.0\.conv2\.weight"):
        convert("umamba", {"network_weights": broken}, "umamba_bot")
    with pytest.raises(CheckpointError, match="not a U-Mamba"):
        convert("umamba", {"network_weights": {"convInit.0.conv.weight": torch.zeros(1)}}, "umamba_bot")


# ------------------------------------------------------------------------------------------------
# LightM-UNet
# ------------------------------------------------------------------------------------------------

def official_lightm_unet_keys(cin, f, classes, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dims=3):
    """LightMUNet.py (nnU-Net fork @ d2bed4a0): key -> shape."""
    k3, k1 = (3,) * dims, (1,) * dims
    keys = {"convInit.0.conv.weight": (cin, 1, *k3), "convInit.1.conv.weight": (f, cin, *k1)}

    def rvm(p, c_in, c_out):
        keys.update({k.replace("XX", p): v for k, v in _mamba_keys("XX", c_in).items()})
        keys.update({f"{p}.proj.weight": (c_out, c_in), f"{p}.proj.bias": (c_out,), f"{p}.skip_scale": (1,)})

    for i, n in enumerate(blocks_down):
        c = f * 2 ** i
        if i > 0:
            rvm(f"down_layers.{i}.0.0", c // 2, c)
        for j in range(1, n + 1):
            p = f"down_layers.{i}.{j}"
            keys.update({f"{p}.norm1.weight": (c,), f"{p}.norm1.bias": (c,), f"{p}.norm2.weight": (c,),
                         f"{p}.norm2.bias": (c,)})
            rvm(f"{p}.conv1", c, c)
            rvm(f"{p}.conv2", c, c)
    n_up = len(blocks_up)
    for i in range(n_up):
        c = f * 2 ** (n_up - i)
        keys[f"up_samples.{i}.0.conv.weight"] = (c // 2, c, *k1)
        for j in range(blocks_up[i]):
            p = f"up_layers.{i}.{j}"
            keys.update({f"{p}.norm1.weight": (c // 2,), f"{p}.norm1.bias": (c // 2,), f"{p}.norm2.weight": (c // 2,),
                         f"{p}.norm2.bias": (c // 2,), f"{p}.conv.0.conv.weight": (c // 2, 1, *k3),
                         f"{p}.conv.1.conv.weight": (c // 2, c // 2, *k1), f"{p}.skip_scale": (1,)})
    keys.update({"conv_final.0.weight": (f,), "conv_final.0.bias": (f,),
                 "conv_final.2.0.conv.weight": (f, 1, *k1), "conv_final.2.0.conv.bias": (f,),
                 "conv_final.2.1.conv.weight": (classes, f, *k1), "conv_final.2.1.conv.bias": (classes,)})
    return keys


def test_lightm_unet_checkpoint_converts_with_key_map():
    g = torch.Generator().manual_seed(5)
    keys = official_lightm_unet_keys(1, 8, 2, blocks_down=(1, 1, 2), blocks_up=(1, 1), dims=2)
    sd = _official_state(keys, g)
    conv = convert("lightm_unet", {"network_weights": sd}, "lightm_unet")
    net = nets.create("lightm_unet", 1, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    torch.testing.assert_close(mine["encoder.stem.depthwise.weight"], sd["convInit.0.conv.weight"])
    torch.testing.assert_close(mine["encoder.levels.0.0.conv2.proj.weight"], sd["down_layers.0.1.conv2.proj.weight"])
    torch.testing.assert_close(mine["encoder.levels.1.0.mamba.A_log"], sd["down_layers.1.0.0.mamba.A_log"])
    torch.testing.assert_close(mine["encoder.levels.2.3.norm1.weight"], sd["down_layers.2.2.norm1.weight"])
    torch.testing.assert_close(mine["decoder.head.2.pointwise.bias"], sd["conv_final.2.1.conv.bias"])
    # every official tensor placed exactly once
    assert sum(1 for k in mine if not k.startswith("decoder.ds_heads.")) == len(sd)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 16, generator=g)).shape == (1, 2, 16, 16)


# ------------------------------------------------------------------------------------------------
# Swin-UMamba and VMamba ImageNet weights
# ------------------------------------------------------------------------------------------------

_TINY = dict(feature_size=8, dims=[8, 16], depths=[1, 1], drop_path_rate=0.0)


def _vss_keys(prefix, c, n_routes=4):
    e, r = 2 * c, math.ceil(c / 16)
    return {f"{prefix}.ln_1.weight": (c,), f"{prefix}.ln_1.bias": (c,),
            f"{prefix}.self_attention.in_proj.weight": (2 * e, c),
            f"{prefix}.self_attention.conv2d.weight": (e, 1, 3, 3), f"{prefix}.self_attention.conv2d.bias": (e,),
            f"{prefix}.self_attention.x_proj_weight": (n_routes, r + 32, e),
            f"{prefix}.self_attention.dt_projs_weight": (n_routes, e, r),
            f"{prefix}.self_attention.dt_projs_bias": (n_routes, e),
            f"{prefix}.self_attention.A_logs": (n_routes * e, 16), f"{prefix}.self_attention.Ds": (n_routes * e,),
            f"{prefix}.self_attention.out_norm.weight": (e,), f"{prefix}.self_attention.out_norm.bias": (e,),
            f"{prefix}.self_attention.out_proj.weight": (c, e)}


def official_vmamba_imagenet_keys(dims, depths):
    """VMamba v0 classification model ('model' of vssm tiny): patch_embed, layers.i.blocks/downsample, head."""
    keys = {"patch_embed.proj.weight": (dims[0], 3, 4, 4), "patch_embed.proj.bias": (dims[0],),
            "patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_vss_keys(f"layers.{i}.blocks.{j}", c))
        if i < len(dims) - 1:
            keys.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                         f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
    keys.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],), "head.weight": (1000, dims[-1]),
                 "head.bias": (1000,)})
    return keys


def _unetr_basic(p, cin, cout):
    """MONAI UnetResBlock as used by Swin-UMamba: norm 'instance' has no affine parameters; the 1x1
    shortcut conv3 exists only when the widths differ (stride 1)."""
    keys = {f"{p}.layer.conv1.conv.weight": (cout, cin, 3, 3), f"{p}.layer.conv2.conv.weight": (cout, cout, 3, 3)}
    if cin != cout:
        keys[f"{p}.layer.conv3.conv.weight"] = (cout, cin, 1, 1)
    return keys


def official_swin_umamba_keys(cin, classes, feat, dims, depths):
    """SwinUMamba.py (nnU-Net fork): stem, vssm_encoder, encoder1..5, decoder6..1, out_layers."""
    keys = {"stem.0.weight": (feat, cin, 7, 7), "stem.0.bias": (feat,), "stem.1.weight": (feat,),
            "stem.1.bias": (feat,), "vssm_encoder.patch_embed.proj.weight": (dims[0], feat, 2, 2),
            "vssm_encoder.patch_embed.proj.bias": (dims[0],), "vssm_encoder.patch_embed.norm.weight": (dims[0],),
            "vssm_encoder.patch_embed.norm.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_vss_keys(f"vssm_encoder.layers.{i}.blocks.{j}", c))
        if i < len(dims) - 1:
            keys.update({f"vssm_encoder.downsamples.{i}.reduction.weight": (2 * c, 4 * c),
                         f"vssm_encoder.downsamples.{i}.norm.weight": (4 * c,),
                         f"vssm_encoder.downsamples.{i}.norm.bias": (4 * c,)})
    fs = [feat] + list(dims)  # feat_size
    keys.update(_unetr_basic("encoder1", cin, fs[0]))
    for k in range(2, len(fs) + 1):
        keys.update(_unetr_basic(f"encoder{k}", fs[k - 2], fs[k - 1]))
    n = len(fs)  # decoder{n+1} .. decoder2 are up blocks, decoder1 a basic block
    for k in range(n + 1, 1, -1):
        cin_up = fs[-1] if k == n + 1 else fs[k - 1]
        cout = fs[k - 2]
        keys[f"decoder{k}.transp_conv.conv.weight"] = (cin_up, cout, 2, 2)
        keys.update({kk.replace(f"decoder{k}.layer", f"decoder{k}.conv_block"): vv
                     for kk, vv in _unetr_basic(f"decoder{k}", 2 * cout, cout).items()})
    keys.update({k.replace("decoder1.layer", "decoder1.layer"): v for k, v in _unetr_basic("decoder1", fs[0], fs[0]).items()})
    for i in range(4 if n >= 4 else n):
        keys[f"out_layers.{i}.conv.conv.weight"] = (classes, fs[i], 1, 1)
        keys[f"out_layers.{i}.conv.conv.bias"] = (classes,)
    return keys


def test_swin_umamba_checkpoint_converts_2d_and_inflates_3d():
    g = torch.Generator().manual_seed(6)
    keys = official_swin_umamba_keys(1, 2, _TINY["feature_size"], _TINY["dims"], _TINY["depths"])
    sd = _official_state(keys, g)
    kw = {"drop_path_rate": 0.0}
    conv = convert("swin_umamba", {"network_weights": sd}, "swin_umamba", net_kwargs=kw)
    net = nets.create("swin_umamba", 1, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    assert len(mine) == len(sd)
    torch.testing.assert_close(mine["encoder.layers.1.blocks.0.mixer.conv.weight"],
                               sd["vssm_encoder.layers.1.blocks.0.self_attention.conv2d.weight"])
    torch.testing.assert_close(mine["decoder.ups.2.transp_conv.conv.weight"], sd["decoder4.transp_conv.conv.weight"])
    # the merging layer computes the official concat order from the official tensors
    x = torch.randn(1, 4, 4, 8, generator=g)
    ref = official_patch_merging_2d(x, sd["vssm_encoder.downsamples.0.norm.weight"],
                                    sd["vssm_encoder.downsamples.0.norm.bias"],
                                    sd["vssm_encoder.downsamples.0.reduction.weight"])
    torch.testing.assert_close(net.encoder.downsamples[0](x), ref)
    conv3 = convert("swin_umamba", {"network_weights": sd}, "swin_umamba", spatial_dims=3, net_kwargs=kw)
    net3 = nets.create("swin_umamba", 1, 2, 3, **conv3.net_kwargs)
    net3.load_state_dict(conv3.state_dict, strict=True)
    assert conv3.state_dict["encoder.layers.0.blocks.0.mixer.x_proj_weight"].shape[0] == 6


def test_vmamba_imagenet_weights_into_swin_umamba():
    g = torch.Generator().manual_seed(7)
    sd = _official_state(official_vmamba_imagenet_keys(_TINY["dims"], _TINY["depths"]), g)
    kw = {"feature_size": 8, "drop_path_rate": 0.0}
    conv = convert("vmamba", {"model": sd}, "swin_umamba", net_kwargs=kw, in_channels=1, out_channels=3)
    net = nets.create("swin_umamba", 1, 3, 2, **conv.net_kwargs)
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    torch.testing.assert_close(mine["encoder.downsamples.0.reduction.weight"], sd["layers.0.downsample.reduction.weight"])
    torch.testing.assert_close(mine["encoder.layers.1.blocks.0.mixer.A_logs"], sd["layers.1.blocks.0.self_attention.A_logs"])
    # as Swin-UMamba's load_pretrained_ckpt: norm.bias loaded, norm.weight (skip list) and the 4x4 proj not
    torch.testing.assert_close(mine["encoder.patch_embed.norm.bias"], sd["patch_embed.norm.bias"])
    assert not torch.equal(mine["encoder.patch_embed.norm.weight"], sd["patch_embed.norm.weight"])
    conv3 = convert("vmamba", {"model": sd}, "swin_umamba", spatial_dims=3, net_kwargs=kw)
    net3 = nets.create("swin_umamba", 1, 2, 3, **conv3.net_kwargs)
    net3.load_state_dict(conv3.state_dict, strict=True)
    with pytest.raises(CheckpointError, match="layers.0.blocks.0.ln_1.weight"):
        convert("vmamba", {"model": {"stem.0.weight": torch.zeros(1)}}, "swin_umamba")


# ------------------------------------------------------------------------------------------------
# MambaMIM light decoder
# ------------------------------------------------------------------------------------------------

def test_mambamim_light_decoder_concatenates_like_official():
    from medmamba.pretrain.model import LightDecoder
    torch.manual_seed(8)
    dec = LightDecoder([4, 8, 16], [(1, 1, 1), (2, 2, 2), (4, 4, 4)], 1, width=64).eval()
    assert dec.used_levels == [1, 2] and dec.widths == [16, 32, 64]
    dense = [None, torch.randn(1, 32, 4, 4, 4), torch.randn(1, 64, 2, 2, 2)]

    def block(seq, x):  # official UNetBlock.conv / FusionBlock.conv: conv-BN-ReLU x2
        return seq(x)

    with torch.no_grad():
        # official LightDecoder.forward: x = to_dec[0]; x = dec[0](x); x = fuse[1](cat(x, to_dec[1])); x = dec[1](x)
        x = dense[2]
        x = block(dec.blocks[1], dec.ups[1](x))
        x = block(dec.fuses[1], torch.cat((x, dense[1]), 1))
        x = block(dec.blocks[0], dec.ups[0](x))
        ref = dec.head(x)
        torch.testing.assert_close(dec(dense), ref)
    assert dec.ups[1].in_channels == dec.ups[1].out_channels == 64  # ConvTranspose3d(cin, cin)
    assert dec.fuses[1][0].in_channels == 64 and dec.blocks[0][0].out_channels == 16


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medmamba", "weights", "import", *args],
                          capture_output=True, text=True)


def test_cli_import_overwrite_and_corrupt(tmp_path):
    g = torch.Generator().manual_seed(9)
    ck = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": _official_state(official_umamba_bot_2d_keys(1, [4, 8], 2), g)}, ck)
    out = tmp_path / "out.pth"
    r = _cli("--from", "umamba", str(ck), "--arch", "umamba_bot", str(out))
    assert r.returncode == 0, r.stderr
    assert "network_weights" in torch.load(out, weights_only=False)
    r = _cli("--from", "umamba", str(ck), "--arch", "umamba_bot", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert _cli("--from", "umamba", str(ck), "--arch", "umamba_bot", str(out), "--overwrite").returncode == 0
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    r = _cli("--from", "umamba", str(bad), "--arch", "umamba_bot", str(tmp_path / "x.pth"))
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.pth").exists()
    r = _cli("--from", "lightm_unet", str(ck), "--arch", "lightm_unet", str(tmp_path / "y.pth"))
    assert r.returncode == 2 and "convInit.0.conv.weight" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------
# MSVM-UNet (gndlwch2w/msvm-unet @ 52e3474f: model/__init__.py MSVMUNet(encoder, decoder); model/encoder.py
# Encoder(layer0 = patch_embed[0:5], layer1 = patch_embed[5:8], layers, downsamples); model/decoder.py
# Decoder(layers = UpBlock(up: LKPE, concat_layer: Linear2d, vss_layer: MSVSS.blocks), out_layers.0: FLKPE);
# model/vmamba/vmamba.py VSSBlock(norm, op: SS2D v05_noz, norm2, mlp), Linear2d weight (out, in), LayerNorm2d)
# ------------------------------------------------------------------------------------------------

def _msvm_block_keys(p, c, n_state=1, ratio=4, ms=False):
    r = math.ceil(c / 16)
    keys = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,),
            f"{p}.op.in_proj.weight": (c, c),  # Linear2d, d_inner = C (ssm_ratio 1), no z (v05_noz), no bias
            f"{p}.op.conv2d.weight": (c, 1, 3, 3),  # ssm_conv_bias False
            f"{p}.op.x_proj_weight": (4, r + 2 * n_state, c), f"{p}.op.dt_projs_weight": (4, c, r),
            f"{p}.op.dt_projs_bias": (4, c), f"{p}.op.A_logs": (4 * c, n_state), f"{p}.op.Ds": (4 * c,),
            f"{p}.op.out_norm.weight": (c,), f"{p}.op.out_norm.bias": (c,), f"{p}.op.out_proj.weight": (c, c),
            f"{p}.norm2.weight": (c,), f"{p}.norm2.bias": (c,),
            f"{p}.mlp.fc1.weight": (ratio * c, c), f"{p}.mlp.fc1.bias": (ratio * c,),
            f"{p}.mlp.fc2.weight": (c, ratio * c), f"{p}.mlp.fc2.bias": (c,)}
    if ms:  # MS_MLP.multiscale_conv: depthwise k 1, 3, 5 without bias
        keys.update({f"{p}.mlp.multiscale_conv.dw_convs.{i}.weight": (ratio * c, 1, k, k)
                     for i, k in enumerate((1, 3, 5))})
    return keys


def _lkpe_keys(p, c_in, hidden, c_norm):
    return {f"{p}.expand.0.weight": (hidden, c_in, 1, 1), f"{p}.expand.0.bias": (hidden,),
            f"{p}.expand.1.weight": (hidden,), f"{p}.expand.1.bias": (hidden,), f"{p}.expand.1.running_mean": (hidden,),
            f"{p}.expand.1.running_var": (hidden,), f"{p}.expand.1.num_batches_tracked": (),
            f"{p}.expand.3.weight": (hidden, 1, 3, 3), f"{p}.expand.3.bias": (hidden,),
            f"{p}.norm.weight": (c_norm,), f"{p}.norm.bias": (c_norm,)}


def official_msvm_unet_keys(cin, classes, dims, depths, dec_depths):
    half = dims[0] // 2
    keys = {"encoder.layer0.0.weight": (half, cin, 3, 3), "encoder.layer0.0.bias": (half,),
            "encoder.layer0.2.weight": (half,), "encoder.layer0.2.bias": (half,),
            "encoder.layer1.0.weight": (dims[0], half, 3, 3), "encoder.layer1.0.bias": (dims[0],),
            "encoder.layer1.2.weight": (dims[0],), "encoder.layer1.2.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_msvm_block_keys(f"encoder.layers.{i}.blocks.{j}", c))
        if i < len(dims) - 1:  # _make_downsample_v3: (Identity, conv 3 s2, Identity, LN2d); the last is Identity
            keys.update({f"encoder.downsamples.{i}.1.weight": (dims[i + 1], c, 3, 3),
                         f"encoder.downsamples.{i}.1.bias": (dims[i + 1],),
                         f"encoder.downsamples.{i}.3.weight": (dims[i + 1],),
                         f"encoder.downsamples.{i}.3.bias": (dims[i + 1],)})
    rd = dims[::-1]
    for k in range(len(dims) - 1):
        cin_k, cout = rd[k], rd[k + 1]
        keys.update(_lkpe_keys(f"decoder.layers.{k}.up", cin_k, 2 * cin_k, cin_k // 2))
        keys.update({f"decoder.layers.{k}.concat_layer.weight": (cout, 2 * cout),
                     f"decoder.layers.{k}.concat_layer.bias": (cout,)})
        for j in range(dec_depths[k]):
            keys.update(_msvm_block_keys(f"decoder.layers.{k}.vss_layer.blocks.{j}", cout, ms=True))
    keys.update(_lkpe_keys("decoder.out_layers.0", dims[0], 16 * dims[0], dims[0]))
    keys.update({"decoder.out_layers.0.out.weight": (classes, dims[0], 1, 1), "decoder.out_layers.0.out.bias": (classes,)})
    return keys


def _official_state2(keys, g):
    sd = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith(("A_logs", "A_log")):
            sd[k] = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1) + _rand(shape, g)
        elif k.endswith(("running_var", ".Ds")) or re.search(r"norm\d?\.weight$|\.2\.weight$|\.1\.weight$", k) and len(shape) == 1:
            sd[k] = 1 + _rand(shape, g)
        else:
            sd[k] = _rand(shape, g)
    return sd


def _official_cross_scan_2d(x, xw, dtw, dtb, alogs, ds):
    """VMamba SS2D core (v0/v2 order): routes row-major, column-major and both flipped, per-route
    x_proj / dt_proj / A / D, outputs put back and summed. x: (B, D, H, W) -> (B, D, H, W)."""
    from medmamba.kernels.reference import selective_scan_ref
    b, d, h, w = x.shape
    n = alogs.shape[1]
    r = dtw.shape[2]
    row, col = x.flatten(2), x.transpose(2, 3).flatten(2)
    xs = torch.stack([row, col, row.flip(-1), col.flip(-1)], 1)  # (B, 4, D, L)
    ys = []
    for k in range(4):
        dbl = torch.einsum("bdl,cd->bcl", xs[:, k], xw[k])
        dt, bb, cc = dbl.split([r, n, n], 1)
        dt = torch.einsum("brl,dr->bdl", dt, dtw[k])
        ys.append(selective_scan_ref(xs[:, k], dt, -torch.exp(alogs.view(4, d, n)[k]), bb, cc, ds.view(4, d)[k],
                                     delta_bias=dtb[k], delta_softplus=True))
    y0, y1, y2, y3 = ys
    back_col = lambda t: t.view(b, d, w, h).transpose(2, 3).reshape(b, d, h * w)
    return (y0 + y2.flip(-1) + back_col(y1) + back_col(y3.flip(-1))).view(b, d, h, w)


def official_msvm_vss_block(x, sd, p, ms=False):
    """VMamba-v2 VSSBlock, channels-first (ln2d / Linear2d), forward type v05_noz, from the official tensors."""
    ln2d = lambda t, q: F.layer_norm(t.movedim(1, -1), (t.shape[1],), sd[f"{q}.weight"], sd[f"{q}.bias"], 1e-5).movedim(-1, 1)
    lin2d = lambda t, q, bias=True: F.conv2d(t, sd[f"{q}.weight"][:, :, None, None], sd.get(f"{q}.bias") if bias else None)
    h = ln2d(x, f"{p}.norm")
    h = lin2d(h, f"{p}.op.in_proj", bias=False)
    h = F.silu(F.conv2d(h, sd[f"{p}.op.conv2d.weight"], padding=1, groups=h.shape[1]))
    h = _official_cross_scan_2d(h, sd[f"{p}.op.x_proj_weight"], sd[f"{p}.op.dt_projs_weight"],
                                sd[f"{p}.op.dt_projs_bias"], sd[f"{p}.op.A_logs"], sd[f"{p}.op.Ds"])
    h = lin2d(ln2d(h, f"{p}.op.out_norm"), f"{p}.op.out_proj", bias=False)
    x = x + h
    h = F.gelu(lin2d(ln2d(x, f"{p}.norm2"), f"{p}.mlp.fc1"))
    if ms:
        h = h + sum(F.conv2d(h, sd[f"{p}.mlp.multiscale_conv.dw_convs.{i}.weight"], padding=k // 2, groups=h.shape[1])
                    for i, k in enumerate((1, 3, 5)))
    return x + lin2d(h, f"{p}.mlp.fc2")


def test_msvm_unet_checkpoint_converts_and_blocks_match_official():
    g = torch.Generator().manual_seed(10)
    dims, depths, dec = [8, 16], [1, 2], [1]
    keys = official_msvm_unet_keys(3, 2, dims, depths, dec)
    sd = _official_state2(keys, g)
    conv = convert("msvm_unet", sd, "msvm_unet", net_kwargs={"drop_path_rate": 0.0})
    assert conv.net_kwargs["dims"] == dims and conv.net_kwargs["depths"] == depths
    assert conv.net_kwargs["decoder_depths"] == dec and conv.net_kwargs["d_state"] == 1
    net = nets.create("msvm_unet", 3, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    # every official tensor placed exactly once; only our deep-supervision head is extra
    assert sorted(k for k in mine if not k.startswith("decoder.seg_layers.1.")) == \
        sorted(__import__("medmamba.weights.convert", fromlist=["x"]).msvm_unet_key(k) for k in sd)
    for ours, off in [("encoder.stem.0.weight", "encoder.layer0.0.weight"), ("encoder.stem.1.bias", "encoder.layer0.2.bias"),
                      ("encoder.stem.3.weight", "encoder.layer1.0.weight"), ("encoder.stem.4.weight", "encoder.layer1.2.weight"),
                      ("encoder.downsamples.0.conv.weight", "encoder.downsamples.0.1.weight"),
                      ("encoder.downsamples.0.norm.bias", "encoder.downsamples.0.3.bias"),
                      ("encoder.stages.1.1.mixer.A_logs", "encoder.layers.1.blocks.1.op.A_logs"),
                      ("decoder.up_blocks.0.up.expand.1.running_var", "decoder.layers.0.up.expand.1.running_var"),
                      ("decoder.up_blocks.0.concat.weight", "decoder.layers.0.concat_layer.weight"),
                      ("decoder.up_blocks.0.blocks.0.ffn.ms_conv.dw_convs.2.weight",
                       "decoder.layers.0.vss_layer.blocks.0.mlp.multiscale_conv.dw_convs.2.weight"),
                      ("decoder.final.steps.0.expand.3.weight", "decoder.out_layers.0.expand.3.weight"),
                      ("decoder.seg_layers.0.weight", "decoder.out_layers.0.out.weight")]:
        assert torch.equal(mine[ours], sd[off]), ours
    assert int(mine["decoder.final.steps.0.expand.1.num_batches_tracked"]) == 7
    with torch.no_grad():
        x = torch.randn(1, 16, 4, 4, generator=g) * 0.5  # channels-first, as the official blocks run
        torch.testing.assert_close(net.encoder.stages[1][1](x.movedim(1, -1)).movedim(-1, 1),
                                   official_msvm_vss_block(x, sd, "encoder.layers.1.blocks.1"), rtol=1e-4, atol=1e-5)
        xd = x[:, :8]
        torch.testing.assert_close(net.decoder.up_blocks[0].blocks[0](xd.movedim(1, -1)).movedim(-1, 1),
                                   official_msvm_vss_block(xd, sd, "decoder.layers.0.vss_layer.blocks.0", ms=True),
                                   rtol=1e-4, atol=1e-5)
        # the stem: conv - LN2d - GELU - conv - LN2d
        img = torch.randn(1, 3, 32, 32, generator=g)
        ln2d = lambda t, q: F.layer_norm(t.movedim(1, -1), (t.shape[1],), sd[f"{q}.weight"], sd[f"{q}.bias"]).movedim(-1, 1)
        ref = F.conv2d(img, sd["encoder.layer0.0.weight"], sd["encoder.layer0.0.bias"], stride=2, padding=1)
        ref = F.conv2d(F.gelu(ln2d(ref, "encoder.layer0.2")), sd["encoder.layer1.0.weight"], sd["encoder.layer1.0.bias"],
                       stride=2, padding=1)
        torch.testing.assert_close(net.encoder.stem(img), ln2d(ref, "encoder.layer1.2"))
        assert net(img).shape == (1, 2, 32, 32)
    # Linear2d weights saved as (out, in, 1, 1) are accepted too
    sd4 = dict(sd, **{"decoder.layers.0.concat_layer.weight": sd["decoder.layers.0.concat_layer.weight"][:, :, None, None]})
    conv4 = convert("msvm_unet", {"model": sd4}, "msvm_unet", net_kwargs={"drop_path_rate": 0.0})
    assert torch.equal(conv4.state_dict["decoder.up_blocks.0.concat.weight"], sd["decoder.layers.0.concat_layer.weight"])


def test_msvm_unet_converter_errors():
    g = torch.Generator().manual_seed(11)
    sd = _official_state2(official_msvm_unet_keys(3, 2, [8, 16], [1, 1], [1]), g)
    broken = {k: v for k, v in sd.items() if k != "encoder.layers.0.blocks.0.op.Ds"}
    with pytest.raises(CheckpointError, match=r"Missing in the checkpoint \(1\): encoder\.layers\.0\.blocks\.0\.op\.Ds"):
        convert("msvm_unet", broken, "msvm_unet")
    extra = dict(sd, **{"encoder.layers.0.blocks.0.op.x_proj_bias": torch.zeros(4, 3)})
    with pytest.raises(CheckpointError, match=r"no counterpart in msvm_unet: encoder\.layers\.0\.blocks\.0\.op\.x_proj_bias"):
        convert("msvm_unet", extra, "msvm_unet")
    with pytest.raises(CheckpointError, match="inflate must be"):
        convert("msvm_unet", sd, "msvm_unet", spatial_dims=3, inflate="nearest")
    with pytest.raises(CheckpointError, match="encoder.layer0.0.weight"):
        convert("msvm_unet", {"model": {"layers.0.weight": torch.zeros(1)}}, "msvm_unet")


# ------------------------------------------------------------------------------------------------
# MHS-VM (PixDeep/MHS-VM: models/vmunet/vmamba.py @ 77508281 VSSM(patch_embed, layers[i].blocks/downsample,
# layers_up[i].upsample/blocks, final_up, final_conv), VSSBlock(ln_1, self_attention = VSSGate);
# models/vmunet/mhsm.py (.ipynb_checkpoints/mhsm-checkpoint.py @ 3e4241e9) VSSGate(in_proj, conv2d, mhs, out_norm),
# MHSM(x_ssproj + its alias x_ssproj_W, scanhead_C/X/S[/Z].mambaeng: x_proj_weight (4, R + 2N, d_sub),
# dt_projs_weight (4, d_sub, R), dt_projs_bias (4, d_sub), A_logs (4 d_sub, N), Ds (4 d_sub), cat_norm, y_proj)
# ------------------------------------------------------------------------------------------------

def _mhs_block_keys(p, c, heads, n=16):
    ds = c // heads
    r = math.ceil(ds / 16)
    keys = {f"{p}.ln_1.weight": (c,), f"{p}.ln_1.bias": (c,), f"{p}.self_attention.in_proj.weight": (2 * c, c),
            f"{p}.self_attention.conv2d.weight": (c, 1, 3, 3), f"{p}.self_attention.conv2d.bias": (c,),
            f"{p}.self_attention.mhs.x_ssproj.weight": (heads * ds, c), f"{p}.self_attention.mhs.x_ssproj_W": (heads * ds, c),
            f"{p}.self_attention.mhs.cat_norm.weight": (heads * ds,), f"{p}.self_attention.mhs.cat_norm.bias": (heads * ds,),
            f"{p}.self_attention.mhs.y_proj.weight": (c, heads * ds),
            f"{p}.self_attention.out_norm.weight": (c,), f"{p}.self_attention.out_norm.bias": (c,)}
    for h in "CXSZ"[:heads]:
        q = f"{p}.self_attention.mhs.scanhead_{h}.mambaeng"
        keys.update({f"{q}.x_proj_weight": (4, r + 2 * n, ds), f"{q}.dt_projs_weight": (4, ds, r),
                     f"{q}.dt_projs_bias": (4, ds), f"{q}.A_logs": (4 * ds, n), f"{q}.Ds": (4 * ds,)})
    return keys


def official_mhs_vm_keys(cin, classes, dims, depths, dec_depths, heads):
    keys = {"vmunet.patch_embed.proj.weight": (dims[0], cin, 4, 4), "vmunet.patch_embed.proj.bias": (dims[0],),
            "vmunet.patch_embed.norm.weight": (dims[0],), "vmunet.patch_embed.norm.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_mhs_block_keys(f"vmunet.layers.{i}.blocks.{j}", c, heads))
        if i < len(dims) - 1:
            keys.update({f"vmunet.layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                         f"vmunet.layers.{i}.downsample.norm.weight": (4 * c,),
                         f"vmunet.layers.{i}.downsample.norm.bias": (4 * c,)})
    rd = dims[::-1]
    for i, (c, d) in enumerate(zip(rd, dec_depths)):
        if i > 0:  # PatchExpand2D(dim=c): Linear(2c, 4c), LN(c)
            keys.update({f"vmunet.layers_up.{i}.upsample.expand.weight": (4 * c, 2 * c),
                         f"vmunet.layers_up.{i}.upsample.norm.weight": (c,),
                         f"vmunet.layers_up.{i}.upsample.norm.bias": (c,)})
        for j in range(d):
            keys.update(_mhs_block_keys(f"vmunet.layers_up.{i}.blocks.{j}", c, heads))
    keys.update({"vmunet.final_up.expand.weight": (4 * dims[0], dims[0]), "vmunet.final_up.norm.weight": (dims[0] // 4,),
                 "vmunet.final_up.norm.bias": (dims[0] // 4,), "vmunet.final_conv.weight": (classes, dims[0] // 4, 1, 1),
                 "vmunet.final_conv.bias": (classes,)})
    return keys


def _mhs_state(keys, g):
    sd = _official_state2({k: v for k, v in keys.items() if not k.endswith("x_ssproj_W")}, g)
    for k in keys:
        if k.endswith("x_ssproj_W"):
            sd[k] = sd[k[:-len("x_ssproj_W")] + "x_ssproj.weight"]
    return sd


def official_vss_gate(x, sd, p, families, t):
    """MHS-VM VSSBlock (ln_1 + VSSGate) from the official tensors: MHSM heads C, X, S[, Z] each scanning
    [r0, flip r0, r1, flip r1] with their MambaEngine, GFU fusion, concat, cat_norm, y_proj."""
    from medmamba.kernels.reference import selective_scan_ref
    from medmamba.layers.scan_routes import MHS_FAMILIES
    b, hh, ww, c = x.shape
    a = f"{p}.self_attention"
    h = F.layer_norm(x, (c,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
    xz = h @ sd[f"{a}.in_proj.weight"].t()
    u, z = xz.chunk(2, -1)
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), sd[f"{a}.conv2d.weight"], sd[f"{a}.conv2d.bias"], padding=1, groups=c))
    sub = torch.einsum("bdhw,cd->bchw", u, sd[f"{a}.mhs.x_ssproj.weight"])
    heads = len(families)
    ds = c // heads
    outs = []
    for k, (letter, fam) in enumerate(zip("CXSZ", families)):
        q = f"{a}.mhs.scanhead_{letter}.mambaeng"
        xk = sub[:, k * ds:(k + 1) * ds].flatten(2)
        r0, r1 = (route_permutation((hh, ww), r) for r in MHS_FAMILIES[fam])
        perms = [r0, r0.flip(0), r1, r1.flip(0)]
        n = sd[f"{q}.A_logs"].shape[1]
        rank = sd[f"{q}.dt_projs_weight"].shape[2]
        ys = []
        for i, perm in enumerate(perms):
            xs = xk[..., perm]
            dbl = torch.einsum("bdl,cd->bcl", xs, sd[f"{q}.x_proj_weight"][i])
            dt, bb, cc = dbl.split([rank, n, n], 1)
            dt = torch.einsum("brl,dr->bdl", dt, sd[f"{q}.dt_projs_weight"][i])
            y = selective_scan_ref(xs, dt, -torch.exp(sd[f"{q}.A_logs"].view(4, ds, n)[i]), bb, cc,
                                   sd[f"{q}.Ds"].view(4, ds)[i], delta_bias=sd[f"{q}.dt_projs_bias"][i],
                                   delta_softplus=True)
            back = torch.empty_like(y)
            back[..., perm] = y
            ys.append(back)
        ys = torch.stack(ys, 1)  # GFU over the 4 routes
        cv = ys.std(1) / ((ys - ys.min(1, keepdim=True).values).mean(1) + 1e-5)
        outs.append(ys.sum(1) * F.relu(cv - t))
    y = torch.cat(outs, 1).transpose(1, 2)
    y = F.layer_norm(y, (y.shape[-1],), sd[f"{a}.mhs.cat_norm.weight"], sd[f"{a}.mhs.cat_norm.bias"])
    y = (y @ sd[f"{a}.mhs.y_proj.weight"].t()).view(b, hh, ww, c)
    y = F.layer_norm(y, (c,), sd[f"{a}.out_norm.weight"], sd[f"{a}.out_norm.bias"]) * F.silu(z)
    return x + y


@pytest.mark.parametrize("heads", [3, 4])
def test_mhs_vm_checkpoint_converts_and_block_matches_official(heads):
    g = torch.Generator().manual_seed(12)
    dims, depths, dec = [24, 48], [1, 1], [1, 1]
    sd = _mhs_state(official_mhs_vm_keys(3, 2, dims, depths, dec, heads), g)
    conv = convert("mhs_vm", {"model": sd}, "vm_unet_mhs", net_kwargs={"drop_path_rate": 0.0, "threshold": 0.3})
    assert conv.net_kwargs["num_heads"] == heads and conv.net_kwargs["dims"] == dims
    net = nets.create("vm_unet_mhs", 3, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    q = "vmunet.layers.1.blocks.0.self_attention.mhs"
    for k, letter in enumerate("CXSZ"[:heads]):
        for i in range(4):  # our sequence s = head * 4 + route
            assert torch.equal(mine["encoder.stages.1.blocks.0.mixer.mhs.x_proj_weight"][4 * k + i],
                               sd[f"{q}.scanhead_{letter}.mambaeng.x_proj_weight"][i])
        ds = 48 // heads
        assert torch.equal(mine["encoder.stages.1.blocks.0.mixer.mhs.A_logs"][4 * ds * k:4 * ds * (k + 1)],
                           sd[f"{q}.scanhead_{letter}.mambaeng.A_logs"])
    for ours, off in [("encoder.stages.1.blocks.0.mixer.mhs.in_proj.weight", f"{q}.x_ssproj.weight"),
                      ("encoder.stages.1.blocks.0.mixer.mhs.out_norm.bias", f"{q}.cat_norm.bias"),
                      ("encoder.stages.1.blocks.0.mixer.mhs.out_proj.weight", f"{q}.y_proj.weight"),
                      ("encoder.stages.0.downsample.reduction.weight", "vmunet.layers.0.downsample.reduction.weight"),
                      ("decoder.stages.1.upsample.expand.weight", "vmunet.layers_up.1.upsample.expand.weight"),
                      ("decoder.stages.0.blocks.0.norm.weight", "vmunet.layers_up.0.blocks.0.ln_1.weight"),
                      ("decoder.final_expand.expand.weight", "vmunet.final_up.expand.weight"),
                      ("decoder.seg_layers.0.weight", "vmunet.final_conv.weight")]:
        assert torch.equal(mine[ours], sd[off]), ours
    fams = conv.net_kwargs["families"]
    with torch.no_grad():
        x = torch.randn(1, 4, 4, 48, generator=g)
        ref = official_vss_gate(x, sd, "vmunet.layers.1.blocks.0", fams, 0.3)
        torch.testing.assert_close(net.encoder.stages[1]["blocks"][0](x), ref, rtol=1e-4, atol=1e-5)
        # PatchExpand2D: Linear, 'b h w (p1 p2 c) -> b (h p1) (w p2) c', LN
        e = x @ sd["vmunet.layers_up.1.upsample.expand.weight"].t()
        e = e.view(1, 4, 4, 2, 2, 24).permute(0, 1, 3, 2, 4, 5).reshape(1, 8, 8, 24)
        e = F.layer_norm(e, (24,), sd["vmunet.layers_up.1.upsample.norm.weight"], sd["vmunet.layers_up.1.upsample.norm.bias"])
        torch.testing.assert_close(net.decoder.stages[1]["upsample"](x), e)
        assert net(torch.randn(1, 3, 32, 32, generator=g)).shape == (1, 2, 32, 32)


def test_mhs_vm_and_vm_unet_errors():
    g = torch.Generator().manual_seed(13)
    sd = _mhs_state(official_mhs_vm_keys(3, 2, [24, 48], [1, 1], [1, 1], 3), g)
    bad = dict(sd)
    bad["vmunet.layers.0.blocks.0.self_attention.mhs.x_ssproj_W"] = torch.zeros_like(
        bad["vmunet.layers.0.blocks.0.self_attention.mhs.x_ssproj_W"])
    with pytest.raises(CheckpointError, match="x_ssproj_W differs"):
        convert("mhs_vm", bad, "vm_unet_mhs")
    missing = {k: v for k, v in sd.items() if "scanhead_X.mambaeng.Ds" not in k or "layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"scanhead_C/S\.mambaeng\.Ds"):
        convert("mhs_vm", missing, "vm_unet_mhs")
    with pytest.raises(CheckpointError, match="families"):
        convert("mhs_vm", sd, "vm_unet_mhs", net_kwargs={"families": ["raster", "snake", "spiral"]})
    gone = {k: v for k, v in sd.items() if not k.startswith("vmunet.layers_up.1.blocks.0.self_attention.out_norm.")}
    with pytest.raises(CheckpointError, match=r"Missing in the checkpoint \(2\): layers_up\.1\.blocks\.0\."
                                              r"self_attention\.out_norm\.weight"):
        convert("mhs_vm", gone, "vm_unet_mhs")
    no_proj = {k: v for k, v in sd.items() if ".mhs.y_proj." not in k and ".mhs.cat_norm." not in k}
    with pytest.raises(CheckpointError, match="with_proj"):
        convert("mhs_vm", no_proj, "vm_unet_mhs")
    # MHS-VM's latest.pth: {'epoch', ..., 'model_state_dict': VMUNet.state_dict(), 'optimizer_state_dict', ...}
    conv = convert("mhs_vm", {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {}}, "vm_unet_mhs")
    assert conv.net_kwargs["num_heads"] == 3
    # a VM-UNet (SS2D) checkpoint given as MHS-VM, and the reverse
    vm = {"vmunet.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "vmunet.layers.0.blocks.0.ln_1.weight": torch.ones(8)}
    vm.update({f"vmunet.{k}": torch.zeros(s) for k, s in _vss_keys("layers.0.blocks.0", 8).items()})
    with pytest.raises(CheckpointError, match="use --from vm_unet"):
        convert("mhs_vm", {"model": vm}, "vm_unet_mhs")
    with pytest.raises(CheckpointError, match="use --from mhs_vm"):
        convert("vm_unet", sd, "vm_unet_mhs")


def test_mambamim_source_converts_to_hymamba_only():
    """MambaMIM checkpoints are HyMamba (tests/test_hymamba.py converts them); other --arch values are refused
    before reading, and non-MambaMIM / medmamba-pretraining checkpoints are named."""
    hy = {"sparse_encoder.embeddings.stem.weight": torch.zeros(32, 1, 3, 3, 3),
          "sparse_encoder.mae.blocks.0.mamba.A_log": torch.zeros(768, 16),
          "dense_decoder.dec.0.up_sample.weight": torch.zeros(1)}
    for arch in ("umamba_bot", "swin_umamba"):
        with pytest.raises(CheckpointError, match=r"MambaMIM checkpoints are HyMamba.*--arch hymamba"):
            convert("mambamim", {"module": hy}, arch)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) embeddings\.expend1\.weight"):
        convert("mambamim", {"module": hy}, "hymamba")
    with pytest.raises(CheckpointError, match="not a MambaMIM"):
        convert("mambamim", {"model": {"encoder.stem.0.conv1.weight": torch.zeros(1)}}, "hymamba")
    with pytest.raises(CheckpointError, match="needs no conversion"):
        convert("mambamim", {"format": "medmamba.pretrain.mambamim/1", "model": {"x": torch.zeros(1)}}, "hymamba")


def test_cli_import_new_sources(tmp_path):
    g = torch.Generator().manual_seed(14)
    ck = tmp_path / "best.pth"
    sd = _mhs_state(official_mhs_vm_keys(3, 2, [24, 48], [1, 1], [1, 1], 4), g)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, ck)  # DataParallel-saved
    out = tmp_path / "mhs.pth"
    r = _cli("--from", "mhs_vm", str(ck), "--arch", "vm_unet_mhs", str(out))
    assert r.returncode == 0, r.stderr
    assert "threshold" in r.stdout
    meta = torch.load(out, weights_only=False)["medmamba_weights"]
    assert meta["arch"] == "vm_unet_mhs" and meta["net_kwargs"]["num_heads"] == 4
    r = _cli("--from", "vm_unet", str(ck), "--arch", "vm_unet_mhs", str(tmp_path / "x.pth"))
    assert r.returncode == 2 and "use --from mhs_vm" in r.stderr and "Traceback" not in r.stderr
    ck2 = tmp_path / "vmunet.pth"
    torch.save({"model_state_dict": _official_state2(official_vm_unet_keys(3, 2, [8, 16], [1, 1], [1, 1]), g)}, ck2)
    r = _cli("--from", "vm_unet", str(ck2), "--arch", "vm_unet_mhs", "--spatial-dims", "3", str(tmp_path / "v3.pth"))
    assert r.returncode == 0, r.stderr
    assert "inflation" in r.stdout
    meta = torch.load(tmp_path / "v3.pth", weights_only=False)["medmamba_weights"]
    assert meta["net_kwargs"]["mixer"] == "ss2d" and meta["spatial_dims"] == 3
    r = _cli("--from", "mambamim", str(ck), "--arch", "hymamba", str(tmp_path / "y.pth"))
    assert r.returncode == 2 and "not a MambaMIM" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("--from", "mambamim", str(ck), "--arch", "umamba_bot", str(tmp_path / "y.pth"))
    assert r.returncode == 2 and "are HyMamba" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()


# ------------------------------------------------------------------------------------------------
# whole networks: the official forward re-implemented from the official tensors vs ours after conversion
# ------------------------------------------------------------------------------------------------

def _sub_pixel_last(x, r):
    """einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c' (VM-UNet / MHS-VM / MSVM-UNet patch expanding)."""
    b, h, w, cc = x.shape
    c = cc // (r * r)
    return x.view(b, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c)


def official_vssm_forward(img, sd, depths, dec_depths, block):
    """The VSSM.forward MHS-VM and VM-UNet share (forward_features, forward_features_up, forward_final), eval
    mode, logits; ``block(x, sd, prefix)`` is the network's VSS block."""
    v = lambda k: sd[f"vmunet.{k}"]
    ln = lambda t_, q: F.layer_norm(t_, (t_.shape[-1],), v(f"{q}.weight"), v(f"{q}.bias"))
    x = ln(F.conv2d(img, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=4).permute(0, 2, 3, 1),
           "patch_embed.norm")
    skips = []
    for i, d in enumerate(depths):
        skips.append(x)
        for j in range(d):
            x = block(x, sd, f"vmunet.layers.{i}.blocks.{j}")
        if i < len(depths) - 1:
            x = official_patch_merging_2d(x, v(f"layers.{i}.downsample.norm.weight"), v(f"layers.{i}.downsample.norm.bias"),
                                          v(f"layers.{i}.downsample.reduction.weight"))
    for i, d in enumerate(dec_depths):
        if i > 0:
            x = x + skips[-i]
            x = ln(_sub_pixel_last(x @ v(f"layers_up.{i}.upsample.expand.weight").t(), 2), f"layers_up.{i}.upsample.norm")
        for j in range(d):
            x = block(x, sd, f"vmunet.layers_up.{i}.blocks.{j}")
    x = ln(_sub_pixel_last(x @ v("final_up.expand.weight").t(), 4), "final_up.norm")
    return F.conv2d(x.permute(0, 3, 1, 2), v("final_conv.weight"), v("final_conv.bias"))


def official_mhs_vm_forward(img, sd, dims, depths, dec_depths, families, t):
    """MHS-VM VSSM.forward, eval mode."""
    return official_vssm_forward(img, sd, depths, dec_depths, lambda x, sd_, p: official_vss_gate(x, sd_, p, families, t))


def test_mhs_vm_whole_network_matches_official_forward():
    g = torch.Generator().manual_seed(15)
    dims, depths, dec = [24, 48], [1, 1], [1, 1]
    sd = _mhs_state(official_mhs_vm_keys(3, 2, dims, depths, dec, 4), g)
    conv = convert("mhs_vm", sd, "vm_unet_mhs", net_kwargs={"drop_path_rate": 0.0})
    net = nets.create("vm_unet_mhs", 3, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    img = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = official_mhs_vm_forward(img, sd, dims, depths, dec, conv.net_kwargs["families"], 0.5)
        torch.testing.assert_close(net(img), ref, rtol=1e-4, atol=1e-4)


def _official_lkpe(x, sd, p, r):
    """LKPE / FLKPE expand (1x1 conv - BN (eval) - ReLU - depthwise 3x3), sub-pixel r, LN; channels-first."""
    h = F.conv2d(x, sd[f"{p}.expand.0.weight"], sd[f"{p}.expand.0.bias"])
    h = F.batch_norm(h, sd[f"{p}.expand.1.running_mean"], sd[f"{p}.expand.1.running_var"],
                     sd[f"{p}.expand.1.weight"], sd[f"{p}.expand.1.bias"], False, 0.0, 1e-5)
    h = F.conv2d(F.relu(h), sd[f"{p}.expand.3.weight"], sd[f"{p}.expand.3.bias"], padding=1, groups=h.shape[1])
    h = _sub_pixel_last(h.permute(0, 2, 3, 1), r)
    return F.layer_norm(h, (h.shape[-1],), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"]).permute(0, 3, 1, 2)


def official_msvm_unet_forward(img, sd, depths, dec_depths):
    """MSVMUNet.forward = decoder(encoder(x)[::-1]), eval mode, channels-first throughout."""
    ln2d = lambda t, q: F.layer_norm(t.movedim(1, -1), (t.shape[1],), sd[f"{q}.weight"], sd[f"{q}.bias"]).movedim(-1, 1)
    x = F.conv2d(img, sd["encoder.layer0.0.weight"], sd["encoder.layer0.0.bias"], stride=2, padding=1)
    x = F.conv2d(F.gelu(ln2d(x, "encoder.layer0.2")), sd["encoder.layer1.0.weight"], sd["encoder.layer1.0.bias"],
                 stride=2, padding=1)
    x = ln2d(x, "encoder.layer1.2")
    feats = []
    for i, d in enumerate(depths):
        for j in range(d):
            x = official_msvm_vss_block(x, sd, f"encoder.layers.{i}.blocks.{j}")
        feats.append(x)
        if i < len(depths) - 1:
            x = ln2d(F.conv2d(x, sd[f"encoder.downsamples.{i}.1.weight"], sd[f"encoder.downsamples.{i}.1.bias"],
                              stride=2, padding=1), f"encoder.downsamples.{i}.3")
    feats = feats[::-1]
    x = feats[0]
    for k, d in enumerate(dec_depths):
        x = torch.cat([_official_lkpe(x, sd, f"decoder.layers.{k}.up", 2), feats[k + 1]], 1)
        x = F.conv2d(x, sd[f"decoder.layers.{k}.concat_layer.weight"][:, :, None, None],
                     sd[f"decoder.layers.{k}.concat_layer.bias"])
        for j in range(d):
            x = official_msvm_vss_block(x, sd, f"decoder.layers.{k}.vss_layer.blocks.{j}", ms=True)
    x = _official_lkpe(x, sd, "decoder.out_layers.0", 4)
    return F.conv2d(x, sd["decoder.out_layers.0.out.weight"], sd["decoder.out_layers.0.out.bias"])


def test_msvm_unet_whole_network_matches_official_forward():
    g = torch.Generator().manual_seed(16)
    dims, depths, dec = [8, 16], [1, 1], [1]
    sd = _official_state2(official_msvm_unet_keys(3, 2, dims, depths, dec), g)
    conv = convert("msvm_unet", sd, "msvm_unet", net_kwargs={"drop_path_rate": 0.0})
    net = nets.create("msvm_unet", 3, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    img = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net(img), official_msvm_unet_forward(img, sd, depths, dec), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# VM-UNet (JCruan519/VM-UNet models/vmunet/vmunet.py, vmamba.py @ 032efd7fa7adf3af0ca33d51394b897e8ae5b371):
# VMUNet.vmunet = VSSM; VSSBlock = ln_1 + SS2D 'self_attention' (in_proj C -> 4C, conv2d depthwise 3x3 with bias,
# x_proj_weight (4, R + 2N, 2C), dt_projs_weight (4, 2C, R), dt_projs_bias (4, 2C), A_logs (8C, N), Ds (8C),
# out_norm LN(2C), out_proj 2C -> C); layers.i.downsample = PatchMerging2D; layers_up.i.upsample = PatchExpand2D
# (Linear 2c -> 4c for dim c, LN(c)); final_up = Final_PatchExpand2D (Linear C -> 4C, LN(C/4)); final_conv 1x1.
# ------------------------------------------------------------------------------------------------

def official_vm_unet_keys(cin, classes, dims, depths, dec_depths, prefix="vmunet."):
    keys = {"patch_embed.proj.weight": (dims[0], cin, 4, 4), "patch_embed.proj.bias": (dims[0],),
            "patch_embed.norm.weight": (dims[0],), "patch_embed.norm.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_vss_keys(f"layers.{i}.blocks.{j}", c))
        if i < len(dims) - 1:
            keys.update({f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                         f"layers.{i}.downsample.norm.weight": (4 * c,), f"layers.{i}.downsample.norm.bias": (4 * c,)})
    for i, (c, d) in enumerate(zip(dims[::-1], dec_depths)):
        if i > 0:
            keys.update({f"layers_up.{i}.upsample.expand.weight": (4 * c, 2 * c),
                         f"layers_up.{i}.upsample.norm.weight": (c,), f"layers_up.{i}.upsample.norm.bias": (c,)})
        for j in range(d):
            keys.update(_vss_keys(f"layers_up.{i}.blocks.{j}", c))
    keys.update({"final_up.expand.weight": (4 * dims[0], dims[0]), "final_up.norm.weight": (dims[0] // 4,),
                 "final_up.norm.bias": (dims[0] // 4,), "final_conv.weight": (classes, dims[0] // 4, 1, 1),
                 "final_conv.bias": (classes,)})
    return {prefix + k: v for k, v in keys.items()}


def official_ss2d_vss_block(x, sd, p):
    """VM-UNet / VMamba v0 VSSBlock (channels-last): x + SS2D(ln_1 x), SS2D forward_corev0, eval mode."""
    a = f"{p}.self_attention"
    c = x.shape[-1]
    h = F.layer_norm(x, (c,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
    u, z = (h @ sd[f"{a}.in_proj.weight"].t()).chunk(2, -1)
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), sd[f"{a}.conv2d.weight"], sd[f"{a}.conv2d.bias"], padding=1,
                        groups=u.shape[-1]))
    y = _official_cross_scan_2d(u, sd[f"{a}.x_proj_weight"], sd[f"{a}.dt_projs_weight"], sd[f"{a}.dt_projs_bias"],
                                sd[f"{a}.A_logs"], sd[f"{a}.Ds"]).permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), sd[f"{a}.out_norm.weight"], sd[f"{a}.out_norm.bias"]) * F.silu(z)
    return x + y @ sd[f"{a}.out_proj.weight"].t()


def official_vm_unet_forward(img, sd, depths, dec_depths):
    """VSSM.forward of VM-UNet, eval mode, logits."""
    return official_vssm_forward(img, sd, depths, dec_depths, official_ss2d_vss_block)


def test_vm_unet_checkpoint_converts_and_matches_official_forward():
    g = torch.Generator().manual_seed(17)
    dims, depths, dec = [8, 16, 32], [1, 2, 1], [1, 1, 2]
    sd = _official_state2(official_vm_unet_keys(3, 2, dims, depths, dec), g)
    conv = convert("vm_unet", {"model_state_dict": sd}, "vm_unet_mhs", net_kwargs={"drop_path_rate": 0.0})
    assert conv.net_kwargs["mixer"] == "ss2d" and conv.net_kwargs["dims"] == dims
    assert conv.net_kwargs["depths"] == depths and conv.net_kwargs["decoder_depths"] == dec
    net = nets.create("vm_unet_mhs", 3, 2, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    # every official tensor placed once; ours has only the deep-supervision heads on top
    assert len([k for k in mine if not k.startswith("decoder.seg_layers.") or k.startswith("decoder.seg_layers.0.")]) == len(sd)
    for ours, off in [("encoder.stages.1.blocks.1.mixer.x_proj_weight", "layers.1.blocks.1.self_attention.x_proj_weight"),
                      ("encoder.stages.1.blocks.1.mixer.conv.bias", "layers.1.blocks.1.self_attention.conv2d.bias"),
                      ("encoder.stages.1.blocks.1.norm.weight", "layers.1.blocks.1.ln_1.weight"),
                      ("decoder.stages.2.blocks.1.mixer.out_proj.weight", "layers_up.2.blocks.1.self_attention.out_proj.weight"),
                      ("decoder.stages.2.upsample.expand.weight", "layers_up.2.upsample.expand.weight"),
                      ("encoder.stages.1.downsample.reduction.weight", "layers.1.downsample.reduction.weight"),
                      ("decoder.final_expand.norm.bias", "final_up.norm.bias"), ("decoder.seg_layers.0.bias", "final_conv.bias")]:
        assert torch.equal(mine[ours], sd[f"vmunet.{off}"]), ours
    img = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        x = torch.randn(1, 4, 4, 16, generator=g)
        torch.testing.assert_close(net.encoder.stages[1]["blocks"][0](x),
                                   official_ss2d_vss_block(x, sd, "vmunet.layers.1.blocks.0"), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net(img), official_vm_unet_forward(img, sd, depths, dec), rtol=1e-4, atol=1e-4)
    # the default (MHS) network is another one: mixer must be ss2d
    with pytest.raises(CheckpointError, match="mixer='ss2d'"):
        convert("vm_unet", sd, "vm_unet_mhs", net_kwargs={"mixer": "mhs"})
    gone = {k: v for k, v in sd.items() if k != "vmunet.layers_up.1.blocks.0.self_attention.Ds"}
    with pytest.raises(CheckpointError, match=r"Missing in the checkpoint \(1\): layers_up\.1\.blocks\.0\.self_attention\.Ds"):
        convert("vm_unet", gone, "vm_unet_mhs")


def test_vm_unet_load_from_vmamba_imagenet_layout():
    """VMUNet.load_from: ImageNet 'model' keys -> encoder (blocks j < depth) and layers.k -> layers_up.(n-1-k)."""
    g = torch.Generator().manual_seed(18)
    sd = _official_state2(official_vmamba_imagenet_keys([8, 16], [3, 3]), g)
    kw = {"depths": [2, 2], "decoder_depths": [2, 1], "drop_path_rate": 0.0}
    conv = convert("vm_unet", {"model": sd}, "vm_unet_mhs", net_kwargs=kw, seed=3, out_channels=4)
    net = nets.create("vm_unet_mhs", 3, 4, 2, **conv.net_kwargs)
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    for ours, off in [("encoder.stages.0.blocks.1.mixer.A_logs", "layers.0.blocks.1.self_attention.A_logs"),
                      ("encoder.stages.1.blocks.0.norm.bias", "layers.1.blocks.0.ln_1.bias"),
                      ("encoder.stages.0.downsample.norm.weight", "layers.0.downsample.norm.weight"),
                      ("encoder.patch_embed.proj.weight", "patch_embed.proj.weight"),
                      ("decoder.stages.0.blocks.1.mixer.x_proj_weight", "layers.1.blocks.1.self_attention.x_proj_weight"),
                      ("decoder.stages.1.blocks.0.mixer.in_proj.weight", "layers.0.blocks.0.self_attention.in_proj.weight")]:
        assert torch.equal(mine[ours], sd[off]), ours
    torch.manual_seed(3)
    seeded = nets.create("vm_unet_mhs", 3, 4, 2, **conv.net_kwargs).state_dict()
    for k in ("decoder.stages.1.upsample.expand.weight", "decoder.final_expand.expand.weight", "decoder.seg_layers.0.weight"):
        assert torch.equal(mine[k], seeded[k]), k
    assert any("layers.0.blocks.2" in n and "head.weight" in n for n in conv.notes)
    c3 = convert("vm_unet", {"model": sd}, "vm_unet_mhs", spatial_dims=3, net_kwargs=kw, seed=3, out_channels=4)
    nets.create("vm_unet_mhs", 3, 4, 3, **c3.net_kwargs).load_state_dict(c3.state_dict, strict=True)
    torch.manual_seed(3)
    seeded3 = nets.create("vm_unet_mhs", 3, 4, 3, **c3.net_kwargs).state_dict()
    assert torch.equal(c3.state_dict["decoder.final_expand.expand.weight"], seeded3["decoder.final_expand.expand.weight"])
    with pytest.raises(CheckpointError, match="need 4 stages"):
        convert("vm_unet", {"model": sd}, "vm_unet_mhs")


# ------------------------------------------------------------------------------------------------
# 2D -> 3D inflation of the 2D-only networks (VM-UNet, VM-UNet-MHS, MSVM-UNet)
# ------------------------------------------------------------------------------------------------

def test_vm_unet_3d_inflation_follows_the_rules():
    g = torch.Generator().manual_seed(19)
    dims, depths, dec = [8, 16], [1, 1], [1, 1]
    sd = _official_state2(official_vm_unet_keys(1, 2, dims, depths, dec), g)
    kw = {"drop_path_rate": 0.0}
    c2 = convert("vm_unet", sd, "vm_unet_mhs", net_kwargs=kw).state_dict
    c3 = convert("vm_unet", sd, "vm_unet_mhs", spatial_dims=3, net_kwargs=kw, inflate="centre")
    net = nets.create("vm_unet_mhs", 1, 2, 3, **c3.net_kwargs)
    net.load_state_dict(c3.state_dict, strict=True)
    s3 = c3.state_dict
    # patch embedding (kernel = stride) averaged over depth; depthwise 3x3 centred (inflate='centre')
    torch.testing.assert_close(s3["encoder.patch_embed.proj.weight"],
                               c2["encoder.patch_embed.proj.weight"].unsqueeze(2).repeat(1, 1, 4, 1, 1) / 4)
    w = s3["encoder.stages.0.blocks.0.mixer.conv.weight"]
    assert torch.equal(w[:, :, 1], c2["encoder.stages.0.blocks.0.mixer.conv.weight"]) and not w[:, :, 0].any()
    # 6 routes from 4: (row, col, col, row-rev, col-rev, col-rev)
    xw = s3["decoder.stages.1.blocks.0.mixer.x_proj_weight"]
    xw2 = c2["decoder.stages.1.blocks.0.mixer.x_proj_weight"]
    assert [torch.equal(xw[i], xw2[j]) for i, j in enumerate((0, 1, 1, 2, 3, 3))] == [True] * 6
    # sub-pixel expansions: 2D rows repeated once per depth offset (r0 slowest)
    e2, e3 = c2["decoder.stages.1.upsample.expand.weight"], s3["decoder.stages.1.upsample.expand.weight"]
    assert e3.shape == (2 * e2.shape[0], e2.shape[1]) and torch.equal(e3, torch.cat([e2, e2]))
    f2, f3 = c2["decoder.final_expand.expand.weight"], s3["decoder.final_expand.expand.weight"]
    assert torch.equal(f3, torch.cat([f2] * 4))
    # a depth-constant input expands exactly as in 2D, slice by slice
    x2 = torch.randn(1, 3, 3, 16, generator=g)
    x3 = x2.unsqueeze(1).expand(1, 2, 3, 3, 16)
    with torch.no_grad():
        y2 = nets.create("vm_unet_mhs", 1, 2, 2, **c3.net_kwargs).decoder.stages[1]["upsample"]
        y2.load_state_dict({k[len("decoder.stages.1.upsample."):]: v for k, v in c2.items()
                            if k.startswith("decoder.stages.1.upsample.")})
        out3 = net.decoder.stages[1]["upsample"](x3)
        for d in range(4):
            torch.testing.assert_close(out3[:, d], y2(x2))
    assert net(torch.randn(1, 1, 32, 32, 32, generator=g)).shape == (1, 2, 32, 32, 32)


def test_mhs_vm_3d_inflation_loads_strictly():
    g = torch.Generator().manual_seed(20)
    sd = _mhs_state(official_mhs_vm_keys(3, 2, [24, 48], [1, 1], [1, 1], 4), g)
    c2 = convert("mhs_vm", sd, "vm_unet_mhs", net_kwargs={"drop_path_rate": 0.0}).state_dict
    c3 = convert("mhs_vm", sd, "vm_unet_mhs", spatial_dims=3, net_kwargs={"drop_path_rate": 0.0})
    assert c3.spatial_dims == 3 and any("inflation" in n for n in c3.notes)
    net = nets.create("vm_unet_mhs", 3, 2, 3, **c3.net_kwargs)
    net.load_state_dict(c3.state_dict, strict=True)
    for k in ("encoder.stages.1.blocks.0.mixer.mhs.x_proj_weight", "encoder.stages.1.blocks.0.mixer.mhs.A_logs",
              "decoder.stages.0.blocks.0.mixer.mhs.in_proj.weight"):
        assert torch.equal(c3.state_dict[k], c2[k]), k  # Multi-Head Scan parameters copied head by head
    torch.testing.assert_close(c3.state_dict["encoder.stages.0.blocks.0.mixer.conv.weight"],
                               c2["encoder.stages.0.blocks.0.mixer.conv.weight"].unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    r2, r3 = c2["encoder.stages.0.downsample.reduction.weight"], c3.state_dict["encoder.stages.0.downsample.reduction.weight"]
    assert torch.equal(r3, r2.view(48, 4, 24).repeat_interleave(2, dim=1).reshape(48, 192) / 2)


def test_msvm_unet_3d_inflation_encoder_and_up_blocks():
    g = torch.Generator().manual_seed(21)
    dims, depths, dec = [8, 16], [1, 1], [1]
    sd = _official_state2(official_msvm_unet_keys(3, 2, dims, depths, dec), g)
    c2 = convert("msvm_unet", sd, "msvm_unet", net_kwargs={"drop_path_rate": 0.0}).state_dict
    c3 = convert("msvm_unet", sd, "msvm_unet", spatial_dims=3, net_kwargs={"drop_path_rate": 0.0}, seed=5)
    net = nets.create("msvm_unet", 3, 2, 3, **c3.net_kwargs)
    net.load_state_dict(c3.state_dict, strict=True)
    s3 = c3.state_dict
    torch.testing.assert_close(s3["encoder.stem.0.weight"], c2["encoder.stem.0.weight"].unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    assert s3["encoder.stages.0.0.mixer.A_logs"].shape[0] == 6 * 8
    # LKPE (1x1 conv, BatchNorm, depthwise): per output channel, rows repeated per depth offset
    for k in ("decoder.up_blocks.0.up.expand.0.bias", "decoder.up_blocks.0.up.expand.1.running_var"):
        assert torch.equal(s3[k], torch.cat([c2[k], c2[k]])), k
    assert torch.equal(s3["decoder.up_blocks.0.up.expand.0.weight"][..., 0, 0, 0],
                       torch.cat([c2["decoder.up_blocks.0.up.expand.0.weight"][..., 0, 0]] * 2))
    # the final FLKPE (one x4 step in 2D, two x2 steps in 3D) keeps the seeded initialisation and is listed
    torch.manual_seed(5)
    seeded = nets.create("msvm_unet", 3, 2, 3, **c3.net_kwargs).state_dict()
    assert all(torch.equal(s3[k], seeded[k]) for k in s3 if k.startswith("decoder.final."))
    assert any("decoder.final.steps.0.expand.0.weight" in n for n in c3.notes)
    # a depth-constant input through an inflated LKPE gives the 2D result in every slice
    x2 = torch.randn(1, 2, 2, 16, generator=g)
    with torch.no_grad():
        up2 = nets.create("msvm_unet", 3, 2, 2, **c3.net_kwargs).eval()
        up2.load_state_dict(c2)
        net.eval()
        y3 = net.decoder.up_blocks[0].up(x2.unsqueeze(1).expand(1, 3, 2, 2, 16).contiguous())
        y2 = up2.decoder.up_blocks[0].up(x2)
        torch.testing.assert_close(y3[:, 2], y2)


# ------------------------------------------------------------------------------------------------
# Swin-UMamba-D (JiarunLiu/Swin-UMamba swin_umamba/nnunetv2/nets/SwinUMambaD.py @ 2c1f72e1975cef6621f239117efdc954237c6952):
# vssm_encoder.{patch_embed (4x4), layers.i.blocks.j (VSSBlock ln_1 + SS2D), downsamples.i (PatchMerging2D)};
# decoder = UNetResDecoder: for step k = 0 .. n-2 (deepest first) expand_layers.k = PatchExpand(dim=below):
# Linear(below, 2 below), LN(below / 2); concat_back_dim.k = Linear(2 skip, skip); stages.k = VSSLayer(skip,
# depth 2); seg_layers.k = Conv2d(skip, classes, 1); then expand_layers.(n-1) = FinalPatchExpand_X4(dims[0]):
# Linear(C, 16 C), LN(C); seg_layers.(n-1) = Conv2d(dims[0], classes, 1). Outputs (DS) [final, seg_layers.n-2, ..., 0].
# ------------------------------------------------------------------------------------------------

def official_swin_umamba_d_keys(cin, classes, dims, depths, dec_depth=2):
    keys = {"vssm_encoder.patch_embed.proj.weight": (dims[0], cin, 4, 4), "vssm_encoder.patch_embed.proj.bias": (dims[0],),
            "vssm_encoder.patch_embed.norm.weight": (dims[0],), "vssm_encoder.patch_embed.norm.bias": (dims[0],)}
    for i, (c, d) in enumerate(zip(dims, depths)):
        for j in range(d):
            keys.update(_vss_keys(f"vssm_encoder.layers.{i}.blocks.{j}", c))
        if i < len(dims) - 1:
            keys.update({f"vssm_encoder.downsamples.{i}.reduction.weight": (2 * c, 4 * c),
                         f"vssm_encoder.downsamples.{i}.norm.weight": (4 * c,),
                         f"vssm_encoder.downsamples.{i}.norm.bias": (4 * c,)})
    n = len(dims)
    for k in range(n - 1):
        below, skip = dims[n - 1 - k], dims[n - 2 - k]
        keys.update({f"decoder.expand_layers.{k}.expand.weight": (2 * below, below),
                     f"decoder.expand_layers.{k}.norm.weight": (below // 2,), f"decoder.expand_layers.{k}.norm.bias": (below // 2,),
                     f"decoder.concat_back_dim.{k}.weight": (skip, 2 * skip), f"decoder.concat_back_dim.{k}.bias": (skip,),
                     f"decoder.seg_layers.{k}.weight": (classes, skip, 1, 1), f"decoder.seg_layers.{k}.bias": (classes,)})
        for j in range(dec_depth):
            keys.update(_vss_keys(f"decoder.stages.{k}.blocks.{j}", skip))
    keys.update({f"decoder.expand_layers.{n - 1}.expand.weight": (16 * dims[0], dims[0]),
                 f"decoder.expand_layers.{n - 1}.norm.weight": (dims[0],), f"decoder.expand_layers.{n - 1}.norm.bias": (dims[0],),
                 f"decoder.seg_layers.{n - 1}.weight": (classes, dims[0], 1, 1), f"decoder.seg_layers.{n - 1}.bias": (classes,)})
    return keys


def official_swin_umamba_d_forward(img, sd, depths, dec_depth=2):
    """SwinUMambaD.forward (no deep supervision), eval mode: VSSMEncoder then UNetResDecoder, channels-last."""
    ln = lambda t_, q: F.layer_norm(t_, (t_.shape[-1],), sd[f"{q}.weight"], sd[f"{q}.bias"])
    x = ln(F.conv2d(img, sd["vssm_encoder.patch_embed.proj.weight"], sd["vssm_encoder.patch_embed.proj.bias"],
                    stride=4).permute(0, 2, 3, 1), "vssm_encoder.patch_embed.norm")
    skips = [img]
    for i, d in enumerate(depths):
        for j in range(d):
            x = official_ss2d_vss_block(x, sd, f"vssm_encoder.layers.{i}.blocks.{j}")
        skips.append(x)
        if i < len(depths) - 1:
            x = official_patch_merging_2d(x, sd[f"vssm_encoder.downsamples.{i}.norm.weight"],
                                          sd[f"vssm_encoder.downsamples.{i}.norm.bias"],
                                          sd[f"vssm_encoder.downsamples.{i}.reduction.weight"])
    n = len(depths)
    x = skips[-1]
    for k in range(n - 1):
        x = ln(_sub_pixel_last(x @ sd[f"decoder.expand_layers.{k}.expand.weight"].t(), 2), f"decoder.expand_layers.{k}.norm")
        x = torch.cat([x, skips[-(k + 2)]], -1) @ sd[f"decoder.concat_back_dim.{k}.weight"].t() + sd[f"decoder.concat_back_dim.{k}.bias"]
        for j in range(dec_depth):
            x = official_ss2d_vss_block(x, sd, f"decoder.stages.{k}.blocks.{j}")
    x = ln(_sub_pixel_last(x @ sd[f"decoder.expand_layers.{n - 1}.expand.weight"].t(), 4), f"decoder.expand_layers.{n - 1}.norm")
    return F.conv2d(x.permute(0, 3, 1, 2), sd[f"decoder.seg_layers.{n - 1}.weight"], sd[f"decoder.seg_layers.{n - 1}.bias"])


def test_swin_umamba_d_checkpoint_converts_and_matches_official_forward():
    g = torch.Generator().manual_seed(22)
    dims, depths = [8, 16, 32], [1, 2, 1]
    sd = _official_state2(official_swin_umamba_d_keys(1, 3, dims, depths), g)
    conv = convert("swin_umamba", {"network_weights": sd}, "swin_umamba_d", net_kwargs={"drop_path_rate": 0.0})
    assert conv.net_kwargs["dims"] == dims and conv.net_kwargs["decoder_depth"] == 2
    net = nets.create("swin_umamba_d", 1, 3, 2, **conv.net_kwargs).eval()
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    assert len(mine) == len(sd)
    for ours, off in [("decoder.expands.1.expand.weight", "decoder.expand_layers.0.expand.weight"),
                      ("decoder.concat_back.0.bias", "decoder.concat_back_dim.1.bias"),
                      ("decoder.layers.1.blocks.1.mixer.A_logs", "decoder.stages.0.blocks.1.self_attention.A_logs"),
                      ("decoder.final_expand.expand.weight", "decoder.expand_layers.2.expand.weight"),
                      ("decoder.final_head.weight", "decoder.seg_layers.2.weight"),
                      ("decoder.heads.0.weight", "decoder.seg_layers.1.weight"),  # DS output at H/4
                      ("decoder.heads.1.bias", "decoder.seg_layers.0.bias")]:  # DS output at H/8
        assert torch.equal(mine[ours], sd[off]), ours
    img = torch.randn(1, 1, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net(img), official_swin_umamba_d_forward(img, sd, depths), rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="use --arch swin_umamba_d"):
        convert("swin_umamba", sd, "swin_umamba")
    # 3D: encoder and decoder inflated; the final x4 expansion (final_dim 8 // 4 in 3D) left seeded, named
    c3 = convert("swin_umamba", sd, "swin_umamba_d", spatial_dims=3, net_kwargs={"drop_path_rate": 0.0}, seed=2)
    net3 = nets.create("swin_umamba_d", 1, 3, 3, **c3.net_kwargs)
    net3.load_state_dict(c3.state_dict, strict=True)
    assert any("decoder.final_expand.expand.weight" in n for n in c3.notes)
    assert torch.equal(c3.state_dict["decoder.expands.1.expand.weight"], torch.cat([mine["decoder.expands.1.expand.weight"]] * 2))
    c3b = convert("swin_umamba", sd, "swin_umamba_d", spatial_dims=3, net_kwargs={"drop_path_rate": 0.0, "final_dim": 8})
    assert torch.equal(c3b.state_dict["decoder.final_expand.expand.weight"], torch.cat([mine["decoder.final_expand.expand.weight"]] * 4))


def test_vmamba_imagenet_weights_into_swin_umamba_d():
    g = torch.Generator().manual_seed(23)
    sd = _official_state2(official_vmamba_imagenet_keys([8, 16], [1, 2]), g)
    kw = {"drop_path_rate": 0.0}
    conv = convert("vmamba", {"model": sd}, "swin_umamba_d", net_kwargs=kw, in_channels=3, out_channels=2)
    net = nets.create("swin_umamba_d", 3, 2, 2, **conv.net_kwargs)
    net.load_state_dict(conv.state_dict, strict=True)
    mine = net.state_dict()
    for k in ("patch_embed.proj.weight", "patch_embed.norm.weight", "patch_embed.norm.bias"):
        assert torch.equal(mine[f"encoder.{k}"], sd[k]), k  # 3 channels: the patch embedding is loaded
    assert torch.equal(mine["encoder.layers.1.blocks.1.mixer.Ds"], sd["layers.1.blocks.1.self_attention.Ds"])
    c1 = convert("vmamba", {"model": sd}, "swin_umamba_d", net_kwargs=kw, in_channels=1, seed=4)
    torch.manual_seed(4)
    seeded = nets.create("swin_umamba_d", 1, 2, 2, **c1.net_kwargs).state_dict()
    assert all(torch.equal(c1.state_dict[k], seeded[k]) for k in seeded if k.startswith(("encoder.patch_embed.", "decoder.")))
    c3 = convert("vmamba", {"model": sd}, "swin_umamba_d", spatial_dims=3, net_kwargs=kw, in_channels=3)
    nets.create("swin_umamba_d", 3, 2, 3, **c3.net_kwargs).load_state_dict(c3.state_dict, strict=True)


# ------------------------------------------------------------------------------------------------
# 3 -> 1 input channels: the official MSVM-UNet / VM-UNet forwards repeat a 1-channel image to 3 channels;
# summing the input weights computes the same on the 1-channel image (convolutions are linear in the input)
# ------------------------------------------------------------------------------------------------

def test_three_channel_checkpoints_fold_to_one_input_channel(tmp_path):
    g = torch.Generator().manual_seed(21)
    img = torch.randn(1, 1, 32, 32, generator=g)
    msvm = _official_state2(official_msvm_unet_keys(3, 2, [8, 16], [1, 1], [1]), g)
    vmu = _official_state2(official_vm_unet_keys(3, 2, [8, 16], [1, 1], [1, 1]), g)
    for source, sd, official in [
            ("msvm_unet", msvm, lambda x: official_msvm_unet_forward(x, msvm, [1, 1], [1])),
            ("vm_unet", vmu, lambda x: official_vm_unet_forward(x, vmu, [1, 1], [1, 1]))]:
        arch = "msvm_unet" if source == "msvm_unet" else "vm_unet_mhs"
        assert convert(source, sd, arch, net_kwargs={"drop_path_rate": 0.0}).in_channels == 3  # default: kept
        conv = convert(source, sd, arch, net_kwargs={"drop_path_rate": 0.0}, in_channels=1)
        assert conv.in_channels == 1 and any("folded 3 -> 1" in n for n in conv.notes)
        net = nets.create(arch, 1, 2, 2, **conv.net_kwargs).eval()
        net.load_state_dict(conv.state_dict, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(net(img), official(img.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
        with pytest.raises(CheckpointError, match="--in-channels 2 cannot be made"):
            convert(source, sd, arch, in_channels=2)
    # 3D inflation and folding together, and through the CLI (what nnUNetv2_train -pretrained_weights reads)
    ckpt = tmp_path / "msvm.pth"
    torch.save({"model": msvm}, ckpt)
    out = tmp_path / "msvm_1ch_3d.pth"
    res = subprocess.run([sys.executable, "-m", "medmamba", "weights", "import", "--from", "msvm_unet", str(ckpt),
                          "--arch", "msvm_unet", "--spatial-dims", "3", "--in-channels", "1", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "3D, 1 -> 2 channels" in res.stdout and "folded 3 -> 1" in res.stdout
    saved = torch.load(out, weights_only=False)
    net = nets.create("msvm_unet", 1, 2, 3, **saved["medmamba_weights"]["net_kwargs"])
    net.load_state_dict(saved["network_weights"], strict=True)
