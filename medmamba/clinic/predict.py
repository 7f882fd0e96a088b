"""``medmamba predict``: segment a folder of scans (NIfTI files and/or DICOM series) with a trained model.

MODEL is either

* a MONAI bundle folder (``configs/inference.json`` + ``models/model.pt``): the bundle's own ``network_def``,
  ``preprocessing``, ``inferer`` and ``postprocessing`` (minus any ``SaveImaged``) are built by MONAI's
  ``ConfigParser`` and run in-process; the prediction is brought back to the input grid by the bundle's
  ``Invertd`` (or by an ``Invertd`` added here when the postprocessing has none); or
* an nnU-Net results folder (``<Trainer>__<plans>__<configuration>`` with ``plans.json``, ``dataset.json`` and
  ``fold_*/checkpoint_final.pth``): run by ``nnunetv2``'s ``nnUNetPredictor`` (all folds found, mirroring on).

Each case gives ``OUT/<case>.nii.gz`` (uint8/uint16 labels) on the input's voxel grid (size, spacing, origin,
direction copied from the input), written atomically (temporary name, then ``os.replace``); an existing output
is never replaced unless ``--overwrite``. A failing case is reported and the others still run;
``OUT/predict_log.json`` lists every case's status. Exit status: 0 when every case succeeded, 1 when any case
failed (or existed without ``--overwrite``), 2 on usage errors (bad model folder, unwritable output, no input).
Case names: NIfTI file name without ``.nii``/``.nii.gz`` (and without nnU-Net's ``_0000`` channel suffix; for
nnU-Net models every ``_NNNN`` is a channel, for bundles only ``_0000`` is dropped); DICOM series: see
:mod:`medmamba.clinic.imageio`. Inputs are read through :func:`medmamba.clinic.imageio.read_case`, which refuses
truncated files, NaN/inf voxels and DICOM series with missing slices (the case fails, the others run).
Out of memory fails the case with a message naming it and what to change (``--sw-batch-size 1``, ``--device
cpu``, ...); the GPU cache is freed and the other cases run. An output folder that is a file (or lies below
one) is a usage error.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import sys
import tempfile
import time
import traceback

import numpy as np

from medmamba.clinic import imageio, validate


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict", help="segment a folder of NIfTI files / DICOM series with a MONAI bundle or nnU-Net model",
        description="Writes OUT/<case>.nii.gz per input case on the input's grid. See docs/hospital.md.")
    p.add_argument("--model", required=True, help="MONAI bundle folder or nnU-Net results folder (Trainer__plans__config)")
    p.add_argument("--input", required=True, help="folder of NIfTI files and/or DICOM series (sub-folders), or one NIfTI file")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--folds", nargs="+", help="nnU-Net: folds to use (default: every fold_* with the checkpoint)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="nnU-Net checkpoint file name")
    p.add_argument("--no-mirroring", action="store_true", help="nnU-Net: no test-time mirroring (faster)")
    p.add_argument("--output-format", choices=("nifti", "dicom-seg", "both"), default="nifti",
                   help="nifti: OUT/<case>.nii.gz; dicom-seg: OUT/<case>_seg.dcm, a DICOM Segmentation referencing "
                        "the input DICOM series (DICOM inputs only); both (default nifti)")
    p.add_argument("--seg-coding", metavar="JSON", help="DICOM SEG: label name -> category/type codes "
                   "(see medmamba.clinic.dicom_seg; default: built-in codes or a private scheme)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: MODEL is a folder written by `medmamba export --format onnx` (default torch)")
    p.add_argument("--sw-batch-size", type=int, metavar="N",
                   help="MONAI bundles: sliding windows per forward pass, replacing the bundle's inferer "
                        "sw_batch_size (lower it, e.g. 1, when a case runs out of GPU memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the per-case log as JSON on stdout (machine-readable)")
    p.set_defaults(func=cmd_predict)
    return p


def model_kind(model: str) -> str:
    if os.path.isfile(os.path.join(model, "configs", "inference.json")):
        return "bundle"
    if os.path.isfile(os.path.join(model, "plans.json")) and os.path.isfile(os.path.join(model, "dataset.json")):
        return "nnunet"
    raise ValueError(f"{model}: neither a MONAI bundle (configs/inference.json) nor an nnU-Net results folder "
                     f"(plans.json + dataset.json + fold_*/checkpoint_final.pth)")


def _label_image(seg: np.ndarray, like):
    """A label map (array in SimpleITK (z, y, x) order) as an image on ``like``'s grid."""
    import SimpleITK as sitk

    seg = np.asarray(seg)
    if tuple(seg.shape) != tuple(reversed(like.GetSize())):
        raise RuntimeError(f"prediction shape {tuple(reversed(seg.shape))} (x, y, z) != input size {like.GetSize()}")
    dtype = np.uint8 if seg.max(initial=0) < 256 else np.uint16
    out = sitk.GetImageFromArray(seg.astype(dtype))
    out.SetSpacing(like.GetSpacing())
    out.SetOrigin(like.GetOrigin())
    out.SetDirection(like.GetDirection())
    return out


