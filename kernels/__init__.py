"""medmamba.kernels: selective-scan ops (Triton on GPU, vectorised PyTorch on CPU) and their reference.

Pure functions only; modules with parameters live in ``medmamba``.
"""
from .reference import selective_scan_ref
from .selective_scan import BACKENDS, ScanInputError, selective_scan, triton_available

__all__ = ["selective_scan", "selective_scan_ref", "triton_available", "BACKENDS", "ScanInputError"]
