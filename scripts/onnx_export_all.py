"""Export every registry network (small widths, random weights) to ONNX and compare ONNX Runtime with PyTorch.

    python scripts/onnx_export_all.py [--size 32] [--out /tmp/onnx_all] [NAME ...]
Prints one line per network: export seconds, file size, max |ORT - torch| relative to max |logit|
(docs/hospital.md section 6 lists the results; the export refuses > 1e-3).
"""
import argparse
import os
import time

import torch

import medmamba.nets as nets
from medmamba.clinic.export import export_network

SMALL = {
    "umamba_bot": dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1),
    "umamba_enc": dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1),
    "lightm_unet": dict(init_filters=8, blocks_down=(1, 1, 1, 1)),
    "swin_umamba": dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4),
    "swin_umamba_d": dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4),
    "msvm_unet": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1)),
    "vm_unet_mhs": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), d_state=4),
    "hymamba": dict(channels=(4, 8, 8, 12, 12), depths=(1, 1, 1, 1, 1), mamba_depth=1, d_state=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=nets.available())
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--out", default="/tmp/onnx_all")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.names:
        torch.manual_seed(0)
        net = nets.create(name, 1, 2, **SMALL.get(name, {}))
        path = os.path.join(args.out, f"{name}.onnx")
        start = time.perf_counter()
        try:
            check = export_network(net, (1, 1, args.size, args.size, args.size), path)
        except Exception as exc:  # report and go on: one line per network
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{name}: {time.perf_counter() - start:.1f} s, {os.path.getsize(path) / 2**20:.1f} MiB, "
              f"relative L2 |diff| {check['relative']:.1e} (max {check['max_relative']:.1e})", flush=True)


if __name__ == "__main__":
    main()
