"""The method-adapter base class and the method registry.

An adapter declares its hyperparameters at two scales (``paper`` and ``cpu``), builds its
heads on the backbone the harness gives it, and returns the loss for a batch of augmented
views. The harness owns everything else: data, augmentation, the optimiser, the schedule,
the budget, checkpoints and evaluation. Register an adapter with ``@register_method``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from harness.errors import UsageError, choices_error
from harness.models.batchnorm import batchnorm_groups
from harness.registry import Registry
from harness.execution.validate import coerce_like, number_in_range

#: Training settings every adapter has; ``defaults`` override them per scale. Schedule
#: positions (``warmup``, ``milestones``) are fractions of the budget, so one config works
#: for any budget (CLD's 5 warm-up epochs of 200 are ``warmup: 0.025``).
TRAINING_DEFAULTS: dict[str, Any] = {
    "batch_size": 256,
    "optimizer": "sgd",       # sgd | adam | adamw
    "lr": 0.06,
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "schedule": "cosine",     # cosine | constant | step | cosine_restarts | cosine_annealing (engine.train.lr_factor)
    "warmup": 0.0,            # fraction of the budget with linear warm-up (from 1e-3 / (warmup + 1e-3) of lr)
    "warmup_start": None,     # the warm-up's first factor of lr instead (CLD's GradualWarmupScheduler: 0.01)
    "lr_update": "step",      # step | epoch_start | epoch_end: lr set every step or once per epoch (engine.train.LR_UPDATES)
    "min_lr": 0.0,
    "milestones": [],         # step schedule: fractions of the budget where lr is multiplied by gamma
    "gamma": 0.1,
    "restarts": 1,            # cosine_restarts: number of equal cycles
    "half_periods": 1,        # cosine_annealing: budget / T_max of torch's CosineAnnealingLR (6 = T_max 100 of 600 epochs)
    "views": 2,               # augmented views per sample
    "input_norm": "dataset",  # dataset | none | legacy_cifar10: how images are normalised (data.datasets.INPUT_NORMS)
    "augment": "simclr",      # a preset of harness.data.augment
    "augment_overrides": {},  # e.g. {"crop_scale": [0.2, 1.0]}
}


@dataclass(frozen=True)
class DataInfo:
    """What an adapter may know about its training data. No class count unless it uses labels."""

    num_samples: int
    image_shape: tuple[int, int, int]
    num_classes: int | None = None  # only set for methods with ``label_level``
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One training batch: ``views`` are normalised augmented tensors of the same samples.

    ``index`` holds each sample's position in the training set (0..num_samples-1), which
    memory banks and instance classifiers key on; ``labels`` is set only for methods
    with a ``label_level``.
    """

    views: list[torch.Tensor]
    index: torch.Tensor
    labels: torch.Tensor | None = None


