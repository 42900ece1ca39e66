"""Paper recipes of NPID, MoCo, NPID+CLD, MoCo+CLD and SeLa against their official code (issue 14).

Each test pins one behaviour of the official implementation with a small hand-checked case and
names, in its docstring, the breakage it catches.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods.sela
from harness.data.augment import Augmenter, get_preset
from harness.errors import UsageError
from harness.execution.runner import make_spec
from harness.execution.suite import load_suite
from harness.engine.train import PlainLoader
from methods import DataInfo, resolve_config
from methods.cld import MoCoCLD, NPIDCLD
from methods.heads import NormLinear, make_head, mlp
from methods.memory import Queue
from methods.moco import MoCo
from methods.npid import NPID
from methods.sela import SeLa
from protocols.knn import knn_accuracy
from tests.test_sinkhorn import official_loop

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class Tiny(nn.Module):
    """Flatten, Linear, optionally BatchNorm: a backbone whose train/eval difference is visible."""

    def __init__(self, in_dim: int, out_dim: int = 5, bn: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim), *([nn.BatchNorm1d(out_dim)] if bn else []))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- augmentation
def unchanged_fraction(cfg, images: torch.Tensor) -> float:
    """Fraction of images an Augmenter with ``cfg`` returns exactly as normalised (to 1e-4)."""
    augmenter = Augmenter(cfg, MEAN, STD)
    out = augmenter(images, torch.Generator().manual_seed(0))
    plain = augmenter.normalize(images)
    return ((out - plain).abs().amax(dim=(1, 2, 3)) < 1e-4).float().mean().item()


def test_cld_preset_jitters_every_image():
    """CLD's, lemniscate's and SeLa's transform_train apply ColorJitter(0.4, 0.4, 0.4, 0.4) to every
    image. With crop, flip and grayscale switched off, no image may come back unchanged.
    Catches: the preset's old jitter probability 0.8 (about 20% of images left alone, checked below)."""
    images = torch.randint(60, 200, (400, 3, 6, 6), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    colour_only = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, grayscale=0.0)
    cld = replace(get_preset("cld"), **colour_only)
    assert cld.jitter == (0.4, 0.4, 0.4, 0.4) and cld.crop_scale == (1.0, 1.0)
    assert unchanged_fraction(cld, images) == 0.0
    assert 0.15 < unchanged_fraction(replace(cld, jitter_p=0.8), images) < 0.25  # the measure sees skipped jitter


# ----------------------------------------------------------------------------- heads
def test_normlinear_rows_have_unit_norm_at_init():
    """CLD's NormedLinear renormalises each output's weight vector to unit norm at init
    (models/resnet_cifar.py: uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)).
    Catches: the old init uniform(-1, 1) / sqrt(in) (row norms about 0.58)."""
    torch.manual_seed(0)
    head = NormLinear(512, 128)
    norms = head.weight.norm(dim=1)
    assert head.weight.shape == (128, 512)
    assert torch.allclose(norms, torch.ones(128), atol=1e-6)
    # still uniform directions: entries of both signs, no constant rows
    assert (head.weight > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    x = torch.randn(3, 512)
    assert torch.allclose(head(x), F.normalize(x, dim=1) @ head.weight.t(), atol=1e-6)


def test_heads_by_name_and_the_mlp_equation():
    """``make_head``: ``linear`` is a plain nn.Linear (NPID), ``normlinear`` the cosine classifier,
    ``mlp`` MoCo v2's Linear-ReLU-Linear without BatchNorm; ``mlp`` computes W2 relu(W1 x + b1) + b2,
    and with ``bn``/``out_bn`` the linear layer before each BatchNorm has no bias. Catches a lost
    ReLU (the head collapses to one linear map), a NormLinear for ``linear`` and BN in MoCo's head."""
    torch.manual_seed(0)
    linear, cosine, two = (make_head(kind, 6, 3, hidden=5) for kind in ("linear", "normlinear", "mlp"))
    assert type(linear) is torch.nn.Linear and isinstance(cosine, NormLinear)
    assert [type(m) for m in two] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    x = torch.randn(4, 6)
    first, last = two[0], two[2]
    assert torch.allclose(two(x.clone()), F.relu(x @ first.weight.t() + first.bias) @ last.weight.t() + last.bias)
    bn = mlp(6, 5, 3, bn=True, out_bn=True)
    assert [type(m) for m in bn] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear,
                                     torch.nn.BatchNorm1d]
    assert bn[0].bias is None and bn[3].bias is None


