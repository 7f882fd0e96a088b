"""Whole-volume CPU inference of one real CT (ibsi_sts STS_002): every registry network next to nnU-Net's
PlainConvUNet from the same plans (tests/data/bundle_sts_nnUNetPlans.json: nnU-Net 2.8.1's planner on ibsi_sts,
patch 56x160x160; each medmamba network gets the plans adapted by its preset, ``medmamba.nnunet.presets``, as its
nnU-Net trainer does: U-Mamba Bot/Enc keep the plans' stages, the fixed-topology networks get 64x160x160),
PyTorch eager vs ONNX Runtime, through ``medmamba predict`` (nnUNetPredictor's sliding window, step 0.5,
Gaussian, no mirroring). Random weights: the time does not depend on them. Each run is its own process, timed by
``predict_log.json`` (the case's seconds, model loading excluded) and ``/usr/bin/time`` (peak RSS of the
process); the ONNX export (``medmamba export``, including its ONNX Runtime check) is timed separately.

    python scripts/bench_cpu_inference.py --out /tmp/bench_cpu [--nets plain umamba_bot ...] [--threads 2]
Writes OUT/results.json (rerunning skips what is there unless --redo) and prints a Markdown table
(docs/benchmarks.md).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NAMES = {"plain": "PlainConvUNet", "umamba_bot": "U-Mamba Bot", "umamba_enc": "U-Mamba Enc",
         "lightm_unet": "LightM-UNet", "swin_umamba": "Swin-UMamba", "swin_umamba_d": "Swin-UMamba-D",
         "msvm_unet": "MSVM-UNet", "vm_unet_mhs": "VM-UNet-MHS", "hymamba": "HyMamba"}
NETS = list(NAMES)


def make_model(out: Path, net: str) -> Path:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.nnunet.presets import apply_preset

    plans = json.loads((ROOT / "tests" / "data" / "bundle_sts_nnUNetPlans.json").read_text())
    if net != "plain":  # what the network's nnU-Net trainer does to the plans
        plans = apply_preset(plans, net, configurations=["3d_fullres"])
    pm = PlansManager(plans)
    torch.manual_seed(0)
    model = out / net / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    network = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, False)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                    "tumour": 1}, "numTraining": 3, "file_ending": ".nii.gz"}))
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               model / "fold_0" / "checkpoint_final.pth")
    return model


def timed(cmd, env, timeout=None, max_gib=None) -> tuple[int, float, float]:
    """(exit status, peak RSS in MiB, wall seconds) of ``cmd`` under /usr/bin/time; status 124 after ``timeout``
    seconds; ``max_gib`` caps the process's address space (RLIMIT_AS: it fails instead of exhausting the
    machine's memory)."""
    def limit():
        if max_gib:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (int(max_gib * 2**30),) * 2)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], env=env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return 124, float("nan"), time.perf_counter() - t0
    wall = time.perf_counter() - t0
    rss = [line for line in proc.stderr.splitlines() if line.startswith("MAXRSS")]
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
    return proc.returncode, int(rss[-1].split()[1]) / 1024 if rss else float("nan"), wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--nets", nargs="+", default=NETS, choices=NETS)
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="rerun what OUT/results.json already has")
    ap.add_argument("--keep-exports", action="store_true", help="with --redo: predict again with the ONNX exports "
                    "OUT already has (e.g. with another MEDMAMBA_ORT_MEMORY_ARENA)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per export / predict process")
    ap.add_argument("--export-max-gib", type=float, default=None,
                    help="address-space cap of the export process (tracing a long scan holds a lot of memory)")
    ap.add_argument("--data", default=os.environ.get("MEDMAMBA_DATA", str(ROOT.parent / "shared" / "data")))
    args = ap.parse_args()
    out = Path(args.out)
    inp = out / "in"
    inp.mkdir(parents=True, exist_ok=True)
    ct = Path(args.data) / "ibsi_sts" / "STS_002" / "CT_image.nii.gz"
    if not (inp / "STS_002_0000.nii.gz").exists():
        os.symlink(ct, inp / "STS_002_0000.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "nnUNet_def_n_proc": "1",
           "PYTHONWARNINGS": "ignore"}
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    med = [sys.executable, "-m", "medmamba"]
    for net in args.nets:
        model = None
        for rt in args.runtimes:
            key = f"{net}/{rt}"
            if key in results and results[key].get("seconds") and not args.redo:
                continue
            model = model or make_model(out, net)
            m = model
            if rt == "onnxruntime":
                m = out / net / "onnx"
                if not (m / "onnx.json").exists() or (args.redo and not args.keep_exports):
                    rc, rss, wall = timed([*med, "export", str(model), "--format", "onnx", str(m), "--overwrite"], env,
                                          args.timeout, args.export_max_gib)
                    if rc:
                        why = f"timed out after {wall:.0f} s" if rc == 124 else f"exit {rc} after {wall:.0f} s"
                        results[key] = {"error": f"export failed ({why})", "export_seconds": round(wall, 1),
                                        "export_max_gib": args.export_max_gib}
                        (out / "results.json").write_text(json.dumps(results, indent=2))
                        print(key, results[key], flush=True)
                        continue
                    results[f"{net}/export"] = {"seconds": round(wall, 1), "peak_rss_mib": round(rss)}
            pred = out / net / f"pred_{rt}"
            rc, rss, wall = timed([*med, "predict", "--model", str(m), "--input", str(inp), "--output", str(pred),
                                   "--device", "cpu", "--runtime", rt, "--no-mirroring", "--quiet", "--overwrite"],
                                  env, args.timeout)
            log = json.loads((pred / "predict_log.json").read_text()) if (pred / "predict_log.json").exists() else {}
            secs = log.get("cases", {}).get("STS_002", {}).get("seconds")
            results[key] = {"seconds": secs, "peak_rss_mib": round(rss), "process_seconds": round(wall, 1),
                            "status": rc, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "threads": args.threads}
            print(key, results[key], flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results) -> str:
    base = {rt: results.get(f"plain/{rt}", {}).get("seconds") for rt in ("torch", "onnxruntime")}
    rows = ["| network | runtime | seconds | x PlainConvUNet (same runtime) | peak RSS (MiB) | ONNX export s |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for net in NETS:
        for rt in ("torch", "onnxruntime"):
            r = results.get(f"{net}/{rt}")
            if r is None:
                continue
            ratio = f"{r['seconds'] / base[rt]:.2f}" if r.get("seconds") and base.get(rt) else ""
            exp = results.get(f"{net}/export", {}).get("seconds", "") if rt == "onnxruntime" else ""
            secs = r.get("seconds") if r.get("seconds") else r.get("error", f"failed ({r.get('status')})")
            rows.append(f"| {NAMES[net]} | {'PyTorch eager' if rt == 'torch' else 'ONNX Runtime'} | {secs} | "
                        f"{ratio} | {r.get('peak_rss_mib', '')} | {exp} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
