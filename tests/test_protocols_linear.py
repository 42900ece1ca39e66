import math
import re
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import protocols  # noqa: F401  (registers the wrappers)
from protocol_context import BlobContext, record_calls
from protocols import linear
from protocols.linear import _fit_softmax, _standardize_, lbfgs_probe, lbfgs_protocol, sgd_probe, sgd_protocol


def overlapping_blobs(n, seed, num_classes=5, dim=20, means_seed=0):
    """Gaussian classes close enough that accuracy is well below 1 (so it can disagree)."""
    means = np.random.default_rng(means_seed).normal(size=(num_classes, dim)) * 0.4
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("l2", [1e-3, 3e-2])
def test_matches_sklearn_at_equal_l2(l2):
    (x, y), (xv, yv), (xt, yt) = overlapping_blobs(1200, 1), overlapping_blobs(400, 2), overlapping_blobs(2000, 3)
    x_before = x.copy()
    ours = lbfgs_probe(x, y, xt, yt, val_x=xv, val_y=yv, l2_grid=(l2,))
    assert np.array_equal(x, x_before)  # standardised in a copy, never in the caller's array
    # our refit is on train+val standardised with its statistics; sklearn's C = 1 / (l2 n)
    xa, ya = np.concatenate([x, xv]), np.concatenate([y, yv])
    mean, std = xa.mean(0), xa.std(0)
    ref = LogisticRegression(C=1 / (l2 * len(xa)), max_iter=2000).fit((xa - mean) / std, ya)
    sk_top1 = ref.score((xt - mean) / std, yt)
    assert 0.5 < sk_top1 < 0.95  # a problem where the probes can disagree
    assert ours["top1"] == pytest.approx(sk_top1, abs=0.005)
    assert ours["l2"] == l2 and set(ours) == {"top1", "top5", "l2", "val_top1", f"val_top1@l2={l2:g}"}


def test_standardize_uses_the_statistics_of_the_given_rows_only():
    """Hand-worked: rows 0-1 of column 0 are 1 and 3 (mean 2, population std 1), row 2 is 10;
    the whole array is shifted and scaled by rows 0-1 alone, so it becomes -1, 1, 8. A constant
    column keeps std 1. Catches statistics taken over every row (the sweep's validation rows
    leaking into its standardisation) and the sample std (n - 1)."""
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [10.0, 7.0]])
    mean, std = _standardize_(x, slice(0, 2))
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]
    assert x.tolist() == [[-1.0, 0.0], [1.0, 0.0], [8.0, 2.0]]


@pytest.mark.parametrize("l2", [3e-2, 1e-1])
def test_fit_softmax_minimises_mean_ce_plus_half_l2_as_sklearn(l2):
    """``mean(CE) + l2/2 ||W||^2`` with an unpenalised bias is scikit-learn's multinomial
    ``LogisticRegression(C=1 / (l2 n))``: the same weights and, up to a common shift of the
    logits, the same biases. Catches ``l2 ||W||^2`` (twice the penalty) and a penalised bias,
    which the test accuracy alone does not see."""
    x, y = overlapping_blobs(300, 1, dim=6)
    x = (x - x.mean(0)) / x.std(0)
    zeros = (torch.zeros(5, 6), torch.zeros(5))
    w, b = _fit_softmax(torch.from_numpy(x), torch.from_numpy(y), l2, 200, zeros)
    ref = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-8, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=2e-3)
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)


def test_l2_ties_go_to_the_stronger_penalty():
    """Separable blobs: every L2 of the grid scores 1.0 on validation, and the tie goes to the
    strongest. Catches a sweep run from weakest to strongest (the first maximum is then the weakest)."""
    means = np.random.default_rng(0).normal(size=(5, 10)) * 8  # blobs many standard deviations apart
    (x, y), (xv, yv), (xt, yt) = (overlapping_blobs(n, seed, dim=10) for n, seed in ((200, 1), (100, 2), (100, 3)))
    x, xv, xt = (data + means[labels].astype(np.float32) for data, labels in ((x, y), (xv, yv), (xt, yt)))
    out = lbfgs_probe(x, y, xt, yt, val_x=xv, val_y=yv, l2_grid=(1e-4, 1e-3, 1e-2), max_iter=100)
    assert [out[f"val_top1@l2={l2:g}"] for l2 in (1e-4, 1e-3, 1e-2)] == [1.0, 1.0, 1.0]
    assert out["l2"] == 1e-2


