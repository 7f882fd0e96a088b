"""Startup hook that lets nnU-Net v2 find medmamba's trainers with no set-up (``medmamba_nnunet.pth``).

nnU-Net 2.8 looks for trainers outside its own package only in the folders listed in the environment
variable ``nnUNet_extTrainer`` (``os.pathsep``-separated). The ``medmamba_nnunet.pth`` file installed
next to this module in site-packages runs :func:`install` at every interpreter start; it APPENDS
``<medmamba>/nnunet/ext_trainers`` to that variable, never replacing a user's value and never adding it
twice, so ``nnUNetv2_train ... -tr nnUNetTrainerUMamba`` works in any fresh shell.

It must stay cheap and harmless: only the standard library, no torch, no medmamba import (the package is
located with ``importlib.util.find_spec``, which does not execute it), and no exception ever escapes.
The manual equivalent is printed by ``medmamba nnunet-env``.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
DISABLE_VAR = "MEDMAMBA_NO_NNUNET_HOOK"  # set to 1 to opt out


def trainer_dir():
    """``<medmamba package>/nnunet/ext_trainers`` if it exists, else None (never imports medmamba)."""
    import importlib.util

    spec = importlib.util.find_spec("medmamba")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, "nnunet", "ext_trainers")
        if os.path.isdir(path):
            return os.path.abspath(path)
    return None


def appended(current, path):
    """``current`` (the variable's value or None) with ``path`` appended unless already listed."""
    if not current:
        return path
    entries = current.split(os.pathsep)
    norm = os.path.normcase(os.path.normpath(path))
    if any(e.strip() and os.path.normcase(os.path.normpath(e.strip())) == norm for e in entries):
        return current
    return current.rstrip(os.pathsep) + os.pathsep + path


def install(environ=None):
    """Append our trainer folder to ``nnUNet_extTrainer`` in ``environ`` (default ``os.environ``).

    Returns the folder, or None when nothing was done. Never raises.
    """
    try:
        environ = os.environ if environ is None else environ
        if environ.get(DISABLE_VAR, "").lower() in ("1", "true", "t", "yes"):
            return None
        path = trainer_dir()
        if path is None:
            return None
        new = appended(environ.get(ENV_VAR), path)
        if new != environ.get(ENV_VAR):
            environ[ENV_VAR] = new
        return path
    except Exception:  # a startup hook must never break the interpreter
        return None
