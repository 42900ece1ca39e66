import importlib.util

import numpy as np
import pytest

import protocols
from protocol_context import BlobContext, record_calls
from protocols import transfer
from protocols.transfer import coarse_to_fine, coarse_to_fine_protocol


def coarse_only_features(n, seed, num_coarse=3, fine_per_coarse=2, dim=8):
    """Features that separate the coarse classes perfectly and say nothing about fine ones."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, num_coarse * fine_per_coarse, n)
    coarse = fine // fine_per_coarse
    means = np.random.default_rng(0).normal(size=(num_coarse, dim)) * 6
    return (means[coarse] + rng.normal(size=(n, dim))).astype(np.float32), fine, coarse


def test_coarse_features_score_coarse_labels_not_fine_ones():
    (x, fine, coarse), (xt, fine_t, coarse_t) = coarse_only_features(600, 1), coarse_only_features(600, 2)
    out = coarse_to_fine(x, fine, coarse, xt, fine_t, coarse_t, k=20, l2_grid=(1e-3, 1e-1))
    assert out["coarse_lbfgs_top1"] == 1.0 and out["coarse_knn_top1"] == 1.0
    # two fine classes per coarse blob, indistinguishable: fine accuracy is a coin flip
    assert 0.35 < out["fine_lbfgs_top1"] < 0.65 and 0.35 < out["fine_knn_top1"] < 0.65
    assert out["fine_lbfgs_top5"] == 1.0  # the top 5 of 6 classes always holds both candidates
    assert set(out) == {"fine_lbfgs_top1", "fine_lbfgs_top5", "fine_lbfgs_l2", "fine_knn_top1",
                        "fine_knn_top5", "coarse_lbfgs_top1", "coarse_lbfgs_l2", "coarse_knn_top1"}


@pytest.mark.parametrize("with_val", [True, False])
def test_coarse_to_fine_wrapper_fits_on_train_votes_with_train_and_val_and_scores_test(with_val, monkeypatch):
    """At each label level the probe fits train, chooses on val (carves one from train without
    a val split) and scores test; the kNN's memory bank is train+val and its queries are test.

    Test labels are redrawn at random, and on separable blobs both classifiers predict each
    test sample's blob (fine) or its pair of blobs (coarse): every top-1 is the share of test
    labels that still match (known answers: fine 0.083, coarse 0.233). Breakage tried (a
    patched wrapper and coarse_to_fine): kNN voting with train alone, with the test samples in
    its bank, the probe fitted on train+val, val not handed over; each fails this test (the old
    check, 1.0 on separable blobs, passed them all).
    """
    ctx = BlobContext(with_val=with_val, relabel=("test",))
    probes = record_calls(monkeypatch, transfer, "lbfgs_probe")
    votes = record_calls(monkeypatch, transfer, "knn_accuracy")
    out = coarse_to_fine_protocol(ctx, "backbone", k=20, temperature=0.1, l2_grid=[1e-2], max_iter=200)
    x = ctx.features("backbone")
    train, val, test, bank = (ctx.split(name) for name in ("train", "val", "test", "train_full"))
    assert len(probes) == len(votes) == 2
    for level, truth, probe, vote in zip(("fine", "coarse"), (ctx.blob, ctx.blob // 2), probes, votes):
        y = ctx.labels(level)
        for given, expected in zip(probe.args, (x[train], y[train], x[test], y[test])):
            assert np.array_equal(given, expected), level
        if with_val:
            assert np.array_equal(probe.kwargs["val_x"], x[val]) and np.array_equal(probe.kwargs["val_y"], y[val])
        else:
            assert probe.kwargs["val_x"] is None and probe.kwargs["val_y"] is None
        for given, expected in zip(vote.args, (x[bank], y[bank], x[test], y[test])):
            assert np.array_equal(given, expected), level
        known = np.mean(truth[test] == y[test])
        assert out[f"{level}_lbfgs_top1"] == out[f"{level}_knn_top1"] == known < 0.5, level


def test_settings_reach_the_probe_and_the_knn(monkeypatch):
    """Every setting is handed on, none left at its default: the wrapper passes the run's seed (3),
    k, temperature, L2 grid and max_iter to :func:`coarse_to_fine`, which passes seed, val_fraction,
    L2 grid and max_iter to the probe and k and temperature to the kNN at both label levels."""
    ctx = BlobContext(seed=3, with_val=False)
    outer = record_calls(monkeypatch, transfer, "coarse_to_fine")
    probes = record_calls(monkeypatch, transfer, "lbfgs_probe")
    votes = record_calls(monkeypatch, transfer, "knn_accuracy")
    coarse_to_fine_protocol(ctx, "backbone", k=7, temperature=0.5, l2_grid=[1e-2, 1e-1], max_iter=30)
    assert {key: outer[0].kwargs[key] for key in ("k", "temperature", "l2_grid", "seed", "max_iter")} == \
        {"k": 7, "temperature": 0.5, "l2_grid": (1e-2, 1e-1), "seed": 3, "max_iter": 30}
    (x, fine, coarse), (xt, fine_t, coarse_t) = coarse_only_features(120, 1), coarse_only_features(60, 2)
    probes.clear(), votes.clear()
    coarse_to_fine(x, fine, coarse, xt, fine_t, coarse_t, k=9, temperature=0.3, l2_grid=(1e-2,),
                   val_fraction=0.3, seed=4, max_iter=40)
    assert len(probes) == len(votes) == 2
    for probe, vote in zip(probes, votes):
        assert {key: probe.kwargs[key] for key in ("l2_grid", "val_fraction", "seed", "max_iter")} == \
            {"l2_grid": (1e-2,), "val_fraction": 0.3, "seed": 4, "max_iter": 40}
        assert vote.kwargs["k"] == 9 and vote.kwargs["temperature"] == 0.3


def test_bad_input_raises():
    (x, fine, coarse), (xt, fine_t, coarse_t) = coarse_only_features(60, 1), coarse_only_features(60, 2)
    with pytest.raises(ValueError, match="train_x and train_y have different lengths: 60 != 59"):
        coarse_to_fine(x, fine, coarse[:59], xt, fine_t, coarse_t, k=5, l2_grid=(1e-2,))
    with pytest.raises(ValueError, match="k=100 is larger than the training set"):
        coarse_to_fine(x, fine, coarse, xt, fine_t, coarse_t, k=100, l2_grid=(1e-2,))


def test_registry_lists_every_protocol_with_inputs_and_description():
    specs = {name: protocols.PROTOCOLS.get(name) for name in protocols.PROTOCOLS}
    assert {"knn", "clustering", "lbfgs", "sgd", "coarse_to_fine"} <= set(specs)
    assert specs["clustering"].inputs == {"features", "assignments"}
    assert specs["sgd"].inputs == {"encoder"} and specs["knn"].inputs == {"features"}
    knn_headline = {key: specs["knn"].defaults[key] for key in ("k", "temperature", "backend")}
    assert knn_headline == {"k": 200, "temperature": 0.1, "backend": "auto"}
    assert all(spec.description for spec in specs.values())


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="bench protocols times FAISS")
def test_protocol_benchmarks_quick_has_every_row():
    from harness.bench.protocols import protocol_benchmarks

    table = protocol_benchmarks(quick=True)
    assert table["benchmark"].tolist() == [
        "knn torch", "knn faiss", "knn torch", "knn faiss", "knn torch", "knn faiss",
        "lbfgs_probe (one l2)", "lbfgs_probe (7-value sweep)", "hungarian_accuracy",
        "cluster_metrics", "kmeans faiss", "kmeans torch"]
    assert (table["seconds"] > 0).all()