# ----------------------------------------------------------------------------- MoCo + CLD
def test_queue_initialisations():
    """MoCo's builder.py starts the queue with unit-norm Gaussian keys; CLD's MemoryMoCo with entries
    uniform in +-1/sqrt(d/3), not normalised (norms spread around 1). moco_cld's paper recipe
    uses CLD's. Catches: a normalised uniform queue, or moco_cld at paper scale with MoCo's init."""
    torch.manual_seed(0)
    normal = Queue(2000, 128, "normal").keys
    assert torch.allclose(normal.norm(dim=1), torch.ones(2000), atol=1e-5)
    uniform = Queue(2000, 128, "uniform").keys
    bound = 1 / math.sqrt(128 / 3)
    assert uniform.abs().max() <= bound and uniform.abs().max() > 0.99 * bound
    assert uniform.mean().abs() < 0.01 * bound
    norms = uniform.norm(dim=1)  # E[|k|^2] = d * bound^2 / 3 = 1
    assert norms.mean().item() == pytest.approx(1.0, abs=0.01) and norms.std().item() > 0.02
    assert resolve_config(MoCoCLD, "paper")["queue_init"] == "uniform"
    assert resolve_config(MoCo, "paper")["queue_init"] == "normal"
    with pytest.raises(UsageError, match="queue_init"):
        Queue(4, 3, "zeros")


def test_moco_cld_paper_keys_see_whole_batch_batchnorm():
    """CLD's CIFAR script runs on one GPU: its DistributedShufle is a plain permutation, so the key
    encoder's BatchNorm sees the whole batch. At paper scale moco_cld's keys must equal the key
    encoder applied to the whole batch in train mode, with batch statistics computed by hand.
    Catches: the old default of 8 BN groups (each group normalised with its own statistics)."""
    torch.manual_seed(0)
    cfg = resolve_config(MoCoCLD, "paper", {"feat_dim": 4, "queue_size": 16, "clusters": 3})
    method = MoCoCLD(Tiny(6, 5), cfg, DataInfo(32, (1, 2, 3)))
    x = torch.randn(16, 1, 2, 3)
    keys = F.normalize(method.key_encoder(x, cfg["bn_splits"]), dim=1)
    linear, head = method.key_encoder.net[0].net[1], method.key_encoder.net[1]
    h = linear(x.flatten(1))
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    expected = F.normalize(F.normalize(h, dim=1) @ F.normalize(head.weight, dim=1).t(), dim=1)
    assert torch.allclose(keys, expected, atol=1e-5)


# ----------------------------------------------------------------------------- NPID bank update
class OfficialLinearAverage(torch.autograd.Function):
    """CLD's and lemniscate's LinearAverageOp (lib/LinearAverage.py), written out: forward x M^T / T;
    backward returns grad M / T with the bank as it is at that moment, then updates the bank rows."""

    @staticmethod
    def forward(ctx, x, index, memory, temperature, momentum):
        ctx.save_for_backward(x, index)
        ctx.memory, ctx.temperature, ctx.momentum = memory, temperature, momentum
        return x.detach() @ memory.t() / temperature

    @staticmethod
    def backward(ctx, grad):
        x, index = ctx.saved_tensors
        memory = ctx.memory
        grad_x = grad @ memory / ctx.temperature
        mixed = memory[index] * ctx.momentum + x.detach() * (1 - ctx.momentum)
        memory[index] = mixed / mixed.norm(dim=1, keepdim=True)
        return grad_x, None, None, None, None


def npid_two_views(bank_update: str):
    """Feature gradients of both views and the bank after one NPID step on two views."""
    torch.manual_seed(0)
    cfg = resolve_config(NPIDCLD, "paper", {"feat_dim": 4, "bank_update": bank_update})
    method = NPID(Tiny(6, 5, bn=False), {**cfg}, DataInfo(12, (1, 2, 3)))
    bank = method.bank.memory.clone()
    f1, f2 = (F.normalize(torch.randn(5, 4), dim=1).requires_grad_() for _ in range(2))
    index = torch.tensor([3, 0, 7, 11, 5])
    loss = sum(method.instance_losses([f1, f2], index)) / 2
    loss.backward()
    method.after_optimizer_step()
    return bank, (f1, f2), index, method.bank.memory, method.cfg


