"""``python -m harness``: run suites, rebuild leaderboards, list what exists, evaluate checkpoints."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from harness.errors import EnvironmentFailure, RunError, UsageError, choices_error, missing_dependency
from harness.execution.validate import (SEED_LIMIT, UsageParser, csv_list, image_size, is_seed, non_empty, once,
                                       path_arg, positive_int, suite_arg)
from harness.registry import import_plugin

DEFAULT_RESULTS = Path("results")
SUITE_HELP = "shipped suite name or path to a YAML file (default: quick)"
RESULTS_HELP = "where the suite's records are read: DIR/<suite>/ (default results; the --results-dir of its run)"
DEFAULT_LEADERBOARDS = Path("leaderboards")
DEFAULT_DATA = Path.home() / ".cache" / "ssl-harness" / "data"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 run``, ``2 runs``: a number with its noun in the number's form."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in csv_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {value!r}") from None
    if not all(map(is_seed, seeds)):
        raise argparse.ArgumentTypeError(f"seeds must be integers in [0, {SEED_LIMIT}), got {value!r}")
    once(seeds, value)  # 0,00 too
    return seeds


def _seed(value: str) -> int:
    seeds = _seeds(value)
    if len(seeds) != 1:
        raise argparse.ArgumentTypeError(f"expected one seed, got {value!r}")
    return seeds[0]


def _alpha(value: str) -> float:
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"--alpha must be a number in (0, 1), got {value!r}")
    return alpha


def _add_stats_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ci", choices=["t", "bootstrap"], default="t",
                        help="confidence interval of each cell over seeds: Student t (default) or a seeded "
                             "percentile bootstrap")
    parser.add_argument("--alpha", type=_alpha, default=0.05,
                        help="significance level of the paired tests, Friedman and the critical difference "
                             "(default 0.05); intervals are at 1 - alpha")


def _add_leaderboard_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--leaderboard-dir", type=path_arg, default=None,
                        help="where tables go (default: leaderboards/ for the default results dir, else beside "
                             "--results-dir: DIR/../leaderboards for a DIR named results, DIR-leaderboards otherwise)")


def _stats_options(args):
    from harness.reporting.leaderboard import StatsOptions

    return StatsOptions(args.ci, args.alpha)


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="harness", description="Benchmark representation-learning and deep-clustering methods.")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers your own methods, datasets or protocols): a module name "
                        "importable from the current directory or PYTHONPATH, or a .py file; repeatable")
    sub = p.add_subparsers(dest="command", required=True, parser_class=UsageParser)

    run = sub.add_parser("run", help="train and evaluate a suite's grid, then print its leaderboard")
    run.add_argument("suite", nargs="?", type=suite_arg, default=None, help=SUITE_HELP)
    run.add_argument("--methods", type=csv_list, help="comma-separated subset of the suite's method rows, by label "
                     "(or by method name: every row of that method whose name is no row's label)")
    run.add_argument("--datasets", type=csv_list, help="comma-separated datasets (replaces the suite's)")
    run.add_argument("--seeds", type=_seeds, help="comma-separated seeds (replaces the suite's)")
    run.add_argument("--budget", help="override the budget, e.g. epochs=20, steps=500, samples=1e5, seconds=60")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default auto)")
    run.add_argument("--data-dir", type=path_arg, default=DEFAULT_DATA, help=f"dataset directory (default {DEFAULT_DATA})")
    run.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help="where records are stored (default results)")
    _add_leaderboard_dir(run)
    run.add_argument("--retry-failed", action="store_true",
                     help="rerun stored runs that failed (a NaN loss, say) from scratch; others are kept")
    run.add_argument("--force", action="store_true", help="rerun jobs even if a record is stored")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything, list each planned run as stored, failed, to train or retrain, and stop")
    run.add_argument("--quiet", action="store_true", help="no progress bars (clusters, CI logs)")
    run.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                     help="training autocast: auto = bfloat16 on CUDA, float32 on CPU (recorded in each result)")
    run.add_argument("--compile", action="store_true", help="torch.compile the backbone for training, and the batch augmentation on a GPU")
    run.add_argument("--pipeline", choices=["batched", "per_image"], default="batched",
                     help="training views: batches augmented on the device (default), or per-image torchvision "
                          "transforms in DataLoader workers (recorded in each result)")
    run.add_argument("--log", choices=["none", "tensorboard", "wandb"], default="none",
                     help="also stream training scalars to TensorBoard or W&B (off by default)")
    run.add_argument("--executor", choices=["local", "submitit"], default="local",
                     help="local process pool, or submitit (Slurm; its local backend without Slurm)")
    run.add_argument("--workers", type=positive_int, help="jobs at once (default: one per visible GPU, else 1)")
    run.add_argument("--slurm-partition", dest="partition")
    run.add_argument("--gpus-per-job", type=positive_int)
    run.add_argument("--timeout-min", type=positive_int)
    run.add_argument("--array-parallelism", type=positive_int)
    _add_stats_options(run)

    lb = sub.add_parser("leaderboard", help="rebuild a suite's tables from stored records (no training)")
    lb.add_argument("suite", nargs="?", type=suite_arg, default=None, help=SUITE_HELP)
    lb.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help=RESULTS_HELP)
    _add_leaderboard_dir(lb)
    _add_stats_options(lb)

    cmp = sub.add_parser("compare", help="paired difference of two methods on every column of a suite, with "
                                         "interval and p-value")
    cmp.add_argument("suite", type=suite_arg, help="shipped suite name or path to a YAML file")
    cmp.add_argument("a", help="row label (a method's label; a head's row is 'label [head]')")
    cmp.add_argument("b", help="row label to compare against")
    cmp.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help=RESULTS_HELP)
    cmp.add_argument("--alpha", type=_alpha, default=0.05, help="intervals at 1 - alpha (default 0.05)")

    sub.add_parser("list", help="methods, datasets, protocols, backbones and suites, one line each")

    rp = sub.add_parser("reproduce", help="retrain stored runs in a scratch dir and compare their headline "
                                          "metrics with the records (bit-identical, within seed noise, within one sample, or not)")
    rp.add_argument("suite", nargs="?", type=suite_arg, default=None, help=SUITE_HELP)
    rp.add_argument("--runs", type=positive_int, default=1, help="how many stored runs, in plan order (default 1)")
    rp.add_argument("--methods", type=csv_list, help="only runs of these method rows")
    rp.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help=RESULTS_HELP)
    rp.add_argument("--data-dir", type=path_arg, default=DEFAULT_DATA)
    rp.add_argument("--device", default="auto")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")

    mg = sub.add_parser("migrate", help="rename stored records to the run ids this version computes "
                                        "(for results dirs written by older versions)")
    mg.add_argument("suite", nargs="?", type=suite_arg, default=None, help="one suite's records (default: every suite)")
    mg.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help=RESULTS_HELP)

    rep = sub.add_parser("report", help="HTML page and figures of a suite from its stored records (no training)")
    rep.add_argument("suite", nargs="?", type=suite_arg, default=None, help=SUITE_HELP)
    rep.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS, help=RESULTS_HELP)
    _add_leaderboard_dir(rep)
    rep.add_argument("--data-dir", type=path_arg, default=DEFAULT_DATA)
    rep.add_argument("--device", default="cpu")
    rep.add_argument("--no-features", action="store_true", help="skip embeddings and galleries (no model rebuilt)")
    _add_stats_options(rep)

    tune = sub.add_parser("tune", help="Optuna study of a method's search space, scored on the validation split")
    tune.add_argument("method")
    tune.add_argument("dataset")
    tune.add_argument("--trials", type=int, required=True)
    tune.add_argument("--budget", required=True, help="the fixed budget of every trial, e.g. epochs=20")
    tune.add_argument("--storage", type=non_empty("an Optuna storage URL"),
                      help="Optuna storage URL (default sqlite:///<results-dir>/tune/<study>.db)")
    tune.add_argument("--study", type=non_empty("a study name"),
                      help="study name (default derived from method, dataset, budget, scale, seed)")
    tune.add_argument("--scale", default="cpu", choices=["cpu", "paper"])
    tune.add_argument("--seed", type=_seed, default=0)
    tune.add_argument("--device", default="auto")
    tune.add_argument("--data-dir", type=path_arg, default=DEFAULT_DATA)
    tune.add_argument("--results-dir", type=path_arg, default=DEFAULT_RESULTS)

    ev = sub.add_parser("eval", help="evaluate an external encoder checkpoint with the protocols")
    ev.add_argument("--checkpoint", type=path_arg, required=True, help="a state_dict saved with torch.save")
    ev.add_argument("--arch", required=True, help="backbone name (see `list`)")
    ev.add_argument("--dataset", default="digits")
    ev.add_argument("--protocols", type=csv_list, default=["knn", "clustering", "lbfgs"])
    ev.add_argument("--seed", type=_seed, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--data-dir", type=path_arg, default=DEFAULT_DATA)
    ev.add_argument("--image-size", type=image_size,
                    help="resize every input to this side, the size the encoder was trained at (default: the data's)")
    ev.add_argument("--input-norm", default="dataset",
                    help="how the encoder's training normalised its images: dataset (the dataset's mean and std), "
                         "none (pixels in [0, 1]) or legacy_cifar10 (default: dataset)")

    bench = sub.add_parser("bench", help="speed benchmarks (tables under leaderboards/)")
    bench.add_argument("what", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark (try --help)")
    for name, command in sub.choices.items():  # `harness run --plugin M` as well as `harness --plugin M run`
        if name != "bench":  # what follows a benchmark's name is the benchmark's own
            command.add_argument("--plugin", action="append", default=[], dest="command_plugins", metavar="MODULE",
                                 help="as harness --plugin MODULE (a module name or a .py file), after the command")
    return p


def cmd_run(args) -> int:
    from harness.data.datasets import load_split_data, validate_dataset_name
    from harness.engine.budget import Budget
    from harness.execution.environment import resolve_device
    from harness.execution.executors import ExecutorError, default_local_workers, job_placement, run_jobs, slurm_options
    from harness.execution.runner import Runner, check_ranks, plan, run_or_say_why
    from harness.execution.store import ResultStore
    from harness.execution.suite import DEFAULT_SUITE, check_against_data, load_suite

    resolve_device(args.device)  # a device this machine lacks stops here, before anything is loaded
    slurm_only = {"--slurm-partition": args.partition, "--gpus-per-job": args.gpus_per_job,
                  "--timeout-min": args.timeout_min, "--array-parallelism": args.array_parallelism}
    given = [flag for flag, value in slurm_only.items() if value is not None]
    if given and args.executor != "submitit":
        raise UsageError(f"{given[0]} applies to --executor submitit only (this run's executor: {args.executor})")
    suite = load_suite(args.suite or DEFAULT_SUITE)
    every_method = list(suite.methods)  # the tables show every row on disk, whichever subset this process runs
    if args.methods:
        suite.methods = select_methods(suite, args.methods)
    if args.datasets:
        for d in args.datasets:
            validate_dataset_name(d)
        suite.datasets = args.datasets
    if args.seeds:
        suite.seeds = args.seeds
    if args.budget is not None:
        suite.budgets = [Budget.parse(args.budget)]
    jobs = plan(suite)
    # Everything that can fail is checked before the first run trains: where results and tables go,
    # and what only the data can tell (k against the split sizes, coarse labels, unreadable files).
    store = ResultStore(args.results_dir, suite.name)
    from harness.engine import distributed

    ranks = distributed.init_distributed()  # a no-op unless launched by torchrun or as Slurm tasks
    in_process = (not ranks.distributed and args.executor == "local"
                  and (args.workers or default_local_workers(args.device)) == 1)
    runner = Runner(args.results_dir, args.data_dir, args.device, quiet=args.quiet, log_backend=args.log,
                    precision=args.precision, compile=args.compile, pipeline=args.pipeline,
                    retry_failed=args.retry_failed) if in_process else None
    # the data this process trains on is loaded once: the check's load is the runner's
    states = {job.run_id: job_state(store, job, args.force, args.retry_failed) for job in jobs}
    to_train = [job for job in jobs if states[job.run_id] in TRAINS]
    check_against_data(suite, runner.dataset if runner else lambda name, fraction: load_split_data(name, args.data_dir, fraction),
                       {job.dataset for job in to_train})
    if ranks.distributed:
        check_ranks(to_train, ranks.world_size)
    from harness.engine.logging_backends import check_backend

    check_backend(args.log)  # what only the real run used to find: --dry-run checks it as well
    slurm = slurm_options(suite.extra.get("slurm"), partition=args.partition, gpus_per_job=args.gpus_per_job,
                          timeout_min=args.timeout_min, array_parallelism=args.array_parallelism)
    if args.executor == "submitit" and not ranks.distributed:
        from harness.execution import executors

        if executors.submitit is None:
            raise missing_dependency("submitit", "--executor submitit")
        check_ranks(to_train, job_placement(slurm)[2])  # each job's tasks train it data-parallel
    if args.dry_run:
        _print_plan(suite, jobs, states, store)
        return 0
    if ranks.distributed:
        return _run_data_parallel(args, suite, jobs, ranks, every_method)
    print(f"suite {suite.name}: {count(len(jobs), 'run')} ({count(len(suite.methods), 'method')} x "
          f"{count(len(suite.datasets), 'dataset')} x {count(len(suite.seeds), 'seed')} x "
          f"{count(len(suite.budgets), 'budget')}): {_state_counts(states)}", flush=True)
    raised = False
    if runner is not None:
        records = run_or_say_why(runner, jobs, force=args.force)
    else:
        kwargs = {"results_dir": args.results_dir, "data_dir": args.data_dir, "device": args.device,
                  "quiet": args.quiet, "log_backend": args.log, "precision": args.precision, "compile": args.compile,
                  "pipeline": args.pipeline, "retry_failed": args.retry_failed}
        try:
            records = run_jobs(jobs, kwargs, args.executor, args.workers, slurm, force=args.force,
                               plugins=args.plugin)
        except ExecutorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            records, raised = exc.records, True
    if not records:
        if raised:
            return 1
        print("no records yet (all jobs are running elsewhere)")
        return 0
    code = _finish_run(args, suite, every_method, records)
    return 1 if raised else code  # the tables show what was stored; the jobs that raised make it a failure


def _finish_run(args, suite, every_method, records: list[dict]) -> int:
    """Say how many runs failed, then write the suite's tables once, from every current record on disk (not
    only this process's), so that concurrent writers of one suite end with the whole table."""
    from harness.execution.store import ResultStore, held
    from harness.reporting.leaderboard import current_records, write_leaderboards

    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} of {count(len(records), 'run')} failed (first: {failed[0]['spec']['label']} on "
              f"{failed[0]['spec']['dataset']} seed {failed[0]['spec']['seed']}: {failed[0].get('reason', '')}); "
              f"the table marks them; rerun them with --retry-failed", file=sys.stderr)
    suite.methods = every_method
    with held(ResultStore(args.results_dir, suite.name).tables_lock()):  # read and write as one step
        display = write_leaderboards(current_records(suite, args.results_dir), suite.name, args.leaderboard_dir,
                                     suite.description, suite.tables, _stats_options(args))
    _print_table(display, args.leaderboard_dir / f"{suite.name}.md")
    return 0


