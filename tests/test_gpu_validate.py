"""scripts/gpu_validate.py rehearsed on CPU (--dry-run): the plan, the CPU-runnable steps in miniature, the report.

The GPU run itself cannot run here; this keeps its driver, its checks and its report honest between GPU runs
(GPU time is scarce: a script that crashes there wastes a run).
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_validate.py")


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="scripts/ not shipped")
def test_dry_run_writes_plan_results_and_report(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(out), "--dry-run", "--only", "env,kernel_tests,kernels,networks", "--no-check",
                 "--kernel-cases", "short_float32", "short_torch", "f64"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    # the device tool returns at most 8 files from OUT
    assert files == ["gpu_validate.json", "gpu_validate.md", "gpu_validate_logs.tar.gz", "plan.json", "plan.md"]

    plan = json.loads((out / "plan.json").read_text())
    assert [s["step"] for s in plan["steps"]] == ["env", "kernel_tests", "kernels", "networks"]
    assert all(s["budget_s"] > 0 and s["gpu_run"] and s["dry_run"] for s in plan["steps"])

    data = json.loads((out / "gpu_validate.json").read_text())
    steps = data["steps"]
    assert data["ok"] and data["meta"]["mode"].startswith("dry-run")
    assert steps["env"]["status"] == "ok" and steps["env"]["runtime"]["torch"]
    assert steps["kernel_tests"]["status"] == "planned"
    cases = {c["name"]: c for c in steps["kernels"]["cases"]}
    assert set(cases) == {"short_float32_vs_f64_loop", "short_torch_backend_vs_f64_loop", "f64_chunked_self_check"}
    for c in cases.values():
        assert c["ok"] and c["compare_what"] and c["y_rel"] < c["tol"]["y"]
    assert cases["short_float32_vs_f64_loop"]["grad_rel_max"] < 1e-3  # Triton (interpreted) vs the float64 loop
    (row,) = steps["networks"]["rows"]
    assert row["network"] == "umamba_bot" and row["ok"] and row["loss_finite"] and row["infer_shape_ok"]
    assert all(s["step_seconds"] >= 0 for s in steps.values())

    md = (out / "gpu_validate.md").read_text()
    assert "| kernels | ok |" in md and "## Kernel checks" in md and "## Networks" in md
    with tarfile.open(out / "gpu_validate_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_validate_logs/kernels.json" in names and "gpu_validate_logs/networks.log" in names


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="scripts/ not shipped")
def test_missing_nnunet_data_is_a_recorded_failure(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(out), "--dry-run", "--only", "nnunet", "--nnunet-data", str(tmp_path / "nothing")], tmp_path,
                timeout=120)
    assert proc.returncode == 1
    step = json.loads((out / "gpu_validate.json").read_text())["steps"]["nnunet"]
    assert step["status"] == "failed" and "gpu_prepare.sh" in step["error"]


def test_budgets_fit_eight_minutes_and_shell_scripts_parse():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import gpu_validate
    finally:
        sys.path.pop(0)
    assert sum(b for b, _ in gpu_validate.STEPS.values()) + gpu_validate.RESERVE_S <= gpu_validate.TOTAL_BUDGET_S <= 480
    for name in ("gpu_validate.sh", "gpu_prepare.sh", "triton_side_env.sh"):
        path = os.path.join(REPO, "scripts", name)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, name
        assert os.access(path, os.X_OK), name
