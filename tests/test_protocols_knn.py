import importlib.util
import re

import numpy as np
import pytest

import protocols  # noqa: F401  (registers the wrappers)
from protocol_context import BlobContext
from protocols.knn import knn_accuracy, knn_grid_accuracy, knn_protocol, val_knn_protocol, weighted_knn_predict

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]


def numpy_weighted_knn(train_x, train_y, test_x, k, temperature):
    """NPID's rule written out directly: cosine top-k, each votes exp(s / T) for its class."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
    classes = np.unique(train_y)
    predictions = []
    for row in sims:
        nearest = np.argsort(-row)[:k]
        votes = [np.exp(row[nearest][train_y[nearest] == c] / temperature).sum() for c in classes]
        predictions.append(classes[np.argmax(votes)])
    return np.array(predictions)


def random_problem(seed=0, n_train=600, n_test=150, dim=16, num_classes=7):
    rng = np.random.default_rng(seed)
    train_x = rng.normal(size=(n_train, dim)).astype(np.float32)
    test_x = rng.normal(size=(n_test, dim)).astype(np.float32)
    train_y = rng.integers(0, num_classes, n_train) * 10 - 30  # non-contiguous, negative ids
    return train_x, train_y, test_x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,temperature", [(1, 0.1), (20, 0.07), (200, 0.1), (50, 1.0)])
def test_equals_direct_numpy_formula(backend, k, temperature):
    train_x, train_y, test_x = random_problem()
    expected = numpy_weighted_knn(train_x, train_y, test_x, k, temperature)
    got = weighted_knn_predict(train_x, train_y, test_x, k=k, temperature=temperature,
                               backend=backend, chunk_size=64)
    assert np.array_equal(got, expected)


@needs_faiss
def test_backends_agree_on_larger_input():
    train_x, train_y, test_x = random_problem(seed=1, n_train=5000, n_test=1000, dim=64, num_classes=20)
    torch_pred = weighted_knn_predict(train_x, train_y, test_x, backend="torch")
    faiss_pred = weighted_knn_predict(train_x, train_y, test_x, backend="faiss", chunk_size=333)
    assert (torch_pred == faiss_pred).mean() >= 0.999  # ties aside


def test_temperature_weighs_close_neighbours():
    # one very close neighbour of class "a" against two orthogonal ones of class "b"
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    train_y = np.array(["a", "b", "b"])
    test_x = np.array([[1.0, 0.0]])
    # T=0.1: exp(10) for "a" beats 2 * exp(0) for "b"; T=10: exp(0.1) = 1.1 loses to 2
    assert weighted_knn_predict(train_x, train_y, test_x, k=3, temperature=0.1).tolist() == ["a"]
    assert weighted_knn_predict(train_x, train_y, test_x, k=3, temperature=10.0).tolist() == ["b"]


def test_tiny_temperature_does_not_overflow_and_is_nearest_neighbour():
    train_x, train_y, test_x = random_problem(seed=2)
    got = weighted_knn_predict(train_x, train_y, test_x, k=50, temperature=1e-4)
    assert np.array_equal(got, numpy_weighted_knn(train_x, train_y, test_x, k=1, temperature=1.0))


def test_accuracy_fractions_and_top5():
    train_x, train_y, test_x = random_problem(seed=3, num_classes=10)
    truth = numpy_weighted_knn(train_x, train_y, test_x, 20, 0.1)
    acc = knn_accuracy(train_x, train_y, test_x, truth, k=20)
    assert acc == {"top1": 1.0, "top5": 1.0}
    wrong = np.full(len(test_x), 12345)  # a class no training sample has
    assert knn_accuracy(train_x, train_y, test_x, wrong, k=20) == {"top1": 0.0, "top5": 0.0}
    few = knn_accuracy(train_x, train_y % 4, test_x, truth % 4, k=20)
    assert set(few) == {"top1"}  # top-5 is only reported with at least 5 classes


def test_top5_is_reported_from_exactly_five_classes():
    """Five classes are enough for top-5 (every class is in it: 1.0); four are not. Catches an
    off-by-one in how many classes are ranked (``len(classes) - 1`` ranks 4 of 5 and drops top-5)."""
    train_x, train_y, test_x = random_problem(seed=3, num_classes=5)
    truth = numpy_weighted_knn(train_x, train_y, test_x, 20, 0.1)
    assert knn_accuracy(train_x, train_y, test_x, truth, k=20) == {"top1": 1.0, "top5": 1.0}
    assert set(knn_accuracy(train_x, train_y % 4, test_x, truth % 4, k=20)) == {"top1"}


def test_top5_fraction_equals_numpy_vote_sums():
    """Top-1 and top-5 strictly between 0 and 1 against NPID's summed votes in NumPy: a test
    sample is a top-5 hit when its label has one of the five largest vote sums. k = 200 of 600
    samples gives every query votes for at least 5 of its 10 classes, so no tie among classes
    without votes decides a rank. Breakage tried (the vote weights set to 1, a plain count of
    neighbours): top-1 0.127 -> 0.107, top-5 0.480 -> 0.567, and the test fails."""
    train_x, train_y, test_x = random_problem(seed=4, num_classes=10)
    test_y = np.random.default_rng(5).integers(0, 10, len(test_x)) * 10 - 30
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
    nearest = np.argsort(-sims, axis=1)[:, :200]
    classes = np.unique(train_y)
    votes = np.stack([[np.exp(row[idx][train_y[idx] == c] / 0.1).sum() for c in classes]
                      for row, idx in zip(sims, nearest)])
    assert ((votes > 0).sum(axis=1) >= 5).all()
    ranked = classes[np.argsort(-votes, axis=1)]
    expected = {"top1": np.mean(ranked[:, 0] == test_y), "top5": np.mean((ranked[:, :5] == test_y[:, None]).any(1))}
    assert 0 < expected["top1"] < expected["top5"] < 1
    got = knn_accuracy(train_x, train_y, test_x, test_y, k=200, temperature=0.1, backend="torch")
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("change,message", [
    (dict(k=601), "k=601 is larger than the training set (600 samples)"),
    (dict(k=0), "k must be a positive integer, got 0"),
    (dict(temperature=0.0), "temperature must be positive, got 0.0"),
    (dict(train_y=np.zeros(600)), "train_y has a single class (0.0)"),
    (dict(train_y=np.zeros(599)), "train_x and train_y have different lengths: 600 != 599"),
    (dict(test_x=np.zeros((5, 3))), "train_x and test_x have different feature dims: 16 != 3"),
    (dict(test_x=np.zeros(16)), "test_x must be 2-D, got shape (16,)"),
    (dict(test_x=np.zeros((0, 16))), "test_x is empty"),
    (dict(test_x=np.full((2, 16), np.inf)), "test_x contains 32 NaN or inf values"),
    (dict(backend="annoy"), "backend must be one of auto, faiss, torch; got 'annoy'"),
    (dict(test_y=np.zeros(3)), "test_x and test_y have different lengths: 150 != 3"),
])
def test_bad_input_raises(change, message):
    train_x, train_y, test_x = random_problem()
    args = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=np.zeros(150)) | change
    with pytest.raises(ValueError, match=re.escape(message)):
        knn_accuracy(**args)


def nearest_neighbour_top1(memory_x, memory_y, query_x, query_y) -> float:
    """Top-1 of the cosine 1-nearest neighbour, written out in NumPy: what kNN with k=1 must score."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argmax(unit(query_x.astype(np.float64)) @ unit(memory_x.astype(np.float64)).T, axis=1)
    return float(np.mean(memory_y[nearest] == query_y))


