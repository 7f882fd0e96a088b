#!/usr/bin/env python
"""One GPU run that says everything: scripts/gpu_validate.sh OUT drives this (see docs/gpu_validation.md).

    python scripts/gpu_validate.py OUT                      # on a CUDA machine: every step, ~8 minutes
    python scripts/gpu_validate.py OUT --dry-run            # no GPU: the plan + the CPU-runnable parts in miniature
    python scripts/gpu_validate.py OUT --dry-run --only env,kernels,networks
    python scripts/gpu_validate.py --prepare-nnunet DIR --data ../shared/data/ibsi_sts   # (gpu_prepare.sh)

Steps (each timed, each its own subprocess; a failure or time-out is recorded and the next step runs):

  env           nvidia-smi, versions, ``python -m medmamba check``
  kernel_tests  pytest tests/test_kernels.py tests/test_routed_scan.py tests/test_mamba_block.py (native on CUDA)
  kernels       scripts/gpu_checks.py kernels: Triton vs references at L up to 2^21, fp32/bf16, grouped, routed,
                deterministic and atomic backward
  networks      scripts/gpu_checks.py networks: every network, one bf16 training step + sliding-window inference
  nnunet        nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerUMamba_debug -device cuda on a dataset
                preprocessed beforehand (scripts/gpu_prepare.sh) and carried
  bench         scripts/bench_all.py --quick

Into OUT (at most 8 files: the device tool returns no more): gpu_validate.json, gpu_validate.md, plan.json,
plan.md and gpu_validate_logs.tar.gz (every step's log and JSON, the benchmark tables, nnU-Net's training
log). JSON and Markdown are rewritten after every step, so a run cut short still reports what it did.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)

TOTAL_BUDGET_S = 480  # the whole run, an H200 (the issue: within 8 minutes)
# step -> (GPU budget in s, what it shows). Slack left by a step goes to the next ones; a step is stopped when
# it would eat the time reserved for the steps after it.
STEPS = {
    "env": (35, "GPU, driver, versions (python, torch, CUDA, triton, monai, nnunetv2) and `medmamba check`: "
                "every scan backend against the float64 reference"),
    "kernel_tests": (110, "the kernel test files run natively on CUDA (Triton compiled, not interpreted)"),
    "kernels": (50, "Triton scan vs references at L up to 2^21 (2M), fp32 and bf16, grouped B/C, routed "
                    "(fused vs composed), deterministic (bitwise repeatable) and atomic (parts=4) backward"),
    "networks": (85, "every network: one bf16-autocast SGD step (batch 2, patch 64x128x128) and MONAI "
                     "sliding-window inference of a 128^3 volume; time, peak memory, finite loss"),
    "nnunet": (85, "nnUNetv2_train ... -tr nnUNetTrainerUMamba_debug -device cuda on real CT (IBSI sarcoma) "
                   "preprocessed beforehand: nnU-Net's own loop, data loading, final validation with Dice"),
    "bench": (90, "scripts/bench_all.py --quick: kernel, network and scaling tables (reduced sizes/repeats)"),
}
DEFAULT_DATASET_ID = 991
DEFAULT_DATASET_NAME = "GPUValSarcoma"
TRAINER = "nnUNetTrainerUMamba_debug"
RESERVE_S = 8  # for the report and the log archive


def now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_cmd(cmd: list[str], log: str, timeout: float, env: dict | None = None, prefix: str = "") -> dict:
    """Run ``cmd`` (its own process group), its output to ``log`` and, prefixed, to stdout; stop the whole group
    when ``timeout`` passes. Returns rc, timed_out, seconds and the output's last lines."""
    t0 = time.perf_counter()
    tail: list[str] = []
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=REPO, start_new_session=True)
        fired: list[bool] = []

        def stop():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def expire():
            fired.append(True)
            stop()

        import threading
        timer = threading.Timer(max(1.0, timeout), expire)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-40]
                print(f"{prefix}{line}", end="", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                stop()
                proc.wait()
        timed_out = bool(fired)
        if timed_out:
            fh.write(f"\n[gpu_validate] stopped after {timeout:.0f} s\n")
    return {"rc": rc, "timed_out": timed_out, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


class Run:
    """State of one validation run: the steps' results, the deadline, the output files."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="gpu_validate_")
        self.t0 = time.perf_counter()
        # the wrapper's set-up (wheel install) counts towards the same budget
        setup_s = float(os.environ.get("GPU_VALIDATE_SETUP_S", "0") or 0)
        self.deadline = self.t0 + args.budget - setup_s - RESERVE_S
        self.results: dict[str, dict] = {}
        self.cuda = False
        self.meta = {"started": now(), "mode": "dry-run (no GPU: CPU rehearsal)" if args.dry_run else "GPU",
                     "host": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPU cores",
                     "python": platform.python_version(), "command": shlex.join(sys.argv),
                     "setup": os.environ.get("GPU_VALIDATE_SETUP", ""), "budget_s": args.budget,
                     "work_dir": self.work}

    # -- environment for the subprocesses -----------------------------------------------------------------
    def env(self, interpret: bool = False) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1" if self.args.dry_run else "8")
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def py(self) -> str:
        return sys.executable

    # -- time ---------------------------------------------------------------------------------------------
    def timeout_for(self, step: str, order: list[str]) -> float:
        """The step's budget plus what earlier steps left unused, but never the time kept for later steps."""
        later = sum(STEPS[s][0] for s in order[order.index(step) + 1:])
        return max(5.0, self.deadline - time.perf_counter() - later)

    # -- reporting ----------------------------------------------------------------------------------------
    def record(self, step: str, res: dict) -> None:
        self.results[step] = res
        self.write_report()

    def write_report(self) -> None:
        data = {"meta": dict(self.meta, elapsed_s=round(time.perf_counter() - self.t0, 1)),
                "ok": all(r.get("status") in ("ok", "planned") for r in self.results.values()),
                "steps": self.results}
        write_atomic(os.path.join(self.out, "gpu_validate.json"), json.dumps(data, indent=1, default=str) + "\n")
        write_atomic(os.path.join(self.out, "gpu_validate.md"), to_markdown(data))
        self.archive()

    def archive(self) -> None:
        """Every log and step JSON (no checkpoints, no data) into one tar: the device returns at most 8 files."""
        path = os.path.join(self.out, "gpu_validate_logs.tar.gz")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for root, _dirs, files in os.walk(self.work):
                for f in sorted(files):
                    full = os.path.join(root, f)
                    if f.endswith((".pth", ".b2nd", ".npz", ".npy", ".pkl", ".tmp")) or os.path.getsize(full) > 4e6:
                        continue
                    tar.add(full, arcname=os.path.join("gpu_validate_logs", os.path.relpath(full, self.work)))
        os.replace(tmp, path)


# -- steps ---------------------------------------------------------------------------------------------------
def step_env(run: Run, timeout: float) -> dict:
    log = os.path.join(run.work, "env.log")
    info: dict = {"versions": {d: version(d) for d in ("torch", "torchvision", "triton", "monai", "nnunetv2",
                                                       "dynamic-network-architectures", "nibabel", "blosc2",
                                                       "SimpleITK", "numpy", "pytest", "pytest-xdist",
                                                       "medmamba")}}
    info["versions"]["python"] = platform.python_version()
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                            "clocks.max.sm,temperature.gpu", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        with open(log, "a") as fh:
            fh.write(full.stdout + full.stderr)
    else:
        info["nvidia_smi"] = "not present"
    probe = ("import json, torch, triton, medmamba; c = torch.cuda.is_available(); "
             "print('PROBE ' + json.dumps({'torch': torch.__version__, 'cuda_runtime': torch.version.cuda, "
             "'cudnn': torch.backends.cudnn.version(), 'cuda_available': c, "
             "'gpu': torch.cuda.get_device_name(0) if c else None, "
             "'capability': list(torch.cuda.get_device_capability(0)) if c else None, "
             "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
             "'triton': triton.__version__, 'medmamba_from': medmamba.__file__}))")
    res = run_cmd([run.py(), "-c", probe], log, min(timeout, 60), run.env(), prefix="  env: ")
    for line in res["tail"]:
        if line.startswith("PROBE "):
            info["runtime"] = json.loads(line[6:])
    run.cuda = bool(info.get("runtime", {}).get("cuda_available"))
    if run.args.no_check:
        info["medmamba_check"] = {"rc": None, "output": ["skipped (--no-check)"]}
        info["status"] = "ok" if "runtime" in info else "failed"
        return info
    chk = run_cmd([run.py(), "-m", "medmamba", "check"], log, max(5, timeout - res["seconds"]), run.env(),
                  prefix="  check: ")
    info["medmamba_check"] = {"rc": chk["rc"], "timed_out": chk["timed_out"],
                              "output": [ln for ln in chk["tail"] if ln.strip()][-14:]}
    ok = chk["rc"] == 0 and "runtime" in info
    info["status"] = "ok" if ok else "failed"
    if not ok:
        info["error"] = ("medmamba check failed (exit %s)" % chk["rc"]) if "runtime" in info else \
            "could not import torch/triton/medmamba"
    return info


def step_kernel_tests(run: Run, timeout: float) -> dict:
    files = ["tests/test_kernels.py", "tests/test_routed_scan.py", "tests/test_mamba_block.py"]
    junit = os.path.join(run.work, "kernel_tests.xml")
    cmd = [run.py(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", junit, *files]
    if run.args.dry_run:
        return {"status": "planned", "command": shlex.join(cmd[1:]),
                "note": "not run in a dry run: minutes under Triton's interpreter on CPU; CI runs these files"}
    if version("pytest-xdist"):
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles in parallel worker processes
    res = run_cmd(cmd, os.path.join(run.work, "kernel_tests.log"), timeout, run.env(), prefix="  pytest: ")
    info = {"command": shlex.join(cmd[1:]), "rc": res["rc"], "timed_out": res["timed_out"]}
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        info.update(counts)
        info["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                                if c.find("failure") is not None or c.find("error") is not None][:30]
    except (OSError, ET.ParseError) as exc:
        info["junit"] = f"unreadable: {exc}"
    info["summary"] = next((ln for ln in reversed(res["tail"]) if " passed" in ln or " failed" in ln), "")
    info["status"] = "ok" if res["rc"] == 0 else ("timeout" if res["timed_out"] else "failed")
    if info["status"] != "ok":
        info["error"] = info["summary"] or "\n".join(res["tail"][-5:])
    return info


def _checks(run: Run, part: str, extra: list[str], timeout: float, interpret: bool) -> dict:
    out = os.path.join(run.work, f"{part}.json")
    cmd = [run.py(), os.path.join("scripts", "gpu_checks.py"), part, "--out", out, *extra]
    res = run_cmd(cmd, os.path.join(run.work, f"{part}.log"), timeout, run.env(interpret), prefix="  ")
    info = {"command": shlex.join(cmd[1:]).replace(run.work, "WORK"), "rc": res["rc"], "timed_out": res["timed_out"]}
    try:
        with open(out) as fh:
            info.update(json.load(fh))
    except (OSError, json.JSONDecodeError):
        info["error"] = "no result file; last output: " + " | ".join(res["tail"][-4:])
    info["status"] = "ok" if res["rc"] == 0 and info.get("ok") else ("timeout" if res["timed_out"] else "failed")
    if info["status"] != "ok" and "error" not in info:
        bad = [c for c in info.get("cases", info.get("rows", [])) if not c.get("ok")]
        info["error"] = "; ".join(f"{c.get('name', c.get('network'))}: {c.get('error', 'over tolerance')}"
                                  for c in bad)[:600] or " | ".join(res["tail"][-3:])
    return info


def step_kernels(run: Run, timeout: float) -> dict:
    if run.args.dry_run or not run.cuda:
        extra = ["--device", "cpu", "--size", "tiny"] + (["--cases", *run.args.kernel_cases] if run.args.kernel_cases
                                                          else [])
        return _checks(run, "kernels", extra, timeout, interpret=True)
    return _checks(run, "kernels", ["--device", "cuda", "--size", "full"], timeout, interpret=False)


def step_networks(run: Run, timeout: float) -> dict:
    if run.args.dry_run or not run.cuda:
        extra = ["--device", "cpu", "--networks", *(run.args.networks or ["umamba_bot"]), "--patch", "16x32x32",
                 "--volume", "24x40x40"]
    else:
        extra = ["--device", "cuda"] + (["--networks", *run.args.networks] if run.args.networks else [])
    return _checks(run, "networks", extra, timeout, interpret=False)


def find_dataset(pre_dir: str) -> str | None:
    if not os.path.isdir(pre_dir):
        return None
    names = sorted(d for d in os.listdir(pre_dir) if d.startswith("Dataset") and
                   os.path.isfile(os.path.join(pre_dir, d, "nnUNetPlans.json")))
    return names[0] if names else None


def nnunet_env(run: Run, data: str, stub: str | None) -> dict:
    env = run.env()
    env["nnUNet_raw"] = os.path.join(run.work, "nnUNet_raw")
    env["nnUNet_preprocessed"] = os.path.join(data, "nnUNet_preprocessed")
    env["nnUNet_results"] = os.path.join(run.work, "nnUNet_results")
    os.makedirs(env["nnUNet_raw"], exist_ok=True)
    env["nnUNet_extTrainer"] = os.path.join(REPO, "medmamba", "nnunet", "ext_trainers")  # no .pth hook with --target
    env["nnUNet_n_proc_DA"] = str(min(8, os.cpu_count() or 1)) if not run.args.dry_run else "0"
    env["nnUNet_compile"] = "f"
    if stub:
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + stub
    return env


def simpleitk_stub(run: Run, force: bool) -> str | None:
    """A folder with an empty SimpleITK module when SimpleITK is missing (the GPU machine: its 53 MB wheel does
    not travel) or ``force`` (the CPU rehearsal, which then shadows the installed one)."""
    if not force and version("SimpleITK"):
        return None
    stub = os.path.join(run.work, "stub")
    os.makedirs(os.path.join(stub, "SimpleITK"), exist_ok=True)
    open(os.path.join(stub, "SimpleITK", "__init__.py"), "w").close()
    return stub


def step_nnunet(run: Run, timeout: float) -> dict:
    data = os.path.abspath(run.args.nnunet_data)
    dataset = find_dataset(os.path.join(data, "nnUNet_preprocessed"))
    if dataset is None:
        return {"status": "failed", "error": f"no preprocessed dataset under {data}/nnUNet_preprocessed: run "
                                             f"scripts/gpu_prepare.sh {run.args.nnunet_data} first and carry it"}
    device = "cuda" if (run.cuda and not run.args.dry_run) else "cpu"
    train_cmd = [run.py(), "-c", "import sys; from nnunetv2.run.run_training import run_training_entry; "
                 "sys.argv[0] = 'nnUNetv2_train'; run_training_entry()",
                 dataset.split("_")[0][7:], "3d_fullres", "0", "-tr", TRAINER, "-device", device]
    info = {"dataset": dataset, "data": data, "trainer": TRAINER, "device": device,
            "command": "nnUNetv2_train " + shlex.join(train_cmd[3:])}
    log = os.path.join(run.work, "nnunet.log")
    if run.args.dry_run and not run.args.nnunet_train_on_cpu:
        # rehearsal: nnU-Net with the SimpleITK stub in front, the trainer found, built and its data read
        stub = simpleitk_stub(run, force=True)
        code = (
            "import json, SimpleITK, torch\n"
            "assert not hasattr(SimpleITK, 'ReadImage'), 'the stub did not shadow SimpleITK'\n"
            "from nnunetv2.run.run_training import get_trainer_from_args\n"
            f"t = get_trainer_from_args({dataset.split('_')[0][7:]!r}, '3d_fullres', 0, {TRAINER!r}, 'nnUNetPlans', "
            "device=torch.device('cpu'))\n"
            "t.initialize()\n"
            "tr, val = t.get_tr_and_val_datasets()\n"
            "keys = sorted(tr.identifiers) if hasattr(tr, 'identifiers') else sorted(tr.keys())\n"
            "case = tr.load_case(keys[0])\n"
            "print('REHEARSAL ' + json.dumps({'trainer': type(t).__name__, 'network': type(t.network).__name__, "
            "'patch_size': list(t.configuration_manager.patch_size), 'batch_size': t.configuration_manager.batch_size, "
            "'reader_writer': t.plans_manager.image_reader_writer_class.__name__, 'train_cases': len(keys), "
            "'val_cases': len(val.identifiers) if hasattr(val, 'identifiers') else len(val.keys()), "
            "'first_case_shape': list(case[0].shape)}))\n")
        res = run_cmd([run.py(), "-c", code], log, timeout, nnunet_env(run, data, stub), prefix="  nnunet: ")
        for line in res["tail"]:
            if line.startswith("REHEARSAL "):
                info["rehearsal"] = json.loads(line[10:])
        ok = res["rc"] == 0 and "rehearsal" in info and \
            info["rehearsal"].get("reader_writer") == "NibabelIOWithReorient"
        info.update(rc=res["rc"], status="ok" if ok else "failed",
                    note="dry run: trainer built from the carried plans and one preprocessed case read with a "
                         "SimpleITK stub shadowing the real module, as on the GPU machine; training not run")
        if not ok:
            info["error"] = " | ".join(res["tail"][-4:])
        return info
    stub = simpleitk_stub(run, force=run.args.dry_run)
    res = run_cmd(train_cmd, log, timeout, nnunet_env(run, data, stub), prefix="  nnunet: ")
    info.update(rc=res["rc"], timed_out=res["timed_out"])
    results = os.path.join(run.work, "nnUNet_results", dataset)
    fold = None
    for root, dirs, _files in os.walk(results):
        if os.path.basename(root) == "fold_0":
            fold = root
    if fold:
        info["checkpoint_final"] = os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
        summary = os.path.join(fold, "validation", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as fh:
                s = json.load(fh)
            info["validation_dice_foreground_mean"] = s.get("foreground_mean", {}).get("Dice")
        logs = sorted(f for f in os.listdir(fold) if f.startswith("training_log"))
        if logs:
            lines = open(os.path.join(fold, logs[-1])).read().splitlines()
            keep = [ln for ln in lines if any(k in ln for k in ("train_loss", "val_loss", "Epoch time",
                                                                 "Pseudo dice", "medmamba:"))]
            info["training_log_excerpt"] = keep[-8:]
    ok = res["rc"] == 0 and info.get("checkpoint_final", False)
    info["status"] = "ok" if ok else ("timeout" if res["timed_out"] else "failed")
    if not ok:
        info["error"] = " | ".join(res["tail"][-4:])
    return info


def step_bench(run: Run, timeout: float) -> dict:
    bench_out = os.path.join(run.work, "bench")
    if run.args.dry_run or not run.cuda:
        cmd = [run.py(), os.path.join("scripts", "bench_all.py"), "--out", bench_out, "--device", "cpu", "--quick",
               "--threads", "1", "--levels", "kernels"]
    else:
        cmd = [run.py(), os.path.join("scripts", "bench_all.py"), "--out", bench_out, "--quick"]
    res = run_cmd(cmd, os.path.join(run.work, "bench.log"), timeout, run.env(), prefix="  bench: ")
    info = {"command": shlex.join(cmd[1:]).replace(run.work, "WORK"), "rc": res["rc"], "timed_out": res["timed_out"]}
    dev = "cpu" if "--device" in cmd else "cuda"
    summary = os.path.join(bench_out, f"bench_all_{dev}.json")
    if os.path.isfile(summary):
        with open(summary) as fh:
            s = json.load(fh)
        info["levels"] = {k: {"wall_s": v.get("wall_s"), "error": v.get("error")} for k, v in s["levels"].items()}
    info["tables"] = sorted(f for f in os.listdir(bench_out) if f.endswith(".md")) if os.path.isdir(bench_out) else []
    info["status"] = "ok" if res["rc"] == 0 else ("timeout" if res["timed_out"] else "failed")
    if info["status"] != "ok":
        info["error"] = " | ".join(res["tail"][-3:])
    return info


STEP_FUNCS = {"env": step_env, "kernel_tests": step_kernel_tests, "kernels": step_kernels, "networks": step_networks,
              "nnunet": step_nnunet, "bench": step_bench}


# -- plan and report -----------------------------------------------------------------------------------------
def plan(args, order: list[str]) -> dict:
    carry = args.nnunet_data
    steps = []
    for name in order:
        budget, what = STEPS[name]
        steps.append({"step": name, "budget_s": budget, "shows": what,
                      "gpu_run": GPU_COMMANDS[name].format(carry=os.path.relpath(carry, REPO)),
                      "dry_run": DRY_COMMANDS[name]})
    return {"total_budget_s": args.budget, "steps": steps,
            "device_command": "scripts/gpu_validate.sh $OUT --carry .gpu_carry   (run: carry [\".gpu_carry\"])",
            "prepare_here": "scripts/gpu_prepare.sh .gpu_carry"}


GPU_COMMANDS = {
    "env": "nvidia-smi; python -c 'import torch, triton ...'; python -m medmamba check",
    "kernel_tests": "python -m pytest -q tests/test_kernels.py tests/test_routed_scan.py tests/test_mamba_block.py "
                    "[-n 8 with pytest-xdist]",
    "kernels": "python scripts/gpu_checks.py kernels --device cuda --size full",
    "networks": "python scripts/gpu_checks.py networks --device cuda (patch 64x128x128, batch 2, volume 128^3)",
    "nnunet": "nnUNetv2_train 991 3d_fullres 0 -tr nnUNetTrainerUMamba_debug -device cuda "
              "(nnUNet_preprocessed={carry}/nnUNet_preprocessed, SimpleITK stub)",
    "bench": "python scripts/bench_all.py --out WORK/bench --quick",
}
DRY_COMMANDS = {
    "env": "same as on the GPU",
    "kernel_tests": "planned only (CI runs these files on CPU)",
    "kernels": "TRITON_INTERPRET=1 python scripts/gpu_checks.py kernels --device cpu --size tiny",
    "networks": "python scripts/gpu_checks.py networks --device cpu --networks umamba_bot --patch 16x32x32",
    "nnunet": "trainer built from the carried plans + one case read, SimpleITK stubbed (--nnunet-train-on-cpu: "
              "the real command on CPU)",
    "bench": "python scripts/bench_all.py --device cpu --quick --threads 1 --levels kernels",
}


def plan_markdown(p: dict) -> str:
    lines = ["# GPU validation plan", "", f"Prepare here: `{p['prepare_here']}`; on the device: `{p['device_command']}`.",
             f"Total budget {p['total_budget_s']} s.", "", "| step | budget s | shows | GPU run | dry run |",
             "|---|---:|---|---|---|"]
    for s in p["steps"]:
        lines.append(f"| {s['step']} | {s['budget_s']} | {s['shows']} | `{s['gpu_run']}` | {s['dry_run']} |")
    return "\n".join(lines) + "\n"


def _fmt(v, spec=".1e"):
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return format(v, spec)
    return "-" if v is None else str(v)


def headline(name: str, r: dict) -> str:
    if name == "env":
        rt = r.get("runtime", {})
        return (f"{rt.get('gpu') or 'no GPU'}; torch {rt.get('torch')} (CUDA {rt.get('cuda_runtime')}), triton "
                f"{rt.get('triton')}; check exit {r.get('medmamba_check', {}).get('rc')}")
    if name == "kernel_tests":
        if r.get("status") == "planned":
            return r.get("note", "")
        return r.get("summary") or f"{r.get('tests')} tests, {r.get('failures')} failures, {r.get('errors')} errors"
    if name == "kernels":
        cases = r.get("cases", [])
        return (f"{sum(bool(c.get('ok')) for c in cases)}/{len(cases)} cases within tolerance; largest L "
                f"{r.get('sizes', {}).get('long', ['?'] * 3)[2]}")
    if name == "networks":
        rows = r.get("rows", [])
        return f"{sum(bool(x.get('ok')) for x in rows)}/{len(rows)} networks trained a step and inferred"
    if name == "nnunet":
        if "rehearsal" in r:
            rh = r["rehearsal"]
            return (f"{r.get('dataset')}: {rh.get('trainer')} built ({rh.get('network')}, patch {rh.get('patch_size')}), "
                    f"{rh.get('train_cases')} train / {rh.get('val_cases')} val cases, IO {rh.get('reader_writer')}")
        return (f"{r.get('dataset')} on {r.get('device')}: checkpoint {'written' if r.get('checkpoint_final') else 'missing'}"
                f", validation Dice {_fmt(r.get('validation_dice_foreground_mean'), '.3f')}")
    if name == "bench":
        return ", ".join(f"{k} {v.get('wall_s')} s" + (" (failed)" if v.get("error") else "")
                         for k, v in r.get("levels", {}).items())
    return ""


def to_markdown(data: dict) -> str:
    m = data["meta"]
    steps = data["steps"]
    lines = [f"# GPU validation ({m['mode']})", "",
             f"{m['started']} on {m['host']}; Python {m['python']}; {m['elapsed_s']} s of {m['budget_s']} s. "
             f"Overall: **{'ok' if data['ok'] else 'FAILED'}**.", ""]
    if m.get("setup"):
        lines += [f"Setup: {m['setup']}", ""]
    lines += ["| step | status | seconds | budget s | result |", "|---|---|---:|---:|---|"]
    for name, r in steps.items():
        status = r.get("status", "?")
        lines.append(f"| {name} | {status if status in ('ok', 'planned') else '**' + status + '**'} | "
                     f"{r.get('step_seconds', '-')} | {STEPS[name][0]} | {headline(name, r)} |")
    for name, r in steps.items():
        if r.get("error"):
            lines += ["", f"**{name}**: {r['error'][:800]}"]
    env = steps.get("env")
    if env:
        lines += ["", "## Environment", "", f"nvidia-smi: {env.get('nvidia_smi')}", "",
                  "Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()), "", "```"]
        lines += env.get("medmamba_check", {}).get("output", []) + ["```"]
    kt = steps.get("kernel_tests")
    if kt and kt.get("failed_tests"):
        lines += ["", "## Failed kernel tests", ""] + [f"- `{t}`" for t in kt["failed_tests"]]
    k = steps.get("kernels")
    if k and k.get("cases"):
        lines += ["", "## Kernel checks", "", "| case | ok | dtype | shape | y rel err | grad rel err (max) | s | "
                  "compared |", "|---|---|---|---|---:|---:|---:|---|"]
        for c in k["cases"]:
            shape = ", ".join(f"{a}={b}" for a, b in c.get("shape", {}).items())
            lines.append(f"| {c['name']} | {_fmt(bool(c.get('ok')))} | {c.get('dtype', '-')} | {shape} | "
                         f"{_fmt(c.get('y_rel'))} | {_fmt(c.get('grad_rel_max'))} | {c.get('seconds')} | "
                         f"{c.get('compare_what', c.get('error', ''))} |")
        det = next((c for c in k["cases"] if c["name"].startswith("deterministic")), None)
        if det and "deterministic_bitwise_repeatable" in det:
            lines += ["", f"Deterministic backward bitwise repeatable: {_fmt(det['deterministic_bitwise_repeatable'])}; "
                          f"atomic (parts per group {det.get('atomic_parts_per_group', '?')}) bitwise repeatable: "
                          f"{_fmt(det.get('atomic_bitwise_repeatable'))}, vs deterministic grad rel err "
                          f"{_fmt(det.get('atomic_vs_deterministic_grad_rel_max'))}."]
    n = steps.get("networks")
    if n and n.get("rows"):
        lines += ["", "## Networks", "", "| network | ok | params M | precision | patch x batch | first step s | "
                  "step s | train peak GiB | loss | SW infer s (windows) | infer peak GiB |",
                  "|---|---|---:|---|---|---:|---:|---:|---|---:|---:|"]
        for r in n["rows"]:
            lines.append(f"| {r['network']} | {_fmt(bool(r.get('ok')))} | {_fmt(r.get('params_m'))} | "
                         f"{r.get('precision')} | {'x'.join(map(str, r.get('patch', [])))} x {r.get('batch')} | "
                         f"{_fmt(r.get('train_first_s'))} | {_fmt(r.get('train_step_s'))} | "
                         f"{_fmt(r.get('train_peak_gib'))} | {_fmt(r.get('loss'))} | {_fmt(r.get('infer_s'))} "
                         f"({_fmt(r.get('infer_windows'))}) | {_fmt(r.get('infer_peak_gib'))} |"
                         + (f" {r['error'][:200]}" if r.get("error") else ""))
    nn = steps.get("nnunet")
    if nn and nn.get("training_log_excerpt"):
        lines += ["", "## nnU-Net training log (excerpt)", "", "```"] + nn["training_log_excerpt"] + ["```"]
    b = steps.get("bench")
    if b and b.get("tables"):
        lines += ["", "## Benchmarks", "", "Full tables in gpu_validate_logs.tar.gz (bench/): "
                  + ", ".join(b["tables"])]
    return "\n".join(lines) + "\n"


# -- nnU-Net data for the GPU run (gpu_prepare.sh) -----------------------------------------------------------
def prepare_nnunet(dest: str, data: str, cases: int, dataset_id: int = DEFAULT_DATASET_ID) -> int:
    """Plan and preprocess ``data`` (image/mask NIfTI pairs) for nnU-Net 3d_fullres into ``dest``; the raw
    dataset is built in a temporary folder and not kept (the GPU run trains from the preprocessed data). The
    dataset asks for nibabel IO so that no SimpleITK is needed where it is read back."""
    from medmamba.nnunet import dataset as nn

    found = nn.find_cases(data)[:cases]
    if len(found) < 5:
        raise SystemExit(f"need at least 5 cases for nnU-Net's 5-fold split, found {len(found)} in {data}")
    dest = os.path.abspath(dest)
    tmp_root = tempfile.mkdtemp(prefix="gpu_prepare_")
    staging = dest + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    env = nn.nnunet_env(staging, n_proc_da=2, nnUNet_raw=os.path.join(tmp_root, "nnUNet_raw"))
    os.makedirs(env["nnUNet_raw"], exist_ok=True)
    raw = nn.build_raw_dataset(found, env["nnUNet_raw"], dataset_id, DEFAULT_DATASET_NAME,
                               labels={"background": 0, "tumour": 1}, link=True,
                               description=f"{len(found)} IBSI soft-tissue-sarcoma CT cases for the GPU validation run")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["overwrite_image_reader_writer"] = "NibabelIOWithReorient"
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()
    log = os.path.join(tmp_root, "plan_and_preprocess.log")
    try:
        nn.plan_and_preprocess(dataset_id, env, num_processes=2, log=log)
    except Exception:
        print(open(log).read()[-3000:], file=sys.stderr)
        raise
    # nnU-Net's own 5-fold split (same seed as nnUNetTrainer.do_split), written now so the carried folder is
    # complete and the GPU run writes nothing into it
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    pre = os.path.join(staging, "nnUNet_preprocessed", nn.dataset_folder_name(dataset_id, DEFAULT_DATASET_NAME))
    ids = sorted(f[:-len(".b2nd")] for f in os.listdir(os.path.join(pre, "nnUNetPlans_3d_fullres"))
                 if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
    with open(os.path.join(pre, "splits_final.json"), "w") as fh:
        json.dump(generate_crossval_split(ids, seed=12345, n_splits=5), fh, indent=1)
    shutil.rmtree(os.path.join(staging, "nnUNet_raw"), ignore_errors=True)
    shutil.rmtree(os.path.join(staging, "nnUNet_results"), ignore_errors=True)
    shutil.rmtree(tmp_root, ignore_errors=True)
    with open(os.path.join(staging, "README.txt"), "w") as fh:
        fh.write(f"nnU-Net 3d_fullres data of {len(found)} cases from {data}, preprocessed {now()} by "
                 f"scripts/gpu_prepare.sh (nnunetv2 {version('nnunetv2')}). Used by scripts/gpu_validate.sh.\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    print(f"  {len(found)} cases preprocessed in {time.perf_counter() - t0:.0f} s -> {dest}")
    return 0


# -- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output folder (JSON, Markdown, plan, log archive)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: write the plan, run the CPU-runnable parts small")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps (default all: {','.join(STEPS)})")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole run (default 480)")
    p.add_argument("--nnunet-data", default=os.environ.get("MEDMAMBA_GPU_CARRY", ".gpu_carry") + "/nnunet",
                   help="folder with nnUNet_preprocessed/ (default .gpu_carry/nnunet, from scripts/gpu_prepare.sh)")
    p.add_argument("--nnunet-train-on-cpu", action="store_true",
                   help="dry run: run the real nnUNetv2_train command on the CPU (minutes) instead of the rehearsal")
    p.add_argument("--networks", nargs="+", default=None, help="networks step: these only")
    p.add_argument("--kernel-cases", nargs="+", default=None, help="kernels step (dry run): these case prefixes only")
    p.add_argument("--no-check", action="store_true", help="env step: skip `medmamba check` (the test's shortcut)")
    p.add_argument("--keep-logs", action="store_true", help="also copy the work folder to OUT/logs")
    p.add_argument("--prepare-nnunet", metavar="DIR", help="(gpu_prepare.sh) preprocess --data into DIR and exit")
    p.add_argument("--data", default=None, help="--prepare-nnunet: image/mask folder")
    p.add_argument("--cases", type=int, default=10, help="--prepare-nnunet: number of cases")
    args = p.parse_args(argv)
    if args.prepare_nnunet:
        if not args.data:
            p.error("--prepare-nnunet needs --data")
        return prepare_nnunet(args.prepare_nnunet, args.data, args.cases)
    if not args.out:
        p.error("OUT is required")
    order = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in order if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    order = [s for s in STEPS if s in order]
    if not os.path.isabs(args.nnunet_data):
        args.nnunet_data = os.path.join(REPO, args.nnunet_data) if not os.path.isdir(args.nnunet_data) else \
            os.path.abspath(args.nnunet_data)
    run = Run(args)
    pl = plan(args, order)
    write_atomic(os.path.join(run.out, "plan.json"), json.dumps(pl, indent=1) + "\n")
    write_atomic(os.path.join(run.out, "plan.md"), plan_markdown(pl))
    print(f"gpu_validate: {run.meta['mode']}; steps {', '.join(order)}; budget {args.budget:.0f} s; out {run.out}",
          flush=True)
    for i, name in enumerate(order, 1):
        timeout = run.timeout_for(name, order)
        print(f"[{i}/{len(order)}] {name} (up to {timeout:.0f} s; {now()}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = STEP_FUNCS[name](run, timeout)
        except Exception as exc:  # noqa: BLE001 - a step's own failure is a result
            import traceback
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        res["step_seconds"] = round(time.perf_counter() - t0, 1)
        run.record(name, res)
        print(f"[{i}/{len(order)}] {name}: {res['status']} in {res['step_seconds']} s"
              + (f" - {res['error'][:300]}" if res.get("error") else ""), flush=True)
    if args.keep_logs:
        shutil.copytree(run.work, os.path.join(run.out, "logs"), dirs_exist_ok=True)
    run.write_report()
    shutil.rmtree(run.work, ignore_errors=True)
    ok = all(r.get("status") in ("ok", "planned") for r in run.results.values())
    print(open(os.path.join(run.out, "gpu_validate.md")).read().split("\n## ")[0])
    print(f"gpu_validate: {'ok' if ok else 'FAILED'} in {time.perf_counter() - run.t0:.0f} s; {run.out}/gpu_validate.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
