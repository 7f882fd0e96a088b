"""``medmamba export MODEL --format onnx OUT``: a trained model as ONNX, for deployment teams and CPU servers.

MODEL is what ``medmamba predict`` takes: a MONAI bundle or an nnU-Net results folder of our trainers. The
network is exported at its sliding-window patch size (static input ``(1, C, *patch)``, output logits
``(1, classes, *patch)``; deep supervision off), with TorchScript tracing (``torch.onnx.export(dynamo=False)``):
under tracing the selective scan records plain tensor ops (a chunked doubling scan: Exp, Mul, Add, Slice, Concat,
Einsum; traced, it writes nothing in place, which the exporter would mishandle), so the file needs no custom
operator and runs on any ONNX Runtime. One export-time adaptation, here rather than in the networks: ``permute``
and ``movedim`` symbolics that accept negative dims.

OUT, beside ``model.onnx``, holds the preprocessing the exported network expects:

* from a bundle: a copy of the bundle (``configs/`` with its preprocessing and ``SlidingWindowInferer``) whose
  ``network_def`` is :class:`medmamba.clinic.onnx_runtime.OnnxNetwork` on ``models/model.onnx`` and whose
  ``models/model.pt`` is an empty placeholder: ``medmamba predict --model OUT --runtime onnxruntime`` and
  ``python -m monai.bundle run`` both run it;
* from nnU-Net: ``plans.json`` (spacing, normalisation, patch size) and ``dataset.json`` as the predictor used
  them, and ``fold_<k>/model.onnx`` per fold;
* ``onnx.json`` (``models/onnx.json`` for bundles): opset, input/output names and shapes, the source, and the
  export check: ||ONNX Runtime - PyTorch|| / ||PyTorch|| on a random window, refused above :data:`CHECK_TOLERANCE`
  (max |difference| and argmax agreement recorded beside it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

import numpy as np

from medmamba.clinic import imageio, predict as _predict

DEFAULT_OPSET = 17
# export check: ||ORT - torch|| / ||torch|| (L2) on the logits of one random window. Float32 noise is ~1e-6 to
# 1e-4; a wrongly exported op shows up as 1e-2 and more. Not the maximum difference: Multi-Head Scan's route
# attention (published formula) divides by the routes' spread, which is near zero at a few voxels, so rounding
# there becomes visible (VM-UNet-MHS, 64x160x160, the eager and the traced scan formula, both 1e-7 from float64:
# max 3.2e-3 of max |logit|, L2 2.2e-4, argmax equal at 99.997 % of the voxels). The maximum and the argmax
# agreement are recorded beside it.
CHECK_TOLERANCE = 1e-3


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a bundle or nnU-Net model to ONNX (for ONNX Runtime)",
                       description="Writes OUT with the ONNX network at its sliding-window patch size and the "
                                   "preprocessing beside it. See docs/hospital.md.")
    p.add_argument("model", help="MONAI bundle folder or nnU-Net results folder (Trainer__plans__config)")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("out", help="output folder")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--folds", nargs="+", help="nnU-Net: folds to export (default: every fold with the checkpoint)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="nnU-Net checkpoint file name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_export)
    return p


@contextlib.contextmanager
def _onnx_export_context(opset: int):
    """Symbolics replacing TorchScript's own while exporting:

    * ``permute``/``movedim`` with negative dims (ONNX Transpose needs dims >= 0; TorchScript's pass them through);
    * ``instance_norm`` and ``group_norm`` as ReduceMean/ReduceSumSquare/Sub/Mul instead of ONNX
      InstanceNormalization, whose ONNX Runtime CPU kernel sums a whole instance in one float32 accumulator: over
      nnU-Net's full-resolution windows (1.4M voxels) it is 1.3e-5 from float64 where PyTorch is 4e-8, and U-Mamba
      Enc's and LightM-UNet's decoders amplified that to 3e-3 in the logits. Reducing one axis at a time (the
      longest is 160 values) keeps every sum short: mean, then the variance of the centred values, 6-8e-8 from
      float64."""
    import torch
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "is")
    def permute(g, self, dims):
        n = len(dims)
        return g.op("Transpose", self, perm_i=[d % n for d in dims])

    def movedim(g, self, source, destination):
        rank = symbolic_helper._get_tensor_rank(self)
        if rank is None:
            raise RuntimeError("movedim on a tensor of unknown rank: cannot export")
        src, dst = (symbolic_helper._node_get(v.node(), "value").tolist() for v in (source, destination))
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [d % rank for d in src], [d % rank for d in dst]
        perm = [-1] * rank
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        rest = iter(d for d in range(rank) if d not in src)
        perm = [p if p >= 0 else next(rest) for p in perm]
        return g.op("Transpose", self, perm_i=perm)

    def reduce(g, op, t, axis):
        if opset >= 18:
            return g.op(op, t, g.op("Constant", value_t=torch.tensor([axis])), keepdims_i=1)
        return g.op(op, t, axes_i=[axis], keepdims_i=1)

    def normalized(g, x, rank, weight, bias, eps):
        """(x - mean) / sqrt(var + eps) * weight + bias over the axes 2.. of x (rank ``rank``), weight and bias
        already shaped to broadcast (or None). Every sum runs over one axis at a time (the last first); the
        variance is the mean square of the centred values (two passes: no cancellation), and weight / std is
        folded into one per-instance scale: five passes over x."""
        axes = range(rank - 1, 1, -1)
        mean = x
        for a in axes:
            mean = reduce(g, "ReduceMean", mean, a)
        d = g.op("Sub", x, mean)
        var = reduce(g, "ReduceSumSquare", d, rank - 1)
        for a in range(rank - 2, 1, -1):
            var = reduce(g, "ReduceMean", var, a)
        last = g.op("Cast", g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor(rank - 1))),
                    to_i=1)  # float: the length of the last axis (ReduceSumSquare summed it)
        var = g.op("Div", var, last)
        scale = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.op("Constant", value_t=torch.tensor(eps)))))
        if weight is not None:
            scale = g.op("Mul", scale, weight)
        y = g.op("Mul", d, scale)
        return g.op("Add", y, bias) if bias is not None else y

    def param(g, p, shape):
        """A (C,) parameter reshaped to ``shape``, or None when absent."""
        if p is None or symbolic_helper._is_none(p):
            return None
        return g.op("Reshape", p, g.op("Constant", value_t=torch.tensor(shape)))

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "b", "f", "f", "b")
    def instance_norm(g, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn):
        rank = symbolic_helper._get_tensor_rank(x)
        if not use_input_stats or rank is None or rank < 3:
            return symbolic_helper._unimplemented("instance_norm", "running statistics or unknown rank", x)
        shape = [-1] + [1] * (rank - 2)  # (C, 1, ...)
        return normalized(g, x, rank, param(g, weight, shape), param(g, bias, shape), eps)

    @symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
    def group_norm(g, x, groups, weight, bias, eps, cudnn):
        # sizes are read from the graph: after the scan's Loop operators the exporter no longer knows them
        rank = symbolic_helper._get_tensor_rank(x)
        if rank is None or rank < 3:
            return symbolic_helper._unimplemented("group_norm", "unknown rank", x)
        shape = g.op("Shape", x)

        def part(start, stop):
            return g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([start])),
                        g.op("Constant", value_t=torch.tensor([stop])))
        grouped_shape = g.op("Concat", part(0, 1), g.op("Constant", value_t=torch.tensor([groups, -1])),
                             part(2, rank), axis_i=0)  # (N, G, C/G, *spatial)
        pshape = [groups, -1] + [1] * (rank - 2)  # (G, C/G, 1, ...)
        y = normalized(g, g.op("Reshape", x, grouped_shape), rank + 1, param(g, weight, pshape),
                       param(g, bias, pshape), eps)
        return g.op("Reshape", y, shape)

    norms = {"aten::instance_norm": instance_norm, "aten::group_norm": group_norm}
    torch.onnx.register_custom_op_symbolic("aten::permute", permute, opset)
    torch.onnx.register_custom_op_symbolic("aten::movedim", movedim, opset)
    for name, fn in norms.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in ("aten::permute", "aten::movedim", *norms):
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def export_network(net, shape, path: str, opset: int = DEFAULT_OPSET, seed: int = 0) -> dict:
    """Trace ``net`` on a ``shape`` input, write ``path``, check it with ONNX Runtime; returns the check."""
    import onnx
    import torch
    import warnings

    from medmamba.clinic.onnx_runtime import session

    net = net.eval().to("cpu")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    tmp = path + ".tmp"
    start = time.perf_counter()
    with torch.no_grad(), _onnx_export_context(opset), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # tracer warnings about Python ints from shapes: shapes are static
        torch.onnx.export(net, (x,), tmp, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], do_constant_folding=True)
        ref = net(x)
    if isinstance(ref, (list, tuple)):
        ref = ref[0]
    onnx.checker.check_model(tmp)
    seconds = time.perf_counter() - start
    out = session(tmp).run(None, {"image": x.numpy()})[0]
    ref = ref.numpy()
    diff, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    rel_l2 = float(np.linalg.norm((out - ref).ravel()) / max(float(np.linalg.norm(ref.ravel())), 1e-12))
    check = {"relative": rel_l2, "criterion": "relative L2: ||onnxruntime - torch|| / ||torch||",
             "tolerance_relative": CHECK_TOLERANCE, "max_abs_diff": diff, "max_abs_logit": scale,
             "max_relative": diff / max(scale, 1e-12),
             "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "export_seconds": round(seconds, 1)}
    if not rel_l2 <= CHECK_TOLERANCE:
        os.remove(tmp)
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch: relative L2 {rel_l2:.3g} (limit "
                           f"{CHECK_TOLERANCE:g}; max |diff| {diff:.3g}, max |logit| {scale:.3g})")
    os.replace(tmp, path)
    return check


def _bundle_channels(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, "configs", "metadata.json")) as f:
            return int(json.load(f)["network_data_format"]["inputs"]["image"]["num_channels"])
    except (OSError, KeyError, ValueError, TypeError):
        return 1


def export_onnx(model: str, out: str, opset: int = DEFAULT_OPSET, folds=None,
                checkpoint: str = "checkpoint_final.pth", overwrite: bool = False, log=print) -> dict:
    """Export ``model`` (bundle or nnU-Net folder) to ``out``; returns the ``onnx.json`` content."""
    import torch

    kind = _predict.model_kind(model)
    if problem := imageio.output_folder_problem(out):     # before loading the model: fail at once, in one line
        raise ValueError(problem)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    tmp_out = out.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp_out, ignore_errors=True)
    info = {"format": "onnx", "opset": opset, "kind": kind, "source": os.path.abspath(model),
            "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "input": "image", "output": "logits"}
    try:
        if kind == "bundle":
            runner = _predict.BundlePredictor(model, "cpu")
            roi = [int(r) for r in runner.inferer.roi_size]
            shape = [1, _bundle_channels(model), *roi]
            shutil.copytree(model, tmp_out, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.ts", "eval", "logs"))
            os.makedirs(os.path.join(tmp_out, "models"), exist_ok=True)
            log(f"exporting {type(runner.net).__name__} at {shape} (opset {opset}) ...")
            info["check"] = export_network(runner.net, shape, os.path.join(tmp_out, "models", "model.onnx"), opset)
            torch.save({}, os.path.join(tmp_out, "models", "model.pt"))    # no weights: the network is the ONNX file
            cfg_path = os.path.join(tmp_out, "configs", "inference.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            info["torch_network_def"] = cfg.get("network_def")
            cfg["network_def"] = {"_target_": "medmamba.clinic.onnx_runtime.OnnxNetwork",
                                  "path": "$@bundle_root + '/models/model.onnx'", "device": "@device"}
            imageio.write_text_atomic(cfg_path, json.dumps(cfg, indent=2) + "\n")
            info.update(input_shape=shape, network=type(runner.net).__name__, files={"model": "models/model.onnx"})
            info_path = os.path.join(tmp_out, "models", "onnx.json")
        else:
            runner = _predict.NnunetPredictor(model, "cpu", folds=folds, checkpoint=checkpoint)
            p = runner.predictor
            cm = p.configuration_manager
            n_in = len(p.dataset_json["channel_names"])
            shape = [1, n_in, *[int(s) for s in cm.patch_size]]
            os.makedirs(tmp_out)
            imageio.write_text_atomic(os.path.join(tmp_out, "plans.json"), json.dumps(p.plans_manager.plans, indent=2))
            imageio.write_text_atomic(os.path.join(tmp_out, "dataset.json"), json.dumps(p.dataset_json, indent=2))
            fold_names = folds or [f.split("fold_")[-1] for f in sorted(os.listdir(model)) if f.startswith("fold_")
                                   and os.path.isfile(os.path.join(model, f, checkpoint))]
            info.update(input_shape=shape, network=type(p.network).__name__, trainer=p.trainer_name,
                        configuration=cm.configuration_name if hasattr(cm, "configuration_name")
                        else os.path.basename(os.path.normpath(model)).split("__")[-1],
                        mirror_axes=list(p.allowed_mirroring_axes) if p.allowed_mirroring_axes is not None else None,
                        files={}, check={})
            for name, params in zip(fold_names, p.list_of_parameters):
                p.network.load_state_dict(params)
                os.makedirs(os.path.join(tmp_out, f"fold_{name}"))
                rel = f"fold_{name}/model.onnx"
                log(f"exporting {type(p.network).__name__} fold {name} at {shape} (opset {opset}) ...")
                info["check"][str(name)] = export_network(p.network, shape, os.path.join(tmp_out, rel), opset)
                info["files"][str(name)] = rel
            info_path = os.path.join(tmp_out, "onnx.json")
        imageio.write_text_atomic(info_path, json.dumps(info, indent=2) + "\n")
        if os.path.isdir(out):
            os.rmdir(out)           # empty: checked above
        os.replace(tmp_out, out)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    return info


def _mmap_large_allocations(threshold: int = 1 << 16) -> bool:
    """glibc only: serve allocations above ``threshold`` bytes by mmap, so memory freed while tracing goes back to
    the system. Tracing a long scan interleaves the tracer's small allocations with the scan's large temporaries
    and fragments the heap: tracing one (64 channels x 524,288 tokens) scan grew by 1.75 GiB instead of 0.8 GiB.
    Process-wide and permanent, hence only in the ``medmamba export`` command."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def cmd_export(args) -> int:
    _mmap_large_allocations()
    try:
        info = export_onnx(args.model, args.out, opset=args.opset, folds=args.folds, checkpoint=args.checkpoint,
                           overwrite=args.overwrite, log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"medmamba export: error: {exc}", file=sys.stderr)
        return 2
    checks = [info["check"]] if "max_abs_diff" in info["check"] else list(info["check"].values())
    worst = max(checks, key=lambda c: c["relative"])
    print(f"wrote {args.out}: {info['network']} at {info['input_shape']}, opset {info['opset']}; "
          f"ONNX Runtime vs PyTorch on a random window: relative L2 difference {worst['relative']:.1e} (limit "
          f"{CHECK_TOLERANCE:g}; max |diff| {worst['max_relative']:.1e} of max |logit|, argmax equal at "
          f"{100 * worst['argmax_agreement']:.3f} % of voxels)")
    return 0
