"""``medmamba evaluate`` on real masks (ibsi_sts) with perturbed predictions, and metric values checked against
independent numpy/scipy computations."""
import csv
import glob
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medmamba.clinic import imageio
from medmamba.cli import main
from medmamba.clinic.evaluate import label_metrics

from conftest import DATA_DIR

STS = sorted(glob.glob(os.path.join(DATA_DIR, "ibsi_sts", "STS_*", "CT_mask.nii.gz")))
needs_data = pytest.mark.skipif(len(STS) < 8, reason=f"ibsi_sts masks not found under {DATA_DIR} (set MEDMAMBA_DATA)")


# ------------------------------------------------------------------------------------------- independent references
def _edges(mask):
    return mask ^ ndimage.binary_erosion(mask)


def _surface_distances(a, b, spacing):
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b`` (scipy EDT, sampling=spacing)."""
    ea, eb = _edges(a), _edges(b)
    dt = ndimage.distance_transform_edt(~eb, sampling=spacing)
    return dt[ea], ea.sum(), eb.sum()


def scipy_hd95(a, b, spacing):
    d_ab, _, _ = _surface_distances(a, b, spacing)
    d_ba, _, _ = _surface_distances(b, a, spacing)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def scipy_nsd(a, b, spacing, tol):
    d_ab, na, nb = _surface_distances(a, b, spacing)
    d_ba, _, _ = _surface_distances(b, a, spacing)
    return ((d_ab <= tol).sum() + (d_ba <= tol).sum()) / (na + nb)


def sphere(shape, center, radius_mm, spacing):
    grid = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing))
    return d2 <= radius_mm ** 2


# ------------------------------------------------------------------------------------------------- metric functions
def test_spheres_known_answer_and_scipy():
    spacing = (2.0, 1.0, 1.0)
    shape = (24, 48, 48)
    ref = sphere(shape, (12, 24, 24), 15.0, spacing)
    pred = sphere(shape, (12, 24, 24), 12.0, spacing)      # concentric, 3 mm smaller
    m = label_metrics(pred, ref, spacing, nsd_tolerance=2.0)
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert m["dice"] == pytest.approx(dice, abs=1e-6)
    assert m["hd95_mm"] == pytest.approx(3.0, abs=1.0)             # known answer up to one voxel
    assert m["hd95_mm"] == pytest.approx(scipy_hd95(pred, ref, spacing), abs=1e-4)
    assert m["nsd"] == pytest.approx(scipy_nsd(pred, ref, spacing, 2.0), abs=1e-6)
    assert m["vol_ref_ml"] == pytest.approx(ref.sum() * 2.0 / 1000)
    # a 3 mm shell gap: nothing within 1 mm, everything within 5 mm
    assert label_metrics(pred, ref, spacing, nsd_tolerance=0.5)["nsd"] < 0.1
    assert label_metrics(pred, ref, spacing, nsd_tolerance=5.0)["nsd"] == pytest.approx(1.0)


def test_nsd_by_hand_on_slabs():
    # two 4x4 squares one voxel apart in z (spacing 3 mm along z): every surface voxel of one is exactly 3 mm
    # (straight above) or more from the other's surface -> NSD 0 at 2 mm, 1 at 3 mm.
    a = np.zeros((6, 8, 8), bool)
    b = a.copy()
    a[2, 2:6, 2:6] = True
    b[3, 2:6, 2:6] = True
    spacing = (3.0, 1.0, 1.0)
    assert label_metrics(a, b, spacing, 2.0)["nsd"] == pytest.approx(0.0)
    assert label_metrics(a, b, spacing, 3.0)["nsd"] == pytest.approx(1.0)
    m = label_metrics(a, b, spacing, 3.0)
    assert m["dice"] == 0.0 and m["hd95_mm"] == pytest.approx(3.0)


def test_empty_conventions():
    z = np.zeros((5, 6, 7), bool)
    o = z.copy()
    o[1:3, 2:4, 2:5] = True
    both = label_metrics(z, z, (1, 1, 1))
    assert (both["dice"], both["hd95_mm"], both["nsd"], both["flags"]) == (1.0, 0.0, 1.0, ["both_empty"])
    for pred, ref, flag in ((z, o, "pred_empty"), (o, z, "ref_empty")):
        m = label_metrics(pred, ref, (1, 1, 1))
        assert (m["dice"], m["hd95_mm"], m["nsd"]) == (0.0, None, 0.0)
        assert flag in m["flags"] and "hd95_undefined" in m["flags"]


# -------------------------------------------------------------------------------------------------- real data, CLI
def _write(arr, like, path):
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    sitk.WriteImage(img, path)
    return img


@pytest.fixture(scope="module")
def sts_case_folders(tmp_path_factory):
    """REF: symlinks to 8 real masks (read in place). PRED: perturbed copies, one per failure mode."""
    root = tmp_path_factory.mktemp("eval")
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    names = [p.split(os.sep)[-2] for p in STS[:8]]
    for name, path in zip(names, STS[:8]):
        os.symlink(path, ref_dir / f"{name}.nii.gz")
    refs = {n: sitk.ReadImage(p) for n, p in zip(names, STS[:8])}
    arr = {n: sitk.GetArrayFromImage(im) for n, im in refs.items()}
    role = dict(zip(["eroded", "shifted", "empty", "wrong_geometry", "missing", "extra_label", "corrupt", "same"],
                    names))
    n = role["eroded"]
    _write(ndimage.binary_erosion(arr[n] > 0, iterations=2).astype(np.uint8), refs[n], str(pred_dir / f"{n}.nii.gz"))
    n = role["shifted"]
    _write(np.roll(arr[n], 3, axis=2), refs[n], str(pred_dir / f"{n}.nii.gz"))
    n = role["empty"]
    _write(np.zeros_like(arr[n]), refs[n], str(pred_dir / f"{n}.nii.gz"))
    n = role["wrong_geometry"]
    img = _write(arr[n], refs[n], str(pred_dir / f"{n}.nii.gz"))
    img.SetOrigin(tuple(o + 5.0 for o in img.GetOrigin()))
    sitk.WriteImage(img, str(pred_dir / f"{n}.nii.gz"))
    n = role["extra_label"]
    a = arr[n].copy()
    a[:3, :3, :3] = 2
    _write(a, refs[n], str(pred_dir / f"{n}.nii.gz"))
    (pred_dir / f"{role['corrupt']}.nii.gz").write_bytes(b"\x1f\x8b not really a gzip NIfTI" * 10)
    n = role["same"]
    _write(arr[n], refs[n], str(pred_dir / f"{n}.nii.gz"))
    _write(arr[names[0]], refs[names[0]], str(pred_dir / "EXTRA_case.nii.gz"))
    return root, role, arr, refs


@needs_data
def test_evaluate_real_masks(sts_case_folders, capsys):
    root, role, arr, refs = sts_case_folders
    out = root / "out"
    rc = main(["evaluate", "--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(out)])
    assert rc == 1    # the wrong-geometry and the corrupt case were refused
    err = capsys.readouterr().err
    assert f"refused {role['wrong_geometry']}: geometry differs: origin" in err
    s = json.loads((out / "summary.json").read_text())
    cases = s["cases"]
    assert s["parameters"]["labels_evaluated"] == [1]
    assert s["missing_pred"] == [role["missing"]]
    assert s["missing_ref"] == ["EXTRA_case"]
    assert sorted(s["refused"]) == sorted([role["wrong_geometry"], role["corrupt"]])
    assert cases[role["wrong_geometry"]]["status"] == "refused" and "origin" in cases[role["wrong_geometry"]]["reason"]
    assert cases[role["corrupt"]]["status"] == "error" and "cannot read" in cases[role["corrupt"]]["reason"]

    # Dice by counting voxels, volumes by counting voxels x voxel volume
    n = role["eroded"]
    ref = arr[n] > 0
    pred = ndimage.binary_erosion(ref, iterations=2)
    m = cases[n]["metrics"]["1"]
    assert m["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()), abs=1e-6)
    voxel_ml = np.prod(refs[n].GetSpacing()) / 1000
    assert m["vol_pred_ml"] == pytest.approx(pred.sum() * voxel_ml)
    assert m["vol_ref_ml"] == pytest.approx(ref.sum() * voxel_ml)
    sp = tuple(reversed(refs[n].GetSpacing()))
    assert m["hd95_mm"] == pytest.approx(scipy_hd95(pred, ref, sp), abs=1e-3)
    assert m["nsd"] == pytest.approx(scipy_nsd(pred, ref, sp, 2.0), abs=1e-6)

    n = role["shifted"]     # 3 voxels along x (0.977 mm): HD95 about 3 voxels
    assert cases[n]["metrics"]["1"]["hd95_mm"] == pytest.approx(3 * refs[n].GetSpacing()[0], abs=0.5)
    m = cases[role["empty"]]["metrics"]["1"]
    assert (m["dice"], m["hd95_mm"], m["nsd"]) == (0.0, None, 0.0) and "pred_empty" in m["flags"]
    m = cases[role["same"]]["metrics"]["1"]
    assert (m["dice"], m["hd95_mm"], m["nsd"]) == (1.0, 0.0, 1.0)
    e = cases[role["extra_label"]]
    assert e["labels_pred_not_in_ref"] == [2] and list(e["metrics"]) == ["1"]
    assert any("absent from the reference: [2]" in w for w in e["warnings"])

    ok = [c for c in cases.values() if c["status"] == "ok"]
    assert s["mean"]["1"]["n"] == len(ok) == 5
    assert s["mean"]["1"]["dice"] == pytest.approx(np.mean([c["metrics"]["1"]["dice"] for c in ok]))
    assert s["mean"]["1"]["hd95_n"] == 4     # the empty prediction has no HD95

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["case"] for r in rows} == set(cases) | {role["missing"], "EXTRA_case"}
    assert {r["status"] for r in rows} == {"ok", "refused", "error", "missing_pred", "missing_ref"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    for name in cases:
        assert name in html
    assert not [p for p in os.listdir(out) if p.startswith(".")]    # no temporary files left behind

    # never overwrite silently
    rc = main(["evaluate", "--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err


@needs_data
def test_evaluate_labels_option_and_overwrite(sts_case_folders, tmp_path):
    root, role, arr, refs = sts_case_folders
    pred = tmp_path / "pred"
    pred.mkdir()
    n = role["same"]
    os.symlink(root / "pred" / f"{n}.nii.gz", pred / f"{n}.nii.gz")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "summary.json").write_text("{}")
    images = tmp_path / "images"
    images.mkdir()
    os.symlink(os.path.join(os.path.dirname(os.path.realpath(root / "ref" / f"{n}.nii.gz")), "CT_image.nii.gz"),
               images / f"{n}_0000.nii.gz")
    args = ["evaluate", "--pred", str(pred), "--ref", str(root / "ref" / f"{n}.nii.gz"), "--out", str(out),
            "--labels", "1", "3", "--nsd-tolerance", "1", "--overwrite", "--images", str(images), "--slices", "2"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    m = s["cases"][n]["metrics"]
    assert m["1"]["dice"] == 1.0 and m["3"]["flags"] == ["both_empty"]
    assert any("absent from the reference: [3]" in w for w in s["cases"][n]["warnings"])
    assert s["parameters"]["nsd_tolerance_mm"] == 1.0
    assert not any("overlay" in w for w in s["cases"][n]["warnings"])
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 1


@needs_data
def test_evaluate_unwritable_output(sts_case_folders, tmp_path, capsys):
    root, role, _, _ = sts_case_folders
    if os.geteuid() == 0:      # root ignores permission bits: use a file system that refuses writes
        out = "/proc/medmamba_eval_out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = str(ro / "out")
    rc = main(["evaluate", "--pred", str(root / "pred"), "--ref", str(root / "ref"), "--out", out])
    assert rc == 2 and "output folder" in capsys.readouterr().err


def test_geometry_problems_tolerance():
    img = sitk.Image(10, 12, 14, sitk.sitkUInt8)
    img.SetSpacing((0.8, 0.8, 3.0))
    other = sitk.Image(img)
    other.SetOrigin((0.001, 0, 0))           # well inside 1 % of a voxel
    assert imageio.geometry_problems(other, img) == []
    other.SetOrigin((0.5, 0, 0))
    other.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    problems = imageio.geometry_problems(other, img)
    assert [p.split()[0] for p in problems] == ["origin", "direction"]
    assert imageio.geometry_problems(sitk.Image(10, 12, 13, sitk.sitkUInt8), img)[0].startswith("size")
