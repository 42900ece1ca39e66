"""Coarse-to-fine transfer methods (Chen, Fu et al. 2022): supcon, supcon_spread, cond_autoencoder, thanos.

Each loss is checked against a direct, loop-by-loop computation of its equation on small
tensors; the training check compares the fine-label kNN accuracy of supcon_spread and supcon
trained on digits' coarse labels (0-4 vs 5-9) on the same seeds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from harness.models.backbones import create_backbone
from harness.execution.runner import Runner, plan
from harness.execution.store import ResultStore, run_id
from harness.models.vit import ViT
from methods import METHODS, Batch, DataInfo, create_method, resolve_config
from methods.autoencoder import ConvDecoder
from methods.losses import class_conditional_info_nce, supcon_loss
from methods.thanos import ConcatEncoder
from tests.conftest import make_suite, metric

TAU = 0.5


# ----------------------------------------------------------------------------- direct computations
def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u @ v) / (u.norm() * v.norm())


def direct_supcon(anchors, candidates, labels, tau, clip):
    """1/n sum_i 1/|P(i)| sum_{p in P(i)} [ -min(s_ip, clip) + log(e^{s_ip} + sum_{k in N(i)} e^{s_ik}) ]."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        s = [cos(anchors[i], candidates[j]) / tau for j in range(n)]
        positives = [j for j in range(n) if labels[j] == labels[i]]
        negatives = [j for j in range(n) if labels[j] != labels[i]]
        per_anchor = 0.0
        for p in positives:
            numerator = s[p] if clip is None else torch.clamp(s[p], max=clip)
            denominator = torch.log(torch.exp(s[p]) + sum(torch.exp(s[k]) for k in negatives))
            per_anchor = per_anchor - numerator + denominator
        total = total + per_anchor / len(positives)
    return total / n


def direct_spread(anchors, candidates, labels, tau):
    """1/n sum_i [ -s_ii + log sum_{p in P(i)} e^{s_ip} ]  (P(i) includes i)."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        s = [cos(anchors[i], candidates[j]) / tau for j in range(n)]
        positives = [j for j in range(n) if labels[j] == labels[i]]
        total = total - s[i] + torch.log(sum(torch.exp(s[p]) for p in positives))
    return total / n


def direct_ce(logits, labels):
    return sum(-torch.log(torch.exp(logits[i, labels[i]]) / torch.exp(logits[i]).sum())
               for i in range(len(labels))) / len(labels)


def views_pair(n=8, d=5, noise=0.3, seed=0):
    """Two correlated views of n samples: anchors (view 1) and candidates (view 0)."""
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    v1 = v0 + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return v1.requires_grad_(), v0.requires_grad_()  # anchors (view 1), candidates (view 0)


LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("clip", [1.0, None])
def test_supcon_matches_equation_and_its_gradient(clip):
    anchors, candidates = views_pair()
    loss = supcon_loss(anchors, candidates, LABELS, TAU, clip_pos=clip)
    expected = direct_supcon(anchors, candidates, LABELS, TAU, clip)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    got = torch.autograd.grad(loss, (anchors, candidates))
    want = torch.autograd.grad(expected, (anchors, candidates))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_supcon_clamp_removes_the_numerator_gradient_above_cosine_half():
    """With every positive logit above 1 (cosine > T = 0.5), clamped SupCon = unclamped SupCon +
    mean_i 1/|P(i)| sum_p (s_ip - 1): the same value shift and the same gradient shift, i.e. only
    the denominators still pull positives together."""
    g = torch.Generator().manual_seed(5)
    centroids = 3 * torch.eye(5, dtype=torch.float64)[LABELS]  # classes along different axes
    anchors = (centroids + 0.3 * torch.randn(8, 5, generator=g, dtype=torch.float64)).requires_grad_()
    candidates = (centroids + 0.3 * torch.randn(8, 5, generator=g, dtype=torch.float64)).requires_grad_()
    n = len(LABELS)
    positive_logits = [[cos(anchors[i], candidates[p]) / TAU for p in range(n) if LABELS[p] == LABELS[i]]
                       for i in range(n)]
    assert min(float(s.detach()) for row in positive_logits for s in row) > 1, "test data must put every positive above the clamp"
    shift = sum(sum(s - 1 for s in row) / len(row) for row in positive_logits) / n
    clamped = supcon_loss(anchors, candidates, LABELS, TAU, clip_pos=1.0)
    unclamped_plus_shift = supcon_loss(anchors, candidates, LABELS, TAU, clip_pos=None) + shift
    assert clamped.item() == pytest.approx(unclamped_plus_shift.item(), rel=1e-10)
    assert clamped.item() > unclamped_plus_shift.item() - shift.item()
    for g1, g2 in zip(torch.autograd.grad(clamped, (anchors, candidates)),
                      torch.autograd.grad(unclamped_plus_shift, (anchors, candidates))):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_class_conditional_info_nce_matches_equation_and_its_gradient():
    anchors, candidates = views_pair(seed=1)
    loss = class_conditional_info_nce(anchors, candidates, LABELS, TAU)
    expected = direct_spread(anchors, candidates, LABELS, TAU)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for g, w in zip(torch.autograd.grad(loss, (anchors, candidates)), torch.autograd.grad(expected, (anchors, candidates))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- adapters
class FlattenEncoder(nn.Module):
    """Identity encoder on flattened pixels, so adapter losses can be recomputed from the views."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x):
        return x.flatten(1)