# ------------------------------------------------------------------------------------------------------ MONAI bundle
class BundlePredictor:
    """A MONAI bundle's inference pipeline, built from its ``configs/inference.json`` by ``ConfigParser``."""

    def __init__(self, bundle: str, device: str):
        import torch
        from monai.bundle import ConfigParser

        self.device = torch.device(device)
        cfg = os.path.join(bundle, "configs", "inference.json")
        parser = ConfigParser()
        meta = os.path.join(bundle, "configs", "metadata.json")
        for path, read in ((cfg, parser.read_config), (meta, parser.read_meta)):
            if path == cfg or os.path.isfile(path):
                try:
                    read(path)
                except ValueError as exc:     # json.JSONDecodeError: name the file
                    raise ValueError(f"{path}: not valid JSON ({exc})") from None
        parser["bundle_root"] = os.path.abspath(bundle)
        parser["device"] = f"$torch.device('{device}')"
        if "data_device" in parser:
            parser["data_device"] = "$torch.device('cpu')"
        for key in ("network_def", "preprocessing"):
            if key not in parser:
                raise ValueError(f"{cfg}: no '{key}'")
        post = parser.get("postprocessing")
        if post is not None:   # we write the outputs ourselves: drop the bundle's writers
            post = copy.deepcopy(post)
            post["transforms"] = [t for t in post.get("transforms", [])
                                  if not str(t.get("_target_", "")).split(".")[-1].startswith("SaveImage")]
            parser["postprocessing"] = post
        self.net = parser.get_parsed_content("network_def").to(self.device).eval()
        weights = os.path.join(bundle, "models", "model.pt")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights} not found")
        state = torch.load(weights, map_location=self.device, weights_only=True)
        for key in ("model", "state_dict", "network_weights", "network"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        self.net.load_state_dict(state, strict=True)
        self.pre = parser.get_parsed_content("preprocessing")
        if "inferer" in parser:
            self.inferer = parser.get_parsed_content("inferer")
        else:
            from monai.inferers import SimpleInferer
            self.inferer = SimpleInferer()
        self.post = parser.get_parsed_content("postprocessing") if post is not None else None
        self.has_invert = post is not None and any(str(t.get("_target_", "")).split(".")[-1] == "Invertd"
                                                   for t in post["transforms"])

    def __call__(self, path: str, like) -> np.ndarray:
        """Label map of the NIfTI file ``path`` in SimpleITK (z, y, x) order on the input grid."""
        import torch
        from monai.transforms import Invertd

        data = self.pre({"image": path})
        if isinstance(data, list):
            data = data[0]
        with torch.no_grad():
            img = data["image"]
            data["pred"] = self.inferer(img[None].to(self.device), self.net)[0].to("cpu")
        if self.post is not None:
            data = self.post(data)
        pred = data["pred"]
        target = tuple(like.GetSize())
        if tuple(pred.shape[1:]) != target and not self.has_invert:
            data = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False)(data)
            pred = data["pred"]
        pred = torch.as_tensor(pred).detach().cpu()
        if pred.ndim == 4 and pred.shape[0] > 1:
            pred = pred.argmax(0)
        elif pred.ndim == 4:
            pred = pred[0]
        pred = pred.round().to(torch.int32).numpy()
        if pred.shape != target:
            raise RuntimeError(f"bundle output shape {pred.shape} != input size {target} (x, y, z): the bundle's "
                               "postprocessing does not bring the prediction back to the input grid")
        return pred.transpose(2, 1, 0)      # (x, y, z) -> SimpleITK array order (z, y, x)


