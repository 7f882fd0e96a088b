#!/usr/bin/env python
"""Scaling benchmark: time and peak memory as the volume grows, to see whether cost stays linear in voxels.

(a) one ``medmamba.Mamba`` layer (``--d-model``, default 64) over all D*H*W voxels of a volume as tokens,
    batch 1: forward (no grad) and forward + backward (gradients of the input and every parameter);
(b) whole-volume sliding-window inference of one network (``--network``, default umamba_bot, built from the
    nnU-Net plans of scripts/bench_networks.py at ``--patch``): roi = patch, overlap 0.5, gaussian.

    python scripts/bench_scaling.py --out docs/benchmarks                 # GPU sizes
    python scripts/bench_scaling.py --device cpu --out docs/benchmarks    # CPU: smaller sizes

GPU sizes: layer 32^3 .. 256^3 (the scan runs over every voxel: 2,097,152 tokens at 128^3), inference
64^3 .. 256^3 and 300x512x512; CPU: layer 16^3 .. 64^3, inference 32^3 .. 80^3 at a 32^3 roi. Sizes that run
out of memory are recorded with the error; after the first failure the larger sizes of that series are
skipped. Every series starts with one untimed call; ``--warmup`` more per size (GPU 2, CPU 0). Prints
time per voxel and the fitted exponent b of time ~ voxels^b (1 = linear) and writes JSON + Markdown + two
log-log plots (scaling_layer_<dev>.png, scaling_inference_<dev>.png) with a linear reference line. bf16 autocast on CUDA, fp32 on the CPU; memory
is measured as in bench_networks.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import bench_networks as bn  # noqa: E402

DEFAULTS = {
    "cuda": dict(layer_sizes=["32", "64", "96", "128", "192", "256"],
                 infer_sizes=["64", "96", "128", "192", "256", "300x512x512"], patch=(128, 128, 128),
                 sw_batch_size=4, repeats=5, warmup=2),
    "cpu": dict(layer_sizes=["16", "24", "32", "48", "64"], infer_sizes=["32", "48", "64", "80"],
                patch=(32, 32, 32), sw_batch_size=2, repeats=1, warmup=0),
}
QUICK = {
    "cuda": dict(layer_sizes=["32", "64", "96"], infer_sizes=["64", "128", "192"], patch=(64, 64, 64),
                 sw_batch_size=4, repeats=2, warmup=1),
    "cpu": dict(layer_sizes=["8", "16", "24"], infer_sizes=["32", "48"], patch=(32, 32, 32), sw_batch_size=2,
                repeats=1, warmup=0),
}


def fit_exponent(voxels, times):
    """Least-squares slope of log(time) against log(voxels); None with fewer than two points."""
    pts = [(math.log(v), math.log(t)) for v, t in zip(voxels, times) if t and t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3)


def warm_up_layer(layer, size, device):
    """One forward and one forward + backward, untimed; errors are left to the timed runs."""
    try:
        x = torch.randn(1, math.prod(size), layer.in_proj.in_features, device=device, requires_grad=True)
        with bn.autocast(device):
            y = layer(x)
        y.float().sum().backward()
        layer.zero_grad(set_to_none=True)
    except Exception:  # noqa: BLE001
        pass
    bn.free_memory(device)


def bench_layer_size(layer, size, device, repeats, warmup) -> dict:
    voxels = math.prod(size)
    row = {"size": bn.size_str(size), "voxels": voxels}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, voxels, layer.in_proj.in_features, generator=g).to(device)
    try:
        def fwd():
            with torch.no_grad(), bn.autocast(device):
                layer(x)

        with bn.PeakMemory(device) as mem:
            times = bn.timed_runs(fwd, device, repeats, warmup)
        row.update(fwd_s=round(statistics.median(times), 5),
                   fwd_peak_gib=round(mem.gib, 3) if mem.gib is not None else None)
    except Exception as exc:  # noqa: BLE001 - an OOM is a result
        row["error"] = "forward: " + bn.short_error(exc)
        bn.free_memory(device)
        return row
    bn.free_memory(device)
    try:
        xg = x.detach().requires_grad_(True)
        dy = torch.randn(x.shape, generator=g).to(device)

        def fwd_bwd():
            with bn.autocast(device):
                y = layer(xg)
            y.backward(dy.to(y.dtype))
            layer.zero_grad(set_to_none=True)
            xg.grad = None

        with bn.PeakMemory(device) as mem:
            times = bn.timed_runs(fwd_bwd, device, repeats, warmup)
        row.update(fwd_bwd_s=round(statistics.median(times), 5),
                   fwd_bwd_peak_gib=round(mem.gib, 3) if mem.gib is not None else None)
    except Exception as exc:  # noqa: BLE001
        row["error"] = "forward+backward: " + bn.short_error(exc)
    finally:
        del x
        bn.free_memory(device)
    for key, per_voxel in (("fwd_s", "fwd_ns_per_voxel"), ("fwd_bwd_s", "fwd_bwd_ns_per_voxel")):
        if key in row:
            row[per_voxel] = round(row[key] / voxels * 1e9, 3)
    return row


def bench_infer_size(net, patch, size, sw_batch_size, device, repeats, warmup) -> dict:
    voxels = math.prod(size)
    windows = bn.n_windows(size, patch)
    row = {"size": bn.size_str(size), "voxels": voxels, "windows": windows,
           "window_voxels": windows * math.prod(patch)}  # what the network actually processes
    try:
        row.update(bn.bench_inference(net, patch, size, sw_batch_size, device, repeats, warmup))
        row["infer_ns_per_voxel"] = round(row["infer_s"] / voxels * 1e9, 3)
        row["infer_ns_per_window_voxel"] = round(row["infer_s"] / row["window_voxels"] * 1e9, 3)
    except Exception as exc:  # noqa: BLE001
        row["error"] = bn.short_error(exc)
    bn.free_memory(device)
    return row


def series_fit(rows, key, x="voxels"):
    ok = [r for r in rows if key in r]
    return fit_exponent([r[x] for r in ok], [r[key] for r in ok])


def plot(rows, series, title, path, time_label):
    """Log-log time and memory against voxels, each with a linear reference through its first point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("time", "memory")):
        drew = False
        for key, mem_key, label, *xkey in series:
            k = key if kind == "time" else mem_key
            if k is None:
                continue
            xk = xkey[0] if xkey else "voxels"
            pts = [(r[xk], r[k]) for r in rows if r.get(k) is not None and r[k] > 0]
            if not pts:
                continue
            xs, ys = zip(*pts)
            line, = ax.loglog(xs, ys, "o-", label=label)
            if len(xs) > 1:
                ax.loglog([xs[0], xs[-1]], [ys[0], ys[0] * xs[-1] / xs[0]], "--", color=line.get_color(),
                          alpha=0.5, label=f"{label}: linear reference")
            drew = True
        ax.set_xlabel("voxels (D*H*W" + (", or windows x roi" if any(len(sr) > 3 for sr in series) else "") + ")")
        ax.set_ylabel(time_label if kind == "time" else "peak memory (GiB)")
        ax.set_title(f"{title}: {kind}")
        ax.grid(True, which="both", alpha=0.3)
        if drew:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_markdown(result: dict) -> str:
    meta, cfg = result["meta"], result["config"]
    cuda = meta["device_kind"] == "cuda"
    mem = "peak GiB" if cuda else "peak RSS growth GiB"
    dev = meta["device_kind"]
    lines = [f"### Scaling, {meta['device']} ({meta['date']})", "", bn.meta_markdown(meta), "",
             f"{'bf16 autocast' if cuda else 'fp32'}; median of {cfg['repeats']} run(s) after {cfg['warmup']} "
             "warm-up run(s). Memory: " + ("torch.cuda.max_memory_allocated." if cuda else
                                          "growth of the peak resident set over the resident set before the "
                                          "measurement (approximate).") +
             " A series stops at its first failure; larger sizes are not tried.", "",
             f"#### One `medmamba.Mamba` layer (d_model {cfg['d_model']}, d_state 16, expand 2), batch 1, "
             "tokens = every voxel", "",
             f"| volume | tokens | forward s | forward ns/voxel | forward {mem} | fwd+bwd s | fwd+bwd ns/voxel | "
             f"fwd+bwd {mem} |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["layer"]:
        if "fwd_s" not in r:
            lines.append(f"| {r['size']} | {r['voxels']:,} | **{r.get('error', 'skipped')}** | | | | | |")
            continue
        tail = (f"{bn.fmt(r.get('fwd_bwd_s'), 4)} | {bn.fmt(r.get('fwd_bwd_ns_per_voxel'), 1)} | "
                f"{bn.fmt(r.get('fwd_bwd_peak_gib'), 3)}") if "fwd_bwd_s" in r else f"**{r.get('error', '')}** | |"
        lines.append(f"| {r['size']} | {r['voxels']:,} | {bn.fmt(r['fwd_s'], 4)} | {bn.fmt(r['fwd_ns_per_voxel'], 1)} | "
                     f"{bn.fmt(r.get('fwd_peak_gib'), 3)} | {tail} |")
    fits = result["fits"]
    lines += ["", f"Fitted exponent b in time ~ voxels^b (1 = linear): forward {bn.fmt(fits['layer_fwd'], 2)}, "
              f"forward+backward {bn.fmt(fits['layer_fwd_bwd'], 2)}.", "",
              f"![layer scaling](scaling_layer_{dev}.png)", "",
              f"#### Whole-volume inference: {cfg['network']} ({result.get('network_built_as', '')}), "
              f"roi {bn.size_str(cfg['patch'])}, overlap 0.5, gaussian, sw_batch_size {cfg['sw_batch_size']}", "",
              f"| volume | voxels | windows | window voxels | inference s | ns/voxel | ns/window voxel | {mem} |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["inference"]:
        if "infer_s" not in r:
            lines.append(f"| {r['size']} | {r['voxels']:,} | {r.get('windows', '')} | {r.get('window_voxels', 0):,} | "
                         f"**{r.get('error', 'skipped')}** | | | |")
            continue
        lines.append(f"| {r['size']} | {r['voxels']:,} | {r['windows']} | {r['window_voxels']:,} | "
                     f"{bn.fmt(r['infer_s'], 3)} | {bn.fmt(r['infer_ns_per_voxel'], 1)} | "
                     f"{bn.fmt(r['infer_ns_per_window_voxel'], 1)} | {bn.fmt(r.get('infer_peak_gib'), 3)} |")
    lines += ["", f"Fitted exponent b: time ~ voxels^b {bn.fmt(fits['inference'], 2)}; time ~ (window voxels)^b "
              f"{bn.fmt(fits['inference_vs_window_voxels'], 2)}. With overlap 0.5 the windows cover each voxel up "
              "to 8 times once the volume is several rois wide (window voxels / voxels grows from 1 towards 8), "
              "so time per volume voxel rises with size even when the network's cost per processed voxel is "
              "constant; volumes smaller than the roi are padded to one window.", "",
              f"![inference scaling](scaling_inference_{dev}.png)", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--layer-sizes", nargs="+", default=None, help="N or DxHxW each (GPU 32..256, CPU 16..64)")
    p.add_argument("--infer-sizes", nargs="+", default=None,
                   help="N or DxHxW each (GPU 64..256 and 300x512x512, CPU 32..80)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--network", default="umamba_bot", help="a name bench_networks.py knows")
    p.add_argument("--patch", type=bn.parse_size, default=None, help="inference roi / plans patch (GPU 128, CPU 32)")
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is far steadier on cores shared with other jobs")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--out", default=None, help="folder for scaling_<cpu|cuda>.json/.md/*.png")
    return p


def run(args, command: str | None = None) -> dict:
    from medmamba import Mamba

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cfg = dict((QUICK if args.quick else DEFAULTS)[device.type])
    for key in ("layer_sizes", "infer_sizes", "patch", "sw_batch_size", "repeats", "warmup"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(d_model=args.d_model, network=args.network, patch=list(cfg["patch"]))
    layer_sizes = [bn.parse_size(s) for s in cfg["layer_sizes"]]
    infer_sizes = [bn.parse_size(s) for s in cfg["infer_sizes"]]
    meta = bn.make_meta(device, command or "python scripts/bench_scaling.py " + " ".join(sys.argv[1:]), "scaling")
    result = {"meta": meta, "config": cfg, "layer": [], "inference": []}

    if not args.skip_layer:
        torch.manual_seed(0)
        layer = Mamba(d_model=args.d_model).to(device)
        if layer_sizes:  # one untimed call first, so one-time costs do not land on the first size
            warm_up_layer(layer, layer_sizes[0], device)
        failed = False
        for size in layer_sizes:
            if failed:
                result["layer"].append({"size": bn.size_str(size), "voxels": math.prod(size),
                                        "error": "skipped (a smaller size failed)"})
                continue
            t0 = time.perf_counter()
            row = bench_layer_size(layer, size, device, cfg["repeats"], cfg["warmup"])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            failed = "error" in row
            result["layer"].append(row)
            print(json.dumps({"layer": row}), flush=True)
        del layer
        bn.free_memory(device)

    if not args.skip_inference:
        specs = bn.network_specs(cfg["patch"])
        if args.network not in specs:
            raise SystemExit(f"unknown network {args.network!r}; choose from {list(specs)}")
        built_as, build = specs[args.network]
        result["network_built_as"] = built_as
        try:
            torch.manual_seed(0)
            net = build().to(device)
        except Exception as exc:  # noqa: BLE001
            net = None
            result["network_error"] = "build: " + bn.short_error(exc)
        failed = net is None
        for size in infer_sizes:
            if failed:
                result["inference"].append({"size": bn.size_str(size), "voxels": math.prod(size),
                                            "error": result.get("network_error", "skipped (a smaller size failed)")})
                continue
            t0 = time.perf_counter()
            row = bench_infer_size(net, cfg["patch"], size, cfg["sw_batch_size"], device, cfg["repeats"],
                                   1 if device.type == "cuda" else 0)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            failed = "error" in row
            result["inference"].append(row)
            print(json.dumps({"inference": row}), flush=True)
        del net
        bn.free_memory(device)

    result["fits"] = {"layer_fwd": series_fit(result["layer"], "fwd_s"),
                      "layer_fwd_bwd": series_fit(result["layer"], "fwd_bwd_s"),
                      "inference": series_fit(result["inference"], "infer_s"),
                      "inference_vs_window_voxels": series_fit(result["inference"], "infer_s", "window_voxels")}
    md = to_markdown(result)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        dev = device.type
        files = {}
        try:
            files["layer_png"] = plot(result["layer"], [("fwd_s", "fwd_peak_gib", "forward"),
                                                        ("fwd_bwd_s", "fwd_bwd_peak_gib", "forward+backward")],
                                      f"Mamba layer, d_model {args.d_model} ({dev})",
                                      os.path.join(args.out, f"scaling_layer_{dev}.png"), "seconds")
            files["inference_png"] = plot(result["inference"],
                                          [("infer_s", "infer_peak_gib", "sliding window, vs volume voxels"),
                                           ("infer_s", None, "sliding window, vs window voxels", "window_voxels")],
                                          f"{args.network} whole-volume inference ({dev})",
                                          os.path.join(args.out, f"scaling_inference_{dev}.png"), "seconds")
        except ImportError as exc:  # matplotlib is optional
            result["plot_error"] = str(exc)
        files.update(bn.write_outputs(args.out, f"scaling_{dev}", result, md))
        result["files"] = files
    return result


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(args, "python scripts/bench_scaling.py " + " ".join(argv))


if __name__ == "__main__":
    main()