def test_knn_wrapper_votes_with_train_and_val_for_test_samples_only():
    """The wrapper's memory bank is train+val and its queries are the test samples, nothing else.

    Validation and test labels are redrawn at random, so the wirings score differently:
    1-NN (NumPy) with train+val voting for test scores 0.183 here, train alone 0.150, a bank
    holding the test samples 1.0 (each finds itself), val queried instead of test 1.0. Breakage
    tried (a patched wrapper, see the report of issue 18): bank ``all``, bank ``train``, queries
    ``val``; each fails this test (the old check, 1.0 on separable blobs, passed all three).
    """
    ctx = BlobContext(relabel=("val", "test"))
    x, y = ctx.features("backbone"), ctx.labels()
    train, val, test = ctx.split("train"), ctx.split("val"), ctx.split("test")
    right = nearest_neighbour_top1(x[np.r_[train, val]], y[np.r_[train, val]], x[test], y[test])
    wrong = [nearest_neighbour_top1(x[bank], y[bank], x[queries], y[queries])
             for bank, queries in ((train, test), (ctx.split("all"), test), (np.r_[train, val], val))]
    assert right not in wrong  # every wiring error changes the score on this data
    assert knn_protocol(ctx, "backbone", k=1, temperature=0.1, backend="torch")["top1"] == right
    # at the usual k, the wrapper gives what the pure function gives on the right splits
    by_hand = knn_accuracy(x[np.r_[train, val]], y[np.r_[train, val]], x[test], y[test], k=20, backend="torch")
    assert knn_protocol(ctx, "backbone", k=20, temperature=0.1, backend="torch") == by_hand


class NoTestSplitContext:
    """An EvalContext of random features and labels whose test split must not be read (model selection)."""

    device = "cpu"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((60, 3)).astype(np.float32)
        self.y = rng.integers(0, 3, 60)

    def features(self, rep):
        return self.x

    def labels(self, level="fine"):
        return self.y

    def split(self, name):
        if name == "test":
            raise AssertionError("val_knn read the test split")
        return {"train": np.arange(0, 60, 2), "val": np.arange(1, 60, 4), "all": np.arange(60)}[name]


