#!/usr/bin/env python
"""Selective-scan benchmark: our Triton kernels vs our PyTorch path vs mamba_ssm, side by side.

Times forward and forward+backward (median of repeats) and peak memory at the 3D shapes of the
kernel issue, fp32 and bf16, and writes JSON + Markdown naming the device, versions and date.

    python scripts/bench_kernels.py --out docs/benchmarks            # GPU: the issue's shapes
    python scripts/bench_kernels.py --device cpu --out docs/benchmarks  # CPU: PyTorch path, smaller shapes

mamba_ssm is timed when ``import mamba_ssm`` works (it needs its compiled extension).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

import torch

GPU_SHAPES = [(2, 640, 64), (2, 512, 4096), (2, 256, 32768), (2, 128, 262144), (2, 64, 2097152)]
CPU_SHAPES = [(2, 640, 64), (2, 512, 4096), (2, 256, 32768)]
DSTATE = 16
# mamba_ssm 2.3.2 CUDA scan, H100, bf16 fwd+bwd (ms), from the kernel issue: the targets' baseline
MAMBA_SSM_REFERENCE_BF16_MS = {(2, 640, 64): 0.99, (2, 512, 4096): 0.92, (2, 256, 32768): 2.75,
                               (2, 128, 262144): 10.1, (2, 64, 2097152): 68.4}


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
    args = p.parse_args()
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
    for shape in shapes:
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
    md = to_markdown(meta, rows)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"kernels_{device.type}")
        with open(stem + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