def adapter(name, image_shape=(1, 2, 2), num_classes=3, **overrides):
    torch.manual_seed(0)
    cfg = resolve_config(METHODS.get(name), "cpu", overrides)
    info = DataInfo(num_samples=8, image_shape=image_shape, num_classes=num_classes)
    return create_method(name, FlattenEncoder(math.prod(image_shape)), cfg, info).double()


def batch_of(seed=2):
    v1, v0 = views_pair(seed=seed, d=4)
    views = [v0.detach().view(-1, 1, 2, 2), v1.detach().view(-1, 1, 2, 2)]
    return Batch(views, torch.arange(len(LABELS)), LABELS)


def test_supcon_adapter_pairs_view1_anchors_with_view0_candidates():
    m, batch = adapter("supcon"), batch_of()
    loss, logs = m.training_step(batch)
    v0, v1 = (v.flatten(1) for v in batch.views)
    ce = direct_ce(m.classifier(torch.cat([v0, v1])), LABELS.repeat(2))
    forward = direct_supcon(v1, v0, LABELS, TAU, clip=1.0)
    assert loss.item() == pytest.approx((ce + forward).item(), rel=1e-10)
    assert logs["supcon"] == pytest.approx(forward.item(), rel=1e-10)
    backward = direct_supcon(v0, v1, LABELS, TAU, clip=1.0)
    assert abs(forward.item() - backward.item()) > 1e-3  # the direction matters on this batch
    assert m.label_level == "coarse" and m.cfg["temperature"] == 0.5 and m.cfg["clip_pos"] == 1.0


