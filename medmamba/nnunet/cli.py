"""``medmamba nnunet-env`` and ``medmamba plan`` (registered on the main CLI by ``add_parsers``)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers"]


def cmd_nnunet_env(args) -> int:
    from medmamba.nnunet import env

    if args.quiet:
        print(env.export_line(args.shell))
        return 0
    print(env.describe())
    print()
    print("nnU-Net finds trainers outside its package only through nnUNet_extTrainer. The startup hook sets it in")
    print("every Python process; without it (or to be explicit) add this line to your shell profile:")
    print()
    print("  " + env.export_line(args.shell))
    return 0


def cmd_plan(args) -> int:
    from medmamba.nnunet.presets import PresetError, load_preset, write_preset_plans

    try:
        path = write_preset_plans(args.dataset, args.arch, source_plans=args.source_plans,
                                  configurations=args.configurations, overwrite=args.overwrite,
                                  preprocessed_dir=args.preprocessed, patch_size=args.patch_size,
                                  batch_size=args.batch_size, n_stages=args.n_stages,
                                  features_per_stage=args.features, output_name=args.name)
    except PresetError as exc:
        print(f"medmamba plan: {exc}", file=sys.stderr)
        return 2
    preset = load_preset(args.arch)
    conf = (args.configurations or ["3d_fullres"])[0]
    print(f"wrote {path}")
    print(f"train with:  nnUNetv2_train {path.parent.name} {conf} 0 -tr {preset['trainer']} -p {path.stem}")
    print(f"   or with nnU-Net's own trainer:  nnUNetv2_train {path.parent.name} {conf} 0 -p {path.stem}")
    return 0


def add_parsers(sub) -> None:
    """Add the ``nnunet-env`` and ``plan`` subcommands to the main parser's subparsers."""
    p = sub.add_parser("nnunet-env", help="how nnU-Net finds medmamba's trainers; prints the manual "
                                          "nnUNet_extTrainer set-up")
    p.add_argument("--shell", choices=("sh", "cmd"), default="sh", help="syntax of the printed line (default sh)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the export line (for eval)")
    p.set_defaults(func=cmd_nnunet_env)

    from medmamba.nnunet.presets import available_presets

    try:
        archs = available_presets()
    except Exception:  # broken install: let `plan` report it
        archs = None
    p = sub.add_parser("plan", help="write nnUNetPlans_<arch>.json (an nnU-Net plans preset for one of our networks) "
                                    "next to the dataset's nnUNetPlans.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", help="dataset id (901) or name (Dataset901_Sarcoma) in $nnUNet_preprocessed")
    p.add_argument("--arch", required=True, choices=archs, help="architecture")
    p.add_argument("--source-plans", default="nnUNetPlans", help="plans file (stem) to start from")
    p.add_argument("-c", "--configurations", nargs="+", default=None,
                   help="configurations to adapt (default: all)")
    p.add_argument("--name", default=None, help="plans name (file stem) to write; default <source-plans>_<arch>")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--preprocessed", default=None, help="nnU-Net preprocessed folder (default $nnUNet_preprocessed)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None,
                   help="override the patch size (e.g. a reduced CPU preset: 32 64 64)")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    p.add_argument("--n-stages", type=int, default=None,
                   help="keep only the first N stages (networks that follow the plans' topology: U-Mamba)")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="override the channels per stage (U-Mamba only), e.g. 8 16 32 64 for a CPU smoke test")
    p.set_defaults(func=cmd_plan)
