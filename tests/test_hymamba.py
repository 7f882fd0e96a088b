"""HyMamba (MambaMIM's build_hybird) and ``weights import --from mambamim``.

Everything about the official network here is written down from reading FengheTan9/MambaMIM @ 8b96c053:
``models/network/hymamba.py`` (Hybird, Embeddings, MedNeXtBlock, UnetResBlock, MaskedAutoencoderMamba,
MambaLayer, Decoder, build_3d_sincos_position_embedding), ``models/encoder.py`` (SparseConvNeXtLayerNorm,
channels_first: mean/biased variance over C, eps 1e-6), ``models/mamba/bi_vision_mamba.py`` (Mamba with
bimamba_type="v1": the backward tensors exist, the forward is the unidirectional one), ``main.py`` and
``utils/misc.py`` (what the checkpoint files hold), MONAI's ``UnetrUpBlock`` (the decoder's up blocks).
The reference forward below is a functional re-implementation from those readings, on raw tensors, in
float64, with its own scan loop.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from medmamba import nets
from medmamba.layers.mamba import Mamba
from medmamba.weights import CheckpointError, convert

# build_hybird(in_channel=1, n_classes=14, img_size=96)
OFFICIAL = dict(channels=(32, 64, 128, 192, 384), depths=(1, 2, 2, 2, 1), kernels=(3, 3, 3, 3, 3),
                exp_r=(2, 2, 4, 4, 4), depth=4, grid=6, d_state=16, d_conv=4, expand=2)
TINY = dict(channels=(4, 8, 8, 12, 12), depths=(1, 1, 2, 1, 1), kernels=(3, 3, 3, 3, 3), exp_r=(2, 2, 2, 4, 2),
            depth=2, grid=2, d_state=4, d_conv=4, expand=2)


def _ours(cfg, cin, cout, **kw):
    return nets.create("hymamba", cin, cout, channels=cfg["channels"], depths=cfg["depths"], kernels=cfg["kernels"],
                       exp_r=cfg["exp_r"], mamba_depth=cfg["depth"], img_size=16 * cfg["grid"],
                       d_state=cfg["d_state"], d_conv=cfg["d_conv"], expand=cfg["expand"], **kw)


def mamba_shapes(d_model, d_state, d_conv, expand):
    """bi_vision_mamba.Mamba's tensors (bimamba_type any: the *_b tensors are always created)."""
    di, r = expand * d_model, math.ceil(d_model / 16)
    s = {"in_proj.weight": (2 * di, d_model), "conv1d.weight": (di, 1, d_conv), "conv1d.bias": (di,),
         "x_proj.weight": (r + 2 * d_state, di), "dt_proj.weight": (di, r), "dt_proj.bias": (di,),
         "A_log": (di, d_state), "D": (di,),
         "A_b_log": (di, d_state), "conv1d_b.weight": (di, 1, d_conv), "conv1d_b.bias": (di,),
         "x_proj_b.weight": (r + 2 * d_state, di), "dt_proj_b.weight": (di, r), "dt_proj_b.bias": (di,),
         "D_b": (di,), "out_proj.weight": (d_model, di)}
    return s