def test_npid_bank_updated_in_backward_as_the_official_op():
    """The official op updates the bank inside backward; autograd runs the second view's op first,
    so the first view's gradient reads the batch rows already updated by the second view, and the
    bank takes view 2's features, then view 1's. ``bank_update: in_backward`` (CLD's paper default)
    must give the same gradients and bank as the op run by autograd itself.
    Catches: gradients read from the forward-time bank, or updates in view order (``after_step``,
    checked below to differ)."""
    bank, (f1, f2), index, memory, cfg = npid_two_views("in_backward")
    assert cfg["bank_update"] == "in_backward" and cfg["nce_k"] == 0
    reference = bank.clone()
    g1, g2 = (f.detach().clone().requires_grad_() for f in (f1, f2))
    losses = [F.cross_entropy(OfficialLinearAverage.apply(g, index, reference, cfg["temperature"], 0.5), index)
              for g in (g1, g2)]
    (sum(losses) / 2).backward()
    assert torch.allclose(f1.grad, g1.grad, atol=1e-6) and torch.allclose(f2.grad, g2.grad, atol=1e-6)
    assert torch.allclose(memory, reference, atol=1e-6)
    _, (a1, a2), _, after_step_memory, _ = npid_two_views("after_step")
    assert not torch.allclose(a1.grad, g1.grad, atol=1e-4) and torch.allclose(a2.grad, g2.grad, atol=1e-6)
    assert not torch.allclose(after_step_memory, reference, atol=1e-4)


