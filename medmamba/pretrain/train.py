"""The pretraining loop behind ``medmamba pretrain`` (see docs/pretraining.md).

``PretrainConfig`` holds every option; ``run_pretraining(cfg)`` discovers the CT volumes, builds the
downstream network and the MambaMIM model, streams crops, trains (AdamW, linear warmup + cosine,
optional cosine weight-decay schedule, gradient clipping), logs to TensorBoard under ``OUT/tensorboard``,
checkpoints ``OUT/checkpoint_latest.pth`` atomically and writes ``OUT/checkpoint_final.pth`` whose
``network_weights`` load strictly into the downstream segmentation network.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from medmamba.pretrain.data import CTCropStream, Intensity, NoCTFoundError, discover_ct
from medmamba.pretrain.model import MambaMIM, export_network_weights
from medmamba.pretrain.network import (ENCODER_MODULES, build_downstream_network, check_arch, describe,
                                       encoder_state_keys, find_trainer_for_arch, load_plans)

__all__ = ["PretrainConfig", "run_pretraining", "plans_settings", "scaled_lr", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "medmamba.pretrain.mambamim/1"
LATEST, FINAL, TB_DIR = "checkpoint_latest.pth", "checkpoint_final.pth", "tensorboard"
# options that define the model: a resumed run must use the stored values
_MODEL_KEYS = ("arch", "patch", "plans", "configuration", "in_channels", "out_channels", "net_kwargs",
               "decoder_width", "seed")


@dataclass
class PretrainConfig:
    data: list
    arch: str
    out: str
    patch: Optional[list] = None          # default 96^3, or the plans' patch size
    spacing: Optional[list] = None        # default 1.5 mm isotropic, or the plans' spacing
    batch_size: int = 2                   # per process; the global batch is batch_size x processes
    steps: int = 1000
    device: Optional[str] = None          # default: cuda if available
    plans: Optional[str] = None
    configuration: str = "3d_fullres"
    in_channels: int = 1
    out_channels: Optional[int] = None    # default 2, or from the plans' dataset.json
    resume: bool = False
    overwrite: bool = False
    lr: float = 1e-4
    lr_scaling: str = "none"              # "none" | "linear" | "sqrt": scale lr by global batch / lr_base_batch
    lr_base_batch: int = 2                # the global batch size --lr is meant for (when scaling)
    min_lr: float = 1e-6
    warmup_steps: Optional[int] = None    # default: 5 % of the steps
    weight_decay: float = 0.04
    weight_decay_end: Optional[float] = 0.2  # None: constant weight decay
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 5.0
    mask_ratio: float = 0.75
    decoder_width: int = 768
    samples_per_volume: int = 4
    shuffle_buffer: int = 16
    workers: Optional[int] = None         # default: min(8, CPUs per process)
    seed: int = 0
    net_kwargs: dict = field(default_factory=dict)
    include: list = field(default_factory=list)
    exclude: list = field(default_factory=list)
    log_every: int = 10
    image_every: int = 100
    save_every: int = 500
    amp: Optional[bool] = None            # default: bf16 autocast on CUDA
    progress: bool = True

    def to_json(self) -> dict:
        return describe(dataclasses.asdict(self))


def _trainer_patch_size(arch: str | None, configuration_manager):
    """The patch size our nnU-Net trainer for ``arch`` trains with: it adapts the plans configuration to
    the architecture's preset in memory (e.g. Swin-UMamba rounds the patch to a multiple of 32)."""
    patch = [int(p) for p in configuration_manager.patch_size]
    if arch is None or find_trainer_for_arch(arch) is None:
        return patch
    try:
        from medmamba.nnunet.presets import adapt_configuration
    except ImportError:
        return patch
    return [int(p) for p in adapt_configuration(configuration_manager.configuration, arch)["patch_size"]]


