"""The ``medmamba`` command line."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def scan_check(backend: str, device: str, batch=2, dim=8, length=300, dstate=16) -> dict:
    """One selective scan (forward and backward) on this backend/device against the float64 reference."""
    import torch

    from medmamba.kernels import selective_scan, selective_scan_ref

    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, dim, length, generator=g) for _ in range(3))
    A = -(torch.rand(dim, dstate, generator=g) + 0.5)
    B, C = (torch.randn(batch, dstate, length, generator=g) for _ in range(2))
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    xs = [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]

    def run(fn, **kw):
        y = fn(*xs[:5], D=xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, **kw)
        return y, torch.autograd.grad(y.square().sum(), xs)

    start = time.perf_counter()
    y, grads = run(selective_scan, backend=backend)
    seconds = time.perf_counter() - start
    y_ref, grads_ref = run(selective_scan_ref)
    err_y = (y - y_ref).abs().max().item()
    err_g = max(((a - b).abs().max() / (b.abs().max() + 1)).item() for a, b in zip(grads, grads_ref))
    return {"max_abs_err_y": err_y, "max_rel_err_grad": err_g, "seconds": round(seconds, 3),
            "ok": err_y < 2e-3 and err_g < 2e-3}


def _check_in_subprocess(backend, device, env_extra):
    # the interpreter is slow: a shorter scan, still crossing several 64-step tiles
    code = ("import json; from medmamba.cli import scan_check; "
            f"print(json.dumps(scan_check({backend!r}, {device!r}, batch=1, dim=4, length=150)))")
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cmd_check(args) -> int:
    import torch

    from medmamba import __version__
    from medmamba.kernels import triton_available

    print(f"medmamba {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for dist in ("torch", "torchvision", "triton", "monai", "nnunetv2", "dynamic-network-architectures",
                 "SimpleITK", "nibabel", "tensorboard"):
        print(f"  {dist:31s} {_version(dist)}")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print("selective-scan backends (forward + backward, (batch, dim, L, N) = (2, 8, 300, 16), interpreter "
          "(1, 4, 150, 16), against the float64 reference):")
    rows = [("torch", "cpu", None)]
    if cuda:
        rows += [("torch", "cuda", None)]
        ok, why = triton_available("cuda")
        rows += [("triton", "cuda", None) if ok else ("triton", "cuda", why)]
    else:
        rows += [("triton", "cuda", "CUDA is not available")]
    rows += [("triton", "cpu", "interpreter")]
    failed = False
    for backend, device, note in rows:
        label = f"{backend:7s} {device:5s}" + (" (TRITON_INTERPRET=1)" if note == "interpreter" else "")
        if note not in (None, "interpreter"):
            print(f"  {label:36s} unavailable: {note}")
            continue
        if note == "interpreter":
            res = _check_in_subprocess(backend, device, {"TRITON_INTERPRET": "1"})
        else:
            try:
                res = scan_check(backend, device)
            except Exception as exc:  # report, do not crash: this command diagnoses installs
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if "error" in res:
            print(f"  {label:36s} FAILED: {res['error']}")
        else:
            print(f"  {label:36s} {'ok' if res['ok'] else 'WRONG'}  max|y-ref| {res['max_abs_err_y']:.1e}  "
                  f"grad rel err {res['max_rel_err_grad']:.1e}  {res['seconds']:.2f} s")
        failed |= not res["ok"]
    print("check: " + ("FAILED" if failed else "all available backends agree with the reference"))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="medmamba", description="Mamba segmentation networks for nnU-Net and MONAI")
    sub = parser.add_subparsers(dest="command", required=True)
    from medmamba import bundle, demo, evaluate, predict
    from medmamba.nnunet import cli as nnunet_cli
    from medmamba.pretrain import cli as pretrain_cli

    demo.add_parser(sub)
    p = sub.add_parser("check", help="versions, which scan backends work here, one scan per backend vs the reference")
    p.set_defaults(func=cmd_check)
    pretrain_cli.add_parser(sub)
    nnunet_cli.add_parsers(sub)
    bundle.add_parser(sub)
    evaluate.add_parser(sub)
    predict.add_parser(sub)
    __import__("medmamba.weights.cli", fromlist=["add_parser"]).add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
