"""MambaMIM pretraining model: masked encoder + TOKI + SparK-style light decoder + masked-patch MSE.

``MambaMIM(net, arch, patch, ...)`` wraps a freshly built segmentation network ``net``:

1. a mask pyramid is drawn per batch (``mask_ratio`` of the bottleneck tokens, per sample);
2. the network's encoder runs masked (``encoders.py``) and returns sparse features per level;
3. densify: every level is normalised over its visible positions (masked BatchNorm); its masked positions
   are filled by TOKI at the deepest level and by a learnable mask token (one per level) elsewhere; a
   projection (1x1 conv at the deepest level, 3^3 elsewhere) maps it to the decoder width of that level;
4. light decoder (MambaMIM's ``models/decoder.py``), deepest level first: transposed conv (kernel = stride
   = the level's upsampling factor, 2 for the usual k2 s2) + 2 x (conv 3^3 - BN - ReLU) to the next level,
   CONCATENATE that level's densified features and fuse them with 2 x (conv 3^3 - BN - ReLU); a
   full-resolution top level is never read (as published); if the highest level is below the input
   resolution, one more up-block; 1x1 conv to the input channels;
5. loss: every bottleneck token's input footprint is a patch; the target patch is normalised by its own
   mean and std; MSE averaged over the masked patches only.

``export_network_weights`` turns the pretrained encoder into a full state dict of a freshly built
segmentation network (decoder freshly initialised).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from medmamba.pretrain.encoders import masked_encoder_for
from medmamba.pretrain.masking import MaskPyramid, patchify, unpatchify
from medmamba.pretrain.network import ENCODER_MODULES, check_arch
from medmamba.pretrain.sparse import MaskedNorm, MaskStore
from medmamba.pretrain.toki import TOKI

__all__ = ["MambaMIM", "LightDecoder", "export_network_weights"]


def _conv_bn_relu(c_in, c_out):
    # The published convs carry a bias before the BatchNorm, which the norm removes (same function); it is
    # left out here: its gradient is zero up to rounding, and AdamW would turn that noise into lr-sized steps.
    return [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]


class LightDecoder(nn.Module):
    """SparK-like light decoder over densified features, as MambaMIM's ``models/decoder.py`` (see the
    module docstring, steps 3-4).

    Widths: ``width`` at the deepest level, halved per level up (at least ``min_width``). Deepest first,
    per level l: ``ups[l]`` (transposed conv, kernel = stride = the level's upsampling factor, width kept)
    and ``blocks[l]`` (conv 3^3 w_{l+1} -> w_l - BN - ReLU - conv 3^3 - BN - ReLU): the published
    ``UNetBlock``; then, if level l is read, ``fuses[l]`` over the CONCATENATION of the upsampled map and
    the level's densified features (conv 3^3 2 w_l -> w_l - BN - ReLU - conv - BN - ReLU: the published
    ``FusionBlock``). A full-resolution top level is never read (as published: its last up-block lands
    there and goes to the 1x1 head); a top level below the input resolution is read, then one more
    up-block reaches the input. ``used_levels``: the levels read (densified).
    """

    def __init__(self, enc_channels: Sequence[int], scales: Sequence[Sequence[int]], out_channels: int,
                 width: int = 768, min_width: int = 16):
        super().__init__()
        n = len(enc_channels)
        self.n_levels = n
        widths = [max(int(width) // 2 ** (n - 1 - l), min_width) for l in range(n)]
        self.widths = widths
        top = tuple(int(s) for s in scales[0])
        top_full = all(s == 1 for s in top)
        self.used_levels = list(range(1 if top_full else 0, n))
        self.store = MaskStore()
        self.densify_norms = nn.ModuleList(
            MaskedNorm(nn.BatchNorm3d(c), self.store) if l in self.used_levels else nn.Identity()
            for l, c in enumerate(enc_channels))
        self.densify_projs = nn.ModuleList(
            nn.Conv3d(c, w, 1 if l == n - 1 else 3, padding=0 if l == n - 1 else 1)
            if l in self.used_levels else nn.Identity()
            for l, (c, w) in enumerate(zip(enc_channels, widths)))
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.fuses = nn.ModuleList()
        for l in range(n - 1):  # from level l+1 up to level l
            factor = tuple(int(a) // int(b) for a, b in zip(scales[l + 1], scales[l]))
            self.ups.append(nn.ConvTranspose3d(widths[l + 1], widths[l + 1], factor, stride=factor))
            self.blocks.append(nn.Sequential(*_conv_bn_relu(widths[l + 1], widths[l]),
                                             *_conv_bn_relu(widths[l], widths[l])))
            self.fuses.append(nn.Sequential(*_conv_bn_relu(2 * widths[l], widths[l]),
                                            *_conv_bn_relu(widths[l], widths[l]))
                              if l in self.used_levels else nn.Identity())
        self.final_up = None
        last = widths[0]
        if not top_full:
            w = max(widths[0] // 2, min_width)
            self.final_up = nn.Sequential(nn.ConvTranspose3d(widths[0], widths[0], top, stride=top),
                                          *_conv_bn_relu(widths[0], w), *_conv_bn_relu(w, w))
            last = w
        self.head = nn.Conv3d(last, out_channels, 1)

    def densify(self, feats, pyramid: MaskPyramid, mask_tokens, toki: TOKI):
        """Per level: None for a level the decoder does not read, else the densified, projected map."""
        out = []
        self.store.pyramid = pyramid
        try:
            for l, f in enumerate(feats):
                if l not in self.used_levels:
                    out.append(None)
                    continue
                f = self.densify_norms[l](f)  # statistics over visible positions, zero at masked ones
                if l == len(feats) - 1:
                    f = toki(f, pyramid.visible)
                else:
                    m = pyramid.mask(f.shape[2:], dtype=f.dtype)
                    f = f + (1 - m) * mask_tokens[str(l)].to(f.dtype)
                out.append(self.densify_projs[l](f))
        finally:
            self.store.pyramid = None
        return out

    def forward(self, dense: Sequence[torch.Tensor | None]) -> torch.Tensor:
        x = dense[-1]
        for l in reversed(range(self.n_levels - 1)):
            x = self.blocks[l](self.ups[l](x))
            if dense[l] is not None:
                x = self.fuses[l](torch.cat([x, dense[l]], dim=1))
        if self.final_up is not None:
            x = self.final_up(x)
        return self.head(x)


class MambaMIM(nn.Module):
    """Masked image modelling for the hybrid CNN-Mamba segmentation networks (see the module docstring).

    ``net``: a freshly built segmentation network (its encoder is wrapped in place and trained; its
    decoder is not used). ``forward(x, pyramid=None, generator=None) -> dict`` with ``loss``, ``pred``
    (normalised-patch reconstruction, input resolution), ``pyramid``; ``reconstruct(out, x)`` gives a
    de-normalised image for display.
    """

    def __init__(self, net: nn.Module, arch: str, patch: Sequence[int], in_channels: int = 1,
                 mask_ratio: float = 0.75, decoder_width: int = 768, norm_eps: float = 1e-6):
        super().__init__()
        self.arch = check_arch(arch)
        self.patch = tuple(int(p) for p in patch)
        self.in_channels = int(in_channels)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.norm_eps = float(norm_eps)
        self.backbone = masked_encoder_for(net, self.arch)
        self.backbone.check_patch(self.patch)
        self.grid = self.backbone.grid(self.patch)
        self.token_patch = tuple(int(s) for s in self.backbone.total_stride)  # input footprint of one token
        channels, scales = self.backbone.level_channels(), self.backbone.level_scales()
        self.toki = TOKI(channels[-1])
        self.decoder = LightDecoder(channels, scales, self.in_channels, width=decoder_width)
        # one learnable mask token per level the decoder reads, except the deepest (TOKI), keyed by level
        self.mask_tokens = nn.ParameterDict({str(l): nn.Parameter(torch.zeros(1, channels[l], 1, 1, 1))
                                             for l in self.decoder.used_levels if l < len(channels) - 1})
        for t in self.mask_tokens.values():
            nn.init.trunc_normal_(t, std=0.02)

    def draw_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> MaskPyramid:
        return MaskPyramid.random(batch, self.grid, self.mask_ratio, generator=generator, device=device)

    def forward(self, x: torch.Tensor, pyramid: MaskPyramid | None = None, generator=None) -> dict:
        if tuple(x.shape[2:]) != self.patch:
            raise ValueError(f"MambaMIM: expected crops of {self.patch}, got {tuple(x.shape[2:])}")
        if pyramid is None:
            pyramid = self.draw_mask(x.shape[0], x.device, generator)
        feats = self.backbone(x, pyramid)
        dense = self.decoder.densify(feats, pyramid, self.mask_tokens, self.toki)
        pred = self.decoder(dense).float()
        loss = self.loss(pred, x.float(), pyramid)
        return {"loss": loss, "pred": pred, "pyramid": pyramid}

    def target(self, x: torch.Tensor):
        """Per-patch normalised target (B, L, K), with each patch's mean and std."""
        t = patchify(x, self.token_patch)
        mean = t.mean(-1, keepdim=True)
        std = (t.var(-1, unbiased=False, keepdim=True) + self.norm_eps).sqrt()
        return (t - mean) / std, mean, std

    def loss(self, pred: torch.Tensor, x: torch.Tensor, pyramid: MaskPyramid) -> torch.Tensor:
        target, _, _ = self.target(x)
        err = (patchify(pred, self.token_patch) - target).pow(2).mean(-1)  # (B, L)
        masked = pyramid.masked.to(err.dtype)
        return (err * masked).sum() / masked.sum()

    @torch.no_grad()
    def reconstruct(self, out: dict, x: torch.Tensor) -> torch.Tensor:
        """Display image: visible patches from the input, masked patches predicted (de-normalised)."""
        _, mean, std = self.target(x.float())
        pred = patchify(out["pred"], self.token_patch) * std + mean
        vis = out["pyramid"].visible.unsqueeze(-1)
        merged = torch.where(vis, patchify(x.float(), self.token_patch), pred)
        return unpatchify(merged, self.token_patch, self.grid, x.shape[1])

    def encoder_state_dict(self) -> dict:
        """The pretrained encoder parts under the segmentation network's key names."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}


def export_network_weights(backbone_state: dict, fresh_net: nn.Module, arch: str) -> dict:
    """Full state dict of ``fresh_net`` with its encoder parts replaced by ``backbone_state``.

    The encoder parts are loaded module by module (strict), so aliases of the same tensors (e.g.
    ``decoder.encoder.*`` in U-Mamba, whose decoder holds the encoder) carry the pretrained values too;
    everything else keeps ``fresh_net``'s initialisation.
    """
    for prefix in ENCODER_MODULES[check_arch(arch)]:
        sub = {k[len(prefix) + 1:]: v for k, v in backbone_state.items() if k.startswith(prefix + ".")}
        fresh_net.get_submodule(prefix).load_state_dict(sub, strict=True)
    covered = sum(1 for k in backbone_state if any(k.startswith(p + ".") for p in ENCODER_MODULES[arch]))
    if covered != len(backbone_state):
        extra = [k for k in backbone_state if not any(k.startswith(p + ".") for p in ENCODER_MODULES[arch])]
        raise RuntimeError(f"pretrained encoder keys outside the encoder modules: {extra[:5]}")
    return {k: v.detach().cpu().clone() for k, v in fresh_net.state_dict().items()}
