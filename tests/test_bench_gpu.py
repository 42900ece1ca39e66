"""``bench gpu --smoke`` and the harness without its optional packages (issue 15).

The GPU machine this harness is taken to has no faiss, optuna or submitit and installs nothing,
so these tests run the CLI in a subprocess where importing those packages (and jinja2,
tensorboard, wandb) fails, as it does there.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.bench.gpu import _split
from harness.bench.profile import StepProfile, summarise

ROOT = Path(__file__).resolve().parents[1]
#: Not on the GPU machine; the optional packages besides them (jinja2, for the .tex and .html tables
#: of `run`, tensorboard) are there.
NOT_ON_GPU_MACHINE = ("faiss", "optuna", "submitit", "wandb")
MISSING = NOT_ON_GPU_MACHINE + ("jinja2", "tensorboard")

#: Runs ``python -m harness ARGS`` with the packages named in argv[1] (comma-separated) unimportable:
#: a meta-path finder ahead of all others.
BLOCKED_HARNESS = """
import runpy, sys

missing = set(sys.argv[1].split(","))

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
sys.argv = ["harness", *sys.argv[2:]]
runpy.run_module("harness", run_name="__main__", alter_sys=True)
"""


def harness_without_optional_packages(*args: str, cwd: Path, missing=MISSING,
                                      temp_dir: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess where ``missing`` packages fail to import; ``temp_dir`` is its TMPDIR."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           **({"TMPDIR": str(temp_dir)} if temp_dir else {})}
    return subprocess.run([sys.executable, "-c", BLOCKED_HARNESS, ",".join(missing), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """``benchmark -> cells`` of the markdown table's body."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_list_and_bench_gpu_smoke_run_without_the_optional_packages(tmp_path):
    """``harness list`` and ``bench gpu --smoke`` work with faiss, optuna, submitit, jinja2, tensorboard
    and wandb unimportable; the smoke table goes to a temporary file, not leaderboards/, and holds a
    row per asked method plus kNN, both Sinkhorn precisions and k-means, each with a positive rate.

    Catches: a module-level import of an optional package on these paths, a smoke run that writes
    into leaderboards/, a benchmark row that goes missing or reports nothing."""
    listed = harness_without_optional_packages("list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "npid_cld" in listed.stdout
    committed = ROOT / "leaderboards" / "bench-gpu.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    smoke = harness_without_optional_packages("bench", "gpu", "--smoke", "--methods", "simclr,sela", cwd=ROOT,
                                              temp_dir=tmp_path)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    written = Path(smoke.stdout.strip().splitlines()[-1].removeprefix("written: "))
    assert written.is_file() and tmp_path in written.parents
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
    rows = table_rows(written.read_text())
    assert set(rows) == {"simclr", "simclr (deterministic: false)", "sela", "knn torch", "sinkhorn float64 chunks", "sinkhorn float32 chunks",
                         "kmeans torch"}
    for name, cells in rows.items():
        rate = float(cells[2])
        assert math.isfinite(rate) and rate > 0, (name, cells)
    assert rows["simclr"][3] == "images/s" and float(rows["simclr"][5]) > 0  # ratio to the bare backbone


def test_run_trains_and_evaluates_with_the_gpu_machines_packages(tmp_path):
    """``harness run`` trains, evaluates (kNN and k-means fall back to torch without faiss) and writes
    its record and leaderboard with faiss, optuna, submitit and wandb unimportable.

    Catches: a module-level import of those packages anywhere on the run path, a protocol that
    needs faiss by default."""
    done = harness_without_optional_packages(
        "run", "quick", "--methods", "simclr", "--seeds", "0", "--budget", "steps=1", "--results-dir", "r",
        "--leaderboard-dir", "lb", "--data-dir", str(tmp_path / "data"), "--quiet", cwd=tmp_path,
        missing=NOT_ON_GPU_MACHINE)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "r" / "quick").glob("*.json")]
    assert record["status"] == "ok", record["reason"]
    assert {"knn/top1", "clustering/acc"} <= set(record["metrics"]["backbone"]), record["metrics"]


