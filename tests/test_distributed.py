"""harness.engine.distributed on two gloo processes on CPU: gathered NT-Xent equals one process on the
concatenated batch (loss and gradients), NPID's NCE normaliser is the global batch's on every rank,
sharding covers every index once per epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.engine import distributed as hd
from harness.engine.seeding import epoch_order
from methods.losses import nt_xent

WORLD = 2
N_PER_RANK, DIM_IN, DIM_OUT, T = 6, 5, 4, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(WORLD * N_PER_RANK, DIM_IN, generator=g), torch.randn(WORLD * N_PER_RANK, DIM_IN, generator=g)
    w = torch.randn(DIM_IN, DIM_OUT, generator=g)
    return x1, x2, w


def _single_process():
    """Loss and gradients on the whole batch in one process: the reference."""
    x1, x2, w = _data()
    x1, x2, w = x1.requires_grad_(), x2.requires_grad_(), w.requires_grad_()
    loss = nt_xent(x1 @ w, x2 @ w, T)
    loss.backward()
    return loss.detach(), w.grad, x1.grad, x2.grad


def _nce_first_step(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, loss) of NPID's NCE at the first step of a fresh bank, on ``rows`` of a fixed batch."""
    from methods.memory import MemoryBank

    torch.manual_seed(0)
    bank = MemoryBank(50, DIM_OUT)
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(WORLD * N_PER_RANK, DIM_OUT, generator=g), dim=1)
    index, noise = torch.randperm(50, generator=g)[:WORLD * N_PER_RANK], torch.randint(50, (WORLD * N_PER_RANK, 7),
                                                                                         generator=g)
    loss = bank.nce_loss(f[rows], index[rows], noise[rows], 0.1)
    return bank.log_z, loss.detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)}
    info = hd.init_distributed("gloo", init_method=f"file://{init_file}", environ=env)
    try:
        assert info.source == "torchrun" and hd.get_world_size() == WORLD and hd.is_main() == (rank == 0)
        # --- gather_with_grad: NT-Xent with negatives from both ranks
        x1, x2, w = _data()
        part = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        x1, x2, w = x1[part].clone().requires_grad_(), x2[part].clone().requires_grad_(), w.requires_grad_()
        loss = nt_xent(hd.gather_with_grad(x1 @ w), hd.gather_with_grad(x2 @ w), T)
        loss.backward()
        wgrad = w.grad.clone()
        dist.all_reduce(wgrad)  # what DDP does with parameter gradients: the mean over ranks
        wgrad /= WORLD
        ref_loss, ref_w, ref_x1, ref_x2 = _single_process()
        torch.testing.assert_close(loss.detach(), ref_loss)
        torch.testing.assert_close(wgrad, ref_w)
        torch.testing.assert_close(x1.grad / WORLD, ref_x1[part])
        torch.testing.assert_close(x2.grad / WORLD, ref_x2[part])
        # --- NPID's NCE normaliser: estimated from the global batch, the same on every rank
        nce_log_z, nce_loss = _nce_first_step(slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK))
        ref_log_z, ref_nce_loss = _nce_first_step(slice(None))
        everyone = hd.all_gather_cat(nce_log_z.reshape(1))
        torch.testing.assert_close(everyone, ref_log_z.expand(WORLD))
        torch.testing.assert_close(hd.all_reduce_mean(nce_loss), ref_nce_loss)
        # --- sharding: disjoint, complete, same on every rank's view, new order each epoch
        train_idx = np.arange(3, 3 + 2 * 101, 2)  # an odd count: shards of 51 and 50
        shards = {}
        for epoch in range(3):
            mine = hd.shard_indices(train_idx, epoch, seed=7)
            everyone = [None] * WORLD
            dist.all_gather_object(everyone, mine.tolist())
            shards[epoch] = everyone
            even = hd.shard_indices(train_idx, epoch, seed=7, even=True)
            lens = [None] * WORLD
            dist.all_gather_object(lens, len(even))
            assert lens == [len(train_idx) // WORLD] * WORLD
        # --- the same manifest everywhere; a different one is refused on every rank
        hd.assert_same_everywhere("sha-of-the-manifest")
        with pytest.raises(RuntimeError, match="disagree"):
            hd.assert_same_everywhere(f"manifest-{rank}")
        if hd.is_main():
            torch.save({"loss": loss.detach(), "shards": shards}, Path(out_dir) / "out.pt")
        hd.barrier()
    finally:
        hd.cleanup()


def test_two_gloo_ranks_match_one_process(tmp_path):
    # spawn, not fork: a child forked after this process ran OpenMP work can hang in its first parallel op
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    torch.testing.assert_close(out["loss"], _single_process()[0])
    train_idx = list(range(3, 3 + 2 * 101, 2))
    for shards in out["shards"].values():
        assert sorted(shards[0] + shards[1]) == train_idx  # every index exactly once
        assert {len(s) for s in shards} == {50, 51}
    assert out["shards"][0] != out["shards"][1]  # a new order each epoch
    # the sharding is the same function without a process group (explicit rank/world)
    assert hd.shard_indices(train_idx, 1, rank=1, world_size=2, seed=7).tolist() == out["shards"][1][1]


def test_shard_indices_without_process_group():
    idx = np.arange(1000) * 3
    for world in (1, 3, 8):
        shards = [hd.shard_indices(idx, 4, rank=r, world_size=world, seed=1) for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == idx.tolist()
        again = [hd.shard_indices(idx, 4, rank=r, world_size=world, seed=1) for r in range(world)]
        assert all((a == b).all() for a, b in zip(shards, again))
    # world 1 is the order harness.engine.train uses for that epoch
    assert (hd.shard_indices(idx, 2, rank=0, world_size=1, seed=5) == idx[epoch_order(1000, 2, 5).numpy()]).all()
    with pytest.raises(ValueError, match="outside"):
        hd.shard_indices(idx, 0, rank=2, world_size=2)


def test_env_from_torchrun_slurm_and_none():
    assert hd.env_from({}) == hd.DistEnv()
    assert not hd.env_from({}).distributed and hd.gather_with_grad(torch.ones(2)).tolist() == [1, 1]
    tr = hd.env_from({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.source) == (3, 8, 1, "n1", 1234, "torchrun")
    sl = hd.env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "123456"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.source) == (5, 8, 1, "gpu07", "slurm")
    assert sl.master_port == 20000 + 123456 % 20000
    assert hd.env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1  # a plain sbatch job
    assert hd.first_host("node1,node2") == "node1" and hd.first_host("a-b[001-004]") == "a-b001"
