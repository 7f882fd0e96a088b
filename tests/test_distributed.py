"""Distributed paths agree with single-process ones (CPU, gloo, 2 processes).

* our CPU SyncBatchNorm and ``synced_moments`` (masked) equal one process on the whole batch;
* a DDP training step of every registry network (2 processes x 1 sample) has the gradient of one
  process on the 2-sample batch, also with ``torch.compile`` inside DDP (nnU-Net's order);
* ``rewrap_ddp`` lets a DDP model freeze and unfreeze parameters between steps;
* ``medmamba pretrain`` under ``torchrun --nproc_per_node 2`` equals a 1-process run with the same
  global batch and seed, and resumes with 2 processes; its DDP step equals the one-process step in float64.
"""
import contextlib
import copy
import gc
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import medmamba.nets
from medmamba.runtime.distributed import SyncBatchNorm, convert_sync_batchnorm, rewrap_ddp, synced_moments

DATA = os.environ.get("MEDMAMBA_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
STS_DIR = os.path.join(DATA, "ibsi_sts")
WORLD = 2

# tiny 3D configurations (drop path off: it would draw different randomness per process)
NETS = {
    "umamba_bot": (dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1), (8, 8, 12)),
    "umamba_enc": (dict(features_per_stage=(4, 8, 16), n_blocks_per_stage=1, n_conv_per_stage_decoder=1), (4, 8, 8)),
    "lightm_unet": (dict(init_filters=8, blocks_down=(1, 1, 1, 1)), (8, 8, 16)),
    # not 32^3: a 1-voxel bottleneck makes the UNETR blocks' InstanceNorms degenerate (variance 0), which
    # amplifies batch-size-dependent rounding past the tolerance (rel 5e-4 with the official LN eps 1e-5)
    "swin_umamba": (dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4, drop_path_rate=0.0),
                    (32, 32, 64)),
    "swin_umamba_d": (dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], feature_size=4, d_state=4, drop_path_rate=0.0),
                      (32, 32, 32)),
    # not 32^3: SyncBatchNorm's sum-of-squares variance vs BatchNorm's on a near-constant channel of the
    # 2^3 bottleneck's LKPE put the gradients 1.6e-3 apart there (1e-6 at 32x32x64)
    "msvm_unet": (dict(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1), drop_path_rate=0.0), (32, 32, 64)),
    "vm_unet_mhs": (dict(dims=(8, 16, 32), depths=(1, 1, 1), decoder_depths=(1, 1, 1), d_state=2, drop_path_rate=0.0),
                    (32, 32, 32)),
    # 32x32x48: a 2x2x3 token grid, so the sin-cos embedding is computed for a grid other than img_size's
    "hymamba": (dict(channels=(4, 8, 8, 12, 12), depths=(1, 1, 1, 1, 1), exp_r=(2, 2, 2, 2, 2), mamba_depth=1,
                     d_state=4, img_size=32), (32, 32, 48)),
}


# ---- a small harness: run a check in WORLD gloo processes, rank 0 writes its findings -------------------

