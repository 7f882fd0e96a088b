"""medmamba.kernels: selective-scan ops (Triton on GPU, vectorised PyTorch on CPU) and their reference.

Pure functions only (and their operator registrations, ``ops``); modules with parameters live in
``medmamba.layers``.
"""
from . import ops  # noqa: F401  (registers the torch.ops.medmamba operators)
from .reference import selective_scan_ref
from .routed_scan import routed_selective_scan
from .selective_scan import BACKENDS, ScanInputError, resolve_backend, selective_scan, triton_available

__all__ = ["selective_scan", "selective_scan_ref", "routed_selective_scan", "resolve_backend", "triton_available",
           "BACKENDS", "ScanInputError"]