# ----------------------------------------------------------------------------- SeLa
def sela_with_loader(label_pass: str, **overrides):
    torch.manual_seed(3)
    n, k = 48, 4
    cfg = resolve_config(SeLa, "paper", {"num_clusters": k, "num_heads": 2, "label_pass": label_pass, **overrides})
    method = SeLa(Tiny(3 * 6 * 6), cfg, DataInfo(n, (3, 6, 6)))
    images = torch.randint(0, 256, (n, 3, 6, 6), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    return method, PlainLoader(images, Augmenter(None, MEAN, STD), batch_size=16)


def captured_backbone_calls(method: SeLa, loader, epoch: int):
    """Run the labelling at ``epoch`` and record each backbone call's input, output and mode."""
    calls = []
    hook = method.backbone.register_forward_hook(lambda m, inp, out: calls.append((inp[0], out, m.training)))
    method.on_epoch_start(epoch, loader)
    hook.remove()
    return calls


def test_sela_labels_equal_sinkhorn_on_the_head_logits_plain_pass():
    """``label_pass: plain``: eval mode on the unaugmented images. The relabelled head's labels must
    equal SeLa's own Sinkhorn-Knopp loop (cifar.py optimize_L_sk, written out in test_sinkhorn) on that
    head's logits of the whole training set, and the other head keeps its labels (issue 18.5).
    Catches: labels from the wrong head, the wrong features, or an unbalanced argmax."""
    method, loader = sela_with_loader("plain")
    before = method.labels.clone()
    with torch.no_grad():
        method.eval()
        logits = method.heads[1](method.backbone(loader.augmenter.normalize(loader.images)))
        method.train()
    calls = captured_backbone_calls(method, loader, epoch=1)  # cycle_heads: epoch 1 -> head 1
    assert calls and not any(training for _, _, training in calls)
    expected, _, _ = official_loop(logits, method.cfg["lam"], method.cfg["sk_tol"])
    assert torch.equal(method.labels[1], expected) and not torch.equal(before[1], expected)
    assert torch.equal(method.labels[0], before[0])
    assert method.training


def test_sela_official_pass_trains_mode_on_augmented_images(monkeypatch):
    """``label_pass: official`` (paper default), as self-label's cifar.py opt_sk: the features come
    from the network in train mode (BatchNorm uses and updates batch statistics) on augmented
    images in batches of a shuffled order (its trainloader shuffles), and the labels are SeLa's
    Sinkhorn loop on the head's logits of exactly those features, put back in index order.
    Catches: the eval-mode plain pass at paper scale, batches in index order, features not put back
    in index order, or labels computed from other features."""
    method, loader = sela_with_loader("official")
    assert method.cfg["label_pass"] == "official" and resolve_config(SeLa, "cpu")["label_pass"] == "plain"
    running_mean = method.backbone.net[2].running_mean.clone()
    returned, augmented = [], []

    class RecordingAugmenter(Augmenter):
        def __call__(self, images, *args, **kwargs):
            augmented.append(images.clone())
            return super().__call__(images, *args, **kwargs)

    monkeypatch.setattr(methods.sela, "Augmenter", RecordingAugmenter)
    label_features = method.label_features
    monkeypatch.setattr(method, "label_features", lambda *a: returned.append(label_features(*a)) or returned[-1])
    calls = captured_backbone_calls(method, loader, epoch=0)
    assert all(training for _, _, training in calls) and [len(x) for x, _, _ in calls] == [16, 16, 16]
    inputs, outputs = torch.cat([x for x, _, _ in calls]), torch.cat([out for _, out, _ in calls])
    assert (inputs - loader.augmenter.normalize(loader.images)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert not torch.allclose(method.backbone.net[2].running_mean, running_mean)
    # which image each computed row is: the raw images the pass handed its augmenter, matched to the training set
    raw = torch.cat(augmented)
    source = (raw.flatten(1)[:, None] == loader.images.flatten(1)[None]).all(-1).int().argmax(1)
    assert torch.equal(loader.images[source], raw) and sorted(source.tolist()) == list(range(48))
    assert source.tolist() != list(range(48))
    features = returned[0]
    assert torch.equal(features[source], outputs)  # row i of the features is image i's
    with torch.no_grad():
        logits = method.heads[0](features)
    expected, _, _ = official_loop(logits, method.cfg["lam"], method.cfg["sk_tol"])
    assert torch.equal(method.labels[0], expected)
    with pytest.raises(UsageError, match="label_pass"):
        SeLa(Tiny(3), resolve_config(SeLa, "cpu", {"label_pass": "eval"}), DataInfo(4, (3, 1, 1)))



def test_sela_uses_its_lam_exposes_head_0_and_draws_fresh_augmentations_each_epoch():
    """The labels are Sinkhorn-Knopp at the configured ``lam`` (3 here, not the default 10); the exposed
    cluster head is head 0 (the first head, as the docstring says); the official pass draws its
    augmentation and order afresh every epoch (its generator is seeded by the run seed and the epoch).
    Catches a fixed lam, another head exposed, or the same augmented images in every labelling pass."""
    method, loader = sela_with_loader("plain", lam=3.0)
    x = loader.augmenter.normalize(loader.images)
    with torch.no_grad():
        method.eval()
        logits = method.heads[1](method.backbone(x))
        assert torch.equal(method.cluster_heads(x)["cluster"], method.heads[0](method.backbone(x)))
        method.train()
    method.on_epoch_start(1, loader)
    expected, _, _ = official_loop(logits, 3.0, method.cfg["sk_tol"])
    assert torch.equal(method.labels[1], expected)
    assert not torch.equal(official_loop(logits, 10.0, method.cfg["sk_tol"])[0], expected)  # lam matters here
    method, loader = sela_with_loader("official")
    first, second = ([x for x, _, _ in captured_backbone_calls(method, loader, epoch)] for epoch in (0, 1))
    assert not torch.equal(torch.cat(first), torch.cat(second))


def max_distance_to_nearest(rows: torch.Tensor, references: torch.Tensor) -> float:
    """Largest, over ``rows``, of the max-abs distance to the nearest of ``references`` (both (n, ...))."""
    return (rows.flatten(1)[:, None] - references.flatten(1)[None]).abs().amax(-1).amin(1).max().item()


def test_sela_official_pass_augments_with_the_runs_overrides_and_flip_permission():
    """The official pass redraws the run's own training augmentation: its preset *with* the run's
    ``augment_overrides``, and flips only where the run's augmenter allows them. Here the overrides
    switch off crop, jitter and grayscale and flip every image, on a dataset whose augmenter forbids
    flips: every image the pass encodes is then exactly a plain training image; where flips are allowed,
    every one is mirrored (no plain image within 1). Catches the preset taken without the overrides
    (cld's crops and jitter) or flips allowed whatever the dataset says."""
    overrides = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip": 1.0, "jitter_p": 0.0, "grayscale": 0.0}
    distances = {}
    for allow_flip in (False, True):
        method, loader = sela_with_loader("official", augment_overrides=overrides)
        loader = PlainLoader(loader.images, Augmenter(None, MEAN, STD, allow_flip=allow_flip), batch_size=16)
        inputs = torch.cat([x for x, _, _ in captured_backbone_calls(method, loader, epoch=0)])
        distances[allow_flip] = max_distance_to_nearest(inputs, loader.augmenter.plain(loader.images))
    assert distances[False] < 1e-5
    assert distances[True] > 1.0


def test_sela_official_pass_encodes_views_at_the_runs_image_size():
    """With a run ``image_size`` (the augmenter's ``out_size``, 4 here for 6x6 images) the official pass
    resamples its crops to that size, as the training views and the plain loader are. Catches the pass's
    augmenter built without the run's ``out_size`` (6x6 views that the encoder never trained on)."""
    torch.manual_seed(3)
    cfg = resolve_config(SeLa, "paper", {"num_clusters": 4, "num_heads": 2})
    method = SeLa(Tiny(3 * 4 * 4), cfg, DataInfo(48, (3, 4, 4)))
    images = torch.randint(0, 256, (48, 3, 6, 6), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    loader = PlainLoader(images, Augmenter(None, MEAN, STD, out_size=4), batch_size=16)
    assert {tuple(x.shape) for x, _, _ in captured_backbone_calls(method, loader, epoch=0)} == {(16, 3, 4, 4)}


def test_sela_sinkhorn_runs_at_the_configured_tolerance(monkeypatch):
    """The labels are Sinkhorn-Knopp at the configured ``sk_tol`` (0.1, ImageNet's; the default is 1e-2):
    the solver SeLa calls gets that tolerance and its labels become the head's. Catches ``sk_tol`` dropped
    (the solver's own default 1e-2 would run)."""
    method, loader = sela_with_loader("plain", sk_tol=0.1)
    solved, solver = [], methods.sela.sinkhorn_knopp

    def recording_solver(logits, lam, **options):
        solved.append((options, solver(logits, lam, **options)))
        return solved[-1][1]

    monkeypatch.setattr(methods.sela, "sinkhorn_knopp", recording_solver)
    method.on_epoch_start(1, loader)
    assert [kw for kw, _ in solved] == [{"tol": 0.1}]
    assert torch.equal(method.labels[1], solved[0][1].labels)


def test_sela_official_pass_augmentation_depends_on_the_run_seed():
    """The official pass's generator is seeded by the run seed and the epoch: the same seed draws the
    same augmented images again (a resumed run relabels as the uninterrupted one), another seed other
    images. Catches a generator seeded by the epoch alone (every seed of a suite sees the same draws)."""
    def pass_inputs(seed: int) -> torch.Tensor:
        method, loader = sela_with_loader("official")
        torch.manual_seed(seed)
        return torch.cat([x for x, _, _ in captured_backbone_calls(method, loader, epoch=2)])

    first = pass_inputs(10)
    assert torch.equal(pass_inputs(10), first)
    assert not torch.allclose(pass_inputs(11), first, atol=1e-3)


# ----------------------------------------------------------------------------- kNN top-5
def test_knn_top5_orders_classes_without_votes_by_class():
    """With fewer than 5 classes among the neighbours, the rest of the top 5 are the classes without
    votes in class order (a stable version of lemniscate's test.py probs.sort(1, True)). 100 classes,
    one unit vector each; both queries' 2 neighbours are classes 50 and 7, so the ranking is
    [50, 7, 0, 1, 2]: label 1 is a top-5 hit, label 3 a miss.
    Catches: torch.topk's unspecified order of equal votes (on CPU it picked classes 66-68)."""
    train_x = np.eye(100, dtype=np.float32)
    train_y = np.arange(100)
    query = np.zeros((2, 100), dtype=np.float32)
    query[:, 50], query[:, 7] = 1.0, 0.9
    result = knn_accuracy(train_x, train_y, query, np.array([1, 3]), k=2, temperature=0.1)
    assert result == {"top1": 0.0, "top5": 0.5}
    result = knn_accuracy(train_x, train_y, query, np.array([7, 50]), k=2, temperature=0.1)
    assert result == {"top1": 0.5, "top5": 1.0}


# ----------------------------------------------------------------------------- suites
@pytest.mark.parametrize("suite_name", ["cifar10-instance", "cifar100-instance"])
def test_cld_table_baselines_are_clds_recipe_without_the_cld_term(suite_name):
    """CLD's NPID and MoCo rows are its own scripts with the CLD term off: in both suites the rows
    labelled npid and moco must resolve to exactly the npid_cld / moco_cld configuration of the same
    suite with cld_weight 0, and carry the same kNN protocol.
    Catches: baseline rows trained with another recipe (head, augmentation, schedule, queue)."""
    suite = load_suite(suite_name)
    specs = {e.label: make_spec(suite, suite.datasets[0], e, 0, suite.budgets[0]) for e in suite.methods}
    for baseline, full in (("npid", "npid_cld"), ("moco", "moco_cld")):
        assert specs[baseline]["method"] == full and specs[full]["method"] == full
        assert specs[baseline]["config"]["cld_weight"] == 0 and specs[full]["config"]["cld_weight"] > 0
        assert {**specs[baseline]["config"], "cld_weight": None} == {**specs[full]["config"], "cld_weight": None}
        assert specs[baseline]["protocols"] == specs[full]["protocols"]
    assert "deviation" in suite.description.lower()


def test_clds_and_lemniscates_rows_train_a_resnet_with_pytorchs_default_initialisation():
    """CLD's and lemniscate's ``models/resnet_cifar.py`` have no initialisation loop: every convolution
    keeps PyTorch's default, uniform in +-1/sqrt(fan_in) (std bound/sqrt(3)), where torchvision's ResNet
    draws kaiming-normal with fan_out (std sqrt(2/fan_out)). The MoCo demo builds torchvision's resnet18.
    Catches: the CLD rows built with torchvision's initialisation, the demo row with the default one."""
    from harness.models.backbones import create_backbone

    torch.manual_seed(0)
    default, torchvision_init = create_backbone("resnet18_cifar_default_init", 3), create_backbone("resnet18_cifar", 3)
    assert [(k, v.shape) for k, v in default.state_dict().items()] == \
        [(k, v.shape) for k, v in torchvision_init.state_dict().items()]
    for name, conv in default.named_modules():
        if isinstance(conv, nn.Conv2d):
            bound = 1 / math.sqrt(conv.weight[0].numel())
            assert conv.weight.abs().max() <= bound, name
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    block = torchvision_init.layer2[0].conv2  # 128 -> 128, 3x3: fan_out 1152
    assert block.weight.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.05)
    for suite_name in ("cifar10-instance", "cifar100-instance"):
        suite = load_suite(suite_name)
        backbones = {e.label: make_spec(suite, suite.datasets[0], e, 0, suite.budgets[0])["backbone"]
                     for e in suite.methods}
        expected = {label: "resnet18_cifar" if label == "moco (CIFAR demo)" else "resnet18_cifar_default_init"
                    for label in backbones}
        assert backbones == expected, suite_name


def test_cifar_rows_normalise_with_the_official_scripts_constants():
    """lemniscate's and SeLa's ``cifar.py``, CLD's ``datasets/dataloader.py`` (for CIFAR-100 too) and the MoCo demo
    normalise with mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010): every row of both instance suites
    and SeLa's rows of the CIFAR-10 clustering suites set ``input_norm: legacy_cifar10``; CC and CD feed
    ``ToTensor()`` pixels (``none``, their adapters' paper default). Catches a row left on the dataset's own
    statistics."""
    from harness.data.datasets import LEGACY_CIFAR10_MEAN_STD

    assert LEGACY_CIFAR10_MEAN_STD == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    expected = {"npid_cld": "legacy_cifar10", "moco_cld": "legacy_cifar10", "npid": "legacy_cifar10",
                "moco": "legacy_cifar10", "sela": "legacy_cifar10", "cc": "none", "cd": "none"}
    seen = set()
    for suite_name in ("cifar10-instance", "cifar100-instance", "clustering-cifar10", "clustering-cifar10-32px"):
        suite = load_suite(suite_name)
        for entry in suite.methods:
            spec = make_spec(suite, suite.datasets[0], entry, 0, suite.budgets[0])
            assert spec["config"]["input_norm"] == expected[spec["method"]], (suite_name, entry.label)
            seen.add(spec["method"])
    assert seen == set(expected)
