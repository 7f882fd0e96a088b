import pytest
import torch
import torch.nn as nn

from medmamba.layers.cross_scan import CrossScan
from medmamba.layers.vss import (FinalPatchExpand, Mlp, PatchEmbed, PatchExpand, PatchMerging, VSSBlock, VSSLayer,
                               _pixel_shuffle_last, _space_to_depth_last, to_channels_first, to_channels_last)


def test_patch_embed_channels_first_in_channels_last_out():
    pe = PatchEmbed(2, 16, spatial_dims=3, patch_size=4)
    y = pe(torch.randn(2, 2, 8, 12, 16))
    assert y.shape == (2, 2, 3, 4, 16)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 2, 3, 4), atol=1e-5, rtol=0)
    assert PatchEmbed(1, 8, spatial_dims=2, patch_size=2)(torch.randn(1, 1, 6, 10)).shape == (1, 3, 5, 8)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 6, 10)), (3, (1, 4, 6, 2))])
def test_space_to_depth_and_shuffle_are_inverse(spatial_dims, shape):
    x = torch.randn(*shape, 5)
    y = _space_to_depth_last(x, 2, spatial_dims)
    assert y.shape == (shape[0], *[s // 2 for s in shape[1:]], 5 * 2 ** spatial_dims)
    torch.testing.assert_close(_pixel_shuffle_last(y, 2, spatial_dims), x)


def test_space_to_depth_matches_swin_neighbourhoods_2d():
    x = torch.randn(1, 4, 6, 3)
    y = _space_to_depth_last(x, 2, 2)
    # channel block k = r0 * 2 + r1 holds x[2i + r0, 2j + r1]
    for r0 in range(2):
        for r1 in range(2):
            k = r0 * 2 + r1
            torch.testing.assert_close(y[..., 3 * k:3 * (k + 1)], x[:, r0::2, r1::2])


def test_pixel_shuffle_matches_torch_2d():
    x = torch.randn(1, 3, 5, 4 * 6)  # channels-last, layout (r0, r1, C)
    ours = _pixel_shuffle_last(x, 2, 2)
    # torch.pixel_shuffle wants channels (C, r0, r1)
    t = x.view(1, 3, 5, 2, 2, 6).permute(0, 5, 3, 4, 1, 2).reshape(1, 24, 3, 5)
    torch.testing.assert_close(ours, to_channels_last(nn.functional.pixel_shuffle(t, 2)))


def test_patch_merging_and_expand_shapes():
    pm2 = PatchMerging(8, spatial_dims=2)
    assert pm2.norm.normalized_shape == (32,) and pm2.reduction.weight.shape == (16, 32)
    assert pm2(torch.randn(1, 6, 10, 8)).shape == (1, 3, 5, 16)
    assert pm2(torch.randn(1, 5, 7, 8)).shape == (1, 3, 4, 16)  # odd sizes padded
    pm3 = PatchMerging(8, spatial_dims=3)
    assert pm3.norm.normalized_shape == (64,) and pm3.reduction.weight.shape == (16, 64)
    assert pm3(torch.randn(1, 2, 4, 6, 8)).shape == (1, 1, 2, 3, 16)
    pe2 = PatchExpand(16, spatial_dims=2)
    assert pe2.expand.weight.shape == (32, 16)  # Linear C -> 2C
    assert pe2(torch.randn(1, 3, 5, 16)).shape == (1, 6, 10, 8)
    pe3 = PatchExpand(16, spatial_dims=3)
    assert pe3.expand.weight.shape == (64, 16)  # Linear C -> 4C
    assert pe3(torch.randn(1, 1, 2, 3, 16)).shape == (1, 2, 4, 6, 8)
    fe2 = FinalPatchExpand(16, spatial_dims=2)
    assert fe2.expand.weight.shape == (64, 16)  # VM-UNet: Linear C -> 4C, shuffle 4 -> C/4
    assert fe2(torch.randn(1, 2, 3, 16)).shape == (1, 8, 12, 4)
    assert FinalPatchExpand(16, spatial_dims=3, out_dim=2)(torch.randn(1, 1, 1, 2, 16)).shape == (1, 4, 4, 8, 2)


def test_vss_block_variants():
    x = torch.randn(2, 3, 4, 5, 8, requires_grad=True)
    blk = VSSBlock(8, spatial_dims=3, d_state=2)
    assert isinstance(blk.mixer, CrossScan) and blk.ffn is None
    blk(x).sum().backward()
    mlp = VSSBlock(8, spatial_dims=3, mlp_ratio=4.0, d_state=2)
    assert isinstance(mlp.ffn, Mlp) and mlp.ffn.fc1.out_features == 32
    assert mlp(x).shape == x.shape
    custom = VSSBlock(8, spatial_dims=2, mixer=lambda d, s: nn.Linear(d, d), ffn=nn.Identity())
    assert custom(torch.randn(1, 4, 4, 8)).shape == (1, 4, 4, 8)
    msvm = VSSBlock(8, spatial_dims=2, mlp_ratio=4.0, d_state=1, gated=False, expand=1, conv_bias=False)
    assert msvm.mixer.d_inner == 8 and not msvm.mixer.gated
    with pytest.raises(TypeError, match="only apply"):
        VSSBlock(8, spatial_dims=2, mixer=nn.Identity(), gated=False)
    with pytest.raises(ValueError, match="channels-last"):
        blk(torch.randn(1, 8, 3, 4, 5))


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    blk = VSSBlock(8, spatial_dims=2, drop_path=0.9, mixer=lambda d, s: nn.Linear(d, d))
    x = torch.randn(16, 2, 2, 8)
    blk.eval()
    torch.testing.assert_close(blk(x), x + blk.mixer(blk.norm(x)))
    blk.train()
    y = blk(x)
    dropped = (y - x).flatten(1).abs().sum(1) == 0
    assert dropped.any()


def test_vss_layer():
    layer = VSSLayer(8, 3, spatial_dims=2, drop_path=[0.0, 0.1, 0.2], downsample=PatchMerging(8, 2), d_state=2)
    assert len(layer.blocks) == 3
    assert layer(torch.randn(1, 4, 6, 8)).shape == (1, 2, 3, 16)
    assert layer.blocks[0].mixer is not layer.blocks[1].mixer
    with pytest.raises(TypeError, match="factory"):
        VSSLayer(8, 2, spatial_dims=2, mixer=nn.Identity())
    with pytest.raises(ValueError, match="drop-path"):
        VSSLayer(8, 2, spatial_dims=2, drop_path=[0.1])
    assert to_channels_first(to_channels_last(torch.ones(1, 2, 3, 4))).shape == (1, 2, 3, 4)
