"""``medmamba evaluate``: per case and per label Dice, HD95, NSD and volumes of predicted vs reference masks.

Metrics are MONAI's (``compute_dice``, ``compute_hausdorff_distance(percentile=95, spacing=...)``,
``compute_surface_dice(class_thresholds=[tol_mm], spacing=...)``), computed on the voxel grid with the image
spacing in mm. Conventions where a mask is empty (MONAI returns NaN there; we state the value instead):

================================  =====  ===============================  =====
case                              Dice   HD95 (mm)                        NSD
================================  =====  ===============================  =====
both empty                        1.0    0.0                              1.0
reference empty, prediction not   0.0    null, flag ``hd95_undefined``    0.0
prediction empty, reference not   0.0    null, flag ``hd95_undefined``    0.0
================================  =====  ===============================  =====

Means per label are over the evaluated cases; the HD95 mean is over the cases where it is defined
(``hd95_n`` says how many). Cases in REF without a prediction (``missing_pred``; also in ``cases`` with
``status: "missing_pred"``, and the summary says ``"complete": false``), predictions without a reference
(``missing_ref``), unreadable files and cases whose geometry differs (``refused``) are listed in the outputs and
left out of the means. Both files are read through :func:`medmamba.clinic.imageio.read_case`: a
truncated file, NaN/inf voxels, or a reference/prediction with non-integer or negative values refuses the case.
Exit status (:func:`cmd_evaluate`; :func:`evaluate` itself raises only on usage errors): 0, or 1 when any case
was refused or unreadable, when a reference case has no prediction (unless ``--allow-missing``; the report is
still written for the cases present and marked incomplete) or when no case was evaluated at all, 2 on usage
errors (e.g. OUT/summary.json exists without ``--overwrite``, OUT is a file).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import os
import sys
import time
import warnings

import numpy as np

from medmamba.clinic import imageio

METRIC_COLUMNS = ["case", "label", "status", "dice", "hd95_mm", "nsd", "vol_pred_ml", "vol_ref_ml", "flags"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate", help="Dice, HD95, NSD and volumes of predicted vs reference NIfTI masks, with an HTML report",
        description="Compare a folder of predicted label maps with a folder of reference label maps (matched by file "
                    "name without .nii/.nii.gz). Writes OUT/summary.json, OUT/metrics.csv and OUT/report.html. "
                    "See docs/hospital.md.")
    p.add_argument("--pred", required=True, help="folder (or one file) of predicted NIfTI label maps")
    p.add_argument("--ref", required=True, help="folder (or one file) of reference NIfTI label maps")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", type=int, nargs="+", metavar="L",
                   help="labels to evaluate (default: every non-zero label present in any reference)")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM",
                   help="surface Dice tolerance in mm (default 2)")
    p.add_argument("--images", metavar="DIR",
                   help="optional folder of the scans (CASE.nii.gz or CASE_0000.nii.gz) shown under the contours")
    p.add_argument("--slices", type=int, default=3, help="axial slices per case in the report (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/summary.json")
    p.add_argument("--allow-missing", action="store_true",
                   help="a reference case without prediction is listed (summary.json: \"complete\": false) but does "
                        "not make the exit status 1 (default: it does, naming the case)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the per-label means as JSON on stdout")
    p.set_defaults(func=cmd_evaluate)
    return p


# ----------------------------------------------------------------------------------------------------------- metrics
def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing, nsd_tolerance: float = 2.0) -> dict:
    """Dice, HD95 (mm), NSD and volumes (ml) of two boolean masks on the same grid; ``spacing`` per array axis."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out = {"vol_pred_ml": n_pred * voxel_ml, "vol_ref_ml": n_ref * voxel_ml, "flags": []}
    if n_pred == 0 and n_ref == 0:
        out.update(dice=1.0, hd95_mm=0.0, nsd=1.0)
        out["flags"].append("both_empty")
        return out
    if n_pred == 0 or n_ref == 0:
        out.update(dice=0.0, hd95_mm=None, nsd=0.0)
        out["flags"] += ["pred_empty" if n_pred == 0 else "ref_empty", "hd95_undefined"]
        return out
    # crop to the union's bounding box (+ margin): same metrics, much less work on large volumes
    idx = np.nonzero(pred | ref)
    sl = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in idx)
    p = torch.from_numpy(pred[sl].copy())[None, None].float()
    r = torch.from_numpy(ref[sl].copy())[None, None].float()
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, r, include_background=True, ignore_empty=False).item()
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=sp).item()
        nsd = compute_surface_dice(p, r, [float(nsd_tolerance)], include_background=True, spacing=sp).item()
    out.update(dice=dice, hd95_mm=hd95 if math.isfinite(hd95) else None, nsd=nsd)
    if not math.isfinite(hd95):
        out["flags"].append("hd95_undefined")
    return out


