"""InvCls's hybrid-parallel loss equals the dense one: two gloo processes on CPU, W sharded by class."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from methods.invcls import sharded_instance_loss, smoothed_instance_loss

WORLD, BATCH, DIM, TEMPERATURE = 2, 6, 8, 0.15
SHARDS = [(0, 7), (7, 13)]  # uneven class shards of N = 13 (offset, end)


def problem():
    """The same features, targets and W on every rank (float64 so equality is tight)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    weight = torch.randn(SHARDS[-1][1], DIM, generator=g, dtype=torch.float64)
    targets = torch.randint(SHARDS[-1][1], (WORLD * BATCH,), generator=g)
    return z, weight, targets


def check(rank: int, alpha: float, k: int) -> None:
    z, weight, targets = problem()
    dense_z, dense_w = z.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = F.normalize(dense_z, dim=1) @ F.normalize(dense_w, dim=1).t() / TEMPERATURE
    dense = smoothed_instance_loss(logits, targets, alpha, k)
    dense.backward()

    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    start, end = SHARDS[rank]
    local_z, shard = z[rows].clone().requires_grad_(), weight[start:end].clone().requires_grad_()
    loss = sharded_instance_loss(local_z, targets[rows], shard, start, TEMPERATURE, alpha, k)
    loss.backward()

    torch.testing.assert_close(loss, dense)
    torch.testing.assert_close(shard.grad, dense_w.grad[start:end])
    torch.testing.assert_close(local_z.grad, dense_z.grad[rows])


def worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        check(rank, alpha=0.2, k=3)  # smoothing over the hardest classes, which span both shards
        check(rank, alpha=0.0, k=0)  # plain cross-entropy
    finally:
        dist.destroy_process_group()


def test_sharded_loss_and_gradients_equal_dense(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def adapter_worker(rank: int, init_file: str) -> None:
    """Two ranks each hold a block of W (rows 0-6 and 7-12 of N = 13): the contrastive prior fills
    this rank's rows from the whole training set, a checkpoint holds the whole W, and loading it gives
    each rank its block back."""
    from methods import DataInfo, resolve_config
    from methods.invcls import InvCls

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        n = SHARDS[-1][1]
        images = torch.randn(n, 1, 2, 3, generator=torch.Generator().manual_seed(1))
        loader = [(images[:8], torch.arange(8)), (images[8:], torch.arange(8, n))]  # blocks cross the shards
        cfg = resolve_config(InvCls, "cpu", {"feat_dim": 4, "head_hidden": 5, "shard_classifier": True})
        torch.manual_seed(2)  # the same encoder on both ranks
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
        backbone.out_dim = 3
        method = InvCls(backbone, cfg, DataInfo(n, (1, 2, 3)))
        method.on_train_start(loader)
        with torch.no_grad():
            prior = method.embed(method.backbone(images))  # w_i <- normalise(z_i) of every image
        start, end = SHARDS[rank]
        torch.testing.assert_close(method.classifier.detach(), prior[start:end])
        state = method.state_dict()
        torch.testing.assert_close(state["classifier"], prior)
        torch.manual_seed(3)
        restored = InvCls(backbone, cfg, DataInfo(n, (1, 2, 3)))
        restored.load_state_dict(state)
        torch.testing.assert_close(restored.classifier.detach(), prior[start:end])
    finally:
        dist.destroy_process_group()


def test_sharded_adapter_prior_fills_its_rows_and_checkpoints_hold_the_whole_classifier(tmp_path):
    """Catches the prior written at the global image ids into the rank's block (rank 1's ids 7-12 are its
    local rows 0-5), a checkpoint holding only one block, or a restored rank keeping the whole W."""
    mp.spawn(adapter_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
