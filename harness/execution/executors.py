"""Run a suite's jobs in parallel: a local process pool (one job per GPU) or submitit (Slurm).

Every job runs through :meth:`harness.execution.runner.Runner.run` in whichever process executes it,
so each writes its own atomic record into the shared results directory, takes the per-run
lock, and skips a run another process has stored or is training. Only jobs without a stored
record are dispatched; rerunning a suite after a crash, a ``scancel`` or a node failure
submits exactly what is missing. A preempted or timed-out Slurm job is requeued by submitit
and resumes from its last training checkpoint (``results/<suite>/.ckpt/<run_id>.pt``).

Entry point: :func:`run_jobs`.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from harness.errors import RunError, UsageError, missing_dependency
from harness.registry import import_plugin

try:
    import submitit
except ImportError:  # optional: only --executor submitit needs it; the local process pool runs without
    submitit = None

EXECUTORS = ("local", "submitit")

#: Keys of the ``slurm`` mapping of :func:`run_jobs` (and of a suite's ``slurm:`` section).
SLURM_KEYS = {
    "cluster": "submitit backend: 'slurm', 'local' (subprocesses on this machine), or None: slurm where srun exists",
    "partition": "Slurm partition",
    "gpus_per_job": "GPUs per job (default 1 on Slurm, 0 on the local backend)",
    "ranks_per_job": "processes per job, each one rank of data-parallel training (default: gpus_per_job on Slurm; "
                     "with the local backend, CPU ranks on gloo)",
    "cpus_per_task": "CPU cores per job",
    "mem_gb": "memory per job in GB",
    "timeout_min": "time limit per job in minutes (default 720); a job that reaches it is requeued",
    "array_parallelism": "most array jobs running at once (default 16)",
    "account": "Slurm account",
    "qos": "Slurm QOS",
    "constraint": "Slurm constraint, e.g. a GPU type",
    "exclude": "nodes to avoid",
    "additional": "mapping of any other sbatch options, e.g. {'reservation': 'x'}",
    "setup": "shell lines run before each job, e.g. ['module load cuda', 'source venv/bin/activate']",
    "folder": "where submitit keeps job pickles and logs (default <results>/.submitit/<suite>)",
    "max_num_timeout": "how many times a timed-out job is requeued (default 3)",
    "signal_delay_s": "seconds before the time limit at which the job is signalled to checkpoint (default 120)",
}
SLURM_DEFAULTS = {"timeout_min": 720, "array_parallelism": 16, "max_num_timeout": 3, "signal_delay_s": 120}
_SLURM_COUNTS = {"gpus_per_job": 0, "ranks_per_job": 1, "cpus_per_task": 1, "timeout_min": 1, "array_parallelism": 1,
                 "max_num_timeout": 0, "signal_delay_s": 0}  # integer options and their least value
SUBMITIT_CLUSTERS = ("local", "slurm")
_SLURM_TEXTS = ("cluster", "partition", "account", "qos", "constraint", "exclude", "folder")


def check_slurm_options(slurm: Any, where: str = "slurm") -> dict[str, Any]:
    """``slurm`` (a suite's ``slurm:`` section or run_jobs' argument) checked before anything is submitted:
    known keys, whole numbers where counts go, text where names go; returns it as a dict."""
    if not isinstance(slurm, dict):
        raise UsageError(f"{where} must be a mapping of options (valid keys: {', '.join(sorted(SLURM_KEYS))}), "
                         f"got {slurm!r}")
    unknown = sorted(map(str, set(slurm) - set(SLURM_KEYS)))
    if unknown:
        raise UsageError(f"{where}: unknown slurm option {unknown[0]!r} (valid: {', '.join(sorted(SLURM_KEYS))})")
    for key, value in slurm.items():
        if value is None:
            continue
        if key in _SLURM_COUNTS and (not isinstance(value, int) or isinstance(value, bool) or value < _SLURM_COUNTS[key]):
            raise UsageError(f"{where}: {key} must be a whole number of at least {_SLURM_COUNTS[key]}, got {value!r}")
        if key == "mem_gb" and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
                                or not math.isfinite(value)):
            raise UsageError(f"{where}: mem_gb must be a positive number, got {value!r}")
        if key == "cluster" and value not in SUBMITIT_CLUSTERS:  # None (unset): slurm where srun exists, else local
            raise UsageError(f"{where}: unknown submitit cluster {value!r} (valid: {', '.join(SUBMITIT_CLUSTERS)})")
        if key in _SLURM_TEXTS and not isinstance(value, str):
            raise UsageError(f"{where}: {key} must be a string, got {value!r}")
        if key == "additional" and not isinstance(value, dict):
            raise UsageError(f"{where}: additional must be a mapping of sbatch options, got {value!r}")
        if key == "setup" and not (isinstance(value, list) and all(isinstance(line, str) for line in value)):
            raise UsageError(f"{where}: setup must be a list of shell lines, got {value!r}")
    return dict(slurm)


class ExecutorError(RuntimeError):
    """Some jobs raised. ``records`` holds the records of every job that has one (like a normal return)."""

    def __init__(self, message: str, records: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.records = records


# ---------------------------------------------------------------- helpers shared by workers


def _print(message: str) -> None:
    print(message, flush=True)


def _silent(message: str) -> None:
    pass


def _picklable_runner_kwargs(runner_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Runner kwargs a worker can receive: ``log`` becomes ``print`` (or silence with ``quiet``)."""
    out = dict(runner_kwargs)
    if "log" in out and out["log"] not in (_print, _silent, print):
        out["log"] = _silent if out.get("quiet") else _print
    return out


