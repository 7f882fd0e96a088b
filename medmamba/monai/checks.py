"""Input checks that MONAI bundle configs reference by dotted path: clear errors naming the bad file,
before a reader, EnsureChannelFirstd or the network fails deep in a stack trace."""
from __future__ import annotations

import glob
import os
from typing import Sequence

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class BundleError(ValueError):
    """A problem with the arguments of ``bundle create`` / ``bundle run`` or with an input file."""


def _is_nifti(path: str) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _image_problem(path: str, num_channels: int, spatial_dims: int = 3) -> str | None:
    """Why a file cannot be segmented by a ``num_channels``-channel model, or None. Reads the header only."""
    if not os.path.exists(path):
        return "file not found"
    if os.path.isdir(path):
        return "is a folder, not an image file"
    if not _is_nifti(path):
        return None  # other formats: LoadImaged decides; the shape check after loading still applies
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(path).header.get_data_shape())
    except Exception as exc:  # nibabel's own message, with the file name in front
        return f"cannot read the NIfTI header ({type(exc).__name__}: {exc})"
    problem = _shape_problem(shape, num_channels, spatial_dims, channel_last=True)
    if problem is None:   # complete? (SimpleITK and nibabel's lazy proxies would not notice a truncated file)
        from medmamba.clinic import validate

        problem = validate.nifti_problem(path)
    return problem


def _shape_problem(shape: tuple, num_channels: int, spatial_dims: int, channel_last: bool) -> str | None:
    """NIfTI keeps channels (and time) after the spatial axes, (x, y, z, [1,] C); MetaTensors are channel first."""
    if channel_last:
        spatial = shape[:spatial_dims]
        rest = [s for s in shape[spatial_dims:] if s != 1]
        if len(rest) > 1:
            return (f"has {len(shape)} dimensions {shape}; expected a {spatial_dims}D image (x, y, z) or a "
                    f"multi-channel image (x, y, z, C)")
        channels = rest[0] if rest else 1
    else:
        channels, spatial = shape[0], shape[1:]
    if len(spatial) != spatial_dims or min(spatial) < 1:
        return f"is not a {spatial_dims}D image: shape {shape}"
    if channels != num_channels:
        if channels > 1 and num_channels == 1:
            return (f"is a 4D image with {channels} volumes along the 4th axis, shape {shape} (a time series or a "
                    f"multi-channel image?); this model takes 1 channel: give one 3D volume per file")
        if num_channels > 1:
            return (f"has {channels} channel(s), shape {shape}; this model takes {num_channels} channels, stored as "
                    f"one 4D NIfTI (x, y, z, {num_channels}) in the training channel order")
        return f"has {channels} channel(s), shape {shape}; this model takes {num_channels}"
    return None


class CheckImaged:
    """Validate input images before MONAI loads them: a clear ``ValueError`` / ``FileNotFoundError`` naming
    the file, instead of a deep stack trace from a reader, EnsureChannelFirstd or the network.

    Place it first in a preprocessing ``Compose`` (it then sees file names and reads NIfTI headers only) or
    after ``EnsureChannelFirstd`` (it then sees channel-first arrays). Not invertible, so ``Invertd`` skips it.

    Args:
        keys: keys of the data dictionary to check (e.g. ``"image"``).
        num_channels: channels the model takes.
        spatial_dims: spatial dimensions of the model's input (3).
    """

    def __init__(self, keys: str | Sequence[str], num_channels: int, spatial_dims: int = 3):
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.num_channels, self.spatial_dims = int(num_channels), int(spatial_dims)

    def __call__(self, data: dict) -> dict:
        for key in self.keys:
            value = data[key]
            if isinstance(value, (str, os.PathLike)):
                name = os.fspath(value)
                problem = _image_problem(name, self.num_channels, self.spatial_dims)
            else:
                problem = _shape_problem(tuple(value.shape), self.num_channels, self.spatial_dims, channel_last=False)
                meta = getattr(value, "meta", None) or {}
                name = str(meta.get("filename_or_obj", f"<{key}>"))
            if problem is not None:
                err = FileNotFoundError if problem == "file not found" else ValueError
                raise err(f"{name}: {problem}")
        return data


def list_images(dataset_dir: str, num_channels: int | None = None, spatial_dims: int = 3) -> list[str]:
    """Sorted NIfTI files (``*.nii.gz``, ``*.nii``) in ``dataset_dir`` (or ``[dataset_dir]`` for one file).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a folder without NIfTI; with
    ``num_channels`` every file's header is checked up front (as :class:`CheckImaged` does), so a bad file
    stops the run before the first image is segmented.
    """
    path = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"input not found: {path} (set --dataset_dir to a folder of NIfTI files or one file)")
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted({f for suffix in NIFTI_SUFFIXES
                        for f in glob.glob(os.path.join(glob.escape(path), "*" + suffix))})
        if not files:
            raise ValueError(f"no NIfTI files (*.nii.gz, *.nii) in {path}")
    if num_channels is not None:
        problems = [f"{f}: {p}" for f in files if (p := _image_problem(f, int(num_channels), spatial_dims))]
        if problems:
            raise ValueError("bad input image(s):\n  " + "\n  ".join(problems))
    return files


def _case_id(path: str) -> str:
    name = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def msd_datalist(dataset_dir: str, num_channels: int | None = None) -> list[dict]:
    """``[{"image": ..., "label": ...}]`` from ``dataset_dir/imagesTr`` and ``labelsTr`` (MSD layout: the same
    file name in both; nnU-Net's raw layout ``CASE_0000.nii.gz`` / ``CASE.nii.gz`` with one channel works too)."""
    root = os.path.abspath(os.path.expanduser(str(dataset_dir)))
    images_dir, labels_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
    for d in (images_dir, labels_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} not found: the training data must be in the MSD layout "
                                    f"(DATASET/imagesTr/*.nii.gz and DATASET/labelsTr/*.nii.gz with the same names)")
    labels = {_case_id(f): f for f in list_images(labels_dir)}
    pairs, unmatched = [], []
    for image in list_images(images_dir, num_channels):
        case = _case_id(image)
        label = labels.get(case) or (labels.get(case[:-5]) if case.endswith("_0000") else None)
        if label is None:
            unmatched.append(os.path.basename(image))
        else:
            pairs.append({"image": image, "label": label})
    if unmatched:
        raise ValueError(f"no label in {labels_dir} for: {', '.join(unmatched)}")
    return pairs


def split_datalist(datalist: list, val_fraction: float = 0.2) -> tuple[list, list]:
    """(train, validation): the last ``val_fraction`` of the (sorted) list for validation, at least one case
    each; a single case is used for both (smoke tests only)."""
    n = len(datalist)
    if n == 0:
        raise ValueError("empty datalist")
    if n == 1:
        return list(datalist), list(datalist)
    n_val = min(n - 1, max(1, round(n * float(val_fraction))))
    return list(datalist[: n - n_val]), list(datalist[n - n_val:])