def label_map_problem(arr: np.ndarray) -> str | None:
    """Why ``arr`` is not a label map (non-integer or negative values), or None."""
    if np.issubdtype(arr.dtype, np.floating):
        frac = arr != np.round(arr)
        if frac.any():
            vals = np.unique(arr[frac])[:3]
            return (f"holds non-integer values ({int(frac.sum())} voxels, e.g. {', '.join(f'{v:g}' for v in vals)}): "
                    "probabilities or an interpolated mask, not a label map")
    if arr.size and arr.min() < 0:
        return f"holds negative values (min {arr.min():g}), not a label map"
    return None


def _array_and_spacing(img):
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)            # (z, y, x)
    return arr, tuple(reversed(img.GetSpacing()))


def evaluate_case(pred_img, ref_img, labels=None, nsd_tolerance=2.0, explicit=True) -> dict:
    """One case: geometry check, then metrics per label (``labels``: None = this reference's non-zero labels)."""
    problems = imageio.geometry_problems(pred_img, ref_img)
    if problems:
        return {"status": "refused", "reason": "geometry differs: " + "; ".join(problems)}
    pred, spacing = _array_and_spacing(pred_img)
    ref, _ = _array_and_spacing(ref_img)
    for what, arr in (("prediction", pred), ("reference", ref)):
        if problem := label_map_problem(arr):
            return {"status": "refused", "reason": f"{what} {problem}"}
    pred_labels = sorted(int(v) for v in np.unique(pred) if v != 0)
    ref_labels = sorted(int(v) for v in np.unique(ref) if v != 0)
    use = labels if labels is not None else ref_labels
    entry = {"status": "ok", "labels_pred": pred_labels, "labels_ref": ref_labels, "metrics": {}, "warnings": []}
    entry["labels_pred_not_in_ref"] = [v for v in pred_labels if v not in ref_labels]
    if entry["labels_pred_not_in_ref"]:
        entry["warnings"].append(f"labels in prediction absent from the reference: {entry['labels_pred_not_in_ref']}")
    extra = [v for v in pred_labels if v not in use]
    if extra:
        entry["warnings"].append(f"labels in prediction not evaluated (not in {'--labels' if explicit else 'any reference'}):"
                                 f" {extra}")
    if labels is not None and explicit:
        absent = [v for v in labels if v not in ref_labels]
        if absent:
            entry["warnings"].append(f"labels absent from the reference: {absent}")
    for lab in use:
        entry["metrics"][str(lab)] = label_metrics(pred == lab, ref == lab, spacing, nsd_tolerance)
    entry["spacing_mm"] = list(reversed(spacing))
    return entry


