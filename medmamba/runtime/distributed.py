"""torch.distributed plumbing for pretraining and training on several processes (see docs/distributed.md).

We use the engines users already have: processes are launched by ``torchrun`` (or ``srun torchrun``),
which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and joins the process group (NCCL on GPUs, gloo on CPU).

* :class:`DistContext`: rank, world size, device, and the few collectives the training loops need
  (barrier, mean of a float, broadcast of a picklable object).
* :class:`SyncBatchNorm` / :func:`convert_sync_batchnorm`: ``torch.nn.SyncBatchNorm`` only synchronises
  CUDA (and XPU/HPU) tensors and DDP refuses it in CPU modules; the converter uses torch's class on
  CUDA and ours on CPU (gloo), so a 2-process CPU run computes what one process does on the whole
  batch. :func:`synced_moments` is that computation (masked or not), reused by MambaMIM's
  masked batch norm.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistContext", "init_distributed", "launched_by_torchrun", "SyncBatchNorm", "convert_sync_batchnorm", "rewrap_ddp",
           "synced_moments", "sync_active"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when the torchrun / torch.distributed.run environment is set (even for one process)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


@dataclass
class DistContext:
    """Where this process stands in the job. ``world_size == 1`` and ``backend is None``: no process group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean(self, value: float) -> float:
        """Mean of a float over all ranks (for logging)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast(self, obj=None, src: int = 0):
        """``obj`` of rank ``src`` on every rank (picklable objects; tensors travel through pickle)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def agree(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0 and give every rank its result, or raise its exception on every rank, so
        one rank's error (a missing file, a refused overwrite) never leaves the others waiting."""
        if not self.distributed:
            return fn(*args, **kwargs)
        if self.is_main:
            try:
                result = ("ok", fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                result = ("error", exc)
        else:
            result = None
        status, value = self.broadcast(result)
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str | torch.device | None = None, timeout_min: float = 30.0) -> DistContext:
    """Join the process group described by the torchrun environment, or return a single-process context.

    ``device``: "cuda", "cpu" or None (CUDA when available). With CUDA each process uses GPU
    ``LOCAL_RANK`` and the NCCL backend; on CPU, gloo. A process group that already exists (e.g. made by
    the caller) is used as it is.
    """
    want = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available here (use --device cpu)")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
        dev = torch.device("cuda", local) if want.type == "cuda" else want
        return DistContext(rank, world, local, dev, dist.get_backend(), owns_group=False)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        dev = want
        if want.type == "cuda" and want.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this PyTorch build has no torch.distributed")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible on this "
                               f"node: use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    kwargs = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_min)}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistContext(rank, world, local, dev, backend, owns_group=True)


# ---- synchronised batch statistics ---------------------------------------------------------------------

def sync_active(process_group=None) -> bool:
    """Whether batch statistics must be combined across processes (a group of more than one process)."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(process_group or dist.group.WORLD) > 1)


class _SumOverRanks(torch.autograd.Function):
    """Differentiable all-reduce (sum). Every rank's loss depends on the sum, so the gradient of each
    rank's input is the sum of the ranks' output gradients (what SyncBatchNorm's backward does)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return _SumOverRanks.apply(t, group or dist.group.WORLD)


def synced_moments(x: torch.Tensor, dims: tuple, mask: torch.Tensor | None = None, process_group=None):
    """Mean, biased variance (both shaped to broadcast against ``x``) and element count of ``x`` over
    ``dims`` and over every rank of the group, restricted to ``mask`` (broadcastable to ``x``, the same for
    every channel, 1 = counted) when given. Differentiable; two-pass (mean first), float32."""
    xf = x.float()
    mf = mask.float() if mask is not None else None
    keep = [1 if d in dims else s for d, s in enumerate(x.shape)]
    if mf is None:
        n = 1
        for d in dims:
            n *= x.shape[d]
        count = torch.full((1,), float(n), device=x.device)
        total = xf.sum(dims).reshape(-1)
    else:
        count = mf.sum(dims).reshape(-1)[:1]  # the mask is the same for every channel
        total = (xf * mf).sum(dims).reshape(-1)
    packed = torch.cat([total, count.to(total.dtype)])
    if sync_active(process_group):
        packed = _all_reduce(packed, process_group)
    total, count = packed[:-1], packed[-1:].clamp(min=1.0)
    mean = (total / count).reshape(keep)
    dev = (xf - mean) if mf is None else (xf - mean) * mf
    sq = (dev * dev).sum(dims).reshape(-1)
    if sync_active(process_group):
        sq = _all_reduce(sq, process_group)
    var = (sq / count).reshape(keep)
    return mean, var, count.detach()


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every rank's batch, on CPU (gloo) too.

    ``torch.nn.SyncBatchNorm`` raises on CPU tensors and DistributedDataParallel refuses it in CPU
    modules, so :func:`convert_sync_batchnorm` uses torch's class for CUDA modules and this one
    elsewhere. Same parameters, buffers and state-dict keys as ``BatchNorm*d``; outside a multi-process
    group, or in eval mode, it is a plain batch norm.
    """

    process_group = None

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        group = self.process_group
        if not self.training or not sync_active(group):
            return super().forward(input)
        self._check_input_dim(input)
        dims = (0,) + tuple(range(2, input.dim()))
        mean, var, count = synced_moments(input, dims, process_group=group)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count.item())
                unbiased = var.reshape(-1) * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.reshape(-1).to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        y = (input.float() - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.float().view(shape)
        if self.bias is not None:
            y = y + self.bias.float().view(shape)
        return y.to(input.dtype)


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` becomes a synchronised batch norm keeping its parameters and
    buffers: ``torch.nn.SyncBatchNorm`` when the module is on CUDA, our :class:`SyncBatchNorm`
    otherwise. Returns the (possibly new) module, like torch's converter. Call it after ``.to(device)``."""
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.device.type in ("cuda", "xpu", "hpu") for t in tensors):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) in _PLAIN_BN:
            m.__class__ = SyncBatchNorm
            m.process_group = process_group
    return module


def rewrap_ddp(network: nn.Module) -> nn.Module:
    """Build DistributedDataParallel again around the same module, with the same settings.

    DDP registers its gradient hooks for the parameters that require grad when it is built; after
    freezing or unfreezing some (Swin-UMamba's frozen-encoder epochs) the old wrapper would wait for
    gradients that never come. Anything that is not DDP is returned unchanged.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(network, DistributedDataParallel):
        return network
    return DistributedDataParallel(
        network.module, device_ids=network.device_ids, output_device=network.output_device,
        broadcast_buffers=network.broadcast_buffers, process_group=network.process_group,
        find_unused_parameters=network.find_unused_parameters,
        gradient_as_bucket_view=network.gradient_as_bucket_view)
