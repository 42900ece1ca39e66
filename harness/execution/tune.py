"""Hyperparameter search with Optuna: one method on one dataset, every trial under the same budget.

The search space is the adapter's ``search_space``. Each trial is a one-run suite built in
code and trained by the :class:`harness.execution.runner.Runner` (locks, checkpoints, an atomic record
under ``results/tune-<study>/``), then scored by weighted kNN top-1 on the **validation**
split: the training split votes for the held-out validation samples (protocol ``val_knn``,
``protocols/knn.py``). The test split is never evaluated while tuning.

Median pruning: the adapter's ``on_epoch_end`` is wrapped so that after every
``report_every`` epochs the current backbone's validation kNN is reported to the trial and a
trial below the median of earlier trials at the same epoch is stopped. A run shorter than
two epochs (or with a ``seconds`` budget, whose clock the extra evaluation would eat into)
reports only its final value, so nothing is pruned.

The study lives in an RDB storage (an SQLite file ``results/tune/<study>.db`` by default, or
any Optuna URL; ``journal:///path`` for a journal file on NFS). A killed study resumes: the
same command counts the finished trials (complete or pruned) toward ``--trials`` and runs
only the rest; a trial killed midway is failed once its heartbeat goes stale and retried
with the same parameters, which resumes its run from the training checkpoint. The best
trial is written to ``results/tune/<study>.json``.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import optuna

from harness.engine.budget import Budget
from harness.errors import EnvironmentFailure, UsageError
from harness.execution.store import write_json_atomic
from harness.execution.suite import SUITE_NAME_MAX
from methods import METHODS, resolve_config
from protocols import PROTOCOLS
from protocols.knn import VAL_PROTOCOL, val_knn_protocol

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
PRIMITIVES = (type(None), bool, int, float, str)


# ---------------------------------------------------------------- search space


def _choice_key(value: Any) -> Any:
    return value if isinstance(value, PRIMITIVES) else repr(value)


def suggest(trial: optuna.Trial, space: dict[str, tuple]) -> dict[str, Any]:
    """Config overrides for ``trial`` from a ``Method.search_space``."""
    params = {}
    for key, spec in space.items():
        kind = spec[0]
        if kind == "float":
            params[key] = trial.suggest_float(key, float(spec[1]), float(spec[2]))
        elif kind == "log":
            params[key] = trial.suggest_float(key, float(spec[1]), float(spec[2]), log=True)
        elif kind == "int":
            params[key] = trial.suggest_int(key, int(spec[1]), int(spec[2]))
        elif kind == "categorical":
            choices = list(spec[1])
            keys = [_choice_key(c) for c in choices]  # Optuna stores only primitives: lists go by their repr
            params[key] = choices[keys.index(trial.suggest_categorical(key, keys))]
        else:
            raise UsageError(f"search space of {key!r}: unknown kind {kind!r} (valid: categorical, float, int, log)")
    return params


def _check_space(method: str, space: dict[str, tuple], scale: str) -> None:
    if not space:
        raise UsageError(f"method {method!r} declares no search_space; nothing to tune")
    cfg = resolve_config(METHODS.get(method), scale)
    for key, spec in space.items():
        if key not in cfg:
            raise UsageError(f"search space of {method!r} names {key!r}, which is not a config key")
        if not isinstance(spec, (tuple, list)) or not spec or spec[0] not in ("float", "log", "int", "categorical"):
            raise UsageError(f"search space of {method!r}: {key!r} must be (float|log|int, low, high) "
                             f"or (categorical, [choices]), got {spec!r}")


# ---------------------------------------------------------------- storage


#: A study's runs are stored as the suite ``tune-<study>``, whose name bounds the study's.
STUDY_SUITE_PREFIX = "tune-"
STUDY_NAME_MAX = SUITE_NAME_MAX - len(STUDY_SUITE_PREFIX)


def default_study_name(method: str, dataset: str, budget: Budget, scale: str, seed: int) -> str:
    """``<method>-<dataset>-<budget>-<scale>-s<seed>`` as a file name; a name too long for one (an image folder's
    path as the dataset) keeps its first 70 characters and gets a hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{method}-{dataset}-{budget.unit}{budget.limit}-{scale}-s{seed}")
    if len(name) > STUDY_NAME_MAX:
        name = f"{name[:70]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def default_storage(results_dir: Path, study: str) -> str:
    path = (Path(results_dir) / "tune" / f"{study}.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_storage(url: str, heartbeat_s: int = 60):
    """An Optuna storage from a URL: any SQLAlchemy RDB URL (with trial heartbeats, so trials of a
    killed process are failed and retried), or ``journal:///path`` (a journal file, safe on NFS)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        rest = url.split(":", 1)[1]
        text = rest[2:] if rest.startswith("//") else rest  # journal:///abs/file, journal://rel/file
        path = Path(text)
        if not text or path.is_dir():
            raise UsageError(f"Optuna storage {url!r} names " + (f"the folder {text!r}" if text else "no file")
                             + "; valid: journal:///PATH/TO/FILE.log (a file, made if missing)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    import inspect

    import optuna.storages as st
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        parsed = None  # refused with the valid forms below
    if parsed is not None and parsed.get_backend_name() == "sqlite" and (
            parsed.database in (None, "", ":memory:") or "memory" in str(parsed.query.get("mode", ""))):
        raise UsageError(f"Optuna storage {_masked(url)!r} is an in-memory database: the study would be lost when "
                         f"tune ends (and its trials' heartbeats cannot reach it); valid: sqlite:///PATH/TO/FILE.db, "
                         f"journal:///PATH, or leave --storage out for <results-dir>/tune/<study>.db")

    params = inspect.signature(st.RDBStorage.__init__).parameters
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna; names moved in 4.9
        if "heartbeat_stale_trial_callback" in params and hasattr(st, "RetryHeartbeatStaleTrialCallback"):
            retry = {"heartbeat_stale_trial_callback": st.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            retry = {"failed_trial_callback": st.RetryFailedTrialCallback(max_retry=2)}
        try:
            return st.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                 grace_period=max(2 * heartbeat_s, 120), **retry)
        except (sqlalchemy.exc.ArgumentError, ImportError) as exc:  # an unknown scheme, a driver not installed
            raise UsageError(f"cannot use Optuna storage {_masked(url)!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0]}); valid: sqlite:///PATH, journal:///PATH, or a "
                             f"database URL such as postgresql://user@host/db with its driver installed") from None
        except sqlalchemy.exc.SQLAlchemyError as exc:  # the database is there but cannot be opened
            raise EnvironmentFailure(f"cannot open Optuna storage {_masked(url)!r} "
                                     f"({str(exc).splitlines()[0]})") from None


def _masked(url: str) -> str:
    """The URL without a password (``postgresql://user:***@host/db``)."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


# ---------------------------------------------------------------- one trial


def _final_epoch(budget: Budget, n_train: int, batch_size: int) -> int | None:
    """Index of the epoch in which ``budget`` runs out (None for a seconds budget)."""
    steps_per_epoch = max(1, n_train // min(batch_size, n_train))
    if budget.unit == "epochs":
        return max(0, math.ceil(budget.limit) - 1)
    if budget.unit == "steps":
        return max(0, math.ceil(budget.limit / steps_per_epoch) - 1)
    if budget.unit == "samples":
        per_step = min(batch_size, n_train)
        return max(0, math.ceil(math.ceil(budget.limit / per_step) / steps_per_epoch) - 1)
    return None


def _make_trial_runner(runner_kwargs: dict[str, Any], knn: dict[str, Any], rep: str, report_every: int,
                       log: Callable[[str], None]):
    """A Runner whose adapters report validation kNN to its current ``trial`` every ``report_every``
    epochs (one Runner per study, so the dataset is loaded once)."""
    from harness.engine.evaluate import RunContext
    from harness.execution.runner import Runner

    class TrialRunner(Runner):
        trial: optuna.Trial | None = None

        def build(self, job, data, manifest):
            method, train_idx, generator = super().build(job, data, manifest)
            final = _final_epoch(job.budget, len(train_idx), int(job.spec["config"]["batch_size"]))
            trial = self.trial
            if trial is None or report_every <= 0 or final is None or final < 1:
                return method, train_idx, generator
            original = method.on_epoch_end
            device, seed = self.device, job.seed

            def on_epoch_end(epoch: int) -> None:
                original(epoch)
                if (epoch + 1) % report_every or epoch >= final:  # the final value comes from the record
                    return
                modes = [(m, m.training) for m in method.modules()]
                value = val_knn_protocol(RunContext(method, data, manifest, device, seed,
                                                      image_size=job.spec.get("image_size")), rep, **knn)["top1"]
                for m, mode in modes:
                    m.train(mode)
                trial.report(value, epoch + 1)
                log(f"    trial {trial.number} epoch {epoch + 1}: val kNN top-1 {value:.4f}")
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val kNN top-1 {value:.4f} at epoch {epoch + 1} is below the median")

            method.on_epoch_end = on_epoch_end
            return method, train_idx, generator

    return TrialRunner(**runner_kwargs)


# ---------------------------------------------------------------- the study


def tune(method: str, dataset: str, trials: int, budget: "str | dict | Budget", storage: str | None = None,
         study_name: str | None = None, results_dir: Path = Path("results"), data_dir: Path | None = None,
         seed: int = 0, scale: str = "cpu", *, device: str = "auto", config: dict[str, Any] | None = None,
         backbone: str | None = None, knn: dict[str, Any] | None = None, representation: str = "backbone",
         val_fraction: float = 0.1, pruning: bool = True, report_every: int = 1, quiet: bool = True,
         log: Callable[[str], None] = print, checkpoint_seconds: float = 60.0) -> dict[str, Any]:
    """Run (or resume) an Optuna study until ``trials`` trials have finished; return the summary.

    Every trial trains ``method`` on ``dataset`` (seed ``seed``, scale ``scale``, ``config``
    overrides fixed, the search-space keys sampled) under the same ``budget`` and returns the
    weighted-kNN top-1 of ``representation`` on the validation split (``knn``: k, temperature,
    backend; the knn protocol's defaults). Trials whose training diverges are recorded as
    pruned with the reason in their ``failed`` attribute. Finished = complete or pruned; a
    resumed study runs only ``trials`` minus the finished ones. ``storage``: an Optuna URL,
    default ``sqlite:///<results_dir>/tune/<study>.db``. The summary (best trial: value,
    params, full config, run id, metrics; trial counts; every trial) is also written
    atomically to ``<results_dir>/tune/<study>.json``.
    """
    from harness.cli import DEFAULT_DATA
    from harness.execution.runner import plan
    from harness.execution.environment import resolve_device
    from harness.execution.suite import check_against_data, is_suite_name, parse_suite

    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise UsageError(f"trials must be a positive integer, got {trials!r}")
    cls = METHODS.get(method)
    if not cls.trains:
        raise UsageError(f"method {method!r} does not train; nothing to tune")
    space = dict(cls.search_space)
    _check_space(method, space, scale)
    budget = Budget.parse(budget)
    fixed = dict(config or {})
    knn = {**PROTOCOLS.get(VAL_PROTOCOL).defaults, **(knn or {})}
    results_dir, data_dir = Path(results_dir), Path(data_dir or DEFAULT_DATA)
    study_name = study_name or default_study_name(method, dataset, budget, scale, seed)
    suite_name = f"{STUDY_SUITE_PREFIX}{study_name}"
    if not is_suite_name(suite_name):
        raise UsageError(f"study name {study_name!r} must be letters, digits, '.', '_' or '-', at most "
                         f"{STUDY_NAME_MAX} of them (it names files under {str(results_dir / 'tune')!r})")

    def suite_for(params: dict[str, Any]):
        entry: dict[str, Any] = {"name": method, "config": {**fixed, **params}}
        if backbone:
            entry["backbone"] = backbone
        data = {"name": suite_name, "scale": scale, "datasets": [dataset], "methods": [entry], "seeds": [seed],
                "budget": budget.as_dict(), "protocols": {VAL_PROTOCOL: knn}, "val_fraction": val_fraction}
        return parse_suite(data, suite_name)

    suite = suite_for({})  # validate names and fixed config before anything runs or the study's storage is made
    resolve_device(device)
    runner_kwargs = {"results_dir": results_dir, "data_dir": data_dir, "device": device, "quiet": quiet,
                     "log": (lambda s: None), "checkpoint_seconds": checkpoint_seconds}
    every = report_every if pruning and budget.unit != "seconds" else 0
    runner = _make_trial_runner(runner_kwargs, knn, representation, every, log)
    check_against_data(suite, runner.dataset)  # missing or corrupt data too, before the storage is made
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or default_storage(results_dir, study_name)
    store = make_storage(url)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        (job,) = plan(suite_for(params))
        trial.set_user_attr("run_id", job.run_id)
        trial.set_user_attr("config", job.spec["config"])
        runner.trial = trial
        start = time.perf_counter()
        try:
            records = runner.run([job])
        except optuna.TrialPruned as exc:
            (results_dir / suite_name / ".ckpt" / f"{job.run_id}.pt").unlink(missing_ok=True)  # never resumed
            log(f"trial {trial.number}: pruned ({exc})  {params}")
            raise
        finally:
            runner.trial = None
        if not records:
            trial.set_user_attr("failed", "the same configuration is being trained by another process")
            raise optuna.TrialPruned("same configuration running elsewhere")
        rec = records[0]
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        if rec["status"] != "ok":
            trial.set_user_attr("failed", rec["reason"])
            log(f"trial {trial.number}: training failed ({rec['reason']}); counted as pruned")
            raise optuna.TrialPruned(rec["reason"])
        metrics = rec["metrics"]
        if representation not in metrics:
            raise UsageError(f"method {method!r} has no representation {representation!r} "
                             f"(has: {', '.join(sorted(metrics))})")
        value = float(metrics[representation][f"{VAL_PROTOCOL}/top1"])
        trial.set_user_attr("metrics", metrics)
        log(f"trial {trial.number}: val kNN top-1 {value:.4f}  {params}")
        return value

    def finished(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=FINISHED))

    # Seed the sampler by the trials already stored: a resumed study draws new points, not the first ones again.
    existing = optuna.load_study(study_name=study_name, storage=store) if study_name in \
        optuna.get_all_study_names(storage=store) else None
    n_existing = len(existing.trials) if existing else 0
    sampler = optuna.samplers.TPESampler(seed=seed * 100_003 + n_existing)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if every else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=store, study_name=study_name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    done_before = finished(study)
    remaining = trials - done_before
    log(f"study {study_name}: {done_before} of {trials} trials finished; running {max(0, remaining)} "
        f"(storage {_masked(url)})")
    if remaining > 0:
        study.optimize(objective, n_trials=remaining,
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED)])
    summary = summarize(study, trials, {"method": method, "dataset": dataset, "budget": budget.as_dict(),
                                        "scale": scale, "seed": seed, "fixed_config": fixed, "knn": knn,
                                        "representation": representation, "storage": _masked(url),
                                        "results": str(results_dir / suite_name)})
    write_json_atomic(results_dir / "tune" / f"{study_name}.json", summary)
    return summary


def summarize(study: optuna.Study, asked: int, info: dict[str, Any]) -> dict[str, Any]:
    """The study as JSON: the best trial, counts per state and every trial."""
    all_trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in all_trials) for s in optuna.trial.TrialState}
    complete = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "config": b.user_attrs.get("config"),
                "run_id": b.user_attrs.get("run_id"), "metrics": b.user_attrs.get("metrics")}
    return {"study": study.study_name, **info, "metric": f"val_knn/top1 ({info.get('representation', 'backbone')}, "
                                                        f"validation split)",
            "direction": "maximize", "trials_asked": asked,
            "n_trials": counts["complete"] + counts["pruned"], "counts": counts, "best": best,
            "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
                        "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
                        **({"failed": t.user_attrs["failed"]} if "failed" in t.user_attrs else {})}
                       for t in all_trials],
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
