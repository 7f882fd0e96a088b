"""``medmamba weights import --from SOURCE CKPT --arch NAME OUT``: published checkpoint -> our state dict."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("weights", help="convert published checkpoints into medmamba state dicts")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    from medmamba.weights.convert import SOURCES
    q = wsub.add_parser(
        "import", help="convert an official checkpoint (nnU-Net fork checkpoint_final.pth, repository .pth, "
                       "VMamba ImageNet weights) into a state dict of ours that loads strictly",
        description="Writes {'network_weights': state dict, 'medmamba_weights': {...}}: what nnUNetv2_train "
                    "-pretrained_weights and `medmamba bundle create --checkpoint` read. Exit 2 on an unreadable "
                    "or unfitting checkpoint (one line, naming the file and the keys). Sources -> --arch: "
                    "umamba -> umamba_bot|umamba_enc; lightm_unet -> lightm_unet; swin_umamba, vmamba -> "
                    "swin_umamba|swin_umamba_d (Swin-UMamba-D checkpoints: --from swin_umamba --arch swin_umamba_d); "
                    "msvm_unet -> msvm_unet; mhs_vm -> vm_unet_mhs; vm_unet -> vm_unet_mhs with mixer 'ss2d' (a "
                    "trained VMUNet checkpoint, or the VMamba ImageNet weights VM-UNet's load_from reads, mapped as "
                    "load_from maps them). --spatial-dims 3 on the 2D-only networks (swin_umamba, swin_umamba_d, "
                    "vmamba, msvm_unet, mhs_vm, vm_unet) inflates the 2D weights (docs/model_card.md); tensors without "
                    "a 3D rule keep their seeded initialisation and are listed in the notes. mambamim -> hymamba "
                    "(MambaMIM's published encoder weights, its pretraining file or a fine-tuned HyMamba; an "
                    "encoder-only file leaves the decoder seeded, --out-channels classes).")
    q.add_argument("--from", dest="source", required=True, choices=list(SOURCES), help="whose checkpoint CKPT is (see the description for the --arch each converts to)")
    q.add_argument("ckpt", metavar="CKPT", help="the published checkpoint")
    q.add_argument("--arch", required=True, help="our registry name, e.g. umamba_bot, swin_umamba")
    q.add_argument("out", metavar="OUT", help="output file (.pth)")
    q.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None,
                   help="3 on a 2D-only network inflates its weights (swin_umamba, vmamba, msvm_unet, mhs_vm, "
                        "vm_unet; see docs/model_card.md); default: the checkpoint's")
    q.add_argument("--inflate", choices=("average", "centre"), default="average",
                   help="2D -> 3D rule for odd conv kernels (default average)")
    q.add_argument("--net-kwargs", default="{}", help="JSON keywords for our network (e.g. strides, patch_size)")
    q.add_argument("--in-channels", type=int, default=None,
                   help="input channels of our network. Encoder-only sources (vmamba): default 1. Checkpoints that "
                        "fix them (e.g. 3-channel MSVM-UNet / VM-UNet / MHS-VM weights): default the checkpoint's; "
                        "1 folds the input weights by summing them, which computes on a 1-channel image what the "
                        "checkpoint computes on it repeated to 3 channels (what the official forwards do)")
    q.add_argument("--out-channels", type=int, default=2, help="encoder-only sources (vmamba, mambamim, and vm_unet given VMamba ImageNet "
                        "weights): classes")
    q.add_argument("--seed", type=int, default=0, help="seed of the parts the checkpoint does not hold")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from medmamba.weights.convert import CheckpointError, convert, save

    def fail(msg: str) -> int:
        print(f"medmamba weights import: error: {msg}", file=sys.stderr)
        return 2

    try:
        net_kwargs = json.loads(args.net_kwargs)
        if not isinstance(net_kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return fail(f"--net-kwargs: {exc}")
    from pathlib import Path
    if Path(args.out).exists() and not args.overwrite:
        return fail(f"{args.out} exists; pass --overwrite to replace it")
    try:
        conv = convert(args.source, args.ckpt, args.arch, spatial_dims=args.spatial_dims, net_kwargs=net_kwargs,
                       seed=args.seed, inflate=args.inflate, in_channels=args.in_channels,
                       out_channels=args.out_channels)
        out = save(conv, args.out, overwrite=args.overwrite, source=args.source, ckpt_name=str(args.ckpt))
    except CheckpointError as exc:
        return fail(str(exc))
    print(f"medmamba weights: {args.ckpt} ({args.source}) -> {out}: {args.arch}, {conv.spatial_dims}D, "
          f"{conv.in_channels} -> {conv.out_channels} channels, {len(conv.state_dict)} tensors; net kwargs "
          f"{json.dumps(conv.net_kwargs)}")
    for note in conv.notes:
        print(f"  note: {note}")
    return 0