#: A job's state before a suite runs: what ``run`` will do with it.
TRAINS = ("to train", "retrain")


def job_state(store, job, force: bool, retry_failed: bool) -> str:
    """``stored`` or ``failed`` (a record that stands), ``retrain`` (a record that ``--force`` or
    ``--retry-failed`` replaces) or ``to train`` (no record). An unreadable record stops here, before training."""
    from harness.execution.runner import keeps

    record = store.load(job.run_id) if store.has(job.run_id) else None
    if record is None:
        return "to train"
    if not keeps(record, force, retry_failed):
        return "retrain"
    return "stored" if record.get("status") == "ok" else "failed"


def _state_counts(states: dict[str, str]) -> str:
    counts = Counter(states.values())
    return ", ".join(f"{counts[state]} {state}" for state in ("stored", "failed", *TRAINS) if counts[state])


def _run_seconds(record: dict) -> float | None:
    """A stored run's training plus evaluation seconds, or None where its record does not say."""
    train, evaluation = record.get("train_seconds"), record.get("eval_seconds", {})
    if not isinstance(train, (int, float)) or not isinstance(evaluation, dict):
        return None
    return train + sum(v for v in evaluation.values() if isinstance(v, (int, float)))


def _print_plan(suite, jobs, states: dict[str, str], store) -> None:
    """``run --dry-run``: every planned run, its record's name and what ``run`` would do with it, and how long
    the runs to train took where a stored run of the same row (any seed) says so."""
    print(f"suite {suite.name}: {count(len(jobs), 'run')}: {_state_counts(states)} (dry run: nothing trained)")
    for job in jobs:
        print(f"  {states[job.run_id]:<8}  {job.run_id}  {job.describe()}")

    def row(label, dataset, budget) -> tuple[str, str, str]:
        return label, dataset, json.dumps(budget, sort_keys=True)

    seconds: dict[tuple, list[float]] = {}
    for record in store.records(warn=_warn):
        took, spec = _run_seconds(record), record["spec"]
        if record.get("status") == "ok" and took is not None:
            seconds.setdefault(row(spec.get("label"), spec.get("dataset"), spec.get("budget")), []).append(took)
    to_train = [job for job in jobs if states[job.run_id] in TRAINS]
    estimates = [sum(peers) / len(peers) for job in to_train
                 if (peers := seconds.get(row(job.entry.label, job.dataset, job.budget.as_dict())))]
    if estimates:
        total = sum(estimates)
        took = f"{total:.0f} s" if total < 60 else f"{total / 60:.1f} min"
        print(f"to train: about {took} of training and evaluation for {len(estimates)} of them, as the stored runs "
              f"of their rows took on the machine that wrote them")
    if len(to_train) > len(estimates):
        print(f"to train: {count(len(to_train) - len(estimates), 'run')} whose rows have no stored run to tell their time")