def official_shapes(cfg, cin, cout, encoder_only=False, mask_token=False):
    """Key -> shape of Hybird's state dict (encoder_only: the pretraining SparseEncoder's, i.e. the
    ``*_timm_style.pth`` file, which also holds mae.mask_token)."""
    c, s = cfg["channels"], {}

    def conv(name, o, i, k):
        s[name + ".weight"], s[name + ".bias"] = (o, i, k, k, k), (o,)

    def ln(name, n):
        s[name + ".weight"], s[name + ".bias"] = (n,), (n,)

    def res(name, i, o):  # hymamba.UnetResBlock: conv1, conv2 (k3, bias), norm1, norm2 [, conv3 1x1, norm3]
        conv(name + ".conv1", o, i, 3)
        conv(name + ".conv2", o, o, 3)
        ln(name + ".norm1", o)
        ln(name + ".norm2", o)
        if i != o:
            conv(name + ".conv3", o, i, 1)
            ln(name + ".norm3", o)

    conv("embeddings.stem", c[0], cin, 3)
    for i in range(2, 6):  # layer2..5: MedNeXt blocks at channels[i-1]
        ch, k, e = c[i - 1], cfg["kernels"][i - 1], cfg["exp_r"][i - 1]
        for j in range(cfg["depths"][i - 1]):
            p = f"embeddings.layer{i}.{j}"
            s[f"{p}.conv1.weight"], s[f"{p}.conv1.bias"] = (ch, 1, k, k, k), (ch,)
            ln(p + ".norm", ch)
            conv(p + ".conv2", e * ch, ch, 1)
            conv(p + ".conv3", ch, e * ch, 1)
    for i in range(1, 5):
        conv(f"embeddings.expend{i}", c[i], c[i - 1], 3)
    for i in range(1, 5):
        res(f"embeddings.encoder{i}", c[i], c[i])
    d = c[4]
    s["mae.pos_embed"] = (1, cfg["grid"] ** 3, d)
    if mask_token:
        s["mae.mask_token"] = (1, 1, d)
    for b in range(cfg["depth"]):
        p = f"mae.blocks.{b}"
        ln(p + ".norm1", d)
        ln(p + ".norm2", d)
        for k, v in mamba_shapes(d, cfg["d_state"], cfg["d_conv"], cfg["expand"]).items():
            s[f"{p}.mamba.{k}"] = v
        s[p + ".mlp.fc1.weight"], s[p + ".mlp.fc1.bias"] = (2 * d, d), (2 * d,)
        s[p + ".mlp.fc2.weight"], s[p + ".mlp.fc2.bias"] = (d, 2 * d), (d,)
    if encoder_only:
        return s
    # MONAI UnetrUpBlock(in, out, k3, up 2, "instance", res_block): transp_conv (no bias), conv_block =
    # UnetResBlock(2*out -> out): conv1, conv2, conv3 (1x1), no biases; InstanceNorm3d without affine
    for name, i, o in (("decoder5", c[4], c[4]), ("decoder4", c[4], c[3]), ("decoder3", c[3], c[2]),
                       ("decoder2", c[2], c[1])):
        p = f"decoder.{name}"
        s[p + ".transp_conv.conv.weight"] = (i, o, 2, 2, 2)
        s[p + ".conv_block.conv1.conv.weight"] = (o, 2 * o, 3, 3, 3)
        s[p + ".conv_block.conv2.conv.weight"] = (o, o, 3, 3, 3)
        s[p + ".conv_block.conv3.conv.weight"] = (o, 2 * o, 1, 1, 1)
    res("decoder.decoder1", c[1], c[0])
    conv("decoder.out.conv", cout, c[0], 1)
    return s


def test_state_dict_matches_the_official_network_key_for_key():
    net = _ours(OFFICIAL, 1, 14)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("decoder.ds_heads.")}
    want = official_shapes(OFFICIAL, 1, 14)
    assert set(ours) - set(want) == set() and set(want) - set(ours) == set()
    assert ours == want
    # the order the official modules register them in (embeddings: stem, layer2..5, expend1..4, encoder1..4)
    top = list(dict.fromkeys(".".join(k.split(".")[:2]) for k in ours))
    assert top[:14] == ["embeddings.stem"] + [f"embeddings.layer{i}" for i in range(2, 6)] + \
        [f"embeddings.expend{i}" for i in range(1, 5)] + [f"embeddings.encoder{i}" for i in range(1, 5)] + ["mae.pos_embed"]
    official_params = sum(math.prod(v) for v in want.values())
    assert official_params == 41_841_134  # Hybird(1, 14): every tensor is a Parameter there
    trainable = sum(p.numel() for n, p in net.named_parameters() if "ds_heads" not in n)
    assert trainable == official_params - 6 ** 3 * 384 - 4 * 79_104  # minus pos_embed and the unused *_b tensors
    # the published encoder file: 22.7M float32 tensors, 86.7 MiB (the readme's "87MB")
    enc = official_shapes(OFFICIAL, 1, 14, encoder_only=True, mask_token=True)
    assert sum(math.prod(v) for v in enc.values()) * 4 / 2 ** 20 == pytest.approx(86.7, abs=0.05)
    # the fixed sin-cos embedding, 6^3 tokens
    torch.testing.assert_close(net.state_dict()["mae.pos_embed"], sincos_ref(6, 384).float())