def _entry(rank, world, init_file, check, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = globals()[check](rank, world)
        if rank == 0:
            torch.save(result, out)
        # the check's DDP wrappers (check_rewrap builds four) and their reducers go first, and every rank is done
        # with the group before it is destroyed: a rank aborting in gloo's teardown ("terminate called without an
        # active exception") was seen once in check_rewrap
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(check, tmp_path):
    out = tmp_path / f"{check}.pt"
    mp.spawn(_entry, args=(WORLD, str(tmp_path / f"{check}.pg"), check, str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def _max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# ---- checks (run in every process) ------------------------------------------------------------------

def check_sync_batchnorm(rank, world):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))
    x = torch.randn(2 * world, 3, 5, 6, 7)
    ref = copy.deepcopy(net)
    ref_in = x.clone().requires_grad_(True)
    ref_out = ref(ref_in)
    ref_out.pow(2).mean().backward()

    ddp = torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(net)))
    assert isinstance(ddp.module[1], SyncBatchNorm)
    mine = slice(2 * rank, 2 * rank + 2)
    x_in = x[mine].clone().requires_grad_(True)
    out = ddp(x_in)
    out.pow(2).mean().backward()
    # each rank's loss is the mean over its half; the whole-batch loss is the mean of the ranks' losses,
    # so the whole-batch input gradient is this rank's divided by the number of ranks
    res = {"out": _max_diff(out, ref_out[mine]), "input_grad": _max_diff(x_in.grad / world, ref_in.grad[mine]),
           "running_mean": _max_diff(ddp.module[1].running_mean, ref[1].running_mean),
           "running_var": _max_diff(ddp.module[1].running_var, ref[1].running_var)}
    got, want = _grads(ddp.module), _grads(ref)
    res["param_grads"] = max(_max_diff(got[k], want[k]) for k in want)
    res["grad_scale"] = max(float(v.abs().max()) for v in want.values())
    # eval mode uses the (synchronised) running statistics, on every rank the same
    ddp.eval()
    res["eval"] = _max_diff(ddp(x[mine]), ref.eval()(x[mine]))

    # masked moments (MambaMIM's batch norm over visible voxels) equal the whole-batch masked moments
    y = torch.randn(2 * world, 3, 4, 4, 4, requires_grad=True)
    m = (torch.rand(2 * world, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    dims = (0, 2, 3, 4)
    count = m.sum(dims, keepdim=True)
    ref_mean = (y * m).sum(dims, keepdim=True) / count
    ref_var = (((y - ref_mean) * m) ** 2).sum(dims, keepdim=True) / count
    mean, var, n = synced_moments(y[mine], dims, m[mine])
    res["masked_mean"] = _max_diff(mean, ref_mean)
    res["masked_var"] = _max_diff(var, ref_var)
    res["masked_count"] = float(n.item()) - float(count.flatten()[0])
    # gradients through the all-reduce: d(sum_r var_r-based loss)/dy equals the whole-batch gradient
    (ref_g,) = torch.autograd.grad((ref_mean.sum() + ref_var.sum()), y)
    (g,) = torch.autograd.grad(mean.sum() + var.sum(), y)
    # every rank computes the same (replicated) loss and the backward all-reduce sums the ranks' output
    # gradients, so a rank's slice holds world x the whole-batch gradient; gather the slices
    g_sum = g.clone()
    dist.all_reduce(g_sum)
    res["masked_grad"] = _max_diff(g_sum / world, ref_g)
    return res


def check_networks(rank, world):
    res = {}
    for name, (kwargs, shape) in NETS.items():
        torch.manual_seed(0)
        net = medmamba.nets.create(name, 1, 2, spatial_dims=3, deep_supervision=False, **kwargs)
        x = torch.randn(world, 1, *shape)
        target = torch.randint(0, 2, (world, *shape))
        loss_fn = nn.CrossEntropyLoss()
        ref = copy.deepcopy(net).train()
        loss_fn(ref(x), target).backward()
        want = _grads(ref)

        ddp = torch.nn.parallel.DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(net)).train())
        loss_fn(ddp(x[rank:rank + 1]), target[rank:rank + 1]).backward()
        got = _grads(ddp.module)
        assert got.keys() == want.keys(), f"{name}: parameters with gradients differ"
        # a second step: DDP raises here if the first left a parameter without its gradient
        loss_fn(ddp(x[rank:rank + 1]), target[rank:rank + 1]).backward()
        num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want)
        den = sum(float((want[k] ** 2).sum()) for k in want)
        res[name] = {"rel": (num / den) ** 0.5, "max": max(_max_diff(got[k], want[k]) for k in want),
                     "scale": max(float(v.abs().max()) for v in want.values()),
                     "has_bn": any(isinstance(m, SyncBatchNorm) for m in ddp.modules())}
        if name == "umamba_bot":  # nnU-Net's order with nnUNet_compile=t: compile, then DDP
            compiled = torch.nn.parallel.DistributedDataParallel(
                torch.compile(copy.deepcopy(net).train(), backend="aot_eager"))
            loss_fn(compiled(x[rank:rank + 1]), target[rank:rank + 1]).backward()
            got = {k.replace("_orig_mod.", ""): v for k, v in _grads(compiled.module).items()}
            res["umamba_bot_compiled"] = {"rel": sum(float(((got[k] - want[k]) ** 2).sum()) for k in want) ** 0.5
                                          / sum(float((want[k] ** 2).sum()) for k in want) ** 0.5}
    return res


