"""Mamba block, parameter-compatible with ``mamba_ssm.Mamba`` (v1).

Same parameter names, shapes and initialisation, so state dicts of published checkpoints (U-Mamba,
LightM-UNet, ...) load with ``strict=True``. The scan goes through ``medmamba.kernels.selective_scan``
(Triton on CUDA, PyTorch elsewhere); its state is float32 whatever autocast does to the projections.

``bimamba_type="v1"`` reproduces the Mamba class of MambaMIM's ``models/mamba/bi_vision_mamba.py``
(FengheTan9/MambaMIM @ 8b96c053, a copy of Vision Mamba's fork), which HyMamba builds with
``bimamba_type="v1"``: that class always allocates backward-direction tensors (``A_b_log``, ``conv1d_b``,
``x_proj_b``, ``dt_proj_b``, ``D_b``) but only its ``"v2"`` branch reads them; ``"v1"`` runs the plain
unidirectional forward (fused and unfused paths alike). So with ``"v1"`` the forward is exactly the default
one and the backward tensors are kept as non-trainable buffers under the official names: checkpoints load
strictly, and no parameter without a gradient reaches DistributedDataParallel or the optimiser.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medmamba.kernels import selective_scan


@contextlib.contextmanager
def fp32_region(x: torch.Tensor):
    """Disable autocast for the device of ``x``: the Mamba layers run their projections in float32.

    U-Mamba does this because the gated SSM output overflows float16 under AMP.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:  # e.g. the meta device (FLOP counting): nothing to disable
        yield


def _weight_at(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (out, in) @ x (batch, in, L) -> contiguous (batch, out, L), x row- or column-major per batch.

    ``torch.matmul`` would fold the batch into one mm of x's transpose and hand back a transposed view, whose
    copy into the channel-major layout costs several times the product on a CPU; ``bmm`` reads either layout.
    """
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


class _Held(nn.Module):
    """Tensors a checkpoint stores under a submodule's name that the computation never reads (buffers)."""

    def __init__(self, **tensors):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().clone())


class Mamba(nn.Module):
    """Selective state-space block: (batch, L, d_model) -> (batch, L, d_model).

    Arguments follow ``mamba_ssm.Mamba``. ``use_fast_path``, ``layer_idx``, ``device`` and ``dtype`` are
    accepted for drop-in compatibility; ``scan_backend`` forces a selective-scan backend ("torch",
    "triton") instead of choosing by device. ``bimamba_type``: ``"none"`` (default, mamba_ssm's Mamba) or
    ``"v1"`` (MambaMIM's bi_vision_mamba Mamba as HyMamba builds it: same forward, plus the unused
    backward-direction tensors ``A_b_log, conv1d_b.{weight,bias}, x_proj_b.weight, dt_proj_b.{weight,bias},
    D_b`` as buffers, initialised as that class initialises them; see the module docstring).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, scan_backend=None,
                 bimamba_type="none"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if bimamba_type not in ("none", "v1"):
            raise ValueError(f"Mamba: bimamba_type must be 'none' or 'v1' (MambaMIM's HyMamba), got {bimamba_type!r}; "
                             f"'v2' (a true backward scan) is not implemented: MambaMIM's file calls an "
                             f"un-imported function on that branch, so no published network runs it")
        self.bimamba_type = bimamba_type
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        # dt_proj: weight so that dt starts at the same variance; bias = softplus^-1 of dt in [dt_min, dt_max].
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1..N) for every channel, stored as log.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        if bimamba_type == "v1":  # allocated (and initialised) by MambaMIM's class, never read by its v1 forward
            self.register_buffer("A_b_log", torch.log(A).clone())
            conv_b = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                               bias=conv_bias, **factory)
            self.conv1d_b = _Held(**dict(conv_b.named_parameters()))
            self.x_proj_b = _Held(weight=nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False,
                                                   **factory).weight)
            dt_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
            self.dt_proj_b = _Held(weight=dt_b.weight, bias=dt_b.bias)
            self.register_buffer("D_b", torch.ones(self.d_inner, device=device))

    def forward(self, hidden_states, inference_params=None):
        if inference_params is not None:
            raise NotImplementedError("Mamba: step-wise decoding (inference_params) is not supported; "
                                      "pass the whole sequence")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: expected input (batch, L, d_model={self.d_model}), "
                             f"got shape {tuple(hidden_states.shape)}")
        batch, length, _ = hidden_states.shape
        # Channel-major (batch, channels, L) throughout, as mamba_ssm's reference path (weight @ x): the
        # d_inner-wide tensors are produced in the layout the scan and the depthwise conv read, never transposed
        # and copied (on a CPU those strided copies and a strided conv1d cost as much as the scan itself).
        xz = _weight_at(self.in_proj.weight, hidden_states.transpose(1, 2))  # (batch, 2*d_inner, L)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = _weight_at(self.dt_proj.weight, dt.transpose(1, 2))  # (batch, d_inner, L); bias added in the scan
        A = -torch.exp(self.A_log.float())
        dtype = x.dtype
        y = selective_scan(x.contiguous(), dt.to(dtype).contiguous(), A, B.transpose(1, 2).to(dtype).contiguous(),
                           C.transpose(1, 2).to(dtype).contiguous(), self.D.float(), z=z.to(dtype).contiguous(),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend)
        out = _weight_at(self.out_proj.weight, y)  # (batch, d_model, L)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias[:, None]
        return out.transpose(1, 2)  # (batch, L, d_model), a view of the channel-major result
