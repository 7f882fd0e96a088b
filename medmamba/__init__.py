"""medmamba: Mamba segmentation networks for nnU-Net v2 and MONAI.

Importing this package has no side effects (MONAI bundles reference classes by dotted path).
"""
from medmamba.mamba import Mamba

__version__ = "0.1.0"
__all__ = ["Mamba", "__version__"]
