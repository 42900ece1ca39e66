"""Executors: a local process pool and submitit's local backend give the records an in-process run
gives; only jobs without a record are submitted; a preempted submitit job resumes from its checkpoint."""
from __future__ import annotations

import json
import os
import importlib.util
import shutil
from pathlib import Path

import pytest

from conftest import KNN_SAME_WEIGHTS_TOLERANCE, assert_trained_alike, initial_weights, make_suite, trained_weights
from harness.errors import UsageError
from harness.execution.executors import (SLURM_KEYS, SubmititJob, gpu_assignment, make_submitit_executor, pending_jobs,
                               run_jobs, slurm_options)
from harness.execution.runner import plan

FAST = {"knn": {"k": 10}}
LOCAL = {"cluster": "local", "timeout_min": 10}
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="--executor submitit needs submitit (a dependency of ssl-harness)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kwargs(root: Path, data: Path, **kw) -> dict:
    return {"results_dir": root / "results", "data_dir": data, "device": "cpu", "quiet": True,
            "log": lambda s: None, **kw}


def _metrics(records) -> dict:
    return {r["run_id"]: (r["status"], r["metrics"]) for r in records}


PLUGIN = '''
"""SimCLR that sends itself Slurm's preemption signal once, at its 2nd step, and logs its steps."""
import os
import signal
from pathlib import Path

from methods import METHODS, register_method


@register_method("_preempted_simclr")
class PreemptedSimCLR(METHODS.get("simclr")):
    calls = 0

    def training_step(self, batch):
        type(self).calls += 1
        marker = os.environ.get("PREEMPT_MARKER")
        if marker:
            with open(marker + ".steps", "a") as f:
                f.write(f"{os.getpid()}\\n")
            if type(self).calls == 2 and not Path(marker).exists():
                Path(marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGUSR2)  # submitit: checkpoint() and requeue
        return super().training_step(batch)
'''


