#!/usr/bin/env python
"""All benchmarks with one command: kernels, networks, scaling.

    python scripts/bench_all.py --out docs/benchmarks                 # on a GPU (the default when CUDA works)
    python scripts/bench_all.py --out docs/benchmarks --device cpu    # CPU, reduced sizes (~10 min on 2 cores)
    python scripts/bench_all.py --out /tmp/bench --quick              # a smoke run
    python scripts/bench_all.py --device cpu --networks-args="--patch 64 --networks ResEnc-M umamba_bot"

Levels (``--levels``, default all three):

* kernels  - scripts/bench_kernels.py: the selective scan, Triton / PyTorch / mamba_ssm -> kernels_<dev>.{json,md}
* networks - scripts/bench_networks.py: training step and whole-volume inference of every network next to
             nnU-Net's PlainConvUNet / ResEnc-M and MONAI's SwinUNETR -> networks_<dev>.{json,md}
* scaling  - scripts/bench_scaling.py: one Mamba layer and one network's inference as the volume grows
             -> scaling_<dev>.{json,md}, scaling_layer_<dev>.png, scaling_inference_<dev>.png

<dev> is ``cpu`` or ``cuda``, so CPU and GPU results sit side by side in one folder. A summary of the run
(levels, wall times, errors) goes to bench_all_<dev>.{json,md}. A level that fails is reported and the
others still run; the exit status is 1 when any level failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import bench_networks as bn  # noqa: E402

LEVELS = ("kernels", "networks", "scaling")

# arguments of scripts/bench_kernels.py per device kind (it has its own GPU defaults)
KERNEL_ARGS = {
    ("cuda", False): [],
    ("cuda", True): ["--repeats", "3", "--shapes", "2,640,64", "2,512,4096", "2,256,32768"],
    # CPU: fp32 only (the PyTorch path's bf16 costs as much; 2 warm-up + 2 timed calls per row), ~1.5 min
    ("cpu", False): ["--repeats", "2", "--dtype", "float32", "--shapes", "2,640,64", "2,512,4096", "2,256,32768"],
    ("cpu", True): ["--repeats", "1", "--dtype", "float32", "--shapes", "2,640,64", "2,512,4096"],
}


def run_kernels(device: str, out: str, quick: bool, command: str, extra: list[str]) -> dict:
    """scripts/bench_kernels.py in-process (its main reads sys.argv); adds full versions to its outputs."""
    import bench_kernels

    defaults = list(KERNEL_ARGS[(device, quick)])
    if device == "cuda" and not quick and hasattr(bench_kernels, "bench_routes"):
        defaults.append("--routes")  # the 6-route SS3D layer, fused vs unfused, where the script has it
    argv = ["--device", device, *defaults, *extra, "--out", out]
    saved = sys.argv
    sys.argv = ["scripts/bench_kernels.py", *argv]
    try:
        bench_kernels.main()
    finally:
        sys.argv = saved
    stem = os.path.join(out, f"kernels_{device}")
    with open(stem + ".json") as fh:
        data = json.load(fh)
    meta = bn.make_meta(torch.device(device), command, "kernels")
    data["meta"]["via"] = command
    data["meta"]["versions_all"] = meta["versions"]
    with open(stem + ".json", "w") as fh:
        json.dump(data, fh, indent=1)
    with open(stem + ".md", "a") as fh:
        fh.write(f"\nRun by `{command}` on {meta['device']} ({meta['host']}); {bn.versions_line(meta['versions'])}.\n")
    return {"files": {"json": stem + ".json", "md": stem + ".md"},
            "level_command": "python scripts/bench_kernels.py " + " ".join(argv)}


def run_level(level: str, device: str, out: str, quick: bool, command: str, passed: list[str] | None = None,
              threads: int | None = None) -> dict:
    passed = list(passed or [])
    if level == "kernels":
        return run_kernels(device, out, quick, command, passed)
    extra = ["--device", device, "--out", out] + (["--quick"] if quick else []) + \
        (["--threads", str(torch.get_num_threads())] if threads else []) + passed
    if level == "networks":
        args = bn.build_parser().parse_args(extra)
        cmd = f"{command} (this level alone: python scripts/bench_networks.py {' '.join(extra)})"
        result = bn.run(args, cmd)
        return {"files": result.get("files", {}), "level_command": "python scripts/bench_networks.py " + " ".join(extra)}
    if level == "scaling":
        import bench_scaling

        args = bench_scaling.build_parser().parse_args(extra)
        cmd = f"{command} (this level alone: python scripts/bench_scaling.py {' '.join(extra)})"
        result = bench_scaling.run(args, cmd)
        return {"files": result.get("files", {}), "level_command": "python scripts/bench_scaling.py " + " ".join(extra)}
    raise ValueError(level)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(SCRIPTS), "docs", "benchmarks"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats at every level")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every level (default: torch's choice). On cores shared with other "
                        "jobs use 1: with 2 threads a busy neighbour made the CPU scan ~10x slower here")
    for level in LEVELS:
        p.add_argument(f"--{level}-args", default="", metavar="ARGS",
                       help=f"extra arguments for scripts/bench_{level}.py, one string "
                            f"(e.g. --{level}-args=\"--repeats 5\"); they override the defaults")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python scripts/bench_all.py " + " ".join(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    summary = {"meta": bn.make_meta(torch.device(args.device), command, "all"), "levels": {}}
    t_all = time.perf_counter()
    for level in args.levels:
        print(f"\n=== {level} ({args.device}{', quick' if args.quick else ''}) ===", flush=True)
        t0 = time.perf_counter()
        try:
            info = run_level(level, args.device, args.out, args.quick, command,
                             shlex.split(getattr(args, f"{level}_args")), args.threads)
        except BaseException as exc:  # noqa: BLE001 - one level failing must not lose the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            info = {"error": bn.short_error(exc, 300)}
        info["wall_s"] = round(time.perf_counter() - t0, 1)
        summary["levels"][level] = info
        print(f"=== {level}: {info['wall_s']} s{' - FAILED: ' + info['error'] if 'error' in info else ''}", flush=True)
    summary["wall_s"] = round(time.perf_counter() - t_all, 1)
    stem = os.path.join(args.out, f"bench_all_{args.device}")
    lines = [f"### bench_all, {summary['meta']['device']} ({summary['meta']['date']})", "",
             bn.meta_markdown(summary["meta"]), "", "| level | wall s | outputs | same level alone |", "|---|---:|---|---|"]
    for level, info in summary["levels"].items():
        files = ", ".join(f"`{os.path.basename(f)}`" for f in info.get("files", {}).values())
        lines.append(f"| {level} | {info['wall_s']} | {files or '**' + info.get('error', '') + '**'} | "
                     f"`{info.get('level_command', '')}` |")
    lines += ["", f"Total {summary['wall_s']} s.", ""]
    with open(stem + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))
    return 1 if any("error" in i for i in summary["levels"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
