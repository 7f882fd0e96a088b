"""Trainer discovery: the startup hook (medmamba_nnunet.pth), nnU-Net's lookup, the wheel's contents."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import medmamba_nnunet_hook as hook
from medmamba.nnunet import env as nnenv

REPO = Path(__file__).resolve().parents[1]
SHIM = nnenv.ext_trainer_dir()


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "MEDMAMBA_NO_NNUNET_HOOK")}
    env.update(extra)
    return env


def test_hook_appends_never_replaces_never_duplicates():
    assert hook.trainer_dir() == SHIM and os.path.isfile(os.path.join(SHIM, "medmamba_trainers.py"))
    e = {}
    assert hook.install(e) == SHIM and e["nnUNet_extTrainer"] == SHIM
    e = {"nnUNet_extTrainer": "/my/trainers"}
    hook.install(e)
    assert e["nnUNet_extTrainer"] == "/my/trainers" + os.pathsep + SHIM
    hook.install(e)  # not twice
    assert e["nnUNet_extTrainer"].split(os.pathsep) == ["/my/trainers", SHIM]
    e = {"nnUNet_extTrainer": SHIM + os.sep}  # already listed (other spelling)
    hook.install(e)
    assert e["nnUNet_extTrainer"] == SHIM + os.sep
    e = {"MEDMAMBA_NO_NNUNET_HOOK": "1"}
    assert hook.install(e) is None and "nnUNet_extTrainer" not in e


def test_hook_never_raises(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: 1 / 0)
    e = {}
    assert hook.install(e) is None and e == {}


def test_fresh_interpreter_gets_the_variable_without_importing_torch():
    code = ("import os, sys; print(os.environ.get('nnUNet_extTrainer')); "
            "print('torch' in sys.modules, 'medmamba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [SHIM, "False False"], "startup hook not installed? reinstall: pip install -e ."
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(nnUNet_extTrainer="/mine"), capture_output=True,
                         text=True, check=True)
    assert out.stdout.splitlines()[0] == "/mine" + os.pathsep + SHIM


def test_nnunet_finds_every_trainer_in_a_fresh_process():
    from medmamba.nnunet.trainers import TRAINER_NAMES

    code = ("import pickle\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            f"for name in {TRAINER_NAMES!r}:\n"
            "    c = find(name)\n"
            "    assert c.__name__ == name and c.__module__ == 'medmamba.nnunet.trainers', (name, c.__module__)\n"
            "    assert pickle.loads(pickle.dumps(c)) is c\n"
            "print('found', len(" + repr(TRAINER_NAMES) + "))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"found {len(TRAINER_NAMES)}" in out.stdout
    assert {"nnUNetTrainerUMamba", "nnUNetTrainerUMamba_debug", "nnUNetTrainerUMamba_5epochs",
            "nnUNetTrainerSwinUMambaD_debug"} <= set(TRAINER_NAMES)


def test_nnunet_cli_entry_points_run():
    exe = Path(sys.executable).with_name("nnUNetv2_train")
    exe = str(exe) if exe.exists() else shutil.which("nnUNetv2_train")
    out = subprocess.run([exe, "-h"], env=_clean_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "-pretrained_weights" in out.stdout


def test_nnunet_env_command_prints_the_manual_way():
    out = subprocess.run([sys.executable, "-m", "medmamba.cli", "nnunet-env"], env=_clean_env(), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "export nnUNet_extTrainer=" in out.stdout and SHIM in out.stdout
    assert "startup hook (medmamba_nnunet.pth): installed" in out.stdout
    q = subprocess.run([sys.executable, "-m", "medmamba.cli", "nnunet-env", "-q"], env=_clean_env(),
                       capture_output=True, text=True, check=True).stdout.strip()
    # the printed line works in a shell that has no hook and keeps an existing value
    sh = shutil.which("sh")
    if sh:
        got = subprocess.run([sh, "-c", q + '; printf %s "$nnUNet_extTrainer"'],
                             env=_clean_env(nnUNet_extTrainer="/mine", MEDMAMBA_NO_NNUNET_HOOK="1"),
                             capture_output=True, text=True, check=True).stdout
        assert got == "/mine" + os.pathsep + SHIM


@pytest.mark.skipif(os.environ.get("MEDMAMBA_SKIP_WHEEL") == "1", reason="MEDMAMBA_SKIP_WHEEL=1")
def test_wheel_contains_the_pth_presets_and_shim(tmp_path):
    """A regular wheel carries medmamba_nnunet.pth at its root (installs into site-packages)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "runs",
                                    ".data", ".whl", "*.nii.gz")
    shutil.copytree(REPO, src, ignore=ignore)  # build from a copy: the checkout stays clean
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "whl"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = next((tmp_path / "whl").glob("medmamba-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "medmamba_nnunet.pth" in names and "medmamba_nnunet_hook.py" in names
    assert "medmamba/nnunet/ext_trainers/medmamba_trainers.py" in names
    assert "medmamba/plans/umamba_bot.json" in names and "medmamba/nnunet/trainers.py" in names
    pth = zipfile.ZipFile(wheel).read("medmamba_nnunet.pth").decode()
    assert pth.startswith("import ") and "medmamba_nnunet_hook" in pth and len(pth.splitlines()) == 1
