"""Where nnU-Net finds our trainers: the ``nnUNet_extTrainer`` shim folder, and the manual set-up.

nnU-Net 2.8 searches its own package first and then every folder listed in ``nnUNet_extTrainer``
(``os.pathsep``-separated). The installed startup hook (``medmamba_nnunet.pth`` ->
``medmamba_nnunet_hook.install``) appends :func:`ext_trainer_dir` to it in every Python process;
``medmamba nnunet-env`` prints the equivalent ``export`` line for set-ups without the hook (Python
started with ``-S``/``-I``, an editable install made by a setuptools without the editable hook, ...).
"""
from __future__ import annotations

import os
import shlex

__all__ = ["ext_trainer_dir", "hook_active", "export_line", "describe"]

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_dir() -> str:
    """Absolute path of ``medmamba/nnunet/ext_trainers`` (the folder to list in ``nnUNet_extTrainer``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def _listed(value: str | None, path: str) -> bool:
    norm = os.path.normcase(os.path.normpath(path))
    return any(e.strip() and os.path.normcase(os.path.normpath(e.strip())) == norm
               for e in (value or "").split(os.pathsep))


def hook_active() -> bool:
    """Whether the startup hook is installed for this interpreter (``medmamba_nnunet_hook`` importable and
    ``medmamba_nnunet.pth`` in a site-packages folder)."""
    import importlib.util
    import site
    import sys

    if importlib.util.find_spec("medmamba_nnunet_hook") is None:
        return False
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    dirs += [user] if isinstance(user, str) else []
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return any(os.path.isfile(os.path.join(d, "medmamba_nnunet.pth")) for d in dirs)


def export_line(shell: str = "sh") -> str:
    """The manual set-up: append our folder to ``nnUNet_extTrainer`` (keeping any existing value)."""
    path = ext_trainer_dir()
    if shell in ("cmd", "windows"):
        return f'set "{ENV_VAR}=%{ENV_VAR}%;{path}"'
    q = shlex.quote(path)
    return f'export {ENV_VAR}="${{{ENV_VAR}:+${ENV_VAR}{os.pathsep}}}"{q}'


def describe() -> str:
    """Human-readable status: folder, hook, current variable."""
    path = ext_trainer_dir()
    current = os.environ.get(ENV_VAR)
    lines = [f"medmamba trainer folder: {path}",
             f"startup hook (medmamba_nnunet.pth): {'installed' if hook_active() else 'NOT installed'}",
             f"{ENV_VAR} in this process: {current if current is not None else '(unset)'}"
             + (" (includes the medmamba folder)" if _listed(current, path) else "")]
    return "\n".join(lines)