def test_val_knn_scores_val_against_train_never_test():
    """Train votes for val (and the test split is never asked for). On random features and
    labels, 1-NN from train scores val 0.533; val voting for itself, or a bank of every sample,
    scores 1.0 (each finds itself). Breakage tried (a patched copy of the protocol): bank val,
    bank all; both fail (the old check, 1.0 on separable blobs, passed both)."""
    ctx = NoTestSplitContext()
    x, y = ctx.x, ctx.y
    train, val = ctx.split("train"), ctx.split("val")
    right = nearest_neighbour_top1(x[train], y[train], x[val], y[val])
    assert right not in [nearest_neighbour_top1(x[bank], y[bank], x[val], y[val]) for bank in (val, ctx.split("all"))]
    assert val_knn_protocol(ctx, "backbone", k=1, temperature=0.1, backend="torch")["top1"] == right


def test_val_knn_clamps_k_to_the_training_split():
    """The suite's k = 200 is more than the 30 training samples here: val_knn votes with all 30,
    exactly as k = 30 (NPID's rule in NumPy), instead of raising. Catches a missing clamp."""
    ctx = NoTestSplitContext()
    x, y = ctx.x, ctx.y
    train, val = ctx.split("train"), ctx.split("val")
    truth = numpy_weighted_knn(x[train], y[train], x[val], 30, 0.1)
    out = val_knn_protocol(ctx, "backbone", k=200, temperature=0.1, backend="torch")
    assert out["top1"] == pytest.approx(np.mean(truth == y[val]))



def test_knn_grid_equals_the_numpy_rule_at_every_point_the_numpy_rule_at_every_point():
    """One search at the largest k scores each (k, T) as NPID's rule written out in NumPy does at that point.
    Breakage tried: slicing the last k of the largest-k neighbours, or one temperature for the whole grid."""
    train_x, train_y, test_x = random_problem()
    test_y = np.random.default_rng(1).choice(np.unique(train_y), len(test_x))
    ks, temperatures = [1, 20, 200], [0.07, 0.5]
    grid = knn_grid_accuracy(train_x, train_y, test_x, test_y, ks, temperatures, backend="torch")
    assert set(grid) == {(k, t) for k in ks for t in temperatures}
    for (k, t), scores in grid.items():
        truth = numpy_weighted_knn(train_x, train_y, test_x, k, t)
        assert scores["top1"] == pytest.approx(np.mean(truth == test_y)), (k, t)
    assert len({scores["top1"] for scores in grid.values()}) >= 3  # k and T matter on this data


def test_knn_protocol_grid_keys_are_stable_and_k_is_clamped():
    """The wrapper stores ``grid/k<k>_t<T>/top1`` with T as written (``0.1``, not ``0.09999999999999998``) and k
    clamped to the memory set (180 train+val samples here: 200 -> 180), each point equal to NPID's rule in NumPy
    on train+val vs test, and keeps the headline at the suite's (k, T). Breakage tried: keys from ``repr`` of a
    computed float, no clamp (k=200 > 180 raises)."""
    ctx = BlobContext(relabel=("test",))
    x, y = ctx.features("backbone"), ctx.labels()
    bank, test = ctx.split("train_full"), ctx.split("test")
    temperatures = [0.07, 0.1 * 5, 0.3 - 0.2]  # 0.5 and 0.09999999999999998: computed floats
    out = knn_protocol(ctx, "backbone", k=20, temperature=0.1, backend="torch", grid_k=[10, 20, 100, 200],
                       grid_temperature=temperatures)
    names = ("0.07", "0.5", "0.1")
    assert set(out) == {"top1", "top5"} | {f"grid/k{k}_t{t}/{m}" for k in (10, 20, 100, 180) for t in names
                                           for m in ("top1", "top5")}
    for k in (10, 20, 100, 180):
        for t, name in zip(temperatures, names):
            truth = numpy_weighted_knn(x[bank], y[bank], x[test], k, t)
            assert out[f"grid/k{k}_t{name}/top1"] == pytest.approx(np.mean(truth == y[test])), (k, t)
    headline = numpy_weighted_knn(x[bank], y[bank], x[test], 20, 0.1)
    assert out["top1"] == pytest.approx(np.mean(headline == y[test]))


def test_knn_protocol_headline_is_scored_at_its_own_k_not_a_grid_point():
    """With a grid whose points all differ from the headline (k 20, T 0.1), ``top1``/``top5`` are
    still NPID's rule at (20, 0.1), the same as without a grid, on data where k changes the score
    (every label redrawn: top-1 0.133 at (20, 0.1) against 0.233 at k = 1 and 0.15-0.167 at the
    clamped k = 180). Catches a headline read from another grid point."""
    ctx = BlobContext(relabel=("train", "val", "test"))
    x, y = ctx.features("backbone"), ctx.labels()
    bank, test = ctx.split("train_full"), ctx.split("test")
    alone = knn_protocol(ctx, "backbone", k=20, temperature=0.1, backend="torch")
    out = knn_protocol(ctx, "backbone", k=20, temperature=0.1, backend="torch", grid_k=[1, 200],
                       grid_temperature=[0.07, 0.5])
    assert alone["top1"] not in {value for key, value in out.items() if key.startswith("grid/") and key.endswith("top1")}
    assert {key: out[key] for key in ("top1", "top5")} == alone
    truth = numpy_weighted_knn(x[bank], y[bank], x[test], 20, 0.1)
    assert alone["top1"] == pytest.approx(np.mean(truth == y[test]))
