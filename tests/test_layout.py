"""The package layout (docs/architecture.md): imports only go down the layers, moved modules keep their old
paths as the very same objects, and every dotted name that plans, bundles, checkpoints, docs and scripts
use still resolves."""
from __future__ import annotations

import ast
import importlib
import pickle
import pydoc
import re
import sys
import tomllib
from pathlib import Path

import pytest

import medmamba

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "medmamba"

# ----------------------------------------------------------------------------------------------------------
# Old module paths and public dotted names
# ----------------------------------------------------------------------------------------------------------

OLD_MODULES = {
    "medmamba.mamba": "medmamba.layers.mamba",
    "medmamba.scan_routes": "medmamba.layers.scan_routes",
    "medmamba.cross_scan": "medmamba.layers.cross_scan",
    "medmamba.multi_head_scan": "medmamba.layers.multi_head_scan",
    "medmamba.nets.vss": "medmamba.layers.vss",
    "medmamba.nets.blocks": "medmamba.layers.cnn_mamba",
    "medmamba.bundle": "medmamba.monai",
    "medmamba.predict": "medmamba.clinic.predict",
    "medmamba.evaluate": "medmamba.clinic.evaluate",
    "medmamba.imageio": "medmamba.clinic.imageio",
    "medmamba.phantom": "medmamba.demo.phantom",
    "medmamba.distributed": "medmamba.runtime.distributed",
}

# dotted name -> the object's home in the layered layout (None: the name is its home). Collected from
# plans/*.json, the bundle writer's configs, nnU-Net checkpoints (trainer and network classes), docs,
# README, scripts/ and the test suite.
DOTTED = {
    "medmamba.Mamba": "medmamba.layers.mamba.Mamba",
    "medmamba.__version__": None,
    "medmamba.cli.main": None,  # console script entry point
    **{f"medmamba.kernels.{n}": None for n in ("selective_scan", "selective_scan_ref", "routed_selective_scan",
                                               "resolve_backend", "triton_available", "BACKENDS", "ScanInputError")},
    "medmamba.kernels.scan_triton": None,
    "medmamba.kernels.scan_torch.selective_scan_torch": None,
    "medmamba.kernels.routed_scan.routed_selective_scan_composed": None,
    "medmamba.nets.create": None,
    "medmamba.nets.available": None,
    "medmamba.nets.get_class": None,
    "medmamba.nets.UMambaBot": "medmamba.nets.umamba.UMambaBot",
    "medmamba.nets.umamba.UMambaBot": None,
    "medmamba.nets.umamba.UMambaEnc": None,
    "medmamba.nets.lightm_unet.LightMUNet": None,
    "medmamba.nets.swin_umamba.SwinUMamba": None,
    "medmamba.nets.swin_umamba.SwinUMambaD": None,
    "medmamba.nets.msvm_unet.MSVMUNet": None,
    "medmamba.nets.vm_unet_mhs.VMUNetMHS": None,
    "medmamba.nets.hymamba.HyMamba": None,
    "medmamba.nets.conventions.DeepSupervisionSwitch": None,
    "medmamba.mamba.Mamba": "medmamba.layers.mamba.Mamba",
    "medmamba.mamba.fp32_region": "medmamba.layers.mamba.fp32_region",
    "medmamba.scan_routes.ScanRoutes": "medmamba.layers.scan_routes.ScanRoutes",
    "medmamba.scan_routes.CROSS_SCAN_ROUTES": "medmamba.layers.scan_routes.CROSS_SCAN_ROUTES",
    "medmamba.scan_routes.MHS_FAMILIES": "medmamba.layers.scan_routes.MHS_FAMILIES",
    "medmamba.cross_scan.CrossScan": "medmamba.layers.cross_scan.CrossScan",
    "medmamba.cross_scan.use_fused_routes": "medmamba.layers.cross_scan.use_fused_routes",
    "medmamba.cross_scan.multi_route_scan": "medmamba.layers.cross_scan.multi_route_scan",
    "medmamba.multi_head_scan.MHSMixer": "medmamba.layers.multi_head_scan.MHSMixer",
    "medmamba.multi_head_scan.MultiHeadScan": "medmamba.layers.multi_head_scan.MultiHeadScan",
    **{f"medmamba.nets.vss.{n}": f"medmamba.layers.vss.{n}"
       for n in ("VSSBlock", "VSSLayer", "PatchEmbed", "PatchMerging", "PatchExpand", "FinalPatchExpand", "Mlp",
                 "to_channels_first", "to_channels_last")},
    **{f"medmamba.nets.blocks.{n}": f"medmamba.layers.cnn_mamba.{n}"
       for n in ("MambaLayer", "RVMLayer", "ResidualBlock", "DepthwiseSeparableConv", "NearestUpsampleConv")},
    **{f"medmamba.bundle.{n}": f"medmamba.monai.checks.{n}"
       for n in ("CheckImaged", "list_images", "msd_datalist", "split_datalist", "BundleError", "NIFTI_SUFFIXES")},
    "medmamba.bundle.nnunet_network": "medmamba.monai.from_nnunet.nnunet_network",
    "medmamba.bundle._nnunet_preprocessing": "medmamba.monai.from_nnunet._nnunet_preprocessing",
    "medmamba.bundle.create_bundle": "medmamba.monai.create.create_bundle",
    "medmamba.bundle.check_metadata": "medmamba.monai.create.check_metadata",
    "medmamba.bundle.REQUIRED_META_KEYS": "medmamba.monai.create.REQUIRED_META_KEYS",
    "medmamba.bundle._deterministic": "medmamba.monai.create._deterministic",
    "medmamba.bundle.run_bundle": "medmamba.monai.run.run_bundle",
    "medmamba.bundle.verify_bundle": "medmamba.monai.run.verify_bundle",
    "medmamba.bundle.add_parser": "medmamba.monai.cli.add_parser",
    "medmamba.monai.CheckImaged": "medmamba.monai.checks.CheckImaged",
    "medmamba.monai.create_bundle": "medmamba.monai.create.create_bundle",
    **{f"medmamba.distributed.{n}": f"medmamba.runtime.distributed.{n}"
       for n in ("SyncBatchNorm", "convert_sync_batchnorm", "rewrap_ddp", "synced_moments", "sync_active",
                 "init_distributed", "DistContext", "launched_by_torchrun")},
    "medmamba.demo.run_demo": "medmamba.demo.pipeline.run_demo",
    "medmamba.demo.add_parser": "medmamba.demo.pipeline.add_parser",
    "medmamba.demo.DEMO_DATASET_ID": "medmamba.demo.pipeline.DEMO_DATASET_ID",
    "medmamba.phantom.make_phantom": "medmamba.demo.phantom.make_phantom",
    "medmamba.phantom.write_nifti": "medmamba.demo.phantom.write_nifti",
    "medmamba.predict.predict": "medmamba.clinic.predict.predict",
    "medmamba.predict.add_parser": "medmamba.clinic.predict.add_parser",
    "medmamba.evaluate.evaluate": "medmamba.clinic.evaluate.evaluate",
    "medmamba.evaluate.label_metrics": "medmamba.clinic.evaluate.label_metrics",
    "medmamba.imageio.find_cases": "medmamba.clinic.imageio.find_cases",
    "medmamba.imageio.read_image": "medmamba.clinic.imageio.read_image",
    "medmamba.nnunet.trainers.nnUNetTrainerMedMamba": None,
    "medmamba.nnunet.trainers.nnUNetTrainerUMamba": None,
    "medmamba.nnunet.trainers.ARCH_TO_TRAINER": None,
    "medmamba.nnunet.presets.write_preset_plans": None,
    "medmamba.nnunet.pretrained.install": None,
    "medmamba.nnunet.cpu_timings": None,
    "medmamba.nnunet.dataset": None,
    "medmamba.pretrain.PretrainConfig": "medmamba.pretrain.train.PretrainConfig",
    "medmamba.pretrain.run_pretraining": "medmamba.pretrain.train.run_pretraining",
    "medmamba.pretrain.build_downstream_network": "medmamba.pretrain.network.build_downstream_network",
    "medmamba.check.scan_check": None,
}