def _run_data_parallel(args, suite, jobs, ranks, every_method) -> int:
    """One process of a torchrun (or Slurm multi-task) launch: all ranks train each job together."""
    from harness.engine import distributed
    from harness.execution.runner import Runner, run_or_say_why

    if args.executor != "local" or args.workers:
        raise UsageError(f"--executor {args.executor} / --workers cannot be combined with a {ranks.world_size}-process "
                         f"{ranks.source} launch; launch with torchrun, or use --gpus-per-job on a Slurm executor")
    main = distributed.is_main()
    if main:
        print(f"suite {suite.name}: {count(len(jobs), 'run')}, each data-parallel over {ranks.world_size} processes", flush=True)
    try:
        runner = Runner(args.results_dir, args.data_dir, args.device, quiet=args.quiet or not main,
                        log=print if main else (lambda message: None), log_backend=args.log if main else "none",
                        precision=args.precision, compile=args.compile, pipeline=args.pipeline,
                        retry_failed=args.retry_failed)
        records = run_or_say_why(runner, jobs, force=args.force)
        distributed.barrier()
    finally:
        distributed.cleanup()
    return _finish_run(args, suite, every_method, records) if main and records else 0


def cmd_leaderboard(args) -> int:
    from harness.reporting.leaderboard import suite_records, write_leaderboards
    from harness.execution.suite import DEFAULT_SUITE

    options = _stats_options(args)
    chosen = suite_records(args.suite or DEFAULT_SUITE, args.results_dir, warn=_warn)
    display = write_leaderboards(chosen.records, chosen.name, args.leaderboard_dir, chosen.title, chosen.tables,
                                 options)
    _print_table(display, args.leaderboard_dir / f"{chosen.name}.md")
    return 0


