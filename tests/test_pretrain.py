"""MambaMIM pretraining: mask pyramid, TOKI, masked encoders, discovery, a fixed-batch overfit on real CT."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmamba.pretrain.data import NoCTFoundError, discover_ct, load_ct, preprocess_transforms
from medmamba.pretrain.encoders import masked_encoder_for
from medmamba.pretrain.masking import MaskPyramid, patchify, random_grid_mask, unpatchify
from medmamba.pretrain.model import MambaMIM, export_network_weights
from medmamba.pretrain.network import ENCODER_MODULES, SUPPORTED, build_downstream_network, check_arch
from medmamba.pretrain.sparse import MaskedNorm, MaskStore, masked_mamba_layer
from medmamba.pretrain.toki import TOKI, interpolation_inputs, toki_fill

DATA = os.environ.get("MEDMAMBA_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
STS = sorted(glob.glob(os.path.join(DATA, "ibsi_sts", "STS_*", "CT_image.nii.gz")))
needs_data = pytest.mark.skipif(not STS, reason=f"real CT not found under {DATA} (set MEDMAMBA_DATA)")


pytestmark = pytest.mark.usefixtures("one_thread")


# tiny networks (a few 10k parameters) that keep each architecture's structure
TINY = {
    "umamba_bot": dict(features_per_stage=[4, 8, 16], strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 1]),
    "umamba_enc": dict(features_per_stage=[4, 8, 16], strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 1],
                       patch_size=[32, 32, 32]),
    "swin_umamba": dict(feature_size=8, dims=[8, 16, 32], depths=[1, 1, 1], drop_path_rate=0.0),
}


# ------------------------------------------------------------------------------------------------ masking

def test_mask_ratio_per_sample_and_independent():
    g = torch.Generator().manual_seed(0)
    vis = random_grid_mask(32, (3, 4, 5), 0.75, generator=g)
    assert vis.shape == (32, 60)
    assert (vis.sum(1) == 15).all()  # exactly round(0.25 * 60) visible in EVERY sample
    assert len({tuple(r.tolist()) for r in vis}) > 1  # drawn per sample
    # tiny grids still keep >= 1 visible and >= 1 masked token
    v2 = random_grid_mask(4, (1, 1, 2), 0.75)
    assert (v2.sum(1) == 1).all()
    with pytest.raises(ValueError, match="at least 2"):
        random_grid_mask(2, (1, 1, 1), 0.75)


@pytest.mark.parametrize("factors", [(1, 1, 1), (2, 2, 2), (1, 2, 2), (4, 8, 8)])
def test_mask_pyramid_consistent_across_scales(factors):
    pyr = MaskPyramid.random(3, (3, 2, 4), 0.75, generator=torch.Generator().manual_seed(1))
    shape = tuple(g * f for g, f in zip(pyr.grid, factors))
    m = pyr.mask(shape)
    assert m.shape == (3, 1, *shape)
    # every voxel carries the value of the bottleneck token covering it (nearest upsampling)
    down_max = F.max_pool3d(m, factors, factors)
    down_min = -F.max_pool3d(-m, factors, factors)
    grid_mask = pyr.visible.float().view(3, 1, *pyr.grid)
    assert torch.equal(down_max, grid_mask) and torch.equal(down_min, grid_mask)
    assert torch.equal(m, F.interpolate(grid_mask, size=shape, mode="nearest"))
    # the visible fraction is the same at every scale and for every sample
    frac = m.flatten(1).mean(1)
    assert torch.allclose(frac, torch.full_like(frac, pyr.n_visible / 24))
    idx = pyr.visible_index(shape)
    for b in range(3):
        assert torch.equal(idx[b], torch.nonzero(m[b].flatten()).flatten())


def test_patchify_roundtrip():
    x = torch.randn(2, 1, 8, 12, 16)
    p = patchify(x, (4, 4, 8))
    assert p.shape == (2, 2 * 3 * 2, 128)
    assert torch.equal(p[0, 0].view(4, 4, 8), x[0, 0, :4, :4, :8])
    assert torch.equal(p[1, 1].view(4, 4, 8), x[1, 0, :4, :4, 8:])  # raster order: last grid axis fastest
    assert torch.equal(unpatchify(p, (4, 4, 8), (2, 3, 2), 1), x)


# ------------------------------------------------------------------------------------------------ TOKI

def _naive_toki(tokens, visible, A):
    """Per sample, per masked run, explicit sum h_j = sum_q A^(j-q) x~_q (reference)."""
    b_, length, c = tokens.shape
    out = tokens.clone()
    for b in range(b_):
        vis = [j for j in range(length) if visible[b, j]]
        j = 0
        while j < length:
            if visible[b, j]:
                j += 1
                continue
            start = j
            while j < length and not visible[b, j]:
                j += 1
            end = j  # run = start .. end-1
            a = start - 1 if start > 0 else None
            bb = end if end < length else None
            xt = []
            for q in range(start, end):
                if a is not None and bb is not None:
                    alpha = (q - a) / (bb - a)
                    xt.append((1 - alpha) * tokens[b, a] + alpha * tokens[b, bb])
                elif bb is not None:
                    xt.append(tokens[b, bb].clone())
                else:
                    xt.append(tokens[b, a].clone())
            for k, jj in enumerate(range(start, end)):
                h = torch.zeros(c, dtype=tokens.dtype)
                for q in range(k + 1):
                    h = h + torch.linalg.matrix_power(A, k - q) @ xt[q]
                out[b, jj] = h
        assert vis  # at least one visible
    return out


def _runs_visible(b, length, seed):
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(b, length, generator=g) < 0.35
    vis[0, :3] = False   # a run at the start
    vis[0, 3] = True
    vis[1, -4:] = False  # a run at the end
    vis[1, 0] = True
    vis[:, 7] = True
    return vis


def test_toki_zero_A_is_linear_interpolation_and_keeps_visible():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 25, 6, generator=g, dtype=torch.float64)
    vis = _runs_visible(3, 25, 1)
    out = toki_fill(tokens, vis, torch.zeros(6, 6, dtype=torch.float64))
    assert torch.equal(out[vis], tokens[vis])  # visible tokens unchanged
    assert torch.allclose(out, _naive_toki(tokens, vis, torch.zeros(6, 6, dtype=torch.float64)))
    # explicit check of one interior run: linear in the position
    b = 2
    pos = [j for j in range(25) if vis[b, j]]
    for a, c in zip(pos[:-1], pos[1:]):
        for j in range(a + 1, c):
            alpha = (j - a) / (c - a)
            assert torch.allclose(out[b, j], (1 - alpha) * tokens[b, a] + alpha * tokens[b, c])
    # start run: copies the first visible token; end run: the last visible one
    assert torch.allclose(out[0, :3], tokens[0, 3].expand(3, 6))
    last = max(j for j in range(25) if vis[1, j])
    assert torch.allclose(out[1, last + 1:], tokens[1, last].expand(25 - last - 1, 6))


def test_toki_nonzero_A_follows_recurrence_exactly():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 30, 5, generator=g, dtype=torch.float64)
    vis = _runs_visible(3, 30, 3)
    A = 0.4 * torch.randn(5, 5, generator=g, dtype=torch.float64)
    out = toki_fill(tokens, vis, A)
    ref = _naive_toki(tokens, vis, A)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.equal(out[vis], tokens[vis])
    # and the step form: h_j = A h_(j-1) + x~_j inside a run
    xt = interpolation_inputs(tokens, vis)
    for b in range(3):
        for j in range(1, 30):
            if not vis[b, j] and not vis[b, j - 1]:
                assert torch.allclose(out[b, j], A @ out[b, j - 1] + xt[b, j], atol=1e-12)
    # gradients reach A
    A_p = A.clone().requires_grad_()
    toki_fill(tokens, vis, A_p).sum().backward()
    assert A_p.grad is not None and A_p.grad.abs().sum() > 0


def test_toki_per_sample_and_layout():
    toki = TOKI(4)
    with torch.no_grad():
        toki.A.copy_(0.3 * torch.randn(4, 4))
    x = torch.randn(2, 4, 2, 3, 4)
    vis = _runs_visible(2, 24, 5)
    out = toki(x, vis)
    x2 = x.clone()
    x2[1] = torch.randn(4, 2, 3, 4)  # change sample 1 only
    out2 = toki(x2, vis)
    assert torch.equal(out[0], out2[0])  # no mixing across the batch
    vis2 = vis.clone()
    vis2[1] = _runs_visible(2, 24, 9)[1]
    assert torch.equal(toki(x, vis2)[0], out[0])  # sample 0 does not see sample 1's mask
    # token / channel layout: with channel c at raster position j holding 100 c + j, A = 0 reproduces it
    # exactly at interior masked positions (linear in j), which a token/channel mix-up would break
    lin = TOKI(4)
    grid = (2, 3, 4)
    val = (100 * torch.arange(4.0)[:, None] + torch.arange(24.0)[None]).view(1, 4, *grid).repeat(2, 1, 1, 1, 1)
    v = torch.zeros(2, 24, dtype=torch.bool)
    v[:, [0, 5, 11, 23]] = True
    v[1, 17] = True
    res = lin(val, v)
    assert torch.allclose(res, val, atol=1e-5)
    assert res.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ encoders

def test_unsupported_architectures_error_clearly():
    for bad in ("lightm_unet", "msvm_unet", "swin_umamba_d", "no_such_net"):
        with pytest.raises(ValueError, match="Supported: umamba_bot, umamba_enc, swin_umamba"):
            check_arch(bad)
    assert check_arch("UMambaBot") == "umamba_bot"
    assert set(SUPPORTED) >= {"umamba_bot", "umamba_enc", "swin_umamba"}


def _dense_encoder(net, arch, x):
    feats = net.encoder(x)
    if arch == "umamba_bot":
        feats[-1] = net.mamba_layer(feats[-1])
    return feats


@pytest.mark.parametrize("arch", list(TINY))
def test_masked_encoder_matches_network_and_hides_masked_voxels(arch):
    ref = build_downstream_network(arch, network_kwargs=TINY[arch], seed=0)
    net = build_downstream_network(arch, network_kwargs=TINY[arch], seed=0)
    enc = masked_encoder_for(net, arch)
    # same parameter names as the segmentation network's encoder parts
    ref_keys = {k for k in ref.state_dict() if k.split(".")[0] in ENCODER_MODULES[arch]}
    assert set(enc.state_dict()) == ref_keys
    x = torch.randn(2, 1, 32, 32, 32)
    grid = enc.grid((32, 32, 32))
    with torch.no_grad():
        dense = _dense_encoder(ref, arch, x)
        same = enc(x)  # no mask: exactly the network's encoder
        all_vis = enc(x, MaskPyramid(torch.ones(2, int(np.prod(grid)), dtype=torch.bool), grid))
        pyr = MaskPyramid.random(2, grid, 0.75, generator=torch.Generator().manual_seed(0))
        masked = enc(x, pyr)
        noise = (1 - pyr.mask(x.shape[2:])) * 10 * torch.randn_like(x)
        masked_noisy = enc(x + noise, pyr)
    for d, s, a in zip(dense, same, all_vis):
        assert torch.equal(d, s)
        assert torch.allclose(d, a, atol=1e-4, rtol=1e-4)
    for f, g in zip(masked, masked_noisy):
        assert (f * (1 - pyr.mask(f.shape[2:]))).abs().max() == 0  # masked positions are zero at every level
        assert torch.equal(f, g)  # nothing leaks from masked voxels
    assert [tuple(f.shape[2:]) for f in masked] == [tuple(32 // s for s in sc) for sc in enc.level_scales()]


def test_masked_mamba_layer_scans_visible_tokens_only():
    net = build_downstream_network("umamba_bot", network_kwargs=TINY["umamba_bot"], seed=0)
    layer = net.mamba_layer
    x = torch.randn(2, 16, 4, 4, 4)
    pyr = MaskPyramid.random(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    store = MaskStore()
    store.pyramid = pyr
    with torch.no_grad():
        out = masked_mamba_layer(layer, x, store)
        for b in range(2):
            idx = pyr.visible_index((4, 4, 4))[b]
            seq = x[b].flatten(1).t()[idx][None]  # (1, n_visible, C), raster order
            ref = layer.mamba(layer.norm(seq))[0]
            assert torch.allclose(out[b].flatten(1).t()[idx], ref, atol=1e-5)
    assert (out * (1 - pyr.mask((4, 4, 4)))).abs().max() == 0


def test_masked_norm_uses_visible_voxels_only():
    norm = torch.nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    store = MaskStore()
    mn = MaskedNorm(norm, store)
    assert mn.weight is norm.weight and set(dict(mn.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 3, 4, 4, 4)
    assert torch.allclose(mn(x), norm(x), atol=1e-6)  # dense mode: the original
    store.pyramid = MaskPyramid.random(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    y = mn(x)
    m = store.pyramid.mask((4, 4, 4)).bool()
    for b in range(2):
        for c in range(3):
            v = x[b, c][m[b, 0]]
            ref = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + norm.eps) * norm.weight[c] + norm.bias[c]
            assert torch.allclose(y[b, c][m[b, 0]], ref, atol=1e-5)
    assert (y * ~m).abs().max() == 0


def test_umamba_enc_channel_token_patch_mismatch_is_explained():
    kw = dict(TINY["umamba_enc"], patch_size=[16, 16, 16])  # bottleneck 4^3 = 64 voxels <= ... no channel tokens
    kw["features_per_stage"] = [4, 8, 64]  # 4^3 = 64 <= 64 channels: channels become the tokens at the bottleneck
    net = build_downstream_network("umamba_enc", network_kwargs=kw, seed=0)
    assert net.channel_token[-1]
    with pytest.raises(ValueError, match="channels as tokens"):
        MambaMIM(net, "umamba_enc", (32, 32, 32), decoder_width=16)
    model = MambaMIM(build_downstream_network("umamba_enc", network_kwargs=kw, seed=0), "umamba_enc", (16, 16, 16),
                     decoder_width=16)
    out = model(torch.rand(2, 1, 16, 16, 16))
    assert torch.isfinite(out["loss"])


def test_patch_too_small_for_masking():
    net = build_downstream_network("swin_umamba", network_kwargs=TINY["swin_umamba"], seed=0)
    with pytest.raises(ValueError, match="single token"):
        MambaMIM(net, "swin_umamba", (16, 16, 16))


@pytest.mark.parametrize("arch", list(TINY))
def test_export_loads_strictly_with_fresh_decoder(arch):
    net = build_downstream_network(arch, network_kwargs=TINY[arch], seed=0)
    model = MambaMIM(net, arch, (32, 32, 32), decoder_width=16)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01)
    fresh = build_downstream_network(arch, network_kwargs=TINY[arch], seed=7)
    weights = export_network_weights(model.encoder_state_dict(), fresh, arch)
    target = build_downstream_network(arch, network_kwargs=TINY[arch], seed=99)
    target.load_state_dict(weights, strict=True)
    ref7 = build_downstream_network(arch, network_kwargs=TINY[arch], seed=7).state_dict()
    enc_sd = model.encoder_state_dict()
    for k, v in weights.items():
        if k in enc_sd or k.startswith("decoder.encoder."):  # U-Mamba's decoder holds (aliases) the encoder
            src = enc_sd[k.replace("decoder.encoder.", "encoder.", 1)] if k.startswith("decoder.encoder.") else enc_sd[k]
            assert torch.equal(v, src), k
        else:
            assert torch.equal(v, ref7[k]), k  # decoder: the fresh build


# ------------------------------------------------------------------------------------------------ data

@needs_data
def test_discovery_rules_and_dicom():
    sts = discover_ct([os.path.join(DATA, "ibsi_sts")])
    assert sorted(i.path for i in sts.items) == sorted(os.path.join(DATA, "ibsi_sts", os.path.relpath(p, os.path.join(DATA, "ibsi_sts"))) for p in STS)
    reasons = " ".join(r for _, r in sts.skipped)
    assert "mask" in reasons and "'mr'" in reasons and "'pet'" in reasons
    ts = discover_ct(os.path.join(DATA, "totalsegmentator"))
    names = sorted(os.path.basename(i.path) for i in ts.items)
    assert names == ["example_ct.nii.gz", "example_ct_dicom", "example_ct_sm.nii.gz"]
    dicom = [i for i in ts.items if i.kind == "dicom"][0]
    assert len(dicom.files) == 20
    only = discover_ct(os.path.join(DATA, "totalsegmentator"), include=["example_seg.nii.gz"])
    assert [os.path.basename(i.path) for i in only.items if i.kind == "nifti"] == ["example_seg.nii.gz"]
    dropped = discover_ct(os.path.join(DATA, "totalsegmentator"), exclude=["*_sm*", "example_ct_dicom"])
    assert sorted(os.path.basename(i.path) for i in dropped.items) == ["example_ct.nii.gz"]


@needs_data
def test_dicom_geometry_matches_its_nifti_segmentation():
    from monai.transforms import Orientation

    ts = discover_ct(os.path.join(DATA, "totalsegmentator", "example_ct_dicom"))
    img = load_ct(ts.items[0])
    assert img.shape == (1, 512, 512, 20) and float(img.min()) == -1024.0  # HU
    seg = load_ct(os.path.join(DATA, "totalsegmentator", "example_seg_dicom.nii.gz"))  # same physical space
    a, b = Orientation("RAS", labels=None)(img), Orientation("RAS", labels=None)(seg)
    assert a.shape == b.shape
    assert torch.allclose(a.affine.double(), b.affine.double(), atol=1e-3)


def test_no_ct_found(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "case.nii.gz").write_bytes(b"")
    (tmp_path / "liver_seg.nii.gz").write_bytes(b"")
    found = discover_ct(tmp_path)
    assert not found.items and len(found.skipped) == 2
    with pytest.raises(NoCTFoundError, match="not a folder"):
        discover_ct(tmp_path / "missing")


@needs_data
def test_overfits_a_fixed_real_ct_batch():
    """A fixed batch of real CT crops and a fixed mask: the masked-patch loss must fall clearly."""
    from monai.utils import set_determinism

    set_determinism(seed=0)
    tr = preprocess_transforms((32, 32, 32), (4.0, 4.0, 4.0), samples_per_volume=1)
    tr.set_random_state(seed=0)
    crops = [tr({"image": load_ct(p)})[0]["image"] for p in STS[:2]]
    set_determinism(seed=None)
    x = torch.stack([torch.as_tensor(c) for c in crops]).float()
    assert x.shape == (2, 1, 32, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    torch.manual_seed(0)
    net = build_downstream_network("umamba_bot", network_kwargs=TINY["umamba_bot"], seed=0)
    model = MambaMIM(net, "umamba_bot", (32, 32, 32), decoder_width=32)
    pyr = model.draw_mask(2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(x, pyr)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
