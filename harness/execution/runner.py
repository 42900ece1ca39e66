"""Plan a suite's grid, run each job (train, evaluate, store), skip what is stored."""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from harness.engine import distributed
from harness.data.augment import Augmenter, get_preset
from harness.models.backbones import create_backbone
from harness.engine.budget import Budget
from harness.data.datasets import (ImageData, SplitManifest, check_input_norm, dataset_channels, load_split_data,
                                   with_input_norm)
from harness.execution.environment import environment, resolve_device
from harness.errors import EnvironmentFailure, RunError, UsageError, choices_error
from harness.engine.logging_backends import make_logger
from harness.engine.evaluate import RunContext, evaluate
from harness.reporting.leaderboard import is_headline
from harness.data.pil_augment import training_feed
from harness.engine.seeding import seed_everything
from harness.execution.store import ResultStore, run_id
from harness.execution.suite import MethodEntry, Suite
from harness.engine.train import check_lr_update, resolve_precision, train
from methods import METHODS, DataInfo, Method, create_method, resolve_config

#: Bump when the meaning of stored records changes (it is part of every run's spec).
RECORD_VERSION = 1
#: Where training views come from: whole batches augmented on the device, or the classic per-image
#: torchvision transforms in DataLoader workers (``harness.data.pil_augment``); the same distribution.
PIPELINES = ("batched", "per_image")


class ComponentFailed(Exception):
    """A component run of a combination failed: the combination's record is failed with its reason."""


@dataclass(frozen=True)
class Job:
    suite: str
    dataset: str
    entry: MethodEntry
    seed: int
    budget: Budget
    spec: dict[str, Any]

    @property
    def run_id(self) -> str:
        return run_id(self.spec)

    def describe(self) -> str:
        """``simclr on digits seed 0 (epochs=15)``; a method that never trains (pixels, random) shows no budget."""
        budget = self.budget if METHODS.get(self.entry.name).trains else "no training"
        return f"{self.entry.label} on {self.dataset} seed {self.seed} ({budget})"


def keeps(record: dict[str, Any] | None, force: bool, retry_failed: bool) -> bool:
    """Whether a stored ``record`` stands instead of training its run again (failed ones are rerun with
    ``retry_failed``; none with ``force``)."""
    if force or record is None:
        return False
    return not retry_failed or record.get("status") == "ok"


def make_spec(suite: Suite, dataset: str, entry: MethodEntry, seed: int, budget: Budget) -> dict[str, Any]:
    """Everything that determines a run's result; its hash names the record."""
    cls = METHODS.get(entry.name)
    config = resolve_config(cls, suite.scale, {**entry.config, **entry.dataset_config.get(dataset, {})})
    try:
        check_lr_update(config, budget)
        check_input_norm(config["input_norm"], dataset, dataset_channels(dataset))
    except UsageError as exc:
        raise UsageError(f"method {entry.label!r}: {exc}") from None
    spec = {"version": RECORD_VERSION, "suite": suite.name, "dataset": dataset, "method": entry.name,
            "label": entry.label, "config": config, "scale": suite.scale,
            "backbone": entry.backbone or suite.backbone, "seed": seed, "budget": budget.as_dict(),
            "protocols": {p: {**params, **entry.protocols.get(p, {})} for p, params in suite.protocols.items()},
            "val_fraction": suite.val_fraction, "train_split": suite.train_split,
            "deterministic": suite.deterministic}
    if suite.image_size is not None:  # only when set, so the run ids of suites without it stay as they were
        spec["image_size"] = suite.image_size
    if cls.components:  # an evaluation-time combination of other runs: their specs are part of this one
        entries = {e.name: e for e in suite.methods}
        spec["components"] = [make_spec(suite, dataset, entries.get(name, MethodEntry(name, name, {}, {})), seed, budget)
                              for name in cls.components]
        for component in spec["components"]:  # the combination's features are computed on its own inputs
            if component["config"]["input_norm"] != config["input_norm"]:
                raise UsageError(f"method {entry.label!r}: input_norm {config['input_norm']!r} differs from its "
                                 f"component {component['label']!r}'s {component['config']['input_norm']!r} "
                                 f"(a combination and its components normalise images alike)")
    return spec


def plan(suite: Suite) -> list[Job]:
    """The grid dataset x method x seed x budget, in that nesting order."""
    return [Job(suite.name, d, e, s, b, make_spec(suite, d, e, s, b))
            for d in suite.datasets for e in suite.methods for s in suite.seeds for b in suite.budgets]