def _setup_process(plugins: Sequence[str], threads: int | None, gpu: str | None = None) -> None:
    """In a worker: pin to one GPU, set torch's thread count, import the user's plugin modules."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)
    for module in plugins:
        import_plugin(module)


def _runner(runner_kwargs: dict[str, Any], gpu: str | None):
    from harness.execution.runner import Runner

    kwargs = dict(runner_kwargs)
    if gpu is not None and str(kwargs.get("device", "auto")).startswith("cuda"):
        kwargs["device"] = "cuda"  # the one GPU this worker sees
    return Runner(**kwargs)


def _run_in_process(job, runner_kwargs: dict[str, Any], force: bool, gpu: str | None = None) -> dict[str, Any] | None:
    from harness.execution.runner import run_or_say_why

    records = run_or_say_why(_runner(runner_kwargs, gpu), [job], force=force)
    return records[0] if records else None


def _pythonpath() -> str:
    """PYTHONPATH for child processes: this checkout (so ``harness`` imports) and the cwd (plugins)."""
    root = str(Path(__file__).resolve().parents[2])
    parts = [root, os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables while submitting (children and sbatch inherit them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visible_gpus() -> list[str]:
    """GPU ids this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - broken driver
        return []


def gpu_assignment(workers: int, gpus: Sequence[str]) -> list[str]:
    """The GPU each of ``workers`` pool processes sees: one each, round-robin beyond the GPU count."""
    return [gpus[i % len(gpus)] for i in range(workers)] if gpus else []


def worker_gpus(device: str) -> list[str]:
    """The GPUs a local pool hands its workers (one each, round-robin): every visible GPU for a device
    that leaves the GPU open (``auto``, ``cuda``), only the named one for ``cuda:N`` (all workers share
    it), none for ``cpu``."""
    device = str(device)
    if device == "cpu":
        return []
    gpus = visible_gpus()
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit():
        return gpus[int(index):int(index) + 1]
    return gpus


def default_local_workers(device: str) -> int:
    """The local pool's size when no worker count is given: one worker per visible GPU for a device that
    leaves the GPU open (``auto``, ``cuda``), else 1 (``cpu``, or one named GPU such as ``cuda:1``)."""
    return max(1, len(worker_gpus(device))) if str(device) in ("auto", "cuda") else 1


def pending_jobs(jobs: list, results_dir: Path, force: bool = False) -> list:
    """The jobs that have no stored record (all of them with ``force``), each run id once, in order."""
    from harness.execution.store import ResultStore

    seen, out = set(), []
    for job in jobs:
        rid = job.run_id
        if rid in seen:
            continue
        seen.add(rid)
        if force or not ResultStore(results_dir, job.suite).has(rid):
            out.append(job)
    return out


