import re
import numpy as np
import pytest
from sklearn import metrics

import protocols  # noqa: F401  (registers the wrappers)
from protocol_context import BlobContext
from protocols.clustering import (cluster_metrics, clustering_protocol, contingency_table,
                                  hungarian_accuracy, kmeans, majority_vote_accuracy)

# classes 0, 1, 2 against clusters 0, 1, 2:
#            c0 c1 c2
#   class 0:  1  2  0
#   class 1:  2  0  0
#   class 2:  0  1  3
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = np.array([0, 1, 1, 0, 0, 1, 2, 2, 2])


def test_hand_worked_table():
    assert contingency_table(Y_TRUE, Y_PRED).tolist() == [[1, 2, 0], [2, 0, 0], [0, 1, 3]]
    # best matching: class0-c1 (2) + class1-c0 (2) + class2-c2 (3) = 7 of 9
    assert hungarian_accuracy(Y_TRUE, Y_PRED) == pytest.approx(7 / 9)
    # majority per cluster: c0 -> 2, c1 -> 2, c2 -> 3
    assert majority_vote_accuracy(Y_TRUE, Y_PRED) == pytest.approx(7 / 9)


def test_more_clusters_than_classes_counts_unmatched_clusters_wrong():
    y_true, y_pred = [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert majority_vote_accuracy(y_true, y_pred) == 1.0
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6) and m["acc_majority"] == 1.0


def test_fewer_clusters_than_classes():
    y_true, y_pred = [0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(5 / 7)
    assert cluster_metrics(y_true, y_pred)["acc_majority"] == pytest.approx(5 / 7)


def test_invariant_to_renaming_clusters():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, 500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 9, 500))
    renamed = (rng.permutation(9) * 13 + 5)[y_pred]  # permuted, non-contiguous, never 0
    assert cluster_metrics(y_true, renamed) == cluster_metrics(y_true, y_pred)


def test_empty_clusters_and_labels_not_starting_at_zero():
    # cluster 0 never used, ids 3 and 4 empty too: a perfect clustering must score 1
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([5, 5, 1, 1, 2, 2])
    assert cluster_metrics(y_true, y_pred) == pytest.approx({"acc": 1, "nmi": 1, "ami": 1, "ari": 1})
    assert hungarian_accuracy(y_true + 10, y_pred) == 1.0


def test_string_labels():
    y_true = ["cat", "cat", "dog", "dog", "emu"]
    y_pred = ["b", "b", "a", "c", "c"]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(4 / 5)
    assert cluster_metrics(y_true, y_pred)["ari"] == pytest.approx(
        metrics.adjusted_rand_score(y_true, y_pred))


def test_single_cluster_scores_zero_information():
    y_true = [0, 0, 0, 1, 2]
    m = cluster_metrics(y_true, [4, 4, 4, 4, 4])
    assert m == {"acc": 0.6, "nmi": 0.0, "ami": 0.0, "ari": 0.0, "acc_majority": 0.6}


@pytest.mark.parametrize("n,classes,clusters", [(50, 2, 2), (300, 5, 12), (2000, 20, 7), (5000, 30, 30)])
def test_nmi_ami_ari_equal_sklearn(n, classes, clusters):
    rng = np.random.default_rng(n)
    y_true = rng.choice(classes, n, p=rng.dirichlet(np.ones(classes)))
    noise = rng.choice(clusters, n, p=rng.dirichlet(np.ones(clusters)))
    y_pred = np.where(rng.random(n) < 0.5, y_true % clusters, noise)
    m = cluster_metrics(y_true, y_pred)
    assert m["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
    assert m["ami"] == pytest.approx(metrics.adjusted_mutual_info_score(y_true, y_pred), abs=1e-10)
    assert m["ari"] == pytest.approx(metrics.adjusted_rand_score(y_true, y_pred), abs=1e-12)
    assert ("acc_majority" in m) == (classes != clusters)


def test_nmi_is_arithmetic_mean_normalised():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]
    expected = metrics.normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic")
    assert cluster_metrics(y_true, y_pred)["nmi"] == pytest.approx(expected)
    assert expected != pytest.approx(
        metrics.normalized_mutual_info_score(y_true, y_pred, average_method="geometric"))


@pytest.mark.parametrize("y_true,y_pred,message", [
    ([0, 1, 1], [0, 1], "different lengths: 3 != 2"),
    ([], [], "y_true is empty"),
    ([[0, 1], [1, 0]], [0, 1], "y_true must be 1-D"),
    ([3, 3, 3], [0, 1, 2], "single class (3)"),
])
def test_bad_labels_raise(y_true, y_pred, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cluster_metrics(y_true, y_pred)


def _blobs(n_per=20, k=5, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    return (rng.normal(size=(k, dim))[y] * 6 + rng.normal(size=(len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_blobs_and_is_seeded(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x, y = _blobs()
    labels = kmeans(x, 5, seed=0, n_init=10, niter=10, backend=backend)
    assert cluster_metrics(y, labels)["acc"] == 1.0
    assert np.array_equal(labels, kmeans(x, 5, seed=0, n_init=10, niter=10, backend=backend))


def test_kmeans_bad_input_raises():
    x, _ = _blobs(n_per=2, k=3)
    with pytest.raises(ValueError, match="k=7 is larger than the number of samples"):
        kmeans(x, 7, seed=0)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="features contains 1 NaN or inf values"):
        kmeans(x, 2, seed=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        kmeans(x[1:], 2, seed=0, backend="sklearn")


def test_clustering_wrapper_on_features_assignments_and_coarse():
    ctx = BlobContext()
    m = clustering_protocol(ctx, "backbone", split="all", k=None, coarse=True, n_init=10, niter=25)
    assert [m[key] for key in ("acc", "nmi", "ami", "ari")] == pytest.approx([1, 1, 1, 1])
    # 6 clusters vs 3 coarse classes: each pair of clusters maps onto its coarse class
    assert m["coarse_acc_majority"] == 1.0 and m["coarse_acc"] == pytest.approx(0.5)
    head = clustering_protocol(ctx, "cluster_head", split="test", k=None, coarse=False, n_init=1, niter=25)
    assert head == pytest.approx({"acc": 1, "nmi": 1, "ami": 1, "ari": 1})
    sweep = clustering_protocol(ctx, "backbone", split="all", k=[3, 6], coarse=False, n_init=10, niter=25)
    assert sweep["acc@k6"] == 1.0 and sweep["acc_majority@k3"] == pytest.approx(0.5)
    assert set(sweep) == {f"{key}@k{k}" for k in (3, 6) for key in ("acc", "nmi", "ami", "ari")} | {"acc_majority@k3"}