def check_rewrap(rank, world):
    torch.manual_seed(0)
    net = nn.ModuleDict({"encoder": nn.Linear(4, 4), "decoder": nn.Linear(4, 1)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x):
            return self.inner["decoder"](torch.relu(self.inner["encoder"](x)))

    model = torch.nn.parallel.DistributedDataParallel(Net())
    x = torch.randn(3, 4) + rank
    seen = []
    for frozen in (True, True, False, False):
        for p in net["encoder"].parameters():
            p.requires_grad_(not frozen)
        model = rewrap_ddp(model)
        for p in model.parameters():
            p.grad = None
        model(x).sum().backward()
        seen.append((net["encoder"].weight.grad is None, net["decoder"].weight.grad is not None))
    # the averaged gradient is the same on every rank
    g = net["encoder"].weight.grad.clone()
    gs = [torch.zeros_like(g) for _ in range(world)]
    dist.all_gather(gs, g)
    return {"seen": seen, "same": all(torch.equal(gs[0], t) for t in gs)}


# ---- tests -----------------------------------------------------------------------------------------

def test_sync_batchnorm_matches_whole_batch(tmp_path):
    r = _run("check_sync_batchnorm", tmp_path)
    for key in ("out", "input_grad", "running_mean", "running_var", "eval", "masked_mean", "masked_var",
                "masked_grad"):
        assert r[key] < 1e-5, (key, r)
    assert r["param_grads"] < 1e-5 * max(1.0, r["grad_scale"]), r
    assert r["masked_count"] == 0


def test_convert_sync_batchnorm_keeps_state_dict():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(3)))
    keys = dict(net.state_dict())
    conv = convert_sync_batchnorm(net)
    assert conv is net and isinstance(net[1], SyncBatchNorm) and isinstance(net[2][0], SyncBatchNorm)
    assert {k: v.data_ptr() for k, v in conv.state_dict().items()} == {k: v.data_ptr() for k, v in keys.items()}
    # single process: a plain batch norm
    x = torch.randn(4, 1, 6, 6)
    ref = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ref.load_state_dict({k: v for k, v in keys.items() if not k.startswith("2.")})
    torch.testing.assert_close(conv[:2](x), ref(x))


# Swin-UMamba's fp32 gradient at this shape is itself 1.9e-4 (relative) from a float64 evaluation of the same
# network, one process, batch 2: the UNETR blocks' InstanceNorms amplify rounding, and the conv weight gradients
# of the decoder carry most of it. Batch 1 + 1 (what DDP computes) reorders that rounding: DDP vs one process was
# 1.8e-4 apart while both scans (the blocked CPU scan and the doubling scan before it) are 1e-7 from float64 at
# the scan's own shapes. HyMamba likewise: its fp32 gradient is 8.4e-4 from float64 at its shape here (batch 2
# and 1 + 1 alike; channels-first LayerNorms with eps 1e-6), DDP vs one process 1.9e-4. A DDP defect (a gradient
# not averaged, a bucket missed) is O(1).
TOLERANCE = {"swin_umamba": 5e-4, "hymamba": 1e-3}


def test_ddp_step_of_every_network_matches_one_process(tmp_path):
    r = _run("check_networks", tmp_path)
    assert set(r) == set(medmamba.nets.available()) | {"umamba_bot_compiled"}
    for name, v in r.items():
        assert v["rel"] < TOLERANCE.get(name, 1e-4), (name, v)
    assert r["msvm_unet"]["has_bn"]


@pytest.mark.parametrize("name", ["umamba_bot", "lightm_unet", "swin_umamba", "swin_umamba_d", "hymamba"])
def test_deep_supervision_off_heads_do_not_require_grad(name):
    kwargs, _ = NETS[name]
    net = medmamba.nets.create(name, 1, 2, spatial_dims=3, deep_supervision=False, **kwargs)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all("head" in n or "seg_layers" in n for n in frozen)
    keys = set(net.state_dict())
    net.decoder.deep_supervision = True
    assert all(p.requires_grad for p in net.parameters())
    assert set(net.state_dict()) == keys
    net.decoder.deep_supervision = False
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == frozen


def test_rewrap_ddp_freeze_unfreeze(tmp_path):
    r = _run("check_rewrap", tmp_path)
    assert r["seen"] == [(True, True), (True, True), (False, True), (False, True)]
    assert r["same"]


# ---- medmamba pretrain under torchrun ---------------------------------------------------------------

need_ct = pytest.mark.skipif(not glob.glob(os.path.join(STS_DIR, "STS_*", "CT_image.nii.gz")),
                             reason=f"real CT not found under {DATA} (set MEDMAMBA_DATA)")