def cmd_compare(args) -> int:
    from harness.reporting.leaderboard import StatsOptions, compare, suite_records

    chosen = suite_records(args.suite, args.results_dir, warn=_warn)
    table = compare(chosen.records, args.a, args.b, StatsOptions(alpha=args.alpha))
    print(f"{args.a} - {args.b} on suite {chosen.name}: means in percent, difference and interval in percentage "
          f"points, paired by seed; {100 * (1 - args.alpha):g}% t interval of the mean difference over the seeds "
          f"(per column, not adjusted); two-sided p of the column's test (Wilcoxon signed-rank where it can reject "
          f"after Holm, 2^(1-n) m <= alpha for n seeds and m columns, else the paired t-test), p_holm "
          f"Holm-adjusted over the columns")
    print(format_compare(table).to_string(index=False))
    return 0


def format_compare(table):
    """``compare``'s table as printed: percentages and point differences with two decimals (``27.97``, where
    three significant digits would print ``28`` beside ``20.67``), p-values with three significant digits."""
    points = [c for c in table.columns if c.endswith(" mean") or c in ("difference", "ci_low", "ci_high")]
    pvalues = [c for c in table.columns if c in ("p", "p_holm")]
    out = table.astype(object)
    for columns, fmt in ((points, "{:.2f}"), (pvalues, "{:.3g}")):
        for c in columns:
            out[c] = [fmt.format(v) if isinstance(v, float) and v == v else "" for v in table[c]]
    return out


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _print_table(display, path: Path) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 40):
        print(display.map(lambda s: s.replace("**", "*") if isinstance(s, str) else s).to_string())
    print(f"\nwritten: {path} (.csv .tex .html beside it)")


