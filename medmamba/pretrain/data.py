"""Finding CT volumes in folders and streaming random crops from them.

Discovery (:func:`discover_ct`), per folder given, recursively (sorted, symlinked folders not followed):

* NIfTI files (``*.nii``, ``*.nii.gz``) are taken unless their name says they are not CT images:
  - masks/labels: the file name (lower case) contains ``mask``, ``seg``, ``label``, ``annot`` or
    ``contour``, or has a token ``gt`` (tokens = the name split at non-alphanumeric characters), or a
    folder below the given root is named like a label folder (``labelsTr``, ``labelsTs``, ``labels``,
    ``label``, ``masks``, ``mask``, ``segmentations``, ``seg``, ``segs``, ``gt``, ``ground_truth``);
  - other modalities: a token of the file name, or a folder name below the root, is one of ``mr``,
    ``mri``, ``t1``, ``t1w``, ``t2``, ``t2w``, ``flair``, ``dwi``, ``adc``, ``pet``, ``pt``, ``spect``,
    ``us``.
  ``include`` globs (matched against the path relative to the root and against the file name) restrict
  the NIfTI files to those matching and bypass the name rules for them; ``exclude`` globs drop matches.
* DICOM: a folder is examined when it holds a ``*.dcm``/``*.ima`` file or a file with the DICOM magic
  (``DICM`` at byte 128; the first three candidate files are checked). Each series in it
  (``SimpleITK.ImageSeriesReader.GetGDCMSeriesIDs``) is one volume unless its Modality (0008,0060) is
  set and not ``CT``, its ImageType says ``LOCALIZER``, or it has fewer than 3 slices (single-frame).

Streaming (:class:`CTCropStream`, a ``torch.utils.data.IterableDataset``): a global batch of B crops
has B lanes; every (lane, DataLoader worker) pair is an independent stream that, in each of its epochs,
takes a disjoint shard of the volume list (shuffled per epoch and seed, the same on every process), loads
ONE volume at a time, preprocesses it with MONAI transforms (load, channel first, orientation RAS,
resampling to the target spacing, foreground crop (HU > -175), padding to at least the patch size,
intensity: HU clipped to [-175, 250] and scaled to [0, 1] (or the nnU-Net plans' CT normalisation), then
``samples_per_volume`` random crops (RandSpatialCropSamplesd) with random flips on every axis) and yields
the crops through a small shuffle buffer. A process serves its slice of the lanes (distributed runs), so
the crops of a global batch do not depend on how many processes share it. Memory: per worker and lane,
one volume plus ``shuffle_buffer`` crops, whatever the number of volumes. Volumes that fail to load are
skipped with a warning (a stream raises once every volume has failed).
"""
from __future__ import annotations

import fnmatch
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = ["CTItem", "Discovery", "discover_ct", "load_ct", "preprocess_transforms", "CTCropStream",
           "NoCTFoundError"]

_LABEL_SUBSTRINGS = ("mask", "seg", "label", "annot", "contour")
_LABEL_TOKENS = {"gt"}
_LABEL_DIRS = {"labelstr", "labelsts", "labels", "label", "masks", "mask", "segmentations", "segmentation", "seg",
               "segs", "gt", "ground_truth", "groundtruth"}
_NON_CT_TOKENS = {"mr", "mri", "t1", "t1w", "t2", "t2w", "flair", "dwi", "adc", "pet", "pt", "spect", "us"}
_NIFTI = (".nii", ".nii.gz")
HU_RANGE = (-175.0, 250.0)


class NoCTFoundError(FileNotFoundError):
    pass


@dataclass
class CTItem:
    path: str                 # NIfTI file, or DICOM folder
    kind: str                 # "nifti" | "dicom"
    files: tuple = ()         # DICOM: the series' files in slice order
    series_id: str = ""

    def describe(self) -> str:
        return self.path if self.kind == "nifti" else f"{self.path} [DICOM series {self.series_id or '-'}, " \
                                                      f"{len(self.files)} files]"


@dataclass
class Discovery:
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        n_nii = sum(i.kind == "nifti" for i in self.items)
        n_dcm = len(self.items) - n_nii
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            key = why.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())) or "none"
        return f"{len(self.items)} CT volume(s): {n_nii} NIfTI, {n_dcm} DICOM series; skipped: {skipped}"


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", name.lower()) if t}