@pytest.mark.parametrize("args, package", [
    (("tune", "simclr", "digits", "--trials", "1", "--budget", "steps=1"), "optuna"),
    (("run", "quick", "--methods", "simclr", "--seeds", "0", "--executor", "submitit", "--results-dir", "r"),
     "submitit"),
    (("bench", "protocols", "--quick"), "faiss"),
])
def test_asking_for_a_missing_optional_package_is_a_one_line_usage_error(args, package, tmp_path):
    """tune without optuna, ``--executor submitit`` without submitit and ``bench protocols`` without
    faiss stop with exit code 2 and one line naming the package and how to install it.

    Catches: a traceback (ImportError) instead of the usage error, or a message that does not
    say which package is missing."""
    out = harness_without_optional_packages(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and package in lines[0] and "pip install" in lines[0], out.stderr


def test_training_rows_time_the_deterministic_mode_a_suite_trains_with(monkeypatch):
    """Every method row trains as ``harness run`` trains a suite by default (deterministic algorithms);
    SimCLR's extra rows are --compile (also deterministic), deterministic: false and, after every other row
    (a slow compilation then costs only its own row), the backbone and then the whole step as CUDA graphs
    (compile mode reduce-overhead). Catches: the
    benchmark timing the faster mode that no default run uses (as it did) and calling it the run's speed."""
    import harness.bench.gpu as gpu

    def fake_rate(name, data, backbone, scale, device, steps, data_dir, compile_backbone, deterministic, compile_step):
        calls.append((name, compile_backbone, deterministic, compile_step))
        return 100.0, 8, 2, 1.0, 0.0

    def fake_profile(name, data, backbone, scale, device, deterministic, compile_backbone, compile_step):
        profiled.append((name, compile_backbone, deterministic, compile_step))
        return StepProfile(5, 10.0, 100.0)

    calls, profiled = [], []
    monkeypatch.setattr(gpu, "method_images_per_second", fake_rate)
    monkeypatch.setattr(gpu, "profile_training", fake_profile)
    monkeypatch.setattr(gpu, "floor_images_per_second", lambda *a: 200.0)
    monkeypatch.setattr(gpu, "augment_seconds_per_step", lambda *a: 0.01)
    def protocol_row(name):
        return {"benchmark": name, "rate": 1.0, "unit": "s", "ratio": 1.0}

    monkeypatch.setattr(gpu, "knn_row", lambda *a: protocol_row("knn_row"))
    monkeypatch.setattr(gpu, "kmeans_row", lambda *a: protocol_row("kmeans_row"))
    monkeypatch.setattr(gpu, "sinkhorn_rows", lambda *a: [protocol_row("sinkhorn_rows")])
    monkeypatch.setattr(gpu, "PAPER", {**gpu.PAPER, "images": 16, "side": 8})
    rows = list(gpu.gpu_benchmarks(smoke=False, device="cpu", methods=["simclr", "npid_cld"], log=lambda line: None)
                ["benchmark"])
    assert rows == ["simclr", "simclr --compile", "simclr (deterministic: false)", "npid_cld", "knn_row",
                    "sinkhorn_rows", "kmeans_row", "simclr --compile + CUDA graphs", "simclr compiled step + CUDA graphs"]
    assert calls == [("simclr", False, True, None), ("simclr", True, True, None), ("simclr", False, False, None),
                     ("npid_cld", False, True, None), ("simclr", "reduce-overhead", True, None),
                     ("simclr", False, True, "reduce-overhead")]
    assert profiled == calls  # each row's limit profiles the training it timed


def test_a_benchmark_cut_short_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """The table is rewritten after each benchmark: when the process is stopped during the last one (the
    device call's time runs out), the file holds every finished row and says it is unfinished."""
    import harness.bench.gpu as gpu

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "kmeans_row", stopped)
    out = tmp_path / "bench-gpu.md"
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--smoke", "--methods", "npid_cld", "--out", str(out), "--device", "cpu"])
    text = out.read_text()
    assert "Unfinished: 4 rows" in text and "Finished" not in text.replace("Unfinished", "")
    assert set(table_rows(text)) == {"npid_cld", "knn torch", "sinkhorn float64 chunks", "sinkhorn float32 chunks"}


