#!/usr/bin/env python
"""Network benchmark: every medmamba network next to nnU-Net's PlainConvUNet / ResEnc-M and MONAI's SwinUNETR.

Per network, at the same patch and batch:

* training step: forward + backward + SGD step (momentum 0.99, Nesterov, as nnU-Net), cross-entropy on
  random labels, deep supervision off; bf16 autocast and cudnn.benchmark on CUDA (as nnU-Net), fp32 on
  the CPU; gradient clipping at 12 (as nnU-Net); median time per step over
  ``--repeats`` after ``--warmup`` steps, peak memory, throughput in voxels/s;
* whole-volume inference: ``monai.inferers.sliding_window_inference`` (roi = patch, overlap 0.5, gaussian
  blending) over a ``--volume`` sized input; time and peak memory.

    python scripts/bench_networks.py --out docs/benchmarks                 # GPU: patch 128^3, batch 2, 300x512x512
    python scripts/bench_networks.py --device cpu --out docs/benchmarks    # CPU: reduced sizes (see --help)

Baselines are built from the nnU-Net 3d_fullres plans of ``scripts/model_card.py`` (6 stages, 32..320
features), with the number of stages reduced for patches below 128 the way nnU-Net's planner would (stop
halving an axis below 8 voxels). U-Mamba Bot/Enc are built from the same plans (how they are trained); the
other medmamba networks with their registry defaults (``medmamba.nets.create(name, 1, 2, 3)``).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (parameters, gradients, optimiser state and
activations); on the CPU the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the measurement, "-" where that is unavailable.
A network that fails to build or run (out of memory, a size it cannot divide) gets a row with the error.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for p in (REPO, SCRIPTS):
    if p not in sys.path:
        sys.path.insert(0, p)

import medmamba.nets  # noqa: E402

BASELINES = ["PlainConvUNet", "ResEnc-M", "SwinUNETR"]
PLANS_NETWORKS = ("umamba_bot", "umamba_enc")  # medmamba networks built from the baselines' nnU-Net plans
OUT_CHANNELS = 2
# From the issue (H100, 2026-11-23): train ms/step, peak GiB, whole-volume inference s (patch 128^3, batch 2,
# bf16, 300x512x512 volume).
REFERENCE_H100 = {"PlainConvUNet": (83, 4.7, 2.4), "ResEnc-M": (108, 6.4, 3.0), "SwinUNETR": (252, 22, 8.6)}
TARGET_RATIO = 1.5  # every medmamba network: train step and inference within 1.5x of ResEnc-M's

DEFAULTS = {  # device kind -> (patch, batch, volume, repeats, warmup, sw_batch_size, infer repeats)
    "cuda": dict(patch=(128, 128, 128), batch_size=2, volume=(300, 512, 512), repeats=10, warmup=3,
                 sw_batch_size=4, infer_repeats=3),
    # CPU: small enough for every network in ~5 min on 2 busy cores (LightM-UNet runs the PyTorch scan over
    # every voxel and takes seconds per window there). Not 32^3: SwinUNETR's 1/32 feature map would be a
    # single voxel, which its InstanceNorm cannot normalise (MSVM-UNet's BatchNorm neither, at batch 1).
    "cpu": dict(patch=(32, 64, 64), batch_size=1, volume=(32, 96, 96), repeats=1, warmup=1,
                sw_batch_size=2, infer_repeats=1),
}
QUICK = {"cuda": dict(patch=(64, 64, 64), batch_size=2, volume=(128, 192, 192), repeats=3, warmup=1,
                      sw_batch_size=4, infer_repeats=1),
         "cpu": dict(patch=(32, 64, 64), batch_size=1, volume=(32, 64, 64), repeats=1, warmup=0,
                     sw_batch_size=2, infer_repeats=1)}


# --------------------------------------------------------------------------------------------------
# shared helpers (bench_scaling.py and bench_all.py import these)
def parse_size(text: str, dims: int = 3) -> tuple[int, ...]:
    """'64' -> (64, 64, 64); '300x512x512' -> (300, 512, 512)."""
    parts = [int(v) for v in str(text).lower().replace(",", "x").split("x") if v]
    if len(parts) == 1:
        parts = parts * dims
    if len(parts) != dims or any(v < 1 for v in parts):
        raise argparse.ArgumentTypeError(f"expected N or {'x'.join(['N'] * dims)}, got {text!r}")
    return tuple(parts)


def size_str(size) -> str:
    return "x".join(str(int(v)) for v in size)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "monai", "nnunetv2", "dynamic_network_architectures", "medmamba", "mamba_ssm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads)")


def make_meta(device: torch.device, command: str, level: str) -> dict:
    return {"level": level, "device_kind": device.type, "device": device_name(device),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command,
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores", "versions": versions()}


def versions_line(v: dict) -> str:
    return (f"torch {v['torch']}, triton {v['triton']}, monai {v['monai']}, nnunetv2 {v['nnunetv2']}, "
            f"dynamic-network-architectures {v['dynamic_network_architectures']}, medmamba {v['medmamba']}, "
            f"Python {v['python']}")


def meta_markdown(meta: dict) -> str:
    return (f"Device: **{meta['device']}** ({meta['host']}); {meta['date']}; command: `{meta['command']}`. "
            f"{versions_line(meta['versions'])}.")


def _read_status_kib(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory(contextlib.AbstractContextManager):
    """Peak memory of a block: CUDA max allocated (GiB), or CPU peak-RSS growth (GiB, Linux), else None."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gib = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self._base = None
            try:
                with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
                    fh.write("5")
                self._base = _read_status_kib("VmRSS")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        elif self._base is not None:
            peak = _read_status_kib("VmHWM")
            self.gib = max(peak - self._base, 0) / 2**20 if peak is not None else None
        return False


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls after ``warmup`` calls (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


HINTS = {  # error text -> what it means here
    "Expected more than 1 spatial element when training":
        " (the deepest feature map of this patch is one voxel, which InstanceNorm without running statistics "
        "cannot normalise, in training or eval; use a larger patch, e.g. --patch 32x64x64 or 64)",
    "Expected more than 1 value per channel when training":
        " (BatchNorm sees one value per channel at the deepest level: one voxel times batch 1; use a larger "
        "patch or --batch-size 2)",
}


def short_error(exc: BaseException, limit: int = 160) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower() \
        else type(exc).__name__
    hint = next((h for k, h in HINTS.items() if k in first), "")
    return f"{kind}: {first}"[:limit] + hint


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fmt(value, digits: int = 1, dash: str = "-") -> str:
    if value is None:
        return dash
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# networks
def plans_for_patch(patch, resenc: bool) -> dict:
    """nnU-Net 3d_fullres plans of scripts/model_card.py, with stages and strides fitted to ``patch``.

    At 128^3 this is exactly model_card's plans (6 stages, strides 1,2,2,2,2,2). For smaller patches an
    axis stops being halved once it would drop below 4 voxels (nnU-Net's planner keeps feature maps >= 4),
    and the plans keep one stage per downsampling step, as nnU-Net would plan for that patch."""
    from model_card import nnunet_plans

    kw = nnunet_plans(3, resenc=resenc)
    max_stages = kw["n_stages"]
    strides, cur = [[1, 1, 1]], list(patch)
    while len(strides) < max_stages:
        step = [2 if c // 2 >= 4 and c % 2 == 0 else 1 for c in cur]
        if step == [1, 1, 1]:
            break
        strides.append(step)
        cur = [c // s for c, s in zip(cur, step)]
    n = len(strides)
    kw = copy.copy(kw)
    kw["n_stages"] = n
    kw["strides"] = strides
    for key in ("features_per_stage", "kernel_sizes", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = list(kw[key])[:n]
    kw["n_conv_per_stage_decoder"] = list(kw["n_conv_per_stage_decoder"])[:n - 1]
    return kw


def network_specs(patch) -> dict:
    """name -> (how it is built, builder). Baselines first, then the registry in its order."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    n = plans_for_patch(patch, resenc=False)["n_stages"]
    plans = f"nnU-Net 3d_fullres plans, {n} stages"
    specs = {
        "PlainConvUNet": (f"dynamic_network_architectures, {plans}",
                          lambda: PlainConvUNet(input_channels=1, num_classes=OUT_CHANNELS, deep_supervision=False,
                                                **plans_for_patch(patch, resenc=False))),
        "ResEnc-M": (f"`ResidualEncoderUNet`, {plans}, ResEnc-M blocks",
                     lambda: ResidualEncoderUNet(input_channels=1, num_classes=OUT_CHANNELS, deep_supervision=False,
                                                 **plans_for_patch(patch, resenc=True))),
    }

    def swin():
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(in_channels=1, out_channels=OUT_CHANNELS, feature_size=48, spatial_dims=3)

    specs["SwinUNETR"] = ("MONAI, feature_size 48", swin)
    for name in medmamba.nets.available():
        if name in PLANS_NETWORKS:
            def build(name=name):
                cls = medmamba.nets.get_class(name)
                return cls(input_channels=1, num_classes=OUT_CHANNELS, deep_supervision=False, patch_size=tuple(patch),
                           **plans_for_patch(patch, resenc=False))
            specs[name] = (f"`{name}` from the same {plans} (n_conv 2/2)", build)
        else:
            specs[name] = (f"registry default (`create('{name}', 1, 2, 3)`)",
                           lambda name=name: medmamba.nets.create(name, in_channels=1, out_channels=OUT_CHANNELS,
                                                                  spatial_dims=3))
    return specs


def bench_train(net: nn.Module, patch, batch: int, device: torch.device, repeats: int, warmup: int) -> dict:
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 1, *patch, generator=g).to(device)
    y = torch.randint(0, OUT_CHANNELS, (batch, *patch), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            out = net(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()

    with PeakMemory(device) as mem:
        times = timed_runs(step, device, repeats, warmup)
    ms = statistics.median(times) * 1e3
    out = {"train_ms": round(ms, 2), "train_ms_all": [round(t * 1e3, 2) for t in times],
           "train_peak_gib": round(mem.gib, 3) if mem.gib is not None else None,
           "train_voxels_per_s": round(batch * math.prod(patch) / (ms / 1e3))}
    del opt, x, y
    return out


def bench_inference(net: nn.Module, patch, volume, sw_batch_size: int, device: torch.device, repeats: int,
                    warmup: int) -> dict:
    from monai.inferers import sliding_window_inference

    net.eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    vol = torch.randn(1, 1, *volume, generator=g).to(device)

    def predictor(t):
        out = net(t)
        return out[0] if isinstance(out, (list, tuple)) else out

    def infer():
        with torch.inference_mode(), autocast(device):
            seg = sliding_window_inference(vol, roi_size=tuple(patch), sw_batch_size=sw_batch_size,
                                           predictor=predictor, overlap=0.5, mode="gaussian")
        assert seg.shape[-3:] == tuple(volume), seg.shape

    if warmup == 0:  # at least a one-window call first, so one-time costs (imports, kernels) are not timed
        with torch.inference_mode(), autocast(device):
            sliding_window_inference(vol[(...,) + tuple(slice(0, p) for p in patch)], roi_size=tuple(patch),
                                     sw_batch_size=1, predictor=predictor, overlap=0.5, mode="gaussian")
    with PeakMemory(device) as mem:
        times = timed_runs(infer, device, repeats, warmup)
    del vol
    return {"infer_s": round(statistics.median(times), 3), "infer_s_all": [round(t, 3) for t in times],
            "infer_peak_gib": round(mem.gib, 3) if mem.gib is not None else None}


def n_windows(volume, patch, overlap: float = 0.5) -> int:
    total = 1
    for v, p in zip(volume, patch):
        v = max(v, p)
        step = max(int(p * (1 - overlap)), 1)
        total *= math.ceil((v - p) / step) + 1
    return total


def bench_network(name: str, built_as: str, build, cfg: dict, device: torch.device) -> dict:
    row = {"network": name, "built_as": built_as, "kind": "baseline" if name in BASELINES else "medmamba"}
    t0 = time.perf_counter()
    net = None
    try:
        torch.manual_seed(0)
        net = build().to(device)
        row["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        row["error"] = "build: " + short_error(exc)
    if net is not None and not cfg["skip_train"]:
        try:
            row.update(bench_train(net, cfg["patch"], cfg["batch_size"], device, cfg["repeats"], cfg["warmup"]))
        except Exception as exc:  # noqa: BLE001
            row["train_error"] = short_error(exc)
        free_memory(device)
    if net is not None and not cfg["skip_inference"]:
        try:
            net.zero_grad(set_to_none=True)
            row.update(bench_inference(net, cfg["patch"], cfg["volume"], cfg["sw_batch_size"], device,
                                       cfg["infer_repeats"], cfg["infer_warmup"]))
        except Exception as exc:  # noqa: BLE001
            row["infer_error"] = short_error(exc)
    del net
    free_memory(device)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def add_ratios(rows: list[dict], device: torch.device) -> dict:
    """Ratios to ResEnc-M (measured in this run; the issue's H100 number where it failed) and target status."""
    ref = next((r for r in rows if r["network"] == "ResEnc-M"), {})
    base_train, base_infer = ref.get("train_ms"), ref.get("infer_s")
    for r in rows:
        r["train_x_resenc"] = round(r["train_ms"] / base_train, 2) if base_train and "train_ms" in r else None
        r["infer_x_resenc"] = round(r["infer_s"] / base_infer, 2) if base_infer and "infer_s" in r else None
        if r["kind"] != "medmamba":
            continue
        for what in ("train", "infer"):
            ratio = r[f"{what}_x_resenc"]
            if device.type != "cuda":
                status = "GPU target (not assessed on CPU)"
            elif ratio is None:
                status = "not measured"
            else:
                status = "met" if ratio <= TARGET_RATIO else "missed"
            r[f"{what}_target"] = status
    return {"ratio": TARGET_RATIO, "baseline": "ResEnc-M (same run)",
            "assessed": device.type == "cuda",
            "note": "targets are for a GPU (H100, patch 128^3, batch 2, bf16, 300x512x512 volume)"
            if device.type != "cuda" else ""}


def to_markdown(result: dict) -> str:
    meta, cfg, rows = result["meta"], result["config"], result["rows"]
    cuda = meta["device_kind"] == "cuda"
    mem = "peak GiB (CUDA max allocated)" if cuda else "peak RSS growth GiB"
    lines = [f"### Networks, {meta['device']} ({meta['date']})", "", meta_markdown(meta), "",
             f"Training step: patch {size_str(cfg['patch'])}, batch {cfg['batch_size']}, forward + backward + SGD "
             f"(momentum 0.99, Nesterov) with cross-entropy, deep supervision off, "
             f"{'bf16 autocast' if cuda else 'fp32'}; median of {cfg['repeats']} step(s) after {cfg['warmup']} "
             f"warm-up step(s). Inference: `sliding_window_inference` over a 1x1x{size_str(cfg['volume'])} volume, "
             f"roi {size_str(cfg['patch'])}, overlap 0.5, gaussian, sw_batch_size {cfg['sw_batch_size']} "
             f"({n_windows(cfg['volume'], cfg['patch'])} windows), median of {cfg['infer_repeats']} run(s). "
             f"Memory: {'torch.cuda.max_memory_allocated' if cuda else 'growth of the peak resident set (VmHWM) over the resident set before the measurement; approximate, the allocator may reuse memory'}.",
             "",
             f"| network | built as | params (M) | train ms/step | train {mem} | train voxels/s | inference s | "
             f"inference {mem} | train x ResEnc-M | inference x ResEnc-M | target (<= {TARGET_RATIO}x ResEnc-M) | "
             "reference (issue, H100 2026-11-23) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        ref = REFERENCE_H100.get(r["network"])
        ref_s = f"{ref[0]} ms/step, {ref[1]} GiB, inference {ref[2]} s" if ref else ""
        if r["kind"] == "medmamba":
            if cuda:
                target = f"train {r.get('train_target', '-')}, inference {r.get('infer_target', '-')}"
            else:
                target = "GPU targets (not assessed on CPU)"
        else:
            target = "baseline" if r["network"] == "ResEnc-M" else ""
        if "error" in r:
            lines.append(f"| {r['network']} | {r['built_as']} | - | **{r['error'].replace('|', '/')}** | | | | | | | "
                         f"{target} | {ref_s} |")
            continue
        train = (fmt(r.get("train_ms")), fmt(r.get("train_peak_gib"), 2), f"{r['train_voxels_per_s']:,}"
                 if "train_voxels_per_s" in r else "-")
        if "train_error" in r:
            train = (f"**{r['train_error'].replace('|', '/')}**", "", "")
        infer = (fmt(r.get("infer_s"), 2), fmt(r.get("infer_peak_gib"), 2))
        if "infer_error" in r:
            infer = (f"**{r['infer_error'].replace('|', '/')}**", "")
        lines.append(f"| {r['network']} | {r['built_as']} | {fmt(r.get('params_m'), 2)} | {' | '.join(train)} | "
                     f"{' | '.join(infer)} | {fmt(r.get('train_x_resenc'), 2)} | {fmt(r.get('infer_x_resenc'), 2)} | "
                     f"{target} | {ref_s} |")
    lines += ["", "Reference (issue, H100 2026-11-23; patch 128^3, batch 2, bf16, 300x512x512 volume) and the targets "
              "derived from it:", "",
              "| network | train ms/step | peak GiB | inference s |", "|---|---:|---:|---:|"]
    for name, (ms, gib, sec) in REFERENCE_H100.items():
        lines.append(f"| {name} | {ms} | {gib} | {sec} |")
    ms, _, sec = REFERENCE_H100["ResEnc-M"]
    lines += [f"| target for every medmamba network (<= {TARGET_RATIO}x ResEnc-M) | <= {TARGET_RATIO * ms:g} | | "
              f"<= {TARGET_RATIO * sec:g} |", "",
              "Target status is judged against ResEnc-M measured in the same run (the table's ratio columns): "
              + ("met / missed above." if cuda else "not assessed on a CPU run."), ""]
    if not cuda:
        lines += ["The targets (every medmamba network's training step and whole-volume inference within "
                  f"{TARGET_RATIO}x of ResEnc-M's) are GPU targets (H100, patch 128^3, batch 2, bf16, 300x512x512); "
                  "a CPU run at reduced sizes does not assess them. The ratios above are CPU ratios.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--networks", nargs="+", default=None,
                   help=f"subset of {BASELINES + medmamba.nets.available()} (default: all)")
    p.add_argument("--patch", type=parse_size, default=None, help="N or DxHxW (GPU 128, CPU 32x64x64)")
    p.add_argument("--batch-size", type=int, default=None, help="GPU 2, CPU 1")
    p.add_argument("--volume", type=parse_size, default=None, help="N or DxHxW (GPU 300x512x512, CPU 32x96x96)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="GPU 4, CPU 2")
    p.add_argument("--repeats", type=int, default=None, help="timed training steps (GPU 10, CPU 1)")
    p.add_argument("--warmup", type=int, default=None, help="training warm-up steps (GPU 3, CPU 1)")
    p.add_argument("--infer-repeats", type=int, default=None, help="timed inference runs (GPU 3, CPU 1)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is far steadier on cores shared with other jobs")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke run)")
    p.add_argument("--out", default=None, help="folder for networks_<cpu|cuda>.json/.md")
    return p


def resolve_config(args, device: torch.device) -> dict:
    base = dict((QUICK if args.quick else DEFAULTS)[device.type])
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    base["patch"] = list(base["patch"])
    base["volume"] = list(base["volume"])
    base["infer_warmup"] = 1 if device.type == "cuda" else 0
    base["skip_train"] = bool(getattr(args, "skip_train", False))
    base["skip_inference"] = bool(getattr(args, "skip_inference", False))
    return base


def write_outputs(out_dir: str, stem: str, result: dict, markdown: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w") as fh:
        json.dump(result, fh, indent=1)
    with open(paths["md"], "w") as fh:
        fh.write(markdown)
    return paths


def run(args, command: str | None = None) -> dict:
    """Run the benchmark for parsed ``args``; returns {"meta", "config", "rows", "targets"[, "files"]}."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net; the warm-up steps pay for the search
    cfg = resolve_config(args, device)
    specs = network_specs(cfg["patch"])
    names = args.networks or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; choose from {list(specs)}")
    meta = make_meta(device, command or "python scripts/bench_networks.py " + " ".join(sys.argv[1:]), "networks")
    rows = []
    for name in names:
        built_as, build = specs[name]
        row = bench_network(name, built_as, build, cfg, device)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    targets = add_ratios(rows, device)
    result = {"meta": meta, "config": cfg, "rows": rows, "targets": targets,
              "reference_h100": {k: dict(train_ms=v[0], peak_gib=v[1], infer_s=v[2]) for k, v in REFERENCE_H100.items()}}
    md = to_markdown(result)
    print(md)
    if args.out:
        result["files"] = write_outputs(args.out, f"networks_{device.type}", result, md)
    return result


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(args, "python scripts/bench_networks.py " + " ".join(argv))


if __name__ == "__main__":
    main()