def _strip_nifti(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def _skip_reason(rel_path: str) -> str | None:
    parts = rel_path.replace("\\", "/").split("/")
    dirs, base = parts[:-1], _strip_nifti(parts[-1])
    low = base.lower()
    for d in dirs:
        if d.lower() in _LABEL_DIRS or d.lower().startswith("labels"):
            return f"label/mask: folder {d!r}"
        if _tokens(d) & _NON_CT_TOKENS:
            return f"non-CT: folder {d!r}"
    hit = [s for s in _LABEL_SUBSTRINGS if s in low] + sorted(_tokens(base) & _LABEL_TOKENS)
    if hit:
        return f"label/mask: name contains {hit[0]!r}"
    other = sorted(_tokens(base) & _NON_CT_TOKENS)
    if other:
        return f"non-CT: name token {other[0]!r}"
    return None


def _is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_series(folder: str, files: list[str], skipped: list) -> list[CTItem]:
    import SimpleITK as sitk

    low = [f.lower() for f in files]
    candidates = [f for f, l in zip(files, low) if not l.endswith(_NIFTI) and not l.startswith(".")]
    named = any(l.endswith((".dcm", ".ima")) for l in low)
    if not candidates or not (named or any(_is_dicom_file(os.path.join(folder, f)) for f in candidates[:3])):
        return []
    items = []
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as exc:
        skipped.append((folder, f"unreadable DICOM: {exc}"))
        return []
    for sid in series_ids:
        names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid))
        if not names:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(names[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            skipped.append((folder, f"unreadable DICOM: {exc}"))
            continue

        def tag(key):
            return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

        modality, image_type = tag("0008|0060").upper(), tag("0008|0008").upper()
        frames = int(tag("0028|0008") or 1) if tag("0028|0008").isdigit() else 1
        where = f"{folder} [series {sid or '-'}]"
        if modality and modality != "CT":
            skipped.append((where, f"non-CT: DICOM modality {modality}"))
        elif "LOCALIZER" in image_type:
            skipped.append((where, "non-CT: DICOM localizer"))
        elif len(names) < 3 and frames < 3:
            skipped.append((where, f"too few slices: {len(names)}"))
        else:
            items.append(CTItem(folder, "dicom", tuple(names), sid))
    return items


def discover_ct(folders: Sequence[str] | str, include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None) -> Discovery:
    """Every CT NIfTI file and DICOM series under ``folders`` (rules in the module docstring)."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    found = Discovery()
    seen = set()
    for root in folders:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise NoCTFoundError(f"--data {root!r} is not a folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            filenames = sorted(f for f in filenames if not f.startswith("."))
            for name in filenames:
                if not name.lower().endswith(_NIFTI):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)
                real = os.path.realpath(path)
                if real in seen:
                    continue
                if exclude and any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in exclude):
                    found.skipped.append((path, "excluded: --exclude"))
                    continue
                if include:
                    if not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in include):
                        found.skipped.append((path, "excluded: not matching --include"))
                        continue
                else:
                    why = _skip_reason(rel)
                    if why:
                        found.skipped.append((path, why))
                        continue
                seen.add(real)
                found.items.append(CTItem(path, "nifti"))
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir != "." and exclude and any(fnmatch.fnmatch(rel_dir, g) for g in exclude):
                continue
            for item in _dicom_series(dirpath, filenames, found.skipped):
                key = (os.path.realpath(item.path), item.series_id)
                if key not in seen:
                    seen.add(key)
                    found.items.append(item)
    good = []
    for item in found.items:     # damaged volumes are skipped here, listed once, not counted as CT volumes
        why = damage(item)
        if why:
            found.skipped.append((item.describe(), f"damaged: {why}"))
        else:
            good.append(item)
    found.items = good
    return found


def damage(item: CTItem) -> str | None:
    """Why a volume cannot be used (truncated file, NaN/inf voxels, DICOM slices missing), or None.

    The checks of :mod:`medmamba.clinic.validate`, shared with ``predict`` and ``evaluate``."""
    from medmamba.clinic import validate

    if item.kind == "nifti":
        return validate.nifti_problem(item.path) or validate.nifti_nonfinite_problem(item.path)
    return validate.dicom_series_problem(list(item.files))


# --------------------------------------------------------------------------------------------------
# Loading and preprocessing
# --------------------------------------------------------------------------------------------------

class _DropNvImgCodecNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("nvImageCodec is not available")


_NIFTI_LOADER = None


def _nifti_loader():
    """One ``LoadImage(reader="NibabelReader")`` per process, built without MONAI's nvImageCodec notices.

    Why: MONAI (1.6) ``LoadImage.__init__`` instantiates *every* default reader, whatever ``reader`` says,
    including ``NvImgCodecPydicomReader``; without nvImageCodec/CuPy (any CPU-only or plain-PyTorch machine) that
    reader logs "nvImageCodec is not available; skipping pydicom decoder plugin registration." and warns
    "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully". Built once per volume
    load, that printed about 100 lines on a real CT run (issue 14). The notice is harmless here: NIfTI is read by
    nibabel and DICOM by SimpleITK, the nvImageCodec DICOM decoder is never used. So the loader is built once per
    process (the main one and each data-loader worker), and exactly these two messages are dropped while it is
    built; everything else MONAI reports still shows."""
    global _NIFTI_LOADER
    if _NIFTI_LOADER is None:
        from monai.transforms import LoadImage

        logger, drop = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin"), _DropNvImgCodecNotice()
        logger.addFilter(drop)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin "
                                        "did not register", category=UserWarning)
                _NIFTI_LOADER = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True,
                                          dtype=np.float32)
        finally:
            logger.removeFilter(drop)
    return _NIFTI_LOADER


def load_ct(item: CTItem | str):
    """A ``monai.data.MetaTensor`` (1, X, Y, Z) float32 in HU with its RAS affine.

    NIfTI through MONAI's ``LoadImage`` (nibabel); DICOM through SimpleITK's ``ImageSeriesReader``
    (rescale slope/intercept applied), its LPS geometry converted to MONAI's RAS affine.
    """
    from monai.data import MetaTensor

    if isinstance(item, str):
        item = CTItem(item, "nifti")
    if item.kind == "nifti":
        img = _nifti_loader()(item.path)
        n_bad = int((~torch.isfinite(img)).sum())
        if n_bad:   # discover_ct skips such files; this guards volumes given directly
            raise ValueError(f"{item.describe()}: {n_bad} voxels are NaN or infinite")
        return img
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(item.files))
    img = reader.Execute()
    if img.GetDimension() != 3:
        raise ValueError(f"{item.describe()}: expected a 3D series, got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z) = index (i, j, k)
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr))[None], affine=torch.as_tensor(ras),
                      meta={"filename_or_obj": item.path, "space": "RAS"})


def _foreground(x):
    """Body foreground for CropForeground: HU above the lower clip bound (works on raw HU)."""
    return x > HU_RANGE[0]


@dataclass
class Intensity:
    """HU -> network input: ``mode="hu01"``: clip [-175, 250], scale to [0, 1] (MambaMIM); ``mode="ct"``:
    nnU-Net's CTNormalization (clip to [lower, upper], then (x - mean) / std); ``mode="zscore"``: nnU-Net's
    ZScoreNormalization (per volume, after the foreground crop)."""
    mode: str = "hu01"
    lower: float = HU_RANGE[0]
    upper: float = HU_RANGE[1]
    mean: float = 0.0
    std: float = 1.0

    def transform(self):
        from monai.transforms import Lambdad, ScaleIntensityRanged

        if self.mode == "hu01":
            return ScaleIntensityRanged(keys="image", a_min=self.lower, a_max=self.upper, b_min=0.0, b_max=1.0,
                                        clip=True)
        if self.mode == "ct":
            return Lambdad(keys="image", func=_CTNorm(self.lower, self.upper, self.mean, self.std))
        if self.mode == "zscore":
            return Lambdad(keys="image", func=_zscore)
        raise ValueError(f"unknown intensity mode {self.mode!r}")


class _CTNorm:
    def __init__(self, lower, upper, mean, std):
        self.lower, self.upper, self.mean, self.std = float(lower), float(upper), float(mean), max(float(std), 1e-8)

    def __call__(self, x):
        return (x.clamp(self.lower, self.upper) - self.mean) / self.std


def _zscore(x):
    return (x - x.mean()) / x.std().clamp(min=1e-8)


def preprocess_transforms(patch: Sequence[int], spacing: Sequence[float], samples_per_volume: int = 4,
                          intensity: Intensity | None = None, axes: Sequence[int] | None = None,
                          flips: bool = True):
    """MONAI transforms from a loaded ``{"image": MetaTensor}`` to a list of ``samples_per_volume`` crops.

    ``spacing`` and ``patch`` are in the RAS axis order of the resampled array unless ``axes`` is given:
    then output axis i is RAS axis ``axes[i]`` (nnU-Net plans order), and ``spacing``/``patch`` are in
    that output order.
    """
    from monai.transforms import (Compose, CropForegroundd, Orientationd, RandFlipd, RandSpatialCropSamplesd,
                                  Spacingd, SpatialPadd, Transposed)

    patch = [int(p) for p in patch]
    spacing = [float(s) for s in spacing]
    if axes is not None:
        axes = [int(a) for a in axes]
        ras_patch, ras_spacing = [0] * 3, [0.0] * 3
        for i, a in enumerate(axes):
            ras_patch[a], ras_spacing[a] = patch[i], spacing[i]
    else:
        ras_patch, ras_spacing = patch, spacing
    steps = [
        Orientationd(keys="image", axcodes="RAS", labels=None),
        Spacingd(keys="image", pixdim=ras_spacing, mode="bilinear", dtype=np.float32),
        CropForegroundd(keys="image", source_key="image", select_fn=_foreground, allow_smaller=True),
        SpatialPadd(keys="image", spatial_size=ras_patch, mode="constant", value=-1024.0),
        (intensity or Intensity()).transform(),
        RandSpatialCropSamplesd(keys="image", roi_size=ras_patch, num_samples=int(samples_per_volume),
                                random_size=False),
    ]
    if flips:
        steps += [RandFlipd(keys="image", prob=0.5, spatial_axis=a) for a in range(3)]
    if axes is not None and list(axes) != [0, 1, 2]:
        steps.append(Transposed(keys="image", indices=[0] + [1 + a for a in axes]))
    return Compose(steps)


class CTCropStream(torch.utils.data.IterableDataset):
    """Endless stream of (C, *patch) float32 crops from a list of :class:`CTItem` (see the module docstring).

    Lanes: a global batch of ``num_lanes`` crops has one crop from each lane; this stream serves the lanes
    ``lanes`` (a process of a distributed run serves its slice of the global batch) and yields one crop
    per lane in turn, so a DataLoader with ``batch_size=len(lanes)`` gives this process's part of every
    global batch. Every (lane, DataLoader worker) pair is an independent stream with its own RNG and
    shuffle buffer; in each of its epochs it reads :meth:`shard` of the volume list, and the shards of
    one epoch are disjoint. A stream is therefore reproducible from (seed, epoch_offset, lane, workers
    per process), whatever the number of processes: one process serving lanes 0-3 yields exactly the
    crops that two processes serving 0-1 and 2-3 yield together.
    """

    def __init__(self, items: Sequence[CTItem], patch: Sequence[int], spacing: Sequence[float],
                 samples_per_volume: int = 4, intensity: Intensity | None = None, axes: Sequence[int] | None = None,
                 seed: int = 0, epoch_offset: int = 0, shuffle_buffer: int = 16, flips: bool = True,
                 lanes: Sequence[int] = (0,), num_lanes: int | None = None):
        super().__init__()
        if not items:
            raise NoCTFoundError("no CT volumes to stream")
        self.items = list(items)
        self.patch, self.spacing = tuple(int(p) for p in patch), tuple(float(s) for s in spacing)
        self.samples_per_volume = int(samples_per_volume)
        self.intensity, self.axes = intensity or Intensity(), axes
        self.seed, self.epoch_offset = int(seed), int(epoch_offset)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.flips = flips
        self.lanes = [int(lane) for lane in lanes]
        self.num_lanes = int(num_lanes) if num_lanes is not None else max(self.lanes) + 1
        if not self.lanes or min(self.lanes) < 0 or max(self.lanes) >= self.num_lanes:
            raise ValueError(f"CTCropStream: lanes {self.lanes} must be in 0..{self.num_lanes - 1}")

    def shard(self, stream: int, n_streams: int, epoch: int) -> list:
        """Volumes of stream ``stream`` (of ``n_streams``) in its epoch ``epoch``: a strided slice of the
        volume list shuffled by (seed, epoch_offset, epoch), identical on every process; one volume
        (streams sharing) when there are fewer volumes than streams."""
        order = list(self.items)
        random.Random(f"medmamba-shard-{self.seed}-{self.epoch_offset}-{epoch}").shuffle(order)
        if len(order) >= n_streams:
            return order[stream::n_streams]
        return [order[stream % len(order)]]

    def _stream(self, stream: int, n_streams: int):
        rng = random.Random(f"medmamba-stream-{self.seed}-{self.epoch_offset}-{stream}-{n_streams}")
        transforms = preprocess_transforms(self.patch, self.spacing, self.samples_per_volume, self.intensity,
                                           self.axes, self.flips)
        transforms.set_random_state(seed=rng.randrange(2 ** 31))
        buffer: list = []
        bad: set = set()
        epoch = 0
        while True:
            order = [item for item in self.shard(stream, n_streams, epoch) if (item.path, item.series_id) not in bad]
            epoch += 1
            rng.shuffle(order)
            for item in order:
                try:
                    crops = transforms({"image": load_ct(item)})
                except Exception as exc:  # one bad file must not stop a long run
                    warnings.warn(f"skipping {item.describe()}: {type(exc).__name__}: {exc}")
                    bad.add((item.path, item.series_id))
                    continue
                for c in crops:
                    buffer.append(torch.as_tensor(c["image"]).float().contiguous())
                while len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if len(bad) >= len({(item.path, item.series_id) for item in self.items}):
                raise RuntimeError(f"data stream {stream}: none of the {len(self.items)} volume(s) could be loaded")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        n_streams = self.num_lanes * n_workers
        streams = [self._stream(lane * n_workers + worker, n_streams) for lane in self.lanes]
        while True:
            for s in streams:
                yield next(s)
