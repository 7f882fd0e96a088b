"""Clinical tools: ``medmamba predict`` (``predict.py``, nnU-Net folders and MONAI bundles), ``medmamba
evaluate`` (``evaluate.py``, metrics and report) and the image reading/writing they share (``imageio.py``:
NIfTI, NRRD, MHA, DICOM series); DICOM SEG output (``dicom_seg.py``), ``medmamba export`` to ONNX
(``export.py``) and ONNX Runtime inference (``onnx_runtime.py``). See docs/hospital.md.
"""
