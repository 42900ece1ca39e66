"""Paper-scale recipes of CD and the Thanos family pinned to their official code (docs/fidelity.md).

- CD (Hoper-J/Contrastive-Disentangling config/config.yaml): ``use_scheduler: false``, constant lr.
- Thanos family (HazyResearch/thanos-code): torch's ``CosineAnnealingLR(T_max=100)`` stepped per
  epoch for 600 epochs; the loss's similarity divides by the norm product of the column's sample;
  the positive clamp applies only when ``clip_pos == 1.0``.

The official loss is recomputed here in NumPy, loop by loop as ``unagi/tasks/loss_fns/contrastive_loss.py``
computes it (``lc_norm`` True, two views, anchors view 1, candidates view 0).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import torch_lrs
from harness.errors import UsageError
from harness.execution.runner import plan
from harness.execution.suite import load_suite
from harness.engine.train import lr_factor
from methods import METHODS, resolve_config
from methods.losses import thanos_similarity
from tests.test_methods_transfer import LABELS, adapter, direct_ce, direct_supcon

THANOS_FAMILY = ("supcon", "supcon_spread", "cond_autoencoder")


def torch_cosine_annealing_lrs(base_lr: float, t_max: int, epochs: int) -> list[float]:
    """lr in force during epochs 0..epochs of torch's CosineAnnealingLR stepped once per epoch."""
    return torch_lrs(lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max), epochs,
                     base_lr)


def paper_configs() -> dict[str, dict]:
    """Paper-scale configs of the Thanos family's adapters and of every trained method of the transfer suites."""
    configs = {name: resolve_config(METHODS.get(name), "paper") for name in THANOS_FAMILY}
    for suite_name in ("transfer-cifar10", "transfer-cifar100"):
        for job in plan(load_suite(suite_name)):
            if METHODS.get(job.spec["method"]).trains:
                assert job.budget.unit == "epochs" and job.budget.limit == 600
                configs[f"{suite_name}/{job.spec['label']}"] = job.spec["config"]
    return configs


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name,cfg", sorted(paper_configs().items()))
def test_thanos_family_paper_schedule_is_torch_cosine_annealing_t_max_100_of_600(name, cfg):
    """At chosen epochs of the 600, the recipe's lr equals the official run's CosineAnnealingLR(T_max=100)
    stepped per epoch, read where each epoch starts (``lr_update: epoch_start``): minimum at 100, back to the
    top at 200, top again at the end. Catches the former 6 restarts (epoch 199: near 0 instead of near the
    top), a cosine over the whole budget, the lr set per step, and a suite recipe (supervised, simclr) left on
    another schedule."""
    reference = torch_cosine_annealing_lrs(3e-4, t_max=100, epochs=600)
    assert cfg["lr"] == 3e-4 and cfg["optimizer"] == "adamw" and cfg["weight_decay"] == 0.01 and cfg["warmup"] == 0
    assert cfg["lr_update"] == "epoch_start"
    for epoch in (0, 50, 100, 150, 199, 200, 300, 420, 599, 600):
        assert cfg["lr"] * lr_factor(epoch / 600, cfg) == pytest.approx(reference[epoch], rel=1e-9, abs=1e-15), epoch


def test_cd_paper_lr_is_constant_as_its_official_config():
    """config/config.yaml has ``use_scheduler: false``: Adam at 3e-4 from the first epoch to the last,
    in the adapter's defaults and in every paper-scale suite that trains CD. Catches the former
    cosine default (half the lr at mid-budget)."""
    configs = [resolve_config(METHODS.get("cd"), "paper")]
    for suite_name in ("clustering-cifar10", "clustering-cifar100-20", "clustering-stl10", "clustering-imagenet10",
                       "cd-k-sweep"):
        configs += [job.spec["config"] for job in plan(load_suite(suite_name)) if job.spec["method"] == "cd"]
    assert len(configs) >= 6
    for cfg in configs:
        assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["batch_size"]) == ("adam", 3e-4, 0.0, 128)
        assert [lr_factor(p, cfg) for p in (0.0, 0.5, 0.999)] == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- the official similarity and loss
