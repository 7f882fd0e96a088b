#!/usr/bin/env python
"""What the fused routed scan saves, per SS3D layer: memory traffic outside the scan kernels, activation
memory kept for backward, and peak memory, fused vs unfused, extrapolated to a volume size.

Runs on CPU in seconds: the Triton kernel launches are replaced by no-ops, so every tensor the real
run allocates, every torch op it runs and every tensor autograd saves are there, only the scan's values
are not computed (the kernels' own traffic is the same in both paths; see docs/kernels.md). Measured at
two volumes and extrapolated linearly in the number of voxels (every term is linear in L once L is a
multiple of the 64-step tile), then checked at a third.

    python scripts/route_traffic.py                     # 6 routes, d_model 48 (d_inner 96), N 16, -> 128^3

Traffic rule: every torch op reads each tensor argument once and writes each output once (views and
allocations are free; an expanded argument counts its distinct elements). That is a lower bound for the
gathers/scatters (perfect caching) and ignores the Triton kernels, so the real saving is not smaller
than what the unfused path's extra ops move.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton backend be chosen for CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import medmamba.kernels.routed_scan as routed_scan  # noqa: E402
import medmamba.kernels.scan_triton as scan_triton  # noqa: E402
from medmamba.layers.cross_scan import CrossScan  # noqa: E402

FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias",
        "_unsafe_view",
        "_local_scalar_dense", "set_", "resize_", "is_same_size", "equal"}
WRITE_ONLY = {"copy_", "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "arange", "scalar_tensor"}


def _bytes(t):
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "copy_":
            ins = ins[1:]  # the destination is written, not read
        elif name in WRITE_ONLY:
            ins = []
        elif name.endswith("_"):
            outs = outs[:1]
        n = sum(_bytes(t) for t in ins) + sum(_bytes(t) for t in outs)
        self.bytes += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _peak_bytes(prof):
    """Highest live CPU memory allocated inside the profile (an op's own allocations counted at its start)."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(size, fused, d_model, d_state, batch):
    torch.manual_seed(0)
    m = CrossScan(d_model, spatial_dims=3, d_state=d_state, fused_routes=fused, scan_backend="triton")
    x = torch.randn(batch, size, size, size, d_model, requires_grad=True)
    dy = torch.randn_like(x)
    params = list(m.parameters())
    with torch.no_grad():
        m(x)  # builds the cached route tables (once per volume shape), which are not per-step costs
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    fwd, bwd = Traffic(), Traffic()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fwd:
            y = m(x)
        with bwd:
            torch.autograd.grad(y, [x, *params], dy)
        del y
    return {"fwd_traffic": fwd.bytes, "bwd_traffic": bwd.bytes, "saved": sum(saved.values()),
            "peak": _peak_bytes(prof), "fwd_ops": fwd.by_op, "bwd_ops": bwd.by_op}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs=3, default=[8, 16, 24], help="two to fit, one to check")
    p.add_argument("--target", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    for name in ("_fwd_kernel", "_carry_kernel", "_bwd_summary_kernel", "_bwd_kernel"):
        setattr(scan_triton, name, _NoLaunch())
    routed_scan._check_permutation = lambda idx: None  # a CPU-only input check, not part of a GPU run
    gib = 2.0 ** 30
    d_inner = 2 * args.d_model
    unit = args.batch * d_inner * args.target ** 3 * 4  # one fp32 (batch, d_inner, L) tensor
    result = {"config": vars(args), "unit_S_gib": unit / gib}
    print(f"SS3D layer, 6 routes, d_model {args.d_model} (d_inner {d_inner}), N {args.d_state}, batch {args.batch}; "
          f"extrapolated to {args.target}^3; S = one fp32 (batch, d_inner, L) tensor = {unit / gib:.3f} GiB")
    keys = ("fwd_traffic", "bwd_traffic", "saved", "peak")
    for fused in (False, True):
        a, b, c = (measure(s, fused, args.d_model, args.d_state, args.batch) for s in args.sizes)
        la, lb, lc = (s ** 3 for s in args.sizes)
        row = {}
        for k in keys:
            slope = (b[k] - a[k]) / (lb - la)
            pred_c = a[k] + slope * (lc - la)
            row[k] = {"gib": (a[k] + slope * (args.target ** 3 - la)) / gib,
                      "check_rel_err": abs(pred_c - c[k]) / max(c[k], 1)}
        row["fwd_ops_per_voxel"] = {op: (b["fwd_ops"].get(op, 0) - a["fwd_ops"].get(op, 0)) / (lb - la)
                                    for op in b["fwd_ops"]}
        row["bwd_ops_per_voxel"] = {op: (b["bwd_ops"].get(op, 0) - a["bwd_ops"].get(op, 0)) / (lb - la)
                                    for op in b["bwd_ops"]}
        result["fused" if fused else "unfused"] = row
        print(f"{'fused  ' if fused else 'unfused'}: " + ", ".join(
            f"{k} {row[k]['gib']:.2f} GiB ({row[k]['gib'] * gib / unit:.1f} S, fit error {row[k]['check_rel_err']:.1%})"
            for k in keys))
    for k in keys:
        d = result["unfused"][k]["gib"] - result["fused"][k]["gib"]
        print(f"saved by fusing, {k}: {d:.2f} GiB ({d * gib / unit:.1f} S)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
