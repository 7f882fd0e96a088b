#!/usr/bin/env python
"""The measuring parts of scripts/gpu_validate.py: selective-scan correctness at long L, and one training step
plus one sliding-window inference per network. Each part writes one JSON file; gpu_validate.py runs them in
subprocesses (a crash or a hung kernel in one costs only that step).

    python scripts/gpu_checks.py kernels  --size full --out kernels.json    # GPU sizes (L up to 2^21)
    python scripts/gpu_checks.py kernels  --size tiny --out kernels.json    # CPU rehearsal (TRITON_INTERPRET=1)
    python scripts/gpu_checks.py networks --out networks.json [--networks umamba_bot ...] [--patch 64x128x128]

Every kernel case says what it compared with what (``compare``): the Triton kernels against the float64 loop
reference ``selective_scan_ref`` where that is affordable (L ~ 5000), against an independent float64 chunked
scan written here (forward) and the float32 PyTorch backend (gradients) at L = 2^21, and the routed kernels
against the gather -> scan -> scatter composition on the PyTorch backend. Errors are relative,
||x - ref|| / ||ref|| (and the max absolute error); a case passes under its stated tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

# cuBLAS needs this before CUDA starts for torch.use_deterministic_algorithms(True) (the PyTorch backend
# uses matmul); harmless otherwise.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
for _p in (REPO, SCRIPTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = {"float32": {"y": 1e-4, "grad": 1e-3}, "bfloat16": {"y": 1.5e-2, "grad": 3e-2}}
# Triton against the float32 PyTorch backend: two float32 computations in different orders
TOL_F32_PAIR = {"float32": {"y": 1e-4, "grad": 1e-3}, "bfloat16": {"y": 1.5e-2, "grad": 3e-2}}

SIZES = {
    # GPU: the L up to 2M
    "full": dict(short=(2, 8, 5000), long=(1, 4, 2 ** 21), routed=(1, 8, 2 ** 18, 6, 1), routed_mh=(2, 8, 2 ** 15, 4, 2),
                 det=(2, 32, 2 ** 16), chunk=4096),
    # CPU rehearsal: the same cases at sizes the interpreter runs in seconds (the long case still crosses a tile
    # and a reference chunk; tests/ cover the kernels' tiling on CPU in depth)
    "tiny": dict(short=(1, 4, 40), long=(1, 4, 80), routed=(1, 4, 24, 2, 1), routed_mh=(1, 2, 24, 4, 2),
                 det=(1, 16, 32), chunk=32),
}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_abs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch, dim, length, dstate, dtype, device, groups=0, seed=0):
    """Scan inputs with short and very long memories: half the channels decay over ~50 steps, the other half
    over ~10^4 steps (A near 0, small dt), so states are carried across many tiles."""
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(batch, dim, length, generator=g) for _ in range(3))
    A = -(torch.rand(dim, dstate, generator=g) + 0.5)
    A[dim // 2:] = -(torch.rand(dim - dim // 2, dstate, generator=g) * 1e-2 + 1e-3)
    bc_shape = (batch, groups, dstate, length) if groups else (batch, dstate, length)
    B, C = (torch.randn(*bc_shape, generator=g) for _ in range(2))
    D = torch.randn(dim, generator=g)
    bias = torch.full((dim,), -4.0) + 0.1 * torch.randn(dim, generator=g)  # softplus(-4) ~ 0.018
    cast = {"u": dtype, "delta": dtype, "z": dtype, "B": dtype, "C": dtype}
    xs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    return {k: v.to(device=device, dtype=cast.get(k, torch.float32)) for k, v in xs.items()}


def weights_like(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g).to(y.device)


def run_scan(fn, xs, w, grads=True, **kw):
    """y and the gradients of sum(w * y) in every input (fresh leaves, so runs never share state)."""
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in xs.items()}
    y = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
           delta_bias=leaves["delta_bias"], delta_softplus=True, **kw)
    if not grads:
        return y.detach(), None
    gs = torch.autograd.grad((y.float() * w).sum(), [leaves[k] for k in GRAD_NAMES])
    return y.detach(), dict(zip(GRAD_NAMES, gs))


def compare(y, g, y_ref, g_ref, tol) -> dict:
    out = {"y_rel": rel(y, y_ref), "y_max_abs": max_abs(y, y_ref)}
    if g is not None and g_ref is not None:
        out["grad_rel"] = {k: rel(g[k], g_ref[k]) for k in g}
        out["grad_rel_max"] = max(out["grad_rel"].values())
    finite = bool(torch.isfinite(y).all()) and (g is None or all(bool(torch.isfinite(v).all()) for v in g.values()))
    out["finite"] = finite
    out["tol"] = tol
    out["ok"] = finite and out["y_rel"] <= tol["y"] and out.get("grad_rel_max", 0.0) <= tol["grad"]
    return out


def scan_f64(u, delta, A, B, C, D, z, delta_bias, chunk=4096):
    """Independent float64 forward (delta_softplus=True): chunks of ``chunk`` steps, each solved by a doubling
    scan, the state carried between chunks. Memory O(batch*dim*chunk*N), so L = 2^21 fits; checked against the
    loop reference ``selective_scan_ref`` at short L in every run (case ``f64_chunked_self_check``)."""
    u, delta, A, B, C, D, z, bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    rep = dim // B4.shape[1]
    dt = F.softplus(delta + bias[:, None])
    h0 = u.new_zeros(batch, dim, A.shape[1])
    y = torch.empty_like(u)
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        a = torch.exp(dt[:, :, s:e, None] * A[None, :, None, :])                      # (b, d, T, N)
        Bc = B4[..., s:e].repeat_interleave(rep, dim=1).transpose(-1, -2)             # (b, d, T, N)
        Cc = C4[..., s:e].repeat_interleave(rep, dim=1).transpose(-1, -2)
        b = (dt[:, :, s:e] * u[:, :, s:e])[..., None] * Bc
        k, T = 1, e - s
        while k < T:  # Hillis-Steele: after the pass with offset k, (a, b) cover 2k steps
            b = torch.cat([b[:, :, :k], b[:, :, k:] + a[:, :, k:] * b[:, :, :-k]], 2)
            a = torch.cat([a[:, :, :k], a[:, :, k:] * a[:, :, :-k]], 2)
            k *= 2
        h = b + a * h0[:, :, None]
        y[:, :, s:e] = (h * Cc).sum(-1)
        h0 = h[:, :, -1]
    return (y + D[:, None] * u) * F.silu(z)


def case(name, fn, results, only=None):
    """Run one case; a failure is recorded with its error and does not stop the others."""
    if only and not any(name.startswith(o) for o in only):
        return
    t0 = time.perf_counter()
    print(f"  kernels: {name} ...", flush=True)
    try:
        res = fn()
    except Exception as exc:  # noqa: BLE001 - every case reports
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["name"] = name
    results.append(res)
    summary = "ok" if res.get("ok") else ("FAILED: " + res.get("error", "over tolerance"))
    nums = ", ".join(f"{k} {res[k]:.1e}" for k in ("y_rel", "grad_rel_max") if isinstance(res.get(k), float))
    print(f"  kernels: {name}: {summary} {nums} ({res['seconds']} s)", flush=True)


def kernel_checks(size: str, device: torch.device, only=None) -> dict:
    """Every case (or those whose names start with one of ``only``)."""
    from medmamba.kernels import selective_scan, selective_scan_ref

    S = SIZES[size]
    results: list[dict] = []
    N = 16

    def vs_ref(dtype, groups=0):
        def fn():
            b, d, L = S["short"]
            xs = make_inputs(b, d, L, N, dtype, device, groups=groups)
            w = weights_like(xs["u"])
            y, g = run_scan(selective_scan, xs, w, backend="triton")
            y_ref, g_ref = run_scan(selective_scan_ref, xs, w)
            res = compare(y, g, y_ref, g_ref, TOL[str(dtype).split(".")[-1]])
            res.update(compare_what="Triton selective_scan vs selective_scan_ref (float64 loop over L; "
                                    "gradients by autograd through it)",
                       shape=dict(batch=b, dim=d, L=L, N=N, groups=groups or 1), dtype=str(dtype).split(".")[-1])
            return res
        return fn

    for dtype in (torch.float32, torch.bfloat16):
        case(f"short_{str(dtype)[6:]}_vs_f64_loop", vs_ref(dtype), results, only)
    case("short_grouped_fp32_vs_f64_loop", vs_ref(torch.float32, groups=2), results, only)

    def torch_backend():
        b, d, L = S["short"]
        xs = make_inputs(b, d, L, N, torch.float32, device, groups=2, seed=3)
        w = weights_like(xs["u"])
        y, g = run_scan(selective_scan, xs, w, backend="torch")
        y_ref, g_ref = run_scan(selective_scan_ref, xs, w)
        res = compare(y, g, y_ref, g_ref, TOL["float32"])
        res.update(compare_what="PyTorch-backend selective_scan (the long-L second opinion) vs selective_scan_ref",
                   shape=dict(batch=b, dim=d, L=L, N=N, groups=2), dtype="float32")
        return res

    case("short_torch_backend_vs_f64_loop", torch_backend, results, only)

    def self_check():
        b, d, L = S["short"]
        xs = make_inputs(b, d, L, N, torch.float32, device, groups=2, seed=4)
        y = scan_f64(**xs, chunk=max(16, L // 3))
        x64 = {k: v.double() for k, v in xs.items()}  # the loop reference returns y in u's dtype
        y_ref = selective_scan_ref(x64["u"], x64["delta"], x64["A"], x64["B"], x64["C"], D=x64["D"], z=x64["z"],
                                   delta_bias=x64["delta_bias"], delta_softplus=True)
        res = {"y_rel": rel(y, y_ref), "y_max_abs": max_abs(y, y_ref), "tol": {"y": 1e-12}}
        res["ok"] = res["y_rel"] <= 1e-12
        res.update(compare_what="this script's float64 chunked scan (the long-L reference) vs selective_scan_ref",
                   shape=dict(batch=b, dim=d, L=L, N=N, groups=2), dtype="float64")
        return res

    case("f64_chunked_self_check", self_check, results, only)

    def long_l(dtype):
        def fn():
            b, d, L = S["long"]
            name = str(dtype).split(".")[-1]
            xs = make_inputs(b, d, L, N, dtype, device, seed=5)
            w = weights_like(xs["u"])
            y, g = run_scan(selective_scan, xs, w, backend="triton")
            sync(device)
            y64 = scan_f64(**xs, chunk=S["chunk"])
            fwd = compare(y, None, y64, None, TOL[name])
            y32, g32 = run_scan(selective_scan, xs, w, backend="torch")
            pair = compare(y, g, y32, g32, TOL_F32_PAIR[name])
            res = {"y_rel": fwd["y_rel"], "y_max_abs": fwd["y_max_abs"], "grad_rel": pair["grad_rel"],
                   "grad_rel_max": pair["grad_rel_max"], "y_rel_vs_torch_backend": pair["y_rel"],
                   "torch_backend_y_rel_vs_f64": rel(y32, y64), "finite": fwd["finite"] and pair["finite"],
                   "tol": TOL[name]}
            res["ok"] = res["finite"] and fwd["ok"] and pair["ok"]
            res.update(compare_what="forward: Triton vs this script's float64 chunked scan; gradients: Triton vs the "
                                    "float32 PyTorch backend on the same inputs (no float64 backward at this L)",
                       shape=dict(batch=b, dim=d, L=L, N=N, groups=1), dtype=name)
            return res
        return fn

    for dtype in (torch.float32, torch.bfloat16):
        case(f"long_L_{str(dtype)[6:]}", long_l(dtype), results, only)

    def routed(key, dtype):
        def fn():
            from medmamba.kernels.routed_scan import routed_selective_scan, routed_selective_scan_composed
            b, dc, L, R, K = S[key]
            g = torch.Generator().manual_seed(7)
            xs = make_inputs(b, R * dc, L, N, dtype, device, groups=R, seed=7)
            u = xs["u"][:, :K * dc].contiguous()
            rows = [torch.arange(L), torch.arange(L).flip(0)] + [torch.randperm(L, generator=g) for _ in range(R - 2)]
            index = torch.stack(rows[:R]).to(device)
            args = dict(u=u, delta=xs["delta"], A=xs["A"], B=xs["B"], C=xs["C"], D=xs["D"],
                        delta_bias=xs["delta_bias"])
            w = torch.randn(b, R, dc, L, generator=g).to(device)

            def go(f, **kw):
                leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()}
                y = f(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], index, D=leaves["D"],
                      delta_bias=leaves["delta_bias"], delta_softplus=True, **kw)
                gs = torch.autograd.grad((y.float() * w).sum(), list(leaves.values()))
                return y.detach(), dict(zip(leaves, gs))

            y, gr = go(routed_selective_scan, backend="triton")
            y_ref, g_ref = go(routed_selective_scan_composed, backend="torch")
            res = compare(y, gr, y_ref, g_ref, TOL_F32_PAIR[str(dtype).split(".")[-1]])
            res.update(compare_what="fused routed Triton scan vs routed_selective_scan_composed (gather -> PyTorch-"
                                    "backend scan in float32 -> scatter); routes: identity, reversed, random "
                                    "permutations",
                       shape=dict(batch=b, routes=R, heads_K=K, Dc=dc, L=L, N=N), dtype=str(dtype).split(".")[-1])
            return res
        return fn

    case("routed_fp32", routed("routed", torch.float32), results, only)
    case("routed_bf16", routed("routed", torch.bfloat16), results, only)
    case("routed_multi_head_fp32", routed("routed_mh", torch.float32), results, only)

    def determinism():
        from medmamba.kernels import scan_triton
        b, d, L = S["det"]
        xs = make_inputs(b, d, L, N, torch.float32, device, seed=9)
        w = weights_like(xs["u"])
        was = torch.are_deterministic_algorithms_enabled()
        try:
            torch.use_deterministic_algorithms(True)
            runs = [run_scan(selective_scan, xs, w, backend="triton") for _ in range(2)]
        finally:
            torch.use_deterministic_algorithms(was)
        bitwise = torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(runs[0][1][k], runs[1][1][k])
                                                              for k in GRAD_NAMES)
        res = {"deterministic_bitwise_repeatable": bitwise}
        y32, g32 = run_scan(selective_scan, xs, w, backend="torch")
        det = compare(runs[0][0], runs[0][1], y32, g32, TOL_F32_PAIR["float32"])
        res["deterministic_vs_torch_backend"] = {k: det[k] for k in ("y_rel", "grad_rel_max", "grad_rel")}
        ok = bitwise and det["ok"]
        # atomic backward: several programs share a group's channels and reduce dB/dC with atomics
        fn = getattr(scan_triton, "selective_scan_triton", None)
        if fn is None:
            res["atomic"] = "skipped: medmamba.kernels.scan_triton.selective_scan_triton is gone"
        else:
            B4, C4 = xs["B"].unsqueeze(1), xs["C"].unsqueeze(1)
            xs4 = dict(xs, B=B4, C=C4)

            def atomic_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
                return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, parts=4)[0]

            cfg = getattr(scan_triton, "_launch_config", None)
            if cfg is not None:
                try:
                    res["atomic_parts_per_group"] = cfg(b, d, N, L, 1, device, None, 4)["parts_per_group"]
                except Exception as exc:  # noqa: BLE001 - informative only
                    res["atomic_parts_per_group"] = f"unknown ({exc})"
            a1 = run_scan(atomic_scan, xs4, w)
            a2 = run_scan(atomic_scan, xs4, w)
            at = compare(a1[0], {k: v.reshape(g32[k].shape) for k, v in a1[1].items()}, y32, g32,
                         TOL_F32_PAIR["float32"])
            res["atomic_vs_torch_backend"] = {k: at[k] for k in ("y_rel", "grad_rel_max", "grad_rel")}
            res["atomic_vs_deterministic_grad_rel_max"] = max(
                rel(a1[1][k].reshape(runs[0][1][k].shape), runs[0][1][k]) for k in GRAD_NAMES)
            res["atomic_bitwise_repeatable"] = all(torch.equal(a1[1][k], a2[1][k]) for k in GRAD_NAMES)
            ok = ok and at["ok"]
        res["y_rel"] = det["y_rel"]
        res["grad_rel_max"] = max(det["grad_rel_max"], res.get("atomic_vs_torch_backend", {}).get("grad_rel_max", 0.0))
        res["ok"] = ok
        res.update(compare_what="Triton backward under torch.use_deterministic_algorithms(True) run twice (must be "
                                "bitwise equal) and with parts=4 (atomic dB/dC reduction), both vs the float32 "
                                "PyTorch backend; atomic runs need not be bitwise equal (reported)",
                   shape=dict(batch=b, dim=d, L=L, N=N, groups=1), dtype="float32")
        return res

    case("deterministic_and_atomic_backward", determinism, results, only)
    return {"size": size, "device": str(device), "sizes": {k: v for k, v in S.items()}, "cases": results,
            "ok": all(r.get("ok") for r in results)}


# -- networks ------------------------------------------------------------------------------------------------
def network_checks(names, patch, batch, volume, sw_batch, device) -> dict:
    """One bf16-autocast SGD step (CUDA; float32 on CPU) on random data and one MONAI sliding-window inference
    per network; the first step (Triton compilation included) and a second one are timed separately."""
    import bench_networks as bn
    from monai.inferers import sliding_window_inference

    specs = bn.network_specs(patch)
    rows = []
    amp = device.type == "cuda"
    for name in names:
        row = {"network": name, "patch": list(patch), "batch": batch, "volume": list(volume),
               "precision": "bf16 autocast" if amp else "float32"}
        t_all = time.perf_counter()
        print(f"  networks: {name} ...", flush=True)
        net = None
        try:
            built_as, build = specs[name]
            row["built_as"] = built_as
            torch.manual_seed(0)
            net = build().to(device)
            row["params_m"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
            opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 1, *patch, generator=g).to(device)
            y = torch.randint(0, 2, (batch, *patch), generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, times = [], []
            for _ in range(2):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = net(x)
                out = out[0] if isinstance(out, (list, tuple)) else out
                loss = F.cross_entropy(out.float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
                opt.step()
                sync(device)
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
            grads_finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
            row.update(train_first_s=round(times[0], 3), train_step_s=round(times[1], 3),
                       loss=[round(v, 4) for v in losses], loss_finite=all(math.isfinite(v) for v in losses),
                       params_finite=grads_finite)
            if device.type == "cuda":
                row["train_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            del opt, x, y, out, loss
            net.eval()
            vol = torch.randn(1, 1, *volume, generator=g).to(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                seg = sliding_window_inference(vol, roi_size=tuple(patch), sw_batch_size=sw_batch,
                                               predictor=lambda t: (lambda o: o[0] if isinstance(o, (list, tuple))
                                                                    else o)(net(t)),
                                               overlap=0.5, mode="gaussian")
            sync(device)
            row["infer_s"] = round(time.perf_counter() - t0, 3)
            row["infer_windows"] = bn.n_windows(volume, patch)
            row["infer_shape_ok"] = tuple(seg.shape) == (1, 2, *volume)
            row["infer_finite"] = bool(torch.isfinite(seg).all())
            if device.type == "cuda":
                row["infer_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            del vol, seg
            row["ok"] = row["loss_finite"] and row["params_finite"] and row["infer_shape_ok"] and row["infer_finite"]
        except Exception as exc:  # noqa: BLE001 - a network failing is a result
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            row["traceback"] = traceback.format_exc(limit=8)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["wall_s"] = round(time.perf_counter() - t_all, 2)
        print(f"  networks: {name}: {'ok' if row['ok'] else 'FAILED: ' + row.get('error', 'not finite')} "
              f"({row['wall_s']} s)", flush=True)
        rows.append(row)
    return {"device": str(device), "rows": rows, "ok": all(r["ok"] for r in rows)}


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    import bench_networks as bn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["kernels", "networks"])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="kernels: full (GPU) or tiny (CPU)")
    p.add_argument("--cases", nargs="+", default=None, help="kernels: only the cases whose names start with these")
    p.add_argument("--networks", nargs="+", default=None, help="default: every network (medmamba.nets.available())")
    p.add_argument("--patch", type=bn.parse_size, default=None)
    p.add_argument("--volume", type=bn.parse_size, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sw-batch", type=int, default=2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    if args.part == "kernels":
        data = kernel_checks(args.size or ("full" if device.type == "cuda" else "tiny"), device, args.cases)
    else:
        import medmamba.nets
        names = args.networks or medmamba.nets.available()
        cuda = device.type == "cuda"
        patch = args.patch or ((64, 128, 128) if cuda else (16, 32, 32))
        volume = args.volume or ((128, 128, 128) if cuda else (24, 40, 40))
        data = network_checks(names, patch, args.batch, volume, args.sw_batch, device)
    data["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.out, data)
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