def test_2d_is_refused_and_bad_sizes_named():
    with pytest.raises(ValueError, match="3D only"):
        nets.create("hymamba", 1, 2, spatial_dims=2)
    with pytest.raises(ValueError, match="divisible by 6"):
        nets.create("hymamba", 1, 2, channels=(4, 8, 8, 8, 8))
    net = _ours(TINY, 1, 2)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.zeros(1, 1, 24, 32, 32))


# ---- the official forward, functional, float64 ------------------------------------------------------------

def sincos_ref(g, dim, temperature=10000.0):
    """build_3d_sincos_position_embedding(g, dim): meshgrid(h, w, d) 'ij', [sin h, cos h, sin w, cos w, sin d, cos d]."""
    m = dim // 6
    omega = 1.0 / temperature ** (torch.arange(m, dtype=torch.float64) / m)
    idx = torch.arange(g ** 3)
    coords = [idx // (g * g), (idx // g) % g, idx % g]
    parts = []
    for c in coords:
        a = c.double()[:, None] * omega[None]
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, 1)[None]


def cf_ln(x, w, b, eps=1e-6):
    u = x.mean(1, keepdim=True)
    v = (x - u).pow(2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(v + eps) * w[:, None, None, None] + b[:, None, None, None]


def conv(x, P, name, groups=1):
    w = P[name + ".weight"]
    return F.conv3d(x, w, P.get(name + ".bias"), padding=w.shape[-1] // 2, groups=groups)


def res_block(x, P, p):  # hymamba.UnetResBlock (sparse=False)
    out = F.leaky_relu(cf_ln(conv(x, P, p + ".conv1"), P[p + ".norm1.weight"], P[p + ".norm1.bias"]), 0.01)
    out = cf_ln(conv(out, P, p + ".conv2"), P[p + ".norm2.weight"], P[p + ".norm2.bias"])
    if p + ".conv3.weight" in P:
        x = cf_ln(conv(x, P, p + ".conv3"), P[p + ".norm3.weight"], P[p + ".norm3.bias"])
    return F.leaky_relu(out + x, 0.01)


def mednext(x, P, p):
    y = conv(x, P, p + ".conv1", groups=x.shape[1])
    y = cf_ln(y, P[p + ".norm.weight"], P[p + ".norm.bias"])
    y = conv(F.gelu(conv(y, P, p + ".conv2")), P, p + ".conv3")
    return x + y


def mamba_ref(h, P, p, d_state, d_conv):
    """The unidirectional Mamba forward (v1 reads no *_b tensor), explicit recurrence."""
    L = h.shape[1]
    xz = h @ P[p + "in_proj.weight"].t()
    x, z = xz.chunk(2, dim=-1)
    x = F.conv1d(x.transpose(1, 2), P[p + "conv1d.weight"], P[p + "conv1d.bias"], padding=d_conv - 1,
                 groups=x.shape[-1])[..., :L]
    x = F.silu(x).transpose(1, 2)  # (B, L, di)
    r = P[p + "dt_proj.weight"].shape[1]
    dt, Bm, Cm = (x @ P[p + "x_proj.weight"].t()).split([r, d_state, d_state], dim=-1)
    dt = F.softplus(dt @ P[p + "dt_proj.weight"].t() + P[p + "dt_proj.bias"])  # (B, L, di)
    A = -torch.exp(P[p + "A_log"])  # (di, N)
    state = torch.zeros(h.shape[0], A.shape[0], d_state, dtype=h.dtype)
    ys = []
    for t in range(L):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * Bm[:, t, None, :] * x[:, t, :, None]
        ys.append((state * Cm[:, t, None, :]).sum(-1) + P[p + "D"] * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ P[p + "out_proj.weight"].t()


def inorm(x):
    return F.instance_norm(x, eps=1e-5)


def unetr_up(x, skip, P, p):
    up = F.conv_transpose3d(x, P[p + ".transp_conv.conv.weight"], stride=2)
    x = torch.cat([up, skip], 1)
    q = p + ".conv_block."
    out = F.leaky_relu(inorm(F.conv3d(x, P[q + "conv1.conv.weight"], padding=1)), 0.01)
    out = inorm(F.conv3d(out, P[q + "conv2.conv.weight"], padding=1))
    res = inorm(F.conv3d(x, P[q + "conv3.conv.weight"]))
    return F.leaky_relu(out + res, 0.01)


def official_forward(P, x, cfg):
    P = {k: v.double() for k, v in P.items()}
    x = x.double()
    def down(t):
        return F.max_pool3d(t, 2)

    def seq(t, i):
        for j in range(cfg["depths"][i - 1]):
            t = mednext(t, P, f"embeddings.layer{i}.{j}")
        return t

    h = conv(x, P, "embeddings.stem")
    x1 = conv(h, P, "embeddings.expend1")
    x2 = conv(seq(down(x1), 2), P, "embeddings.expend2")
    x3 = conv(seq(down(x2), 3), P, "embeddings.expend3")
    x4 = conv(seq(down(x3), 4), P, "embeddings.expend4")
    x5 = seq(down(x4), 5)
    skips = [res_block(t, P, f"embeddings.encoder{i + 1}") for i, t in enumerate((x1, x2, x3, x4))]
    B, C, *g = x5.shape
    t = x5.flatten(2).transpose(1, 2) + P["mae.pos_embed"]
    for b in range(cfg["depth"]):
        p = f"mae.blocks.{b}."
        t = mamba_ref(F.layer_norm(t, (C,), P[p + "norm1.weight"], P[p + "norm1.bias"]), P, p + "mamba.",
                      cfg["d_state"], cfg["d_conv"]) + t
        y = F.layer_norm(t, (C,), P[p + "norm2.weight"], P[p + "norm2.bias"])
        t = F.gelu(y @ P[p + "mlp.fc1.weight"].t() + P[p + "mlp.fc1.bias"]) @ P[p + "mlp.fc2.weight"].t() \
            + P[p + "mlp.fc2.bias"] + t
    x5 = t.transpose(1, 2).reshape(B, C, *g)
    d = unetr_up(x5, skips[3], P, "decoder.decoder5")
    d = unetr_up(d, skips[2], P, "decoder.decoder4")
    d = unetr_up(d, skips[1], P, "decoder.decoder3")
    d = unetr_up(d, skips[0], P, "decoder.decoder2")
    d = res_block(d, P, "decoder.decoder1")
    return conv(d, P, "decoder.out.conv")


def random_official(shapes, seed=0):
    """Random tensors of the official shapes, scaled like trained weights (norms near 1, A_log = log(1..N))."""
    g = torch.Generator().manual_seed(seed)
    P = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g)
        if k.endswith(("A_log", "A_b_log")):
            t = torch.log(torch.arange(1, s[1] + 1.0)).repeat(s[0], 1) + 0.1 * t
        elif k.endswith("pos_embed"):
            t = sincos_ref(round(s[1] ** (1 / 3)), s[2]).float()
        elif ".norm" in k and k.endswith(".weight"):
            t = 1 + 0.1 * t
        elif k.endswith(("D", "D_b")):
            t = 1 + 0.1 * t
        elif k.endswith("dt_proj.bias"):
            t = -4 + 0.5 * t
        else:
            fan_in = math.prod(s[1:]) if len(s) > 1 else s[0]
            t = t / math.sqrt(max(fan_in, 1))
        P[k] = t
    return P


def test_converted_full_checkpoint_computes_the_official_forward():
    """A fine-tuned Hybird state dict (DDP-prefixed, under 'state_dict') converts, loads strictly and computes
    the hand re-implementation of the official forward from the same tensors."""
    P = random_official(official_shapes(TINY, 2, 3))
    ckpt = {"epoch": 7, "state_dict": {"module." + k: v for k, v in P.items()}}
    conv_ = convert("mambamim", ckpt, "hymamba")
    assert (conv_.in_channels, conv_.out_channels, conv_.spatial_dims) == (2, 3, 3)
    kw = conv_.net_kwargs
    assert (kw["channels"], kw["depths"][1:], kw["exp_r"][1:], kw["mamba_depth"], kw["d_state"], kw["img_size"]) == \
        (list(TINY["channels"]), list(TINY["depths"][1:]), list(TINY["exp_r"][1:]), 2, 4, 32)
    assert any("ds_heads" in n for n in conv_.notes)
    net = nets.create("hymamba", 2, 3, **kw)
    net.load_state_dict(conv_.state_dict, strict=True)
    for k, v in P.items():
        assert torch.equal(net.state_dict()[k], v), k
    x = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = net.eval()(x)
    ref = official_forward(P, x, TINY)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # the unused backward Mamba tensors do not change anything (bimamba_type "v1")
    for k in [k for k in P if "_b." in k or k.endswith(("_b_log", "D_b"))]:
        net.state_dict()[k].add_(1.0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours)


def test_other_patch_sizes_use_the_formula_on_their_grid():
    net = _ours(TINY, 1, 2).eval()
    from medmamba.nets.hymamba import sincos_position_embedding_3d
    emb = sincos_position_embedding_3d((2, 3, 1), 12)
    # non-cubic grid: the official raster order (last axis fastest) and channel layout
    m = 2
    omega = 1.0 / 10000 ** (torch.arange(m) / m)
    for n, (i, j, k) in enumerate([(i, j, k) for i in range(2) for j in range(3) for k in range(1)]):
        want = torch.cat([f(v * omega) for v in (i, j, k) for f in (torch.sin, torch.cos)])
        torch.testing.assert_close(emb[0, n], want)
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 48, 16))
    assert out.shape == (1, 2, 32, 48, 16) and torch.isfinite(out).all()