def test_a_failing_benchmark_costs_its_row_not_the_table(tmp_path, monkeypatch, capsys):
    """A benchmark that raises (an out-of-memory, a compile error on the lent GPU) becomes a row that says
    how it failed, its traceback goes to stderr, the others run, and the command exits 1."""
    import harness.bench.gpu as gpu

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(gpu, "knn_row", out_of_memory)
    out = tmp_path / "bench-gpu.md"
    assert gpu.main(["--smoke", "--methods", "npid_cld", "--out", str(out), "--device", "cpu"]) == 1
    rows = table_rows(out.read_text())
    assert set(rows) == {"npid_cld", "knn torch", "sinkhorn float64 chunks", "sinkhorn float32 chunks", "kmeans torch"}
    assert rows["knn torch"][7] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert float(rows["kmeans torch"][2]) > 0
    err = capsys.readouterr().err
    assert "Traceback" in err and "1 of 5 benchmarks failed: knn torch" in err


def test_time_split_shares_a_step_largest_first():
    """A 10 ms step with a 6 ms backbone and 1 ms of augmentation leaves 3 ms for the rest
    (hand-computed shares). Catches: shares of the wrong total, the rest not derived, a wrong order."""
    assert _split(10.0, {"backbone": 6.0, "augment": 1.0}) == \
        "backbone 60% (6.00 ms), rest 30% (3.00 ms), augment 10% (1.00 ms)"


RUNBOOK = ROOT / "scripts" / "gpu_runbook.sh"


