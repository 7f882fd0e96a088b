"""The selective scan as it is exported to ONNX (``scan_torch._traced_forward``), alone, at a network's shape:
export time, ONNX Runtime's time and peak memory (with and without its CPU memory arena, each in its own
process), and the relative L2 error of the eager traced formula and of ONNX Runtime against a float64
sequential recurrence. Inputs: trained-like steps (softplus(dt) ~ 0.05, A = -1..-N: long memory).

    python scripts/bench_traced_scan.py --dim 64 --length 204800 --dstate 16 --out /tmp/traced_scan
      (LightM-UNet's first Mamba stage at nnU-Net's 64x160x160 window: 32 channels x 2, 32x80x80 tokens)

``--scan-module FILE`` times another version of ``scan_torch.py`` (e.g. ``git show REV:medmamba/kernels/
scan_torch.py > old.py``) for a before/after.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def inputs(dim, length, dstate, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, dim, length, generator=g)
    delta = torch.randn(1, dim, length, generator=g) * 0.5 - 3.0
    A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(1, 1, dstate, length, generator=g)
    C = torch.randn(1, 1, dstate, length, generator=g)
    bias = torch.randn(dim, generator=g) * 0.1
    return u, delta, A, B, C, bias


class TracedScan(torch.nn.Module):
    def __init__(self, module, A, bias):
        super().__init__()
        self.module, self.A, self.bias = module, A, bias

    def forward(self, u, delta, B, C):
        return self.module._traced_forward(u, delta, self.A, B, C, self.bias, True)[0]


def reference(u, delta, A, B, C, bias, block=4096):
    """float64 h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t, step by step."""
    u, delta, A, B, C, bias = (x.double() for x in (u, delta, A, B, C, bias))
    dt = torch.nn.functional.softplus(delta[0] + bias[:, None])
    dim, length = dt.shape
    h = torch.zeros(dim, A.shape[1], dtype=torch.float64)
    y = torch.empty(dim, length, dtype=torch.float64)
    for s in range(0, length, block):
        e = min(length, s + block)
        a = torch.exp(dt[:, s:e].T[:, :, None] * A)
        b = (dt[:, s:e] * u[0, :, s:e]).T[:, :, None] * B[0, 0, :, s:e].T[:, None, :]
        c = C[0, 0, :, s:e].T
        for t in range(e - s):
            h = a[t] * h + b[t]
            y[:, s + t] = h @ c[t]
    return y[None]


def run_ort(path, arena, threads, dim, length, dstate):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    u, delta, _, B, C, _ = inputs(dim, length, dstate)
    feed = dict(u=u.numpy(), delta=delta.numpy(), B=B.numpy(), C=C.numpy())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    times = []
    for _ in range(2):
        t = time.perf_counter()
        y = sess.run(None, feed)[0]
        times.append(round(time.perf_counter() - t, 2))
    np.save(path + f".arena{int(arena)}.npy", y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(json.dumps(dict(seconds=times, peak_rss_mib=peak, rss_before_run_mib=before)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--length", type=int, default=204800)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--scan-module", help="another scan_torch.py to measure instead of medmamba's")
    p.add_argument("--ort-child", choices=["0", "1"], help=argparse.SUPPRESS)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "scan.onnx")
    if a.ort_child is not None:
        return run_ort(path, a.ort_child == "1", a.threads, a.dim, a.length, a.dstate)
    torch.set_num_threads(a.threads)
    if a.scan_module:
        spec = importlib.util.spec_from_file_location("scan_module", a.scan_module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from medmamba.kernels import scan_torch as module
    u, delta, A, B, C, bias = inputs(a.dim, a.length, a.dstate)
    net = TracedScan(module, A, bias).eval()
    res = dict(dim=a.dim, length=a.length, dstate=a.dstate, threads=a.threads,
               scan_module=a.scan_module or "medmamba.kernels.scan_torch")
    t = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(net, (u, delta, B, C), path, input_names=["u", "delta", "B", "C"], output_names=["y"],
                          opset_version=17, dynamo=False)
    res["export_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with torch.no_grad():
        y_traced = net(u, delta, B, C)
    res["eager_traced_seconds"] = round(time.perf_counter() - t, 2)
    ref = reference(u, delta, A, B, C, bias)

    def rel(y):
        y = torch.as_tensor(y).double()
        return float((y - ref).norm() / ref.norm())
    res["rel_l2_eager_traced"] = rel(y_traced)
    for arena in (0, 1):
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ort-child", str(arena)],
                           capture_output=True, text=True)
        if r.returncode:
            res[f"onnxruntime_arena{arena}"] = dict(exit=r.returncode, stderr=r.stderr[-500:])
            continue
        res[f"onnxruntime_arena{arena}"] = json.loads(r.stdout.strip().splitlines()[-1])
        res[f"onnxruntime_arena{arena}"]["rel_l2"] = rel(np.load(path + f".arena{arena}.npy"))
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
