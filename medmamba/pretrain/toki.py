"""TOKI (token interpolation, MambaMIM): fill the masked bottleneck tokens from their visible neighbours.

Per sample, over the bottleneck tokens in raster order (last axis fastest), every maximal run of masked
tokens between visible tokens ``a < b`` is filled by a linear state-space recurrence over linearly
interpolated inputs::

    x~_j = (1 - alpha_j) * x_a + alpha_j * x_b,   alpha_j = (j - a) / (b - a),
    h_j  = A h_{j-1} + x~_j,                      for j = a+1 .. b-1,

with the state zero before the run (``h_a = 0``; the visible token enters only through ``x~``), i.e.
``h_j = sum_{q=a+1}^{j} A^(j-q) x~_q``. ``A`` is a learnable C x C matrix initialised to zero, so at
initialisation TOKI is exactly the linear interpolation. Visible tokens are returned unchanged.

Runs without a neighbour on one side (choice documented in docs/pretraining.md): a run before the first
visible token uses ``x~_j = x_b`` (alpha = 1) and a run after the last visible token ``x~_j = x_a``
(alpha = 0) -- constant extension of the one neighbour -- with the same recurrence. (Every sample has at
least one visible token.)

Everything is per sample: the neighbours, runs and states of one sample never see another sample.
The recurrence runs sequentially over the L positions (L = bottleneck tokens, a few hundred), each step
one (B, C) x (C, C) product, so the cost is negligible next to the encoder.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TOKI", "toki_fill", "interpolation_inputs"]


def interpolation_inputs(tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """x~ for every position: (B, L, C) tokens, (B, L) bool visible -> (B, L, C).

    At visible positions the result is the token itself (alpha = 0 with a = j)."""
    b, length, c = tokens.shape
    if visible.shape != (b, length):
        raise ValueError(f"TOKI: visible must be (B, L) = {(b, length)}, got {tuple(visible.shape)}")
    if not bool(visible.any(1).all()):
        raise ValueError("TOKI: every sample needs at least one visible token")
    pos = torch.arange(length, device=tokens.device).expand(b, length)
    left = torch.where(visible, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # last visible <= j
    right_rev = torch.where(visible, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values
    right = right_rev.flip(1)  # first visible >= j
    has_left, has_right = left >= 0, right < length
    x_a = tokens.gather(1, left.clamp(min=0).unsqueeze(-1).expand(b, length, c))
    x_b = tokens.gather(1, right.clamp(max=length - 1).unsqueeze(-1).expand(b, length, c))
    span = (right - left).clamp(min=1).to(tokens.dtype)
    alpha = (pos - left).to(tokens.dtype) / span
    alpha = torch.where(has_left & has_right, alpha,
                        torch.where(has_right, torch.ones_like(alpha), torch.zeros_like(alpha)))
    alpha = torch.where(visible, torch.zeros_like(alpha), alpha).unsqueeze(-1)
    return (1 - alpha) * x_a + alpha * x_b


def toki_fill(tokens: torch.Tensor, visible: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(B, L, C) tokens (values at masked positions are ignored), (B, L) bool visible, A (C, C) -> (B, L, C)."""
    b, length, c = tokens.shape
    if A.shape != (c, c):
        raise ValueError(f"TOKI: A must be ({c}, {c}), got {tuple(A.shape)}")
    x_tilde = interpolation_inputs(tokens, visible)
    masked = (~visible).unsqueeze(-1)  # (B, L, 1)
    a_t = A.t().to(tokens.dtype)
    h = torch.zeros(b, c, dtype=tokens.dtype, device=tokens.device)
    states = []
    for j in range(length):
        # h_j = A h_{j-1} + x~_j inside a masked run; the state is reset to 0 at visible tokens
        h = torch.where(masked[:, j], h @ a_t + x_tilde[:, j], torch.zeros_like(h))
        states.append(h)
    filled = torch.stack(states, dim=1)
    return torch.where(masked, filled, tokens)


class TOKI(nn.Module):
    """Token interpolation on a channels-first feature map: (B, C, *S) + (B, L) visible -> (B, C, *S).

    ``A`` (C x C) is learnable and starts at zero (pure linear interpolation).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        self.A = nn.Parameter(torch.zeros(self.channels, self.channels))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Runs in float32 with autocast off; returns float32."""
        from medmamba.layers.mamba import fp32_region

        spatial = x.shape[2:]
        with fp32_region(x):
            tokens = x.float().flatten(2).transpose(1, 2)  # (B, L, C): raster order, channels last
            out = toki_fill(tokens, visible.to(x.device), self.A.float())
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], *spatial)  # back to (B, C, *S)
