"""medmamba: Mamba segmentation networks for nnU-Net v2 and MONAI.

Importing this package has no side effects (MONAI bundles reference classes by dotted path) beyond
registering the finder for moved modules below. The layers are described in docs/architecture.md.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from medmamba.layers.mamba import Mamba

__version__ = "0.1.0"
__all__ = ["Mamba", "__version__"]

# Old module path -> its home in the layered layout. Bundle configs, pickles, checkpoints and user scripts
# name the old paths, so they keep importing: as the very same module objects (one module, two names), so
# attributes, monkeypatching and isinstance checks agree whichever name was used.
_MOVED = {
    "medmamba.mamba": "medmamba.layers.mamba",
    "medmamba.scan_routes": "medmamba.layers.scan_routes",
    "medmamba.cross_scan": "medmamba.layers.cross_scan",
    "medmamba.multi_head_scan": "medmamba.layers.multi_head_scan",
    "medmamba.nets.vss": "medmamba.layers.vss",
    "medmamba.nets.blocks": "medmamba.layers.cnn_mamba",
    "medmamba.imageio": "medmamba.clinic.imageio",
    "medmamba.predict": "medmamba.clinic.predict",
    "medmamba.evaluate": "medmamba.clinic.evaluate",
    "medmamba.phantom": "medmamba.demo.phantom",
    "medmamba.distributed": "medmamba.runtime.distributed",
    "medmamba.bundle": "medmamba.monai",
}


def _new_name(fullname):
    """The new path of an old module path (or of a submodule under an old package path), else None."""
    old = fullname if fullname.startswith("medmamba.") else ""
    while old:
        if old in _MOVED:
            return _MOVED[old] + fullname[len(old):]
        old = old.rpartition(".")[0]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an old module path by importing the new one and putting that module object under the old
    name in ``sys.modules`` (the import system then returns whatever ``sys.modules`` holds)."""

    def find_spec(self, fullname, path=None, target=None):
        new = _new_name(fullname)
        if new is None or (fullname not in _MOVED and importlib.util.find_spec(new) is None):
            return None  # unknown names fail as before, under their own name
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a throwaway module; exec_module replaces it

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(_new_name(module.__name__))


if not any(type(f).__name__ == "_MovedModules" for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name):  # `import medmamba; medmamba.bundle.create_bundle(...)` without importing the old path
    if f"medmamba.{name}" in _MOVED:
        return importlib.import_module(f"medmamba.{name}")
    raise AttributeError(f"module 'medmamba' has no attribute {name!r}")
