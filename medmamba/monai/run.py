"""``medmamba bundle run|verify``: thin wrappers around ``monai.bundle`` that check the inputs first."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medmamba.monai.checks import BundleError, _case_id, _image_problem, list_images
from medmamba.monai.create import check_metadata
from medmamba.monai.from_nnunet import _load_json


def _bundle_files(bundle: Path, config: str = "inference.json") -> tuple[Path, Path, dict]:
    """(config file, metadata file, metadata), with a :class:`BundleError` naming the file for anything missing
    or unreadable."""
    if not bundle.is_dir():
        raise BundleError(f"bundle folder {bundle} not found")
    cfg_file, meta_file = bundle / "configs" / config, bundle / "configs" / "metadata.json"
    for f in (cfg_file, meta_file):
        if not f.is_file():
            raise BundleError(f"{f} not found: is {bundle} a bundle?")
    metas = []
    for f in (cfg_file, meta_file):
        try:
            metas.append(_load_json(f))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{f}: not valid JSON ({exc})") from None
    meta = metas[1]
    try:
        int(meta["network_data_format"]["inputs"]["image"]["num_channels"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"{meta_file}: no valid network_data_format.inputs.image.num_channels") from None
    return cfg_file, meta_file, meta


def _output_path(cfg: dict, output_dir: str, image: str) -> str:
    """Where the bundle's SaveImaged writes ``image``'s segmentation (``<case>_<postfix><ext>``)."""
    postfix = cfg.get("output_postfix", "seg")
    ext = cfg.get("output_ext", ".nii.gz")
    postfix = postfix if isinstance(postfix, str) and not postfix.startswith(("@", "$")) else "seg"
    ext = ext if isinstance(ext, str) and not ext.startswith(("@", "$")) else ".nii.gz"
    return os.path.join(output_dir, f"{_case_id(image)}_{postfix}{ext}")


def run_bundle(bundle: str | os.PathLike, dataset_dir: str, output_dir: str, device: str | None = None,
               config: str = "inference.json", overwrite: bool = False, **overrides: Any) -> dict:
    """``monai.bundle.run`` of ``bundle/configs/<config>``, after checking every input image.

    For inference each image runs on its own (``dataset_dir`` set to the file), so a bad or failing image is
    reported and the others still run; an existing ``<case>_seg.nii.gz`` is kept unless ``overwrite``. Returns
    ``{image: "ok" | "exists: ..." | "failed: ..."}``; set-up errors raise :class:`BundleError` /
    ``FileNotFoundError``."""
    bundle = Path(bundle).absolute()
    cfg_file, meta_file, meta = _bundle_files(bundle, config)
    num_channels = meta["network_data_format"]["inputs"]["image"]["num_channels"]
    if device is not None:
        overrides["device"] = f"$torch.device({device!r})"
    from monai.bundle import run

    def _run(data):
        run(config_file=str(cfg_file), meta_file=str(meta_file), logging_file=str(bundle / "configs" / "logging.conf"),
            bundle_root=str(bundle), dataset_dir=os.path.abspath(data), output_dir=os.path.abspath(output_dir),
            **overrides)

    if config != "inference.json":
        _run(dataset_dir)
        return {}
    files = list_images(dataset_dir)              # raises for a missing path or a folder without NIfTI
    cfg = _load_json(cfg_file)
    status: dict = {}
    for f in files:
        problem = _image_problem(f, int(num_channels))
        if problem is None:
            from medmamba.clinic import validate

            problem = validate.nifti_nonfinite_problem(f)
        out = _output_path(cfg, output_dir, f)
        if problem is not None:
            status[f] = f"failed: {problem}"
        elif os.path.exists(out) and not overwrite:
            status[f] = f"exists: {out} exists (use --overwrite to replace it)"
        else:
            status[f] = None
    for f, st in status.items():
        if st is not None:
            continue
        try:
            _run(f)
            status[f] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:    # one failing image must not stop the others
            from medmamba.clinic import validate

            status[f] = f"failed: {validate.error_message(exc)}"
    return status


def verify_bundle(bundle: str | os.PathLike) -> None:
    """Offline metadata check, ``models/model.pt`` loaded strictly into ``network_def``, and MONAI's
    ``verify_net_in_out`` on CPU. Every problem is a :class:`BundleError` naming the file."""
    bundle = Path(bundle).absolute()
    cfg_file, meta_file, meta = _bundle_files(bundle)
    problems = check_metadata(meta)
    if problems:
        raise BundleError(f"{meta_file}: " + "; ".join(problems))
    from medmamba.clinic.validate import error_message

    weights = bundle / "models" / "model.pt"
    if weights.is_file():
        import torch
        from monai.bundle import ConfigParser

        try:
            parser = ConfigParser()
            parser.read_config(str(cfg_file))
            parser.read_meta(str(meta_file))
            parser["bundle_root"] = str(bundle)
            net = parser.get_parsed_content("network_def")
        except Exception as exc:
            raise BundleError(f"{cfg_file}: cannot build network_def ({error_message(exc)})") from None
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "network_weights", "network"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
            net.load_state_dict(state, strict=True)
        except Exception as exc:
            raise BundleError(f"{weights}: does not load into network_def ({error_message(exc)})") from None
    from monai.bundle import verify_net_in_out

    try:
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(cfg_file), device="cpu",
                          bundle_root=str(bundle))
    except Exception as exc:
        raise BundleError(f"{bundle}: network input/output differ from {meta_file.name} ({error_message(exc)})") \
            from None
