#!/usr/bin/env python
"""Model card: parameters and GFLOPs of every medmamba network next to nnU-Net's and MONAI's baselines.

Usage:  python scripts/model_card.py [--out docs/model_card.md] [--device meta|cpu] [--only NAME ...]

Prints a markdown table and writes it to ``--out``. Each registry network is built with its defaults
(``medmamba.nets.create(name, 1, N_CLASSES, spatial_dims)``) in 3D at 128^3 and in 2D at 256^2, batch 1;
U-Mamba is also built from the nnU-Net plans that the baselines use, since that is how it is run.
A registry name whose module does not import (or whose default build fails) is listed with the reason.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matmuls (1 multiply-add =
2 FLOPs). It cannot see inside the selective scan, so during counting every ``selective_scan`` reachable
from ``medmamba`` modules is replaced by a stub that returns a tensor of the right shape and adds
9 * batch * dim * L * N FLOPs (discretisation exp(delta A) and delta B u: 4; state update: 2; C . h: 2;
plus ~1 for the softplus/exp bookkeeping, mamba_ssm's own estimate), + batch * dim * L for the D skip
and + batch * dim * L for the z gate when present. Norms, activations, element-wise ops, pooling and
interpolation are not counted by either. The count runs on the ``meta`` device (no memory, no compute);
networks that fail there are counted on the CPU under ``torch.no_grad``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import medmamba.nets  # noqa: E402

N_CLASSES = 4
PATCH = {3: (128, 128, 128), 2: (256, 256)}

# What the papers (or their READMEs) report, from /work/shared/notes/ARCHITECTURES.md and NNUNET.md.
PAPER = {
    "umamba_bot": "3D AbdomenCT DSC 0.8683 vs nnU-Net 0.8615. nnU-Net Revisited (2024): BTCV 83.51 / LiTS "
                  "80.40 / KiTS 86.22, 24 h, 12.4 GB (A100)",
    "umamba_enc": "3D AbdomenMR DSC 0.8501 vs nnU-Net 0.8309. nnU-Net Revisited: BTCV 82.41 / LiTS 80.27 / "
                  "KiTS 86.34, 47 h, 24.9 GB (A100)",
    "lightm_unet": "abstract: ~1M params, 116x fewer params and 21x fewer FLOPs than nnU-Net; released "
                   "default ~5.0M (public issue: 5.01M)",
    "swin_umamba": "+2.72% average DSC over U-Mamba Enc (AbdomenMRI, Endoscopy, Microscopy; 2D)",
    "swin_umamba_d": "variant of Swin-UMamba (4x4 patch embed, Mamba decoder); no number in our notes",
    "msvm_unet": "Synapse DSC 85.00, HD95 14.75 (2D)",
    "vm_unet_mhs": "ISIC18, 4 heads: mIoU 80.85 / DSC 89.41; fewer parameters than VM-UNet (2D)",
    "hymamba": "MambaMIM's network (3D only; pretrained at 96^3 on CT); no number in our notes",
    "PlainConvUNet": "nnU-Net default",
    "ResEnc-M": "nnU-Net Revisited: BTCV 83.31 / LiTS 80.75 / KiTS 86.79, 12 h, 9.1 GB (A100)",
    "SwinUNETR": "",
}


# --------------------------------------------------------------------------------------------------
# selective-scan FLOPs
class ScanCounter(contextlib.AbstractContextManager):
    """Replace every selective-scan entry point found in loaded ``medmamba`` modules by a counting stub."""

    def __init__(self):
        self.flops = 0
        self.calls = 0
        self._patched = []

    def _count(self, u, A, D, z):
        batch, dim, length = u.shape
        n = A.shape[1]
        self.flops += 9 * batch * dim * length * n
        self.flops += batch * dim * length * ((D is not None) + (z is not None))
        self.calls += 1

    def _stub_public(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, **_):
        self._count(u, A, D, z)
        y = torch.zeros_like(u)
        if return_last_state:
            return y, u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        return y

    def _stub_torch(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self._count(u, A, D, z)
        return torch.zeros_like(u), u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)

    def __enter__(self):
        import importlib
        dispatch = importlib.import_module("medmamba.kernels.selective_scan")  # the module, not the function
        reference = importlib.import_module("medmamba.kernels.reference")
        scan_torch = importlib.import_module("medmamba.kernels.scan_torch")
        originals = {
            id(dispatch.selective_scan): self._stub_public,
            id(reference.selective_scan_ref): self._stub_public,
            id(scan_torch.selective_scan_torch): self._stub_torch,
        }
        for name, mod in list(sys.modules.items()):
            if not name.startswith("medmamba") or mod is None:
                continue
            for attr, value in list(vars(mod).items()):
                if callable(value) and id(value) in originals:
                    self._patched.append((mod, attr, value))
                    setattr(mod, attr, originals[id(value)])
        return self

    def __exit__(self, *exc):
        for mod, attr, value in reversed(self._patched):
            setattr(mod, attr, value)
        self._patched.clear()
        return False


def count(net: nn.Module, shape, device: str):
    """(total FLOPs, scan FLOPs) of one forward pass of ``net`` on zeros of ``shape``."""
    x = torch.zeros(shape, device=device)
    net.eval()
    with torch.no_grad(), ScanCounter() as scan, FlopCounterMode(display=False) as fc:
        net(x)
    return fc.get_total_flops() + scan.flops, scan.flops


def measure(build, shape, prefer: str):
    """Build on the CPU, count on ``prefer`` (meta: the module is moved there); fall back to the CPU."""
    try:
        torch.manual_seed(0)
        net = build()
    except Exception as exc:  # noqa: BLE001 - reported in the card
        if os.environ.get("MODEL_CARD_DEBUG"):
            traceback.print_exc()
        return dict(error=f"default build failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    params = sum(p.numel() for p in net.parameters())
    errors = []
    for device in ([prefer, "cpu"] if prefer != "cpu" else ["cpu"]):
        try:
            t0 = time.time()
            flops, scan = count(net.to(device), shape, device)
            return dict(params=params, flops=flops, scan=scan, device=device, seconds=time.time() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{device}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if os.environ.get("MODEL_CARD_DEBUG"):
                traceback.print_exc()
            if device == "meta":  # parameters are gone on meta: rebuild for the CPU count
                torch.manual_seed(0)
                net = build()
    return dict(params=params, error="; ".join(errors))


# --------------------------------------------------------------------------------------------------
# baselines: nnU-Net (dynamic_network_architectures) and MONAI
def nnunet_plans(dims: int, resenc: bool) -> dict:
    """Typical nnU-Net plans for a 128^3 (3d_fullres) / 256^2 (2d) patch; ResEnc-M preset when ``resenc``."""
    n_stages = 6 if dims == 3 else 7
    cap = 320 if dims == 3 else 512
    conv = {3: nn.Conv3d, 2: nn.Conv2d}[dims]
    norm = {3: nn.InstanceNorm3d, 2: nn.InstanceNorm2d}[dims]
    kw = dict(n_stages=n_stages, features_per_stage=[min(32 * 2 ** i, cap) for i in range(n_stages)], conv_op=conv,
              kernel_sizes=[[3] * dims] * n_stages, strides=[[1] * dims] + [[2] * dims] * (n_stages - 1),
              conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
              dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    if resenc:
        kw.update(n_blocks_per_stage=[1, 3, 4, 6, 6, 6, 6][:n_stages], n_conv_per_stage_decoder=[1] * (n_stages - 1))
    else:
        kw.update(n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1))
    return kw


def rows_for(dims: int, only: set | None, prefer: str):
    shape = (1, 1, *PATCH[dims])
    rows = []

    def add(label, key, source, build):
        if only and key not in only and label not in only:
            return
        t0 = time.time()
        result = measure(build, shape, prefer)
        print(f"  {label:<34} {dims}D  {result if 'error' in result else _fmt(result)}  ({time.time() - t0:.1f} s)",
              flush=True)
        rows.append(dict(label=label, key=key, source=source, dims=dims, **result))

    for name in medmamba.nets.available():
        try:
            cls = medmamba.nets.get_class(name)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(label=name, key=name, source="registry default", dims=dims,
                             error=f"module does not import yet ({type(exc).__name__}: {exc})"))
            print(f"  {name:<34} {dims}D  skipped: {rows[-1]['error']}", flush=True)
            continue
        if dims not in getattr(cls, "SPATIAL_DIMS", (2, 3)):  # e.g. HyMamba: 3D only
            continue
        add(name, name, f"registry default (`{cls.__name__}`)",
            lambda name=name: medmamba.nets.create(name, in_channels=1, out_channels=N_CLASSES, spatial_dims=dims))

    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from medmamba.nets.umamba import UMambaBot, UMambaEnc
    plans = "nnU-Net 3d_fullres plans" if dims == 3 else "nnU-Net 2d plans"
    for cls, key in ((UMambaBot, "umamba_bot"), (UMambaEnc, "umamba_enc")):
        add(f"{key} (nnU-Net plans)", key, f"`{cls.__name__}`, {plans}, n_conv 2/2",
            lambda cls=cls: cls(input_channels=1, num_classes=N_CLASSES, deep_supervision=False,
                                patch_size=PATCH[dims], **nnunet_plans(dims, resenc=False)))
    add("PlainConvUNet", "PlainConvUNet", f"dynamic_network_architectures, {plans}",
        lambda: PlainConvUNet(input_channels=1, num_classes=N_CLASSES, deep_supervision=False,
                              **nnunet_plans(dims, resenc=False)))
    add("ResEnc-M", "ResEnc-M", f"`ResidualEncoderUNet`, {plans}, ResEnc-M blocks",
        lambda: ResidualEncoderUNet(input_channels=1, num_classes=N_CLASSES, deep_supervision=False,
                                    **nnunet_plans(dims, resenc=True)))

    def swin():
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(in_channels=1, out_channels=N_CLASSES, feature_size=48, spatial_dims=dims)
    add("SwinUNETR", "SwinUNETR", "MONAI, feature_size 48", swin)
    return rows


def _fmt(r) -> str:
    return (f"{r['params'] / 1e6:.2f} M params, {r['flops'] / 1e9:.1f} GFLOPs (scan {r['scan'] / 1e9:.2f}) "
            f"[{r['device']}]")


def observations(rows) -> list[str]:
    """Measured ratios next to LightM-UNet's claim (116x fewer parameters, 21x fewer FLOPs than nnU-Net)."""
    out = []
    for dims in (3, 2):
        get = {r["label"]: r for r in rows if r["dims"] == dims and "error" not in r}
        light, plain = get.get("lightm_unet"), get.get("PlainConvUNet")
        if light and plain:
            out.append(f"- {dims}D: nnU-Net's PlainConvUNet / LightM-UNet at the same patch: parameters "
                       f"{plain['params'] / light['params']:.1f}x, FLOPs {plain['flops'] / light['flops']:.1f}x "
                       f"(the paper claims 116x and 21x).")
    return out + ([""] if out else [])


