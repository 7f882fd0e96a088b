"""``medmamba pretrain``: argument parsing (kept import-light; the work is in ``train.py``)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``pretrain`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "pretrain", help="MambaMIM self-supervised pretraining on folders of CT (NIfTI / DICOM)",
        description="MambaMIM masked-image-modelling pretraining of a segmentation network's encoder on CT. "
                    "Runs on several GPUs/nodes under torchrun (e.g. torchrun --nproc_per_node 4 -m medmamba "
                    "pretrain ...; docs/distributed.md). Writes OUT/checkpoint_final.pth whose network_weights load strictly into the segmentation "
                    "network (nnU-Net: -pretrained_weights OUT/checkpoint_final.pth). See docs/pretraining.md.")
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="folder searched recursively for CT NIfTI files and DICOM series (repeatable)")
    p.add_argument("--arch", required=True, help="network: umamba_bot, umamba_enc or swin_umamba")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (checkpoints, TensorBoard)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), help="crop size (default 96 96 96, or the plans')")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="target spacing in mm (default 1.5 1.5 1.5, or the plans')")
    p.add_argument("--batch-size", type=int, default=2,
                   help="crops per process and step (default 2); under torchrun the global batch is this x processes")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    p.add_argument("--plans", metavar="nnUNetPlans.json", help="nnU-Net plans: network, patch, spacing, normalisation")
    p.add_argument("--configuration", default="3d_fullres", help="plans configuration (default 3d_fullres)")
    p.add_argument("--out-channels", type=int, help="classes of the downstream network (default 2, or the plans' dataset.json)")
    p.add_argument("--net-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra network constructor keywords, e.g. \'{"features_per_stage": [16, 32, 64, 128, 256]}\'')
    p.add_argument("--resume", action="store_true", help="continue the run in OUT")
    p.add_argument("--overwrite", action="store_true", help="delete the checkpoints/TensorBoard logs in OUT and start again")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--lr-scaling", choices=("none", "linear", "sqrt"), default="none",
                   help="scale --lr by (global batch / --lr-base-batch), linearly or by its square root (default none)")
    p.add_argument("--lr-base-batch", type=int, default=2, help="the global batch --lr is meant for (default 2)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="final learning rate of the cosine (default 1e-6)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="linear warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.04, help="AdamW weight decay (start of the schedule)")
    p.add_argument("--weight-decay-end", type=float, default=0.2,
                   help="weight decay at the end of the cosine schedule (default 0.2; negative: constant)")
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--decoder-width", type=int, default=768, help="light decoder width at the bottleneck (default 768)")
    p.add_argument("--samples-per-volume", type=int, default=4, help="random crops per loaded volume (default 4)")
    p.add_argument("--workers", type=int, help="data loader processes (default min(8, CPUs); 0: in-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="use only NIfTI files matching GLOB (relative path or file name; bypasses the name rules)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip NIfTI files / DICOM folders matching GLOB")
    p.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars every N steps")
    p.add_argument("--image-every", type=int, default=100, help="TensorBoard image slices every N steps")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint_latest.pth every N steps")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", dest="no_progress", action="store_true",
                   help="same as --no-progress (the bar shows steps/s, ETA, loss, lr, crops/s)")
    p.set_defaults(func=cmd_pretrain)
    return p


def cmd_pretrain(args) -> int:
    from medmamba.pretrain.train import PretrainConfig, run_pretraining

    cfg = PretrainConfig(
        data=args.data, arch=args.arch, out=args.out, patch=args.patch, spacing=args.spacing,
        batch_size=args.batch_size, steps=args.steps, device=args.device, plans=args.plans,
        configuration=args.configuration, out_channels=args.out_channels, resume=args.resume,
        overwrite=args.overwrite, lr=args.lr, lr_scaling=args.lr_scaling,
        lr_base_batch=args.lr_base_batch, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, weight_decay_end=None if args.weight_decay_end < 0 else args.weight_decay_end,
        grad_clip=args.grad_clip, mask_ratio=args.mask_ratio, decoder_width=args.decoder_width,
        samples_per_volume=args.samples_per_volume, workers=args.workers, seed=args.seed, net_kwargs=args.net_kwargs,
        include=args.include, exclude=args.exclude, log_every=args.log_every, image_every=args.image_every,
        save_every=args.save_every, amp=False if args.no_amp else None, progress=not args.no_progress)
    try:
        summary = run_pretraining(cfg)
    except (ValueError, OSError, RuntimeError, NotImplementedError) as exc:   # OSError: e.g. a read-only --out
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises the same error: say it once
            print(f"medmamba pretrain: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) != 0:
        return 0
    rate = summary["crops_per_s"]
    print(f"pretrained {summary['steps']} steps (from step {summary['start_step']}) on {summary['volumes']} CT "
          f"volume(s), {summary['device']}" + (f", {rate:.2f} crops/s" if rate else "")
          + (f", {summary['world_size']} processes (global batch {summary['global_batch_size']})"
             if summary.get("world_size", 1) > 1 else "")
          + f"; network weights: {summary['final_checkpoint']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="medmamba-pretrain")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