def test_supcon_spread_adapter_is_ce_plus_equal_weight_mean_of_supcon_and_spread():
    m, batch = adapter("supcon_spread"), batch_of(seed=3)
    loss, logs = m.training_step(batch)
    v0, v1 = (v.flatten(1) for v in batch.views)
    ce = direct_ce(m.classifier(torch.cat([v0, v1])), LABELS.repeat(2))
    expected = ce + (direct_supcon(v1, v0, LABELS, TAU, 1.0) + direct_spread(v1, v0, LABELS, TAU)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert logs["spread"] == pytest.approx(direct_spread(v1, v0, LABELS, TAU).item(), rel=1e-10)
    assert m.cfg["a_lc"] == m.cfg["a_spread"] == 1.0


def test_supcon_spread_adapter_uses_the_configured_temperature_in_both_terms():
    """SupCon and the class-conditional InfoNCE both divide the similarities by the configured
    temperature (0.3 here, not the default 0.5). Catches either term at a fixed T = 0.5."""
    m, batch = adapter("supcon_spread", temperature=0.3), batch_of(seed=8)
    loss, logs = m.training_step(batch)
    v0, v1 = (v.flatten(1) for v in batch.views)
    sup, spread = direct_supcon(v1, v0, LABELS, 0.3, clip=1.0), direct_spread(v1, v0, LABELS, 0.3)
    assert abs(sup.item() - direct_supcon(v1, v0, LABELS, TAU, clip=1.0).item()) > 1e-3  # T matters here
    assert logs["supcon"] == pytest.approx(sup.item(), rel=1e-10)
    assert logs["spread"] == pytest.approx(spread.item(), rel=1e-10)
    ce = direct_ce(m.classifier(torch.cat([v0, v1])), LABELS.repeat(2))
    assert loss.item() == pytest.approx((ce + (sup + spread) / 2).item(), rel=1e-10)


def test_cond_autoencoder_loss_is_coarse_ce_plus_reconstruction_mse():
    m, batch = adapter("cond_autoencoder", recon_weight=0.5), batch_of(seed=4)
    loss, _ = m.training_step(batch)
    x = torch.cat(batch.views)
    z = x.flatten(1)
    ce = direct_ce(m.classifier(z), LABELS.repeat(2))
    recon = m.decoder(z)
    mse = sum(((recon[i] - x[i]) ** 2).sum() for i in range(len(x))) / x.numel()
    assert loss.item() == pytest.approx((ce + 0.5 * mse).item(), rel=1e-9)



@pytest.mark.parametrize("name,a_lc,a_spread", [("supcon", 0.5, 0.0), ("supcon_spread", 2.0, 0.5)])
def test_supcon_weights_are_the_official_weighted_mean(name, a_lc, a_spread):
    """Unequal weights: the representation loss is (a_lc L_SupCon + a_spread L_spread) / (a_lc + a_spread)
    with a_spread > 0, and a_lc L_SupCon alone without it. Catches a fixed divisor of 2, a_lc ignored, or
    L_spread weighted by a_lc (all equal at the shipped a_lc = a_spread = 1)."""
    m, batch = adapter(name, a_lc=a_lc, a_spread=a_spread), batch_of(seed=5)
    loss, _ = m.training_step(batch)
    v0, v1 = (v.flatten(1) for v in batch.views)
    ce = direct_ce(m.classifier(torch.cat([v0, v1])), LABELS.repeat(2))
    sup = direct_supcon(v1, v0, LABELS, TAU, clip=1.0)
    con = (a_lc * sup + a_spread * direct_spread(v1, v0, LABELS, TAU)) / (a_lc + a_spread) if a_spread else a_lc * sup
    assert loss.item() == pytest.approx((ce + con).item(), rel=1e-10)


def test_supcon_cosine_clamps_at_any_clip_pos():
    """With the paper's cosine similarity the positive logit is clamped at ``clip_pos`` whatever its value
    (0.9 here); only the official similarity skips the clamp when clip_pos != 1. Catches the official
    code's rule applied to the cosine similarity too."""
    m, batch = adapter("supcon", clip_pos=0.9), batch_of(seed=6)
    loss, logs = m.training_step(batch)
    v0, v1 = (v.flatten(1) for v in batch.views)
    clamped, unclamped = direct_supcon(v1, v0, LABELS, TAU, clip=0.9), direct_supcon(v1, v0, LABELS, TAU, clip=None)
    assert abs(clamped.item() - unclamped.item()) > 1e-3
    assert logs["supcon"] == pytest.approx(clamped.item(), rel=1e-10)



def test_cond_autoencoder_reconstruction_trains_the_encoder():
    """The reconstruction term reaches the encoder (it is what keeps the information the coarse labels
    do not ask for): the encoder's gradient equals that of CE + recon_weight * MSE written out.
    Catches the embedding detached before the decoder (same loss value)."""
    torch.manual_seed(1)
    cfg = resolve_config(METHODS.get("cond_autoencoder"), "cpu", {"recon_weight": 0.5, "decoder_width": 4})
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    encoder.out_dim = 3
    m = create_method("cond_autoencoder", encoder, cfg, DataInfo(8, (1, 2, 2), num_classes=3)).double()
    batch = batch_of(seed=7)
    loss, _ = m.training_step(batch)
    x = torch.cat(batch.views)
    z = m.backbone(x)
    expected = direct_ce(m.classifier(z), LABELS.repeat(2)) + 0.5 * ((m.decoder(z) - x) ** 2).mean()
    got, want = (torch.autograd.grad(v, list(encoder.parameters())) for v in (loss, expected))
    assert all(torch.allclose(g, w, rtol=1e-8, atol=1e-12) for g, w in zip(got, want))


def test_supcon_spread_trains_the_encoder_through_every_term():
    """The coarse cross-entropy, SupCon and the spread term all reach the encoder (the official trainer
    optimises the whole model on the sum): the encoder's gradient equals that of CE + (SupCon + spread) / 2
    written out. Catches the embedding detached before the classifier or before the contrastive terms
    (the same loss value)."""
    torch.manual_seed(2)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    encoder.out_dim = 3
    cfg = resolve_config(METHODS.get("supcon_spread"), "cpu")
    m = create_method("supcon_spread", encoder, cfg, DataInfo(8, (1, 2, 2), num_classes=3)).double()
    batch = batch_of(seed=9)
    loss, _ = m.training_step(batch)
    z0, z1 = (m.backbone(v) for v in batch.views)
    expected = (direct_ce(m.classifier(torch.cat([z0, z1])), LABELS.repeat(2))
                + (direct_supcon(z1, z0, LABELS, TAU, 1.0) + direct_spread(z1, z0, LABELS, TAU)) / 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    got, want = (torch.autograd.grad(v, list(encoder.parameters())) for v in (loss, expected))
    assert all(torch.allclose(g, w, rtol=1e-8, atol=1e-12) for g, w in zip(got, want))


@pytest.mark.parametrize("shape,width,grid,channels", [((1, 8, 8), 32, (32, 2, 2), [16, 8, 1]),
                                                       ((3, 32, 32), 512, (512, 4, 4), [256, 128, 64, 3]),
                                                       ((1, 28, 28), 64, (64, 7, 7), [32, 16, 1])])
def test_decoder_grid_and_channel_plan(shape, width, grid, channels):
    """The decoder starts from a ``width``-channel grid 2^k smaller than the image (k <= 3, the grid at
    least 2 pixels a side) and halves the width at each upsampling: 512-256-128-64 on 32x32 as pl_bolts'
    decoder. Catches a 1x1 grid on 8x8 digits, or a width that is not halved."""
    decoder = ConvDecoder(16, shape, width)
    assert decoder.grid == grid
    assert [c.out_channels for c in decoder.net if isinstance(c, nn.Conv2d)] == channels


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 96, 96), (1, 28, 28)])
def test_decoder_reconstructs_the_input_shape(shape):
    assert ConvDecoder(16, shape, 32)(torch.randn(2, 16)).shape == (2, *shape)