def stored_records(jobs: list, results_dir: Path) -> list[dict[str, Any]]:
    """The stored record of every job that has one, in job order (what :meth:`Runner.run` returns)."""
    from harness.execution.store import ResultStore

    out, seen = [], set()
    for job in jobs:
        store = ResultStore(results_dir, job.suite)
        if job.run_id not in seen and store.has(job.run_id):
            seen.add(job.run_id)
            out.append(store.load(job.run_id))
    return out


def _prepare_data(jobs: list, runner_kwargs: dict[str, Any]) -> None:
    """Download datasets and write split manifests once, here, before workers start.

    Workers would otherwise race to download; on a cluster the login node usually is the
    only one with internet access.
    """
    from harness.data.datasets import load_dataset, load_or_make_manifest

    data_dir = Path(runner_kwargs["data_dir"])
    for name, vf in dict.fromkeys((j.dataset, j.spec["val_fraction"]) for j in jobs):
        data = load_dataset(name, data_dir)
        load_or_make_manifest(data, data_dir / "manifests", vf)


def _waves(jobs: list) -> list[list]:
    """Plain runs first, then combinations (whose components must be trained before them)."""
    plain = [j for j in jobs if "components" not in j.spec]
    combos = [j for j in jobs if "components" in j.spec]
    return [w for w in (plain, combos) if w]


# ---------------------------------------------------------------- local process pool

_WORKER: dict[str, Any] = {}


def _exit_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    """End this worker once its parent is gone: a pool whose ``run`` was killed (``kill -9``) otherwise keeps
    its workers alive forever, idle on the queue of a process that no longer exists. A run the worker was
    training resumes from its checkpoint; its lock's owner is gone, so the next ``run`` takes it over."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _init_worker(gpus, plugins: Sequence[str], threads: int | None, parent: int) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="orphan-watch").start()
    gpu = gpus.get() if gpus is not None else None
    _WORKER["gpu"] = gpu
    _setup_process(plugins, threads, gpu)


def _pool_job(job, runner_kwargs: dict[str, Any], force: bool) -> dict[str, Any] | None:
    return _run_in_process(job, runner_kwargs, force, _WORKER.get("gpu"))


def _run_local(jobs: list, runner_kwargs: dict[str, Any], workers: int, force: bool, plugins: Sequence[str],
               log: Callable[[str], None], start_method: str | None) -> list[str]:
    """Run ``jobs`` in a pool of ``workers`` processes; return a line per job that raised."""
    import multiprocessing as mp

    gpus = worker_gpus(runner_kwargs.get("device", "auto"))
    if start_method is None:  # fork would skip re-importing torch, but a child forked after the parent ran
        start_method = "spawn"  # OpenMP or CUDA work can hang in its first parallel op (seen in the tests)
    ctx = mp.get_context(start_method)
    queue = None
    if gpus:
        queue = ctx.Queue()
        for gpu in gpu_assignment(workers, gpus):
            queue.put(gpu)
        if workers > len(gpus):
            log(f"{workers} workers share {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    kwargs = _picklable_runner_kwargs(runner_kwargs)
    errors: list[str] = []
    with _environ(PYTHONPATH=_pythonpath()), \
            ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(queue, tuple(plugins), threads, os.getpid())) as pool:
        for wave in _waves(jobs):
            futures = {pool.submit(_pool_job, job, kwargs, force): job for job in wave}
            done_count = 0
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures.pop(fut)
                    done_count += 1
                    try:
                        rec = fut.result()
                        state = "skipped (running elsewhere)" if rec is None else rec["status"]
                    except BrokenProcessPool as exc:
                        state = f"error: worker died ({exc})"
                        errors.append(f"{job.describe()}: worker process died")
                    except RunError as exc:  # the run's code raised (its line names the run): keep the others going
                        state = "error"
                        errors.append(str(exc))
                    except Exception as exc:  # the harness raised in the worker: report it, keep the others going
                        state = f"error: {type(exc).__name__}: {exc}"
                        errors.append(f"{job.describe()}: {''.join(traceback.format_exception_only(exc)).strip()}")
                    log(f"[{done_count}/{len(wave)}] {job.describe()}: {state}")
    return errors


# ---------------------------------------------------------------- submitit


class SubmititJob(submitit.helpers.Checkpointable if submitit else object):
    """One harness job as a submitit callable.

    Calling it runs ``Runner.run([job])`` (lock, train, evaluate, atomic record) and returns
    the record, or None when another process holds the run. On preemption or time-out
    submitit calls :meth:`checkpoint`, which requeues this same callable: the rerun finds
    the training checkpoint under ``results/<suite>/.ckpt/`` and resumes from it.
    """

    def __init__(self, job, runner_kwargs: dict[str, Any], force: bool = False,
                 plugins: Sequence[str] = (), threads: int | None = None, gpu: str | None = None) -> None:
        self.job, self.runner_kwargs, self.force = job, dict(runner_kwargs), force
        self.plugins, self.threads, self.gpu = tuple(plugins), threads, gpu
        self.requeues = 0

    def __call__(self) -> dict[str, Any] | None:
        _setup_process(self.plugins, self.threads, self.gpu)
        if self.requeues:
            print(f"requeued {self.requeues}x: resuming {self.job.describe()} from its checkpoint", flush=True)
        from harness.engine import distributed

        _init_job_ranks()
        try:
            # a requeued attempt must resume, not retrain: force applies to the first attempt only
            return _run_in_process(self.job, self.runner_kwargs, self.force and not self.requeues, self.gpu)
        finally:
            distributed.cleanup()  # a no-op unless the job's tasks formed a process group

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue this same callable; training state lives in the harness checkpoint file."""
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _init_job_ranks() -> None:
    """Join the job's tasks into one process group when submitit started several (``ranks_per_job``)."""
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    from harness.engine import distributed

    port = 20000 + int("".join(c for c in str(env.job_id) if c.isdigit()) or 0) % 20000
    distributed.init_distributed(environ={"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                                          "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.hostnames[0],
                                          "MASTER_PORT": str(port)})