def cmd_list(args) -> int:
    from harness.models.backbones import BACKBONES
    from harness.data.datasets import DATASETS
    from harness.execution.suite import load_suite, shipped_suites
    from methods import METHODS
    from protocols import PROTOCOLS

    print("methods:")
    for n in METHODS.names():
        print(f"  {n:18s} {METHODS.get(n).description}")
    print("datasets:")
    for n in DATASETS.names():
        print(f"  {n:18s} {DATASETS.get(n).description}")
    print(f"  {'imagefolder:PATH':18s} any train/<class>/, test/<class>/ image tree")
    print("protocols:")
    for n in PROTOCOLS.names():
        print(f"  {n:18s} {PROTOCOLS.get(n).description}")
    print("backbones:")
    for n in BACKBONES.names():
        print(f"  {n:18s} {BACKBONES.get(n).description}")
    print("suites:")
    for n, path in shipped_suites().items():
        print(f"  {n:18s} {load_suite(str(path)).description}")
    return 0


def cmd_report(args) -> int:
    from harness.execution.environment import resolve_device
    from harness.reporting.report import write_report
    from harness.execution.suite import DEFAULT_SUITE

    write_report(args.suite or DEFAULT_SUITE, args.results_dir, args.leaderboard_dir, args.data_dir,
                 resolve_device(args.device), features=not args.no_features, log=print,
                 options=_stats_options(args))  # its last line names the page
    return 0