# ----------------------------------------------------------------------------------------------------------- nnU-Net
class NnunetPredictor:
    def __init__(self, folder: str, device: str, folds=None, checkpoint="checkpoint_final.pth", mirroring=True):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        if folds is None:
            folds = [f.split("fold_")[-1] for f in sorted(glob.glob(os.path.join(folder, "fold_*")))
                     if os.path.isfile(os.path.join(f, checkpoint))]
            if not folds:
                raise FileNotFoundError(f"{folder}: no fold_*/{checkpoint}")
        folds = [f if f == "all" else int(f) for f in folds]
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=device == "cuda", device=torch.device(device),
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(folder, use_folds=folds, checkpoint_name=checkpoint)

    def __call__(self, images: list) -> np.ndarray:
        """``images``: one SimpleITK image per channel, on one grid. Returns labels in (z, y, x) order."""
        import SimpleITK as sitk

        first = images[0]
        for other in images[1:]:
            problems = imageio.geometry_problems(other, first, names=("channel", "channel 0"))
            if problems:
                raise RuntimeError("input channels differ in geometry: " + "; ".join(problems))
        arr = np.stack([sitk.GetArrayFromImage(im).astype(np.float32) for im in images])
        props = {"sitk_stuff": {"spacing": first.GetSpacing(), "origin": first.GetOrigin(),
                                "direction": first.GetDirection()},
                 "spacing": list(first.GetSpacing())[::-1]}
        return self.predictor.predict_single_npy_array(arr, props, None, None, False)


# ------------------------------------------------------------------------------------------------------------ driver
_CHANNEL = re.compile(r"^(.*)_(\d{4})$")


def group_cases(cases, n_channels: int = 1, channel_suffix: bool = True) -> dict:
    """Case name -> list of input cases (one per channel). nnU-Net's ``_0000`` suffix is dropped from names.

    ``channel_suffix=False`` (MONAI bundles, one file per case): only ``_0000`` is dropped; any other ``_NNNN``
    is part of the case name (``case_0001`` and ``case_0002`` are two cases). Two files claiming the same case and channel (``pat.nii.gz`` and ``pat_0000.nii.gz``) fail that
    case instead of one silently replacing the other."""
    groups: dict = {}
    clashes: dict = {}
    for c in cases:
        m = _CHANNEL.match(c.name) if c.kind == "nifti" else None
        if m and not channel_suffix and m.group(2) != "0000":
            m = None
        name, chan = (m.group(1), int(m.group(2))) if m else (c.name, 0)
        if chan in groups.setdefault(name, {}):
            clashes.setdefault(name, [groups[name][chan].path]).append(c.path)
        groups[name][chan] = c
    out = {}
    for name, chans in groups.items():
        missing = [i for i in range(n_channels) if i not in chans]
        out[name] = ([chans[i] for i in range(n_channels)] if not missing
                     else ValueError(f"missing channel(s) {missing} (expected {name}_0000 ... "
                                     f"{name}_{n_channels - 1:04d}); found {sorted(chans)}"))
        if not missing and len(chans) > n_channels:
            out[name] = ValueError(f"{len(chans)} channel files for a {n_channels}-channel model")
        if name in clashes:
            out[name] = ValueError(f"several files are channel 0 of case {name!r}: "
                                   f"{', '.join(os.path.basename(p) for p in clashes[name])}; rename or remove one")
    return dict(sorted(out.items()))


