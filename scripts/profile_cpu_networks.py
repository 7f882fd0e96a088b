#!/usr/bin/env python
"""Where a network's CPU inference time goes, next to nnU-Net's PlainConvUNet from the same plans.

Builds PlainConvUNet from tests/data/bundle_sts_nnUNetPlans.json (nnU-Net 2.8.1's planner on ibsi_sts) and each
named registry network from the same plans adapted by its preset (as its nnU-Net trainer does), then

* counts the forward FLOPs of one window at the plans' patch size (``torch.utils.flop_counter`` on the meta
  device: nothing runs);
* times one forward (no grad, eval) at ``--size`` on ONE thread, by the thread's CPU time (``time.thread_time``:
  steady on cores shared with other jobs), the networks interleaved, ``--repeats`` times, and sums the minimum
  per module over module kinds (convolutions by kernel and stride; Mamba / cross-scan layers as a whole);
* with ``--ops``, prints torch.profiler's top operators for one more forward of each network (wall time).

    OMP_NUM_THREADS=1 python scripts/profile_cpu_networks.py --size 56 64 64 --nets umamba_bot [--ops]

Random weights (He init as nnU-Net); the time does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WHOLE = ("MambaLayer", "RVMLayer", "CrossScan", "MultiHeadScan")


def build(arch: str, patch=None, device="cpu"):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.nnunet.presets import apply_preset

    plans = json.loads((ROOT / "tests" / "data" / "bundle_sts_nnUNetPlans.json").read_text())
    if patch is not None:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(patch)
    if arch != "plain":
        plans = apply_preset(plans, arch, configurations=["3d_fullres"])
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 2, False)
    return net.to(device).eval(), list(cm.patch_size)


def flops(arch: str) -> tuple[float, dict, list]:
    from torch.utils.flop_counter import FlopCounterMode

    net, patch = build(arch, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.empty(1, 1, *patch, device="meta"))
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}, patch


def kind(m: torch.nn.Module) -> str:
    k = type(m).__name__
    if k.startswith("Conv"):
        k += " k" + "x".join(map(str, m.kernel_size))
        if max(m.stride) > 1:
            k += " s" + "x".join(map(str, m.stride))
    return k


def profile(archs, size, repeats):
    nets = {a: build(a, patch=size)[0] for a in archs}
    x = torch.randn(1, 1, *size)
    start, cur = {}, {}
    for a, net in nets.items():
        whole = [n for n, m in net.named_modules() if type(m).__name__ in WHOLE]
        for n, m in net.named_modules():
            inside = any(n.startswith(w + ".") for w in whole)
            if inside or not (n in whole or len(list(m.children())) == 0):
                continue
            m.register_forward_pre_hook(lambda mod, i, n=n: start.__setitem__(n, time.thread_time()))
            m.register_forward_hook(
                lambda mod, i, o, n=n, a=a: cur[a].__setitem__(n, cur[a].get(n, 0.0) + time.thread_time() - start[n]))
    best = {a: {} for a in archs}
    total = {a: float("inf") for a in archs}
    with torch.no_grad():
        for a, net in nets.items():  # untimed first call
            cur[a] = {}
            net(x)
        for _ in range(repeats):
            for a, net in nets.items():
                cur[a] = {}
                t = time.thread_time()
                net(x)
                total[a] = min(total[a], time.thread_time() - t)
                best[a] = {n: min(v, best[a].get(n, float("inf"))) for n, v in cur[a].items()}
    out = {}
    for a, net in nets.items():
        mods = dict(net.named_modules())
        by = defaultdict(float)
        for n, v in best[a].items():
            by[kind(mods[n]) + (" (whole layer)" if type(mods[n]).__name__ in WHOLE else "")] += v
        out[a] = {"forward_s": total[a], "modules": dict(sorted(by.items(), key=lambda kv: -kv[1])),
                  "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    return out, nets, x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=["umamba_bot"])
    ap.add_argument("--size", nargs=3, type=int, default=[56, 64, 64], help="timed input D H W (default 56 64 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ops", action="store_true", help="also torch.profiler's top operators")
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    archs = ["plain"] + [a for a in args.nets if a != "plain"]
    report = {"size": args.size, "threads": 1, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "networks": {}}
    for a in archs:
        total, counts, patch = flops(a)
        report["networks"][a] = {"gflop_per_window": round(total / 1e9, 1), "patch": patch,
                                 "gflop_by_op": {k: round(v / 1e9, 1) for k, v in counts.items()}}
    timings, nets, x = profile(archs, args.size, args.repeats)
    base = report["networks"]["plain"]
    for a in archs:
        r = report["networks"][a]
        r.update(timings[a])
        print(f"{a}: {r['params_m']:.1f} M params, {r['gflop_per_window']} GFLOP per {'x'.join(map(str, r['patch']))} "
              f"window ({r['gflop_per_window'] / base['gflop_per_window']:.2f}x PlainConvUNet); forward at "
              f"{'x'.join(map(str, args.size))}: {r['forward_s']:.2f} s CPU ({r['forward_s'] / base['forward_s']:.2f}x), "
              f"of which in modules {sum(r['modules'].values()):.2f} s")
        for k, v in list(r["modules"].items())[:12]:
            print(f"    {k:36s} {v:7.3f} s {100 * v / r['forward_s']:5.1f} %")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile as tprofile

        for a, net in nets.items():
            with torch.no_grad(), tprofile(activities=[ProfilerActivity.CPU]) as prof:
                net(x)
            print(a)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
