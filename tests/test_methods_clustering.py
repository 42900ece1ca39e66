"""Deep clustering without class priors (issue #5): CC, CD and SeLa.

Each loss is checked against a plain computation of its equation on small tensors; a short
digits run checks that CC's cluster head and CD's backbone cluster digits better than
k-means on the random encoder's features, seed for seed.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from methods import METHODS, DataInfo, resolve_config
from methods.base import TRAINING_DEFAULTS, Batch
from methods.cc import ContrastiveClustering, cluster_loss
from methods.cd import ContrastiveDisentangling, feature_loss
from methods.sela import SeLa
from tests.conftest import metric


class Tiny(nn.Module):
    """A linear 'backbone' on flattened inputs."""

    def __init__(self, in_dim: int = 6, out_dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def columns_nt_xent(p1: torch.Tensor, p2: torch.Tensor, tau: float) -> float:
    """Mean over the 2K columns of -log( e^{s(i,i')/tau} / sum_{j != i} e^{s(i,j)/tau} ), s cosine."""
    cols = list(p1.T) + list(p2.T)
    k = p1.shape[1]
    total = 0.0
    for i, a in enumerate(cols):
        partner = cols[(i + k) % (2 * k)]
        denom = sum(math.exp(cosine(a, b) / tau) for j, b in enumerate(cols) if j != i)
        total += -math.log(math.exp(cosine(a, partner) / tau) / denom)
    return total / (2 * k)


def test_cc_cluster_loss_matches_equation():
    torch.manual_seed(0)
    p1, p2 = torch.softmax(torch.randn(9, 4), 1), torch.softmax(torch.randn(9, 4), 1)
    balance = 0.0
    for p in (p1, p2):
        q = p.sum(0) / p.sum()
        balance += math.log(4) + sum(float(v) * math.log(float(v)) for v in q)
    expected = columns_nt_xent(p1, p2, 1.0) + balance
    assert abs(float(cluster_loss(p1, p2, 1.0)) - expected) < 1e-5
    # hard, perfectly balanced assignments pay no balance term
    balanced = torch.eye(4).repeat(2, 1)
    assert abs(float(cluster_loss(balanced, balanced, 1.0)) - columns_nt_xent(balanced, balanced, 1.0)) < 1e-5


def test_cd_feature_loss_matches_equation():
    torch.manual_seed(1)
    f1, f2 = torch.sigmoid(torch.randn(7, 5) * 2), torch.sigmoid(torch.randn(7, 5) * 2)
    bits = []
    for f in (f1, f2):
        h = [-(v * math.log(v) + (1 - v) * math.log(1 - v)) / math.log(2) for v in f.flatten().tolist()]
        bits.append(sum(h) / len(h))
    expected = columns_nt_xent(f1, f2, 1.0) - (bits[0] + bits[1]) / 2
    assert abs(float(feature_loss(f1, f2, 1.0)) - expected) < 1e-5


def test_cc_total_loss_and_cluster_head():
    torch.manual_seed(2)
    cfg = resolve_config(ContrastiveClustering, "cpu", {"num_clusters": 3, "instance_dim": 4})
    cc = ContrastiveClustering(Tiny(), cfg, DataInfo(20, (1, 2, 3)))
    v1, v2 = torch.randn(6, 1, 2, 3), torch.randn(6, 1, 2, 3)
    loss, logs = cc.training_step(Batch([v1, v2], torch.arange(6)))
    with torch.no_grad():
        h1, h2 = cc.backbone(v1), cc.backbone(v2)
        z1, z2 = cc.instance_head(h1), cc.instance_head(h2)
        instance = columns_nt_xent(z1.T, z2.T, 0.5)  # rows of z are the 2B instances
        cluster = float(cluster_loss(cc.cluster_head(h1), cc.cluster_head(h2), 1.0))
    assert abs(loss.item() - instance - cluster) < 1e-5
    assert abs(logs["instance_loss"] - instance) < 1e-5
    scores = cc.cluster_heads(v1)["cluster"]
    assert scores.shape == (6, 3) and torch.allclose(scores.sum(1), torch.ones(6))


def test_cd_has_no_class_count():
    """No number of classes or clusters anywhere: config keys, constructor, data info, modules."""
    assert ContrastiveDisentangling.label_level is None
    for scale in ("cpu", "paper"):
        keys = set(resolve_config(ContrastiveDisentangling, scale)) - set(TRAINING_DEFAULTS)
        assert keys == {"num_features", "instance_dim", "instance_temperature", "feature_temperature"}
    assert list(inspect.signature(ContrastiveDisentangling.__init__).parameters) == ["self", "backbone", "cfg", "info"]
    cfg = resolve_config(ContrastiveDisentangling, "cpu", {"num_features": 6, "instance_dim": 4})
    cd = ContrastiveDisentangling(Tiny(), cfg, DataInfo(20, (1, 2, 3)))  # num_classes=None
    out_dims = {m.out_features for m in cd.modules() if isinstance(m, nn.Linear)}
    assert out_dims == {8, 4, 6}  # backbone width, instance dim, feature heads
    assert cd.cluster_heads(torch.randn(3, 1, 2, 3)) == {}
    # the cluster-count methods take theirs from their own config, never from the data
    for cls in (ContrastiveClustering, SeLa):
        assert cls.label_level is None and "num_clusters" in resolve_config(cls, "cpu")


def test_cd_total_loss_and_representations():
    torch.manual_seed(3)
    cfg = resolve_config(ContrastiveDisentangling, "cpu", {"num_features": 6, "instance_dim": 4})
    cd = ContrastiveDisentangling(Tiny(), cfg, DataInfo(20, (1, 2, 3)))
    v1, v2 = torch.randn(10, 1, 2, 3), torch.randn(10, 1, 2, 3)
    loss, _ = cd.training_step(Batch([v1, v2], torch.arange(10)))
    with torch.no_grad():  # still in training mode: BatchNorm on the same batch statistics
        z1, z2 = cd.instance_head(cd.backbone(v1)), cd.instance_head(cd.backbone(v2))
        expected = columns_nt_xent(z1.T, z2.T, 0.5) + float(feature_loss(cd.feature_head(z1), cd.feature_head(z2), 1.0))
    assert abs(loss.item() - expected) < 1e-5
    # the paper's architecture: BN in the instance head, BN before the sigmoid of the F heads
    assert isinstance(cd.instance_head[1], nn.BatchNorm1d) and cd.instance_head[0].bias is None
    assert isinstance(cd.feature_head[0][-1], nn.BatchNorm1d) and isinstance(cd.feature_head[1], nn.Sigmoid)
    cd.eval()
    reps = cd.representations(v1)
    assert reps["backbone"].shape == (10, 8) and reps["head"].shape == (10, 6)
    assert ((reps["head"] > 0) & (reps["head"] < 1)).all()


class Loader:
    """The harness's plain loader: (images, index) batches of the training set in order."""

    def __init__(self, images: torch.Tensor, batch: int = 16) -> None:
        self.images, self.batch = images, batch

    def __iter__(self):
        for s in range(0, len(self.images), self.batch):
            yield self.images[s:s + self.batch], torch.arange(s, min(s + self.batch, len(self.images)))


def test_sela_loss_labels_and_schedule():
    torch.manual_seed(4)
    n, k = 60, 5
    cfg = resolve_config(SeLa, "cpu", {"num_clusters": k, "num_heads": 3, "label_every": 2, "cycle_heads": True})
    sela = SeLa(Tiny(), cfg, DataInfo(n, (1, 2, 3)))
    # random balanced initial labels, one row per head, each its own permutation of i % k (self-label's
    # cifar.py: np.random.permutation of the balanced labels per head), not one fixed pattern for every head
    assert sela.labels.shape == (3, n)
    assert all(torch.equal(torch.bincount(row, minlength=k), torch.full((k,), n // k)) for row in sela.labels)
    assert len({tuple(row.tolist()) for row in sela.labels} | {tuple((torch.arange(n) % k).tolist())}) == 4
    assert "labels" in sela.state_dict()  # checkpoints keep the pseudo-labels
    # loss: mean over heads of the mean cross-entropy against each head's labels
    x, index = torch.randn(8, 1, 2, 3), torch.tensor([0, 5, 9, 13, 22, 40, 41, 59])
    expected = 0.0
    with torch.no_grad():
        h = sela.backbone(x)
        for i, head in enumerate(sela.heads):
            logits = head(h)
            expected += sum(-float(torch.log_softmax(logits[j], 0)[sela.labels[i, index[j]]]) for j in range(8)) / 8
    assert abs(sela.training_step(Batch([x], index)).item() - expected / 3) < 1e-5
    # label optimisation: every 2nd epoch, one head in turn (epoch 2 -> head 1), balanced labels
    images = torch.randn(n, 1, 2, 3)
    before = sela.labels.clone()
    sela.on_epoch_start(1, Loader(images))
    assert torch.equal(sela.labels, before)
    sela.on_epoch_start(2, Loader(images))
    assert torch.equal(sela.labels[[0, 2]], before[[0, 2]]) and not torch.equal(sela.labels[1], before[1])
    counts = torch.bincount(sela.labels[1], minlength=k)
    assert counts.min() >= 0.8 * n / k and counts.max() <= 1.2 * n / k
    assert sela.training  # back in training mode
    assert sela.cluster_heads(x)["cluster"].shape == (8, k)


def test_registered():
    assert {"cc", "cd", "sela"} <= set(METHODS.names())


def test_digits_clustering_beats_random_encoder(run_suite, one_torch_thread):
    """CC's cluster-head ACC and CD's backbone k-means ACC beat k-means on the random encoder's
    features, seed for seed, after a short CPU budget; SeLa's 30-cluster head beats it in NMI."""
    seeds = (0, 1)
    records = run_suite(["random", "cc", "cd", "sela"], seeds=seeds, budget="epochs=10", protocols={"clustering": {}})
    assert all(r["status"] == "ok" for r in records)
    random_acc = metric(records, "random", "clustering/acc")
    cc_acc = metric(records, "cc", "clustering/acc", rep="cluster")
    cd_acc = metric(records, "cd", "clustering/acc")
    for seed, r, cc, cd in zip(seeds, random_acc, cc_acc, cd_acc):
        assert cc > r + 0.05 and cd > r + 0.05, (seed, r, cc, cd)
    random_nmi = metric(records, "random", "clustering/nmi")
    sela_nmi = metric(records, "sela", "clustering/nmi", rep="cluster")
    assert all(s > r for s, r in zip(sela_nmi, random_nmi)), (random_nmi, sela_nmi)
    assert all("clustering/acc_majority" in r["metrics"]["cluster"] for r in records if r["spec"]["method"] == "sela")


def torch_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Differentiable NT-Xent written out per anchor: rows of a and b are the 2n items, a[i] ~ b[i]."""
    items = torch.cat([a, b])
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        sims = torch.stack([torch.cosine_similarity(items[i], items[j], 0) / tau for j in range(2 * n) if j != i])
        partner = (i + n) % (2 * n)
        total = total - (torch.cosine_similarity(items[i], items[partner], 0) / tau - torch.logsumexp(sims, 0))
    return total / (2 * n)


def torch_marginal_gap(p: torch.Tensor) -> torch.Tensor:
    q = p.sum(0) / p.sum()
    return math.log(p.shape[1]) + (q * q.log()).sum()


def assert_same_gradients(method: nn.Module, loss: torch.Tensor, expected: torch.Tensor) -> None:
    params = [p for p in method.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    for (name, _), g, w in zip([(n, p) for n, p in method.named_parameters() if p.requires_grad], got, want):
        assert w is not None and torch.allclose(g, w, rtol=1e-4, atol=1e-6), name


def test_cc_gradients_are_the_equations_at_non_default_temperatures():
    """The backbone learns from both heads, and each loss uses its own temperature: the gradient of
    every parameter equals that of NT-Xent(z, T_i) + cluster NT-Xent(p, T_c) + gaps written out, with
    T_c = 0.5 (not the default 1). Catches a head fed a detached backbone output (the value is the same)
    and a cluster temperature fixed at 1; the logged parts are the two terms, each under its own name."""
    torch.manual_seed(6)
    cfg = resolve_config(ContrastiveClustering, "cpu", {"num_clusters": 3, "instance_dim": 4,
                                                         "instance_temperature": 0.3, "cluster_temperature": 0.5})
    cc = ContrastiveClustering(Tiny(), cfg, DataInfo(20, (1, 2, 3)))
    v1, v2 = torch.randn(6, 1, 2, 3), torch.randn(6, 1, 2, 3)
    loss, logs = cc.training_step(Batch([v1, v2], torch.arange(6)))
    h1, h2 = cc.backbone(v1), cc.backbone(v2)
    p1, p2 = cc.cluster_head(h1), cc.cluster_head(h2)
    instance = torch_nt_xent(cc.instance_head(h1), cc.instance_head(h2), 0.3)
    cluster = torch_nt_xent(p1.T, p2.T, 0.5) + torch_marginal_gap(p1) + torch_marginal_gap(p2)
    assert abs(loss.item() - (instance + cluster).item()) < 1e-5
    assert abs(float(logs["instance_loss"]) - instance.item()) < 1e-5
    assert abs(float(logs["cluster_loss"]) - cluster.item()) < 1e-5
    assert_same_gradients(cc, loss, instance + cluster)


def test_cd_gradients_are_the_equations():
    """CD's backbone and instance head learn from both the instance and the feature loss, each at its
    own temperature: every parameter's gradient equals that of NT-Xent(z, 0.3) + feature NT-Xent(f, 0.7)
    - mean bits written out (not the defaults 0.5 and 1). Catches the instance head's output detached
    before the feature heads, one view's z detached in the instance loss (the loss value is the same),
    or either temperature fixed at its default."""
    torch.manual_seed(7)
    cfg = resolve_config(ContrastiveDisentangling, "cpu", {"num_features": 6, "instance_dim": 4,
                                                            "instance_temperature": 0.3, "feature_temperature": 0.7})
    cd = ContrastiveDisentangling(Tiny(), cfg, DataInfo(20, (1, 2, 3)))
    v1, v2 = torch.randn(10, 1, 2, 3), torch.randn(10, 1, 2, 3)
    loss, logs = cd.training_step(Batch([v1, v2], torch.arange(10)))
    z1, z2 = cd.instance_head(cd.backbone(v1)), cd.instance_head(cd.backbone(v2))  # train mode, same batches
    f1, f2 = cd.feature_head(z1), cd.feature_head(z2)
    bits = sum(-(f * f.log() + (1 - f) * (1 - f).log()).mean() / math.log(2) for f in (f1, f2)) / 2
    instance, feature = torch_nt_xent(z1, z2, 0.3), torch_nt_xent(f1.T, f2.T, 0.7) - bits
    assert abs(loss.item() - (instance + feature).item()) < 1e-5
    assert abs(float(logs["instance_loss"]) - instance.item()) < 1e-5
    assert abs(float(logs["feature_loss"]) - feature.item()) < 1e-5
    assert_same_gradients(cd, loss, instance + feature)