class Method(nn.Module):
    """Base class of method adapters. Subclasses set ``defaults`` and implement ``training_step``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Hyperparameters per scale, merged over TRAINING_DEFAULTS.
    defaults: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": {}}
    #: Optuna search space: {key: ("float"|"log"|"int"|"categorical", low, high) or ("categorical", [choices])}.
    search_space: ClassVar[dict[str, tuple]] = {}
    #: Config keys that name one of a fixed set of variants, e.g. ``{"label_pass": ("official", "plain")}``;
    #: :func:`resolve_config` checks them before any training.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Config keys with an upper bound as well, ``{key: (low, high)}`` (inclusive), e.g. a momentum
    #: coefficient in [0, 1]; :func:`resolve_config` checks them before any training.
    ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    #: ``None`` for methods without labels; ``"fine"`` or ``"coarse"`` for (weakly) supervised ones.
    label_level: ClassVar[str | None] = None
    #: False for baselines evaluated as built (pixels, random init) and for combinations.
    trains: ClassVar[bool] = True
    #: Names of methods whose trained runs (same dataset, seed, budget) this method combines at
    #: evaluation time; the harness trains them first and passes them in ``info.extra["components"]``.
    components: ClassVar[tuple[str, ...]] = ()
    #: How much of the budget was done before the current step, in [0, 1); the training loop sets it before
    #: each step (also after a resume), so a coefficient the paper schedules over training can follow it
    #: (BYOL's EMA rate rising to 1), as the learning rate does.
    progress: float = 0.0
    #: Whether :meth:`encode_views` sends a step's views through the backbone as one batch; the training loop sets
    #: it on one GPU after making the backbone's BatchNorms per-view capable (:func:`harness.models.batchnorm.split_batchnorms`).
    views_in_one_pass: bool = False

    def __init__(self, backbone: nn.Module, cfg: dict[str, Any], info: DataInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.info = info

    # ------------------------------------------------------------ training
    def forward(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """``training_step``; the loop calls the adapter this way so that DDP can wrap it."""
        return self.training_step(batch)

    def training_step(self, batch: Batch) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss for one batch (optionally with a dict of scalars to log: detached 0-d tensors, which the loop
        reads a step later without stalling the device, or floats). Every trainable parameter must get a
        gradient from it (DDP runs without ``find_unused_parameters``): freeze what a configuration leaves idle."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def encode_views(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The backbone's features of each view, with BatchNorm statistics per view: a pass per view, as the
        official codes encode them. With :attr:`views_in_one_pass`, the views go through as one batch whose
        BatchNorms normalise each view apart (:class:`~harness.models.batchnorm.SplitBatchNorm`): the same
        computation, with every other layer launched once instead of once per view (a backbone with dropout or
        drop-path, the ViT, draws its masks for the views at once: the same distribution, other draws)."""
        if not self.views_in_one_pass or len(views) == 1:
            return [self.backbone(v) for v in views]
        with batchnorm_groups(self.backbone, len(views)):
            return list(self.backbone(torch.cat(list(views))).chunk(len(views)))

    @classmethod
    def check_config(cls, cfg: dict[str, Any], world: int = 1) -> None:
        """Raise :class:`UsageError` if the resolved ``cfg`` cannot train, over ``world`` data-parallel ranks: an
        adapter's rules that tie its keys together (one key's range is :attr:`ranges`). Called by
        :func:`resolve_config` (one process) and, for every run of a multi-process launch, with its rank count,
        before any trains; the global batch's split over the ranks is checked beside it
        (:func:`harness.engine.distributed.check_batch_split`)."""

    def rank_local_parameters(self) -> list[str]:
        """Names of parameters that hold a different shard on every rank (DDP must not average them)."""
        return []

    def on_train_start(self, loader: "UnaugmentedLoader") -> None:
        """Called once before the first step (not on resume); ``loader`` yields plain views of the train set."""

    def on_epoch_start(self, epoch: int, loader: "UnaugmentedLoader") -> None:
        """Called at the start of every epoch (pseudo-labelling, memory refresh)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called at the end of every epoch."""

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (momentum encoders, memory-bank updates)."""

    # ------------------------------------------------------------ evaluation
    def representations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features evaluated by the protocols. ``backbone`` always; heads where the paper evaluates them."""
        return {"backbone": self.backbone(x)}

    def cluster_heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cluster-head scores (n, K) per head name; the argmax is the assignment. Empty by default."""
        return {}


class UnaugmentedLoader:
    """Typing stub for the harness's loader of normalised, unaugmented training batches.

    Iterating yields ``(images, index)``; the harness provides the implementation.
    """

    def __iter__(self):  # pragma: no cover - interface only
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (timm's ``@register_model``)."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):  # checked here, not at its first step
            raise ValueError(f"method {name!r}: {getattr(cls, '__name__', cls)!r} is not a subclass of "
                             f"methods.base.Method")
        cls.name = name
        for scale in ("paper", "cpu"):
            unknown = set(cls.defaults.get(scale, {})) - set(TRAINING_DEFAULTS) - set(cls.defaults.get("method", {}))
            if unknown:
                raise ValueError(f"method {name!r}: {scale} defaults set undeclared keys {sorted(unknown)}; "
                                 f"declare method-specific keys under defaults['method']")
        if cls.trains and cls.training_step is Method.training_step:
            raise ValueError(f"method {name!r}: {cls.__name__} trains but does not implement training_step "
                             f"(set trains = False for a method evaluated as built)")
        return METHODS.register(name)(cls)

    return decorator


#: Valid ranges (low, high; None is unbounded) of the shared training keys, checked with the types
#: before any training (a batch of 0 images or a momentum of 2 stops with one line).
TRAINING_RANGES: dict[str, tuple[float | None, float | None]] = {
    "batch_size": (1, None), "lr": (0, None), "weight_decay": (0, None), "momentum": (0, 1), "warmup": (0, 1),
    "min_lr": (0, None), "milestones": (0, 1), "gamma": (0, None), "restarts": (1, None), "half_periods": (1, None),
    "views": (1, None), "warmup_start": (0, 1),
}


def _check_training_names(cfg: dict[str, Any], method: str) -> None:
    """The optimiser, schedule, lr update, augmentation preset (and its overrides) and input normalisation name things
    that exist."""
    # Imported here: harness.engine.train imports this module.
    from harness.data.augment import OVERRIDE_RANGES, PRESETS, get_preset
    from harness.data.datasets import INPUT_NORMS
    from harness.engine.train import LR_UPDATES, OPTIMIZERS, SCHEDULES

    checks = [("optimizer", cfg["optimizer"], OPTIMIZERS), ("schedule", cfg["schedule"], SCHEDULES),
              ("lr_update", cfg["lr_update"], LR_UPDATES), ("augment", cfg["augment"], PRESETS),
              ("input_norm", cfg["input_norm"], INPUT_NORMS)]
    for kind, value, valid in checks:
        if value not in valid:
            raise UsageError(f"method {method!r}: {choices_error(kind, value, valid)}")
    try:
        # YAML's `{1: 0.5}` names no field (and a keyword argument must be a string)
        odd = [key for key in cfg["augment_overrides"] if not isinstance(key, str)]
        if odd:
            raise choices_error("augment_overrides key", odd[0], OVERRIDE_RANGES)
        get_preset(cfg["augment"], **cfg["augment_overrides"])
    except UsageError as exc:
        raise UsageError(f"method {method!r}: {exc}") from None


def resolve_config(cls: type[Method], scale: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """TRAINING_DEFAULTS < method-specific defaults < the scale's defaults < suite overrides.

    Checked here, before any training, each with one line naming the bad value: an unknown key, a
    value not of its declared default's type (numeric strings, as PyYAML reads ``1e-3``, become
    numbers), a shared training key outside :data:`TRAINING_RANGES`, an adapter's own number below 0
    (below 1 for a count declared positive, at or below 0 for a temperature) or outside its
    ``ranges``, an optimiser, schedule, lr update,
    augmentation preset or input normalisation that does not exist, and augmentation overrides of the wrong shape or range.
    """
    if scale not in ("paper", "cpu"):
        raise UsageError(f"unknown scale {scale!r} (valid: cpu, paper)")
    cfg = {**TRAINING_DEFAULTS, **cls.defaults.get("method", {}), **cls.defaults.get(scale, {})}
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise UsageError(f"unknown config key {key!r} for method {cls.name!r} (valid: {', '.join(sorted(cfg))})")
        cfg[key] = coerce_like(value, cfg[key], f"config key {key!r} of method {cls.name!r}")
    for key, (low, high) in TRAINING_RANGES.items():
        if key in cfg and cfg[key] is not None:  # None: a key's "not set" (warmup_start)
            cfg[key] = number_in_range(cfg[key], low, high, f"config key {key!r} of method {cls.name!r}")
    declared = {**cls.defaults.get("method", {}), **cls.defaults.get(scale, {})}
    for key, default in declared.items():  # the adapter's own numbers: sizes, counts, weights, temperatures
        if key in TRAINING_DEFAULTS or isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        name = f"config key {key!r} of method {cls.name!r}"
        if key == "temperature" or key.endswith("_temperature"):
            if not cfg[key] > 0:
                raise UsageError(f"{name} must be positive, got {cfg[key]!r}")
        else:  # none is meaningful below 0; a count or size declared positive stays positive (a queue of 0)
            number_in_range(cfg[key], 1 if isinstance(default, int) and default >= 1 else 0, None, name)
    for key, (low, high) in cls.ranges.items():
        number_in_range(cfg[key], low, high, f"config key {key!r} of method {cls.name!r}")
    _check_training_names(cfg, cls.name)
    for key, valid in cls.choices.items():
        if cfg[key] not in valid:
            raise UsageError(f"config key {key!r} of method {cls.name!r} is {cfg[key]!r} "
                             f"(valid: {', '.join(sorted(valid))})")
    try:
        cls.check_config(cfg)
    except UsageError as exc:
        raise UsageError(f"method {cls.name!r}: {exc}") from None
    return cfg