# ----------------------------------------------------------------------------- reference rows
def test_baseline_rows_evaluate_pixels_the_untrained_backbone_and_fine_label_cross_entropy():
    """``pixels``: the flattened normalised input whatever backbone it is given, untrained; ``random``: the
    given backbone as built, untrained; ``supervised``: trained cross-entropy of a linear classifier over
    the *fine* classes on view 0, one view of the probe augmentation at paper scale. Catches a baseline
    that trains or keeps the suite's encoder, or supervision with the coarse labels."""
    torch.manual_seed(0)
    info = DataInfo(num_samples=8, image_shape=(1, 2, 3), num_classes=4)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(6, 5))
    backbone.out_dim = 5
    x = torch.randn(7, 1, 2, 3)
    pixels = create_method("pixels", backbone, resolve_config(METHODS.get("pixels"), "cpu"), info)
    assert not METHODS.get("pixels").trains and pixels.backbone.out_dim == 6
    assert torch.equal(pixels.representations(x)["backbone"], x.flatten(1))
    random_init = create_method("random", backbone, resolve_config(METHODS.get("random"), "cpu"), info)
    assert not METHODS.get("random").trains and random_init.backbone is backbone
    torch.testing.assert_close(random_init.representations(x)["backbone"], backbone(x))
    supervised_cls = METHODS.get("supervised")
    assert supervised_cls.trains and supervised_cls.label_level == "fine"
    paper = resolve_config(supervised_cls, "paper")
    assert (paper["views"], paper["augment"]) == (1, "probe")
    supervised = create_method("supervised", backbone, resolve_config(supervised_cls, "cpu"), info)
    labels = torch.tensor([0, 3, 1, 2, 3, 0, 1])
    loss = supervised.training_step(Batch([x], torch.arange(7), labels))
    logits = supervised.classifier(backbone(x))
    assert logits.shape == (7, 4)
    assert loss.item() == pytest.approx(direct_ce(logits.detach(), labels).item(), rel=1e-6)