@pytest.mark.parametrize("seed", [5, 6])
def test_carved_validation_is_a_stratified_split_drawn_with_seed(seed):
    """Without a val set the probe carves ``train_test_split(test_size=0.2, random_state=seed,
    stratify=train_y)`` from train: the result equals the probe given that split by hand, and the two
    seeds carve different splits (different sweeps). Catches a fixed ``random_state`` and a split
    that is not stratified."""
    (x, y), (xt, yt) = overlapping_blobs(300, 1, dim=10), overlapping_blobs(100, 3, dim=10)
    grid = (1e-2, 1.0)
    fit, val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    by_hand = lbfgs_probe(x[fit], y[fit], xt, yt, val_x=x[val], val_y=y[val], l2_grid=grid, max_iter=100)
    assert lbfgs_probe(x, y, xt, yt, l2_grid=grid, seed=seed, max_iter=100) == by_hand
    other = lbfgs_probe(x, y, xt, yt, l2_grid=grid, seed=11 - seed, max_iter=100)
    assert any(other[f"val_top1@l2={l2:g}"] != by_hand[f"val_top1@l2={l2:g}"] for l2 in grid)


def test_refit_scores_test_with_the_train_and_val_statistics():
    """Validation and test sit 3 units off the training data in every feature (a domain shift), so
    train+val's statistics differ from train's: the refit model must see test standardised as its
    training rows were, and agree with scikit-learn fitted on train+val standardised with their
    statistics. Catches test features standardised with the train statistics alone (the refit's
    re-centring step dropped)."""
    (x, y), (xv, yv), (xt, yt) = overlapping_blobs(600, 1), overlapping_blobs(600, 2), overlapping_blobs(1000, 3)
    xv, xt = xv + 3, xt + 3
    ours = lbfgs_probe(x, y, xt, yt, val_x=xv, val_y=yv, l2_grid=(1e-2,))
    xa, ya = np.concatenate([x, xv]), np.concatenate([y, yv])
    mean, std = xa.mean(0), xa.std(0)
    ref = LogisticRegression(C=1 / (1e-2 * len(xa)), max_iter=2000).fit((xa - mean) / std, ya)
    assert ours["top1"] == pytest.approx(ref.score((xt - mean) / std, yt), abs=0.005)


def test_sweep_picks_validation_best_and_carves_val_with_seed():
    (x, y), (xt, yt) = overlapping_blobs(600, 1, dim=40), overlapping_blobs(600, 3, dim=40)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    out = lbfgs_probe(x, y, xt, yt, l2_grid=grid, seed=5)
    sweep = {l2: out[f"val_top1@l2={l2:g}"] for l2 in grid}
    assert out["l2"] == max(sorted(grid, reverse=True), key=sweep.get)
    assert out["val_top1"] == sweep[out["l2"]]
    assert sweep[100.0] < max(sweep.values())  # heavy L2 underfits
    assert out == lbfgs_probe(x, y, xt, yt, l2_grid=grid, seed=5)


def _sweep_reference(fit_x, fit_y, val_x, val_y, l2):
    """Validation accuracy of scikit-learn's logistic regression at ``l2`` (C = 1 / (l2 n)), fitted on
    ``fit_x`` standardised with its own statistics, which the validation rows are standardised with too."""
    mean, std = fit_x.mean(0), fit_x.std(0)
    ref = LogisticRegression(C=1 / (l2 * len(fit_x)), max_iter=5000, tol=1e-8).fit((fit_x - mean) / std, fit_y)
    return ref.score((val_x - mean) / std, val_y)


