"""State-space layers and the blocks built from them: ``Mamba`` (``mamba.py``), scan routes
(``scan_routes.py``), SS2D/SS3D (``cross_scan.py``), Multi-Head Scan (``multi_head_scan.py``), the VSS
blocks (``vss.py``), the CNN-Mamba blocks of U-Mamba and LightM-UNet (``cnn_mamba.py``) and the
channels-first-LayerNorm MedNeXt / residual blocks of HyMamba (``mednext.py``).

They use only ``medmamba.kernels``; the networks in ``medmamba.nets`` are built from them.
"""