# ------------------------------------------------------------------------------------------------------------ report
def _overlay_png(ref: np.ndarray, pred: np.ndarray, image: np.ndarray | None, spacing, n_slices: int, title: str):
    """PNG bytes: a few axial slices through the reference foreground, contours ref (green) vs pred (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg_z = np.nonzero((ref > 0).any(axis=(1, 2)))[0]
    if fg_z.size == 0:
        fg_z = np.nonzero((pred > 0).any(axis=(1, 2)))[0]
    if fg_z.size == 0:
        zs = [ref.shape[0] // 2]
    else:
        zs = sorted({int(fg_z[int(round(q * (fg_z.size - 1)))]) for q in np.linspace(0.15, 0.85, n_slices)})
    aspect = spacing[1] / spacing[2]
    fig, axes = plt.subplots(1, len(zs), figsize=(3.2 * len(zs), 3.4), squeeze=False)
    for ax, z in zip(axes[0], zs):
        if image is not None:
            sl = image[z].astype(np.float32)
            lo, hi = np.percentile(sl, [1, 99])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect)
        else:
            ax.imshow(np.zeros(ref.shape[1:]), cmap="gray", vmin=0, vmax=1, aspect=aspect)
            ax.imshow(np.ma.masked_equal(ref[z] > 0, False), cmap="Greens", alpha=0.35, vmin=0, vmax=1.5,
                      aspect=aspect)
        for mask, color in ((ref[z], "lime"), (pred[z], "red")):
            for lab in np.unique(mask):
                if lab != 0 and (mask == lab).any() and not (mask == lab).all():
                    ax.contour(mask == lab, levels=[0.5], colors=color, linewidths=0.9)
        ax.set_title(f"slice z={z}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}   (green: reference, red: prediction)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _num(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _html_report(summary: dict, images: dict) -> str:
    e = html.escape
    rows = []
    for case, entry in summary["cases"].items():
        if entry["status"] != "ok":
            rows.append(f"<tr class='bad'><td>{e(case)}</td><td colspan='7'>{e(entry['status'])}: "
                        f"{e(entry.get('reason', ''))}</td></tr>")
            continue
        for lab, m in entry["metrics"].items():
            cls = " class='warn'" if m["flags"] and m["flags"] != ["both_empty"] else ""
            rows.append(f"<tr{cls}><td>{e(case)}</td><td>{e(lab)}</td><td>{_num(m['dice'])}</td>"
                        f"<td>{_num(m['hd95_mm'], '{:.2f}')}</td><td>{_num(m['nsd'])}</td>"
                        f"<td>{m['vol_pred_ml']:.2f}</td><td>{m['vol_ref_ml']:.2f}</td>"
                        f"<td>{e(', '.join(m['flags']))}</td></tr>")
    means = "".join(f"<tr><td>{e(lab)}</td><td>{m['n']}</td><td>{_num(m['dice'])}</td>"
                    f"<td>{_num(m['hd95_mm'], '{:.2f}')} (n={m['hd95_n']})</td><td>{_num(m['nsd'])}</td></tr>"
                    for lab, m in summary["mean"].items())
    problems = []
    for key, what in (("missing_pred", "reference without prediction"), ("missing_ref", "prediction without reference"),
                      ("refused", "refused (geometry / unreadable)")):
        if summary[key]:
            problems.append(f"<li><b>{e(what)}</b>: {e(', '.join(summary[key]))}</li>")
    for case, entry in summary["cases"].items():
        for w in entry.get("warnings", []):
            problems.append(f"<li>{e(case)}: {e(w)}</li>")
    figs = "".join(f"<h3>{e(case)}</h3><img alt='{e(case)}' src='data:image/png;base64,"
                   f"{base64.b64encode(png).decode()}'/>" for case, png in images.items())
    p = summary["parameters"]
    n_compared = sum(c["status"] != "missing_pred" for c in summary["cases"].values())
    incomplete = ""
    if summary["missing_pred"]:
        incomplete = (f"<p class='incomplete'><b>INCOMPLETE</b>: {len(summary['missing_pred'])} reference case(s) "
                      f"without prediction, not in the means: {e(', '.join(summary['missing_pred']))}</p>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>medmamba evaluation</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}
tr.bad{{background:#f8d0d0}} tr.warn{{background:#fff2c0}} img{{max-width:100%}}
p.incomplete{{background:#f8d0d0;padding:4px}}</style></head><body>
<h1>Segmentation evaluation</h1>
{incomplete}<p>Predictions: <code>{e(p['pred'])}</code><br>Reference: <code>{e(p['ref'])}</code><br>
{n_compared} case(s) compared, labels {e(str(p['labels']) if p['labels'] else 'from the references')},
NSD tolerance {p['nsd_tolerance_mm']} mm. Created {e(summary['created'])} by medmamba {e(summary['version'])}.</p>
<p>Dice and NSD: 1 is perfect. HD95: 95th percentile of the symmetric surface distance in mm, 0 is perfect.
Both masks empty: Dice 1, HD95 0, NSD 1. Exactly one empty: Dice 0, NSD 0, HD95 undefined (n/a).</p>
<h2>Problems</h2><ul>{''.join(problems) or '<li>none</li>'}</ul>
<h2>Mean per label</h2>
<table><tr><th>label</th><th>cases</th><th>Dice</th><th>HD95 mm</th><th>NSD</th></tr>{means}</table>
<h2>Per case</h2>
<table><tr><th>case</th><th>label</th><th>Dice</th><th>HD95 mm</th><th>NSD</th><th>vol pred ml</th>
<th>vol ref ml</th><th>flags</th></tr>{''.join(rows)}</table>
<h2>Overlays</h2>{figs or '<p>none</p>'}
</body></html>
"""