# ----------------------------------------------------------------------------- thanos and the ViT
def test_thanos_concatenates_the_frozen_component_backbones():
    class Affine(nn.Module):
        def __init__(self, scale, out_dim):
            super().__init__()
            self.lin, self.out_dim = nn.Linear(4, out_dim), out_dim
            nn.init.constant_(self.lin.weight, scale)

        def forward(self, x):
            return self.lin(x.flatten(1))

    info = DataInfo(num_samples=8, image_shape=(1, 2, 2), num_classes=2)
    comps = {name: create_method(name, Affine(s, d), resolve_config(METHODS.get(name), "cpu"), info).eval()
             for name, s, d in (("supcon_spread", 1.0, 3), ("cond_autoencoder", -2.0, 5))}
    thanos_cls = METHODS.get("thanos")
    assert thanos_cls.components == ("supcon_spread", "cond_autoencoder") and not thanos_cls.trains
    thanos = create_method("thanos", Affine(0.0, 7), resolve_config(thanos_cls, "cpu"),
                           DataInfo(8, (1, 2, 2), extra={"components": comps}))
    x = torch.randn(6, 1, 2, 2)
    rep = thanos.representations(x)
    assert list(rep) == ["backbone"] and thanos.backbone.out_dim == 8
    expected = torch.cat([comps["supcon_spread"].backbone(x), comps["cond_autoencoder"].backbone(x)], 1)
    torch.testing.assert_close(rep["backbone"], expected)
    assert not any(p.requires_grad for p in thanos.parameters())
    concat = ConcatEncoder([Affine(1.0, 2), Affine(3.0, 4)])
    assert concat.out_dim == 6 and concat(x).shape == (6, 6)


def test_vit_small_patch4_is_the_papers_encoder():
    """The official encoder's shapes and parameter count: a bias-free qkv and no output projection per block
    (``MHA_fused`` with ``d_out=None``), Linear + LayerNorm patch embedding, 1 + 64 learned positions.
    Catches: torch's MultiheadAttention (q/k/v biases and an output projection: 466,816 more parameters)."""
    from harness.models.backbones import BACKBONES, create_backbone

    assert "vit_small_patch4" in BACKBONES.names()
    vit = create_backbone("vit_small_patch4", 3).eval()
    assert vit.out_dim == 256 and len(vit.blocks) == 7
    block = vit.blocks[0]
    assert block.attn.heads == 8 and block.mlp[0].out_features == 512 and block.attn.qkv.bias is None
    assert vit.embed[0].in_features == 3 * 4 * 4
    width, mlp = 256, 512
    per_block = 2 * 2 * width + width * 3 * width + (width * mlp + mlp) + (mlp * width + width)
    expected = (48 * width + width + 2 * width) + width + 65 * width + 7 * per_block + 2 * width
    assert sum(p.numel() for p in vit.parameters()) == expected
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    assert ViT(1)(torch.randn(2, 1, 8, 8)).shape == (2, 256)