def cmd_tune(args) -> int:
    try:
        import optuna  # noqa: F401  (optional: only tuning needs it)
    except ImportError:
        raise missing_dependency("optuna", "harness tune") from None
    from harness.execution.tune import tune

    best = tune(args.method, args.dataset, args.trials, args.budget, storage=args.storage, study_name=args.study,
                results_dir=args.results_dir, data_dir=args.data_dir, seed=args.seed, scale=args.scale,
                device=args.device, quiet=False)
    if best["best"] is None:
        print(f"study {best['study']}: no trial completed ({best['counts']})")
        return 0
    params = ", ".join(f"{k}={v}" for k, v in sorted(best["best"]["params"].items()))
    print(f"study {best['study']}: best of {best['n_trials']} trials is #{best['best']['number']} ({params}): "
          f"{best['metric']} = {best['best']['value']:.4f}")
    return 0


def cmd_eval(args) -> int:
    from harness.engine.checkpoint import load_encoder
    from harness.data.datasets import (check_input_norm, dataset_channels, load_dataset, load_or_make_manifest,
                                       with_input_norm)
    from harness.execution.environment import resolve_device
    from harness.engine.evaluate import RunContext, evaluate
    from harness.engine.seeding import seed_everything
    from harness.execution.suite import check_against_data, parse_suite
    from methods import DataInfo, create_method
    from protocols import PROTOCOLS

    protocols = {p: dict(PROTOCOLS.get(p).defaults) for p in args.protocols}
    device = resolve_device(args.device)
    check_input_norm(args.input_norm, args.dataset, dataset_channels(args.dataset))
    data = with_input_norm(load_dataset(args.dataset, args.data_dir), args.input_norm)
    manifest = load_or_make_manifest(data, args.data_dir / "manifests")
    # the protocols against the data (k no larger than its split, coarse labels), as run checks a suite
    check_against_data(parse_suite({"datasets": [args.dataset], "methods": ["random"], "seeds": [args.seed],
                                    "budget": {"steps": 1}, "protocols": protocols}, "eval"),
                       lambda name, fraction: (data, manifest))
    seed_everything(args.seed)
    backbone = load_encoder(args.checkpoint, args.arch, data.image_shape[0])
    method = create_method("random", backbone, {}, DataInfo(len(data), data.image_shape))
    metrics, _ = evaluate(RunContext(method, data, manifest, device, args.seed, image_size=args.image_size), protocols)
    for rep, values in metrics.items():
        for k, v in sorted(values.items()):
            print(f"{rep:10s} {k:28s} {v:.4f}")
    return 0