def test_published_encoder_file_converts_and_leaves_the_decoder_seeded():
    """The *_timm_style.pth file (SparseEncoder state dict: embeddings.*, mae.* with mask_token)."""
    enc = random_official(official_shapes(TINY, 1, 2, encoder_only=True, mask_token=True), seed=3)
    conv_ = convert("mambamim", enc, "hymamba", out_channels=5, seed=4)
    assert conv_.out_channels == 5 and conv_.state_dict["decoder.out.conv.weight"].shape[0] == 5
    assert "mae.mask_token" not in conv_.state_dict
    assert any("mask_token dropped" in n for n in conv_.notes)
    assert any("decoder" in n and "seeded" in n for n in conv_.notes)
    for k, v in enc.items():
        if k != "mae.mask_token":
            assert torch.equal(conv_.state_dict[k], v), k
    again = convert("mambamim", enc, "hymamba", out_channels=5, seed=4)
    assert all(torch.equal(v, again.state_dict[k]) for k, v in conv_.state_dict.items())  # seeded decoder


def test_with_decoder_pretraining_file_keeps_the_encoder_only(tmp_path):
    """main.py's *_withdecoder_ct_pretrained.pth: {'module': MambaMIM state dict (sparse_encoder.*, light decoder,
    densify projections, mask tokens, A_interpolation, 'config'), 'optimizer', 'args', ...}; via the CLI."""
    enc = random_official(official_shapes(TINY, 1, 2, encoder_only=True, mask_token=True), seed=5)
    module = {"sparse_encoder." + k: v for k, v in enc.items()}
    module.update({"A_interpolation": torch.zeros(1, 12, 12), "mask_tokens.0": torch.zeros(1, 12, 1, 1, 1),
                   "mask_tokens.1": torch.zeros(1, 12, 1, 1, 1), "densify_projs.0.weight": torch.zeros(768, 12, 1, 1, 1),
                   "densify_projs.0.bias": torch.zeros(768), "dense_decoder.proj.weight": torch.zeros(1, 48, 1, 1, 1),
                   "dense_decoder.dec.0.up_sample.weight": torch.zeros(768, 768, 2, 2, 2), "config": {"mask_ratio": 0.75}})
    ck = tmp_path / "mambamim_withdecoder_ct_pretrained.pth"
    torch.save({"args": "...", "input_size": 96, "arch": "mambamim", "epoch": 3, "performance_desc": "0.1 0.1",
                "module": module, "optimizer": {"state": {}, "param_groups": []}, "is_pretrain": True}, ck)
    from medmamba.cli import main
    out = tmp_path / "hy.pth"
    assert main(["weights", "import", "--from", "mambamim", str(ck), "--arch", "hymamba", str(out),
                 "--out-channels", "3"]) == 0
    saved = torch.load(out, weights_only=False)
    meta = saved["medmamba_weights"]
    assert meta["arch"] == "hymamba" and meta["out_channels"] == 3
    assert any("pretraining-only" in n and "dense_decoder.*" in n for n in meta["notes"])
    net = nets.create("hymamba", 1, 3, **meta["net_kwargs"])
    net.load_state_dict(saved["network_weights"], strict=True)
    assert torch.equal(net.state_dict()["mae.blocks.1.mamba.x_proj.weight"], enc["mae.blocks.1.mamba.x_proj.weight"])