def official_numpy_loss(anchors: np.ndarray, candidates: np.ndarray, labels: np.ndarray, temp: float,
                        clip_pos: float, a_lc: float, a_spread: float) -> float:
    """HazyResearch/thanos-code ContrastiveLoss.forward for two views, lc_norm True, pos_in_denom False,
    pos_in_denom_weight 1, written out with NumPy loops (vi = anchors = view 1, vj = candidates = view 0)."""
    def logsumexp(x):
        return float(np.log(np.sum(np.exp(x - x.max()))) + x.max())

    num = anchors @ candidates.T / temp / (np.linalg.norm(anchors, axis=1) * np.linalg.norm(candidates, axis=1))
    per_anchor = []
    for i, cls in enumerate(labels):
        positives, negatives = np.where(labels == cls)[0], np.where(labels != cls)[0]
        denominator = sum(logsumexp(num[i, np.concatenate([[p], negatives])]) for p in positives)
        kept = np.minimum(num[i, positives], clip_pos) if clip_pos == 1.0 else num[i, positives]
        log_prob = -kept.sum() + denominator
        if a_spread > 0:
            spread = -num[i, i] + logsumexp(num[i, positives])
            per_anchor.append((a_lc * log_prob / len(positives) + a_spread * spread) / (a_lc + a_spread))
        else:
            per_anchor.append(a_lc * log_prob / len(positives))
    return float(np.mean(per_anchor))