# ------------------------------------------------------------------------------------------------------------ driver
def _find_image(folder, case):
    for name in (f"{case}_0000.nii.gz", f"{case}.nii.gz", f"{case}_0000.nii", f"{case}.nii"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def evaluate(pred: str, ref: str, out: str, labels=None, nsd_tolerance: float = 2.0, images: str | None = None,
             n_slices: int = 3, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the evaluation and write OUT/summary.json, OUT/metrics.csv and OUT/report.html; returns the summary."""
    import SimpleITK as sitk
    from tqdm import tqdm

    from medmamba import __version__

    summary_path = os.path.join(out, "summary.json")
    if os.path.exists(summary_path) and not overwrite:
        raise FileExistsError(f"{summary_path} exists (use --overwrite to replace it)")
    pred_cases = {c.name: c for c in imageio.find_cases(pred, dicom=False)}
    ref_cases = {c.name: c for c in imageio.find_cases(ref, dicom=False)}
    if not ref_cases:
        raise ValueError(f"no reference NIfTI files (.nii/.nii.gz) in {ref}")
    imageio.check_writable(out)
    if os.path.isfile(pred) and os.path.isfile(ref):      # one file each: compare them whatever their names
        pred_cases = {n: pred_cases.popitem()[1] for n in ref_cases}
    common = sorted(set(pred_cases) & set(ref_cases))
    summary = {"version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "parameters": {"pred": os.path.abspath(pred), "ref": os.path.abspath(ref), "labels": labels,
                              "nsd_tolerance_mm": nsd_tolerance, "geometry_tolerance": imageio.GEOMETRY_TOL},
               "conventions": {"both_empty": {"dice": 1.0, "hd95_mm": 0.0, "nsd": 1.0},
                               "one_empty": {"dice": 0.0, "hd95_mm": None, "nsd": 0.0,
                                             "flags": ["pred_empty|ref_empty", "hd95_undefined"]},
                               "mean": "over evaluated cases; hd95 over cases where it is defined"},
               "missing_pred": sorted(set(ref_cases) - set(pred_cases)),
               "missing_ref": sorted(set(pred_cases) - set(ref_cases)),
               "complete": not (set(ref_cases) - set(pred_cases)), "refused": [], "cases": {}, "mean": {}}
    if labels is None:   # every non-zero label of any reference (one extra read of the references)
        found = set()
        for name in tqdm(common, desc="reference labels", unit="case", disable=not progress):
            try:
                found |= {int(v) for v in np.unique(sitk.GetArrayFromImage(imageio.read_case(ref_cases[name])))
                          if v == int(v)}     # non-integer references are refused by the main loop
            except Exception:   # reported by the main loop
                pass
        labels_used = sorted(found - {0})
    else:
        labels_used = sorted(set(labels))
    summary["parameters"]["labels_evaluated"] = labels_used
    pngs = {}
    for name in tqdm(common, desc="evaluate", unit="case", disable=not progress):
        try:
            pimg, rimg = imageio.read_case(pred_cases[name]), imageio.read_case(ref_cases[name])
            entry = evaluate_case(pimg, rimg, labels_used, nsd_tolerance, explicit=labels is not None)
        except Exception as exc:   # one bad case must not stop the others: report it
            entry = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        entry["pred_file"], entry["ref_file"] = pred_cases[name].path, ref_cases[name].path
        summary["cases"][name] = entry
        if entry["status"] != "ok":
            summary["refused"].append(name)
            continue
        try:
            image = None
            if images and (ipath := _find_image(images, name)):
                img = sitk.ReadImage(ipath)
                if not imageio.geometry_problems(img, rimg):
                    image = sitk.GetArrayFromImage(img)
            spacing = tuple(reversed(rimg.GetSpacing()))
            pngs[name] = _overlay_png(sitk.GetArrayFromImage(rimg), sitk.GetArrayFromImage(pimg), image, spacing,
                                      n_slices, name)
        except Exception as exc:
            entry["warnings"].append(f"overlay image failed: {type(exc).__name__}: {exc}")

    for name in summary["missing_pred"]:     # every reference case has an entry; these have no metrics
        summary["cases"][name] = {"status": "missing_pred", "reason": "no prediction for this reference",
                                  "ref_file": ref_cases[name].path}

    all_labels = sorted({int(k) for e in summary["cases"].values() for k in e.get("metrics", {})})
    for lab in all_labels:
        ms = [e["metrics"][str(lab)] for e in summary["cases"].values() if str(lab) in e.get("metrics", {})]
        hd = [m["hd95_mm"] for m in ms if m["hd95_mm"] is not None]
        summary["mean"][str(lab)] = {"n": len(ms), "dice": float(np.mean([m["dice"] for m in ms])),
                                     "hd95_mm": float(np.mean(hd)) if hd else None, "hd95_n": len(hd),
                                     "nsd": float(np.mean([m["nsd"] for m in ms])),
                                     "vol_pred_ml": float(np.mean([m["vol_pred_ml"] for m in ms])),
                                     "vol_ref_ml": float(np.mean([m["vol_ref_ml"] for m in ms]))}

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS)
    for name, entry in summary["cases"].items():
        if entry["status"] != "ok":
            w.writerow([name, "", entry["status"], "", "", "", "", "", entry.get("reason", "")])
            continue
        for lab, m in entry["metrics"].items():
            w.writerow([name, lab, "ok", m["dice"], "" if m["hd95_mm"] is None else m["hd95_mm"], m["nsd"],
                        m["vol_pred_ml"], m["vol_ref_ml"], ";".join(m["flags"])])
    for name in summary["missing_ref"]:
        w.writerow([name, "", "missing_ref", "", "", "", "", "", "no reference for this prediction"])
    imageio.write_text_atomic(os.path.join(out, "metrics.csv"), buf.getvalue())
    imageio.write_text_atomic(os.path.join(out, "report.html"), _html_report(summary, pngs))
    # summary.json last: its presence means the evaluation finished
    imageio.write_text_atomic(summary_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _names(names, limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def cmd_evaluate(args) -> int:
    """The exit-status policy lives here; :func:`evaluate` (also called by ``demo`` and ``compare``) only reports."""
    try:
        summary = evaluate(args.pred, args.ref, args.out, labels=args.labels, nsd_tolerance=args.nsd_tolerance,
                           images=args.images, n_slices=args.slices, overwrite=args.overwrite,
                           progress=not getattr(args, "quiet", False))
    except (FileExistsError, FileNotFoundError, ValueError, PermissionError) as exc:
        print(f"medmamba evaluate: error: {exc}", file=sys.stderr)
        return 2
    allow_missing = getattr(args, "allow_missing", False)
    n_ok = sum(e["status"] == "ok" for e in summary["cases"].values())
    missing = summary["missing_pred"]
    if getattr(args, "json", False):
        print(json.dumps({"mean": summary["mean"], "refused": summary["refused"], "missing_pred": missing,
                          "missing_ref": summary["missing_ref"], "complete": summary["complete"]}, indent=2))
    else:
        for lab, m in summary["mean"].items():
            print(f"label {lab}: n={m['n']} Dice {m['dice']:.4f}  HD95 {_num(m['hd95_mm'], '{:.2f}')} mm "
                  f"(n={m['hd95_n']})  NSD@{args.nsd_tolerance:g}mm {m['nsd']:.4f}")
        print(f"wrote {os.path.join(args.out, 'summary.json')}, metrics.csv, report.html"
              + (" (incomplete)" if missing else ""))
    if summary["missing_ref"]:
        print(f"warning: {len(summary['missing_ref'])} predictions without reference: "
              f"{_names(summary['missing_ref'])}", file=sys.stderr)
    for name in summary["refused"]:
        print(f"refused {name}: {summary['cases'][name]['reason']}", file=sys.stderr)
    if n_ok == 0:     # nothing evaluated is never a success (e.g. predict wrote nothing)
        print(f"medmamba evaluate: error: no case evaluated ({len(missing)} reference(s) without "
              f"prediction, {len(summary['refused'])} refused): check --pred and --ref", file=sys.stderr)
        return 1
    if missing and not allow_missing:
        print(f"medmamba evaluate: error: {len(missing)} reference case(s) without prediction: {_names(missing)}; "
              f"the report covers the {n_ok + len(summary['refused'])} case(s) present and is marked incomplete "
              f"(--allow-missing to accept this)", file=sys.stderr)
        return 1
    if missing:
        print(f"warning: {len(missing)} reference case(s) without prediction (allowed by --allow-missing): "
              f"{_names(missing)}", file=sys.stderr)
    return 1 if summary["refused"] else 0