@pytest.mark.parametrize("l2", [3e-2, 3e-1])
def test_sweep_standardises_with_the_fitting_rows_alone(l2):
    """The sweep's validation accuracy at each L2 is scikit-learn's for a model fitted on the training rows
    standardised with their own statistics, on a validation set far from them (shifted and wider). Catches
    statistics of train and validation together (validation leaking into model selection) or of validation."""
    (x, y), (xv, yv), (xt, yt) = overlapping_blobs(1200, 1), overlapping_blobs(600, 2), overlapping_blobs(200, 3)
    xv = xv * 3 + 2
    ours = lbfgs_probe(x, y, xt, yt, val_x=xv, val_y=yv, l2_grid=(l2,))
    assert ours[f"val_top1@l2={l2:g}"] == pytest.approx(_sweep_reference(x, y, xv, yv, l2), abs=0.004)


def test_carved_validation_holds_out_every_view_of_its_images():
    """With V views of each training image and no validation split given, the carved validation split scores
    every view of its images (and fits on every view of the others): its accuracy is scikit-learn's over the
    V x n_val rows, here with a clean and a very noisy view. Catches scoring the first view only."""
    (x, y), (xt, yt) = overlapping_blobs(1000, 1), overlapping_blobs(200, 3)
    noisy = x + 3 * np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    views, seed, l2 = np.stack([x, noisy]), 7, 1e-1
    fit, val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=y)
    expected = _sweep_reference(views[:, fit].reshape(-1, x.shape[1]), np.tile(y[fit], 2),
                                views[:, val].reshape(-1, x.shape[1]), np.tile(y[val], 2), l2)
    ours = lbfgs_probe(views, y, xt, yt, l2_grid=(l2,), seed=seed)
    assert ours["val_top1"] == pytest.approx(expected, abs=0.004)


def test_two_views_and_string_labels():
    (x, y), (xt, yt) = overlapping_blobs(400, 1), overlapping_blobs(400, 3)
    names = np.array(["ant", "bee", "cat", "dog", "eel"])
    views = np.stack([x, x + 0.05 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)])
    one = lbfgs_probe(x, names[y], xt, names[yt], l2_grid=(1e-2,))
    two = lbfgs_probe(views, names[y], xt, names[yt], l2_grid=(1e-2,))
    assert two["top1"] == pytest.approx(one["top1"], abs=0.03)


@pytest.mark.parametrize("with_val", [True, False])
def test_lbfgs_wrapper_fits_on_train_selects_on_val_and_scores_test(with_val, monkeypatch):
    """The wrapper hands the probe the train rows to fit, the val rows to choose L2 on (none
    without a val split: the probe carves one from train) and the test rows to score.

    Test labels are redrawn at random; a probe fitted on the blobs' true labels predicts each
    test sample's blob, so top-1 is the share of test labels that still match their blob
    (a known answer, 0.083 here). Breakage tried (a patched wrapper): fitting on test, fitting
    on train+val, choosing L2 on test, carving val although one exists; each fails this test
    (the old check, 1.0 on separable blobs, passed them all).
    """
    ctx = BlobContext(with_val=with_val, relabel=("test",))
    calls = record_calls(monkeypatch, linear, "lbfgs_probe")
    out = lbfgs_protocol(ctx, "backbone", l2_grid=[1e-3, 1e-1], max_iter=200)
    x, y = ctx.features("backbone"), ctx.labels()
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    (call,) = calls
    for given, expected in zip(call.args, (x[train], y[train], x[test], y[test])):
        assert np.array_equal(given, expected)
    if with_val:
        assert np.array_equal(call.kwargs["val_x"], x[val]) and np.array_equal(call.kwargs["val_y"], y[val])
    else:
        assert call.kwargs["val_x"] is None and call.kwargs["val_y"] is None
    assert out["top1"] == np.mean(ctx.blob[test] == y[test]) < 0.5


