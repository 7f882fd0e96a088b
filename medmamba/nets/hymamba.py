"""HyMamba: the hybrid CNN-Mamba segmentation network MambaMIM pretrains and fine-tunes (3D).

Reimplemented from FengheTan9/MambaMIM ``models/network/hymamba.py`` @ 8b96c053 (``build_hybird``, class
``Hybird``); the defaults are ``build_hybird``'s configuration and the state-dict keys and shapes are the
official ones, so MambaMIM's published weights load strictly (``medmamba weights import --from mambamim``).

API (stable): ``HyMamba(in_channels, out_channels, spatial_dims=3, channels=(32, 64, 128, 192, 384),
depths=(1, 2, 2, 2, 1), kernels=(3, 3, 3, 3, 3), exp_r=(2, 2, 4, 4, 4), mamba_depth=4, img_size=96,
d_state=16, d_conv=4, expand=2, norm_name="instance", deep_supervision=False, **nnunet_kwargs)``.

Structure (C = channels; input (B, in_channels, D, H, W), every spatial size divisible by 16):

* ``embeddings`` (CNN encoder): ``stem`` conv 3^3 in -> C0 at full resolution; ``expend1`` conv 3^3
  C0 -> C1 gives x1 (C1 @ 1); then per level i = 2..4: 2x max-pool, ``layer{i}`` (depths[i-1] MedNeXt blocks
  at C[i-1], kernel kernels[i-1], expansion exp_r[i-1]), ``expend{i}`` conv 3^3 C[i-1] -> C[i] gives x_i
  (C[i] @ 1/2^(i-1)); a last max-pool and ``layer5`` (depths[4] MedNeXt blocks at C4) give x5 (C4 @ 1/16).
  ``encoder1..4``: residual skip blocks (two 3^3 convs, channels-first LayerNorms, eps 1e-6) on x1..x4.
  Entry 0 of depths/kernels/exp_r is unused, as in the official network.
* ``mae`` (bottleneck): x5 flattened to (B, N, C4) tokens in (D, H, W) raster order, plus the fixed 3D
  sin-cos position embedding ``pos_embed`` (1, N, C4) (C4 divisible by 6), then ``mamba_depth`` blocks
  x = x + Mamba(LN(x)); x = x + MLP(LN(x)) (MLP C4 -> 2 C4 -> C4, GELU; LayerNorm eps 1e-5; Mamba with
  ``bimamba_type="v1"``, i.e. the plain forward plus unused backward tensors, see
  ``medmamba.layers.mamba``), reshaped back to (B, C4, D/16, H/16, W/16).
* ``decoder``: ``decoder5..2`` MONAI ``UnetrUpBlock`` (transposed conv 2, concat skip, residual block,
  instance norm) C4@1/16 -> C4@1/8 -> C3@1/4 -> C2@1/2 -> C1@1; ``decoder1`` residual skip block C1 -> C0
  (LayerNorm, with 1x1 projection); ``out.conv`` 1x1 C0 -> out_channels.

Output: logits (B, out_channels, D, H, W); with ``deep_supervision`` a list, full resolution first, plus
1x1 heads ``decoder.ds_heads.{0,1,2}`` on the decoder features at 1/2, 1/4, 1/8 (ours, not in the official
network; always built, so checkpoints load either way, and they stop requiring grad while deep
supervision is off). ``ds_scales`` = [1, 2, 4, 8].

Position embedding on other patch sizes: the official builds a cubic grid img_size/16 per axis (6^3 for
96^3) and stores it as a frozen parameter (in every checkpoint). ``pos_embed`` here has the shape of the
``img_size`` grid (so checkpoints load; a buffer, not a frozen parameter as in the official code: same key);
an input whose token grid differs gets the same fixed formula evaluated on its own (d, h, w) grid (what a
fixed embedding allows; identical for cubic grids).

Size with the defaults (1 -> 14 classes): 41.44M trainable parameters (+ 0.01M DS heads), plus buffers
``mae.pos_embed`` (0.08M) and the unused backward Mamba tensors (0.32M); the official network counts
41.84M parameters, the same tensors (all Parameters there). 4.9 TFLOPs at 128^3 (docs/model_card.md).

nnU-Net keywords: ``input_channels``/``num_classes``, ``deep_supervision``, ``conv_op`` (Conv3d only),
``norm_op`` (instance/batch for the UNETR blocks), ``n_stages``/``strides`` (validated: isotropic, total 16,
DS scales 1, 2, 4, 8) and the other ``dynamic_network_architectures`` keys (accepted, ignored).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetrUpBlock

from medmamba.layers.mamba import Mamba, fp32_region
from medmamba.layers.mednext import LNResBlock, MedNeXtBlock
from medmamba.nets.conventions import (DecoderOwnsDeepSupervision, DeepSupervisionSwitch, check_input,
                                        resolve_channels, resolve_spatial_dims)
from medmamba.nets.swin_umamba import _IGNORED_PLAN_KEYS, _check_plan_strides, _norm_name

__all__ = ["HyMamba", "sincos_position_embedding_3d"]


def sincos_position_embedding_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MambaMIM's fixed 3D sin-cos embedding, (1, d*h*w, dim), tokens in raster order (last axis fastest).

    Per token at (i, j, k): [sin(i w), cos(i w), sin(j w), cos(j w), sin(k w), cos(k w)] with
    w_m = temperature^(-m / (dim/6)), m = 0 .. dim/6 - 1; computed in float32 as the official does.
    """
    if dim % 6:
        raise ValueError(f"the 3D sin-cos position embedding needs a dimension divisible by 6, got {dim}")
    a, b, c = (torch.arange(int(n), dtype=torch.float32) for n in grid)
    ga, gb, gc = torch.meshgrid(a, b, c, indexing="ij")
    m = dim // 6
    omega = 1.0 / temperature ** (torch.arange(m, dtype=torch.float32) / m)
    parts = []
    for g in (ga, gb, gc):
        ang = g.reshape(-1, 1) * omega
        parts += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(parts, dim=1)[None]


