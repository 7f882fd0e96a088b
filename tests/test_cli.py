"""The medmamba command line: every subcommand is registered and `check` agrees with the reference."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "medmamba.cli", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_every_subcommand():
    out = run("--help").stdout
    for name in ("demo", "check", "pretrain", "nnunet-env", "plan", "bundle", "evaluate", "predict"):
        assert name in out


def test_check_reports_backends():
    res = run("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torch   cpu" in res.stdout and "agree with the reference" in res.stdout


def test_demo_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    res = run("demo", "--out", str(tmp_path))
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"