def test_lbfgs_probe_chooses_l2_on_val_alone_and_scores_test_once(monkeypatch):
    """Issue 16: the L2 is chosen on the validation split and the test split is scored once.

    On test labels shifted by one class, choosing on test would pick L2 = 10 (test top-1 0.10
    against 0.04 at 0.1); validation picks 0.1. The choice, the sweep and ``val_top1`` are the
    same whichever labels the test split holds, and ``topk_accuracy`` (the only place test is
    scored) runs once per probe, on the test labels. Breakage tried (lbfgs_probe edited, then
    restored): the sweep scored on test, L2 picked by test top-1 with val numbers reported,
    test scored after every fit of the sweep; each fails this test.
    """
    grid = (1e-3, 1e-1, 10.0)
    (x, y), (xv, yv), (xt, yt) = (overlapping_blobs(n, seed, dim=40) for n, seed in ((300, 1), (100, 2), (100, 3)))
    shifted = (yt + 1) % 5
    assert lbfgs_probe(x, y, xt, shifted, val_x=xt, val_y=shifted, l2_grid=grid)["l2"] == 10.0  # test's choice
    scorings = record_calls(monkeypatch, linear, "topk_accuracy")
    true, other = (lbfgs_probe(x, y, xt, labels, val_x=xv, val_y=yv, l2_grid=grid) for labels in (yt, shifted))
    assert len(scorings) == 2 and all(np.array_equal(call.args[0], labels)
                                      for call, labels in zip(scorings, (yt, shifted)))
    chosen = [{key: value for key, value in out.items() if not key.startswith("top")} for out in (true, other)]
    assert chosen[0] == chosen[1] and chosen[0]["l2"] == 0.1
    assert true["top1"] > 0.7 > 0.2 > other["top1"]


def points(*groups: tuple[int, float, int]) -> tuple[torch.Tensor, np.ndarray]:
    """1-D features and labels from ``(count, position, label)`` groups."""
    x = torch.tensor([[position] for count, position, _ in groups for _ in range(count)])
    return x, np.array([label for count, _, label in groups for _ in range(count)])


def test_sgd_probe_reports_test_accuracy_of_the_best_val_epoch_scoring_test_once_per_head(monkeypatch):
    """``top1@best_val`` is the test accuracy of the head of the best validation epoch, an epoch
    that is neither the first nor the last; test is scored once per reported head (issue 16).

    An identity encoder on 1-D features: 90 training samples of class 0 at 0, 10 of class 1 at 2.
    Logistic regression learns the bias first (everything class 0), then its boundary moves
    down towards the max-margin point 1 (Soudry et al. 2018): it passes val's class-1 point at
    1.9, later val's class-0 point at 1.4. Val is right on both only in between (epoch 4 of
    10). Test holds three class-1 samples at 1.9 and one class-0 at 1.4, so a head right on val
    scores 1.0 on test, and the final head (boundary below 1.4) 0.75; with the test labels
    flipped, the best-val head scores 0.0 and the epoch does not move. Breakage tried
    (sgd_probe edited, then restored): the last epoch's head reported as best, the first
    epoch's, the best epoch chosen by test accuracy, test scored at every epoch val improved
    (the code before this test); each fails it.
    """
    train_x, train_y = points((90, 0.0, 0), (10, 2.0, 1))
    val_x, val_y = points((1, 1.9, 1), (1, 1.4, 0))
    test_x, test_y = points((3, 1.9, 1), (1, 1.4, 0))
    scorings = record_calls(monkeypatch, linear, "topk_accuracy")
    kw = dict(normalize=lambda batch: batch, epochs=10, lr=0.1, batch_size=25, val_images=val_x, val_y=val_y)
    out = sgd_probe(torch.nn.Identity(), train_x, train_y, test_x, test_y, **kw)
    assert out == {"top1": 0.75, "val_top1": 1.0, "best_epoch": 4.0, "top1@best_val": 1.0}
    assert len(scorings) == 2  # the final head and the best-val head, nothing else
    flipped = sgd_probe(torch.nn.Identity(), train_x, train_y, test_x, 1 - test_y, **kw)
    assert flipped == {"top1": 0.25, "val_top1": 1.0, "best_epoch": 4.0, "top1@best_val": 0.0}