def predict(model: str, input: str, output: str, device: str | None = None, overwrite: bool = False,
            folds=None, checkpoint: str = "checkpoint_final.pth", mirroring: bool = True, progress: bool = True,
            output_format: str = "nifti", seg_coding: str | None = None, runtime: str = "torch",
            sw_batch_size: int | None = None) -> dict:
    """Predict every case; returns ``{case: {"status": "ok"|"failed"|"exists", ...}}``.

    ``output_format``: "nifti", "dicom-seg" (DICOM series inputs only; :mod:`medmamba.clinic.dicom_seg`) or "both".
    """
    import SimpleITK as sitk
    import torch
    from tqdm import tqdm

    kind = model_kind(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    if sw_batch_size is not None and (sw_batch_size < 1 or kind != "bundle"):
        raise ValueError("--sw-batch-size must be at least 1" if sw_batch_size < 1 else
                         "--sw-batch-size applies to MONAI bundles (nnU-Net runs one tile at a time)")
    cases = imageio.find_cases(input)
    if not cases:
        raise ValueError(f"no NIfTI files or DICOM series found in {input}")
    imageio.check_writable(output)
    n_channels = 1
    if kind == "nnunet":
        with open(os.path.join(model, "dataset.json")) as f:
            n_channels = len(json.load(f)["channel_names"])
    groups = group_cases(cases, n_channels, channel_suffix=kind == "nnunet")
    if output_format != "nifti":
        from medmamba.clinic import dicom_seg
        coding = dicom_seg.load_coding(seg_coding)
        label_names = dicom_seg.label_names_of_model(model, kind)
    ext = "_seg.dcm" if output_format == "dicom-seg" else ".nii.gz"
    todo = [n for n, g in groups.items()
            if not isinstance(g, Exception) and (overwrite or not os.path.exists(os.path.join(output, f"{n}{ext}")))]
    runner = None
    if todo:    # load the model only when there is work for it
        try:
            if runtime == "onnxruntime":
                from medmamba.clinic import onnx_runtime
                runner = onnx_runtime.make_runner(model, kind, device, folds=folds, mirroring=mirroring)
            elif kind == "bundle":
                runner = BundlePredictor(model, device)
            else:
                runner = NnunetPredictor(model, device, folds=folds, checkpoint=checkpoint, mirroring=mirroring)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:   # corrupt or mismatched weights, broken config: one line naming the model
            raise ValueError(f"cannot load the model {model}: {validate.error_message(exc)}") from None
        if sw_batch_size is not None:
            if not hasattr(runner.inferer, "sw_batch_size"):
                raise ValueError(f"--sw-batch-size: the bundle's inferer ({type(runner.inferer).__name__}) has no "
                                 "sliding-window batch")
            runner.inferer.sw_batch_size = sw_batch_size
    log = {}
    bar = tqdm(groups.items(), desc="predict", unit="case", disable=not progress)
    for name, group in bar:
        out_path = os.path.join(output, f"{name}{ext}")
        entry = {"output": out_path}
        log[name] = entry
        if isinstance(group, Exception):
            entry.update(status="failed", error=str(group))
            tqdm.write(f"FAILED {name}: {group}", file=sys.stderr)
            continue
        entry["inputs"] = [c.describe() for c in group]
        if os.path.exists(out_path) and not overwrite:
            entry.update(status="exists", error=f"{out_path} exists (use --overwrite to replace it)")
            tqdm.write(f"SKIPPED {name}: {entry['error']}", file=sys.stderr)
            continue
        start = time.perf_counter()
        images = None
        try:
            images = [imageio.read_case(c) for c in group]      # refuses truncated files, NaN/inf, slice gaps
            for c, im in zip(group, images):
                if problem := validate.shape_problem(im, n_channels):
                    raise validate.VolumeError(f"{c.describe()} {problem}")
            if kind == "bundle":
                if group[0].kind == "nifti":
                    seg = runner(group[0].path, images[0])
                else:   # the bundle's LoadImaged reads a NIfTI written from the DICOM series
                    with tempfile.TemporaryDirectory(prefix="medmamba_dicom_") as tmp:
                        path = os.path.join(tmp, f"{name}.nii.gz")
                        sitk.WriteImage(images[0], path)
                        seg = runner(path, images[0])
            else:
                seg = runner(images)
            label_img = _label_image(seg, images[0])
            if output_format != "dicom-seg":
                imageio.write_image_atomic(label_img, out_path, overwrite=overwrite)
            if output_format != "nifti" and group[0].kind != "dicom":
                if output_format == "dicom-seg":
                    raise ValueError("a DICOM SEG references its source DICOM series; this input is NIfTI "
                                     "(use --output-format nifti or both)")
                entry["warnings"] = ["no DICOM SEG for a NIfTI input (a SEG references its source DICOM series)"]
            elif output_format != "nifti":
                seg_path = os.path.join(output, f"{name}_seg.dcm")
                if os.path.exists(seg_path) and not overwrite:
                    raise FileExistsError(f"{seg_path} exists (use --overwrite to replace it)")
                notes = dicom_seg.write_dicom_seg(seg, group[0].files, seg_path, label_names, coding,
                                                  model_name=os.path.basename(os.path.normpath(model)))
                entry["dicom_seg"] = seg_path
                if notes:
                    entry["warnings"] = notes
            entry.update(status="ok", seconds=round(time.perf_counter() - start, 2),
                         labels=sorted(int(v) for v in np.unique(seg)))
        except Exception as exc:   # report, go on with the other cases
            entry.update(status="failed", error=validate.error_message(exc))
            if validate.is_out_of_memory(exc):    # name the case and what to change; free memory for the next case
                entry["error"] = (f"{_oom_message(name, images, device, kind, runner, model)} "
                                  f"[{validate.error_message(exc, oom_hint=False)}]")
                if device == "cuda":
                    torch.cuda.empty_cache()
            if os.environ.get("MEDMAMBA_DEBUG"):
                entry["traceback"] = traceback.format_exc()
            tqdm.write(f"FAILED {name}: {entry['error']}", file=sys.stderr)
    log_path = os.path.join(output, "predict_log.json")
    if os.path.isfile(log_path):   # a rerun keeps what earlier runs recorded for the cases it skipped
        try:
            with open(log_path) as f:
                previous = json.load(f).get("cases", {})
        except (OSError, ValueError, AttributeError):
            previous = {}
        for name, entry in log.items():
            if entry["status"] == "exists" and isinstance(previous.get(name), dict):
                entry["previous"] = previous[name]
    report = {"model": os.path.abspath(model), "model_kind": kind, "runtime": runtime, "device": device,
              "input": os.path.abspath(input),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cases": log}
    imageio.write_text_atomic(log_path, json.dumps(report, indent=2) + "\n")
    return log


def _oom_message(name: str, images, device: str, kind: str, runner, model: str) -> str:
    size = f", input size {tuple(images[0].GetSize())} (x, y, z)" if images else ""
    hints = []
    sw = getattr(getattr(runner, "inferer", None), "sw_batch_size", None)
    if kind == "bundle" and isinstance(sw, int) and sw > 1:
        hints.append(f"--sw-batch-size 1 (now {sw} windows per forward pass)")
    if device == "cuda":
        hints.append("--device cpu (slower, uses RAM)")
        hints.append("free the GPU of other jobs")
    else:
        hints.append("a machine with more RAM")
    if kind == "bundle":
        hints.append(f"a smaller inferer roi_size in {os.path.join(model, 'configs', 'inference.json')} if the "
                     "network accepts it")
    where = "GPU memory" if device == "cuda" else "memory"
    return f"out of {where} while segmenting case {name}{size}; try " + ", or ".join(hints)


def cmd_predict(args) -> int:
    try:
        log = predict(args.model, args.input, args.output, device=args.device, overwrite=args.overwrite,
                      folds=args.folds, checkpoint=args.checkpoint, mirroring=not args.no_mirroring,
                      progress=not getattr(args, "quiet", False),
                      output_format=getattr(args, "output_format", "nifti"),
                      seg_coding=getattr(args, "seg_coding", None),
                      runtime=getattr(args, "runtime", "torch"),
                      sw_batch_size=getattr(args, "sw_batch_size", None))
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"medmamba predict: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # outputs are written atomically: finished cases are complete, nothing half-written
        print("medmamba predict: interrupted; the segmentations written so far are complete, rerun to do the rest",
              file=sys.stderr)
        return 130
    bad = {n: e for n, e in log.items() if e["status"] != "ok"}
    if getattr(args, "json", False):
        print(json.dumps(log, indent=2))
    else:
        secs = [e["seconds"] for e in log.values() if "seconds" in e]
        print(f"{len(log) - len(bad)}/{len(log)} case(s) written to {args.output}"
              + (f" in {sum(secs):.1f} s ({sum(secs) / len(secs):.1f} s/case)" if secs else ""))
    for name, e in bad.items():
        print(f"  {e['status']}: {name}: {e.get('error', '')}", file=sys.stderr)
    return 1 if bad else 0
