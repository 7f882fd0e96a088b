"""``medmamba bundle run|verify``: thin wrappers around ``monai.bundle`` that check the inputs first."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medmamba.monai.checks import BundleError, list_images
from medmamba.monai.create import check_metadata
from medmamba.monai.from_nnunet import _load_json


def run_bundle(bundle: str | os.PathLike, dataset_dir: str, output_dir: str, device: str | None = None,
               config: str = "inference.json", **overrides: Any) -> None:
    """``monai.bundle.run`` of ``bundle/configs/<config>``, after checking every input image."""
    bundle = Path(bundle).absolute()
    cfg_file, meta_file = bundle / "configs" / config, bundle / "configs" / "metadata.json"
    if not cfg_file.is_file() or not meta_file.is_file():
        raise BundleError(f"{cfg_file} or {meta_file} not found: is {bundle} a bundle?")
    num_channels = _load_json(meta_file)["network_data_format"]["inputs"]["image"]["num_channels"]
    if config == "inference.json":
        list_images(dataset_dir, num_channels)  # raises naming the file and the problem
    if device is not None:
        overrides["device"] = f"$torch.device({device!r})"
    from monai.bundle import run

    run(config_file=str(cfg_file), meta_file=str(meta_file), logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle), dataset_dir=os.path.abspath(dataset_dir), output_dir=os.path.abspath(output_dir),
        **overrides)


def verify_bundle(bundle: str | os.PathLike) -> None:
    """Offline metadata check and MONAI's ``verify_net_in_out`` on CPU."""
    bundle = Path(bundle).absolute()
    meta = _load_json(bundle / "configs" / "metadata.json")
    problems = check_metadata(meta)
    if problems:
        raise BundleError("metadata.json: " + "; ".join(problems))
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu", bundle_root=str(bundle))