def test_sgd_probe_augments_training_images_only():
    """``augment`` applies to the training images alone; validation and test images reach the encoder
    through ``normalize`` only. A recording identity encoder sees the raw val and test batches, and
    every other batch it sees carries the augmentation's +1000. Catches val or test images augmented,
    and an encoder that came in eval mode left in train mode."""
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x

    train_x, train_y = points((10, 0.0, 0), (10, 2.0, 1))
    val_x, val_y = points((1, 1.9, 1), (1, 1.4, 0))
    test_x, test_y = points((3, 1.9, 1), (1, 1.4, 0))
    encoder = Recording().eval()
    sgd_probe(encoder, train_x, train_y, test_x, test_y, normalize=lambda batch: batch,
              augment=lambda batch: batch + 1000.0, epochs=2, batch_size=10, val_images=val_x, val_y=val_y)
    assert not encoder.training  # left in the mode it came in (eval here; train in the test below)
    raw = [batch for batch in seen if batch.max() < 1000]
    assert len(raw) == 2 and torch.equal(raw[0], test_x) and torch.equal(raw[1], val_x)
    assert len(seen) == 2 + 2 * 2 and all(batch.min() >= 1000 for batch in seen if batch.max() >= 1000)


@pytest.mark.parametrize("augment", [True, False])
def test_wrappers_hand_the_probes_the_runs_seed_and_the_augmentation(augment, monkeypatch):
    """The L-BFGS wrapper carves its validation split with the run's seed (here 3, no val split),
    and the SGD wrapper augments the training images with ``ctx.probe_augment`` exactly when
    ``augment`` is set, in the preset asked for, with ``encoder_dropout`` passed on. Catches the seed left at its
    default 0, the flag inverted, the preset or the dropout setting dropped."""
    ctx = BlobContext(seed=3, with_val=False)
    probes = record_calls(monkeypatch, linear, "lbfgs_probe")
    lbfgs_protocol(ctx, "backbone", l2_grid=[1e-2], max_iter=50)
    assert probes[0].kwargs["seed"] == 3
    sgds = record_calls(monkeypatch, linear, "sgd_probe")
    sgd_protocol(ctx, "backbone", epochs=1, lr=0.5, momentum=0.9, weight_decay=0.0, batch_size=64,
                 augment=augment, augment_preset="training", optimizer="sgd", encoder_dropout=True)
    given = sgds[0].kwargs
    assert given["encoder_dropout"] is True and given["seed"] == 3
    if augment:
        assert given["augment"].func == ctx.probe_augment and given["augment"].keywords == {"preset": "training"}
    else:
        assert given["augment"] is None


@pytest.mark.parametrize("change,message", [
    (dict(train_x=np.zeros(10)), "train_x must be 2-D, got shape (10,)"),
    (dict(train_y=np.zeros(9)), "train_x and train_y have different lengths: 10 != 9"),
    (dict(train_y=np.ones(10)), "train_y has a single class (1.0)"),
    (dict(test_x=np.zeros((0, 3))), "test_x is empty"),
    (dict(test_x=np.full((4, 3), np.nan)), "test_x contains 12 NaN or inf values"),
    (dict(test_x=np.zeros((4, 2))), "train_x and test_x have different feature dims: 3 != 2"),
    (dict(val_x=np.zeros((4, 3))), "give both val_x and val_y, or neither"),
    (dict(l2_grid=(1.0, 0.0)), "every l2 in l2_grid must be positive, got 0.0"),
    (dict(l2_grid=()), "l2_grid is empty"),
    (dict(val_fraction=1.5), "val_fraction must be in (0, 1), got 1.5"),
])
def test_bad_input_raises(change, message):
    rng = np.random.default_rng(0)
    args = dict(train_x=rng.normal(size=(10, 3)), train_y=np.arange(10) % 2,
                test_x=rng.normal(size=(4, 3)), test_y=np.arange(4) % 2) | change
    with pytest.raises(ValueError, match=re.escape(message)):
        lbfgs_probe(args.pop("train_x"), args.pop("train_y"), args.pop("test_x"), args.pop("test_y"), **args)


