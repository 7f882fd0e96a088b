"""The ``medmamba`` command line: parsing and dispatch only. Each subcommand's ``add_parser`` and its
work live with the package that owns it (docs/architecture.md)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="medmamba", description="Mamba segmentation networks for nnU-Net and MONAI")
    sub = parser.add_subparsers(dest="command", required=True)
    from medmamba import check, demo
    from medmamba.clinic import evaluate, export, predict
    from medmamba.monai import cli as monai_cli
    from medmamba.nnunet import cli as nnunet_cli
    from medmamba.nnunet import compare
    from medmamba.pretrain import cli as pretrain_cli
    from medmamba.weights import cli as weights_cli

    demo.add_parser(sub)
    check.add_parser(sub)
    pretrain_cli.add_parser(sub)
    nnunet_cli.add_parsers(sub)
    compare.add_parser(sub)
    monai_cli.add_parser(sub)
    evaluate.add_parser(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    weights_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