def markdown(rows, argv, wall) -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines = [
        "# Model card: parameters and FLOPs",
        "",
        f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by `python scripts/model_card.py"
        f"{' ' + ' '.join(argv) if argv else ''}` on {cpu}, "
        f"{os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()} "
        f"({wall:.0f} s).",
        "",
        f"Batch 1, 1 input channel, {N_CLASSES} output classes; 3D at a 128x128x128 patch, 2D at 256x256. "
        "GFLOPs are per forward pass, one multiply-add = 2 FLOPs, counted with "
        "`torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls, linear layers) plus an analytic "
        "count for each selective-scan call: 9 x batch x dim x L x N, + batch x dim x L each for the D skip and "
        "the z gate (the \"scan\" column; the FLOP counter cannot see inside the scan). Norms, activations, "
        "element-wise ops, pooling and interpolation are not counted. \"Device\" is where the count ran: `meta` "
        "counts shapes without computing. Parameters include the deep-supervision heads, which the "
        "networks always build.",
        "",
        "Registry rows use each class's defaults (`medmamba.nets.create(name, 1, 4, spatial_dims)`); the "
        "\"nnU-Net plans\" rows build U-Mamba from the same plans as the nnU-Net baselines (3D: 6 stages, "
        "32-64-128-256-320-320, strides 1,2,2,2,2,2; 2D: 7 stages, 32..512; U-Mamba's own block schedule on "
        "top), which is how U-Mamba is trained. ResEnc-M: `ResidualEncoderUNet` with blocks 1,3,4,6,6,6(,6) "
        "and 1 decoder block per stage. U-Mamba Enc at 128^3 runs a Mamba layer on all 2,097,152 voxels of "
        "the first stage; its channel-token bottleneck (4^3 = 64 voxels <= 320 channels) follows the paper.",
        "",
        "The last column is what the papers report (not measured here); LightM-UNet's ~1M parameters in its "
        "abstract do not match its released default configuration, which we measure.",
        "",
    ]
    lines += ["Our U-Mamba applies the decoder's 1x1 conv before the nearest upsampling (same output as the "
              "released code, which upsamples first; a few GFLOPs fewer at 128^3).", ""]
    lines += observations(rows)
    for dims in (3, 2):
        lines += [f"## {dims}D ({'x'.join(map(str, PATCH[dims]))})", "",
                  "| network | built as | params (M) | GFLOPs | of which scan | device | papers report |",
                  "|---|---|---:|---:|---:|---|---|"]
        for r in (r for r in rows if r["dims"] == dims):
            paper = PAPER.get(r["key"], "")
            if "error" in r:
                p = f"{r['params'] / 1e6:.2f}" if "params" in r else "n/a"
                lines.append(f"| {r['label']} | {r['source']} | {p} | n/a | n/a | | {paper}<br>**not measured**: "
                             f"{r['error'].replace('|', '/')} |")
            else:
                lines.append(f"| {r['label']} | {r['source']} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.1f} | "
                             f"{r['scan'] / 1e9:.2f} | {r['device']} | {paper} |")
        lines.append("")
    return "\n".join(lines)


FAITHFULNESS_MARKER = "## Faithfulness to the official code"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "model_card.md"))
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"],
                        help="where to count (meta: shapes only; falls back to cpu per network)")
    parser.add_argument("--only", nargs="*", help="registry names / baseline labels to include")
    parser.add_argument("--dims", nargs="*", type=int, default=[3, 2], choices=[2, 3])
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    t0 = time.time()
    rows = []
    for dims in args.dims:
        print(f"{dims}D at {PATCH[dims]}:", flush=True)
        rows += rows_for(dims, set(args.only) if args.only else None, args.device)
    text = markdown(rows, argv, time.time() - t0)
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    kept = ""  # the hand-written faithfulness section (from FAITHFULNESS_MARKER on) survives regeneration
    if os.path.exists(args.out):
        with open(args.out) as fh:
            old = fh.read()
        if FAITHFULNESS_MARKER in old:
            kept = "\n" + old[old.index(FAITHFULNESS_MARKER):].rstrip("\n") + "\n"
    with open(args.out, "w") as fh:
        fh.write(text + "\n" + kept)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