class _Embeddings(nn.Module):
    """The CNN encoder (official ``Embeddings``): stem, widening convs, MedNeXt stages, skip blocks."""

    def __init__(self, in_channels, channels, depths, kernels, exp_r):
        super().__init__()
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        for i in range(2, 6):
            c = channels[i - 1]
            self.add_module(f"layer{i}", nn.Sequential(*[MedNeXtBlock(c, exp_r[i - 1], kernels[i - 1])
                                                         for _ in range(depths[i - 1])]))
        self.down = nn.MaxPool3d(2)
        for i in range(1, 5):
            self.add_module(f"expend{i}", nn.Conv3d(channels[i - 1], channels[i], 3, padding=1))
        for i in range(1, 5):
            self.add_module(f"encoder{i}", LNResBlock(channels[i], channels[i], 3))

    def forward(self, x):
        x1 = self.expend1(self.stem(x))
        x2 = self.expend2(self.layer2(self.down(x1)))
        x3 = self.expend3(self.layer3(self.down(x2)))
        x4 = self.expend4(self.layer4(self.down(x3)))
        x5 = self.layer5(self.down(x4))
        return [self.encoder1(x1), self.encoder2(x2), self.encoder3(x3), self.encoder4(x4), x5]


class _MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _MambaBlock(nn.Module):
    """x + Mamba(LN(x)), then x + MLP(LN(x)) (official ``MambaLayer``); the Mamba branch runs in float32."""

    def __init__(self, dim, d_state, d_conv, expand):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, bimamba_type="v1")
        self.mlp = _MLP(dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        in_dtype = x.dtype
        with fp32_region(x):
            h = x.to(torch.promote_types(in_dtype, torch.float32))
            x = (self.mamba(self.norm1(h)) + h).to(in_dtype)
        return self.mlp(self.norm2(x)) + x


class _Bottleneck(nn.Module):
    """Tokens + fixed sin-cos position embedding + Mamba blocks (official ``MaskedAutoencoderMamba``, sparse=False)."""

    def __init__(self, dim, depth, grid, d_state, d_conv, expand):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        # a frozen Parameter in the official network; a (persistent) buffer here: same state-dict key, never
        # handed to the optimiser or to DistributedDataParallel
        self.register_buffer("pos_embed", sincos_position_embedding_3d(self.grid, dim))
        self.blocks = nn.ModuleList(_MambaBlock(dim, d_state, d_conv, expand) for _ in range(depth))
        self._init_weights()

    def _init_weights(self):
        """The official initialisation: every Linear xavier-uniform with bias 0 (Mamba's dt_proj included, so
        its bias starts at 0 rather than at softplus^-1(dt)), LayerNorms 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        b, c, *grid = x.shape
        t = x.flatten(2).transpose(1, 2)
        if tuple(grid) == self.grid:
            pos = self.pos_embed
        else:  # another patch size: the same fixed embedding on this grid
            pos = sincos_position_embedding_3d(grid, c).to(device=x.device)
        t = t + pos.to(t.dtype)
        for blk in self.blocks:
            t = blk(t)
        return t.transpose(1, 2).reshape(b, c, *grid)


class _Decoder(DeepSupervisionSwitch, nn.Module):
    """UNETR up blocks ``decoder5..2``, LayerNorm residual block ``decoder1``, head ``out``; our DS heads."""

    def __init__(self, channels, out_channels, norm_name, deep_supervision):
        super().__init__()
        self.deep_supervision = deep_supervision
        up = dict(spatial_dims=3, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True)
        c = channels
        self.decoder5 = UnetrUpBlock(in_channels=c[4], out_channels=c[4], **up)
        self.decoder4 = UnetrUpBlock(in_channels=c[4], out_channels=c[3], **up)
        self.decoder3 = UnetrUpBlock(in_channels=c[3], out_channels=c[2], **up)
        self.decoder2 = UnetrUpBlock(in_channels=c[2], out_channels=c[1], **up)
        self.decoder1 = LNResBlock(c[1], c[0], 3)
        self.out = nn.Module()
        self.out.conv = nn.Conv3d(c[0], out_channels, 1)
        # ours: 1x1 heads on d2 (c2 @ 1/2), d3 (c3 @ 1/4), d4 (c4 @ 1/8)
        self.ds_heads = nn.ModuleList(nn.Conv3d(ch, out_channels, 1) for ch in (c[2], c[3], c[4]))
        self.ds_scales = [1, 2, 4, 8]
        self.deep_supervision = deep_supervision

    def _deep_supervision_only_modules(self):
        return list(self.ds_heads)

    def forward(self, feats):
        x1, x2, x3, x4, x5 = feats
        d4 = self.decoder5(x5, x4)
        d3 = self.decoder4(d4, x3)
        d2 = self.decoder3(d3, x2)
        d1 = self.decoder2(d2, x1)
        out = self.out.conv(self.decoder1(d1))
        if not self.deep_supervision:
            return out
        return [out] + [head(f) for head, f in zip(self.ds_heads, (d2, d3, d4))]


class HyMamba(DecoderOwnsDeepSupervision, nn.Module):
    """HyMamba (MambaMIM's ``build_hybird``): MedNeXt CNN encoder, Mamba bottleneck, UNETR decoder; 3D only.

    Args (MONAI names):
        in_channels, out_channels: input channels and classes (nnU-Net: ``input_channels``, ``num_classes``).
        spatial_dims: 3 (the official network is 3D; 2 is refused).
        channels: widths C0..C4, (32, 64, 128, 192, 384); C4 (the token width) divisible by 6.
        depths, kernels, exp_r: MedNeXt blocks, depthwise kernel and expansion per level (entry 0 unused):
            (1, 2, 2, 2, 1), (3, 3, 3, 3, 3), (2, 2, 4, 4, 4).
        mamba_depth: Mamba blocks in the bottleneck, 4.
        img_size: the patch size ``pos_embed`` is stored for (int or 3 ints), 96 -> a 6^3 token grid.
        d_state, d_conv, expand: Mamba settings (16, 4, 2).
        norm_name: norm of the UNETR up blocks ("instance", as published; nnU-Net's ``norm_op`` may pick batch).
        deep_supervision: also return logits at 1/2, 1/4, 1/8 (our heads; off by default).

    Input (B, in_channels, D, H, W), each of D, H, W divisible by 16; output (B, out_channels, D, H, W),
    or a list of 4 with deep supervision. Submodules ``embeddings``, ``mae`` (encoder) and ``decoder``.
    """

    divisor = 16
    SPATIAL_DIMS = (3,)

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None,
                 channels: Sequence[int] = (32, 64, 128, 192, 384), depths: Sequence[int] = (1, 2, 2, 2, 1),
                 kernels: Sequence[int] = (3, 3, 3, 3, 3), exp_r: Sequence[int] = (2, 2, 4, 4, 4),
                 mamba_depth: int = 4, img_size: int | Sequence[int] = 96, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, norm_name: str | tuple = "instance", deep_supervision: bool = False, *,
                 input_channels: int | None = None, num_classes: int | None = None, n_stages: int | None = None,
                 conv_op=None, strides=None, norm_op=None, **plans_kwargs):
        super().__init__()
        name = type(self).__name__
        unknown = sorted(k for k in plans_kwargs if k not in _IGNORED_PLAN_KEYS)
        if unknown:
            raise TypeError(f"{name}: unexpected keyword argument(s) {unknown}")
        cin, cout = resolve_channels(name, in_channels, out_channels, input_channels, num_classes)
        sd = resolve_spatial_dims(name, spatial_dims, conv_op)
        if sd != 3:
            raise ValueError(f"{name} is 3D only (spatial_dims=3): the official network (MambaMIM's build_hybird) "
                             f"has 3D MedNeXt stages and a 3D sin-cos position embedding; got spatial_dims={sd}")
        channels, depths = [int(c) for c in channels], [int(d) for d in depths]
        kernels, exp_r = [int(k) for k in kernels], [int(e) for e in exp_r]
        if not (len(channels) == len(depths) == len(kernels) == len(exp_r) == 5):
            raise ValueError(f"{name}: channels, depths, kernels and exp_r need 5 entries each (entry 0 of depths, "
                             f"kernels, exp_r is unused); got {channels}, {depths}, {kernels}, {exp_r}")
        if min(channels) < 1 or min(depths[1:]) < 0 or min(exp_r[1:]) < 1 or any(k % 2 == 0 for k in kernels[1:]):
            raise ValueError(f"{name}: channels >= 1, depths >= 0, exp_r >= 1 and odd kernels needed")
        if channels[4] % 6:
            raise ValueError(f"{name}: channels[4]={channels[4]} (the Mamba token width) must be divisible by 6 for "
                             f"the 3D sin-cos position embedding")
        size = [int(img_size)] * 3 if isinstance(img_size, (int, float)) else [int(s) for s in img_size]
        if len(size) != 3 or any(s < 16 or s % 16 for s in size):
            raise ValueError(f"{name}: img_size must be one or 3 multiples of 16, got {img_size!r}")
        plan_norm = _norm_name(name, norm_op)
        norm_name = plan_norm or norm_name
        _check_plan_strides(name, strides, n_stages, 3, [1, 2, 4, 8], self.divisor, deep_supervision)
        self.in_channels, self.out_channels, self.spatial_dims = cin, cout, 3
        self.channels = tuple(channels)
        self.img_size = tuple(size)
        self.embeddings = _Embeddings(cin, channels, depths, kernels, exp_r)
        self.mae = _Bottleneck(channels[4], int(mamba_depth), [s // 16 for s in size], d_state, d_conv, expand)
        self.decoder = _Decoder(channels, cout, norm_name, bool(deep_supervision))

    def forward(self, x: torch.Tensor):
        check_input(type(self).__name__, x, 3, self.in_channels, divisor=self.divisor)
        feats = self.embeddings(x)
        feats[4] = self.mae(feats[4])
        return self.decoder(feats)
