"""Compile every Triton kernel variant the scan dispatch can launch, for a GPU that is not here.

The CPU tests run the kernels under Triton's interpreter, which never compiles them: it knows no register
limits, no grid limits and folds reductions in sequence order. This module walks the dispatch
(``selective_scan``'s Triton path, the routed scan, forward and backward) on meta tensors with
``scan_triton.launch_recorder``, so every launch it would make is recorded, then compiles each distinct
variant (kernel, argument types and alignment, constexprs, num_warps) with ``triton.compile`` for a
``GPUTarget`` and reads ``ptxas -v``: registers, spill bytes, shared memory, and what that leaves of an
SM (resident warps). No GPU and no CUDA driver are needed, only Triton's bundled ptxas.

The calls walked are the ones medmamba's layers make (the Mamba block; SS2D/SS3D and Multi-Head Scan,
plain and routed; the bare public call), in fp32, bf16 and fp16, for short (one 16-step tile) and long
(many 64-step tiles, several carry blocks) sequences, d_state 1 and 16, with and without a gradient on
the last state, deterministic and atomic backward.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

# name -> (compute capability, SMs of the reference part, shared memory per SM in KiB, most resident warps)
TARGETS = {"sm_80": (80, 108, 164, 64), "sm_86": (86, 84, 100, 48), "sm_89": (89, 128, 100, 48),
           "sm_90": (90, 132, 228, 64)}


@dataclass
class Variant:
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    grids: list = field(default_factory=list)  # the grids this variant was launched with
    calls: list = field(default_factory=list)  # which dispatch calls launched it

    @property
    def key(self):
        return (self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), self.num_warps)

    def label(self):
        flags = [k for k, v in self.constexprs.items() if v is True]
        dt = self.signature.get("u_ptr", self.signature.get("sumP_ptr", ""))
        sizes = {k: self.constexprs[k] for k in ("N", "BD", "T", "CB") if k in self.constexprs}
        return f"{self.kernel}[{dt.lstrip('*')} {' '.join(f'{k}={v}' for k, v in sizes.items())} " \
               f"{'+'.join(flags) or '-'}]"


# --- walking the dispatch -------------------------------------------------------------------------------

def _dispatch_calls():
    """(name, thunk) for every call pattern; each thunk runs forward + backward on meta tensors."""
    from . import scan_triton as st

    def plain(batch, dim, length, dstate, groups, dtype, has_d, has_z, has_bias, softplus, dlast, parts=None):
        m = dict(device="meta")
        u = torch.empty(batch, dim, length, dtype=dtype, **m)
        A = torch.empty(dim, dstate, **m)
        BC = torch.empty(batch, groups, dstate, length, dtype=dtype, **m)
        D = torch.empty(dim, **m) if has_d else None
        bias = torch.empty(dim, **m) if has_bias else None
        z = u if has_z else None
        y, sumH = st._scan_forward(u, u, A, BC, BC, D, z, bias, softplus, None, None)
        dl = torch.empty(batch, dim, dstate, **m) if dlast else None
        st._scan_backward(u, u, A, BC, BC, D, z, bias, sumH, y, dl, softplus, None, parts)

    def routed(batch, dc, routes, k, length, dstate, dtype, shared_dout, parts=None):
        m = dict(device="meta")
        u = torch.empty(batch, k * dc, length, dtype=dtype, **m)
        delta = torch.empty(batch, routes * dc, length, dtype=dtype, **m)
        A = torch.empty(routes * dc, dstate, **m)
        BC = torch.empty(batch, routes, dstate, length, dtype=dtype, **m)
        D = torch.empty(routes * dc, **m)
        index = torch.empty(routes, length, dtype=torch.int32, **m)
        y, sumH = st._scan_forward(u, delta, A, BC, BC, D, None, D, True, None, None, index, routes // k)
        dout = torch.empty(batch, dc, length, **m) if shared_dout else y
        st._scan_backward(u, delta, A, BC, BC, D, None, D, sumH, dout, None, True, None, parts, index, routes // k,
                          dout_shared=shared_dout)

    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dn = str(dtype).replace("torch.", "")
        for length, ln in ((12, "short"), (300_000, "long")):
            for dstate in (16, 1):
                tag = f"{dn} L={length} N={dstate}"
                calls += [
                    (f"Mamba block {tag}", lambda *a, d=dtype, L=length, n=dstate:
                        plain(2, 192, L, n, 1, d, True, True, True, True, False)),
                    (f"Mamba block, deterministic {tag}", lambda *a, d=dtype, L=length, n=dstate:
                        plain(2, 192, L, n, 1, d, True, True, True, True, False, parts=1)),
                    (f"SS3D unfused (6 routes) {tag}", lambda *a, d=dtype, L=length, n=dstate:
                        plain(2, 6 * 96, L, n, 6, d, True, False, True, True, False)),
                    (f"SS3D routed, summed output {tag}", lambda *a, d=dtype, L=length, n=dstate:
                        routed(2, 96, 6, 1, L, n, d, True)),
                    (f"Multi-Head Scan routed (4 heads, 8 routes) {tag}", lambda *a, d=dtype, L=length, n=dstate:
                        routed(2, 32, 8, 4, L, n, d, False)),
                ]
            calls += [
                (f"bare scan with last-state gradient {dn} L={length} N=4", lambda *a, d=dtype, L=length:
                    plain(1, 8, L, 4, 1, d, False, False, False, False, True)),
                (f"public scan, all options, grouped {dn} L={length} N=16", lambda *a, d=dtype, L=length:
                    plain(2, 64, L, 16, 2, d, True, True, True, True, True)),
            ]
    return calls


def collect_variants(sm_count: int, target, backend_cls) -> list[Variant]:
    """Every distinct kernel variant the dispatch launches on a GPU with ``sm_count`` SMs."""
    from triton._C.libtriton import native_specialize_impl

    from . import scan_triton as st

    variants: dict = {}
    for name, call in _dispatch_calls():
        with st.launch_recorder(sm_count=sm_count) as rec:
            call()
        for kernel, grid, args, kwargs in rec.launches:
            kwargs = dict(kwargs)
            num_warps = kwargs.pop("num_warps", 4)
            bound = dict(zip(kernel.arg_names, args))
            bound.update(kwargs)
            signature, constexprs, attrs = {}, {}, {}
            for i, p in enumerate(kernel.params):
                value = bound[p.name]
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                    constexprs[p.name] = value
                    continue
                # what triton.jit would specialise at launch: types, 16-byte alignment, divisibility, == 1
                ty, spec = native_specialize_impl(backend_cls, value, False, True, True)
                signature[p.name] = ty
                if ty == "constexpr":
                    constexprs[p.name] = spec
                elif isinstance(spec, str) and spec:
                    attrs[(i,)] = spec
            v = Variant(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, signature, constexprs,
                        attrs, num_warps)
            v = variants.setdefault(v.key, v)
            v.grids.append(list(grid))
            if name not in v.calls:
                v.calls.append(name)
    return list(variants.values())


# --- compiling one variant --------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas_info(ptx: str, arch: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(int(arch[3:5])).path, "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-400:]}")
    return _parse_ptxas(proc.stderr)


def _parse_ptxas(text: str) -> dict | None:
    if not _PTXAS_RE["registers"].search(text):
        return None
    return {key: int(m.group(1)) if (m := rx.search(text)) else 0 for key, rx in _PTXAS_RE.items()}


def resident_warps(registers: int, num_warps: int, shared_bytes: int, target: str) -> int:
    """Warps of this kernel one SM holds at once (the occupancy calculator's rules: registers are allocated
    per warp in units of 256, 64K per SM; 1 KiB of shared memory reserved per block; at most 32 blocks)."""
    _, _, smem_kib, max_warps = TARGETS[target]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_smem = (smem_kib * 1024) // (shared_bytes + 1024) if shared_bytes else 32
    by_warps = max_warps // num_warps
    return min(by_regs, by_smem, by_warps, 32) * num_warps


def compile_variant(v: Variant, target: str, backend) -> dict:
    import triton
    from triton.compiler import ASTSource

    from . import scan_triton as st

    cc = TARGETS[target][0]
    kernel = getattr(st, v.kernel)
    attrs = {k: backend.parse_attr(s) for k, s in v.attrs.items()}
    row = {"kernel": v.kernel, "variant": v.label(), "target": target, "num_warps": v.num_warps,
           "constexprs": {k: (str(x) if not isinstance(x, (bool, int, float)) else x) for k, x in v.constexprs.items()},
           "signature": v.signature, "launched_by": v.calls, "max_grid": max(g[0] for g in v.grids)}
    start = time.perf_counter()
    try:
        src = ASTSource(kernel, dict(v.signature), dict(v.constexprs), attrs)
        log = io.StringIO()
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own `ptxas -v` log when it compiles
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=backend.target, options={"num_warps": v.num_warps})
        info = _parse_ptxas(log.getvalue())
        if info is None:  # taken from Triton's cache (or a Triton without the knob): run ptxas -v once more
            info = _ptxas_info(compiled.asm["ptx"], f"sm_{cc}{'a' if cc >= 90 else ''}")
        shared = int(getattr(compiled.metadata, "shared", 0))
        row.update(ok=True, **info, shared_bytes=shared,
                   warps_per_sm=resident_warps(info["registers"], v.num_warps, shared, target))
    except Exception as exc:  # reported per variant; the caller fails the check
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-800:]}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _compile_one(job):
    v, target = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return compile_variant(v, target, make_backend(GPUTarget("cuda", TARGETS[target][0], 32)))


def check(targets=("sm_80", "sm_90"), workers: int | None = None, progress=print) -> list[dict]:
    """Compile every variant for every target; returns one row per (variant, target)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    jobs = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
        backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
        variants = collect_variants(TARGETS[target][1], backend.target, type(backend))
        progress(f"{target}: {len(variants)} kernel variants from {len(_dispatch_calls())} dispatch calls "
                 f"(triton {triton.__version__})")
        jobs += [(v, target) for v in variants]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    rows = []
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for i, row in enumerate(pool.map(_compile_one, jobs, chunksize=4)):
                rows.append(row)
                if (i + 1) % 25 == 0 or i + 1 == len(jobs):
                    progress(f"  compiled {i + 1}/{len(jobs)}")
    else:
        for i, job in enumerate(jobs):
            rows.append(_compile_one(job))
            if (i + 1) % 25 == 0 or i + 1 == len(jobs):
                progress(f"  compiled {i + 1}/{len(jobs)}")
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (target, kernel): variants, failures, worst registers / spills / occupancy."""
    out = {}
    for r in rows:
        s = out.setdefault((r["target"], r["kernel"]), {"target": r["target"], "kernel": r["kernel"], "variants": 0,
                                                        "failed": 0, "max_registers": 0, "max_spill_bytes": 0,
                                                        "spilling_variants": 0, "min_warps_per_sm": None,
                                                        "max_shared_bytes": 0})
        s["variants"] += 1
        if not r["ok"]:
            s["failed"] += 1
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["max_spill_bytes"] = max(s["max_spill_bytes"], spill)
        s["spilling_variants"] += spill > 0
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"])
        w = r["warps_per_sm"]
        s["min_warps_per_sm"] = w if s["min_warps_per_sm"] is None else min(s["min_warps_per_sm"], w)
    return list(out.values())


def format_report(rows: list[dict], verbose: bool = False) -> str:
    import triton

    lines = [f"Triton {triton.__version__}: {len(rows)} compilations, "
             f"{sum(not r['ok'] for r in rows)} failed", "",
             "| target | kernel | variants | failed | max registers | spilling variants | max spill bytes | "
             "min warps/SM | max shared bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['target']} | {s['kernel']} | {s['variants']} | {s['failed']} | {s['max_registers']} | "
                     f"{s['spilling_variants']} | {s['max_spill_bytes']} | {s['min_warps_per_sm']} | "
                     f"{s['max_shared_bytes']} |")
    bad = [r for r in rows if not r["ok"] or verbose or r["spill_stores"] + r["spill_loads"] > 0]
    if bad:
        lines += ["", "| target | variant | warps | result | registers | spill st/ld bytes | shared | warps/SM |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in bad:
            if r["ok"]:
                lines.append(f"| {r['target']} | {r['variant']} | {r['num_warps']} | compiled | {r['registers']} | "
                             f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {r['warps_per_sm']} |")
            else:
                lines.append(f"| {r['target']} | {r['variant']} | {r['num_warps']} | ERROR: "
                             f"{r['error'].splitlines()[0][:200]} | | | | |")
    return "\n".join(lines)


def run(targets: str, json_path: str | None = None, workers: int | None = None, verbose: bool = False) -> int:
    """``medmamba check --compile TARGETS``: print the report, write the rows as JSON; exit 1 on any compile
    error (spills are reported, not failed)."""
    import json
    import sys

    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if not names or unknown:
        print(f"check --compile: unknown target(s) {', '.join(unknown) or '(none given)'}; known: "
              f"{', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter replaces @triton.jit kernels by Python ones, which cannot be compiled: rerun without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "medmamba", "check", "--compile", targets]
        cmd += (["--json", json_path] if json_path else []) + (["--workers", str(workers)] if workers else [])
        return subprocess.run(cmd + (["--verbose"] if verbose else []), env=env).returncode
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as exc:
        print(f"check --compile: Triton with its NVIDIA backend is needed ({exc})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = check(names, workers=workers, progress=lambda msg: print(msg, flush=True))
    print(format_report(rows, verbose=verbose))
    failed = sum(not r["ok"] for r in rows)
    print(f"check --compile: {len(rows)} compilations in {time.perf_counter() - start:.0f} s, {failed} failed, "
          f"{sum(r.get('spill_stores', 0) + r.get('spill_loads', 0) > 0 for r in rows)} spilling")
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"triton": triton.__version__, "targets": names, "rows": rows}, f, indent=1, default=str)
        os.replace(tmp, json_path)
    return 1 if failed else 0
