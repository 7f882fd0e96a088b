"""Reading NIfTI files and DICOM series, geometry checks and atomic writing (shared by ``predict``/``evaluate``).

* Inputs: a folder holds NIfTI files (``*.nii``/``*.nii.gz``) at any depth and/or DICOM series in sub-folders
  (found with ``SimpleITK.ImageSeriesReader.GetGDCMSeriesIDs``; files need no ``.dcm`` extension, the
  ``DICM`` magic at byte 128 is enough). The case name of a NIfTI file is its file name without
  ``.nii``/``.nii.gz``; of a DICOM series, its folder path relative to the input folder with ``/`` replaced by
  ``_`` (plus ``_<last 8 chars of the SeriesInstanceUID>`` when a folder holds several series).
* Geometry: size, spacing, origin and direction, compared with explicit tolerances (:data:`GEOMETRY_TOL`).
* Writing: to a temporary name in the destination folder, then ``os.replace`` (atomic on one file system),
  so a reader never sees a half-written file and an interrupted run leaves no truncated output.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Spacing: relative; origin: in units of the smallest voxel spacing (1 % of a voxel); direction: cosines.
GEOMETRY_TOL = {"spacing_rel": 1e-4, "origin_voxels": 1e-2, "direction": 1e-4}


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    base = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


@dataclass
class Case:
    name: str
    kind: str                       # "nifti" | "dicom"
    path: str                       # NIfTI file or DICOM folder
    files: list = field(default_factory=list)   # DICOM: the series' files in slice order

    def describe(self) -> str:
        return self.path if self.kind == "nifti" else f"{self.path} (DICOM series, {len(self.files)} files)"


def _is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_series(folder: str, root: str) -> list[Case]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()
    rel = os.path.relpath(folder, root)
    base = "dicom" if rel == "." else rel.replace(os.sep, "_")
    cases = []
    for sid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid))
        name = base if len(ids) == 1 else f"{base}_{sid[-8:]}"
        cases.append(Case(name=name, kind="dicom", path=folder, files=files))
    return cases


def find_cases(root: str, nifti: bool = True, dicom: bool = True) -> list[Case]:
    """NIfTI files and DICOM series under ``root`` (or ``root`` itself when it is one NIfTI file)."""
    if os.path.isfile(root):
        if not is_nifti(root):
            raise ValueError(f"{root}: not a NIfTI file (.nii/.nii.gz)")
        return [Case(case_name(root), "nifti", root)]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input {root!r} does not exist")
    cases: list[Case] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        files = sorted(f for f in files if not f.startswith("."))
        if nifti:
            cases += [Case(case_name(f), "nifti", os.path.join(folder, f)) for f in files if is_nifti(f)]
        others = [f for f in files if not is_nifti(f)]
        if dicom and others and any(f.lower().endswith((".dcm", ".ima")) or _is_dicom_file(os.path.join(folder, f))
                                    for f in others[:5]):
            cases += _dicom_series(folder, root)
    names = [c.name for c in cases]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{root}: several inputs map to the same case name(s) {dups}; rename them")
    return sorted(cases, key=lambda c: c.name)


def read_case(case: Case, nonfinite: str = "refuse") -> sitk.Image:
    """The case as a SimpleITK image, after checking it is complete (:mod:`medmamba.clinic.validate`).

    Raises :class:`~medmamba.clinic.validate.VolumeError` (a ``ValueError``) naming the file for a truncated
    NIfTI, a DICOM series with missing/uneven/truncated slices, or (``nonfinite="refuse"``) NaN/inf voxels;
    ``RuntimeError`` with the path on other unreadable input. ``nonfinite="allow"`` skips the NaN/inf check
    (SimpleITK then reads NaN as 0).
    """
    from medmamba.clinic import validate

    if case.kind == "nifti":
        problem = validate.nifti_problem(case.path)
    else:
        problem = validate.dicom_series_problem(case.files)
    if problem:
        raise validate.VolumeError(f"cannot read {case.describe()}: {problem}")
    try:
        if case.kind == "nifti":
            img = sitk.ReadImage(case.path)
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(case.files)
            img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise RuntimeError(f"cannot read {case.describe()}: {first[-1] if first else exc}") from None
    if nonfinite == "refuse" and case.kind == "nifti" and (problem := validate.nifti_nonfinite_problem(case.path)):
        raise validate.VolumeError(f"{case.describe()}: {problem}; refused (replace them, e.g. by the minimum "
                                   f"intensity, and rerun)")
    return img


def read_image(path: str, nonfinite: str = "refuse") -> sitk.Image:
    """A NIfTI file or a folder holding exactly one DICOM series."""
    if os.path.isdir(path):
        cases = [c for c in find_cases(path, nifti=False) if os.path.samefile(c.path, path)]
        if len(cases) != 1:
            raise ValueError(f"{path}: expected one DICOM series, found {len(cases)}")
        return read_case(cases[0], nonfinite)
    return read_case(Case(case_name(path), "nifti", path), nonfinite)


def geometry(img: sitk.Image) -> dict:
    return {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()), "origin": list(img.GetOrigin()),
            "direction": list(img.GetDirection())}


def geometry_problems(a: sitk.Image, b: sitk.Image, names=("pred", "ref"), tol: dict | None = None) -> list[str]:
    """Why ``a`` and ``b`` do not share a voxel grid (empty list: they do)."""
    tol = {**GEOMETRY_TOL, **(tol or {})}
    ga, gb = geometry(a), geometry(b)
    na, nb = names
    if a.GetDimension() != b.GetDimension():
        return [f"dimension {na} {a.GetDimension()} != {nb} {b.GetDimension()}"]
    out = []
    if ga["size"] != gb["size"]:
        out.append(f"size {na} {ga['size']} != {nb} {gb['size']}")
    sa, sb = np.array(ga["spacing"]), np.array(gb["spacing"])
    if not np.allclose(sa, sb, rtol=tol["spacing_rel"], atol=0):
        out.append(f"spacing {na} {_fmt(sa)} != {nb} {_fmt(sb)} mm")
    atol = tol["origin_voxels"] * float(min(sa.min(), sb.min()))
    oa, ob = np.array(ga["origin"]), np.array(gb["origin"])
    if not np.allclose(oa, ob, rtol=0, atol=atol):
        out.append(f"origin {na} {_fmt(oa)} != {nb} {_fmt(ob)} mm (tolerance {atol:.3g} mm)")
    da, db = np.array(ga["direction"]), np.array(gb["direction"])
    if not np.allclose(da, db, rtol=0, atol=tol["direction"]):
        out.append(f"direction {na} {_fmt(da)} != {nb} {_fmt(db)}")
    return out


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in np.asarray(v).ravel()) + ")"


def write_image_atomic(img: sitk.Image, path: str, overwrite: bool = False, compress: bool = True) -> None:
    """Write ``img`` to ``path`` (NIfTI by its extension) via a temporary file in the same folder + ``os.replace``."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
    folder, base = os.path.split(os.path.abspath(path))
    suffix = ".nii.gz" if base.endswith(".nii.gz") else os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, useCompression=compress)
        os.chmod(tmp, 0o644 & ~_umask())      # mkstemp creates 0600: readable by others like any written file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str | bytes, overwrite: bool = True) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (use --overwrite to replace it)")
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def output_folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be (or become) an output folder because a path component is a file, or None.

    Creates nothing. Checks ``folder`` itself (an existing file is not a folder) and its nearest existing
    ancestor (a file there means the folder can never be created); permissions are left to the write probe."""
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{folder} exists and is a file, not a folder: choose another output folder"
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"cannot create output folder {folder}: {parent} is a file, not a folder"
    return None


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and fail early (with a clear message) when it cannot be written."""
    if problem := output_folder_problem(folder):
        raise PermissionError(problem)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create output folder {folder}: {exc.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=folder)
    except OSError as exc:
        raise PermissionError(f"output folder {folder} is not writable: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
