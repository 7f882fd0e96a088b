"""Checks that a volume read from disk is the volume that was written: the one place where ``predict`` (bundle
and nnU-Net paths), ``evaluate``, ``bundle run`` and ``pretrain`` verify their inputs.

* :func:`nifti_problem`: a NIfTI file holds all the voxels its header declares. SimpleITK fills the missing part
  of a truncated ``.nii.gz`` with zeros and raises nothing; here the decompressed stream length is compared with
  ``vox_offset + prod(dims) * bytes per voxel`` from the header (read by nibabel), and a gzip stream that ends
  before its end-of-stream marker is reported as truncated.
* :func:`dicom_series_problem`: a DICOM series has every slice: positions along the slice normal evenly spaced
  (no gap from a missing file, no duplicate), one orientation and one in-plane size, and no file shorter than
  its uncompressed pixel data. ITK stacks such a series on a uniform grid with only a warning.
* :func:`nonfinite_count`: NaN / inf voxels. The policy is the caller's (see ``docs/hospital.md``): ``predict``
  and ``evaluate`` refuse the case, ``bundle run`` skips the file, ``pretrain`` skips the volume with one
  warning line.
* :func:`shape_problem`: a 3D scalar volume (not 2D, 4D or multi-component) for a model of N channels.

Every function returns ``None`` when the input is fine, or a short reason without the file name (callers put
the name in front); :class:`VolumeError` carries both.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

# Slice positions may jitter by this fraction of the median slice step before the series counts as uneven.
SLICE_STEP_TOL = 0.05
_CHUNK = 1 << 16


class VolumeError(ValueError):
    """A damaged or unusable input volume; the message names the file and the reason."""


def _stream_length(path: str, compressed: bool) -> tuple[int, str | None]:
    """(decompressed length, problem with the stream or None)."""
    if not compressed:
        return os.path.getsize(path), None
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                n += len(chunk)
    except EOFError:
        return n, "truncated: the gzip stream ends before its end-of-stream marker"
    except (OSError, zlib.error) as exc:
        return n, f"corrupt gzip stream ({exc})"
    return n, None


def nifti_problem(path: str) -> str | None:
    """Why the NIfTI file at ``path`` is incomplete or unreadable, or None when it holds every declared voxel."""
    import nibabel as nib

    if not os.path.isfile(path):
        return "file not found"
    try:
        img = nib.load(path)
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:
        return f"not a readable NIfTI file ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * itemsize
    compressed = path.lower().endswith(".gz")
    length, problem = _stream_length(path, compressed)
    if problem:
        return f"{problem}; {length} of {expected} bytes (header: shape {shape}, {itemsize} byte(s) per voxel)"
    if length < expected:
        return (f"truncated: {length} bytes {'decompressed ' if compressed else ''}but the header declares {expected} "
                f"(shape {shape}, {itemsize} byte(s) per voxel, data offset {offset})")
    return None


def _tag(reader, key: str) -> str | None:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None


def _floats(text: str | None) -> list[float] | None:
    try:
        return [float(v) for v in text.split("\\")] if text else None
    except ValueError:
        return None


_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def dicom_series_problem(files: list[str]) -> str | None:
    """Why the DICOM files (one series, in slice order) do not form a complete, evenly spaced volume, or None."""
    import SimpleITK as sitk

    if not files:
        return "no files in the series"
    positions, orientations, sizes = [], set(), set()
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            return f"slice {os.path.basename(f)} is unreadable ({lines[-1] if lines else exc})"
        rows, cols = _tag(reader, "0028|0010"), _tag(reader, "0028|0011")
        bits, samples = _tag(reader, "0028|0100"), _tag(reader, "0028|0002") or "1"
        sizes.add((rows, cols))
        syntax = (_tag(reader, "0002|0010") or "").rstrip("\x00")
        if rows and cols and bits and syntax in _UNCOMPRESSED:
            need = int(rows) * int(cols) * int(samples) * (int(bits) // 8)
            if os.path.getsize(f) < need:
                return (f"slice {os.path.basename(f)} is truncated: {os.path.getsize(f)} bytes, its pixel data alone "
                        f"needs {need}")
        pos, ori = _floats(_tag(reader, "0020|0032")), _floats(_tag(reader, "0020|0037"))
        if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
            if len(files) > 1:
                return f"slice {os.path.basename(f)} has no ImagePositionPatient/ImageOrientationPatient"
            return None
        positions.append(pos)
        orientations.add(tuple(round(v, 4) for v in ori))
    if len(sizes) > 1:
        return f"slices differ in size (rows, columns): {sorted(sizes)}"
    if len(orientations) > 1:
        return f"slices differ in orientation: {len(orientations)} different ImageOrientationPatient values"
    if len(files) < 2:
        return None
    ori = np.array(next(iter(orientations)))
    normal = np.cross(ori[:3], ori[3:])
    z = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(z)
    if np.any(np.abs(steps) < 1e-3):
        return "two or more slices share a position (duplicate slice?)"
    median = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - median) > SLICE_STEP_TOL * median)[0]
    if bad.size:
        i = int(bad[0])
        missing = int(round(steps[i] / median)) - 1
        what = f"about {missing} slice(s) missing" if missing >= 1 else "uneven slice spacing"
        return (f"{what}: slice step {steps[i]:.3g} mm between positions {z[i]:.4g} and {z[i + 1]:.4g} mm, "
                f"median step {median:.3g} mm ({len(files)} files)")
    return None


def nonfinite_count(arr: np.ndarray) -> int:
    """Number of NaN / inf values (0 for integer arrays)."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def nifti_nonfinite_problem(path: str) -> str | None:
    """Why the NIfTI file holds NaN/inf voxels (with their count), or None.

    Read with nibabel: SimpleITK's NIfTI reader turns NaN into 0 without a word, so the check cannot be done on
    the image SimpleITK returns. Integer files without scaling are not read (they cannot hold NaN)."""
    import nibabel as nib

    img = nib.load(path)
    slope, inter = img.header.get_slope_inter()
    if not np.issubdtype(img.header.get_data_dtype(), np.floating) and slope in (None, 1.0) and inter in (None, 0.0):
        return None
    arr = np.asanyarray(img.dataobj)
    n = nonfinite_count(arr)
    if n:
        return f"{n} of {arr.size} voxels are NaN or infinite"
    return None