def _locate(name: str):
    """As MONAI (``_target_``) and dynamic_network_architectures (plans) resolve dotted names."""
    obj = pydoc.locate(name)
    assert obj is not None, f"{name} does not resolve"
    return obj


def test_moved_module_table_is_the_package_one():
    assert OLD_MODULES == medmamba._MOVED


@pytest.mark.parametrize("old", sorted(OLD_MODULES))
def test_old_module_path_is_the_new_module(old):
    new = importlib.import_module(OLD_MODULES[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new and new.__name__ == OLD_MODULES[old]
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is new


def test_old_paths_in_a_fresh_interpreter():
    """``import old`` and ``from old import name`` before anything else imported the new module."""
    import subprocess

    code = ("import medmamba.cross_scan as a; from medmamba.nets.vss import VSSBlock; import medmamba.bundle as b; "
            "import medmamba.layers.cross_scan as c, medmamba.layers.vss as v, medmamba.monai as m; "
            "assert a is c and VSSBlock is v.VSSBlock and b is m and c.__spec__.name == 'medmamba.layers.cross_scan'; "
            "import medmamba, medmamba.runtime.distributed as d; assert medmamba.distributed is d")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("name", sorted(DOTTED))
def test_dotted_name_resolves_to_its_home(name):
    obj = _locate(name)
    if DOTTED[name] is not None:
        assert obj is _locate(DOTTED[name])


def test_plans_and_checkpoint_class_paths_are_listed():
    """Every network class a plans preset names is in DOTTED (and so resolved above)."""
    names = set()
    for f in (ROOT / "plans").glob("*.json"):
        names |= set(re.findall(r'"(medmamba\.[\w.]+)"', f.read_text()))
    assert names and names <= set(DOTTED), names - set(DOTTED)


@pytest.mark.parametrize("module,name", [("medmamba.cross_scan", "CrossScan"), ("medmamba.nets.vss", "VSSBlock"),
                                         ("medmamba.nets.blocks", "MambaLayer"),
                                         ("medmamba.distributed", "SyncBatchNorm"),
                                         ("medmamba.bundle", "CheckImaged")])
def test_old_pickles_load(module, name):
    """A pickle written before the move names the class by its old module path."""
    old = f"c{module}\n{name}\n.".encode()  # protocol 0 GLOBAL opcode, as old pickles hold it
    assert pickle.loads(old) is _locate(f"{module}.{name}")


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("medmamba.no_such_module")
    with pytest.raises(AttributeError):
        medmamba.no_such_name  # noqa: B018
    assert pydoc.locate("medmamba.bundle.no_such_name") is None


# ----------------------------------------------------------------------------------------------------------
# One-way imports
# ----------------------------------------------------------------------------------------------------------

# Top-level unit under medmamba/ -> layer. Imports may go to the same or a lower layer only. The
# foundations (kernels, runtime) import nothing else from medmamba. Integrations may use each other,
# without cycles. The package root (medmamba/__init__.py) re-exports Mamba only, so it may import layers.
LAYER = {"kernels": 0, "runtime": 0, "layers": 1, "nets": 2,
         "nnunet": 3, "monai": 3, "pretrain": 3, "clinic": 3, "demo": 3, "weights": 3, "check": 3,
         "cli": 4, "__main__": 4}
ROOT_MAY_IMPORT = 1


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _is_module(name: str) -> bool:
    if name in medmamba._MOVED:
        return True
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _imports(modname: str, path: Path):
    """(line, imported module) for every import in the file, function-local ones and
    ``importlib.import_module("literal")`` included."""
    is_pkg = path.name == "__init__.py"
    package = modname if is_pkg else modname.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                yield node.lineno, sub if _is_module(sub) else base
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def _unit(modname: str):
    parts = modname.split(".")
    return parts[1] if len(parts) > 1 else None


def _edges():
    for modname, path in _modules():
        for line, target in _imports(modname, path):
            if target == "medmamba" or target.startswith("medmamba."):
                yield modname, path, line, medmamba._MOVED.get(target, target), target


def test_every_unit_has_a_layer():
    units = {_unit(m) for m, _ in _modules()} - {None}
    assert units <= set(LAYER), f"add {units - set(LAYER)} to LAYER here and to docs/architecture.md"


def test_imports_go_down_the_layers_only():
    bad = []
    for modname, path, line, target, _ in _edges():
        src, dst = _unit(modname), _unit(target)
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if src is None:  # the package root
            if dst is not None and LAYER[dst] > ROOT_MAY_IMPORT:
                bad.append(f"{where}: the package root may import layers <= {ROOT_MAY_IMPORT} only")
        elif dst is None or dst == src:
            if dst is None and LAYER[src] == 0:
                bad.append(f"{where}: {src} is a foundation and imports nothing else from medmamba")
        elif LAYER[src] == 0:
            bad.append(f"{where}: {src} is a foundation and imports nothing else from medmamba")
        elif LAYER[dst] > LAYER[src]:
            bad.append(f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_integrations_import_each_other_without_cycles():
    graph = {}
    for modname, _, _, target, _ in _edges():
        src, dst = _unit(modname), _unit(target)
        if src and dst and src != dst and LAYER[src] == LAYER[dst]:
            graph.setdefault(src, set()).add(dst)
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_code_uses_the_new_paths():
    """Old paths are for users' configs and scripts; the package and scripts/ import the new homes."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {old}" for _, path, line, _, old in _edges()
           if old in medmamba._MOVED]
    for path in sorted((ROOT / "scripts").glob("*.py")):
        for line, target in _imports(path.stem, path):
            if target in medmamba._MOVED:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_cli_only_parses_and_dispatches():
    tree = ast.parse((PKG / "cli.py").read_text())
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions == ["main"], f"medmamba/cli.py defines {functions}; subcommands live with their package"


# ----------------------------------------------------------------------------------------------------------
# Packaging and docs
# ----------------------------------------------------------------------------------------------------------

def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert found | {"medmamba.plans"} == listed


def _doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_name_existing_paths_and_modules():
    bad = []
    for doc in _doc_files():
        text = doc.read_text()
        for rel in set(re.findall(r"`(medmamba/[\w/.]*\w)/?`", text)):
            if not (ROOT / rel).exists():
                bad.append(f"{doc.name}: {rel} does not exist")
        if doc.name == "architecture.md":
            continue  # its table names the old paths on purpose
        for name in set(re.findall(r"\bmedmamba(?:\.[A-Za-z_]\w*)+", text)):
            if name in medmamba._MOVED or any(name.startswith(old + ".") for old in medmamba._MOVED):
                bad.append(f"{doc.name}: {name} uses an old module path")
    assert not bad, "\n".join(sorted(bad))
