"""Masked (sparse) execution of a segmentation network's own encoder modules, SparK / MambaMIM style.

Nothing here copies or re-parameterises a network: the functions run the network's modules (and their
parameters) on masked inputs.

* Convolutional parts: :func:`sparsify_cnn` swaps every InstanceNorm/BatchNorm module for a
  :class:`MaskedNorm` holding the SAME parameter and buffer objects under the same names (so state-dict
  keys and shapes do not change), and registers forward hooks that re-zero the output of every
  convolution and pooling module at masked positions. Masked positions therefore stay exactly zero
  through conv - norm - nonlinearity - residual additions, and normalisation statistics are computed
  over the visible voxels only -- the usual dense emulation of sparse convolution.
* Mamba parts: :func:`masked_mamba_layer` (U-Mamba's ``MambaLayer``) and :func:`masked_cross_scan` /
  :func:`masked_vss_block` (Swin-UMamba's VSS blocks) gather the visible tokens of each sample into a
  shorter sequence (raster order, resp. each scan route's order), run the layer's own LayerNorm/Mamba/
  selective scan on it, and scatter the result back; masked positions come back as zeros.

All of them read the current masks from a :class:`MaskStore` (``store.pyramid``, a
``medmamba.pretrain.masking.MaskPyramid`` or ``None``). With ``None`` (dense mode) every module behaves
exactly like the original, and with an all-visible mask the results equal the dense forward (tested).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medmamba.runtime.distributed import sync_active, synced_moments
from medmamba.layers.mamba import fp32_region

__all__ = ["MaskStore", "MaskedNorm", "sparsify_cnn", "masked_mamba_layer", "masked_cross_scan",
           "masked_vss_block", "apply_channels_last_mask"]

_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ZERO_PRESERVING_FREE = (nn.modules.conv._ConvNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                         nn.modules.pooling._AdaptiveAvgPoolNd)
_UNSUPPORTED_NORMS = (nn.GroupNorm, nn.LocalResponseNorm)


class MaskStore:
    """Holds the mask pyramid of the batch being processed (a plain object, not a module)."""

    def __init__(self):
        self.pyramid = None

    def mask_for(self, x: torch.Tensor):
        """(B, 1, *S) mask matching ``x`` (channels-first), or None in dense mode."""
        if self.pyramid is None:
            return None
        return self.pyramid.mask(x.shape[2:], dtype=x.dtype)


class MaskedNorm(nn.Module):
    """Instance/batch norm whose statistics use the visible voxels only; output zero at masked voxels.

    Built from an existing norm module: the parameters and buffers are the same objects, registered
    under the same names, so a state dict of the wrapped network is unchanged. In dense mode (no
    pyramid) it computes exactly what the original module computes.
    """

    def __init__(self, norm: nn.Module, store: MaskStore):
        super().__init__()
        if not isinstance(norm, _NORMS):
            raise TypeError(f"MaskedNorm: unsupported norm {type(norm).__name__}")
        self.kind = "batch" if isinstance(norm, nn.modules.batchnorm._BatchNorm) else "instance"
        self.original_type = type(norm).__name__
        self.num_features = norm.num_features
        self.eps, self.momentum = norm.eps, norm.momentum
        self.affine, self.track_running_stats = norm.affine, norm.track_running_stats
        for name, p in norm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in norm.named_buffers(recurse=False):
            self.register_buffer(name, b)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if not hasattr(self, name):
                setattr(self, name, None)
        self._store = store

    def extra_repr(self) -> str:
        return f"{self.original_type}({self.num_features}, eps={self.eps}), statistics over visible voxels"

    def _dense(self, x):
        if self.kind == "instance":
            return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training or not self.track_running_stats, self.momentum or 0.0, self.eps)
        use_batch = self.training or self.running_mean is None
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.weight, self.bias, use_batch, momentum, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._store.mask_for(x)
        if m is None:
            if not (self.kind == "batch" and self.training and sync_active()):
                return self._dense(x)
            m = x.new_ones((x.shape[0], 1) + tuple(x.shape[2:]))  # dense, but statistics over every rank
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        mf = m.float()
        if self.kind == "instance" and (self.training or not self.track_running_stats):
            dims = tuple(range(2, x.dim()))
            count = mf.sum(dims, keepdim=True).clamp(min=1.0)
            mean = (xf * mf).sum(dims, keepdim=True) / count
            var = (((xf - mean) * mf) ** 2).sum(dims, keepdim=True) / count
        elif self.kind == "batch" and (self.training or self.running_mean is None):
            dims = (0,) + tuple(range(2, x.dim()))
            if sync_active():  # DDP: statistics over the visible voxels of every rank's batch
                mean, var, count = synced_moments(x, dims, m)
            else:
                count = mf.sum(dims, keepdim=True).clamp(min=1.0)
                mean = (xf * mf).sum(dims, keepdim=True) / count
                var = (((xf - mean) * mf) ** 2).sum(dims, keepdim=True) / count
            if self.training and self.track_running_stats and self.running_mean is not None:
                with torch.no_grad():
                    n = float(count.flatten()[0])
                    if self.num_batches_tracked is not None:
                        self.num_batches_tracked.add_(1)
                    momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    unbiased = var.flatten() * (n / max(n - 1.0, 1.0))
                    self.running_mean.mul_(1 - momentum).add_(mean.flatten().to(self.running_mean.dtype), alpha=momentum)
                    self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        else:  # running statistics (eval)
            mean = self.running_mean.float().view(shape)
            var = self.running_var.float().view(shape)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float().view(shape)
        if self.bias is not None:
            y = y + self.bias.float().view(shape)
        return (y * mf).to(x.dtype)


def _zero_hook(store: MaskStore):
    def hook(module, inputs, output):
        if store.pyramid is None or not isinstance(output, torch.Tensor) or output.dim() < 3:
            return None
        return output * store.pyramid.mask(output.shape[2:], dtype=output.dtype)
    return hook


def sparsify_cnn(module: nn.Module, store: MaskStore) -> list:
    """Make a convolutional (sub)module mask-aware in place; returns the hook handles.

    Every InstanceNorm/BatchNorm is replaced by a :class:`MaskedNorm` (every reference to it: e.g.
    ``ConvDropoutNormReLU`` holds its norm both as ``.norm`` and inside ``.all_modules``), and every
    convolution / pooling gets a forward hook that zeroes its output at masked positions. Raises on
    norms that cannot be emulated (GroupNorm mixes channels and voxels: not supported).
    """
    replaced: dict[int, nn.Module] = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if isinstance(child, _UNSUPPORTED_NORMS):
                raise NotImplementedError(f"masked pretraining: {type(child).__name__} in the convolutional encoder is "
                                          f"not supported (only InstanceNorm and BatchNorm)")
            if isinstance(child, _NORMS):
                new = replaced.get(id(child))
                if new is None:
                    new = replaced[id(child)] = MaskedNorm(child, store)
                parent._modules[name] = new
    handles, seen = [], set()
    for m in module.modules():
        if isinstance(m, _ZERO_PRESERVING_FREE) and id(m) not in seen:
            seen.add(id(m))
            handles.append(m.register_forward_hook(_zero_hook(store)))
    return handles


def apply_channels_last_mask(x: torch.Tensor, store: MaskStore) -> torch.Tensor:
    """Zero the masked tokens of a channels-last map (B, *S, C)."""
    if store.pyramid is None:
        return x
    m = store.pyramid.mask(x.shape[1:-1], dtype=x.dtype)  # (B, 1, *S)
    return x * m.movedim(1, -1)


def masked_mamba_layer(layer: nn.Module, x: torch.Tensor, store: MaskStore) -> torch.Tensor:
    """U-Mamba's ``MambaLayer`` on the visible voxels only (channels-first in and out).

    Voxel tokens (``channel_token=False``): the visible voxels of each sample, in raster order, form a
    shorter sequence for the layer's LayerNorm + Mamba; masked voxels come back as zeros.
    Channel tokens (``channel_token=True``: tokens are channels, the voxel count is the model width, so
    voxels cannot be dropped): the layer runs on the map with masked voxels zeroed and its output is
    re-zeroed (documented deviation).
    """
    if store.pyramid is None:
        return layer(x)
    spatial = x.shape[2:]
    m = store.pyramid.mask(spatial, dtype=x.dtype)
    if getattr(layer, "channel_token", False):
        return layer(x * m) * m
    in_dtype = x.dtype
    b, c = x.shape[:2]
    idx = store.pyramid.visible_index(spatial).to(x.device)  # (B, n)
    with fp32_region(x):
        tokens = x.to(torch.promote_types(in_dtype, torch.float32)).flatten(2).transpose(1, 2)  # (B, L, C)
        vis = tokens.gather(1, idx.unsqueeze(-1).expand(b, idx.shape[1], c))
        out = layer.mamba(layer.norm(vis))
        full = out.new_zeros(b, tokens.shape[1], c).scatter(1, idx.unsqueeze(-1).expand_as(out), out)
    return full.transpose(1, 2).reshape(b, c, *spatial).to(in_dtype)


def masked_cross_scan(mixer: nn.Module, x: torch.Tensor, store: MaskStore) -> torch.Tensor:
    """``medmamba.layers.cross_scan.CrossScan`` on the visible tokens only; channels-last in and out.

    Same computation and parameters as ``CrossScan.forward``, except that (1) the depthwise conv is
    sparse (masked input zeroed, output re-zeroed) and (2) along every route only the visible tokens
    are scanned, in that route's order, so masked tokens neither feed nor interrupt the recurrence.
    """
    from medmamba.layers.cross_scan import multi_route_scan

    if store.pyramid is None:
        return mixer(x)
    spatial = tuple(x.shape[1:-1])
    b = x.shape[0]
    m_cf = store.pyramid.mask(spatial, dtype=x.dtype)  # (B, 1, *S)
    if mixer.gated:
        h, z = mixer.in_proj(x).chunk(2, dim=-1)
    else:
        h, z = mixer.in_proj(x), None
    h = h.movedim(-1, 1).contiguous() * m_cf
    h = mixer.act(mixer.conv(h)) * m_cf.to(h.dtype)  # (B, d_inner, *S)
    d = h.shape[1]
    length = h[0, 0].numel()
    perm, _ = mixer.scan_routes.permutations(spatial, h.device)  # (R, L): raster index at route position t
    r = perm.shape[0]
    vis = store.pyramid.visible_flat(spatial).to(h.device)  # (B, L)
    n = int(vis[0].sum())
    vis_routed = vis[:, perm]  # (B, R, L)
    order = torch.argsort((~vis_routed).to(torch.uint8), dim=-1, stable=True)[..., :n]  # visible, route order
    idx = perm.unsqueeze(0).expand(b, r, length).gather(2, order)  # (B, R, n) raster indices
    flat = h.flatten(2)  # (B, d, L)
    xs = flat.unsqueeze(1).expand(b, r, d, length).gather(3, idx.unsqueeze(2).expand(b, r, d, n))
    ys = multi_route_scan(xs, mixer.x_proj_weight, mixer.dt_projs_weight, mixer.dt_projs_bias, mixer.A_logs,
                          mixer.Ds, backend=mixer.scan_backend)  # (B, R, d, n) fp32
    y = ys.new_zeros(b, d, length)
    y = y.scatter_add(2, idx.reshape(b, 1, r * n).expand(b, d, r * n), ys.transpose(1, 2).reshape(b, d, r * n))
    y = y.view(b, d, *spatial).movedim(1, -1)
    y = mixer.out_norm(y)
    if z is not None:
        y = y * F.silu(z)
    out = mixer.out_proj(y)
    return out * m_cf.movedim(1, -1).to(out.dtype)


def masked_vss_block(block: nn.Module, x: torch.Tensor, store: MaskStore) -> torch.Tensor:
    """A ``medmamba.layers.vss.VSSBlock`` on the visible tokens: x + DropPath(mixer(LN x)) [+ FFN], channels-last.

    The LayerNorms and the FFN are per token; the mixer must be a ``CrossScan`` (others: NotImplementedError).
    """
    from medmamba.layers.cross_scan import CrossScan

    if store.pyramid is None:
        return block(x)
    if not isinstance(block.mixer, CrossScan):
        raise NotImplementedError(f"masked pretraining supports VSS blocks with the CrossScan mixer only, got "
                                  f"{type(block.mixer).__name__}")
    x = x + block.drop_path(masked_cross_scan(block.mixer, block.norm(x), store))
    if block.ffn is not None:
        x = x + block.drop_path(block.ffn(block.norm2(x)))
    return apply_channels_last_mask(x, store)