def check_ranks(jobs: list[Job], world: int) -> None:
    """Every run of a data-parallel launch, and every component it trains, splits over ``world`` ranks (its batch,
    and its adapter's own rules: :meth:`Method.check_config`): one line naming the run, before any trains."""
    for job in jobs:
        for spec in (job.spec, *job.spec.get("components", [])):
            cls = METHODS.get(spec["method"])
            if not cls.trains:
                continue
            try:
                distributed.check_batch_split(int(spec["config"]["batch_size"]), world)
                cls.check_config(spec["config"], world)
            except UsageError as exc:
                raise UsageError(f"{job.describe()}: {exc}") from None


def exception_line(exc: BaseException) -> str:
    """``ValueError: bad value (my_method.py:14, in training_step)``: the exception and the innermost line
    outside torch that raised it (an adapter's, not the autograd engine's)."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


#: Set (to anything but empty) to have a raising run's error end with its whole traceback, for an adapter's author.
TRACEBACK_VARIABLE = "SSL_HARNESS_TRACEBACK"


def run_or_say_why(runner: "Runner", jobs: list[Job], force: bool = False) -> list[dict[str, Any]]:
    """:meth:`Runner.run`, where an exception from the code a run calls (an adapter's step or hook) becomes a
    :class:`RunError` naming the run and the line that raised it, which the CLI prints as one line instead of a
    traceback (with :data:`TRACEBACK_VARIABLE` set, followed by the traceback, formatted where it was raised, so
    also from a worker process). The harness's own one-line errors and an interrupt pass unchanged; locks are
    released already."""
    try:
        return runner.run(jobs, force=force)
    except (UsageError, EnvironmentFailure, OSError, RunError):
        raise
    except Exception as exc:
        detail = ("\n" + "".join(traceback.format_exception(exc)).rstrip() if os.environ.get(TRACEBACK_VARIABLE)
                  else f" ({TRACEBACK_VARIABLE}=1 adds the traceback)")
        raise RunError(f"{getattr(exc, 'failed_run', 'a run')} raised {exception_line(exc)}; stored runs are kept, "
                       f"fix it and run again{detail}") from exc


def run_summary(record: dict[str, Any]) -> str:
    """One line for a finished run: its status, training and evaluation time, and headline metrics."""
    if record.get("status") != "ok":
        return f"FAILED after {record.get('train_seconds', 0):.1f} s: {record.get('reason', '')}"
    eval_seconds = sum(record.get("eval_seconds", {}).values())
    metrics = record.get("metrics", {})
    rep = "backbone" if "backbone" in metrics else next(iter(metrics), None)
    shown = {k: v for k, v in metrics.get(rep, {}).items() if is_headline(k)}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items()))
    return f"trained {record.get('train_seconds', 0):.1f} s, evaluated {eval_seconds:.1f} s" + (
        f"; {rep}: {scores}" if scores else "")


class Runner:
    """Runs jobs into a :class:`ResultStore`, loading each dataset and manifest once.

    Under ``torch.distributed`` every rank runs the same jobs together (data-parallel training);
    rank 0 alone decides what to run, holds the locks, evaluates and writes the records.
    """

    def __init__(self, results_dir: Path, data_dir: Path, device: str = "auto", quiet: bool = False,
                 log: Callable[[str], None] = print, checkpoint_seconds: float = 60.0,
                 log_backend: str = "none", precision: str = "auto", compile: bool = False,
                 pipeline: str = "batched", loader_workers: int | None = None, retry_failed: bool = False) -> None:
        self.results_dir, self.data_dir = Path(results_dir), Path(data_dir)
        self.log_backend = log_backend
        self.device = resolve_device(device)
        self.precision, self.compile = resolve_precision(precision, self.device), compile
        if pipeline not in PIPELINES:
            raise choices_error("pipeline", pipeline, PIPELINES)
        self.pipeline, self.loader_workers = pipeline, loader_workers
        if distributed.get_world_size() > 1 and self.device == "cuda":  # this rank's GPU, set by init_distributed
            self.device = f"cuda:{torch.cuda.current_device()}"
        self.quiet, self.log, self.checkpoint_seconds = quiet, log, checkpoint_seconds
        self.retry_failed = retry_failed
        self._data: dict[tuple[str, float], tuple[ImageData, SplitManifest]] = {}

    def dataset(self, name: str, val_fraction: float) -> tuple[ImageData, SplitManifest]:
        key = (name, val_fraction)
        if key not in self._data:
            self._data[key] = load_split_data(name, self.data_dir, val_fraction)
        return self._data[key]

    def run(self, jobs: list[Job], force: bool = False) -> list[dict[str, Any]]:
        """Run every job without a stored record (all of them with ``force``, failed ones too with
        ``retry_failed``); return all records. Temp files of killed writers are removed first."""
        records = []
        main = distributed.is_main()
        stored: dict[str, dict[str, Any] | None] = {}  # records on disk, each read once (again under its lock)
        if main:
            for suite in sorted({job.suite for job in jobs}):
                ResultStore(self.results_dir, suite).clean_temp_files()
            for job in jobs:  # an unreadable stored record stops the suite here, before anything trains
                store = ResultStore(self.results_dir, job.suite)
                if store.has(job.run_id):
                    stored[job.run_id] = store.load(job.run_id)
        for i, job in enumerate(jobs, 1):
            place = f"[{i}/{len(jobs)}] " if len(jobs) > 1 else ""  # a pool's worker runs one job; the pool counts
            store = ResultStore(self.results_dir, job.suite)
            rid = job.run_id
            with ExitStack() as held:
                action = "run"
                if main:
                    if keeps(stored.get(rid), force, self.retry_failed):
                        action = "stored"
                    elif not held.enter_context(store.lock(rid)):
                        action = "busy"
                    else:  # another process may have finished it meanwhile: read it again under the lock
                        stored[rid] = store.load(rid) if store.has(rid) else None
                        if keeps(stored[rid], force, self.retry_failed):
                            action = "stored"
                        elif stored[rid] is not None or force:  # a rerun starts from scratch
                            store.checkpoint_path(rid).unlink(missing_ok=True)
                action = distributed.broadcast_object(action)
                if action == "stored":
                    records.append(stored[rid] if main else store.load(rid))
                    continue
                if action == "busy":
                    self.log(f"{place}{job.describe()}: running in another process, skipped")
                    continue
                self.log(f"{place}{job.describe()}")
                try:
                    record = self.run_job(job, store)
                except Exception as exc:  # named for run_or_say_why; the innermost run (a component) keeps its name
                    exc.failed_run = getattr(exc, "failed_run", job.describe())
                    raise
                if main:
                    store.write(record)
                    self.log(f"{place}{job.describe()}: {run_summary(record)}")
                records.append(record)
        return records

    def _eval_progress(self, message: str) -> None:
        """A line per protocol while a run is evaluated, where there is no progress bar to watch."""
        if self.quiet or not sys.stderr.isatty():
            self.log(f"    {message}")

    def build(self, job: Job, data: ImageData,
              manifest: SplitManifest) -> tuple[Method, torch.Tensor, torch.Generator]:
        """The adapter on a freshly seeded backbone, the indices it trains on, and the data-order generator."""
        spec = job.spec
        cls = METHODS.get(spec["method"])
        train_idx = manifest.split(spec["train_split"])
        extra = {"components": self.components(job)} if cls.components else {}
        generator = seed_everything(job.seed, spec["deterministic"])
        size = spec.get("image_size")
        image_shape = data.image_shape if size is None else (data.image_shape[0], size, size)
        info = DataInfo(num_samples=len(train_idx), image_shape=image_shape,
                        num_classes=(data.num_classes if cls.label_level == "fine" else
                                     data.num_coarse if cls.label_level == "coarse" else None), extra=extra)
        backbone = create_backbone(spec["backbone"], data.image_shape[0])
        return create_method(spec["method"], backbone, spec["config"], info), torch.as_tensor(train_idx), generator

    def components(self, job: Job) -> dict[str, Method]:
        """Trained component methods of a combination run, trained and stored first when missing.

        Their final weights come from the components' checkpoints; a component whose record is
        stored but whose checkpoint is gone (a fresh clone) is retrained in memory, same seed.
        A failed component (its record's, or the retraining's) raises :class:`ComponentFailed`: its
        checkpoint, if any, holds weights from before the failure, not a trained run.
        """
        out = {}
        for comp_spec in job.spec["components"]:
            name = comp_spec["method"]
            comp = Job(job.suite, job.dataset, MethodEntry(name, comp_spec["label"], {}, {}), job.seed, job.budget,
                       comp_spec)
            store = ResultStore(self.results_dir, job.suite)
            # trains it when it has no record, or a failed one under retry_failed; none while another process is
            recorded = self.run([comp])
            record = recorded[0] if recorded else None
            ckpt = store.checkpoint_path(comp.run_id)
            if not ckpt.is_file() and (record is None or record.get("status") == "ok"):
                record = self.run_job(comp, store)
            if record is not None and record.get("status") != "ok":
                raise ComponentFailed(f"component {comp_spec['label']} failed: {record.get('reason', '')}")
            data, manifest = self.dataset(job.dataset, comp_spec["val_fraction"])
            method, _, _ = self.build(comp, data, manifest)
            method.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
            out[name] = method.eval().requires_grad_(False)
        return out

    def run_job(self, job: Job, store: ResultStore) -> dict[str, Any]:
        spec, seed, device = job.spec, job.seed, self.device
        data, manifest = self.dataset(job.dataset, spec["val_fraction"])
        data = with_input_norm(data, spec["config"]["input_norm"])  # for training and evaluation alike
        try:
            method, train_idx, generator = self.build(job, data, manifest)
            failure = ""
        except ComponentFailed as exc:  # stored as this run's failure; the suite goes on
            method, failure = None, str(exc)
        cfg = spec["config"]
        distributed.assert_same_everywhere(manifest.sha256)
        record: dict[str, Any] = {"run_id": job.run_id, "suite": job.suite, "spec": spec,
                                  "split_sha256": manifest.sha256, "data_fingerprint": manifest.data_fingerprint,
                                  "environment": environment(device)}
        start = time.perf_counter()
        trained = method is not None and method.trains
        if trained:
            images = data.images[train_idx].to(device)
            level = METHODS.get(spec["method"]).label_level
            labels = None
            if level is not None:
                source = data.labels if level == "fine" else data.coarse_labels
                labels = torch.as_tensor(source[train_idx.numpy()]).to(device)
            preset, allow_flip = get_preset(cfg["augment"], **cfg["augment_overrides"]), data.flips
            if self.pipeline == "per_image":
                augmenter = training_feed(images, preset, data.mean, data.std, views=cfg["views"],
                                          batch_size=min(int(cfg["batch_size"]), len(images)), seed=seed,
                                          allow_flip=allow_flip, out_size=spec.get("image_size"),
                                          num_workers=self.loader_workers)
            else:
                augmenter = Augmenter(preset, data.mean, data.std, allow_flip=allow_flip,
                                      out_size=spec.get("image_size"))
            with make_logger(self.log_backend, store.dir / ".logs" / job.run_id, spec) as logger:
                result = train(method, images, labels, job.budget, augmenter, cfg, device=device, seed=seed,
                               generator=generator, checkpoint=store.checkpoint_path(job.run_id),
                               checkpoint_seconds=self.checkpoint_seconds, quiet=self.quiet,
                               desc=f"{job.entry.label}/{job.dataset}/s{seed}", logger=logger,
                               precision=self.precision, compile_backbone=self.compile)
            record["train"] = {"used": result.usage.as_dict(), "history": result.history,
                               "peak_memory_mb": round(result.peak_memory_mb, 1), "memory_kind": result.memory_kind,
                               "images_per_second": round(result.usage.samples / max(result.usage.seconds, 1e-9), 1),
                               "ranks": distributed.get_world_size(), "precision": self.precision,
                               "channels_last": device.startswith("cuda"), "compile": self.compile,
                               "pipeline": self.pipeline}
            record["status"], record["reason"] = result.status, result.reason
        else:
            if method is not None:
                method.to(device)
            record["train"] = {"used": None, "history": [], "peak_memory_mb": 0.0, "memory_kind": "",
                               "images_per_second": None}
            record["status"], record["reason"] = ("failed", failure) if failure else ("ok", "")
        record["budget"] = {"asked": job.budget.as_dict(), "used": record["train"]["used"]}
        # training time over all segments of a resumed run (the loop's clock continues from its checkpoint)
        record["train_seconds"] = round(result.usage.seconds if trained else time.perf_counter() - start, 3)
        record["metrics"], record["eval_seconds"] = {}, {}
        if record["status"] == "ok" and distributed.is_main():
            ctx = RunContext(method, data, manifest, device, seed, image_size=spec.get("image_size"))
            record["metrics"], record["eval_seconds"] = evaluate(ctx, spec["protocols"], progress=self._eval_progress)
            record["eval_seconds"]["extract"] = round(ctx.extract_seconds, 3)
        record["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return record
