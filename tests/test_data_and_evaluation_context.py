"""Datasets, the evaluation context and encoder checkpoints, checked against known answers: each dataset's
layout, labels, normalisation statistics and flip permission; which augmentation, image size, labels and
representations the protocols get; which checkpoints load as an encoder.

Small generated tensors or scikit-learn's bundled digits; torchvision's CIFAR classes are replaced by stand-ins
with known pixels and targets to check the loaders' conversion (no download).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from methods import DataInfo
from methods.base import Method


# ----------------------------------------------------------------------------- datasets
def test_digits_normalisation_statistics_are_its_pixels_mean_and_std(tmp_path):
    """digits' (mean, std) are the mean and standard deviation of its pixels scaled to [0, 1]
    (uint8 / 255), so normalised images have mean 0 and std 1 over the dataset. Catches: the std (or mean)
    computed on another scale (/16, the raw sklearn range), which would shrink every input to a few
    hundredths of its intended spread."""
    from harness.data.augment import Augmenter
    from harness.data.datasets import load_dataset
    from sklearn.datasets import load_digits

    data = load_dataset("digits", tmp_path)
    pixels = np.round(load_digits().images * (255.0 / 16.0)) / 255  # independent: sklearn's 0..16 scaled to [0, 1]
    assert data.mean[0] == pytest.approx(pixels.mean(), rel=1e-5)
    assert data.std[0] == pytest.approx(pixels.std(ddof=1), rel=1e-4)
    plain = Augmenter(None, data.mean, data.std).plain(data.images)
    assert plain.mean().item() == pytest.approx(0.0, abs=1e-4) and plain.std().item() == pytest.approx(1.0, abs=1e-3)


def test_handwritten_digit_datasets_forbid_flips_and_photographs_allow_them():
    """A horizontal flip is label-preserving for photographs (CIFAR, STL, ImageNet-10, image folders) and not for
    handwritten digits: ``flips`` is False for both ``digits`` and ``mnist``. Catches ``mnist`` dropped from the
    no-flip list (every MNIST run, training and probes, would flip its digits)."""
    from harness.data.datasets import ImageData

    def data(name):
        return ImageData(name, torch.zeros(1, 1, 2, 2, dtype=torch.uint8), np.zeros(1, np.int64), None,
                         np.ones(1, bool), ("0",), (0.5,), (0.2,))

    assert [data(n).flips for n in ("digits", "mnist", "cifar10", "cifar100-20", "stl10", "imagenet10")] == \
        [False, False, True, True, True, True]


class _FakeTorchvisionSet:
    """Stands in for a torchvision CIFAR class: ``data`` (N, H, W, 3) uint8, ``targets``, ``classes``."""

    classes: tuple[str, ...] = ()
    num_targets = 10

    def __init__(self, root, train, download, **kw):
        g = np.random.default_rng(0 if train else 1)
        n = 20 if train else 10
        self.data = g.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8)  # every pixel different: a layout error shows
        self.targets = list(np.arange(n) % self.num_targets)


def test_cifar10_is_channels_first_with_vehicles_as_coarse_class_0(tmp_path, monkeypatch):
    """load_cifar10 turns torchvision's (N, H, W, C) arrays into (N, C, H, W) images, pixel for pixel, train part
    first; the coarse labels are 0 for the vehicles (airplane, automobile, ship, truck) and 1 for the six animals,
    read here from the class names. Catches: H and W swapped in the transpose (a mirrored, rotated CIFAR that
    no shape check sees), or a class on the wrong side of the vehicles/animals table (CIFAR-10 2->10 transfer)."""
    import torchvision.datasets as tvd
    from harness.data.datasets import CIFAR10_CLASSES, load_cifar10

    class FakeCIFAR10(_FakeTorchvisionSet):
        classes = list(CIFAR10_CLASSES)

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    data = load_cifar10(tmp_path, False)
    train, test = FakeCIFAR10(None, True, False), FakeCIFAR10(None, False, False)
    expected = np.concatenate([train.data, test.data]).transpose(0, 3, 1, 2)  # n, h, w, c -> n, c, h, w
    assert np.array_equal(data.images.numpy(), expected)
    assert data.is_train.tolist() == [True] * 20 + [False] * 10
    vehicles = {"airplane", "automobile", "ship", "truck"}
    expected_coarse = [0 if CIFAR10_CLASSES[y] in vehicles else 1 for y in data.labels]
    assert data.coarse_labels.tolist() == expected_coarse and set(expected_coarse) == {0, 1}


def test_cifar100_20_takes_the_superclasses_as_its_labels(tmp_path, monkeypatch):
    """``cifar100-20`` (the clustering benchmark) labels each image with its superclass (20 classes) and has no
    further coarse level; ``cifar100`` keeps the 100 fine labels with the superclasses as coarse labels. Catches:
    cifar100-20 built with the fine labels (100 classes scored against 20 names)."""
    import torchvision.datasets as tvd
    from harness.data.datasets import CIFAR100_FINE_TO_COARSE, load_dataset

    class FakeCIFAR100(_FakeTorchvisionSet):
        classes = [f"fine{i}" for i in range(100)]
        num_targets = 100

        def __init__(self, root, train, download, **kw):
            super().__init__(root, train, download)
            self.targets = list((np.arange(len(self.data)) * 7 + (0 if train else 3)) % 100)

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    fine = np.array(FakeCIFAR100(None, True, False).targets + FakeCIFAR100(None, False, False).targets)
    twenty = load_dataset("cifar100-20", tmp_path, download=False)
    assert twenty.labels.tolist() == CIFAR100_FINE_TO_COARSE[fine].tolist()
    assert twenty.coarse_labels is None and twenty.num_classes == 20
    hundred = load_dataset("cifar100", tmp_path, download=False)
    assert hundred.labels.tolist() == fine.tolist()
    assert hundred.coarse_labels.tolist() == CIFAR100_FINE_TO_COARSE[fine].tolist() and hundred.num_classes == 100


# ----------------------------------------------------------------------------- evaluation context
class _Probe(Method):
    """A fixed 'method' for the evaluation context: backbone = flattened pixels, head = first 3 of them,
    one cluster head of 4 scores; the augmentation config is given."""

    trains = False

    def __init__(self, cfg: dict) -> None:
        backbone = nn.Flatten()
        backbone.out_dim = 64
        super().__init__(backbone, cfg, DataInfo(1, (1, 8, 8)))
        self.scores = nn.Linear(64, 4)

    def representations(self, x):
        h = self.backbone(x)
        return {"backbone": h, "head": h[:, :3]}

    def cluster_heads(self, x):
        return {"cluster": self.scores(self.backbone(x))}


def _context(tmp_path, cfg=None, name="digits", image_size=None):
    from harness.data.datasets import load_dataset, make_manifest
    from harness.engine.evaluate import RunContext

    data = load_dataset("digits", tmp_path)
    data.name = name  # the name decides whether flips are label-preserving (``ImageData.flips``)
    torch.manual_seed(0)
    method = _Probe(cfg or {"augment": "simclr", "augment_overrides": {}})
    return RunContext(method, data, make_manifest(data), "cpu", seed=0, batch_size=500, image_size=image_size), data


def test_cluster_assignments_are_the_argmax_of_the_heads_scores(tmp_path):
    """A cluster head's assignment of each sample is the argmax of its scores on the plain (normalised,
    unaugmented) image, over the whole dataset in order. Catches: argmin, or assignments taken from other rows."""
    ctx, data = _context(tmp_path)
    with torch.no_grad():
        x = (data.images.float() / 255 - data.mean[0]) / data.std[0]
        expected = ctx.method.scores(x.flatten(1)).argmax(1).numpy()
    assert np.array_equal(ctx.assignments("cluster"), expected)
    assert len(np.unique(expected)) > 1


def test_coarse_labels_are_the_datasets_coarse_level(tmp_path):
    """``labels("coarse")`` is the dataset's coarse level (digits: 0-4 -> 0, 5-9 -> 1), with its class count;
    ``labels("fine")`` the fine one. Catches the coarse level answered with the fine labels (a coarse protocol
    would score 10 classes)."""
    ctx, data = _context(tmp_path)
    assert np.array_equal(ctx.labels("coarse"), (data.labels >= 5).astype(np.int64))
    assert np.array_equal(ctx.labels("fine"), data.labels)
    assert ctx.num_classes("coarse") == 2 and ctx.num_classes("fine") == 10


IDENTITY_BUT_FLIP = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip": 1.0, "jitter_p": 0.0,
                     "grayscale": 0.0}


@pytest.mark.parametrize("name, flipped", [("digits", False), ("synthetic", True)])
def test_training_probe_augmentation_is_the_runs_preset_with_its_overrides_and_flip_permission(tmp_path, name,
                                                                                               flipped):
    """``probe_augment(preset="training")`` applies the run's own augmentation, its preset *with* the run's
    ``augment_overrides``, flipping only where the dataset allows flips. Here the overrides make the crop the
    whole image and flip every image: on digits (no flips) the views are exactly the plain images, on a dataset
    that allows flips exactly their mirror images. Catches: the overrides dropped (simclr's random crops), or
    flips applied to digits."""
    ctx, data = _context(tmp_path, {"augment": "simclr", "augment_overrides": IDENTITY_BUT_FLIP}, name=name)
    images = data.images[:64]
    views = ctx.probe_augment(images, "training")
    expected = ctx.normalize(images.flip(-1) if flipped else images)
    torch.testing.assert_close(views, expected, rtol=0, atol=1e-4)


def test_probe_views_are_resampled_to_the_runs_image_size(tmp_path):
    """With a run ``image_size`` (16 for the 8x8 digits) the probe's augmented views, of either preset, come at
    that size, as the plain views and the training views do. Catches the probe augmenters built without the
    run's ``out_size`` (8x8 views into an encoder trained on 16x16)."""
    ctx, data = _context(tmp_path, image_size=16)
    assert tuple(ctx.normalize(data.images[:4]).shape) == (4, 1, 16, 16)
    for preset in ("probe", "training"):
        assert tuple(ctx.probe_augment(data.images[:4], preset).shape) == (4, 1, 16, 16)


def test_each_protocol_gets_the_representations_of_its_inputs(tmp_path, monkeypatch):
    """``evaluate`` calls a protocol once per feature representation (``features``), once per cluster head
    (``assignments``) and on the backbone (``encoder``), and files each result under that representation.
    Catches: the cluster heads replaced by the features for an ``assignments`` protocol (a cluster head never
    scored, the features scored twice)."""
    import harness.engine.evaluate as evaluate_module
    from types import SimpleNamespace

    calls = []

    def protocol(inputs):
        return SimpleNamespace(inputs=inputs, fn=lambda ctx, rep, **p: calls.append((inputs, rep)) or {"m": 1.0})

    specs = {"f": protocol(("features",)), "a": protocol(("assignments",)), "fa": protocol(("features", "assignments")),
             "e": protocol(("encoder",))}
    monkeypatch.setattr(evaluate_module, "PROTOCOLS", SimpleNamespace(get=specs.__getitem__))
    ctx, _ = _context(tmp_path)
    metrics, _ = evaluate_module.evaluate(ctx, {name: {} for name in specs})
    assert calls == [(("features",), "backbone"), (("features",), "head"), (("assignments",), "cluster"),
                     (("features", "assignments"), "backbone"), (("features", "assignments"), "head"),
                     (("features", "assignments"), "cluster"), (("encoder",), "backbone")]
    assert metrics == {"backbone": {"f/m": 1.0, "fa/m": 1.0, "e/m": 1.0}, "head": {"f/m": 1.0, "fa/m": 1.0},
                       "cluster": {"a/m": 1.0, "fa/m": 1.0}}


# ----------------------------------------------------------------------------- encoder checkpoints
def test_a_checkpoint_holding_query_and_key_encoders_is_refused_not_loaded_as_one_of_them(tmp_path):
    """A prefix is stripped only when *every* key carries it. MoCo's whole model (``encoder_q.*`` and
    ``encoder_k.*``, equally long prefixes) is refused with one line naming the unexpected keys; stripping a
    prefix that only some keys carry would cut ``encoder_k.`` off as well and load the key encoder's weights
    over the query encoder's without a word. Catches ``all`` turned into ``any`` in the prefix rule."""
    from harness.engine.checkpoint import load_encoder
    from harness.errors import UsageError
    from harness.models.backbones import create_backbone

    torch.manual_seed(0)
    query, key = create_backbone("small_cnn", 1).state_dict(), create_backbone("small_cnn", 1).state_dict()
    state = {**{f"encoder_q.{k}": v for k, v in query.items()}, **{f"encoder_k.{k}": v for k, v in key.items()}}
    torch.save(state, tmp_path / "moco.pt")
    with pytest.raises(UsageError, match="unexpected"):
        load_encoder(tmp_path / "moco.pt", "small_cnn", 1)
    torch.save({f"encoder_q.{k}": v for k, v in query.items()}, tmp_path / "query.pt")  # the query encoder alone loads
    loaded = load_encoder(tmp_path / "query.pt", "small_cnn", 1).state_dict()
    assert all(torch.equal(loaded[k], query[k]) for k in query)


# ----------------------------------------------------------------------------- input normalisation
@pytest.mark.parametrize("norm, mean, std", [
    ("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    ("legacy_cifar10", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
])
def test_a_runs_input_norm_normalises_its_training_and_evaluation_images(tmp_path, monkeypatch, norm, mean, std):
    """``input_norm`` sets the normalisation of a run's training views and of every image its evaluation sees
    (``none``: pixels in [0, 1], CC's and CD's ToTensor(); ``legacy_cifar10``: the constants of lemniscate, CLD,
    SeLa and the MoCo demo), on a 3-channel image folder. Catches the key ignored by the training augmenter or
    by the evaluation context (features of other inputs than the encoder was trained on)."""
    import harness.execution.runner as runner_module
    from harness.execution.runner import Runner, plan
    from tests.conftest import image_tree, make_suite

    tree = image_tree(tmp_path / "tree", train=6, test=2)
    seen = {}

    def fake_train(method, images, labels, budget, augmenter, cfg, **kw):
        seen["train"] = (augmenter.mean.flatten().tolist(), augmenter.std.flatten().tolist())
        seen["plain"] = augmenter.plain(images[:2])
        seen["images"] = images[:2]
        raise KeyboardInterrupt  # nothing else to check of the run

    def fake_evaluate(ctx, protocols, progress=None):
        seen["eval"] = ctx.normalize(seen["images"])
        return {}, {}

    monkeypatch.setattr(runner_module, "train", fake_train)
    monkeypatch.setattr(runner_module, "evaluate", fake_evaluate)
    methods = [{"name": name, "config": {"input_norm": norm}} for name in ("simclr", "random")]
    trains, evaluates = plan(make_suite(methods, datasets=[f"imagefolder:{tree}"]))
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        runner.run([trains])
    assert seen["train"][0] == pytest.approx(mean) and seen["train"][1] == pytest.approx(std)
    expected = (seen["images"].float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(seen["plain"], expected, rtol=0, atol=1e-5)
    runner.run([evaluates])  # a baseline that does not train: straight to its evaluation
    torch.testing.assert_close(seen["eval"], expected, rtol=0, atol=1e-5)


def test_input_norm_is_checked_against_the_channels_a_dataset_is_known_to_have():
    """The channels known before loading: 1 for digits and MNIST, 3 for CIFAR-10, STL-10 and any image folder (read as
    RGB). CIFAR's constants are refused for 1 channel and accepted for 3, and for a dataset whose channels are not
    known before it loads (a plugin's, registered without them), left to the check on the loaded images. Catches: an
    image folder's channels unknown, and a dataset of unknown channels refused outright."""
    from harness.data.datasets import check_input_norm, dataset_channels
    from harness.errors import UsageError

    assert [dataset_channels(name) for name in ("digits", "mnist", "cifar10", "stl10", "imagefolder:/any/tree")] == [
        1, 1, 3, 3, 3]
    check_input_norm("legacy_cifar10", "imagefolder:/any/tree", 3)
    check_input_norm("legacy_cifar10", "my_plugin_data", None)
    check_input_norm("none", "mnist", 1)
    with pytest.raises(UsageError, match=r"dataset 'mnist' has 1 \(valid for it: dataset, none\)"):
        check_input_norm("legacy_cifar10", "mnist", 1)