def job_placement(slurm: dict[str, Any]) -> tuple[str, int, int]:
    """The submitit cluster ("slurm" where ``srun`` exists, else "local"), GPUs per job and processes per job (each
    one data-parallel rank: one per GPU unless ``ranks_per_job`` says otherwise) that ``slurm`` options give."""
    opts = {**SLURM_DEFAULTS, **{k: v for k, v in slurm.items() if v is not None}}
    cluster = opts.get("cluster") or ("slurm" if shutil.which("srun") else "local")
    if cluster not in SUBMITIT_CLUSTERS:
        raise UsageError(f"unknown submitit cluster {cluster!r} (valid: {', '.join(SUBMITIT_CLUSTERS)})")
    # the local backend pins each job to one GPU itself (CUDA_VISIBLE_DEVICES in the job, see _local_window)
    gpus = opts.get("gpus_per_job", 1) if cluster == "slurm" else 0
    return cluster, int(gpus), int(opts.get("ranks_per_job") or max(1, int(gpus)))


def make_submitit_executor(folder: Path, slurm: dict[str, Any], name: str = "harness"):
    """A configured ``submitit.AutoExecutor``: Slurm, or its local backend with ``cluster='local'``
    (the default where there is no ``srun``)."""
    if submitit is None:
        raise missing_dependency("submitit", "--executor submitit")
    opts = {**SLURM_DEFAULTS, **{k: v for k, v in slurm.items() if v is not None}}
    cluster, gpus, ranks = job_placement(slurm)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=int(opts["max_num_timeout"]),
                                     local_max_num_timeout=int(opts["max_num_timeout"]))
    params: dict[str, Any] = {"name": name, "timeout_min": int(opts["timeout_min"]), "gpus_per_node": gpus,
                              "tasks_per_node": ranks, "nodes": 1}
    if opts.get("cpus_per_task"):
        params["cpus_per_task"] = int(opts["cpus_per_task"])
    if opts.get("mem_gb"):
        params["mem_gb"] = float(opts["mem_gb"])
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = int(opts["signal_delay_s"])
        params["slurm_array_parallelism"] = int(opts["array_parallelism"])
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if opts.get(key):
                params[f"slurm_{key}"] = opts[key]
        if opts.get("additional"):
            params["slurm_additional_parameters"] = dict(opts["additional"])
        if opts.get("setup"):
            params["slurm_setup"] = list(opts["setup"])
    elif cluster == "local" and opts.get("setup"):
        params["local_setup"] = list(opts["setup"])
    executor.update_parameters(**params)
    if cluster == "local":  # AutoExecutor does not pass this one through to the local backend
        executor._executor.update_parameters(signal_delay_s=int(opts["signal_delay_s"]))
    return executor


