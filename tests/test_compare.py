"""``medmamba compare``: budget/contender parsing, the statistics against hand computations, the report, and an
end-to-end run on real CT (two contenders, tiny budget) that is killed, resumed, and extended by a failing
contender."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medmamba.nnunet.compare import Budget, CompareError, parse_budget, parse_contender, run_compare
from medmamba.nnunet.compare_report import case_metrics, paired_wilcoxon, summarise, write_report

DATA = Path(os.environ.get("MEDMAMBA_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
STS = DATA / "ibsi_sts"


# -- arguments ----------------------------------------------------------------------------------------------------
def test_parse_budget():
    assert parse_budget("5x10") == Budget(epochs=5, iterations=10)
    assert parse_budget("5x10x2") == Budget(epochs=5, iterations=10, val_iterations=2)
    assert parse_budget("30m") == Budget(time_limit=1800.0)
    assert parse_budget("100x250, 2h") == Budget(epochs=100, iterations=250, time_limit=7200.0)
    assert parse_budget(None) == Budget() == parse_budget("trainer")
    assert parse_budget("5x10").total_iterations() == 50
    for bad in ("5", "0x10", "5x10,6x10", "1h,2h", "ten epochs"):
        with pytest.raises(CompareError):
            parse_budget(bad)


def test_parse_contender():
    c = parse_contender("nnUNetTrainer@nnUNetResEncUNetMPlans")
    assert (c.trainer, c.plans, c.name, c.folder) == ("nnUNetTrainer", "nnUNetResEncUNetMPlans",
                                                      "nnUNetTrainer@nnUNetResEncUNetMPlans",
                                                      "nnUNetTrainer__nnUNetResEncUNetMPlans")
    assert parse_contender("nnUNetTrainerUMamba").plans == "nnUNetPlans"
    assert parse_contender("nnUNetTrainer@nnUNetPlans_umamba_bot").plans == "nnUNetPlans_umamba_bot"
    for bad in ("nnUNetTrainer@MyPlans", "not a trainer", "x@nnUNetPlans_nonexistent"):
        with pytest.raises(CompareError):
            parse_contender(bad)


# -- statistics against hand computations ------------------------------------------------------------------------
def test_wilcoxon_exact_against_hand_computation():
    ref = {f"c{i}": 0.5 for i in range(5)}
    # differences +1 -2 +3 +4 +5 (x0.01): ranks 1..5, the negative rank sum is 2. Under H0 each of the 2^5 sign
    # patterns is equally likely; rank subsets with sum <= 2 are {}, {1}, {2}: P(W- <= 2) = 3/32, two-sided 6/32.
    other = {"c0": 0.51, "c1": 0.48, "c2": 0.53, "c3": 0.54, "c4": 0.55}
    t = paired_wilcoxon(ref, other)
    assert t["n"] == 5 and t["statistic"] == pytest.approx(2.0)
    assert t["p"] == pytest.approx(6 / 32)
    assert t["median_difference"] == pytest.approx(0.03)
    # all five better: W- = 0, P = 1/32 one-sided, 2/32 two-sided
    t = paired_wilcoxon(ref, {k: v + 0.1 * (i + 1) for i, (k, v) in enumerate(ref.items())})
    assert t["p"] == pytest.approx(2 / 32)
    # undefined values (HD95 of an empty prediction) drop the pair; unmatched cases are ignored
    t = paired_wilcoxon({"a": 1.0, "b": None, "c": 3.0, "d": 2.0}, {"a": 2.0, "b": 5.0, "c": 1.0, "e": 9.0})
    assert t["n"] == 2 and t["p"] == pytest.approx(1.0)   # ranks 1,2 (|+1|, |-2|): W- = 2 of 3, p = 1
    # no difference at all: no test
    t = paired_wilcoxon(ref, dict(ref))
    assert t["p"] is None and t["n"] == 5 and "differs" in t["note"]


def _evaluation(values: dict) -> dict:
    """A ``medmamba evaluate`` summary: {case: {label: (dice, hd95, nsd)}}."""
    cases = {c: {"status": "ok", "metrics": {str(lab): {"dice": d, "hd95_mm": h, "nsd": n}
                                             for lab, (d, h, n) in labs.items()}} for c, labs in values.items()}
    cases["gone"] = {"status": "missing_pred", "reason": "no prediction"}
    return {"cases": cases}


def test_case_metrics_summary_and_report(tmp_path):
    a = case_metrics(_evaluation({"x": {1: (0.8, 2.0, 0.9), 2: (0.6, 4.0, 0.7)},
                                  "y": {1: (0.4, 6.0, 0.5), 2: (0.2, None, 0.1)}}), [1, 2])
    assert set(a) == {"x", "y"}                      # the missing prediction is not a zero, it is left out
    assert a["x"]["dice"] == pytest.approx(0.7) and a["x"]["hd95_mm"] == pytest.approx(3.0)
    assert a["y"]["hd95_mm"] is None                 # undefined for one label: undefined for the case
    b = case_metrics(_evaluation({"x": {1: (0.9, 1.0, 1.0), 2: (0.7, 3.0, 0.8)},
                                  "y": {1: (0.6, 5.0, 0.6), 2: (0.4, 1.0, 0.3)}}), [1, 2])
    contenders = [
        {"name": "A", "trainer": "nnUNetTrainer", "plans": "nnUNetPlans", "status": "ok", "cases": a,
         "train": {"parameters": 2_000_000, "train_seconds": 60.0, "epochs_done": 2, "epochs_budget": 2,
                   "iterations_per_epoch": 3, "peak_memory_mb": 900.0, "peak_memory_kind": "cpu_max_rss",
                   "fold_validation": {"Dice": 0.5}},
         "predict": {"seconds_per_case": {"x": 1.0, "y": 3.0}, "peak_memory_mb": 500.0}},
        {"name": "B", "trainer": "nnUNetTrainerUMamba", "plans": "nnUNetPlans", "status": "ok", "cases": b,
         "train": {"parameters": 3_000_000, "train_seconds": 120.0, "epochs_done": 2, "epochs_budget": 2,
                   "iterations_per_epoch": 3, "peak_memory_mb": 1200.0}, "predict": {"seconds_per_case": {"x": 2.0}}},
        {"name": "C", "trainer": "Broken", "plans": "nnUNetPlans", "status": "failed", "error": "training failed: X"},
    ]
    rows = summarise(contenders, [1, 2])
    assert rows[0]["dice"]["mean"] == pytest.approx(0.5)     # (0.7 + 0.3) / 2
    assert rows[0]["dice"]["sd"] == pytest.approx(0.28284271)  # sample sd of 0.7, 0.3
    assert rows[1]["dice"]["mean"] == pytest.approx(0.65)
    assert rows[0]["inference_seconds_per_case"] == pytest.approx(2.0)
    assert rows[0]["per_label_dice"] == {"1": pytest.approx(0.6), "2": pytest.approx(0.4)}
    assert rows[1]["vs_first"]["dice"]["n"] == 2 and rows[1]["vs_first"]["hd95_mm"]["n"] == 1
    assert "vs_first" not in rows[0] and rows[2]["status"] == "failed"

    doc = write_report(tmp_path, {"command": "medmamba compare ...", "dataset_name": "T", "device": "cpu",
                                  "caveats": ["few cases"], "reproducibility": ["seed 0"]}, contenders, [1, 2])
    for name in ("comparison.md", "comparison.json", "comparison.csv", "comparison.html", "dice_boxplot.png",
                 "dice_vs_training_time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    table = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [r["contender"] for r in table] == ["A", "B", "C"] and table[2]["error"] == "training failed: X"
    assert float(table[1]["dice_mean"]) == pytest.approx(0.65)
    md = (tmp_path / "comparison.md").read_text()
    assert "0.500 ± 0.283" in md and "failed: training failed: X" in md and "few cases" in md
    assert "<img src='data:image/png;base64," in (tmp_path / "comparison.html").read_text()


# -- end to end on real CT ---------------------------------------------------------------------------------------
needs_sts = pytest.mark.skipif(not (STS / "STS_002").is_dir(), reason="../shared/data/ibsi_sts not present")


def _cases(n: int) -> list[Path]:
    return sorted(p for p in STS.iterdir() if p.is_dir() and (p / "CT_image.nii.gz").is_file())[:n]


def _link_cases(root: Path, cases: list[Path]) -> Path:
    for case in cases:
        (root / case.name).mkdir()
        for f in ("CT_image.nii.gz", "CT_mask.nii.gz"):
            os.symlink(case / f, root / case.name / f)
    return root


@pytest.fixture(scope="module")
def sts5(tmp_path_factory) -> Path:
    """Five IBSI cases for training (nnU-Net's 5-fold split needs five), linked, so planning stays small."""
    return _link_cases(tmp_path_factory.mktemp("sts5"), _cases(7)[:5])


@pytest.fixture(scope="module")
def test2(tmp_path_factory) -> Path:
    """Two other IBSI cases: the separate test folder."""
    return _link_cases(tmp_path_factory.mktemp("test2"), _cases(7)[5:])


def _cmd(data: Path, out: Path, contenders: list[str], *extra: str, test: Path | None = None) -> list[str]:
    # a coarse grid (whole volumes of about 16x38x38 voxels) keeps every contender to seconds per epoch
    return [sys.executable, "-m", "medmamba", "compare", str(data), "--contenders", *contenders,
            "--budget", "2x2x1", "--test", str(test), "--target-spacing", "13.08", "3.906", "3.906", "--no-tta",
            "--no-fold-validation", "--out", str(out), *extra]


@needs_sts
def test_compare_end_to_end_killed_resumed_and_failing_contender(sts5, test2, tmp_path):
    out = tmp_path / "cmp"
    contenders = ["nnUNetTrainer", "nnUNetTrainerUMamba"]
    # 1. start, and kill the whole process group once the second contender has saved its first epoch
    console = tmp_path / "console.txt"
    with open(console, "w") as f:
        proc = subprocess.Popen(_cmd(sts5, out, contenders, test=test2), stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    second_log = out / "contenders" / "nnUNetTrainerUMamba" / "train.log"
    deadline, killed = time.time() + 900, False
    while proc.poll() is None and time.time() < deadline:
        if second_log.is_file() and "medmamba compare: epoch 1 saved" in second_log.read_text(errors="replace"):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    text = console.read_text()
    assert killed, text
    assert "epoch 1/2" in text and "pseudo-Dice" in text and "ETA" in text          # progress per contender
    first = out / "contenders" / "nnUNetTrainer" / "train.json"
    assert first.is_file() and not (out / "contenders" / "nnUNetTrainerUMamba" / "train.json").exists()
    first_mtime = first.stat().st_mtime_ns
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == sorted(p.name for p in sts5.iterdir())
    assert split["test"] == sorted(p.name for p in test2.iterdir())
    assert sorted(os.listdir(out / "test" / "imagesTs")) == [f"{c}_0000.nii.gz" for c in split["test"]]

    # 2. the same command resumes: the first contender is not retrained, the second continues from its checkpoint
    r = subprocess.run(_cmd(sts5, out, contenders, test=test2), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nnUNetTrainer: trained before (not retrained)" in r.stdout
    assert first.stat().st_mtime_ns == first_mtime
    second = json.loads((out / "contenders" / "nnUNetTrainerUMamba" / "train.json").read_text())
    assert second["resumed_at_epoch"] == 1 and second["epochs_done"] == 2 and second["iterations_per_epoch"] == 2
    doc = json.loads((out / "comparison.json").read_text())
    rows = {r["contender"]: r for r in doc["rows"]}
    assert [r["contender"] for r in doc["rows"]] == contenders
    for row in rows.values():
        assert row["status"] == "ok" and row["n_cases"] == 2 and 0 <= row["dice"]["mean"] <= 1
        assert row["parameters"] > 0 and row["train_seconds"] > 0 and row["peak_memory_train_mb"] > 0
        assert row["inference_seconds_per_case"] > 0
    assert rows["nnUNetTrainerUMamba"]["vs_first"]["dice"]["n"] == 2
    assert set(doc["per_case"]["nnUNetTrainer"]) == set(split["test"])
    md = (out / "comparison.md").read_text()
    assert "Smoke-level budget" in md and "-overwrite_target_spacing" in md and "nnUNet_n_proc_DA=0" in md
    for name in ("comparison.html", "comparison.csv", "dice_boxplot.png", "dice_vs_training_time.png"):
        assert (out / name).is_file()
    # seeded: the first contender's weights start alike, and its batches are seeded (nnUNet_n_proc_DA=0)
    first_result = json.loads(first.read_text())
    assert first_result["seed"] == 0 and first_result["stopped_by_time_limit"] is False

    # 3. a contender that fails is reported, the others are not retrained, and the exit status says so
    r = subprocess.run(_cmd(sts5, out, contenders + ["nnUNetTrainerDoesNotExist"], test=test2), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: training failed" in r.stdout and "nnUNetTrainerDoesNotExist" in r.stderr
    assert first.stat().st_mtime_ns == first_mtime
    doc = json.loads((out / "comparison.json").read_text())
    failed = doc["rows"][-1]
    assert failed["status"] == "failed" and "train.log" in failed["error"]
    assert [r["status"] for r in doc["rows"][:2]] == ["ok", "ok"]

    # 4. other settings on the same --out are refused (every contender must share one budget)
    r = subprocess.run(_cmd(sts5, out, contenders, "--seed", "1", test=test2), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "seed" in r.stderr and "Traceback" not in r.stderr


@needs_sts
def test_compare_refuses_test_cases_that_are_training_cases(sts5, tmp_path):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    os.symlink(sts5 / _cases(1)[0].name, test_dir / "again")   # the same files under another name
    with pytest.raises(CompareError, match="also training cases"):
        run_compare(str(sts5), ["nnUNetTrainer"], str(tmp_path / "out"), test=str(test_dir), budget="1x1")
    with pytest.raises(CompareError, match="5-fold split needs at least 5 training cases"):
        run_compare(str(sts5), ["nnUNetTrainer"], str(tmp_path / "out2"), budget="1x1", test_cases=1)
    r = subprocess.run([sys.executable, "-m", "medmamba", "compare", str(sts5), "--contenders", "nnUNetTrainer@Foo",
                        "--out", str(tmp_path / "out3")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown plans" in r.stderr and "Traceback" not in r.stderr
