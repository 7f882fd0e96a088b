"""Argument conventions shared by every network: MONAI names and nnU-Net plans names, input checks.

Every network accepts MONAI-style ``in_channels/out_channels/spatial_dims`` and the keywords
nnU-Net's ``get_network_from_plans`` passes (``input_channels, num_classes, deep_supervision`` plus the
``dynamic_network_architectures`` set, e.g. ``conv_op``), so one class serves MONAI configs and plans.
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import torch


def resolve_channels(cls_name: str, in_channels, out_channels, input_channels=None, num_classes=None):
    """Return (in_channels, out_channels) from either naming; refuse contradictions and omissions."""
    def pick(monai_value, nnunet_value, monai_name, nnunet_name):
        if monai_value is not None and nnunet_value is not None and monai_value != nnunet_value:
            raise ValueError(f"{cls_name}: {monai_name}={monai_value} contradicts {nnunet_name}={nnunet_value}")
        value = monai_value if monai_value is not None else nnunet_value
        if value is None:
            raise ValueError(f"{cls_name}: {monai_name} (or nnU-Net's {nnunet_name}) is required")
        if int(value) != value or value < 1:
            raise ValueError(f"{cls_name}: {monai_name} must be a positive integer, got {value!r}")
        return int(value)

    return (pick(in_channels, input_channels, "in_channels", "input_channels"),
            pick(out_channels, num_classes, "out_channels", "num_classes"))


def resolve_spatial_dims(cls_name: str, spatial_dims=None, conv_op=None, allowed: Sequence[int] = (2, 3)) -> int:
    """spatial_dims from the MONAI argument or from an nnU-Net ``conv_op`` (class or dotted path)."""
    from_conv = None
    if conv_op is not None:
        op = pydoc.locate(conv_op) if isinstance(conv_op, str) else conv_op
        names = {torch.nn.Conv1d: 1, torch.nn.Conv2d: 2, torch.nn.Conv3d: 3}
        if op not in names:
            raise ValueError(f"{cls_name}: conv_op must be torch.nn.Conv2d or Conv3d, got {conv_op!r}")
        from_conv = names[op]
    if spatial_dims is not None and from_conv is not None and spatial_dims != from_conv:
        raise ValueError(f"{cls_name}: spatial_dims={spatial_dims} contradicts conv_op={conv_op!r}")
    dims = spatial_dims if spatial_dims is not None else (from_conv if from_conv is not None else 3)
    if dims not in allowed:
        raise ValueError(f"{cls_name}: spatial_dims must be one of {tuple(allowed)}, got {dims!r}")
    return dims


def check_input(cls_name: str, x: torch.Tensor, spatial_dims: int, in_channels: int, divisor=1) -> None:
    """Clear errors for the three usual mistakes: wrong rank, wrong channel count, size not divisible."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{cls_name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        axes = "(batch, channels, " + ", ".join("DHW"[3 - spatial_dims:]) + ")"
        raise ValueError(f"{cls_name}: expected a {spatial_dims + 2}D input {axes}, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{cls_name}: expected {in_channels} input channel(s), got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    divs = [divisor] * spatial_dims if isinstance(divisor, int) else list(divisor)
    bad = [(s, d) for s, d in zip(x.shape[2:], divs) if s % d]
    if bad:
        raise ValueError(f"{cls_name}: every spatial size must be divisible by {tuple(divs)} "
                         f"(the network's total downsampling); got spatial shape {tuple(x.shape[2:])}. "
                         f"Pad or crop the input, e.g. with monai.transforms.DivisiblePad(k={tuple(divs)}).")


class DeepSupervisionSwitch:
    """Decoder mixin: ``deep_supervision`` is a property, and the heads only deep supervision uses stop
    requiring grad while it is off.

    The heads are always built (a checkpoint trained with deep supervision loads strictly into a network
    without it), so with it off they would get no gradient; DistributedDataParallel (nnU-Net's
    ``-num_gpus``, ``torchrun``) all-reduces every parameter that requires grad and would wait for
    theirs (silently skipping the reduction of their bucket in the first step, raising in the next).
    Subclasses list those heads in ``_deep_supervision_only_modules`` and set the attribute once more at
    the end of ``__init__``.
    """

    def _deep_supervision_only_modules(self):
        return []

    @property
    def deep_supervision(self) -> bool:
        return self.__dict__.get("_deep_supervision", False)

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.__dict__["_deep_supervision"] = bool(value)
        try:
            heads = self._deep_supervision_only_modules()
        except AttributeError:  # set early in __init__, before the heads exist
            return
        for m in heads:
            for p in m.parameters():
                p.requires_grad_(bool(value))


class DecoderOwnsDeepSupervision:
    """Network mixin: ``deep_supervision`` and ``ds_scales`` are the decoder's (the decoder builds the heads
    and decides what ``forward`` returns; nnU-Net switches ``network.decoder.deep_supervision`` itself)."""

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = bool(value)

    @property
    def ds_scales(self) -> list[int]:
        return list(self.decoder.ds_scales)