def plans_settings(plans, configuration: str, arch: str | None = None) -> dict:
    """Patch size, spacing, axis order, intensity normalisation and channel counts from nnU-Net plans.

    The patch size is the one our trainer for ``arch`` uses (the configuration adapted to its preset).
    nnU-Net's arrays are SimpleITK arrays (z, y, x) transposed by ``transpose_forward``; ours are RAS
    (x, y, z), so output axis i is RAS axis ``2 - transpose_forward[i]`` (for the usual axial CT).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_dict = load_plans(plans)
    pm = PlansManager(plans_dict)
    if configuration not in pm.available_configurations:
        raise ValueError(f"configuration {configuration!r} is not in the plans; available: "
                         f"{', '.join(pm.available_configurations)}")
    cm = pm.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise ValueError(f"configuration {configuration!r} is {len(cm.patch_size)}D; pretraining is 3D")
    axes = [2 - int(t) for t in pm.transpose_forward]
    scheme = cm.normalization_schemes[0] if cm.normalization_schemes else "CTNormalization"
    if scheme == "CTNormalization":
        props = pm.foreground_intensity_properties_per_channel.get("0") or \
            pm.foreground_intensity_properties_per_channel.get(0)
        if not props:
            raise ValueError("the plans have no foreground intensity properties for channel 0 (CTNormalization)")
        intensity = Intensity("ct", float(props["percentile_00_5"]), float(props["percentile_99_5"]),
                              float(props["mean"]), float(props["std"]))
    elif scheme == "ZScoreNormalization":
        intensity = Intensity("zscore")
    else:
        raise ValueError(f"plans normalisation {scheme!r} is not supported for CT pretraining "
                         f"(CTNormalization or ZScoreNormalization)")
    out = {"patch": _trainer_patch_size(arch, cm), "spacing": [float(s) for s in cm.spacing], "axes": axes,
           "intensity": intensity, "out_channels": None, "in_channels": None}
    if isinstance(plans, (str, os.PathLike)):
        ds = os.path.join(os.path.dirname(os.path.abspath(os.fspath(plans))), "dataset.json")
        if os.path.isfile(ds):
            with open(ds) as f:
                dataset_json = json.load(f)
            out["out_channels"] = int(pm.get_label_manager(dataset_json).num_segmentation_heads)
            channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
            out["in_channels"] = len(channels) or None
    return out


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    special = {id(p) for p in model.mask_tokens.parameters()} | {id(model.toki.A)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or id(p) in special:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def _lr_lambda(steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        t = min(max(t, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    t = min(max(step / max(1, steps - 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def _slice_image(vol: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) -> (1, H, W) middle slice along the last axis, min-max scaled for display."""
    s = vol[0, :, :, vol.shape[-1] // 2].float().t().flip(0)  # rows = 2nd axis (anterior up), cols = 1st axis
    lo, hi = float(s.min()), float(s.max())
    return ((s - lo) / (hi - lo if hi > lo else 1.0)).clamp(0, 1)[None]


def _rng_state(mask_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "mask_generator": mask_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    mask_gen.set_state(state["mask_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prepare_out(cfg: PretrainConfig) -> Optional[dict]:
    """Check/create OUT; returns the resume checkpoint (or None)."""
    os.makedirs(cfg.out, exist_ok=True)
    latest, final = os.path.join(cfg.out, LATEST), os.path.join(cfg.out, FINAL)
    existing = [p for p in (latest, final) if os.path.exists(p)]
    if cfg.resume:
        if not os.path.exists(latest):
            raise FileNotFoundError(f"--resume: there is no {latest} to resume from")
        try:
            ckpt = torch.load(latest, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"--resume: cannot read {latest} ({type(exc).__name__}: {exc})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "config" not in ckpt:
            raise ValueError(f"--resume: {latest} is not a medmamba pretraining checkpoint (format "
                             f"{CHECKPOINT_FORMAT!r}); use another --out or --overwrite to start again")
        return ckpt
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already holds a pretraining run ({', '.join(map(os.path.basename, existing))}); "
                              f"use --resume to continue it or --overwrite to start again")
    return None


def _clear_out(cfg: PretrainConfig) -> None:
    """--overwrite: remove the previous run's checkpoints and TensorBoard logs (only those)."""
    for name in (LATEST, FINAL):
        p = os.path.join(cfg.out, name)
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(cfg.out, TB_DIR), ignore_errors=True)


def _restore_config(cfg: PretrainConfig, stored: dict) -> None:
    """--resume: options not given (equal to their defaults) come from the stored run; the options that
    define the model always do (with a warning when the command line asks for something else)."""
    for f in dataclasses.fields(cfg):
        if f.name in ("data", "out", "resume", "overwrite", "progress") or f.name not in stored:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # required (arch): always given
            default = object()
        value = getattr(cfg, f.name)
        given = describe(value) != describe(default)
        if f.name in _MODEL_KEYS:
            if given and describe(value) != stored[f.name]:   # refuse: training the stored model under the
                raise ValueError(                              # new name would replace its checkpoint_final
                    f"--resume: {f.name}={value!r} differs from the stored run's {stored[f.name]!r} in {cfg.out}; "
                    f"resume with the stored value, or start a new run (another --out, or --overwrite)")
            setattr(cfg, f.name, stored[f.name])
        elif not given:
            setattr(cfg, f.name, stored[f.name])


def scaled_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """The peak learning rate for a global batch: ``--lr`` scaled by global batch / ``--lr-base-batch``
    (linearly, by its square root, or not at all)."""
    ratio = global_batch / max(1, cfg.lr_base_batch)
    if cfg.lr_scaling == "none":
        return cfg.lr
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    raise ValueError(f"--lr-scaling must be none, linear or sqrt, got {cfg.lr_scaling!r}")


def _settings(cfg: PretrainConfig):
    """Plans-derived settings and defaults (rank 0 reads the plans; see run_pretraining)."""
    axes, intensity, plans_channels = None, Intensity(), None
    if cfg.plans:
        ps = plans_settings(cfg.plans, cfg.configuration, cfg.arch)
        axes, intensity, plans_channels = ps["axes"], ps["intensity"], ps["in_channels"]
        cfg.patch = list(cfg.patch or ps["patch"])
        cfg.spacing = list(cfg.spacing or ps["spacing"])
        if cfg.out_channels is None:
            cfg.out_channels = ps["out_channels"] or 2
    return cfg, axes, intensity, plans_channels


def _discover(cfg: PretrainConfig):
    found = discover_ct(cfg.data, cfg.include or None, cfg.exclude or None)
    if not found.items:
        raise NoCTFoundError(f"no CT volumes found under {', '.join(map(str, cfg.data))} ({found.summary()}). "
                             f"Looked for *.nii / *.nii.gz (names with mask/seg/label or MR/PET tokens are skipped; "
                             f"--include GLOB overrides) and DICOM series.")
    with open(os.path.join(cfg.out, "volumes.txt"), "w") as f:
        f.write(found.summary() + "\n")
        f.writelines(f"use  {i.describe()}\n" for i in found.items)
        f.writelines(f"skip {p}  ({why})\n" for p, why in found.skipped)
    return found


def run_pretraining(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pretraining; returns a summary dict (final checkpoint path, losses, throughput).

    Under ``torchrun`` every process runs this: rank 0 reads the plans, finds the volumes, owns OUT
    (checkpoints, TensorBoard) and shares what it read; gradients are averaged by
    DistributedDataParallel and each process streams its slice of every global batch (see CTCropStream).
    """
    from medmamba.runtime.distributed import init_distributed

    ctx = init_distributed(cfg.device)
    try:
        return _run(cfg, ctx)
    finally:
        ctx.close()


def _run(cfg: PretrainConfig, ctx) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from medmamba.runtime.distributed import convert_sync_batchnorm

    main = ctx.is_main
    cfg = dataclasses.replace(cfg)
    cfg.arch = check_arch(cfg.arch)
    if cfg.plans:
        cfg.plans = os.path.abspath(os.fspath(cfg.plans))
    resume_ckpt = ctx.agree(_prepare_out, cfg)
    if resume_ckpt is not None:
        _restore_config(cfg, resume_ckpt["config"])

    # ---- settings: plans, patch, spacing, channels ----------------------------------------------------
    cfg, axes, intensity, plans_channels = ctx.agree(_settings, cfg)
    if plans_channels not in (None, cfg.in_channels):
        raise ValueError(f"the plans' dataset has {plans_channels} input channels; CT pretraining produces "
                         f"{cfg.in_channels}-channel networks, whose weights nnU-Net could not load")
    cfg.patch = [int(p) for p in (cfg.patch or [96, 96, 96])]
    cfg.spacing = [float(s) for s in (cfg.spacing or [1.5, 1.5, 1.5])]
    cfg.out_channels = int(cfg.out_channels or 2)
    if len(cfg.patch) != 3 or len(cfg.spacing) != 3:
        raise ValueError(f"--patch and --spacing need 3 values, got {cfg.patch} and {cfg.spacing}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    device = ctx.device
    world, global_batch = ctx.world_size, cfg.batch_size * ctx.world_size
    lr = scaled_lr(cfg, global_batch)
    amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ctx.distributed else 1
    cpus = max(1, (os.cpu_count() or 1) // local_procs)
    workers = cfg.workers if cfg.workers is not None else min(8, cpus)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    if main:
        print(f"medmamba pretrain: {world} process(es) on {device.type}"
              + (f" ({ctx.backend})" if ctx.distributed else "")
              + f"; effective (global) batch {global_batch} = {cfg.batch_size} per process x {world}; "
              f"peak lr {lr:.3g} (--lr {cfg.lr:g}, scaling {cfg.lr_scaling}"
              + (f" for global batch {global_batch} vs --lr-base-batch {cfg.lr_base_batch}" if cfg.lr_scaling != "none"
                 else "; --lr-scaling linear|sqrt scales it with the global batch") + ")", flush=True)

    # ---- data -----------------------------------------------------------------------------------------
    found = ctx.agree(_discover, cfg)

    # ---- model ----------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    random.seed(cfg.seed)
    net, info = build_downstream_network(cfg.arch, cfg.plans, cfg.configuration, cfg.in_channels, cfg.out_channels,
                                         seed=cfg.seed, network_kwargs=cfg.net_kwargs or None, return_info=True)
    model = MambaMIM(net, cfg.arch, cfg.patch, cfg.in_channels, cfg.mask_ratio, cfg.decoder_width).to(device)
    del net
    if ctx.distributed:
        model = convert_sync_batchnorm(model)
    groups = _param_groups(model, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.steps, warmup, cfg.min_lr / lr))
    mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = 0
    if resume_ckpt is None and cfg.overwrite and main:
        _clear_out(cfg)
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        sched.load_state_dict(resume_ckpt["scheduler"])
        # --steps / --lr / the number of processes may have changed: recompute the schedule for them
        sched.base_lrs = [lr for _ in opt.param_groups]
        sched.lr_lambdas = [_lr_lambda(cfg.steps, warmup, cfg.min_lr / lr) for _ in opt.param_groups]
        _set_rng_state(resume_ckpt["rng"], mask_gen)
        start = int(resume_ckpt["step"])
        stored_world = resume_ckpt.get("world_size", 1)
        if main and stored_world != world:
            warnings.warn(f"--resume: the run was saved with {stored_world} process(es), now {world}: the global "
                          f"batch is {global_batch} and the data streams are redrawn")
        del resume_ckpt
    ddp = model
    if ctx.distributed:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if main:
        with open(os.path.join(cfg.out, "pretrain_config.json"), "w") as f:
            json.dump({**cfg.to_json(), "network_builder": info["builder"], "workers": workers, "warmup_steps": warmup,
                       "amp": amp, "device": str(device), "world_size": world, "backend": ctx.backend,
                       "global_batch_size": global_batch, "peak_lr": lr}, f, indent=2)

    def save_latest(step):
        if main:
            _atomic_save({"format": CHECKPOINT_FORMAT, "step": step, "config": cfg.to_json(), "world_size": world,
                          "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "rng": _rng_state(mask_gen)},
                         os.path.join(cfg.out, LATEST))

    lanes = list(range(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size))
    stream = CTCropStream(found.items, cfg.patch, cfg.spacing, cfg.samples_per_volume, intensity, axes,
                          seed=cfg.seed, epoch_offset=start, shuffle_buffer=cfg.shuffle_buffer,
                          lanes=lanes, num_lanes=global_batch)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    writer = None
    if main:
        writer = SummaryWriter(os.path.join(cfg.out, TB_DIR), purge_step=start + 1 if start else None)
        writer.add_text("config", "```\n" + json.dumps({**cfg.to_json(), "world_size": world,
                                                        "global_batch_size": global_batch, "peak_lr": lr},
                                                       indent=2) + "\n```", start)
    losses, crops_per_s = [], []
    t_log, n_since = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), dynamic_ncols=True,
               desc="pretrain")
    threads = torch.get_num_threads()
    if device.type == "cpu":  # leave the data workers their cores: oversubscribed OpenMP threads crawl
        torch.set_num_threads(min(threads, max(1, cpus - workers)))
    it = iter(loader)
    model.train()
    try:
        for step in range(start, cfg.steps):
            x = next(it).to(device, non_blocking=True)
            if cfg.weight_decay_end is not None:
                wd = _cosine(cfg.weight_decay, cfg.weight_decay_end, step, cfg.steps)
                for g in opt.param_groups:
                    if g.get("decay"):
                        g["weight_decay"] = wd
            # masks for the whole global batch from the shared generator; this process takes its lanes
            pyramid = model.draw_mask(global_batch, generator=mask_gen).select(lanes).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = ddp(x, pyramid)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            done = step + 1
            losses.append(ctx.mean(loss.item()))
            n_since += global_batch
            bar.update(1)
            if main and (done % cfg.log_every == 0 or done == cfg.steps or done == start + 1):
                now = time.perf_counter()
                rate = n_since / max(now - t_log, 1e-9)
                if done != start + 1:
                    crops_per_s.append(rate)
                t_log, n_since = now, 0
                cur_lr = opt.param_groups[0]["lr"]
                writer.add_scalar("train/loss", losses[-1], done)
                writer.add_scalar("train/lr", cur_lr, done)
                writer.add_scalar("train/weight_decay", opt.param_groups[0]["weight_decay"], done)
                writer.add_scalar("train/grad_norm", float(grad_norm), done)
                writer.add_scalar("train/crops_per_s", rate, done)
                writer.add_scalar("train/toki_A_norm", float(model.toki.A.detach().norm()), done)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{cur_lr:.2e}", crops_s=f"{rate:.2f}")
            if main and (done % cfg.image_every == 0 or done == cfg.steps):
                recon = model.reconstruct(out, x)
                masked_in = x * pyramid.mask(x.shape[2:], dtype=x.dtype)
                panels = [_slice_image(v[0].detach().cpu()) for v in (x, masked_in, recon)]
                writer.add_image("images/input", panels[0], done)
                writer.add_image("images/masked", panels[1], done)
                writer.add_image("images/reconstruction", panels[2], done)
                writer.add_image("images/input_masked_reconstruction", torch.cat(panels, dim=2), done)
            if done % cfg.save_every == 0 and done != cfg.steps:
                save_latest(done)
        save_latest(cfg.steps)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
        del it

    # ---- final checkpoint: the segmentation network, encoder pretrained, decoder fresh ---------------
    path = os.path.join(cfg.out, FINAL)
    if main:
        fresh = build_downstream_network(cfg.arch, cfg.plans, cfg.configuration, cfg.in_channels, cfg.out_channels,
                                         seed=cfg.seed, network_kwargs=cfg.net_kwargs or None)
        weights = export_network_weights({k: v.cpu() for k, v in model.encoder_state_dict().items()}, fresh,
                                         cfg.arch)
        final = {
            "network_weights": weights,
            "arch": cfg.arch,
            "network_builder": info["builder"],
            "network_kwargs": describe(cfg.net_kwargs),
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "plans": cfg.plans,
            "configuration": cfg.configuration if cfg.plans else None,
            "patch_size": cfg.patch,
            "spacing": cfg.spacing,
            "intensity": dataclasses.asdict(intensity),
            "pretrained_modules": list(ENCODER_MODULES[cfg.arch]),
            "pretrained_keys": encoder_state_keys(fresh, cfg.arch),
            "decoder_init_seed": cfg.seed,
            "step": cfg.steps,
            "world_size": world,
            "global_batch_size": global_batch,
            "pretrain_config": cfg.to_json(),
            "format": CHECKPOINT_FORMAT,
        }
        _atomic_save(final, path)
    ctx.barrier()
    return {"final_checkpoint": path, "steps": cfg.steps, "start_step": start, "losses": losses,
            "crops_per_s": float(np.median(crops_per_s)) if crops_per_s else None, "volumes": len(found.items),
            "device": str(device), "world_size": world, "rank": ctx.rank, "global_batch_size": global_batch,
            "peak_lr": lr}