PRETRAIN = ["pretrain", "--arch", "umamba_bot", "--data", STS_DIR, "--patch", "32", "32", "32",
            "--spacing", "4", "4", "4", "--device", "cpu", "--decoder-width", "32", "--workers", "1", "--no-progress",
            "--net-kwargs", json.dumps({"features_per_stage": [4, 8, 16], "strides": [1, 2, 2],
                                        "n_blocks_per_stage": [1, 1, 1]}),
            "--lr", "3e-3", "--warmup", "1", "--log-every", "1", "--image-every", "100", "--seed", "3"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "medmamba", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _losses(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars("train/loss")}


def _relative_difference(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point() and "running" not in k]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    den = sum(float((a[k].double() ** 2).sum()) for k in keys)
    return (num / den) ** 0.5


@contextlib.contextmanager
def _float64_pretraining():
    """float64 through MambaMIM: ``.float()`` keeps float64 and the Mamba layer's scan is the float64 loop
    reference (the scans take float32 only). Restored on exit."""
    import medmamba.layers.mamba as mamba_layer
    from medmamba.kernels.reference import selective_scan_ref

    to_float, scan = torch.Tensor.float, mamba_layer.selective_scan
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else to_float(self, *a, **k)
    mamba_layer.selective_scan = lambda u, *a, backend=None, **k: (
        selective_scan_ref(u, *a, **k) if u.dtype == torch.float64 else scan(u, *a, backend=backend, **k))
    try:
        yield
    finally:
        torch.Tensor.float, mamba_layer.selective_scan = to_float, scan


def _mambamim_float64():
    from medmamba.pretrain.model import MambaMIM
    from medmamba.pretrain.network import build_downstream_network
    torch.manual_seed(3)
    net = build_downstream_network("umamba_bot", None, None, 1, 2, seed=3, network_kwargs={
        "features_per_stage": [4, 8, 16], "strides": [1, 2, 2], "n_blocks_per_stage": [1, 1, 1]})
    model = MambaMIM(net, "umamba_bot", [32, 32, 32], 1, 0.75, 32).double().train()
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, :, :8] = 0.0  # clipped air: constant patches
    return model, x, model.draw_mask(2, generator=torch.Generator().manual_seed(4))


def check_pretrain_step_float64(rank, world):
    with _float64_pretraining():
        model, x, pyramid = _mambamim_float64()
        model = convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp(x[rank:rank + 1], pyramid.select([rank]))["loss"].backward()
        return {"grads": _grads(model), "sync_bn": sum(isinstance(m, SyncBatchNorm) for m in model.modules())}


def test_pretrain_ddp_step_is_the_one_process_step_in_float64(tmp_path):
    """The DDP pretraining step (synchronised masked norms and batch norms, per-lane masks, averaged
    gradients) is the same function as one process on the whole batch: in float64 the gradients agree to
    1e-12. In float32 they are 1.9e-4 apart, the one-process path being the farther from float64 (its light
    decoder's conv-BN gradients; DDP's are 2e-6 from it); the 2-process pretraining test below sees that
    rounding after Adam's first, sign-like step (lr x sign(g)) flips the sign of noise-level entries."""
    ddp = _run("check_pretrain_step_float64", tmp_path)
    with _float64_pretraining():
        model, x, pyramid = _mambamim_float64()
        model(x, pyramid)["loss"].backward()
        one = _grads(model)
    assert ddp["sync_bn"] > 0 and one.keys() == ddp["grads"].keys()
    num = sum(float(((ddp["grads"][k] - one[k]) ** 2).sum()) for k in one)
    den = sum(float((one[k] ** 2).sum()) for k in one)
    assert (num / den) ** 0.5 < 1e-12


@need_ct
def test_pretrain_two_processes_equal_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    log = _torchrun([*PRETRAIN, "--steps", "4", "--batch-size", "1", "--out", two], nproc=2)
    assert "effective (global) batch 2 = 1 per process x 2" in log
    assert "2 processes (global batch 2)" in log
    p = subprocess.run([sys.executable, "-m", "medmamba", *PRETRAIN, "--steps", "4", "--batch-size", "2",
                        "--out", one], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    # the same crops, masks and averaged gradients: the same losses and (up to reduction order) weights
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    # step 1 (no update yet): the same crops, masks and forward, to float rounding. After updates, AdamW turns
    # the all-reduce's rounding on near-zero gradient entries into lr-sized steps (measured with MambaMIM's
    # official-style fused decoder: 1e-4 relative at steps 2-3, 1.2e-3 at step 4); the weights are compared
    # as a whole below.
    assert l2[1] == pytest.approx(l1[1], rel=1e-6), (l1, l2)
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=5e-3), (step, l1, l2)
    a = torch.load(os.path.join(one, "checkpoint_latest.pth"), weights_only=False)
    b = torch.load(os.path.join(two, "checkpoint_latest.pth"), weights_only=False)
    assert b["world_size"] == 2 and a["world_size"] == 1
    # (conv biases right before an instance norm get zero gradients; Adam turns their float noise into
    # lr-sized steps, so compare the weights as a whole, relative to their size. Measured: after step 1 only
    # 0.3 % of the entries differ, each by 2 x lr (a flipped sign(g): the biases before instance norms, whose
    # exact gradient is 0, and weight entries whose |g| is ~1e-3 of their tensor's median); those lr-sized
    # changes move every later gradient, 3.8e-3 relative after 4 steps at lr 3e-3. The step itself is
    # the same function in both runs: test_pretrain_ddp_step_is_the_one_process_step_in_float64.)
    assert _relative_difference(a["model"], b["model"]) < 1e-2
    fa = torch.load(os.path.join(one, "checkpoint_final.pth"), weights_only=False)
    fb = torch.load(os.path.join(two, "checkpoint_final.pth"), weights_only=False)
    assert fb["world_size"] == 2 and fb["global_batch_size"] == 2
    assert _relative_difference(fa["network_weights"], fb["network_weights"]) < 1e-2
    assert json.load(open(os.path.join(two, "pretrain_config.json")))["world_size"] == 2
    # only rank 0 wrote TensorBoard
    assert len(glob.glob(os.path.join(two, "tensorboard", "events.*"))) == 1

    # resume the 2-process run to 6 steps with 2 processes
    _torchrun([*PRETRAIN, "--steps", "6", "--batch-size", "1", "--out", two, "--resume"], nproc=2)
    resumed = torch.load(os.path.join(two, "checkpoint_latest.pth"), weights_only=False)
    assert resumed["step"] == 6
    assert sorted(_losses(two)) == [1, 2, 3, 4, 5, 6]
    # the optimizer continued (Adam's step count) rather than starting again
    steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert steps == {6}