def shape_problem(img, num_channels: int = 1) -> str | None:
    """Why a SimpleITK image is not one 3D volume of a ``num_channels``-channel model (None: it is)."""
    size = tuple(img.GetSize())
    comps = img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() == 2 or (img.GetDimension() == 3 and min(size) == 1 and size[2] == 1):
        return f"is a 2D image, size {size}; the model segments 3D volumes"
    if img.GetDimension() == 4:
        return (f"is a 4D image, size {size} (a time series or multi-channel stack?); give one 3D volume per file"
                + (" and one file per channel (CASE_0000, CASE_0001, ...)" if num_channels > 1 else ""))
    if img.GetDimension() != 3:
        return f"has {img.GetDimension()} dimensions, size {size}; expected a 3D volume"
    if comps != 1:
        return f"has {comps} components per voxel (RGB or vector image?); expected one scalar value per voxel"
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` or an exception in its cause/context chain is an out-of-memory error (CUDA's
    ``torch.OutOfMemoryError``, a ``RuntimeError`` saying "out of memory", or ``MemoryError``)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
                or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
        seen += 1
    return False


def error_message(exc: BaseException, oom_hint: bool = True) -> str:
    """``Type: message`` of the exception that explains a failure. MONAI wraps a transform's error in
    ``RuntimeError('applying transform <...>')``; the real reason is in the ``__cause__`` chain."""
    chain = [exc]
    while len(chain) < 20:
        e = chain[-1]
        nxt = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    useful = [e for e in chain if not str(e).startswith("applying transform")] or chain
    root = useful[0]
    text = str(root).strip().splitlines()
    msg = f"{type(root).__name__}: {text[0] if text else ''}"
    if oom_hint and (isinstance(root, MemoryError) or "out of memory" in str(root).lower()):
        msg += " (out of memory: use --device cpu, a smaller sliding-window batch, or a machine with more memory)"
    return msg