def test_runbook_smoke_returns_every_result_within_the_device_tools_limits(tmp_path):
    """``scripts/gpu_runbook.sh --smoke`` (the device call's script at CPU scale) leaves in ``$OUT`` the
    environment, the CUDA test log (every test selected by ``-m cuda``, skipped here), the benchmark
    table, the training log, the finished run's record and its checkpoint: at most 8 flat files of at
    most 16 MiB, as the device tool returns them.

    Catches: a step of the script that fails or writes elsewhere, a record or checkpoint not copied
    back, more or larger files than the tool brings back."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(RUNBOOK), "--smoke", "--seconds", "3000"], env=env, capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.name: p for p in out.iterdir()}
    assert {"env.txt", "cuda-tests.log", "bench-gpu.md", "bench-gpu.log", "train.log"} <= set(files), sorted(files)
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in files.values())
    tests_log = files["cuda-tests.log"].read_text()
    assert "skipped" in tests_log and "failed" not in tests_log and "error" not in tests_log.lower(), tests_log
    assert {"simclr", "npid_cld", "knn torch"} <= set(table_rows(files["bench-gpu.md"].read_text()))
    records = [json.loads(p.read_text()) for name, p in files.items() if name.endswith(".json")]
    assert len(records) == 1 and records[0]["status"] == "ok", records
    assert records[0]["spec"]["method"] == "npid_cld" and records[0]["budget"]["used"]["steps"] == 2
    assert [name for name in files if name.endswith(".pt")], "the small checkpoint comes back"
    assert re.search(r"^commit [0-9a-f]{40}$", files["env.txt"].read_text(), re.M), files["env.txt"].read_text()


def test_records_name_the_commit_given_where_the_tree_has_no_git(tmp_path, monkeypatch):
    """A lent GPU machine gets the checkout's files without .git: records then cite the commit that
    SSL_HARNESS_COMMIT names (the runbook sets it from data-carry/COMMIT), not an empty string."""
    from harness.execution import environment

    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("SSL_HARNESS_COMMIT", sha)
    assert environment.git_commit() != sha  # a checkout with .git names its own HEAD
    monkeypatch.setattr(environment.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", ""))
    assert environment.git_commit() == sha
    monkeypatch.delenv("SSL_HARNESS_COMMIT")
    assert environment.git_commit() == ""


@pytest.mark.parametrize("args,fragment", [(["--second", "100"], "--second"), (["--seconds"], "--seconds takes"),
                                           (["--smoke", "--train-only", "--seconds", "5"], "leaves no time to train")])
def test_runbook_rejects_bad_options_in_one_line(args, fragment, tmp_path):
    """Catches: a typo in the device call's command running the whole script with defaults, or a call that
    can train nothing reporting success."""
    done = subprocess.run(["bash", str(RUNBOOK), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and fragment in done.stderr, done.stderr


def test_profile_counts_the_operators_dispatched_not_their_implementations():
    """Three additions, one matmul and one linear layer (aten::linear, implemented by aten::addmm and
    aten::t inside it) over two steps are 2.5 operators a step. Catches: counting the operators nested in
    another operator (linear's addmm and t) or counting per profile instead of per step."""
    from torch.profiler import ProfilerActivity, profile

    a, w, bias = torch.ones(4, 4), torch.ones(3, 4), torch.zeros(3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a + a
        a @ a
        torch.nn.functional.linear(a, w, bias)
    profiled = summarise(prof.events(), steps=2, wall_s=0.01, cuda=False)
    assert profiled.ops == 2.5 and profiled.wall_ms == 5.0 and profiled.device_ms is None
    assert profiled.describe() == "2.5 aten ops a step (profiled 5.0 ms a step on the CPU)"
    assert "aten::add" in profiled.top


def test_gpu_busy_time_counts_kernels_once_and_not_their_annotations():
    """A 1 ms step whose GPU timeline holds two 300 us kernels, a 200 us copy overlapping the second on
    another stream, and the 700 us range torch's record_function around Optimizer.step draws over them: busy
    600 us (60%, host-bound), 3 kernels, one host wait. Catches: annotations counted as GPU work (busy 130%,
    'GPU-bound' whatever the truth) or overlapping work counted twice."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def event(i, name, start, end, device=DeviceType.CPU, annotation=False):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, fwd_thread=0, input_shapes=[],
                             stack=[], use_device="cuda", device_type=device, is_user_annotation=annotation)

    events = EventList([
        event(1, "Optimizer.step#SGD.step", 0, 1000, annotation=True),
        event(2, "aten::_foreach_add_", 10, 900),
        event(3, "cudaLaunchKernel", 20, 30),
        event(4, "cudaStreamSynchronize", 950, 1000),
        event(10, "Optimizer.step#SGD.step", 100, 800, DeviceType.CUDA, annotation=True),
        event(11, "multi_tensor_apply_kernel", 100, 400, DeviceType.CUDA),
        event(12, "multi_tensor_apply_kernel", 500, 800, DeviceType.CUDA),
        event(13, "Memcpy HtoD (Pinned -> Device)", 600, 700, DeviceType.CUDA),
    ], use_device="cuda")
    events._build_tree()
    profiled = summarise(events, steps=1, wall_s=0.001, cuda=True)
    assert profiled.device_ms == pytest.approx(0.6) and profiled.kernels == 3
    assert profiled.ops == 1 and profiled.waits == 1 and profiled.wait_ms == pytest.approx(0.05)
    assert profiled.describe().startswith("host-bound: launches and Python; GPU busy 60% of 1.0 ms, 3.0 kernels")
    # against the step's time without the profiler's overhead (0.7 ms): busy 86%, the GPU sets the pace
    assert profiled.describe(step_ms=0.7).startswith("GPU-bound; GPU busy 86% of 0.7 ms (profiled: 1.0 ms)")


@pytest.mark.parametrize("device_ms, wait_ms, verdict", [
    (9.0, 0.0, "GPU-bound"),  # busy 90% of 10 ms
    (4.0, 4.0, "host-bound: waits for the device"),  # 4 of the 6 idle ms are waits
    (4.0, 1.0, "host-bound: launches and Python"),
])
def test_profile_verdict_names_what_sets_the_pace(device_ms, wait_ms, verdict):
    """Hand-computed cases on a 10 ms step. Catches: a busy share of the wrong total, or waits and launch
    overhead confused."""
    profiled = StepProfile(5, 10.0, 700.0, device_ms=device_ms, kernels=900.0, waits=2.0, wait_ms=wait_ms)
    assert profiled.describe().startswith(f"{verdict}; GPU busy {device_ms / 10:.0%} of 10.0 ms, 900 kernels and 700 "
                                          "aten ops a step, host waits 2.0 times")


@pytest.mark.parametrize("epochs", [1, 3])
def test_epoch_hook_is_spread_over_an_epoch_not_over_the_timed_steps(monkeypatch, epochs):
    """A method whose epoch-start hook takes 0.4 s (SeLa relabels there), trained 2 steps of 0.1 s on 1,280
    images in batches of 128 (training faked, so that the clock is known) that start ``epochs`` epochs: the
    hook is reported apart and adds 0.04 s a step (0.4 s over an epoch's 10 steps), not 0.2 s (over the 2
    timed steps) nor 0.12 s (every hook call over one epoch). Catches: the hook counted in the timed steps'
    rate, as the first GPU table counted SeLa's relabelling pass (121 ms a step of 'rest'), or summed over
    the epochs the timed steps cross."""
    import time

    import harness.bench.gpu as gpu
    import harness.bench.train as bench_train
    from harness.engine.budget import Usage
    from harness.engine.train import TrainResult

    def slow_hook_method(*args, create=bench_train.create_method):
        method = create(*args)
        method.on_epoch_start = lambda epoch, loader: time.sleep(0.4)
        return method

    def fake_train(method, images, labels, budget, *args, **kwargs):
        for epoch in range(epochs):
            method.on_epoch_start(epoch, None)  # what the benchmark's timer wrapped
        steps = int(budget.limit)
        return TrainResult("ok", Usage(steps=steps, samples=128 * steps, seconds=0.1 * steps + 0.4 * epochs))

    monkeypatch.setattr(bench_train, "create_method", slow_hook_method)
    monkeypatch.setattr(bench_train, "train", fake_train)
    rate = bench_train.method_images_per_second("supervised", gpu.synthetic_cifar(1280, 8), "small_cnn", "cpu",
                                                "cpu", 2, Path("."))
    assert rate.batch == 128 and 0.04 <= rate.hook_seconds_per_step < 0.045
    seconds_per_step = rate.batch / rate.images_per_second
    assert abs(seconds_per_step - (0.1 + 0.04)) < 0.003, seconds_per_step


def test_the_cuda_graph_rows_compile_the_backbone_or_the_whole_step_in_reduce_overhead_mode(monkeypatch):
    """train(compile_backbone="reduce-overhead") hands the backbone to torch.compile with that mode, True in the
    default mode; compile_step="reduce-overhead" compiles the whole adapter (its forward is the training
    step) in that mode and not the backbone on its own. Catches: the mode dropped on the way, or the wrong
    module compiled."""
    import harness.bench.gpu as gpu
    import harness.bench.train as bench_train

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((type(self).__name__,
                                                                                           kwargs)))
    data = gpu.synthetic_cifar(256, 8)
    for options in ({"compile_backbone": "reduce-overhead"}, {"compile_backbone": True},
                    {"compile_step": "reduce-overhead"}):
        bench_train.method_images_per_second("simclr", data, "small_cnn", "cpu", "cpu", 1, Path("."), **options)
    backbone = type(bench_train.create_backbone("small_cnn", 3)).__name__
    assert compiled == [(backbone, {"mode": "reduce-overhead"})] * 2 + [(backbone, {})] * 2 + \
        [("SimCLR", {"mode": "reduce-overhead"})] * 2  # warm-up and timed run each


def test_a_training_that_raises_while_profiled_leaves_no_profiler_running(monkeypatch):
    """A step that raises between the profiler's start and stop stops the profiler on the way out. Catches: a
    profiler left recording while the exception (and so the profiling frame) is still held, as the benchmark
    holds it to print the traceback: the next rows would be timed under the profiler's overhead."""
    import harness.bench.gpu as gpu
    from harness.bench.profile import profile_training
    from methods.simclr import SimCLR

    data = gpu.synthetic_cifar(512, 8)
    step, calls = SimCLR.training_step, []

    def raises_in_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return step(self, batch)

    monkeypatch.setattr(SimCLR, "training_step", raises_in_step_5)
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        profile_training("simclr", data, "small_cnn", "cpu", "cpu", warmup=3, steps=5)
    assert raised.traceback and not torch.autograd.profiler._is_profiler_enabled
    monkeypatch.setattr(SimCLR, "training_step", step)
    assert profile_training("simclr", data, "small_cnn", "cpu", "cpu", warmup=1, steps=1).ops > 50
