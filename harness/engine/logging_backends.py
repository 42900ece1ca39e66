"""Optional training logs to TensorBoard or Weights & Biases (``--log tensorboard|wandb``).

Off by default and never required: each backend is imported only when asked for, and a
missing package is a :class:`~harness.errors.UsageError` naming what to install. The
records in ``results/`` stay the source of truth; these logs are for watching runs live.

    logger = make_logger("tensorboard", run_dir, config=spec)
    logger.log_scalars(step, {"train/loss": 1.23, "train/lr": 0.1})
    logger.close()
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

from harness.errors import UsageError, choices_error

#: Accepted ``kind`` values (``none`` and ``None`` give a logger that does nothing).
KINDS = ("none", "tensorboard", "wandb")

_INSTALL = {
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb (and `wandb login`, or WANDB_MODE=offline to log locally)"),
}


class Logger(Protocol):
    """What the training loop calls. ``step`` is the optimiser step; values are finite floats."""

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    """Plain finite floats only (tensors, numpy scalars converted; NaN, inf and non-numbers dropped)."""
    out = {}
    for key, value in scalars.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


class NullLogger:
    """The default: logs nothing."""

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLogger(NullLogger):
    """Event files under ``run_dir`` (``tensorboard --logdir`` on its parent shows every run)."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        module = _import("tensorboard")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.writer = module.SummaryWriter(log_dir=str(run_dir))
        self.writer.add_text("config", _config_markdown(config), 0)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in _scalars(scalars).items():
            self.writer.add_scalar(key, value, int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger(NullLogger):
    """One W&B run per harness run: project ``$WANDB_PROJECT`` (default ``ssl-harness``), files under ``run_dir``.

    Without network access set ``WANDB_MODE=offline`` and ``wandb sync`` later.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        wandb = _import("wandb")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        name = Path(run_dir).name
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ssl-harness"), dir=str(run_dir),
                              config=dict(config), name=str(config.get("label", name)), id=name,
                              resume="allow")

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(_scalars(scalars), step=int(step))

    def close(self) -> None:
        self.run.finish()


def _config_markdown(config: Mapping[str, Any]) -> str:
    import json

    return "```\n" + json.dumps(config, indent=1, sort_keys=True, default=str) + "\n```"


def _import(kind: str):
    module, hint = _INSTALL[kind]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"--log {kind} needs a package that is not installed ({exc}); {hint}") from None


def check_backend(kind: str | None) -> None:
    """Fail early (before any training) when ``kind`` is unknown or its package is missing."""
    if kind in (None, "none"):
        return
    if kind not in KINDS:
        raise choices_error("log backend", kind, KINDS)
    _import(kind)


def make_logger(kind: str | None, run_dir: Path, config: Mapping[str, Any]) -> Logger:
    """A logger of ``kind`` (``none``/None, ``tensorboard``, ``wandb``) writing under ``run_dir``.

    ``config`` (the run's spec) is attached to the run. Raises :class:`UsageError` for an
    unknown kind or a missing package.
    """
    if kind in (None, "none"):
        return NullLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(Path(run_dir), config)
    if kind == "wandb":
        return WandbLogger(Path(run_dir), config)
    raise choices_error("log backend", kind, KINDS)