def non_unit_views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated float64 views of 8 samples with norms from 0.3 to 4 (the official encoder does not normalise)."""
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    v1 = v0 + 0.3 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    scales = torch.linspace(0.3, 4.0, 8, dtype=torch.float64)
    return v0 * scales[:, None], v1 * scales.flip(0)[:, None]


def test_official_similarity_divides_by_the_norms_of_the_columns_sample():
    """Entry (i, j) = <a_i, c_j> / (|a_j| |c_j|), computed directly; it differs from the cosine on
    non-unit rows and equals it on unit rows. Catches the true cosine (|a_i| |c_j|) and the
    row-broadcast reading (|a_i| |c_i|)."""
    v0, v1 = non_unit_views()
    a, c = v1.numpy(), v0.numpy()
    direct = np.array([[a[i] @ c[j] / (np.linalg.norm(a[j]) * np.linalg.norm(c[j])) for j in range(8)] for i in range(8)])
    np.testing.assert_allclose(thanos_similarity(v1, v0, "official").numpy(), direct, rtol=1e-12)
    assert not np.allclose(thanos_similarity(v1, v0, "cosine").numpy(), direct, rtol=1e-3)
    unit_a, unit_c = (torch.nn.functional.normalize(v, dim=1) for v in (v1, v0))
    np.testing.assert_allclose(thanos_similarity(unit_a, unit_c, "official").numpy(),
                               thanos_similarity(unit_a, unit_c, "cosine").numpy(), rtol=1e-12)


def adapter_on(name: str, views: tuple[torch.Tensor, torch.Tensor], **overrides):
    """The adapter (identity encoder on 1x2x2 images) with ``overrides``, its loss and logs on ``views``."""
    from methods.base import Batch

    method = adapter(name, **overrides)
    batch = Batch([v.view(-1, 1, 2, 2) for v in views], torch.arange(8), LABELS)
    loss, logs = method.training_step(batch)
    ce = direct_ce(method.classifier(torch.cat([v.flatten(1) for v in batch.views])), LABELS.repeat(2))
    return (loss - ce).item(), logs


@pytest.mark.parametrize("name,a_spread", [("supcon", 0.0), ("supcon_spread", 1.0)])
def test_official_similarity_loss_equals_the_official_code_in_numpy(name, a_spread):
    """With similarity official and clip_pos 1.0 (the paper-scale defaults), the adapters' contrastive
    term equals the official ContrastiveLoss recomputed in NumPy on non-unit embeddings where some
    positive logits exceed the clamp and others do not. Catches the cosine, a clamp that is not
    applied, and spread and SupCon weighted other than the official mean."""
    v0, v1 = non_unit_views(seed=1)
    a, c, labels = v1.numpy(), v0.numpy(), LABELS.numpy()
    num = a @ c.T / 0.5 / (np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1))
    same = labels[:, None] == labels[None, :]
    assert (num[same] > 1).any() and (num[same] < 1).any(), "the clamp must matter on this data"
    got, _ = adapter_on(name, (v0, v1), similarity="official", clip_pos=1.0)
    assert got == pytest.approx(official_numpy_loss(a, c, labels, 0.5, 1.0, 1.0, a_spread), rel=1e-10)
    cosine, _ = adapter_on(name, (v0, v1), similarity="cosine", clip_pos=1.0)
    assert abs(cosine - got) > 1e-2


def test_clip_pos_other_than_one_means_no_clamp_with_the_official_similarity():
    """The official code ignores clip_pos unless it is exactly 1.0 (config cifar10_supcon_cep_coarselabels_clip_pos
    sets 0.95 and so trains without a clamp): with the official similarity, 0.95 gives the official
    loss at 0.95, which is the unclamped loss; with the cosine (the paper's equation) 0.95 clamps.
    Catches a clamp at 0.95 in official mode, and a clamp dropped in cosine mode."""
    v0, v1 = non_unit_views(seed=2)
    a, c, labels = v1.numpy(), v0.numpy(), LABELS.numpy()
    official, _ = adapter_on("supcon", (v0, v1), similarity="official", clip_pos=0.95)
    assert official == pytest.approx(official_numpy_loss(a, c, labels, 0.5, 0.95, 1.0, 0.0), rel=1e-10)
    clamped_at_one = official_numpy_loss(a, c, labels, 0.5, 1.0, 1.0, 0.0)
    assert abs(official - clamped_at_one) > 1e-3  # positive logits above the clamp: clamping would show
    _, logs = adapter_on("supcon", (v0, v1), similarity="cosine", clip_pos=0.95)
    assert logs["supcon"] == pytest.approx(direct_supcon(v1, v0, LABELS, 0.5, 0.95).item(), rel=1e-10)
    _, unclamped = adapter_on("supcon", (v0, v1), similarity="cosine", clip_pos=1e9)
    assert abs(logs["supcon"] - unclamped["supcon"]) > 1e-3


def test_similarity_choice_is_validated_and_official_at_paper_scale_only():
    with pytest.raises(UsageError, match=r"'similarity' of method 'supcon_spread' is 'dot' \(valid: cosine, official\)"):
        adapter("supcon_spread", similarity="dot")
    for name in ("supcon", "supcon_spread"):
        assert resolve_config(METHODS.get(name), "paper")["similarity"] == "official"
        assert resolve_config(METHODS.get(name), "cpu")["similarity"] == "cosine"


@pytest.mark.parametrize("suite_name", ["transfer-cifar10", "transfer-cifar100"])
def test_transfer_head_trains_as_thanos_code_does(suite_name):
    """The fine-label head of every row: AdamW lr 1e-3 with torch's default weight decay 0.01, 100 epochs,
    batch 128, on the training augmentation (crop 0.2-1 of ``config/dataflow/transforms/cifar10.yaml``,
    the same for every row, Thanos included) with the frozen encoder's dropout on.
    Catches: weight decay 0 (the protocol's default), the probe's crop-and-flip, an eval-mode encoder."""
    specs = [job.spec for job in plan(load_suite(suite_name))]
    for spec in specs:
        assert spec["protocols"]["sgd"] == {"epochs": 100, "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.01,
                                            "batch_size": 128, "augment": True, "augment_preset": "training",
                                            "optimizer": "adamw", "encoder_dropout": True}, spec["label"]
        assert (spec["config"]["augment"], spec["config"]["augment_overrides"]) == ("simclr", {"crop_scale": [0.2, 1.0]})
    assert {spec["label"] for spec in specs} >= {"thanos", "supcon", "supcon_spread", "cond_autoencoder"}
