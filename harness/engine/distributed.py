"""Multi-GPU training with ``torch.distributed``: one process per GPU, DDP on a global batch.

Launch any ``python -m harness run ...`` under ``torchrun --nproc-per-node G`` (or under
Slurm with one task per GPU; ``--executor submitit --gpus-per-job G`` does that): every rank
runs the same jobs, rank 0 alone takes the locks, writes checkpoints and records and
evaluates. The training loop (``harness.engine.train``) then trains data-parallel at the suite's
global batch size: each rank takes its contiguous share of every global batch, augments it
with the parameters a single process would draw for those rows, BatchNorm layers become
global (:func:`sync_batchnorm`; those split into groups by design, MoCo's, keep each rank's groups), adapters
gather what their losses couple across samples (:func:`gather_with_grad`) and DDP averages the gradients. A
deterministic method therefore follows the single-process run at the same global batch up to float reduction
order.

Also here: the process layout from torchrun's or Slurm's environment and the process group
(:func:`init_distributed`), rank queries, per-rank sharding of a split's indices
(:func:`shard_indices`), a check that every rank uses the same split manifest
(:func:`assert_same_everywhere`) and small collectives the runner uses.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.engine.seeding import epoch_order
from harness.errors import UsageError
from harness.models.batchnorm import SplitBatchNorm, batchnorm_like


@dataclass(frozen=True)
class DistEnv:
    """The process layout of one process: global rank, world size, rank on its node, rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "none"  # "torchrun" | "slurm" | "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, bracket = m.group(1), m.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def _env_int(env: Mapping[str, str], name: str, default: int | None = None, low: int = 0,
             high: int | None = None) -> int:
    """The launcher variable ``name`` as an integer in [low, high] (high None: unbounded), or ``default`` when unset:
    a malformed one stops with one line naming it, not a ValueError traceback from int()."""
    raw = env.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise UsageError(f"environment variable {name}={raw!r} must be an integer {bounds} (set by torchrun or "
                         f"Slurm for a data-parallel launch; unset it to run in one process)")
    return value


def env_from(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The layout from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
    Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID); torchrun
    wins when both are set. Without either: a single process. A malformed variable (not an integer, a rank
    outside the world size, a port out of range) is a :class:`UsageError` naming it: the rendezvous of a rank
    that cannot exist would otherwise wait for hours."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE")
        return DistEnv(_env_int(env, "RANK", high=max(world - 1, 0)), world, _env_int(env, "LOCAL_RANK", 0),
                       env.get("MASTER_ADDR", "127.0.0.1"), _env_int(env, "MASTER_PORT", 29500, 1, 65535), "torchrun")
    if "SLURM_PROCID" in env and _env_int(env, "SLURM_NTASKS", 1) > 1:
        world = _env_int(env, "SLURM_NTASKS")
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        # one port per job so two jobs sharing a node do not collide
        port = (_env_int(env, "MASTER_PORT", low=1, high=65535) if "MASTER_PORT" in env
                else 20000 + _env_int(env, "SLURM_JOB_ID", 0) % 20000)
        try:
            host = env.get("MASTER_ADDR") or first_host(nodes)
        except ValueError as exc:
            raise UsageError(f"{exc} (SLURM_JOB_NODELIST); set MASTER_ADDR to the first node's host name") from None
        return DistEnv(_env_int(env, "SLURM_PROCID", high=world - 1), world, _env_int(env, "SLURM_LOCALID", 0),
                       host, port, "slurm")
    return DistEnv()


def init_distributed(backend: str | None = None, init_method: str | None = None,
                     environ: Mapping[str, str] | None = None, timeout_s: float = 7200.0) -> DistEnv:
    """Initialise the default process group from the environment (see :func:`env_from`).

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without; with CUDA each process
    is pinned to GPU ``local_rank``. ``init_method`` defaults to ``tcp://MASTER_ADDR:MASTER_PORT``.
    A single process (no launcher variables) initialises nothing and returns rank 0 of 1;
    an already initialised group is left as it is.
    """
    info = env_from(environ)
    if not info.distributed or dist.is_initialized():
        return info
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda and backend == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method or f"tcp://{info.master_addr}:{info.master_port}",
                            rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    global _host_group
    if backend != "gloo":
        try:  # every rank, at the same point: a group's creation is collective
            _host_group = dist.new_group(backend="gloo")
        except (RuntimeError, ValueError):  # a torch built without gloo: host values go through the GPU group
            _host_group = None
    return info


#: A gloo group over all ranks beside an NCCL default group (see :func:`host_values_group`).
_host_group = None


def host_values_group():
    """(group, device) for collectives on small host-side values (rank 0's clock, batch sizes): a gloo group
    of CPU tensors where there is one, so that they never wait for a GPU's queue of work; the default group
    otherwise (CPU tensors under gloo, GPU tensors under NCCL)."""
    if _host_group is not None:
        return _host_group, "cpu"
    return None, "cuda" if dist.get_backend() == "nccl" else "cpu"


