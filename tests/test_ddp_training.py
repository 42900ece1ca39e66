"""Data-parallel training (two gloo processes on CPU) follows one process at the same global batch.

Every trainable method runs a few steps on digits through the real runner twice: once in this
process, once as two ranks (each with half of every batch, global BatchNorm, gathered negatives,
MoCo's BN shuffled across ranks, DDP-averaged gradients). The trained weights must agree up to
float reduction order, rank 0 alone writes the record, and a rerun of the ranks finds it stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import (KNN_SAME_WEIGHTS_TOLERANCE, assert_trained_alike, initial_weights, make_suite,
                            trained_weights)

WORLD = 2


def _trained_methods() -> list[str]:
    """Every registered method of this repository that trains (a new file in methods/ joins by itself;
    baselines without training and evaluation-time combinations are left out)."""
    from methods import METHODS as REGISTRY

    return [n for n in REGISTRY.names() if REGISTRY.get(n).trains and REGISTRY.get(n).__module__.startswith("methods.")]


METHODS = [*_trained_methods(),
           # InvCls with W split by rows over the ranks (hybrid parallelism); one process holds all of W
           {"name": "invcls", "as": "invcls_sharded", "config": {"shard_classifier": True}},
           # CLD's NPID baseline: the group branch is built but idle (frozen, or DDP's second step fails)
           {"name": "npid_cld", "as": "npid_cld_off", "config": {"cld_weight": 0}},
           # MoCo's query BatchNorm in as many groups as ranks: each rank's rows are one group, whose running
           # statistics are still averaged over the ranks as one process averages its groups'
           {"name": "moco", "as": "moco_group_per_rank", "config": {"bn_splits": WORLD}}]
LABELS = [m if isinstance(m, str) else m["as"] for m in METHODS]
BUDGET = "steps=4"


def _suite():
    return make_suite(METHODS, budget=BUDGET, protocols={"knn": {"k": 20}}, name="ddp")


def _run(results: Path, data: Path, only: str | None = None, checkpoint_seconds: float = 60.0) -> list[dict]:
    from harness.execution.runner import Runner, plan

    runner = Runner(results, data, device="cpu", quiet=True, log=lambda s: None, checkpoint_seconds=checkpoint_seconds)
    return runner.run([job for job in plan(_suite()) if only in (None, job.entry.label)])


def _interrupted_then_resumed(results: Path, data: Path) -> int:
    """The sharded InvCls run dies at its 3rd step on both ranks (checkpoints every step), then reruns;
    returns how many steps the rerun trained."""
    from methods.invcls import InvCls

    original, calls = InvCls.training_step, []

    def dies_once(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(self, batch)

    InvCls.training_step = dies_once
    try:
        with pytest.raises(RuntimeError, match="killed"):
            _run(results, data, "invcls_sharded", checkpoint_seconds=0.0)
        calls.clear()
        _run(results, data, "invcls_sharded", checkpoint_seconds=0.0)
        return len(calls)
    finally:
        InvCls.training_step = original


def _worker(rank: int, init_file: str, results: str, data: str, out: str) -> None:
    from harness.engine import distributed

    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)}
    distributed.init_distributed("gloo", init_method=f"file://{init_file}", environ=env)
    try:
        first = _run(Path(results), Path(data))
        again = _run(Path(results), Path(data))  # everything is stored now: nothing retrains
        steps_after_restart = _interrupted_then_resumed(Path(results + "-resumed"), Path(data))
        summary = {"ranks": [r["train"].get("ranks") for r in first],
                   "metrics_on_this_rank": [bool(r["metrics"]) for r in first],
                   "steps_after_restart": steps_after_restart,
                   "stored_on_rerun": [r["created"] for r in again] == [r["created"] for r in first] if rank == 0 else None}
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(root / "single", data)  # also prepares the data cache the ranks read
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(str(root / "init"), str(root / "ddp"), str(data), str(root)), nprocs=WORLD, join=True)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return root, single, ranks


@pytest.mark.parametrize("method", LABELS + ["invcls_sharded killed and resumed"])
def test_two_ranks_train_the_same_weights_as_one_process(runs, method):
    root, single, _ = runs
    label, _, resumed = method.partition(" ")
    record = next(r for r in single if r["spec"]["label"] == label)
    assert record["status"] == "ok" and record["budget"]["used"]["steps"] == 4
    ref = trained_weights(root / "single", "ddp", record["run_id"])
    ddp = trained_weights(root / ("ddp-resumed" if resumed else "ddp"), "ddp", record["run_id"])
    assert_trained_alike(ref, ddp, initial_weights(root / "single", root / "data", record), method)


def test_rank_zero_alone_evaluates_and_writes_and_a_rerun_trains_nothing(runs):
    """Rank 0 alone evaluates and writes each record; its kNN top-1 is the one-process run's within
    two of the 359 test images. Breakage tried (the ranks patched in a scratch run): rank 0 scoring
    kNN on half of the test split, a shard; SimCLR's top-1 moves by 0.011 and this test fails (the
    old tolerance, 0.6, passed it)."""
    root, single, ranks = runs
    from harness.execution.store import ResultStore

    stored = {r["run_id"]: r for r in ResultStore(root / "ddp", "ddp").records()}
    assert set(stored) == {r["run_id"] for r in single}
    assert all(r["train"]["ranks"] == WORLD for r in stored.values())
    assert ranks[0]["metrics_on_this_rank"] == [True] * len(METHODS)
    assert ranks[1]["metrics_on_this_rank"] == [False] * len(METHODS)
    assert ranks[0]["stored_on_rerun"] is True
    assert [r["steps_after_restart"] for r in ranks] == [2, 2]  # resumed after its 2 checkpointed steps
    for ref in single:  # same weights, same evaluation: kNN accuracy within two of the 359 test images
        ddp = stored[ref["run_id"]]
        gap = abs(ddp["metrics"]["backbone"]["knn/top1"] - ref["metrics"]["backbone"]["knn/top1"])
        assert gap <= KNN_SAME_WEIGHTS_TOLERANCE + 1e-12, (ref["spec"]["label"], gap)


def _shipped_configurations() -> list[tuple[str, str, dict]]:
    """(method, scale, config overrides) of every trained method at both scales' defaults and of every row
    of every shipped suite, each once."""
    from harness.execution.suite import load_suite, shipped_suites

    trained = _trained_methods()
    found = [(name, scale, {}) for name in trained for scale in ("cpu", "paper")]
    for path in shipped_suites().values():
        suite = load_suite(str(path))
        found += [(e.name, suite.scale, e.config) for e in suite.methods if e.name in trained]  # not test throwaways
    unique = {(n, s, json.dumps(c, sort_keys=True)): (n, s, c) for n, s, c in found}
    return list(unique.values())


@pytest.mark.parametrize("name,scale,overrides", _shipped_configurations(),
                         ids=lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
def test_every_trainable_parameter_gets_a_gradient_in_every_step(name, scale, overrides):
    """DDP runs without ``find_unused_parameters``: a trainable parameter that a step leaves without a
    gradient makes its next step fail on every rank. Three steps of each shipped configuration (small CNN,
    8 px, batches of at most 32) count the gradients each parameter accumulates. Breakage tried: the idle
    CLD branch of the ``cld_weight: 0`` rows not frozen (npid and moco of cifar10-instance fail here)."""
    from harness.bench.gpu import synthetic_cifar
    from harness.data.augment import Augmenter, get_preset
    from harness.engine.budget import Budget
    from harness.engine.seeding import seed_everything
    from harness.engine.train import train
    from harness.models.backbones import create_backbone
    from methods import METHODS as REGISTRY, DataInfo, create_method, resolve_config

    steps, cls, data = 3, REGISTRY.get(name), synthetic_cifar(64, 8, seed=1)
    cfg = resolve_config(cls, scale, overrides)
    cfg["batch_size"] = min(cfg["batch_size"], 32)
    labels = {"fine": data.labels, "coarse": data.coarse_labels}.get(cls.label_level, data.labels)
    classes = {"fine": data.num_classes, "coarse": data.num_coarse}.get(cls.label_level)
    generator = seed_everything(0)
    method = create_method(name, create_backbone("small_cnn", 3), cfg, DataInfo(64, data.image_shape, classes))
    counts = {n: 0 for n, p in method.named_parameters() if p.requires_grad}
    for n, p in method.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda _, n=n: counts.__setitem__(n, counts[n] + 1))
    augmenter = Augmenter(get_preset(cfg["augment"], **cfg["augment_overrides"]), data.mean, data.std)
    result = train(method, data.images, torch.as_tensor(labels), Budget("steps", steps), augmenter, cfg,
                   device="cpu", seed=0, generator=generator, quiet=True)
    assert result.status == "ok", result.reason
    assert {n: c for n, c in counts.items() if c != steps} == {}


def test_a_parameter_without_a_gradient_stops_training_with_its_name_before_any_update():
    """An adapter that leaves a trainable parameter idle gets one line naming it at its first step, on one
    process as under DDP (where it would otherwise fail a step later with DDP's reduction error)."""
    from harness.bench.gpu import synthetic_cifar
    from harness.data.augment import Augmenter, get_preset
    from harness.engine.budget import Budget
    from harness.engine.seeding import seed_everything
    from harness.engine.train import train
    from harness.errors import UsageError
    from harness.models.backbones import create_backbone
    from methods import DataInfo, resolve_config
    from methods.simclr import SimCLR

    class WithIdleHead(SimCLR):
        def __init__(self, backbone, cfg, info):
            super().__init__(backbone, cfg, info)
            self.spare = torch.nn.Linear(backbone.out_dim, 3)

    data, cfg = synthetic_cifar(64, 8, seed=1), resolve_config(SimCLR, "cpu")
    method = WithIdleHead(create_backbone("small_cnn", 3), cfg, DataInfo(64, data.image_shape))
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    with pytest.raises(UsageError, match=r"method 'simclr': trainable parameter\(s\) spare.weight, spare.bias got no "
                                         r"gradient.*requires_grad_\(False\)"):
        train(method, data.images, None, Budget("steps", 2), Augmenter(get_preset(cfg["augment"]), data.mean, data.std),
              cfg, device="cpu", seed=0, generator=seed_everything(0), quiet=True)
    assert all(torch.equal(v, dict(method.named_parameters())[k]) for k, v in before.items())  # not updated


def test_torchrun_launch_of_the_cli_trains_each_run_over_two_ranks(tmp_path):
    """``torchrun -m harness run``: one record per run, trained by 2 ranks, and the leaderboard printed once."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's log folder too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "harness", "run", "--methods", "simclr", "--seeds", "0", "--budget", "steps=3", "--device", "cpu",
           "--quiet", "--results-dir", str(tmp_path / "results"), "--leaderboard-dir", str(tmp_path / "lb"),
           "--data-dir", str(tmp_path / "data")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("written: ") == 1 and "data-parallel over 2 processes" in out.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "quick").glob("*.json")]
    assert len(records) == 1 and records[0]["train"]["ranks"] == WORLD and records[0]["status"] == "ok"


def test_a_run_that_cannot_split_over_the_ranks_is_refused_before_any_trains():
    """A data-parallel launch checks every run it would train first: a global batch of 128 over 3 ranks, or MoCo's
    4 query BatchNorm groups over 3 ranks (each rank normalises its own share), is one line naming the run; the
    same runs over 2 or 4 ranks pass. Catches: a run refused only when its turn comes, after others trained."""
    from harness.errors import UsageError
    from harness.execution.runner import check_ranks, plan

    jobs = plan(make_suite(["supervised", {"name": "moco", "config": {"batch_size": 96, "bn_splits": 4}}]))
    for world in (2, 4):
        check_ranks(jobs, world)
    with pytest.raises(UsageError, match=r"^supervised on digits seed 0 \(epochs=2\): batch_size 128 does not split "
                                         r"over 3 ranks; use a multiple of 3$"):
        check_ranks(jobs, 3)
    with pytest.raises(UsageError, match=r"^moco on digits seed 0 \(epochs=2\): bn_splits 4 does not split over 3 "
                                         r"ranks"):
        check_ranks(jobs[1:], 3)


def test_ranks_are_checked_for_runs_that_train_and_for_the_components_of_a_combination():
    """Over 2 ranks: random (which trains nothing) with a batch of 5 passes, simclr with a batch of 5 is refused, and
    thanos (which trains nothing itself) is refused, naming it, when its component supcon_spread has a batch of 5.
    Catches: a run that never trains refused for a batch it never splits, and a combination's components left
    unchecked (the component then failing on its ranks when the combination's turn comes, after others trained)."""
    from harness.errors import UsageError
    from harness.execution.runner import check_ranks, plan

    check_ranks(plan(make_suite([{"name": "random", "config": {"batch_size": 5}}])), 2)
    with pytest.raises(UsageError, match=r"^simclr on digits seed 0 \(epochs=2\): batch_size 5 does not split over 2"):
        check_ranks(plan(make_suite([{"name": "simclr", "config": {"batch_size": 5}}])), 2)
    jobs = plan(make_suite([{"name": "supcon_spread", "config": {"batch_size": 5}}, "thanos"]))
    (thanos,) = [job for job in jobs if job.entry.name == "thanos"]
    with pytest.raises(UsageError, match=r"^thanos on digits seed 0 \(no training\): batch_size 5 does not split "
                                         r"over 2 ranks"):
        check_ranks([thanos], 2)


def test_torchrun_launch_refuses_a_run_that_cannot_split_before_training(tmp_path):
    """``torchrun --nproc-per-node 3 -m harness run`` of a supervised run, then MoCo with 4 query groups: the ranks
    exit 2 with one line each (torchrun then prints its own summary and traceback of the launcher), no frame of the
    harness, and no record: the supervised run, which could split, did not train first."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nscale: cpu\ndatasets: [digits]\nseeds: [0]\nbudget: {steps: 2}\n"
                     "methods: [{name: supervised, config: {batch_size: 96}}, {name: moco, config: {batch_size: 96, "
                     "bn_splits: 4}}]\nprotocols: {knn: {k: 5}}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "harness", "run", str(suite), "--device", "cpu", "--quiet", "--results-dir", str(tmp_path / "results"),
           "--data-dir", str(tmp_path / "data")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr  # torchrun may stop the others as the first exits
    assert lines and all("bn_splits 4 does not split over 3 ranks" in line for line in lines)
    assert "harness/" not in "".join(line for line in out.stderr.splitlines() if line.lstrip().startswith("File "))
    assert not list((tmp_path / "results").rglob("*.json"))
