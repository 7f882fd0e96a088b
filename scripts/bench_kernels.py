#!/usr/bin/env python
"""Selective-scan benchmark: our Triton kernels vs our PyTorch path vs mamba_ssm, side by side.

Times forward and forward+backward (median of repeats) and peak memory at the 3D shapes of the
kernel issue, fp32 and bf16, and writes JSON + Markdown naming the device, versions and date.

    python scripts/bench_kernels.py --out docs/benchmarks            # GPU: the issue's shapes
    python scripts/bench_kernels.py --device cpu --out docs/benchmarks  # CPU: PyTorch path, smaller shapes
    python scripts/bench_kernels.py --routes --out docs/benchmarks   # + the 6-route SS3D layer, fused vs unfused

mamba_ssm is timed when ``import mamba_ssm`` works (it needs its compiled extension).

``--torch-methods`` (CPU) times the PyTorch scan before and after its two-level rewrite at the scan shapes the
registry networks run on a 56x160x160 window (``NETWORK_SHAPES``, shorter L: the cost per token is flat in L):
"doubling" = the chunked doubling scan (forward ``scan_torch._doubling_forward``, backward states by
``_doubling_scan``, the code before), "blocked" = the default (``_blocked_forward``, ``_two_level_states``).
Forward without grad and forward + backward, median of ``--repeats``, ns per (channel, token) and per
(channel, token, state); writes ``kernels_torch_methods_cpu_<threads>t.json/.md``:

    OMP_NUM_THREADS=1 python scripts/bench_kernels.py --device cpu --torch-methods --threads 1 --out docs/benchmarks

``--routes`` adds a second table: the SS3D layer (``medmamba.layers.cross_scan.CrossScan``, spatial_dims=3, 6
routes, d_model 48 -> d_inner 96, N 16, fp32) with ``fused_routes=True`` (routed scan, no gathered copies)
and ``False`` (gather / scan / merge), forward and forward+backward (gradients of the input and every
parameter) and peak memory, at 32^3 / 64^3 / 128^3 on a GPU (``--route-sizes``), tiny volumes on CPU. It
goes into the same JSON (``route_rows``) and Markdown; ``--routes-only`` skips the scan table and writes
``kernels_routes_<device>.json/.md`` instead, leaving the scan results alone.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

import torch

ROUTE_D_MODEL = 48
GPU_ROUTE_SIZES = [32, 64, 128]
CPU_ROUTE_SIZES = [8, 16]
GPU_SHAPES = [(2, 640, 64), (2, 512, 4096), (2, 256, 32768), (2, 128, 262144), (2, 64, 2097152)]
CPU_SHAPES = [(2, 640, 64), (2, 512, 4096), (2, 256, 32768)]
DSTATE = 16
# mamba_ssm 2.3.2 CUDA scan, H100, bf16 fwd+bwd (ms), from the kernel issue: the targets' baseline
MAMBA_SSM_REFERENCE_BF16_MS = {(2, 640, 64): 0.99, (2, 512, 4096): 0.92, (2, 256, 32768): 2.75,
                               (2, 128, 262144): 10.1, (2, 64, 2097152): 68.4}


# (batch, D, L, N, groups) of the scans in one 56x160x160 window (tests/data/bundle_sts_nnUNetPlans.json, presets
# applied), L shortened to what a CPU times in seconds; the networks' L in the comments.
NETWORK_SHAPES = {
    "U-Mamba Enc / LightM-UNet full res (L 1433600)": (1, 64, 32768, 16, 1),
    "LightM-UNet 1/2 res (L 179200)": (1, 128, 16384, 16, 1),
    "LightM-UNet 1/8, U-Mamba Enc 1/16 (L 2800, 5600)": (1, 512, 2800, 16, 1),
    "U-Mamba Bot bottleneck (L 175)": (1, 640, 175, 16, 1),
    "Swin-UMamba(-D) stage 1, 6 routes (L 25600)": (1, 1152, 3200, 16, 6),
    "VM-UNet-MHS stage 1, 16 heads (L 25600)": (1, 384, 3200, 16, 16),
    "MSVM-UNet stage 1, N 1 (L 25600)": (1, 576, 6400, 1, 6),
}


@contextlib.contextmanager
def torch_scan_method(method):
    """Run the PyTorch scan as ``method``: "blocked" (the default) or "doubling" (the code before the rewrite)."""
    from medmamba.kernels import scan_torch as st

    saved = st._blocked_forward, st._two_level_states
    if method == "doubling":
        st._blocked_forward = st._doubling_forward
        st._two_level_states = lambda a, b, h0=None: st._doubling_scan(a, b, h0)[1]
    try:
        yield
    finally:
        st._blocked_forward, st._two_level_states = saved


def bench_torch_methods(shapes, repeats, backward=True):
    from medmamba.kernels import selective_scan

    rows = []
    for label, (b, d, L, n, g) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(b, d, L, generator=gen), torch.randn(b, d, L, generator=gen) * 0.5,
              -(torch.rand(d, n, generator=gen) + 0.5), torch.randn(b, g, n, L, generator=gen),
              torch.randn(b, g, n, L, generator=gen), torch.ones(d), torch.randn(b, d, L, generator=gen),
              torch.zeros(d)]
        for x in xs:
            x.requires_grad_(True)
        dy = torch.randn(b, d, L, generator=gen)
        fn = lambda: selective_scan(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True,  # noqa: E731
                                    backend="torch")
        row = {"label": label, "shape": [b, d, L, n, g]}
        outs = {}
        for method in ("doubling", "blocked"):
            with torch_scan_method(method):
                with torch.no_grad():
                    outs[method] = fn()
                    row[f"{method}_fwd_ms"] = round(timed(fn, torch.device("cpu"), repeats, warmup=1), 2)
                if backward:
                    row[f"{method}_fwd_bwd_ms"] = round(timed(lambda: torch.autograd.grad(fn(), xs, dy),
                                                              torch.device("cpu"), repeats, warmup=1), 2)
        row["max_abs_diff"] = float((outs["blocked"] - outs["doubling"]).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def torch_methods_markdown(meta, rows):
    lines = [f"### PyTorch selective scan before / after the two-level rewrite, {meta['device']} ({meta['date']})",
             "", f"`{meta['command']}`; fp32, delta_softplus, D and z gate on; median of repeats; ns per (channel, "
             "token) = time / (B D L); before = chunked doubling scan, after = two-level blocked scan.", "",
             "| scan (network) | (B, D, L, N, G) | fwd ms before | fwd ms after | fwd ns/(ch, token) before -> after "
             "| fwd speed-up | fwd+bwd ms before | fwd+bwd ms after | fwd+bwd speed-up |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        b, d, L, n, g = r["shape"]
        per = lambda ms: ms * 1e6 / (b * d * L)  # noqa: E731
        fb0, fb1 = r.get("doubling_fwd_bwd_ms"), r.get("blocked_fwd_bwd_ms")
        lines.append(f"| {r['label']} | ({b}, {d}, {L}, {n}, {g}) | {r['doubling_fwd_ms']} | {r['blocked_fwd_ms']} | "
                     f"{per(r['doubling_fwd_ms']):.0f} -> {per(r['blocked_fwd_ms']):.0f} | "
                     f"{r['doubling_fwd_ms'] / r['blocked_fwd_ms']:.1f}x | {fb0 if fb0 else '-'} | "
                     f"{fb1 if fb1 else '-'} | {f'{fb0 / fb1:.1f}x' if fb0 and fb1 else '-'} |")
    return "\n".join(lines) + "\n"


def make_inputs(shape, dtype, device):
    b, d, L = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    u, z = rnd(b, d, L), rnd(b, d, L)
    delta = rnd(b, d, L, scale=0.5)
    A = -(torch.rand(d, DSTATE, generator=g) + 0.5).to(device)
    B, C = rnd(b, DSTATE, L), rnd(b, DSTATE, L)
    D = torch.ones(d, device=device)
    bias = torch.zeros(d, device=device)
    return [u, delta, A, B, C, D, z, bias]


def scan_fn(impl):
    if impl == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return lambda u, de, A, B, C, D, z, bias: selective_scan_fn(u, de, A, B, C, D, z=z, delta_bias=bias,
                                                                     delta_softplus=True)
    from medmamba.kernels import selective_scan

    return lambda u, de, A, B, C, D, z, bias: selective_scan(u, de, A, B, C, D, z=z, delta_bias=bias,
                                                             delta_softplus=True, backend=impl)


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(impl, shape, dtype, device, repeats):
    fn = scan_fn(impl)
    xs = make_inputs(shape, dtype, device)
    grad_idx = [0, 1, 2, 3, 4, 5, 6, 7]
    for i in grad_idx:
        xs[i].requires_grad_(True)
    dy = torch.randn(shape, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            fn(*xs)

    def fwd_bwd():
        y = fn(*xs)
        torch.autograd.grad(y, [xs[i] for i in grad_idx], dy)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fb_ms = timed(fwd_bwd, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    f_ms = timed(fwd, device, repeats)
    return {"impl": impl, "shape": list(shape), "dstate": DSTATE, "dtype": str(dtype).replace("torch.", ""),
            "fwd_ms": round(f_ms, 3), "fwd_bwd_ms": round(fb_ms, 3),
            "peak_gib": round(peak, 3) if peak is not None else None}


def bench_route_layer(size, fused, device, repeats, batch):
    """SS3D layer (6 routes) at size^3, fused or unfused routes: times, peak memory, output."""
    from medmamba.layers.cross_scan import CrossScan
    from medmamba.kernels import resolve_backend

    torch.manual_seed(0)
    m = CrossScan(ROUTE_D_MODEL, spatial_dims=3, fused_routes=fused).to(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, size, size, size, ROUTE_D_MODEL, generator=g).to(device).requires_grad_(True)
    dy = torch.randn(x.shape, generator=g).to(device)
    params = list(m.parameters())

    def fwd():
        with torch.no_grad():
            return m(x)

    def fwd_bwd():
        torch.autograd.grad(m(x), [x, *params], dy)

    peaks = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        else:
            peaks[name] = None
    fb_ms = timed(fwd_bwd, device, repeats)
    f_ms = timed(fwd, device, repeats)
    row = {"layer": f"CrossScan 3D R=6 d_model={ROUTE_D_MODEL}", "size": [size] * 3, "batch": batch,
           "fused": bool(fused), "scan_backend": resolve_backend(device), "fwd_ms": round(f_ms, 3),
           "fwd_bwd_ms": round(fb_ms, 3), "peak_fwd_gib": peaks["fwd"], "peak_fwd_bwd_gib": peaks["fwd_bwd"]}
    return row, fwd().float().cpu()


def bench_routes(sizes, device, repeats, batch):
    rows = []
    for size in sizes:
        outs = {}
        for fused in (False, True):
            try:
                row, outs[fused] = bench_route_layer(size, fused, device, repeats, batch)
            except Exception as exc:  # an OOM is a result too
                row = {"layer": f"CrossScan 3D R=6 d_model={ROUTE_D_MODEL}", "size": [size] * 3, "batch": batch,
                       "fused": fused, "error": f"{type(exc).__name__}: {exc}"[:120]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if fused and len(outs) == 2:
                row["max_abs_diff_vs_unfused"] = float((outs[True] - outs[False]).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def routes_markdown(meta, rows):
    lines = [f"### Routed scan: SS3D layer fused vs unfused, {meta['device']} ({meta['date']})", "",
             f"`{meta['command']}`; `medmamba.layers.cross_scan.CrossScan(spatial_dims=3)`: 6 routes, d_model "
             f"{ROUTE_D_MODEL}, d_inner {2 * ROUTE_D_MODEL}, N 16, fp32; fused = `fused_routes=True` (routed scan, "
             "no gathered copies), unfused = gather / scan / merge; fwd+bwd computes the gradients of the input "
             "and every parameter; peak = allocated above the inputs and parameters; median of repeats.", "",
             "| volume | batch | routes | scan backend | fwd ms | fwd+bwd ms | peak fwd GiB | peak fwd+bwd GiB | "
             "max abs diff to unfused |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vol = "x".join(str(v) for v in r["size"])
        path = "fused" if r["fused"] else "unfused"
        if "error" in r:
            lines.append(f"| {vol} | {r['batch']} | {path} | | {r['error']} | | | | |")
            continue
        dash = lambda v: "-" if v is None else v  # noqa: E731
        diff = r.get("max_abs_diff_vs_unfused")
        lines.append(f"| {vol} | {r['batch']} | {path} | {r['scan_backend']} | {r['fwd_ms']} | {r['fwd_bwd_ms']} | "
                     f"{dash(r['peak_fwd_gib'])} | {dash(r['peak_fwd_bwd_gib'])} | "
                     f"{'-' if diff is None else f'{diff:.2e}'} |")
    return "\n".join(lines) + "\n"


def versions():
    out = {}
    for dist in ("torch", "triton", "mamba_ssm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def to_markdown(meta, rows):
    lines = [f"### Selective scan, {meta['device']} ({meta['date']})", "",
             f"`{meta['command']}`; torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
             f"mamba_ssm {meta['versions']['mamba_ssm'] or 'not installed'}; N={DSTATE}, delta_softplus, D and z "
             "gate on; median of repeats; fwd+bwd computes gradients of every input.", "",
             "| shape (B, D, L) | dtype | impl | fwd ms | fwd+bwd ms | peak GiB | mamba_ssm H100 bf16 fwd+bwd ms "
             "(issue) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = MAMBA_SSM_REFERENCE_BF16_MS.get(tuple(r["shape"])) if r["dtype"] == "bfloat16" else None
        if "error" in r:
            lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['impl']} | {r['error']} | | | |")
            continue
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['impl']} | {r['fwd_ms']} | {r['fwd_bwd_ms']} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {ref if ref else '-'} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--impl", nargs="+", default=None, help="triton torch mamba_ssm (default: what works here)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--shapes", nargs="+", default=None, help="B,D,L triples, e.g. 2,128,262144")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-torch-elements", type=float, default=2**31,
                   help="skip the PyTorch path above this B*D*L*N (it is the slow fallback)")
    p.add_argument("--out", default=None, help="folder for kernels_<device>.json/.md")
    p.add_argument("--routes", action="store_true",
                   help="also time the 6-route SS3D layer (CrossScan) with fused vs unfused routes")
    p.add_argument("--routes-only", action="store_true",
                   help="only the route table, written to kernels_routes_<device>.json/.md")
    p.add_argument("--route-sizes", nargs="+", type=int, default=None,
                   help="cube edges for --routes (default 32 64 128 on GPU, 8 16 on CPU)")
    p.add_argument("--route-batch", type=int, default=1)
    p.add_argument("--torch-methods", action="store_true",
                   help="CPU: the PyTorch scan before/after its two-level rewrite at the networks' scan shapes only")
    p.add_argument("--no-backward", action="store_true", help="--torch-methods: forward only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torch_methods:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} threads)"
        meta = {"device": name, "date": datetime.date.today().isoformat(), "versions": versions(),
                "command": "python " + " ".join(sys.argv), "python": platform.python_version()}
        rows = bench_torch_methods(NETWORK_SHAPES, args.repeats, backward=not args.no_backward)
        md = torch_methods_markdown(meta, rows)
        print(md)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            stem = os.path.join(args.out, f"kernels_torch_methods_cpu_{torch.get_num_threads()}t")
            with open(stem + ".json", "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(md)
        return
    args.routes = args.routes or args.routes_only
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else \
        (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    impls = args.impl
    if impls is None:
        impls = ["torch"]
        if device.type == "cuda":
            impls = ["triton", "torch"]
            try:
                import mamba_ssm  # noqa: F401
                impls.append("mamba_ssm")
            except Exception:
                pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    meta = {"device": name, "date": datetime.date.today().isoformat(), "versions": versions(),
            "command": "python " + " ".join(sys.argv), "python": platform.python_version()}
    rows = []
    for shape in ([] if args.routes_only else shapes):
        for dt in args.dtype:
            for impl in impls:
                if impl == "torch" and shape[0] * shape[1] * shape[2] * DSTATE > args.max_torch_elements:
                    continue
                try:
                    row = bench_one(impl, shape, getattr(torch, dt), device, args.repeats)
                except Exception as exc:  # an OOM or a missing extension is a result too
                    row = {"impl": impl, "shape": list(shape), "dtype": dt, "error": f"{type(exc).__name__}: {exc}"[:120]}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    route_rows = []
    if args.routes:
        sizes = args.route_sizes or (GPU_ROUTE_SIZES if device.type == "cuda" else CPU_ROUTE_SIZES)
        route_rows = bench_routes(sizes, device, args.repeats, args.route_batch)
    md = "" if args.routes_only else to_markdown(meta, rows)
    if args.routes:
        md += ("\n" if md else "") + routes_markdown(meta, route_rows)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"kernels_routes_{device.type}" if args.routes_only else f"kernels_{device.type}")
        with open(stem + ".json", "w") as f:
            out = {"meta": meta, "rows": rows}
            if args.routes:
                out["route_rows"] = route_rows
            json.dump(out, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
