"""Helpers for multi-GPU training with ``torch.distributed`` (one process per GPU).

What is here: reading the process layout from torchrun's or Slurm's environment and
initialising the process group (:func:`init_distributed`), rank queries (:func:`is_main`,
:func:`get_rank`, :func:`get_world_size`), per-rank sharding of a split's training indices
that is deterministic per epoch and covers every index exactly once (:func:`shard_indices`),
a check that every rank uses the same split manifest (:func:`assert_same_everywhere`), and
:func:`gather_with_grad`, an all-gather whose result keeps gradients so contrastive losses
see the negatives of every rank.

The harness's training loop (``harness.train``) does not use these yet: it trains one run
per process. Wiring DDP into it is future work; these pieces are tested on their own (two
gloo processes on CPU) so that a multi-GPU adapter or loop can be built on them.

Launch a script that uses them with ``torchrun --nproc-per-node 4 script.py`` or, on Slurm,
``srun --ntasks-per-node 4 --gpus-per-node 4 python script.py``; :func:`init_distributed`
reads either environment.
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

#: Same seed mixing as ``harness.train`` uses for its per-epoch data order.
EPOCH_SEED_STRIDE = 1_000_003


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


def env_from(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The layout from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
    Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID); torchrun
    wins when both are set. Without either: a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        # one port per job so two jobs sharing a node do not collide
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or first_host(nodes), port, "slurm")
    return DistEnv()


def init_distributed(backend: str | None = None, init_method: str | None = None,
                     environ: Mapping[str, str] | None = None, timeout_s: float = 1800.0) -> DistEnv:
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
    return info


def cleanup() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation of ``range(n)`` for ``epoch``: the one ``harness.train`` uses, identical on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))


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
    digest = torch.tensor(list(hashlib.sha256(value.encode()).digest()[:8]), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        digest = digest.cuda()
    gathered = [torch.zeros_like(digest) for _ in range(get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks disagree on the {what}; every rank must use the same one")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradients over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
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
