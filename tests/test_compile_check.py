"""`medmamba check --compile`: every Triton kernel variant the dispatch launches compiles for sm_80 and sm_90
(no GPU needed), with registers, spills, shared memory and occupancy reported; also under Triton 3.6 (the
GPU machines' version) when the side environment exists (`.ci/run` makes it)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDE_ENV = Path(os.environ.get("MEDMAMBA_TRITON_SIDE_ENV", ROOT / ".triton36"))
KERNELS = {"_fwd_kernel", "_carry_kernel", "_bwd_summary_kernel", "_bwd_kernel"}


def _compile_check(tmp_path, targets, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, "-m", "medmamba", "check", "--compile", targets, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return _compile_check(tmp_path_factory.mktemp("cc"), "sm_80,sm_90")


def test_every_variant_compiles_for_sm80_and_sm90(installed):
    report, stdout = installed
    rows = report["rows"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["ok"] for r in rows), [r["variant"] for r in rows if not r["ok"]]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["warps_per_sm"] >= 4, r
    # the dispatch's code paths are all among the compiled variants
    flags = {k for r in rows for k, v in r["constexprs"].items() if v is True}
    assert {"WRITE_Y", "HAS_INDEX", "DOUT_SHARED", "ATOMIC_BC", "HAS_DLAST", "HAS_INIT", "REVERSE", "HAS_Z"} <= flags
    assert {r["signature"]["u_ptr"] for r in rows if "u_ptr" in r["signature"]} == {"*fp32", "*bf16", "*fp16"}
    assert "| sm_90 | _bwd_kernel |" in stdout and "0 failed" in stdout


def test_spilling_variants_are_documented(installed):
    """Whatever still spills is named in docs/kernels.md (with the reason)."""
    report, _ = installed
    doc = (ROOT / "docs" / "kernels.md").read_text()
    for r in report["rows"]:
        if r["spill_stores"] + r["spill_loads"] > 0:
            assert f"{r['target']} | {r['variant']}" in doc, f"undocumented spill: {r['target']} {r['variant']}"


@pytest.mark.skipif(not (SIDE_ENV / "triton").is_dir(),
                    reason=f"no Triton side environment at {SIDE_ENV} (.ci/run makes it: scripts/triton_side_env.sh)")
def test_every_variant_compiles_with_triton_3_6(tmp_path):
    report, _ = _compile_check(tmp_path, "sm_90", pythonpath=SIDE_ENV)
    assert report["triton"].startswith("3.6")
    assert report["rows"] and all(r["ok"] for r in report["rows"])
    assert {r["kernel"] for r in report["rows"]} == KERNELS


def test_unknown_target_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "medmamba", "check", "--compile", "sm_75x"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown target(s) sm_75x" in proc.stderr


def test_resident_warps_follow_the_occupancy_rules():
    from medmamba.kernels.compile_check import resident_warps

    assert resident_warps(255, 4, 16384, "sm_90") == 8  # 255 regs: 2 blocks of 4 warps
    assert resident_warps(255, 8, 16384, "sm_90") == 8
    assert resident_warps(32, 4, 0, "sm_90") == 64  # capped by 64 warps an SM
    assert resident_warps(64, 4, 100 * 1024, "sm_80") == 4  # one block fits 164 KiB of shared memory


def test_variant_labels_name_dtype_sizes_and_flags(installed):
    report, _ = installed
    labels = {r["variant"] for r in report["rows"]}
    assert any(re.fullmatch(r"_bwd_kernel\[bf16 N=16 BD=4 T=64 HAS_D\+HAS_Z\+HAS_BIAS\+SOFTPLUS\]", v) for v in labels)