def _run_submitit(jobs: list, runner_kwargs: dict[str, Any], workers: int, slurm: dict[str, Any], force: bool,
                  plugins: Sequence[str], log: Callable[[str], None], wait_for: bool) -> list[str]:
    suite = jobs[0].suite
    folder = Path(slurm.get("folder") or Path(runner_kwargs["results_dir"]) / ".submitit" / suite)
    kwargs = _picklable_runner_kwargs(runner_kwargs)
    errors: list[str] = []
    executor = make_submitit_executor(folder / "%j", slurm, name=f"harness-{suite}")
    after: str | None = None
    with _environ(PYTHONPATH=_pythonpath()):
        for wave in _waves(jobs):
            if executor.cluster == "local":  # every submitted local job starts at once: keep `workers` alive
                gpus = worker_gpus(runner_kwargs.get("device", "auto")) if slurm.get("gpus_per_job", 1) else []
                threads = max(1, (os.cpu_count() or 1) // workers)
                fns = [SubmititJob(j, kwargs, force, plugins, threads) for j in wave]
                errors += _local_window(executor, fns, gpu_assignment(workers, gpus) or [None] * workers, log)
                continue
            fns = [SubmititJob(j, kwargs, force, plugins, slurm.get("cpus_per_task")) for j in wave]
            if after and not wait_for:  # combinations start once their components' array is over
                executor.update_parameters(slurm_additional_parameters={
                    **dict(slurm.get("additional") or {}), "dependency": f"afterany:{after}"})
            submitted = executor.submit_array(fns)
            after = submitted[0].job_id.split("_")[0] if submitted else None
            log(f"submitted {len(submitted)} jobs as Slurm array {after} (logs: {folder})")
            if wait_for:
                errors += _collect(list(zip(submitted, wave)), log, total=len(wave))
    return errors


def _error_line(text: str) -> str:
    """The exception line of the traceback submitit reports (not its trailing log paths)."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("- ", "----", "You can check", "File ", "^"))]
    found = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", ln)]
    return (found or lines or [""])[-1]


def _collect(pairs: list, log: Callable[[str], None], done: int = 0, total: int | None = None) -> list[str]:
    """Wait for each submitit job, log its outcome; a line per job that raised."""
    errors = []
    for n, (sjob, job) in enumerate(pairs, done + 1):
        try:
            rec = sjob.results()[0]  # task 0 (rank 0 of a data-parallel job) holds the record
            state = "skipped (running elsewhere)" if rec is None else rec["status"]
        except Exception as exc:  # submitit raises FailedJobError / UncompletedJobError with the log tail
            state = f"error (log: {sjob.paths.stderr})"
            errors.append(f"{job.describe()}: {_error_line(str(exc)) or type(exc).__name__} (log: {sjob.paths.stderr})")
        log(f"[{n}/{total or len(pairs)}] {job.describe()}: {state}")
    return errors


def _local_window(executor, fns: list, slots: list[str | None], log: Callable[[str], None],
                  poll_s: float = 0.2) -> list[str]:
    """Submit to submitit's local backend keeping one job per slot alive (a slot is a GPU id, or
    None on CPU), and wait for all of them."""
    errors: list[str] = []
    queue, running, done = list(fns), {}, 0  # running: slot index -> (submitit job, harness job)
    while queue or running:
        for i in range(len(slots)):
            if queue and i not in running:
                fn = queue.pop(0)
                fn.gpu = slots[i]
                running[i] = (executor.submit(fn), fn.job)
        finished = [i for i, (sjob, _) in running.items() if sjob.done()]
        if not finished:
            time.sleep(poll_s)
            continue
        for i in finished:
            errors += _collect([running.pop(i)], log, done, len(fns))
            done += 1
    return errors


# ---------------------------------------------------------------- entry point


def run_jobs(jobs: list, runner_kwargs: dict[str, Any], executor: str = "local", workers: int | None = None,
             slurm: dict[str, Any] | None = None, *, force: bool = False, plugins: Sequence[str] = (),
             log: Callable[[str], None] | None = None, wait: bool = True,
             start_method: str | None = None) -> list[dict[str, Any]]:
    """Run ``jobs`` (from :func:`harness.execution.runner.plan`) and return the records of all of them.

    ``runner_kwargs`` are :class:`harness.execution.runner.Runner`'s keyword arguments (``results_dir``
    and ``data_dir`` required; ``device``, ``quiet``, ``log``, ``checkpoint_seconds``).
    Jobs with a stored record are not dispatched again (all are with ``force``).

    ``executor="local"``: a pool of ``workers`` processes on this machine. ``workers``
    defaults to the number of visible GPUs (1 without GPUs); with GPUs each worker sees one
    (``CUDA_VISIBLE_DEVICES``) and workers beyond the GPU count share them round-robin;
    ``workers=1`` runs in this process. Workers get ``cpu_count // workers`` torch threads.

    ``executor="submitit"``: one submitit job per run, configured by ``slurm`` (keys in
    :data:`SLURM_KEYS`: partition, gpus_per_job, timeout_min, array_parallelism, ...).
    On Slurm the jobs form a job array (``array_parallelism`` at once, else ``workers``, else
    16); ``cluster="local"`` runs them as subprocesses here, ``workers`` at a time (default 1). Preempted or timed-out jobs are
    requeued and resume from their checkpoint. With ``wait=False`` (Slurm) this returns
    after submitting, with only the records already stored.

    ``plugins`` are modules each worker imports first (``--plugin``). The records come back
    in job order; jobs another process is running are left out, as with ``Runner.run``.
    Raises :class:`ExecutorError` (with ``.records``) after all jobs ended if any raised.
    """
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r} (valid: {', '.join(EXECUTORS)})")
    if executor == "submitit" and submitit is None:  # before any data is prepared
        raise missing_dependency("submitit", "--executor submitit")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    slurm = check_slurm_options(slurm or {})
    if "results_dir" not in runner_kwargs or "data_dir" not in runner_kwargs:
        raise UsageError("runner_kwargs needs results_dir and data_dir")
    log = log or runner_kwargs.get("log") or _print
    results_dir = Path(runner_kwargs["results_dir"])
    todo = pending_jobs(jobs, results_dir, force)
    if len(todo) < len(jobs):
        log(f"{len(jobs) - len(todo)} of {len(jobs)} runs already stored; {len(todo)} to run")
    if executor == "submitit" and workers is not None and slurm.get("array_parallelism") is None:
        slurm["array_parallelism"] = workers  # on Slurm, --workers is the array parallelism unless given
    if workers is None:
        workers = default_local_workers(runner_kwargs.get("device", "auto")) if executor == "local" else 1
    errors: list[str] = []
    if todo and executor == "local" and workers == 1:
        from harness.execution.runner import Runner, run_or_say_why
        run_or_say_why(Runner(**runner_kwargs), todo, force=force)
    elif todo:
        _prepare_data(todo, runner_kwargs)
        if executor == "local":
            errors = _run_local(todo, runner_kwargs, min(workers, len(todo)), force, plugins, log, start_method)
        else:
            errors = _run_submitit(todo, runner_kwargs, workers, slurm, force, plugins, log, wait)
    records = stored_records(jobs, results_dir)
    if errors:
        raise ExecutorError(f"{len(errors)} of {len(todo)} jobs raised:\n  " + "\n  ".join(errors), records)
    return records


def slurm_options(suite_options: dict[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    """The ``slurm`` mapping for :func:`run_jobs`: a suite's ``slurm:`` section, overridden by CLI
    flags that were given (None means not given), e.g. ``slurm_options(suite.extra.get("slurm"),
    partition=args.slurm_partition, gpus_per_job=args.gpus_per_job, timeout_min=args.timeout_min,
    array_parallelism=args.array_parallelism)``."""
    out = dict(suite_options or {})
    out.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(out) - set(SLURM_KEYS))
    if unknown:
        raise UsageError(f"unknown slurm option {unknown[0]!r} (valid: {', '.join(sorted(SLURM_KEYS))})")
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `python -m harness run --executor ...`")
