"""DICOM Segmentation (SEG) output for ``medmamba predict --output-format dicom-seg``.

Hospitals' PACS and viewers take DICOM, not NIfTI. One SEG object is written per input series with
``highdicom``: it references the source series (Study Instance UID, each source SOP Instance UID in the
per-frame Derivation Image / Referenced Series sequences, Frame of Reference UID) and its frames carry the
source slices' Image Position / Orientation (Patient), so a viewer overlays it on the series it came from.

Label map -> segments: label value ``k > 0`` is segment number ``k`` (BINARY segmentation, one frame per slice
and segment; slices without that segment are omitted, as highdicom does by default). Each segment gets the
model's label name and a coded category/type: a built-in code for a few common names (:data:`KNOWN_CODES`),
otherwise category *Tissue* (SCT 85756007) and a type in the private scheme ``99MEDMAMBA`` whose code value is
the label name (DICOM allows private ``99``-prefixed schemes; a site maps them). ``--seg-coding FILE`` (JSON)
overrides per label name: ``{"liver": {"category": ["123037004", "SCT", "Anatomical Structure"],
"type": ["10200004", "SCT", "Liver"]}}``.

The label map's slice ``z`` is the series' ``files[z]``: SimpleITK's ``ImageSeriesReader`` reads the files in
the order :mod:`medmamba.clinic.imageio` found them (GDCM's sort along the slice normal), and the SEG
references exactly those datasets in that order.
"""
from __future__ import annotations

import json
import os

import numpy as np

PRIVATE_SCHEME = "99MEDMAMBA"
_TISSUE = ("85756007", "SCT", "Tissue")
_ANATOMY = ("123037004", "SCT", "Anatomical Structure")
_ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")
# label name (lower case) -> (category, type): a few names our models and the shared data use
KNOWN_CODES = {
    "lesion": (_ALTERED, ("52988006", "SCT", "Lesion")),
    "tumor": (_ALTERED, ("108369006", "SCT", "Neoplasm")),
    "tumour": (_ALTERED, ("108369006", "SCT", "Neoplasm")),
    "sarcoma": (_ALTERED, ("108369006", "SCT", "Neoplasm")),
    "liver": (_ANATOMY, ("10200004", "SCT", "Liver")),
    "spleen": (_ANATOMY, ("78961009", "SCT", "Spleen")),
    "kidney": (_ANATOMY, ("64033007", "SCT", "Kidney")),
    "pancreas": (_ANATOMY, ("15776009", "SCT", "Pancreas")),
    "lung": (_ANATOMY, ("39607008", "SCT", "Lung")),
    "heart": (_ANATOMY, ("80891009", "SCT", "Heart")),
    "bone": (_TISSUE, ("272673000", "SCT", "Bone")),
}


def load_coding(path: str | None) -> dict:
    """``--seg-coding`` JSON: label name -> {"category": [value, scheme, meaning], "type": [...]}."""
    if not path:
        return {}
    with open(path) as f:
        coding = json.load(f)
    for name, c in coding.items():
        for key in ("category", "type"):
            if key not in c or len(c[key]) != 3:
                raise ValueError(f"{path}: {name!r} needs {key!r} as [code value, coding scheme, meaning]")
    return coding


def segment_codes(name: str, coding: dict | None = None):
    """(category, type) as ``pydicom.sr.coding.Code`` for a label name."""
    from pydicom.sr.coding import Code

    coding = coding or {}
    if name in coding:
        cat, typ = coding[name]["category"], coding[name]["type"]
    elif name.lower() in KNOWN_CODES:
        cat, typ = KNOWN_CODES[name.lower()]
    else:
        cat, typ = _TISSUE, (name[:16], PRIVATE_SCHEME, name)   # code values are at most 16 characters
    return Code(*cat), Code(*typ)


def label_names_of_model(model: str, kind: str) -> dict[int, str]:
    """Label value -> name from a bundle's metadata (``pred`` channel_def) or nnU-Net's dataset.json."""
    names: dict[int, str] = {}
    try:
        if kind == "bundle":
            with open(os.path.join(model, "configs", "metadata.json")) as f:
                meta = json.load(f)
            chans = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
            names = {int(k): str(v) for k, v in chans.items()}
        elif kind in ("nnunet", "onnx"):
            path = os.path.join(model, "dataset.json")
            with open(path) as f:
                labels = json.load(f)["labels"]
            for name, v in labels.items():
                for val in (v if isinstance(v, list) else [v]):   # region-based labels list several values
                    names.setdefault(int(val), name)
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return names


def _fill_missing_uids(sources: list) -> list[str]:
    """Give de-identified series the UIDs a SEG must reference; returns what was filled in (for the log).

    Anonymisers sometimes blank SOP Class/Instance UIDs (the file meta still has them) or Study/Series
    Instance UIDs (nothing to recover: a UID derived from the series' Frame of Reference UID and the first
    file's SOP Instance UID is generated, the same for every file of the series and for every run).
    """
    from pydicom.uid import generate_uid

    notes = set()
    meta = sources[0].file_meta if hasattr(sources[0], "file_meta") else None
    seed = [str(sources[0].get("FrameOfReferenceUID", "")),
            str(getattr(meta, "MediaStorageSOPInstanceUID", "") if meta is not None else "")]
    for ds in sources:
        fm = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and fm is not None and fm.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = fm.MediaStorageSOPClassUID
            notes.add("SOPClassUID taken from the file meta")
        if not ds.get("SOPInstanceUID") and fm is not None and fm.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
            notes.add("SOPInstanceUID taken from the file meta")
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(key):
                setattr(ds, key, generate_uid(entropy_srcs=[key, *seed]))
                notes.add(f"{key} missing in the source series: a derived UID was used")
    return sorted(notes)


def write_dicom_seg(labels_zyx: np.ndarray, files: list[str], out_path: str, names: dict[int, str] | None = None,
                    coding: dict | None = None, series_description: str = "medmamba segmentation",
                    model_name: str = "medmamba") -> list[str]:
    """Write the label map ``labels_zyx`` (slice ``z`` = ``files[z]``) as a DICOM SEG.

    Returns warnings (UIDs that had to be filled in, see :func:`_fill_missing_uids`).
    Written to a temporary name in the destination folder, then renamed (no half-written files).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medmamba import __version__

    labels_zyx = np.asarray(labels_zyx)
    if labels_zyx.ndim != 3 or labels_zyx.shape[0] != len(files):
        raise ValueError(f"label map shape {labels_zyx.shape} does not match a series of {len(files)} slices")
    sources = [pydicom.dcmread(f) for f in files]
    notes = _fill_missing_uids(sources)
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if labels_zyx.shape[1:] != (rows, cols):
        raise ValueError(f"label map slices {labels_zyx.shape[1:]} != DICOM Rows x Columns {(rows, cols)}")
    names = dict(names or {})
    n_seg = max(int(labels_zyx.max(initial=0)), max(names, default=0))
    if n_seg < 1:                       # nothing but background: still one (empty) segment, so the object is valid
        n_seg = 1
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for k in range(1, n_seg + 1):
        name = names.get(k, f"label {k}")
        category, typ = segment_codes(name, coding)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=typ, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    dtype = np.uint8 if n_seg < 256 else np.uint16
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels_zyx.astype(dtype),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medmamba",
        manufacturer_model_name=model_name[:64], software_versions=__version__,
        device_serial_number="0", series_description=series_description[:64])
    folder = os.path.dirname(os.path.abspath(out_path))
    tmp = os.path.join(folder, f".{os.path.basename(out_path)}.tmp{os.getpid()}")
    try:
        seg.save_as(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return notes
