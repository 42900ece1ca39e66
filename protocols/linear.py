"""Linear evaluation of frozen representations.

* :func:`lbfgs_probe`: multinomial logistic regression on standardised frozen features,
  full-batch L-BFGS, L2 strength chosen on a validation split (the protocol of
  Kornblith et al. 2019 and Chen et al. 2020, SimCLR, for transfer; Radford et al. 2021).
* :func:`sgd_probe`: the linear evaluation of self-supervised learning in the form of He et al.
  2020 (MoCo) and Chen et al. 2020: a linear head on the frozen encoder, SGD with momentum,
  augmented training images, here with a per-step cosine schedule. Its defaults (10 epochs,
  lr 0.1, batch 256) are a short CPU-scale setting, not MoCo's ``main_lincls.py`` (100 epochs,
  lr 30, the lr x0.1 at epochs 60 and 80), so its numbers are not comparable with published
  linear-evaluation accuracies unless a suite sets the recipe it follows (the transfer suites
  set Thanos' head: AdamW lr 1e-3, 100 epochs).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from protocols._common import (ArrayLike, check_classes, check_features, check_labels,
                               check_positive, check_positive_int, check_same_dim,
                               check_same_length, topk_accuracy)
from protocols.base import EvalContext, register_protocol

L2_GRID = tuple(float(v) for v in np.logspace(-6, 0, 7))
TOL = 1e-4  # L-BFGS stops when the largest |gradient| entry is below this (scikit-learn's tol)


def _standardize_(x: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``x`` in place to zero mean and unit variance per feature with the statistics of
    ``x[rows]`` (two passes, no copies); returns that mean and standard deviation."""
    mean = x[rows].mean(0)
    x.sub_(mean)
    std = torch.linalg.vector_norm(x[rows], dim=0) / math.sqrt(len(x[rows]))
    std[std == 0] = 1
    x.div_(std)
    return mean, std


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int,
                 init: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias unpenalised) by full-batch L-BFGS
    with a strong-Wolfe line search, from ``init = (W, b)``."""
    w, b = (p.clone().requires_grad_() for p in init)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=TOL,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + l2 / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _ranked(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor], top: int) -> np.ndarray:
    return F.linear(x, *params).topk(top, dim=1).indices.cpu().numpy()


def lbfgs_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, *,
                val_x: ArrayLike | None = None, val_y: ArrayLike | None = None,
                l2_grid: tuple[float, ...] = L2_GRID, val_fraction: float = 0.2, seed: int = 0,
                max_iter: int = 1000, device: str = "cpu") -> dict[str, float]:
    """Multinomial logistic regression on frozen features, L2 strength chosen on validation.

    Minimises ``mean(CE) + l2/2 ||W||^2`` (bias unpenalised) by full-batch L-BFGS on features
    standardised with the fitting set's statistics. scikit-learn's ``LogisticRegression``
    minimises ``C sum(CE) + 1/2 ||W||^2``, so ``l2`` here is ``C = 1 / (l2 n)`` there for ``n``
    training rows. The sweep runs ``l2_grid`` from strongest to weakest, each fit warm-started
    from the previous one, on the validation split (``val_x``/``val_y``, or a stratified
    ``val_fraction`` of train drawn with ``seed``); ties go to the stronger L2. The chosen
    model is refit on train+val (standardised with their statistics, warm-started from the
    chosen model) and scored on test.

    ``train_x`` may be (V, n, D): V augmented views of each of the n training images, all
    used as training rows (a carved validation split holds out whole images).

    Returns ``top1`` (and ``top5`` with at least 5 classes) on test, the chosen ``l2``, its
    ``val_top1``, and ``val_top1@l2=<value>`` for every value swept; fractions in [0, 1].
    """
    views = check_features(train_x, "train_x", ndim=3 if np.ndim(train_x) == 3 else 2)
    views = views if views.ndim == 3 else views[None]
    train_y, test_y = check_labels(train_y, "train_y"), check_labels(test_y, "test_y")
    test_x = check_features(test_x, "test_x")
    check_same_length(views[0], train_y, "train_x", "train_y")
    check_same_length(test_x, test_y, "test_x", "test_y")
    check_same_dim(views, test_x, "train_x", "test_x")
    if len(l2_grid) == 0:
        raise ValueError("l2_grid is empty")
    for l2 in l2_grid:
        check_positive(l2, "every l2 in l2_grid")
    check_positive_int(max_iter, "max_iter")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        check_classes(train_y, "train_y")
        fit, val = train_test_split(np.arange(len(train_y)), test_size=val_fraction,
                                    random_state=seed, stratify=train_y)
        val_x, val_y = views[:, val].reshape(-1, views.shape[2]), np.tile(train_y[val], len(views))
        views, train_y = views[:, fit], train_y[fit]
    else:
        val_x, val_y = check_features(val_x, "val_x"), check_labels(val_y, "val_y")
        check_same_length(val_x, val_y, "val_x", "val_y")
        check_same_dim(views, val_x, "train_x", "val_x")
    fit_x, fit_y = views.reshape(-1, views.shape[2]), np.tile(train_y, len(views))
    classes, y_all = check_classes(np.concatenate([fit_y, val_y]), "train_y and val_y")
    top = min(5, len(classes))

    # one copy of train+val, standardised in place with the train statistics for the sweep
    n_fit, data = len(fit_y), torch.from_numpy(np.concatenate([fit_x, val_x])).to(device)
    y_all = torch.as_tensor(y_all, device=device)
    mean, std = _standardize_(data, slice(0, n_fit))
    params = (torch.zeros(len(classes), data.shape[1], device=device),
              torch.zeros(len(classes), device=device))
    val_top1, fitted = {}, {}
    for l2 in sorted(map(float, l2_grid), reverse=True):
        params = fitted[l2] = _fit_softmax(data[:n_fit], y_all[:n_fit], l2, max_iter, params)
        val_top1[l2] = float((classes[_ranked(data[n_fit:], params, 1)[:, 0]] == val_y).mean())
    best = max(val_top1, key=val_top1.get)

    # refit on train+val re-standardised with its own statistics: z = scale z' + shift, so the
    # chosen model (w, b) on z is (w scale, b + w shift) on z', an exact warm start
    shift, scale = _standardize_(data, slice(None))
    w, b = fitted[best]
    params = _fit_softmax(data, y_all, best, max_iter, (w * scale, b + w @ shift))
    test_t = ((torch.as_tensor(test_x, device=device) - mean) / std - shift) / scale
    out = topk_accuracy(test_y, classes[_ranked(test_t, params, top)])
    out |= {"l2": best, "val_top1": val_top1[best]}
    return out | {f"val_top1@l2={l2:g}": acc for l2, acc in val_top1.items()}


def _encode(encoder: torch.nn.Module, images: Any, prepare: Callable[[Any], Any],
            batch_size: int, device: str) -> torch.Tensor:
    """Frozen features (n, D) of ``prepare(images)``, ``batch_size`` images at a time."""
    with torch.no_grad():
        return torch.cat([encoder(prepare(images[i:i + batch_size]).to(device)).flatten(1)
                          for i in range(0, len(images), batch_size)])


PROBE_OPTIMIZERS = ("sgd", "adamw")
#: The sgd protocol's training augmentation: the linear-eval crop and flip, or the run's own training augmentation.
PROBE_AUGMENTATIONS = ("probe", "training")


def _dropout_on(encoder: torch.nn.Module) -> None:
    """Train mode for every module but BatchNorm: dropout and stochastic depth sample as in training while
    batch statistics stay frozen (thanos-code freezes its encoder by ``requires_grad`` alone, and Lightning
    trains the head with the whole model in train mode; the paper's ViT has no BatchNorm)."""
    encoder.train()
    for module in encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def sgd_probe(encoder: torch.nn.Module, train_images: Any, train_y: ArrayLike, test_images: Any,
              test_y: ArrayLike, *, normalize: Callable[[Any], Any],
              augment: Callable[[Any], Any] | None = None, epochs: int = 10, lr: float = 0.1,
              momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 256,
              seed: int = 0, device: str = "cpu", val_images: Any | None = None,
              val_y: ArrayLike | None = None, optimizer: str = "sgd",
              encoder_dropout: bool = False) -> dict[str, float]:
    """Standard linear evaluation: a linear head on the frozen ``encoder`` (eval mode, so
    BatchNorm statistics stay frozen; no gradients), trained with SGD + momentum (or AdamW with
    ``optimizer="adamw"``, as Thanos' head; ``momentum`` unused) and a per-step cosine
    learning-rate schedule for ``epochs`` epochs on ``augment(images)``
    (``normalize(images)``, features cached once, when ``augment`` is None and
    ``encoder_dropout`` False). ``encoder_dropout`` keeps the encoder's dropout and stochastic
    depth on while the head trains (BatchNorm still frozen), as Thanos' transfer runs do;
    validation and test features are always computed in eval mode.

    ``normalize``/``augment`` map a uint8 image batch to the encoder's float input.
    Returns the final head's ``top1``/``top5`` on test; with a validation set also the best
    ``val_top1``, its ``best_epoch`` (1-based, the earliest on a tie) and the test
    ``top1@best_val``/``top5@best_val`` of that epoch's head. The epoch is chosen on validation
    alone; the test split is scored once per reported head, after training. Fractions in
    [0, 1]. Seeded: the batch order, the head's init and the augmentations' torch random draws.
    """
    train_y, test_y = check_labels(train_y, "train_y"), check_labels(test_y, "test_y")
    check_same_length(train_images, train_y, "train_images", "train_y")
    check_same_length(test_images, test_y, "test_images", "test_y")
    if (val_images is None) != (val_y is None):
        raise ValueError("give both val_images and val_y, or neither")
    if val_y is not None:
        val_y = check_labels(val_y, "val_y")
        check_same_length(val_images, val_y, "val_images", "val_y")
    for value, name in ((epochs, "epochs"), (batch_size, "batch_size")):
        check_positive_int(value, name)
    check_positive(lr, "lr")
    if optimizer not in PROBE_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (valid: {', '.join(PROBE_OPTIMIZERS)})")
    classes, y_idx = check_classes(train_y, "train_y")
    top = min(5, len(classes))

    was_training = encoder.training
    encoder.eval()
    cuda = torch.device(device).type == "cuda"
    try:
        with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
            torch.manual_seed(seed)
            test_f = _encode(encoder, test_images, normalize, batch_size, device)
            val_f = None if val_y is None else _encode(encoder, val_images, normalize, batch_size, device)
            fixed_f = None if augment or encoder_dropout else _encode(encoder, train_images, normalize,
                                                                      batch_size, device)
            if encoder_dropout:
                _dropout_on(encoder)
            head = torch.nn.Linear(test_f.shape[1], len(classes)).to(device)
            torch.nn.init.normal_(head.weight, std=0.01)
            torch.nn.init.zeros_(head.bias)
            opt = (torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                   if optimizer == "sgd" else torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay))
            steps = epochs * math.ceil(len(train_y) / batch_size)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
            labels = torch.as_tensor(y_idx, device=device)
            rng = np.random.default_rng(seed)
            best_val, best_epoch, best_head = -1.0, 0, None
            for epoch in range(1, epochs + 1):
                order = rng.permutation(len(train_y))
                for batch in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
                    if fixed_f is None:
                        feats = _encode(encoder, train_images[batch], augment or normalize, batch_size, device)
                    else:
                        feats = fixed_f[batch]
                    loss = F.cross_entropy(head(feats), labels[batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                if val_f is not None:
                    with torch.no_grad():
                        val_acc = float((classes[head(val_f).argmax(1).cpu().numpy()] == val_y).mean())
                    if val_acc > best_val:
                        best_val, best_epoch = val_acc, epoch
                        best_head = {k: v.clone() for k, v in head.state_dict().items()}

            def test_scores() -> dict[str, float]:
                with torch.no_grad():
                    return topk_accuracy(test_y, classes[head(test_f).topk(top, dim=1).indices.cpu().numpy()])

            # the test split is scored once per reported head: the final one and the best on val
            out = test_scores()
            if best_head is not None:
                head.load_state_dict(best_head)
                out |= {"val_top1": best_val, "best_epoch": float(best_epoch)}
                out |= {f"{key}@best_val": value for key, value in test_scores().items()}
    finally:
        encoder.train(was_training)
    return out


@register_protocol("lbfgs", defaults={"l2_grid": list(L2_GRID), "max_iter": 1000})
def lbfgs_protocol(ctx: EvalContext, rep: str, *, l2_grid: list[float],
                   max_iter: int) -> dict[str, float]:
    """L-BFGS logistic-regression probe on frozen features, L2 chosen on val, refit on train+val."""
    x, y = ctx.features(rep), ctx.labels("fine")
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    val_x, val_y = (x[val], y[val]) if len(val) else (None, None)  # no val split: carve one from train
    return lbfgs_probe(x[train], y[train], x[test], y[test], val_x=val_x, val_y=val_y,
                       l2_grid=tuple(l2_grid), seed=ctx.seed, max_iter=max_iter, device=ctx.device)


@register_protocol("sgd", defaults={"epochs": 10, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
                                    "batch_size": 256, "augment": True, "augment_preset": "probe",
                                    "optimizer": "sgd", "encoder_dropout": False},
                   inputs=("encoder",), choices={"optimizer": PROBE_OPTIMIZERS,
                                                 "augment_preset": PROBE_AUGMENTATIONS})
def sgd_protocol(ctx: EvalContext, rep: str, *, epochs: int, lr: float, momentum: float,
                 weight_decay: float, batch_size: int, augment: bool, augment_preset: str, optimizer: str,
                 encoder_dropout: bool) -> dict[str, float]:
    """SGD linear evaluation of the frozen encoder on augmented train images (val picks the epoch).

    ``augment_preset``: ``probe`` (crop and flip) or ``training`` (the run's own augmentation, as
    Thanos' transfer runs train their head)."""
    y = ctx.labels("fine")
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    val_images, val_y = (ctx.images(val), y[val]) if len(val) else (None, None)
    return sgd_probe(ctx.encoder(), ctx.images(train), y[train], ctx.images(test), y[test],
                     normalize=ctx.normalize,
                     augment=partial(ctx.probe_augment, preset=augment_preset) if augment else None,
                     epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                     batch_size=batch_size, seed=ctx.seed, device=ctx.device,
                     val_images=val_images, val_y=val_y, optimizer=optimizer, encoder_dropout=encoder_dropout)