def test_errors_name_the_problem(capsys):
    enc = random_official(official_shapes(TINY, 1, 2, encoder_only=True))
    with pytest.raises(CheckpointError, match="MambaMIM checkpoints are HyMamba.*--arch hymamba.*umamba_bot"):
        convert("mambamim", enc, "umamba_bot")
    broken = {k: v for k, v in enc.items() if k != "embeddings.encoder2.norm1.weight"}
    with pytest.raises(CheckpointError, match=r"does not fit hymamba.*Missing.*embeddings\.encoder2\.norm1\.weight"):
        convert("mambamim", broken, "hymamba")
    extra = dict(enc, **{"mae.blocks.0.mamba.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"Not placed in hymamba.*mae\.blocks\.0\.mamba\.extra\.weight"):
        convert("mambamim", extra, "hymamba")
    with pytest.raises(CheckpointError, match="not a MambaMIM"):
        convert("mambamim", {"model": {"encoder.stem.0.conv1.weight": torch.zeros(1)}}, "hymamba")
    with pytest.raises(CheckpointError, match="3D only"):
        convert("mambamim", enc, "hymamba", spatial_dims=2)
    odd = {"sparse_encoder." + k: v for k, v in enc.items()}
    odd["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="something.else"):
        convert("mambamim", odd, "hymamba")


def test_deep_supervision_heads():
    net = _ours(TINY, 1, 2, deep_supervision=True)
    outs = net(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
    assert net.ds_scales == [1, 2, 4, 8]
    net.deep_supervision = False
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == \
        {f"decoder.ds_heads.{i}.{w}" for i in range(3) for w in ("weight", "bias")}
    with pytest.raises(ValueError, match="strides"):
        nets.create("hymamba", 1, 2, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])


# ---- Mamba bimamba_type="v1" ---------------------------------------------------------------------------

def test_mamba_v1_has_the_backward_tensors_as_buffers_and_the_plain_forward_float64():
    torch.manual_seed(0)
    m = Mamba(12, d_state=4, bimamba_type="v1")
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == mamba_shapes(12, 4, 4, 2)
    params = {n for n, _ in m.named_parameters()}
    assert not any("_b" in n for n in params)  # never trained, never seen by DDP
    torch.testing.assert_close(m.A_b_log, torch.log(torch.arange(1, 5.0)).repeat(24, 1))
    assert torch.all(m.D_b == 1)
    # loads an official-style state dict strictly, and the forward ignores the *_b tensors
    P = {k: v for k, v in random_official({"mamba." + k: s for k, s in mamba_shapes(12, 4, 4, 2).items()}).items()}
    m.load_state_dict({k[len("mamba."):]: v for k, v in P.items()}, strict=True)
    x = torch.randn(2, 19, 12)
    ref = mamba_ref(x.double(), {k: v.double() for k, v in P.items()}, "mamba.", 4, 4)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    plain = Mamba(12, d_state=4)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k in plain.state_dict()}, strict=True)
    torch.testing.assert_close(plain(x), m(x))
    with pytest.raises(ValueError, match="v2"):
        Mamba(12, bimamba_type="v2")


def test_converted_file_is_an_nnunet_pretrained_weights_file(tmp_path):
    """`weights import --from mambamim` output -> nnUNetTrainerHyMamba -pretrained_weights (the loader it uses):
    everything but the class-dependent heads is loaded."""
    from medmamba.nnunet import pretrained
    from medmamba.nnunet.trainers import ENCODER_MODULES
    from medmamba.weights import save

    enc = random_official(official_shapes(TINY, 1, 2, encoder_only=True, mask_token=True), seed=6)
    conv_ = convert("mambamim", enc, "hymamba", out_channels=5)
    save(conv_, tmp_path / "hy.pth", source="mambamim")
    net = nets.create("hymamba", 1, 3, **conv_.net_kwargs)
    heads = pretrained.head_keys_by_rebuild(net, lambda n: nets.create("hymamba", 1, n, **conv_.net_kwargs), 3)
    assert heads == {f"decoder.{h}.{w}" for h in ("out.conv", "ds_heads.0", "ds_heads.1", "ds_heads.2")
                     for w in ("weight", "bias")}
    pretrained.load_weights(net, tmp_path / "hy.pth", encoder_modules=ENCODER_MODULES["hymamba"], head_keys=heads,
                            log=lambda s: None)
    for k, v in enc.items():
        if k != "mae.mask_token":
            assert torch.equal(net.state_dict()[k], v), k