def cleanup() -> None:
    """Destroy the process group if one is initialised."""
    global _host_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes records, logs and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def shard_indices(indices: Any, epoch: int, rank: int | None = None, world_size: int | None = None,
                  seed: int = 0, even: bool = False) -> np.ndarray:
    """This rank's share of ``indices`` (e.g. ``manifest.split("train")``) for ``epoch``.

    Every rank draws the same permutation (seeded by ``seed`` and ``epoch``) and takes every
    ``world_size``-th element from position ``rank``, so the shards are disjoint and together
    cover each index exactly once per epoch; their sizes differ by at most one. With
    ``even=True`` the last ``len(indices) % world_size`` permuted indices are dropped so every
    rank gets the same count (what a DDP loop needs to keep ranks in step); the dropped ones
    change from epoch to epoch. ``rank``/``world_size`` default to the process group's.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    idx = np.asarray(indices)
    order = epoch_order(len(idx), epoch, seed).numpy()
    if even:
        order = order[:len(order) - len(order) % world_size]
    return idx[order[rank::world_size]]


def assert_same_everywhere(value: str, what: str = "split manifest") -> None:
    """Raise on every rank unless all ranks pass the same string (e.g. ``manifest.sha256``).

    Ranks that built their split manifests independently (different data directories)
    would otherwise silently train on different splits.
    """
    if get_world_size() == 1:
        return
    group, device = host_values_group()
    digest = torch.tensor(list(hashlib.sha256(value.encode()).digest()[:8]), dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(digest) for _ in range(get_world_size())]
    dist.all_gather(gathered, digest, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks disagree on the {what}; every rank must use the same one")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        group, device = host_values_group()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=device), group=group)
        sizes = [int(s.item()) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"gather_with_grad needs the same batch size on every rank, got {sizes}")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) of every rank in rank order, (world*n, ...), keeping gradients.

    For contrastive negatives across GPUs: ``nt_xent(gather_with_grad(z1), gather_with_grad(z2), T)``
    is the loss of the global batch. Gradient convention (the one SimCLR/solo-learn use): the
    backward pass sums the gradients of every rank's loss with respect to this rank's rows, so
    after DDP's gradient *averaging* the parameters get exactly the gradient of the mean of the
    ranks' losses, i.e. of the single-process loss on the concatenated batch when every rank
    computes that loss (the input gradient on each rank is then ``world_size`` times the
    single-process one, which DDP's averaging divides back). Without a process group (or with
    one process) it returns ``x`` unchanged. Every rank must pass the same batch size.
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_cat(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """All-gather without gradient of equal-shaped tensors, concatenated along ``dim`` in rank
    order (``x`` itself with one process): memory-bank updates, queue keys, labels."""
    if get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def all_gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient of row blocks whose lengths differ by rank, concatenated in rank order."""
    if get_world_size() == 1:
        return x
    sizes = all_gather_cat(torch.tensor([len(x)], device=x.device)).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    blocks = all_gather_cat(padded[None])
    return torch.cat([block[:size] for block, size in zip(blocks, sizes)])


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` (identity with one process and factor 1)."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


def check_batch_split(batch_size: int, world: int) -> None:
    """A global batch of ``batch_size`` must give every one of ``world`` ranks as many rows."""
    if batch_size % world:
        raise UsageError(f"batch_size {batch_size} does not split over {world} ranks; use a multiple of {world}")


def own_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's ``n`` rows of a tensor gathered over ranks in rank order (all of ``x`` with one process)."""
    rank = get_rank()
    return x[rank * n:(rank + 1) * n]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions only rank 0 may take: locks, what is stored)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (no gradient); ``x`` itself with one process."""
    if get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / get_world_size()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too (every rank's loss
    depends on every rank's input), which DDP's gradient averaging then divides by the world size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks' rows).

    The mean and variance come from differentiable all-reduces of per-channel sums (every rank
    holds the same number of rows; :class:`_AllReduceSum`'s backward sums the gradients over
    ranks, the same convention as :func:`gather_with_grad`), so the
    forward and the gradients are those of a single process holding the whole batch. Used on
    every device: on CPU (gloo) ``torch.nn.SyncBatchNorm`` does not run, and on CUDA it indexes
    its per-rank counts with a boolean mask, which makes the host wait for the GPU in every
    BatchNorm layer of every forward pass. Evaluation mode is plain BatchNorm with the running
    statistics.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dimensions (N, C, ...), got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        dims, c = [0, *range(2, x.dim())], x.shape[1]
        xf = x.float()
        count = x.numel() // c * get_world_size()
        # two passes (mean, then squared deviations) as BatchNorm does: E[x^2] - E[x]^2 loses digits
        # whenever a channel's mean is large against its spread
        mean = _AllReduceSum.apply(xf.sum(dims)) / count
        shape = [1, c] + [1] * (x.dim() - 2)
        var = _AllReduceSum.apply((xf - mean.view(shape)).pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * count / max(count - 1, 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by :class:`GlobalBatchNorm` (statistics of the global batch), in
    place; returns ``module``. Parameters, buffers and state-dict keys are kept, so checkpoints load into
    the plain model. A :class:`~harness.models.batchnorm.SplitBatchNorm` is left alone: it normalises groups
    of the batch apart by design (MoCo's shuffled keys, and its queries in the CIFAR demo's recipe), each
    rank its own groups.
    """
    for name, child in module.named_children():
        if isinstance(child, SplitBatchNorm):
            continue
        if isinstance(child, _BatchNorm) and not isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm)):
            setattr(module, name, batchnorm_like(GlobalBatchNorm, child))
        else:
            sync_batchnorm(child)
    return module