def test_sgd_probe_freezes_encoder_and_reports_best_val_epoch():
    ctx = BlobContext()
    encoder = ctx.encoder().train()  # the probe must switch BatchNorm to eval and back
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    y = ctx.labels()
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    out = sgd_probe(encoder, ctx.images(train), y[train], ctx.images(test), y[test],
                    normalize=ctx.normalize, augment=ctx.probe_augment, epochs=5, lr=0.5,
                    batch_size=32, val_images=ctx.images(val), val_y=y[val])
    assert encoder.training
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert out["top1"] == 1.0 and out["top1@best_val"] == 1.0 and out["val_top1"] == 1.0
    assert set(out) == {"top1", "top5", "val_top1", "best_epoch", "top1@best_val", "top5@best_val"}
    assert 1 <= out["best_epoch"] <= 5


def test_sgd_wrapper_is_seeded():
    ctx = BlobContext()
    params = dict(epochs=5, lr=0.5, momentum=0.9, weight_decay=0.0, batch_size=32, augment=True,
                  augment_preset="probe", optimizer="sgd", encoder_dropout=False)
    first = sgd_protocol(ctx, "backbone", **params)
    assert first == sgd_protocol(ctx, "backbone", **params)
    assert first["top1"] > 0.9
    presets, augment = [], ctx.probe_augment
    ctx.probe_augment = lambda images, preset="probe": presets.append(preset) or augment(images, preset)
    assert sgd_protocol(ctx, "backbone", **(params | {"augment_preset": "training"}))["top1"] > 0.9
    assert presets and set(presets) == {"training"}  # the run's own augmentation, every batch
    adamw = sgd_protocol(ctx, "backbone", **(params | {"optimizer": "adamw", "lr": 5e-2}))  # Thanos' head
    assert adamw["top1"] > 0.9 and adamw != first
    assert set(sgd_protocol(BlobContext(with_val=False), "backbone", **params)) == {"top1", "top5"}


def test_sgd_bad_input_raises():
    ctx = BlobContext()
    images, y = ctx.images(np.arange(10)), ctx.labels()[:10]
    with pytest.raises(ValueError, match="train_images and train_y have different lengths: 10 != 9"):
        sgd_probe(ctx.encoder(), images, y[:9], images, y, normalize=ctx.normalize)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        sgd_probe(ctx.encoder(), images, y, images, y, normalize=ctx.normalize, epochs=0)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb' \\(valid: sgd, adamw\\)"):
        sgd_probe(ctx.encoder(), images, y, images, y, normalize=ctx.normalize, optimizer="lamb")


def test_sgd_probe_keeps_encoder_dropout_on_for_the_head_only_when_asked():
    """``encoder_dropout``: the training batches go through the encoder with its dropout in train mode and
    BatchNorm in eval mode (running statistics unchanged); validation and test features are computed in eval
    mode; the encoder's mode is restored afterwards. Without it every pass is in eval mode.
    Catches: dropout left off (Thanos' head trains on dropped-out features), BatchNorm statistics updated
    by the probe, test features computed with dropout."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop, self.bn = torch.nn.Linear(2, 8), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(8)
            self.modes: list[tuple[int, bool, bool]] = []

        def forward(self, x):
            self.modes.append((len(x), self.drop.training, self.bn.training))
            return self.bn(self.drop(self.lin(x)))

    rng = np.random.default_rng(0)
    train_x, test_x, val_x = (torch.as_tensor(rng.normal(size=(n, 2)), dtype=torch.float32) for n in (40, 12, 8))
    train_y, test_y, val_y = (np.arange(n) % 2 for n in (40, 12, 8))
    for dropout in (True, False):
        encoder = Encoder().train()
        before = {k: v.clone() for k, v in encoder.bn.state_dict().items()}
        sgd_probe(encoder, train_x, train_y, test_x, test_y, normalize=lambda b: b, epochs=2, batch_size=20,
                  val_images=val_x, val_y=val_y, encoder_dropout=dropout)
        assert encoder.training and encoder.bn.training  # restored
        assert all(torch.equal(before[k], v) for k, v in encoder.bn.state_dict().items())
        by_size = {(n, drop, bn) for n, drop, bn in encoder.modes}
        if dropout:  # 2 epochs x 2 batches of 20 with dropout; test (12) and val (8) once each without
            assert by_size == {(20, True, False), (12, False, False), (8, False, False)}
            assert len(encoder.modes) == 6
        else:  # features cached: train (two batches of 20), test and val once each
            assert by_size == {(20, False, False), (12, False, False), (8, False, False)}
            assert len(encoder.modes) == 4


@pytest.fixture
def probe_heads(monkeypatch) -> list[torch.nn.Linear]:
    """Every ``nn.Linear`` built while the test runs, in order: the probe's head is the last one."""
    heads, build = [], torch.nn.Linear.__init__

    def recording(self, *args, **kwargs):
        build(self, *args, **kwargs)
        heads.append(self)

    monkeypatch.setattr(torch.nn.Linear, "__init__", recording)
    return heads