BENCHMARKS = {"protocols": "harness.bench.protocols", "train": "harness.bench.train", "gpu": "harness.bench.gpu",
              "sinkhorn": "harness.bench.sinkhorn"}


def cmd_bench(args) -> int:
    return importlib.import_module(BENCHMARKS[args.what]).main(args.options)


def select_methods(suite, names: list[str]) -> list:
    """The suite's method rows named in ``--methods``: a name that is a row's label selects that row alone
    (``npid_cld`` in cifar10-instance, not also the row ``npid``, which runs method npid_cld with
    cld_weight 0); any other name selects every row of that method. An unknown name is a usage error
    listing the suite's rows."""

    labels = {e.label for e in suite.methods}
    for name in names:
        if name not in labels | {e.name for e in suite.methods}:
            raise choices_error("method (in this suite)", name, labels)
    return [e for e in suite.methods if e.label in names or (e.name in names and e.name not in labels)]


def cmd_reproduce(args) -> int:
    from harness.execution.reproduce import SEED_NOISE_STDS, reproduce
    from harness.execution.suite import DEFAULT_SUITE, load_suite

    suite = load_suite(args.suite or DEFAULT_SUITE)
    if args.methods:
        suite.methods = select_methods(suite, args.methods)
    table = reproduce(suite, args.results_dir, args.data_dir, runs=args.runs, device=args.device, quiet=args.quiet)
    if table.empty:
        raise UsageError(f"no stored successful run of suite {suite.name!r} to reproduce under {args.results_dir}")
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_rows", None, "display.float_format", "{:.6g}".format):
        print(table.to_string(index=False))
    counts = table["verdict"].value_counts()
    print(f"\n{', '.join(f'{n} {v}' for v, n in counts.items())} (of {len(table)}; 'within seed noise' = within "
          f"{SEED_NOISE_STDS:g} std over the suite's stored seeds; 'within one sample' = at most one evaluated image "
          f"apart, the smallest difference an accuracy can show). Bit-identical is expected on the machine, torch "
          f"version and device that wrote the records (each rerun used its record's torch thread count); elsewhere, "
          f"within seed noise.")
    return 0 if "outside" not in counts else 1


