"""Running exported ONNX models inside the usual sliding-window pipelines (``medmamba predict --runtime onnxruntime``).

:class:`OnnxNetwork` is a ``torch.nn.Module`` that runs an ONNX Runtime session: MONAI's ``SlidingWindowInferer``
and nnU-Net's ``nnUNetPredictor`` call it like the PyTorch network, so preprocessing, tiling (Gaussian
weighting, overlap), mirroring and resampling back stay exactly the pipelines ``predict`` uses with PyTorch.
The exported graph has a static input shape (batch 1, the sliding-window patch): batches of windows are run one
window at a time. Providers: CUDA when the device is CUDA and ONNX Runtime has it, else CPU.

nnU-Net folds: one ONNX file per fold; ``nnUNetPredictor`` switches folds with ``network.load_state_dict(params)``,
so the "parameters" handed to it are ``{"__onnx_fold__": i}`` and :meth:`OnnxNetwork.load_state_dict` selects
session ``i``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from medmamba.clinic.predict import NnunetPredictor

ONNX_INFO = "onnx.json"


def providers(device: str | torch.device = "cpu") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = (["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []) + ["CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def session(path: str, device="cpu", threads: int | None = None, memory_arena: bool | None = None):
    """An ONNX Runtime session. ``memory_arena`` (None: the environment variable MEDMAMBA_ORT_MEMORY_ARENA, 0/1,
    default 1): ONNX Runtime's CPU arena keeps freed blocks for reuse. The exported scan runs in ONNX Loop bodies
    whose step tensors are allocated anew every step; without the arena each of those allocations costs page faults
    (whole CT, ibsi_sts plans' windows, docs/benchmarks.md: the networks with scans run 16-42 % faster with it and
    take 1.3-1.8x the memory, LightM-UNet 172 s / 20.2 GiB against 216 s / 11.1 GiB). MEDMAMBA_ORT_MEMORY_ARENA=0
    trades that time for memory."""
    import onnxruntime as ort

    if memory_arena is None:
        memory_arena = os.environ.get("MEDMAMBA_ORT_MEMORY_ARENA", "1").strip().lower() not in ("0", "false", "no", "off")
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = bool(memory_arena)
    if threads is None:
        threads = torch.get_num_threads()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=providers(device))


class OnnxNetwork(torch.nn.Module):
    """ONNX Runtime session(s) behind a PyTorch module interface (logits of one or more inputs)."""

    def __init__(self, path: str | list[str], device="cpu"):
        super().__init__()
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.paths = [str(p) for p in paths]
        self.sessions = [session(p, device) for p in self.paths]
        self.active = 0
        inp = self.sessions[0].get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``{"__onnx_fold__": i}`` selects fold ``i``; an empty dict (a bundle's placeholder weights) is accepted."""
        if "__onnx_fold__" in state_dict:
            self.active = int(state_dict["__onnx_fold__"])
        elif state_dict and strict:
            raise RuntimeError(f"OnnxNetwork has no parameters; got keys {list(state_dict)[:5]}")
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self.sessions[self.active]
        arr = x.detach().to("cpu", torch.float32).numpy()
        expected = [d for d in self.input_shape[1:] if isinstance(d, int)]
        if len(expected) == arr.ndim - 1 and list(arr.shape[1:]) != expected:
            raise RuntimeError(f"ONNX model {self.paths[self.active]} takes windows of {expected}, got "
                               f"{list(arr.shape[1:])}: the sliding-window size must be the exported patch size")
        outs = [sess.run(None, {self.input_name: np.ascontiguousarray(arr[i:i + 1])})[0] for i in range(arr.shape[0])]
        return torch.from_numpy(np.concatenate(outs, 0)).to(x.device)


def read_info(model: str) -> dict | None:
    for path in (os.path.join(model, ONNX_INFO), os.path.join(model, "models", ONNX_INFO)):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


class OnnxNnunetPredictor(NnunetPredictor):
    """``NnunetPredictor`` whose network is the exported ONNX folds (see ``medmamba export``)."""

    def __init__(self, folder: str, device: str, folds=None, mirroring=True, **_ignored):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        info = read_info(folder)
        if info is None or info.get("kind") != "nnunet":
            raise ValueError(f"{folder}: not an ONNX export of an nnU-Net model (no {ONNX_INFO}); "
                             f"run `medmamba export MODEL --format onnx OUT` first")
        files = info["files"]                           # fold -> path relative to the folder
        use = [str(f) for f in (folds or files)]
        missing = [f for f in use if f not in files]
        if missing:
            raise FileNotFoundError(f"{folder}: no ONNX file for fold(s) {missing} (exported: {sorted(files)})")
        with open(os.path.join(folder, "plans.json")) as f:
            plans = json.load(f)
        with open(os.path.join(folder, "dataset.json")) as f:
            dataset_json = json.load(f)
        pm = PlansManager(plans)
        net = OnnxNetwork([os.path.join(folder, files[f]) for f in use], device)
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=False, device=torch.device("cpu"),
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        axes = info.get("mirror_axes")
        self.predictor.manual_initialization(net, pm, pm.get_configuration(info["configuration"]),
                                             [{"__onnx_fold__": i} for i in range(len(use))], dataset_json,
                                             info.get("trainer", ""), tuple(axes) if axes is not None else None)


def make_runner(model: str, kind: str, device: str, folds=None, mirroring: bool = True):
    """The predictor ``medmamba predict --runtime onnxruntime`` uses for an exported folder."""
    from medmamba.clinic.predict import BundlePredictor

    if kind == "bundle":
        if read_info(model) is None:
            raise ValueError(f"{model}: not an ONNX export (no models/{ONNX_INFO}); "
                             f"run `medmamba export {model} --format onnx OUT` and predict with --model OUT")
        return BundlePredictor(model, device)    # its network_def is OnnxNetwork on models/model.onnx
    return OnnxNnunetPredictor(model, device, folds=folds, mirroring=mirroring)
