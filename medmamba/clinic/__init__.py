"""Clinical tools: ``medmamba predict`` (``predict.py``, nnU-Net folders and MONAI bundles), ``medmamba
evaluate`` (``evaluate.py``, metrics and report) and the image reading/writing they share (``imageio.py``:
NIfTI, NRRD, MHA, DICOM series). See docs/hospital.md.
"""
