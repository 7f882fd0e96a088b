"""``medmamba bundle create|run|verify``: argument parsing only; the work is in create.py and run.py."""
from __future__ import annotations

import json
import pickle
import sys

from medmamba.monai.checks import BundleError
from medmamba.monai.create import create_bundle
from medmamba.monai.run import run_bundle, verify_bundle


def add_parser(subparsers) -> None:
    """Register ``medmamba bundle create|run|verify`` on the ``medmamba`` CLI's subparsers."""
    p = subparsers.add_parser("bundle", help="MONAI bundles: create, run, verify")
    sub = p.add_subparsers(dest="bundle_command", required=True)

    c = sub.add_parser("create", help="write a MONAI bundle for a medmamba network")
    c.add_argument("out", help="bundle folder to create")
    c.add_argument("--arch", help="network registry name (medmamba.nets.available())")
    c.add_argument("--in-channels", type=int)
    c.add_argument("--out-channels", type=int, help="classes including background")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="nnU-Net fold checkpoint (checkpoint_final.pth) or a plain state dict")
    src.add_argument("--random-init", action="store_true", help="random weights: smoke tests only")
    c.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window ROI (default 96 96 96)")
    c.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing, mm (RAS order)")
    c.add_argument("--intensity", choices=("ct", "mri"))
    c.add_argument("--ct-window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LO", "HI"),
                   help="HU window scaled to [0, 1] for --intensity ct (default -1000 1000)")
    c.add_argument("--net-kwargs", default="{}", help="JSON object of extra network keyword arguments")
    c.add_argument("--labels", nargs="+", help="class names, background first")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.set_defaults(func=_cmd_create)

    r = sub.add_parser("run", help="segment every NIfTI in INPUT with a bundle (monai.bundle run + input checks)")
    r.add_argument("bundle")
    r.add_argument("input", help="folder of NIfTI files, or one file")
    r.add_argument("output", help="output folder")
    r.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: CUDA if available)")
    r.add_argument("--overwrite", action="store_true", help="replace existing <case>_seg.nii.gz outputs")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser("verify", help="check the metadata keys and run MONAI's verify_net_in_out")
    v.add_argument("bundle")
    v.set_defaults(func=_cmd_verify)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _cmd_create(args) -> int:
    try:
        kwargs = json.loads(args.net_kwargs)
        if not isinstance(kwargs, dict):
            raise BundleError("--net-kwargs must be a JSON object")
        out = create_bundle(args.out, args.arch, args.in_channels, args.out_channels, checkpoint=args.checkpoint,
                            random_init=args.random_init, roi=args.roi, spacing=args.spacing,
                            intensity=args.intensity, ct_window=args.ct_window, net_kwargs=kwargs,
                            labels=args.labels, overwrite=args.overwrite)
    except (BundleError, json.JSONDecodeError) as exc:
        return _fail(exc)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        # a garbage --checkpoint, an unwritable parent folder, a network that cannot be built
        from medmamba.clinic.validate import error_message

        return _fail(BundleError(f"bundle create {args.out}: {error_message(exc)}"))
    print(f"bundle written to {out}")
    return 0


def _cmd_run(args) -> int:
    try:
        status = run_bundle(args.bundle, args.input, args.output, device=args.device, overwrite=args.overwrite)
    except (BundleError, FileNotFoundError) as exc:
        return _fail(exc)
    except ValueError as exc:
        if "bad input image" in str(exc) or "no NIfTI files" in str(exc):
            return _fail(exc)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    bad = {f: s for f, s in status.items() if s != "ok"}
    for f, s in bad.items():
        print(f"{s.split(':')[0].upper()} {f}: {s.split(': ', 1)[1]}", file=sys.stderr)
    print(f"{len(status) - len(bad)}/{len(status)} image(s) segmented into {args.output}")
    return 1 if bad else 0


def _cmd_verify(args) -> int:
    try:
        verify_bundle(args.bundle)
    except BundleError as exc:
        return _fail(exc)
    print("bundle verified: metadata keys present, network input/output as declared")
    return 0
