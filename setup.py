"""Packaging hooks that install ``medmamba_nnunet.pth`` (nnU-Net trainer discovery) at the root of
site-packages, for regular and editable installs. Everything else is declared in pyproject.toml.

* regular wheels (``pip install .``, ``pip wheel .``): ``build_py`` copies the .pth into the build tree,
  so it lands next to the packages;
* editable installs (``pip install -e .``): setuptools builds a separate "editable wheel" that does not
  run ``build_py`` outputs into the wheel; ``editable_wheel`` is extended to add the .pth to it. This
  uses a private setuptools method (``_select_strategy``): if that changes, the install still succeeds
  without the .pth, with a warning, and ``medmamba nnunet-env`` prints the manual set-up.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "medmamba_nnunet.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    """Also place medmamba_nnunet.pth at the root of the build tree (hence of the wheel)."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[os.path.join(self.build_lib, PTH)] = os.path.join(HERE, PTH)
        return mapping


cmdclass = {"build_py": build_py_with_pth}

try:  # setuptools >= 64
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - old setuptools: no PEP 660 editable installs at all
    editable_wheel = None

if editable_wheel is not None:
    class _WithPth:
        """Wraps an editable strategy: writes the strategy's files, then medmamba_nnunet.pth."""

        def __init__(self, strategy):
            self._strategy = strategy

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self._strategy.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self._strategy(wheel, files, mapping)
            try:
                with open(os.path.join(HERE, PTH), "rb") as f:
                    wheel.writestr(PTH, f.read())
            except Exception as exc:  # never fail the install for the convenience hook
                import warnings

                warnings.warn(f"medmamba: could not add {PTH} to the editable wheel ({exc}); run "
                              "`medmamba nnunet-env` for the manual set-up.")

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            strategy = super()._select_strategy(*args, **kwargs)
            return _WithPth(strategy)

    if callable(getattr(editable_wheel, "_select_strategy", None)):
        cmdclass["editable_wheel"] = editable_wheel_with_pth
    else:  # pragma: no cover
        import warnings

        warnings.warn("medmamba: this setuptools has no editable_wheel._select_strategy; the editable install "
                      "will not include medmamba_nnunet.pth. Run `medmamba nnunet-env` for the manual set-up.")

setup(cmdclass=cmdclass)
