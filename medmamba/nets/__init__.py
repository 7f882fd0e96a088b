"""Segmentation networks and their registry.

``create(name, in_channels, out_channels, spatial_dims=3, **kwargs)`` builds any network by its
registry name; the classes are also importable by dotted path (MONAI bundles, nnU-Net plans).
Modules are imported lazily so ``import medmamba.nets`` stays cheap.
"""
from __future__ import annotations

import importlib

# registry name -> (module, class)
_REGISTRY = {
    "umamba_bot": ("medmamba.nets.umamba", "UMambaBot"),
    "umamba_enc": ("medmamba.nets.umamba", "UMambaEnc"),
    "lightm_unet": ("medmamba.nets.lightm_unet", "LightMUNet"),
    "swin_umamba": ("medmamba.nets.swin_umamba", "SwinUMamba"),
    "swin_umamba_d": ("medmamba.nets.swin_umamba", "SwinUMambaD"),
    "msvm_unet": ("medmamba.nets.msvm_unet", "MSVMUNet"),
    "vm_unet_mhs": ("medmamba.nets.vm_unet_mhs", "VMUNetMHS"),
    "hymamba": ("medmamba.nets.hymamba", "HyMamba"),
}
_CLASSES = {cls: (mod, cls) for mod, cls in _REGISTRY.values()}


def available() -> list[str]:
    """Registry names accepted by :func:`create`."""
    return list(_REGISTRY)


def get_class(name: str):
    """The network class for a registry name (e.g. ``"umamba_bot"``) or class name (``"UMambaBot"``)."""
    key = _REGISTRY.get(name) or _CLASSES.get(name)
    if key is None:
        raise KeyError(f"unknown network {name!r}; available: {', '.join(available())}")
    return getattr(importlib.import_module(key[0]), key[1])


def create(name: str, in_channels: int, out_channels: int, spatial_dims: int = 3, **kwargs):
    """Build a network by registry name with MONAI-style arguments."""
    return get_class(name)(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, **kwargs)


def __getattr__(attr):  # medmamba.nets.UMambaBot etc. without importing every module up front
    if attr in _CLASSES:
        return get_class(attr)
    raise AttributeError(f"module 'medmamba.nets' has no attribute {attr!r}")


__all__ = ["available", "create", "get_class", *_CLASSES]