def cmd_migrate(args) -> int:
    from harness.execution.store import ResultStore
    from harness.execution.suite import check_suite_name

    root = args.results_dir
    if args.suite:
        check_suite_name(args.suite)
    if args.suite and not (root / args.suite).is_dir():
        stored = [p.name for p in root.iterdir() if p.is_dir()]
        if not stored:
            raise UsageError(f"no suite {args.suite!r} in {root}: it holds no stored suites (--results-dir names "
                             f"where `run` stored them)")
        raise choices_error("suite (in this results dir)", args.suite, stored)
    names = [args.suite] if args.suite else sorted(p.name for p in root.iterdir() if p.is_dir())
    renamed = removed = 0
    for name in names:
        moved, copies = ResultStore(root, name).migrate_run_ids()
        renamed, removed = renamed + len(moved), removed + len(copies)
        if moved or copies:
            print(f"{name}: renamed {count(len(moved), 'record')} to their current run ids"
                  + (f", removed {count(len(copies), 'second copy', 'second copies')} of runs already stored"
                     if copies else ""))
    print(f"{count(renamed, 'record')} renamed under {root}"
          + (f", {count(removed, 'second copy', 'second copies')} removed" if removed else ""))
    return 0


#: The directories each command writes (data: manifests and decoded caches), checked before it does any work:
#: a file or read-only folder there is one line naming the option, not an errno from deep inside.
WRITTEN_DIRS = {"run": ("data_dir", "results_dir", "leaderboard_dir"), "leaderboard": ("leaderboard_dir",),
                "reproduce": ("data_dir",), "report": ("data_dir", "leaderboard_dir"),
                "tune": ("data_dir", "results_dir"), "eval": ("data_dir",)}
# Commands that read stored records: a missing results dir stops them before any folder is created.
# (reproduce only reads them too: its reruns train in a scratch directory)
READ_DIRS = {"leaderboard": ("results_dir",), "report": ("results_dir",), "compare": ("results_dir",),
             "migrate": ("results_dir",), "reproduce": ("results_dir",)}

COMMANDS = {"run": cmd_run, "leaderboard": cmd_leaderboard, "list": cmd_list, "eval": cmd_eval, "bench": cmd_bench,
            "tune": cmd_tune, "report": cmd_report, "compare": cmd_compare,
            "reproduce": cmd_reproduce, "migrate": cmd_migrate}


def default_leaderboard_dir(results_dir: Path) -> Path:
    """Tables of the default results dir go to ``leaderboards/``; those of another results dir beside it,
    so that runs elsewhere never overwrite the repository's committed tables."""
    if results_dir == DEFAULT_RESULTS:
        return DEFAULT_LEADERBOARDS
    if results_dir.name == "results":
        return results_dir.parent / "leaderboards"
    return results_dir.with_name(f"{results_dir.name}-leaderboards")


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left at exit raises no second BrokenPipeError
    (the recipe of Python's signal module documentation)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "leaderboard_dir", "absent") is None:
            args.leaderboard_dir = default_leaderboard_dir(args.results_dir)
        args.plugin = args.plugin + getattr(args, "command_plugins", [])
        for module in args.plugin:
            try:
                import_plugin(module)
            except (Exception, SystemExit) as exc:  # a missing module, one that raises (a syntax error, a name
                # registered twice) or calls sys.exit
                message = str(exc).replace("\n", " ")
                raise UsageError(f"cannot import plugin {module!r}: {type(exc).__name__}: {message}") from None
        from harness.execution.environment import check_writable

        for option in READ_DIRS.get(args.command, ()):
            folder = getattr(args, option)
            if not folder.is_dir():
                raise UsageError(f"results dir {str(folder)!r} " + ("is a file" if folder.exists() else "does not exist")
                                 + "; give the folder that holds <suite>/<run_id>.json records (--results-dir)")
        for option in WRITTEN_DIRS.get(args.command, ()):
            check_writable(getattr(args, option), "--" + option.replace("_", "-"))
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that has gone shows here, in the handler below, not at exit
        return code
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `harness list | head`: the reader has gone, so stop quietly
        _detach_stdout()
        return 141  # as a process killed by SIGPIPE (`yes | head`)
    except (EnvironmentFailure, OSError, RunError) as exc:  # a full or read-only disk, a corrupt file, a raising adapter
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stored records and the checkpoint of the run in training are kept, run again to finish",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