def _trained_head(heads: list, global_seed: int = 0, **kw) -> torch.Tensor:
    """The head ``sgd_probe`` trains on BlobContext after ``torch.manual_seed(global_seed)``."""
    ctx = BlobContext()
    y, train, val, test = ctx.labels(), ctx.split("train"), ctx.split("val"), ctx.split("test")
    torch.manual_seed(global_seed)
    sgd_probe(ctx.encoder(), ctx.images(train), y[train], ctx.images(test), y[test], normalize=ctx.normalize,
              augment=ctx.probe_augment, epochs=1, batch_size=32, val_images=ctx.images(val), val_y=y[val],
              **{"lr": 0.05, **kw})
    return heads[-1].weight.detach().clone()


def test_sgd_probe_is_seeded_by_its_seed_not_the_global_generator(probe_heads):
    """Two calls with ``seed=0`` after different global torch seeds train the same head (its init and the
    augmentation draw from the probe's own seeded stream); another seed trains another.
    Catches the probe drawing from whatever state the global generator is in."""
    assert torch.equal(_trained_head(probe_heads, 1, seed=0), _trained_head(probe_heads, 2, seed=0))
    assert not torch.equal(_trained_head(probe_heads, 1, seed=0), _trained_head(probe_heads, 1, seed=1))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sgd_probe_applies_its_weight_decay_with_either_optimizer(probe_heads, optimizer):
    """The head trained with weight decay 0.5 is smaller than the one trained with 0 (AdamW's torch default,
    0.01, would ignore the setting). Catches the decay not reaching the optimiser."""
    free = _trained_head(probe_heads, optimizer=optimizer, weight_decay=0.0)
    decayed = _trained_head(probe_heads, optimizer=optimizer, weight_decay=0.5)
    assert decayed.norm() < free.norm()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sgd_probe_anneals_its_learning_rate_by_a_cosine_over_all_steps(optimizer, monkeypatch):
    """Step s of S = epochs x ceil(n / batch) trains at lr (1 + cos(pi s / S)) / 2: from the full rate down to
    nearly 0 at the last step. Catches a schedule over another length (half a cosine, one epoch) or none."""
    rates = []
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    step = cls.step

    def recording(self, *args, **kwargs):  # the rate each optimiser step trains at
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", recording)
    ctx = BlobContext()
    y, train, test = ctx.labels(), ctx.split("train"), ctx.split("test")
    epochs, batch, lr = 2, 32, 0.05
    sgd_probe(ctx.encoder(), ctx.images(train), y[train], ctx.images(test), y[test], normalize=ctx.normalize,
              augment=None, epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer)
    steps = epochs * -(-len(train) // batch)
    assert len(rates) == steps
    assert rates == pytest.approx([lr * (1 + math.cos(math.pi * s / steps)) / 2 for s in range(steps)], rel=1e-12)