@need_ct
def test_pretrain_torchrun_errors_once_and_cleanly(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "checkpoint_final.pth").write_bytes(b"keep me")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medmamba",
           *PRETRAIN, "--steps", "2", "--batch-size", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("already holds a pretraining run") == 1
    assert (out / "checkpoint_final.pth").read_bytes() == b"keep me"


# ---- data: a process streams its lanes of the global batch ------------------------------------------

class _FakeTransforms:
    """Stands in for the MONAI pipeline: a crop is (volume id, a number from the stream's RNG)."""

    def set_random_state(self, seed):
        self.rng = __import__("random").Random(seed)

    def __call__(self, d):
        return [{"image": torch.tensor([float(d["image"]), self.rng.random()])} for _ in range(2)]


def _fake_stream(monkeypatch, n_volumes=7):
    from medmamba.pretrain import data
    items = [data.CTItem(f"/v{i}.nii.gz", "nifti") for i in range(n_volumes)]
    monkeypatch.setattr(data, "load_ct", lambda item: int(item.path[2:].split(".")[0]))
    monkeypatch.setattr(data, "preprocess_transforms", lambda *a, **k: _FakeTransforms())

    def make(lanes, num_lanes=4, **kw):
        return data.CTCropStream(items, [1, 1, 1], [1, 1, 1], samples_per_volume=2, shuffle_buffer=3,
                                 lanes=lanes, num_lanes=num_lanes, **kw)
    return items, make


def test_stream_lanes_do_not_depend_on_the_number_of_processes(monkeypatch):
    _, make = _fake_stream(monkeypatch)

    def take(lanes, n):
        it = iter(make(lanes))
        return [next(it) for _ in range(n)]
    whole = take([0, 1, 2, 3], 40)              # one process, global batch 4: 10 batches
    rank0, rank1 = take([0, 1], 20), take([2, 3], 20)  # two processes, 2 each
    for step in range(10):
        assert torch.equal(torch.stack(whole[4 * step:4 * step + 4]),
                           torch.stack(rank0[2 * step:2 * step + 2] + rank1[2 * step:2 * step + 2]))
    # another seed or resume offset gives other crops
    it = iter(make([0, 1, 2, 3], seed=1))
    assert not torch.equal(torch.stack([next(it) for _ in range(4)]), torch.stack(whole[:4]))


def test_stream_shards_are_disjoint_per_epoch(monkeypatch):
    items, make = _fake_stream(monkeypatch, n_volumes=10)
    s = make([0])
    for epoch in range(3):
        shards = [s.shard(k, 4, epoch) for k in range(4)]
        flat = [i.path for sh in shards for i in sh]
        assert sorted(flat) == sorted(i.path for i in items)  # disjoint and complete
    assert [i.path for i in s.shard(0, 4, 0)] != [i.path for i in s.shard(0, 4, 1)]  # reshuffled per epoch
    assert [i.path for i in s.shard(0, 4, 0)] == [i.path for i in make([0]).shard(0, 4, 0)]  # deterministic
    # fewer volumes than streams: every stream still gets one
    small = _fake_stream(monkeypatch, n_volumes=3)[1]([0], num_lanes=8)
    assert all(len(small.shard(k, 8, 0)) == 1 for k in range(8))