@needs_submitit
def test_pool_and_submitit_match_in_process_with_preemption_and_rerun_submits_only_missing(tmp_path, monkeypatch):
    (tmp_path / "preempt_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # submitit's job processes import the plugin too
    import preempt_plugin  # noqa: F401  (registers the method here)

    data = tmp_path / "data"
    simclr = {"name": "_preempted_simclr", "config": {"batch_size": 32}}
    jobs = plan(make_suite(["random", "pixels", simclr], budget="steps=3", protocols=FAST))
    ref = run_jobs(jobs, _kwargs(tmp_path / "a", data), "local", workers=1)  # in this process, no preemption
    assert [r["run_id"] for r in ref] == [j.run_id for j in jobs] and all(r["status"] == "ok" for r in ref)

    pool = run_jobs(jobs, _kwargs(tmp_path / "b", data), "local", workers=2,  # two spawned worker processes
                    plugins=["preempt_plugin"])
    assert _metrics(pool) == _metrics(ref)

    # submitit's local backend: two records are stored already, so only the SimCLR run is submitted;
    # it is preempted in step 2, requeued by submitit and resumes from its step-1 checkpoint.
    root, marker = tmp_path / "c", tmp_path / "preempted"
    (root / "results" / "test").mkdir(parents=True)
    for r in ref[:2]:
        shutil.copy(tmp_path / "a" / "results" / "test" / f"{r['run_id']}.json", root / "results" / "test")
    monkeypatch.setenv("PREEMPT_MARKER", str(marker))
    logs: list[str] = []
    sub = run_jobs(jobs, _kwargs(root, data, checkpoint_seconds=0.0), "submitit", workers=2, slurm=LOCAL,
                   plugins=["preempt_plugin"], log=logs.append)
    assert _metrics(sub) == _metrics(ref) and [r["run_id"] for r in sub] == [j.run_id for j in jobs]
    assert "2 of 3 runs already stored; 1 to run" in logs
    folder = root / "results" / ".submitit" / "test"
    assert len([p for p in folder.iterdir() if p.name.isdigit()]) == 1  # one submitit job
    assert len(list((root / "results" / "test").glob("*.json"))) == 3  # it wrote its own record
    assert marker.exists() and "requeued 1x: resuming" in "".join(p.read_text() for p in folder.rglob("*_log.out"))
    pids = (tmp_path / "preempted.steps").read_text().split()
    attempts = [pids.count(p) for p in dict.fromkeys(pids)]
    assert attempts == [2, 2]  # killed in step 2; the requeued process ran steps 2-3 only: it resumed
    assert sub[2]["budget"]["used"]["steps"] == 3

    logs.clear()
    again = run_jobs(jobs, _kwargs(root, data), "submitit", workers=2, slurm=LOCAL, log=logs.append)
    assert _metrics(again) == _metrics(ref) and logs == ["3 of 3 runs already stored; 0 to run"]
    assert len([p for p in folder.iterdir() if p.name.isdigit()]) == 1  # nothing submitted


GPU_PLUGIN = '''
"""SimCLR that notes, at each step, the process it trains in and the GPUs that process may use."""
import os

from methods import METHODS, register_method


@register_method("_gpu_noting_simclr")
class GpuNotingSimCLR(METHODS.get("simclr")):
    def training_step(self, batch):
        with open(os.environ["GPU_NOTES"], "a") as f:
            f.write(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")
        return super().training_step(batch)
'''


def test_run_without_workers_starts_one_worker_per_visible_gpu(tmp_path, monkeypatch):
    """docs/cluster.md and ``run --help``: without ``--workers`` the command starts one worker per visible
    GPU, each seeing one of them. Two GPUs are made visible through ``CUDA_VISIBLE_DEVICES`` (on a machine
    without any, the workers train on the CPU): both runs train outside this process, each in a worker that
    sees one GPU. Catches ``run`` training every run in its own process whenever ``--workers`` is absent."""
    import yaml

    from harness.cli import main

    (tmp_path / "gpu_plugin.py").write_text(GPU_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the workers import the plugin too
    notes = tmp_path / "notes"
    monkeypatch.setenv("GPU_NOTES", str(notes))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    suite = tmp_path / "g.yaml"
    suite.write_text(yaml.safe_dump({"name": "g", "datasets": ["digits"], "seeds": [0, 1], "budget": "steps=1",
                                     "methods": [{"name": "_gpu_noting_simclr", "config": {"batch_size": 32}}],
                                     "protocols": FAST}))
    assert main(["--plugin", "gpu_plugin", "run", str(suite), "--quiet", "--data-dir", str(tmp_path / "d"),
                 "--results-dir", str(tmp_path / "r")]) == 0
    steps = [line.split() for line in notes.read_text().splitlines()]
    assert len(steps) == 2 and all(pid != str(os.getpid()) and gpus in ("0", "1") for pid, gpus in steps)


@needs_submitit
def test_submitit_callable_is_checkpointable_and_requeues_itself():
    (job,) = plan(make_suite(["random"], protocols=FAST))
    import submitit

    fn = SubmititJob(job, {"results_dir": "r", "data_dir": "d"}, force=True)
    assert isinstance(fn, submitit.helpers.Checkpointable)
    delayed = fn.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is fn
    assert fn.requeues == 1  # a requeued attempt resumes instead of forcing a retrain


@needs_submitit
def test_slurm_executor_gets_partition_gpus_time_and_array_parallelism(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "srun"  # submitit only checks that Slurm's commands exist; nothing is submitted
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    opts = slurm_options({"partition": "suite-part", "array_parallelism": 4}, cluster="slurm", partition="gpu",
                         gpus_per_job=1, timeout_min=720, array_parallelism=None, setup=["module load cuda"])
    assert opts["partition"] == "gpu" and opts["array_parallelism"] == 4  # flags given win, None is "not given"
    ex = make_submitit_executor(tmp_path / "%j", opts, name="harness-quick")
    assert ex.cluster == "slurm"
    params = ex._executor.parameters
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 1 and params["time"] == 720
    assert params["array_parallelism"] == 4 and params["setup"] == ["module load cuda"]
    script = ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=720" in script and "module load cuda" in script
    with pytest.raises(UsageError, match="unknown slurm option 'gpus'"):
        slurm_options(gpus=2)
    with pytest.raises(UsageError, match="unknown slurm option"):
        run_jobs(plan(make_suite(["random"], protocols=FAST)), {"results_dir": tmp_path / "r", "data_dir": tmp_path / "d"},
                 "submitit", slurm={"partitoin": "gpu"})
    assert {"partition", "gpus_per_job", "timeout_min", "array_parallelism"} <= set(SLURM_KEYS)


def test_workers_get_every_visible_gpu_or_only_the_named_one(monkeypatch):
    """``--workers N`` hands its workers the visible GPUs round-robin, but with ``--device cuda:1`` every
    worker gets the command's second GPU (the entry of CUDA_VISIBLE_DEVICES it means). Catches a named GPU
    spread over all of them, each worker then training on a GPU the user did not ask for."""
    from harness.execution.executors import default_local_workers, worker_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert worker_gpus("auto") == worker_gpus("cuda") == ["3", "5"]
    assert worker_gpus("cuda:1") == ["5"] and worker_gpus("cuda:0") == ["3"] and worker_gpus("cpu") == []
    assert gpu_assignment(3, worker_gpus("cuda:1")) == ["5", "5", "5"]
    assert [default_local_workers(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == [2, 2, 1, 1]


def test_gpu_assignment_pending_and_bad_arguments(tmp_path):
    assert gpu_assignment(2, ["3", "5"]) == ["3", "5"]
    assert gpu_assignment(3, ["0", "1"]) == ["0", "1", "0"] and gpu_assignment(2, []) == []
    jobs = plan(make_suite(["random", "pixels"], seeds=[0, 1], protocols=FAST))
    results = tmp_path / "results"
    (results / "test").mkdir(parents=True)
    (results / "test" / f"{jobs[1].run_id}.json").write_text(json.dumps({"run_id": jobs[1].run_id}))
    assert pending_jobs(jobs + jobs, results) == [jobs[0], jobs[2], jobs[3]]
    assert pending_jobs(jobs, results, force=True) == jobs
    kw = {"results_dir": results, "data_dir": tmp_path / "data"}
    with pytest.raises(UsageError, match="unknown executor 'ray'"):
        run_jobs(jobs, kw, "ray")
    with pytest.raises(UsageError, match="workers"):
        run_jobs(jobs, kw, "local", workers=0)


@needs_submitit
def test_multi_gpu_slurm_jobs_get_one_task_per_gpu(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    ex = make_submitit_executor(tmp_path / "%j", slurm_options(cluster="slurm", gpus_per_job=4), name="ddp")
    script = ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script


def test_submitit_jobs_of_several_ranks_are_checked_to_split_before_any_is_submitted(tmp_path, capsys):
    """With ``ranks_per_job`` 3 every submitit job trains over 3 ranks: MoCo's 4 query groups cannot split over
    them, which ``run`` says in one line (exit 2) before submitting anything, so the supervised run before it is
    not trained either. Catches the check made only for a torchrun launch (the job failing on its cluster
    after the others ran)."""
    import yaml

    from harness.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "datasets": ["digits"], "seeds": [0], "budget": "steps=1",
                                     "methods": [{"name": "supervised", "config": {"batch_size": 96}},
                                                 {"name": "moco", "config": {"batch_size": 96, "bn_splits": 4}}],
                                     "protocols": FAST, "slurm": {**LOCAL, "ranks_per_job": 3}}))
    assert main(["run", str(suite), "--executor", "submitit", "--quiet", "--data-dir", str(tmp_path / "d"),
                 "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: moco on digits seed 0 (steps=1): bn_splits 4 does not split over 3 ranks (each rank "
                   "normalises its own groups of queries); use a multiple of 3"]
    assert not list((tmp_path / "r").rglob("*.json"))


@needs_submitit
def test_submitit_job_with_two_ranks_trains_data_parallel(tmp_path):
    """submitit's local backend starts the job as two tasks; they train it as two gloo ranks, to the
    weights one process trains (up to float reduction order, relative to how far training moved each
    tensor) and a kNN top-1 within two of the 359 test images.

    Breakage tried: the ranks' gradients not averaged (a plugin setting ``harness.engine.train._data_parallel``
    to return the bare method in the job's processes): the weight check fails; the old check, kNN
    within 0.6, passed it.
    """
    data = tmp_path / "data"
    (job,) = plan(make_suite(["simclr"], budget="steps=4", protocols=FAST))
    (single,) = run_jobs([job], _kwargs(tmp_path / "single", data), "local", workers=1, slurm={})
    (record,) = run_jobs([job], _kwargs(tmp_path / "ddp", data), "submitit", workers=1,
                         slurm={**LOCAL, "ranks_per_job": 2})
    assert record["train"]["ranks"] == 2 and single["train"]["ranks"] == 1 and record["run_id"] == single["run_id"]
    ref = trained_weights(tmp_path / "single" / "results", "test", job.run_id)
    ddp = trained_weights(tmp_path / "ddp" / "results", "test", job.run_id)
    assert_trained_alike(ref, ddp, initial_weights(tmp_path / "single" / "results", data, single), "simclr")
    gap = abs(record["metrics"]["backbone"]["knn/top1"] - single["metrics"]["backbone"]["knn/top1"])
    assert gap <= KNN_SAME_WEIGHTS_TOLERANCE + 1e-12


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_pool_workers_end_when_their_run_is_killed(tmp_path):
    """``kill -9`` of ``run --workers 2``: its two pool workers end within seconds. Catches the workers left behind
    (seen 100 s after the kill: both alive, idle on the dead parent's queue, with torch and the data in memory,
    and the runs not yet dispatched never run)."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "datasets": ["digits"], "methods": ["random"], "seeds": list(range(8)),
                                     "budget": {"steps": 1}, "protocols": {"knn": {"k": 5}}}))
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.Popen([sys.executable, "-m", "harness", "run", str(suite), "--workers", "2", "--quiet",
                            "--results-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d")],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(workers := [p for p in _children(run.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]) < 2:
            assert run.poll() is None and time.monotonic() < deadline, "the pool never started"
            time.sleep(0.2)
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while (alive := [p for p in workers if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive == [], "pool workers outlived their killed run"
    finally:  # whatever is left, also the orphans the old code left
        for pid in [run.pid, *_children(run.pid), *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_slurm_counts_take_their_least_value_and_other_types_are_refused():
    """Every count at its least value (0 GPUs, 1 rank, 1 minute, 0 requeues, no signal delay) is valid; a boolean
    count, no memory and a number where a name goes are each one line naming the option. Catches: the least value
    refused ('<=' for '<'), True taken as the count 1, 0 GB of memory passed to Slurm, and a partition that is not
    text."""
    from harness.execution.executors import check_slurm_options

    least = {"gpus_per_job": 0, "ranks_per_job": 1, "cpus_per_task": 1, "timeout_min": 1, "array_parallelism": 1,
             "max_num_timeout": 0, "signal_delay_s": 0, "mem_gb": 0.5, "partition": "gpu"}
    assert check_slurm_options(least) == least
    for bad, message in [({"gpus_per_job": True}, "gpus_per_job must be a whole number of at least 0, got True"),
                         ({"mem_gb": 0}, "mem_gb must be a positive number, got 0"),
                         ({"partition": 5}, "partition must be a string, got 5")]:
        with pytest.raises(UsageError, match=f"^slurm: {message}$"):
            check_slurm_options(bad)


def test_plain_runs_are_the_first_wave_and_combinations_the_second():
    """A suite listing thanos (a combination of supcon_spread and cond_autoencoder) before random: the first wave is
    the plain run, the second the combination, whose components must be trained before it. Catches: the waves
    swapped (a combination's workers then training its components themselves, at once with other workers)."""
    from harness.execution.executors import _waves

    thanos, random = plan(make_suite(["thanos", "random"], protocols=FAST))
    assert "components" in thanos.spec and "components" not in random.spec
    assert _waves([thanos, random]) == [[random], [thanos]]
    assert _waves([random]) == [[random]]


@needs_submitit
def test_workers_are_the_array_parallelism_only_where_the_slurm_options_leave_it_open(tmp_path, monkeypatch):
    """``--workers 3`` with submitit is the array's parallelism when the slurm options give none, and does not
    override one they give (5). Catches: --workers overriding a suite's array_parallelism."""
    import harness.execution.executors as executors

    seen = []
    monkeypatch.setattr(executors, "_prepare_data", lambda jobs, kwargs: None)
    monkeypatch.setattr(executors, "_run_submitit", lambda jobs, kwargs, workers, slurm, *rest:
                        seen.append(slurm.get("array_parallelism")) or [])
    jobs = plan(make_suite(["random"], protocols=FAST))
    kw = {"results_dir": tmp_path / "r", "data_dir": tmp_path / "d"}
    run_jobs(jobs, kw, "submitit", workers=3, slurm={"array_parallelism": 5})
    run_jobs(jobs, kw, "submitit", workers=3)
    assert seen == [5, 3]


@needs_submitit
def test_a_requeued_submitit_job_resumes_instead_of_retraining(monkeypatch):
    """A forced job's first attempt forces a fresh run; its requeued attempt (after a preemption) does not, so it
    resumes from its checkpoint. Catches: force applied to every attempt (a preempted run trained from scratch each
    time it is requeued)."""
    import harness.execution.executors as executors

    forced = []
    monkeypatch.setattr(executors, "_init_job_ranks", lambda: None)
    monkeypatch.setattr(executors, "_run_in_process", lambda job, kwargs, force, gpu=None: forced.append(force))
    (job,) = plan(make_suite(["random"], protocols=FAST))
    fn = SubmititJob(job, {"results_dir": "r", "data_dir": "d"}, force=True)
    fn()
    fn.checkpoint()
    fn()
    assert forced == [True, False]
