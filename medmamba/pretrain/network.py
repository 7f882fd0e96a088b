"""The downstream segmentation network that pretraining targets, and what of it is "encoder".

:func:`build_downstream_network` builds the exact network whose ``state_dict`` the final pretraining
checkpoint must load into (strictly):

* without plans: ``medmamba.nets.create(arch, in_channels, out_channels, spatial_dims=3, **network_kwargs)``;
* with an nnU-Net plans file + configuration: the network our nnU-Net trainer for ``arch`` builds
  (``Trainer.build_network_architecture(plans_manager, configuration_manager, in_channels, out_channels,
  True)``) when ``medmamba.nnunet`` provides one, otherwise the plans' architecture keywords fed to our
  class, as nnU-Net's ``get_network_from_plans`` does (``_kw_requires_import`` resolved with
  ``pydoc.locate``, ``deep_supervision=True``, ``net.apply(net.initialize)`` when defined), plus the
  configuration's ``patch_size`` for the U-Mamba classes (U-Mamba Enc needs it at build time).
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import pydoc
from typing import Any

import torch
import torch.nn as nn

__all__ = ["SUPPORTED", "ENCODER_MODULES", "check_arch", "build_downstream_network", "load_plans",
           "find_trainer_for_arch", "encoder_state_keys"]

# registry name -> names of the downstream network's submodules that pretraining trains (the encoder)
ENCODER_MODULES = {
    "umamba_bot": ("encoder", "mamba_layer"),
    "umamba_enc": ("encoder",),
    "swin_umamba": ("encoder",),
}
SUPPORTED = tuple(ENCODER_MODULES)
_CLASS_TO_NAME = {"UMambaBot": "umamba_bot", "UMambaEnc": "umamba_enc", "SwinUMamba": "swin_umamba"}


def check_arch(arch: str) -> str:
    """Registry name for ``arch`` (registry or class name); clear error if pretraining does not support it."""
    from medmamba import nets

    name = _CLASS_TO_NAME.get(arch, arch)
    if name in ENCODER_MODULES:
        return name
    known = nets.available()
    what = "is a known network but has no masked-pretraining support" if name in known or arch in \
        [nets.get_class(n).__name__ for n in known] else "is not a known network"
    raise ValueError(f"MambaMIM pretraining: architecture {arch!r} {what}. Supported: {', '.join(SUPPORTED)} "
                     f"(hybrid CNN-Mamba encoders; all networks: {', '.join(known)})")


def load_plans(plans) -> dict:
    """A plans dict from a path to ``nnUNetPlans.json`` or a dict (copied)."""
    if isinstance(plans, dict):
        return copy.deepcopy(plans)
    with open(os.fspath(plans)) as f:
        return json.load(f)


def _trainer_modules():
    mods = []
    for name in ("medmamba.nnunet", "medmamba.nnunet.trainers"):
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:  # the plugin is optional; real import errors inside it propagate
            if exc.name not in ("medmamba.nnunet", name):
                raise
    return mods


def find_trainer_for_arch(arch: str):
    """Our nnU-Net trainer class for ``arch``, or None when ``medmamba.nnunet`` does not provide one.

    Looks for a mapping (``ARCH_TO_TRAINER``, ``TRAINERS``, ``TRAINER_FOR_ARCH``, ``TRAINER_BY_ARCH``,
    ``ARCH_TRAINERS``: dict arch -> class / class name / dotted path, or a function arch -> class), then
    for a trainer class whose ``arch``/``network_name``/``ARCH``/``arch_name`` attribute equals ``arch``.
    """
    mods = _trainer_modules()
    for mod in mods:
        for attr in ("ARCH_TO_TRAINER", "TRAINERS", "TRAINER_FOR_ARCH", "TRAINER_BY_ARCH", "ARCH_TRAINERS",
                     "trainer_for_arch", "get_trainer_class"):
            obj = getattr(mod, attr, None)
            if obj is None:
                continue
            if isinstance(obj, dict):
                value = obj.get(arch)
            elif callable(obj) and not inspect.isclass(obj):
                try:
                    value = obj(arch)
                except (KeyError, ValueError):
                    value = None
            else:
                continue
            if isinstance(value, str):
                value = getattr(mod, value, None) or pydoc.locate(value)
            if inspect.isclass(value) and hasattr(value, "build_network_architecture"):
                return value
    for mod in mods:
        for value in vars(mod).values():
            if inspect.isclass(value) and hasattr(value, "build_network_architecture"):
                for attr in ("arch", "network_name", "ARCH", "arch_name"):
                    if getattr(value, attr, None) == arch:
                        return value
    return None


def _from_plans(arch, plans: dict, configuration: str, in_channels: int, out_channels: int, network_kwargs):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba import nets

    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    trainer = find_trainer_for_arch(arch)
    if trainer is not None:
        if network_kwargs:
            raise ValueError("network keyword overrides cannot be combined with a plans-built network "
                             f"(our nnU-Net trainer {trainer.__name__} builds it); edit the plans instead")
        net = trainer.build_network_architecture(pm, cm, in_channels, out_channels, True)
        return net, {"builder": f"{trainer.__module__}.{trainer.__name__}.build_network_architecture"}
    kwargs = dict(cm.network_arch_init_kwargs)
    for key in cm.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    cls = nets.get_class(arch)
    if "patch_size" in inspect.signature(cls.__init__).parameters and "patch_size" not in kwargs:
        kwargs["patch_size"] = list(cm.patch_size)
    kwargs.update(network_kwargs or {})
    net = cls(input_channels=in_channels, num_classes=out_channels, deep_supervision=True, **kwargs)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net, {"builder": f"{cls.__module__}.{cls.__name__} from the plans' arch_kwargs"}


def build_downstream_network(arch: str, plans=None, configuration: str | None = None, in_channels: int = 1,
                             out_channels: int = 2, seed: int | None = None, network_kwargs: dict | None = None,
                             return_info: bool = False):
    """The segmentation network the pretrained checkpoint is for (see the module docstring).

    ``plans``: path to an nnU-Net plans JSON (or the dict); ``configuration`` then defaults to
    ``"3d_fullres"``. ``seed``: build under ``torch.manual_seed(seed)`` without touching the global RNG
    (the same seed gives the same initial weights). ``network_kwargs``: extra constructor keywords
    (without plans, or with plans when no trainer builds the network).
    """
    from medmamba import nets

    name = check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        if plans is None:
            net = nets.create(name, in_channels=in_channels, out_channels=out_channels, spatial_dims=3,
                              **(network_kwargs or {}))
            info = {"builder": f"medmamba.nets.create({name!r}, in_channels={in_channels}, "
                               f"out_channels={out_channels}, spatial_dims=3, **network_kwargs)"}
        else:
            net, info = _from_plans(name, load_plans(plans), configuration or "3d_fullres", in_channels,
                                    out_channels, network_kwargs)
    return (net, info) if return_info else net


def encoder_state_keys(net: nn.Module, arch: str) -> list[str]:
    """State-dict keys of ``net`` that pretraining provides (encoder parts, including aliases such as
    ``decoder.encoder.*`` that share their tensors)."""
    prefixes = ENCODER_MODULES[check_arch(arch)]
    tensors = set()
    for p in prefixes:
        for t in net.get_submodule(p).state_dict().values():
            tensors.add(t.data_ptr())
    return [k for k, v in net.state_dict().items() if v.data_ptr() in tensors and v.numel() > 0]


def describe(value: Any) -> Any:
    """JSON-friendly copy (classes -> dotted names) for checkpoint metadata."""
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