def _official_attention(x: torch.Tensor, qkv_weight: torch.Tensor, heads: int, rescale: float = 1.0) -> torch.Tensor:
    """thanos-code's MHA_fused + MHA forward without dropout, written from their einsums: qkv split as
    ``b s (k h d) -> b s k h d``, logits ``b s h t`` scaled by d^-0.5, softmax over keys, then
    ``einsum('b s h d, b t h s -> b t h d', v, attn)``; ``rescale`` multiplies the logits (a kept row under
    head dropout)."""
    b, s, width = x.shape
    q, k, v = (x @ qkv_weight.T).view(b, s, 3, heads, width // heads).unbind(2)
    attn = torch.einsum("bshd,bthd->bsht", q, k).mul((width // heads) ** -0.5 * rescale).softmax(-1)
    return torch.einsum("bshd,bths->bthd", v, attn).reshape(b, s, width)


def test_vit_attention_equals_the_official_modules_and_drops_whole_query_rows():
    """Eval mode: the official attention to rounding. Training with ``head_dropout`` p (other dropout 0):
    each query row either attends uniformly (its logits zeroed: the mean of v over keys) or with logits
    scaled by 1/(1-p), as ``nn.Dropout2d`` on the official (batch, query, head, key) logits does.
    Catches: dropout on single logits or per head, dropping after the softmax, a missing rescale."""
    from harness.models.vit import Attention

    torch.manual_seed(0)
    attn, x = Attention(32, 4, dropout=0.0, head_dropout=0.5), torch.randn(3, 9, 32)
    torch.testing.assert_close(attn.eval()(x), _official_attention(x, attn.qkv.weight, 4))
    out = attn.train()(x)
    uniform = (x @ attn.qkv.weight.T)[..., 64:].mean(1, keepdim=True).expand_as(out)  # v averaged over keys
    sharpened = _official_attention(x, attn.qkv.weight, 4, rescale=1 / 0.5)
    is_uniform = torch.isclose(out, uniform, atol=1e-5).all(-1)
    is_sharpened = torch.isclose(out, sharpened, atol=1e-5).all(-1)
    assert (is_uniform ^ is_sharpened).all() and is_uniform.any() and is_sharpened.any()


# ----------------------------------------------------------------------------- harness runs
def test_thanos_run_evaluates_the_stored_component_runs(run_suite, tmp_path):
    """Thanos names its component runs and evaluates their trained weights: its features equal the
    concatenated features of the two backbones loaded here, directly from the components'
    checkpoint files into fresh backbones, and those differ from the untrained initialisation.
    Catches a Thanos built on freshly initialised (or same-seed re-initialised) components,
    swapped components, and a checkpoint of another run."""
    methods, budget = ["supcon_spread", "cond_autoencoder", "thanos"], "epochs=1"
    records = run_suite(methods, seeds=(0,), budget=budget)
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    by_method = {r["spec"]["method"]: r for r in records}
    thanos = by_method["thanos"]
    assert [run_id(s) for s in thanos["spec"]["components"]] == [by_method["supcon_spread"]["run_id"],
                                                                 by_method["cond_autoencoder"]["run_id"]]
    assert thanos["train"]["used"] is None and "knn/top1" in thanos["metrics"]["backbone"]

    suite = make_suite(methods, seeds=(0,), budget=budget)  # the run_suite fixture's suite, same results dir
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
    jobs = {job.spec["method"]: job for job in plan(suite)}
    data, manifest = runner.dataset("digits", jobs["thanos"].spec["val_fraction"])
    combined, _, _ = runner.build(jobs["thanos"], data, manifest)
    x = torch.as_tensor(data.images[:16]).float() / 255
    store, expected = ResultStore(tmp_path / "results", suite.name), []
    for name in ("supcon_spread", "cond_autoencoder"):
        weights = torch.load(store.checkpoint_path(jobs[name].run_id), map_location="cpu", weights_only=False)["model"]
        backbone = create_backbone(jobs[name].spec["backbone"], data.image_shape[0])
        untrained = {k: v.clone() for k, v in backbone.state_dict().items()}
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")})
        assert any(not torch.equal(untrained[k], v) for k, v in backbone.state_dict().items() if v.is_floating_point())
        expected.append(backbone.eval()(x))
    with torch.no_grad():
        features = combined.eval().representations(x)["backbone"]
    torch.testing.assert_close(features, torch.cat(expected, 1).detach())


def test_spread_keeps_more_fine_structure_than_supcon_on_digits(run_suite):
    """digits 2->10 (trained on 0-4 vs 5-9), CPU scale, 15 epochs, seeds 0-2: mean fine-label kNN top-1."""
    records = run_suite(["supcon", "supcon_spread"], seeds=(0, 1, 2), budget="epochs=15",
                        protocols={"knn": {"k": 20, "temperature": 0.1}})
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    knn = {m: metric(records, m, "knn/top1") for m in ("supcon", "supcon_spread")}
    report = ", ".join(f"{m} {[round(x, 3) for x in v]} mean {sum(v) / len(v):.3f}" for m, v in knn.items())
    print("fine kNN top-1:", report)
    assert sum(knn["supcon_spread"]) > sum(knn["supcon"]), f"fine kNN top-1: {report}"
