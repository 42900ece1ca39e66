"""Budgets, suites, datasets, manifests, augmentation, the store: behaviour on known inputs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from harness.data.augment import Augmenter, get_preset
from harness.engine.budget import Budget, Usage
from harness.data.datasets import (CIFAR100_FINE_TO_COARSE, load_dataset, load_image_folder, load_or_make_manifest,
                          make_manifest)
from harness.errors import UsageError
from harness.execution.store import ResultStore, run_id
from harness.engine.train import lr_factor
from conftest import make_suite


@pytest.mark.parametrize("text,unit,limit", [("epochs=20", "epochs", 20), ("500steps", "steps", 500),
                                             ({"samples": 1e5}, "samples", 100000), ("seconds=1.5", "seconds", 1.5)])
def test_budget_parse(text, unit, limit):
    b = Budget.parse(text)
    assert (b.unit, b.limit) == (unit, limit)


@pytest.mark.parametrize("bad", ["epochs=-1", "epochs=0", "fortnights=2", "abc", {"epochs": 1, "steps": 2}, {}])
def test_budget_rejects(bad):
    with pytest.raises(UsageError):
        Budget.parse(bad)


def test_usage_fraction_and_exhaustion():
    u = Usage(epochs=1.5, steps=30, samples=3000, seconds=2.0)
    assert u.fraction(Budget("epochs", 3)) == 0.5
    assert u.exhausted(Budget("steps", 30)) and not u.exhausted(Budget("samples", 3001))
    assert Usage(epochs=3.5).fraction(Budget("epochs", 3)) == 1.0  # in [0, 1] even past the budget


@pytest.mark.parametrize("limit", [1e-300, 1e-10, 1e-3])
def test_any_positive_budget_trains_at_least_one_step(limit):
    """A budget far below one step (epochs=1e-300 is valid input) is not spent before the first step, and is after
    it. Catches an absolute tolerance (limit - 1e-9) that called such a budget spent at the start: a run that
    trained nothing, stored as ok (a CLI sweep)."""
    assert not Usage().exhausted(Budget("epochs", limit))
    assert Usage(epochs=1 / 14, steps=1).exhausted(Budget("epochs", limit))
    assert Usage(epochs=3 * (1 - 1e-12)).exhausted(Budget("epochs", 3))  # float error in accumulated epochs


def test_a_budget_as_text_or_as_a_number_is_one_budget_and_one_run():
    """"epochs=20", "20epochs", {"epochs": 20}, {"epochs": 20.0} and YAML's string {"epochs": "20"} are the same
    budget with the integer limit 20, so they name the same run (a float 20.0 would hash as another run id);
    "1e3steps" is steps=1000. Catches whole limits kept as floats and an exponent the unit-suffix form cannot read."""
    budgets = [Budget.parse(v) for v in ("epochs=20", "20epochs", {"epochs": 20}, {"epochs": 20.0}, {"epochs": "20"})]
    assert {str(b) for b in budgets} == {"epochs=20"}
    assert len({run_id({"budget": b.as_dict()}) for b in budgets}) == 1
    assert str(Budget.parse("1e3steps")) == "steps=1000" and Budget.parse("seconds=1.5").limit == 1.5


def test_seed_everything_seeds_every_generator_and_sets_the_mode():
    """The same seed gives the same draws from Python's random, NumPy's global generator, torch's global generator
    and the returned data-order generator, another seed other draws from each; ``deterministic`` turns torch's
    deterministic algorithms on (cudnn autotuning off) or off. Catches any one of them left unseeded or unset."""
    import random

    from harness.engine.seeding import seed_everything

    def draws(seed):
        g = seed_everything(seed)
        return random.random(), float(np.random.rand()), torch.rand(1).item(), torch.rand(1, generator=g).item()

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    try:
        assert draws(3) == draws(3)
        assert all(a != b for a, b in zip(draws(3), draws(4)))
        seed_everything(3, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        seed_everything(3)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def test_epoch_order_is_a_permutation_of_its_own_for_each_seed_and_epoch():
    """``epoch_order(n, epoch, seed)`` is a permutation of range(n), the same for the same arguments, and different
    for each of 3 seeds x 3 epochs. Catches an order that ignores the epoch, and seed and epoch mixed so that
    (seed 0, epoch 1) repeats (seed 1, epoch 0): two seeds of a suite would then train on shifted copies of one
    data order."""
    from harness.engine.seeding import epoch_order

    assert sorted(epoch_order(50, 2, 1).tolist()) == list(range(50))
    assert torch.equal(epoch_order(50, 2, 1), epoch_order(50, 2, 1))
    orders = {tuple(epoch_order(50, e, s).tolist()) for s in range(3) for e in range(3)}
    assert len(orders) == 9


def test_lr_schedules():
    cfg = dict(TRAINING_DEFAULTS_FOR_TEST)
    assert lr_factor(0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(1.0, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.5, cfg) == pytest.approx(0.5)
    step = {**cfg, "schedule": "step", "milestones": [0.6, 0.8], "gamma": 0.1}
    assert [lr_factor(p, step) for p in (0.59, 0.6, 0.85)] == pytest.approx([1, 0.1, 0.01])
    warm = {**cfg, "warmup": 0.1}
    assert lr_factor(0.05, warm) < lr_factor(0.09, warm) < 1.0
    restarts = {**cfg, "schedule": "cosine_restarts", "restarts": 2}
    assert lr_factor(0.25, restarts) == pytest.approx(0.5) and lr_factor(0.5, restarts) == pytest.approx(1.0)


TRAINING_DEFAULTS_FOR_TEST = {"warmup": 0.0, "min_lr": 0.0, "lr": 0.1, "schedule": "cosine", "milestones": [],
                              "gamma": 0.1, "restarts": 1}


def test_cifar100_superclass_table():
    # 100 fine classes, 20 superclasses of exactly 5 each; spot checks from the CIFAR-100 meta file
    # (alphabetical fine names): apple(0)->fruit_and_vegetables(4), aquarium_fish(1)->fish(1),
    # bear(3)->large_carnivores(8), whale(95)->aquatic_mammals(0), worm(99)->non-insect_invertebrates(13).
    assert len(CIFAR100_FINE_TO_COARSE) == 100
    assert np.bincount(CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    assert [CIFAR100_FINE_TO_COARSE[i] for i in (0, 1, 3, 95, 99)] == [4, 1, 8, 0, 13]


def test_digits_dataset_and_manifest(tmp_path):
    data = load_dataset("digits", tmp_path)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert set(np.unique(data.coarse_labels)) == {0, 1}
    assert (data.coarse_labels == (data.labels >= 5)).all()
    m = load_or_make_manifest(data, tmp_path / "m")
    again = load_or_make_manifest(data, tmp_path / "m")
    assert m.sha256 == again.sha256
    parts = [m.train, m.val, m.test]
    assert sum(map(len, parts)) == len(data) and len(np.unique(np.concatenate(parts))) == len(data)
    assert not data.is_train[m.test].any() and data.is_train[m.val].all()
    assert np.array_equal(m.split("all"), np.arange(len(data)))
    changed = load_dataset("digits", tmp_path)
    changed.images[0, 0, 0, 0] ^= 1
    assert make_manifest(changed).sha256 != m.sha256


def test_missing_dataset_offline_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="not found under"):
        load_dataset("cifar10", tmp_path, download=False)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_image_folder(tmp_path, "toy")
    assert data.images.shape == (10, 3, 12, 12) and data.classes == ("cat", "dog")
    assert data.is_train.sum() == 6 and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_image_folder_orders_classes_and_files_by_name_whatever_order_they_were_made_in(tmp_path):
    """Class folders made in the order c, a, d, b and files 2, 10, 1 are read as classes a, b, c, d (label = place in
    name order) and files 1, 10, 2 of each: the same labels and sample order on every machine and file system.
    Hidden files and folders (``.DS_Store``) are no images or classes. Catches classes or files taken in directory
    order (the order the file system happens to list them) and a hidden file read as an image."""
    from PIL import Image

    classes, files = ("c", "a", "d", "b"), ("2", "10", "1")
    for split in ("train", "test"):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / ".DS_Store").write_bytes(b"not an image")  # hidden files are left out
            for name in files:  # pixel value: 20 x (class letter's place in the alphabet) + the file's number
                value = 20 * "abcd".index(cls) + int(name)
                Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / split / cls / f"{name}.png")
    (tmp_path / "train" / ".thumbnails").mkdir()  # and so are hidden folders
    data = load_image_folder(tmp_path, "toy")
    assert data.classes == ("a", "b", "c", "d")
    expected = [20 * c + f for c in range(4) for f in (1, 10, 2)]
    assert data.images[:, 0, 0, 0].tolist() == expected * 2 and data.labels.tolist() == [v // 20 for v in expected] * 2


def test_augmenter_is_seeded_and_shaped():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    aug = Augmenter(get_preset("simclr_blur"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    plain = Augmenter(None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x, torch.Generator())
    assert torch.allclose(plain, (x.float() / 255 - 0.5) / 0.25)


def test_augmenting_a_share_of_a_batch_gives_those_rows_of_the_whole():
    """What a data-parallel rank does: its rows of the batch, with the parameters of those rows."""
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    aug = Augmenter(get_preset("simclr_blur"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    whole = aug(x, torch.Generator().manual_seed(3))
    parts = [aug(x[i:i + 4], torch.Generator().manual_seed(3), slice(i, i + 4), 12) for i in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="hold 4 images, got 5"):
        aug(x[:5], torch.Generator(), slice(0, 4), 12)


def test_method_protocol_overrides_reach_only_that_methods_spec():
    from harness.execution.runner import plan

    suite = make_suite(["npid", {"name": "moco", "protocols": {"knn": {"temperature": 0.07}}}],
                       protocols={"knn": {"k": 20, "temperature": 0.1}})
    knn = {job.entry.label: job.spec["protocols"]["knn"] for job in plan(suite)}
    assert knn["npid"]["temperature"] == 0.1 and knn["moco"]["temperature"] == 0.07
    assert knn["npid"]["k"] == knn["moco"]["k"] == 20


SIMCLR_CIFAR = {"crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip": 0.5, "jitter": (0.4, 0.4, 0.4, 0.1),
                "jitter_p": 0.8, "grayscale": 0.2, "blur": 0.0, "blur_sigma": (0.1, 2.0),
                "erasing": 0.0, "erasing_scale": (0.02, 0.33), "erasing_ratio": (0.3, 3.3)}  # torchvision's defaults


@pytest.mark.parametrize("name,expected", [
    ("simclr", SIMCLR_CIFAR),  # SimCLR App. B.9: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8 with s=0.5, no blur
    ("simclr_blur", {**SIMCLR_CIFAR, "blur": 0.5}),  # SimCLR App. A: blur p=0.5, sigma 0.1-2.0
    ("cc", SIMCLR_CIFAR),  # docs/fidelity.md, CC: crop 0.08-1, flip, jitter s=0.5 p=0.8, grayscale 0.2
    ("cld", {**SIMCLR_CIFAR, "crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4), "jitter_p": 1.0}),
    ("probe", {**SIMCLR_CIFAR, "crop_scale": (0.5, 1.0), "jitter": (0, 0, 0, 0), "jitter_p": 0.0, "grayscale": 0.0}),
    ("mild", {**SIMCLR_CIFAR, "crop_scale": (0.5, 1.0), "jitter": (0.4, 0.4, 0.0, 0.0), "grayscale": 0.0}),
])
def test_augmentation_presets_hold_the_papers_parameters(name, expected):
    """Every field of each preset, as the papers (and docs/fidelity.md) give them. The two pipelines are
    compared on the same preset (tests/test_augment_distribution.py), so only this catches a wrong value in one."""
    assert dataclasses.asdict(get_preset(name)) == expected
    assert get_preset("none") is None


def test_unknown_augmentation_preset():
    with pytest.raises(UsageError, match="unknown augmentation 'fancy'"):
        get_preset("fancy")


@pytest.mark.parametrize("overrides,match", [
    pytest.param({"crop_scale": [0.9, 0.2]}, r"'crop_scale' must be a list of 2 numbers in \[0, 1\] \(low, high\), "
                 r"got \[0.9, 0.2\]", id="crop_scale high first"),
    pytest.param({"crop_scale": [0.2, 1.5]}, r"'crop_scale' must be a list of 2 numbers in \[0, 1\]",
                 id="crop_scale above 1"),
    pytest.param({"crop_ratio": [2.0, 0.5]}, r"'crop_ratio' must be a list of 2 numbers at least 0 \(low, high\)",
                 id="crop_ratio high first"),
    pytest.param({"blur_sigma": [2.0, 0.1]}, r"'blur_sigma' must be a list of 2 numbers at least 0 \(low, high\)",
                 id="blur_sigma high first"),
    pytest.param({"flip": 1.5}, r"'flip' must be a number in \[0, 1\], got 1.5", id="flip above 1"),
    pytest.param({"jitter_p": -0.1}, r"'jitter_p' must be a number in \[0, 1\]", id="jitter_p below 0"),
    pytest.param({"grayscale": 2}, r"'grayscale' must be a number in \[0, 1\]", id="grayscale above 1"),
    pytest.param({"blur": 1.01}, r"'blur' must be a number in \[0, 1\]", id="blur above 1"),
    pytest.param({"jitter": [0.4, -0.4, 0.4, 0.1]}, r"'jitter' must be a list of 4 numbers at least 0",
                 id="a negative jitter strength"),
])
def test_augment_overrides_outside_their_ranges_are_refused(overrides, match):
    """Probabilities above 1 and (low, high) pairs given high first are usage errors, not silently odd views
    (a flip probability of 1.5 flips every image; a reversed crop scale draws areas outside it)."""
    with pytest.raises(UsageError, match=match):
        get_preset("simclr", **overrides)


def test_augment_overrides_at_their_bounds_are_kept():
    """The bounds themselves are allowed: equal ends of a pair, probabilities 0 and 1."""
    cfg = get_preset("simclr", crop_scale=[0.3, 0.3], crop_ratio=[1, 1], flip=1, grayscale=0, blur=1.0)
    assert (cfg.crop_scale, cfg.crop_ratio, cfg.flip, cfg.grayscale, cfg.blur) == ((0.3, 0.3), (1, 1), 1, 0, 1.0)


def test_the_largest_image_size_is_accepted():
    """``image_size`` may be MAX_IMAGE_SIZE itself (the check refuses only larger ones)."""
    from harness.execution.validate import MAX_IMAGE_SIZE

    assert make_suite(["simclr"], image_size=MAX_IMAGE_SIZE).image_size == MAX_IMAGE_SIZE


@pytest.mark.parametrize("patch,match", [
    ({"methods": ["nope"]}, "unknown method 'nope'"),
    ({"datasets": ["imagenet22k"]}, "unknown dataset 'imagenet22k'"),
    ({"protocols": {"telepathy": {}}}, "unknown protocol 'telepathy'"),
    ({"budget": {"epochs": -3}}, "must be a positive number"),
    ({"seeds": [-1]}, r"integers in \[0, 2147483648\)"),
    ({"colour": "blue"}, "unknown key"),
    ({"methods": [{"name": "simclr", "config": {"temprature": 0.2}}]}, "unknown config key 'temprature'"),
    ({"methods": [{"name": "moco", "protocols": {"lbfgs": {}}}]}, "sets protocol \\['lbfgs'\\] that the suite does not run"),
    ({"methods": [{"name": "moco", "protocols": {"knn": {"temprature": 0.07}}}]}, "unknown parameter \\['temprature'\\]"),
    ({"protocols": {"knn": {"kk": 3}}}, "unknown parameter"),
    ({"val_fraction": 1}, r"val_fraction must be in \[0, 1\), got 1"),  # nothing left to train on
    ({"seeds": [0, 1, 0]}, "'seeds' lists 0 more than once"),  # one run counted as two seeds
    ({"budget": ["steps=2", {"steps": 2}]}, "'budget' lists steps=2 more than once"),
    ({"methods": ["simclr", {"name": "moco", "as": "simclr"}]}, "method row \\['simclr'\\] appears twice"),
    ({"methods": [{"name": "simclr", "dataset_config": {"digits": {"temprature": 0.2}}}]},
     "unknown config key 'temprature'"),  # checked before training, as the method's own config is
])
def test_suite_validation(patch, match):
    base = {"methods": ["simclr"], "seeds": [0], "budget": "epochs=1", "protocols": {"knn": {}}}
    base.update(patch)
    methods = base.pop("methods")
    with pytest.raises(UsageError, match=match):
        make_suite(methods, **{k: v for k, v in base.items()})


def test_store_is_atomic_and_ids_stable(tmp_path):
    spec = {"b": 1, "a": [1, 2]}
    assert run_id(spec) == run_id({"a": [1, 2], "b": 1})
    store = ResultStore(tmp_path, "s")
    store.write({"run_id": "abc", "x": 1})
    assert json.loads(store.record_path("abc").read_text()) == {"run_id": "abc", "x": 1}
    assert [p.name for p in store.dir.iterdir()] == ["abc.json"]
    lock = store.lock("abc")
    assert lock.acquire() and not store.lock("abc").acquire()
    lock.release()
    assert store.lock("abc").acquire()


def test_train_benchmark_table(tmp_path):
    from harness.bench.train import train_benchmarks

    with pytest.raises(UsageError, match="unknown training method 'pixels'"):  # it does not train: nothing to time
        train_benchmarks(steps=2, device="cpu", methods=["simclr", "pixels"], data_dir=tmp_path)
    df = train_benchmarks(steps=2, device="cpu", methods=["simclr"], data_dir=tmp_path, loader_workers=1)
    assert df["method"].tolist() == ["simclr"]
    row = df.iloc[0]
    assert row["views"] == 2 and row["images/s"] > 0 and row["ratio"] == pytest.approx(row["images/s"] / row["floor images/s"], rel=1e-2)
    # the per-image DataLoader path (one worker process), against the same floor
    assert row["loader images/s"] > 0
    assert row["loader ratio"] == pytest.approx(row["loader images/s"] / row["floor images/s"], rel=1e-2)


def test_methods_selects_a_label_alone_and_a_method_name_by_every_row():
    """``--methods npid_cld`` on cifar10-instance is the npid_cld row, not also the row ``npid``, which runs
    method npid_cld with cld_weight 0 (the old rule, label or method name, ran both: the GPU runbook would
    have spent its minutes on the baseline, the suite's first row). A name that is no row's label selects
    every row of that method."""
    from harness.cli import select_methods
    from harness.execution.suite import load_suite

    suite = load_suite("cifar10-instance")
    pick = lambda *names: [(e.label, e.name) for e in select_methods(suite, list(names))]  # noqa: E731
    assert pick("npid_cld") == [("npid_cld", "npid_cld")]
    assert pick("npid") == [("npid", "npid_cld")]
    assert pick("npid (lemniscate)", "moco_cld") == [("moco_cld", "moco_cld"), ("npid (lemniscate)", "npid")]  # suite order
    rule = load_suite("cifar10-cpu-rule")  # rows cpu-sela and paper-sela, both method sela
    assert [e.label for e in select_methods(rule, ["sela", "random"])] == ["cpu-sela", "paper-sela", "random"]
    with pytest.raises(UsageError, match="'nipd'"):
        select_methods(suite, ["nipd"])


def _toy_data(sizes=(10, 16, 27, 40), unlabeled=20, name="toy") -> "ImageData":
    """Train part: ``sizes[c]`` images of class c, then ``unlabeled`` unlabeled ones (label 0, as STL-10 stores
    them); test part: 2 images per class. Pixels are the sample's index, so every image differs."""
    from harness.data.datasets import ImageData

    labels = np.concatenate([np.repeat(np.arange(len(sizes)), sizes), np.zeros(unlabeled, np.int64),
                             np.repeat(np.arange(len(sizes)), 2)])
    n_train = sum(sizes) + unlabeled
    is_labeled = np.ones(len(labels), bool)
    is_labeled[sum(sizes):n_train] = False
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1).expand(
        -1, 1, 2, 2).contiguous()
    images[:, 0, 0, 0] = torch.arange(len(labels)) // 256
    return ImageData(name, images, labels, None, np.arange(len(labels)) < n_train, tuple("abcd"[:len(sizes)]),
                     (0.5,), (0.25,), is_labeled=is_labeled)


def test_manifest_is_stratified_reproducible_and_keeps_unlabeled_and_test_out_of_val():
    """Classes of 10, 16, 27 and 40 labeled training images give round(0.1 n) = 1, 2, 3, 4 validation images each
    (a floor would give 1, 1, 2, 4; one draw over all classes other counts); the 20 unlabeled images stay in train;
    ``train_full`` is train + val without a test image; two calls give the same lists. Catches an unstratified or
    unseeded split, unlabeled samples in val and a test image in the kNN bank (train_full)."""
    data = _toy_data()
    m = make_manifest(data)
    assert np.bincount(data.labels[m.val], minlength=4).tolist() == [1, 2, 3, 4]
    assert data.is_labeled[m.val].all() and set(np.flatnonzero(~data.is_labeled)) <= set(m.train)
    assert not set(m.train) & set(m.val) and not (set(m.train) | set(m.val)) & set(m.test)
    assert m.split("train_full").tolist() == sorted(np.concatenate([m.train, m.val]).tolist())
    assert data.is_train[m.split("train_full")].all()
    again = make_manifest(_toy_data())
    assert again.sha256 == m.sha256 and all(np.array_equal(getattr(m, k), getattr(again, k)) for k in ("train", "val"))


def test_data_fingerprint_covers_the_labels():
    """Relabelling one image changes the data fingerprint and so the manifest's hash: results on other labels never
    share a leaderboard cell. Catches a fingerprint of the pixels alone."""
    data, relabelled = _toy_data(), _toy_data()
    relabelled.labels[0] = 3
    assert relabelled.fingerprint() != data.fingerprint()
    assert make_manifest(relabelled).sha256 != make_manifest(data).sha256


def test_stored_manifests_are_per_data_and_val_fraction_and_verified(tmp_path):
    """One directory of manifests: changed pixels under the same dataset name, or another val fraction, get their
    own manifest (the changed data's fingerprint, 2 / 3 / 5 / 8 val images at 0.2), never the stored one of other
    data; a stored manifest whose lists were edited (its hash not) is refused as corrupted. Catches a manifest
    file named without the fingerprint or the fraction, and a manifest read without checking its hash."""
    from harness.errors import EnvironmentFailure

    data = _toy_data()
    first = load_or_make_manifest(data, tmp_path)
    changed = _toy_data()
    changed.images[0, 0, 1, 1] ^= 1
    other = load_or_make_manifest(changed, tmp_path)
    assert other.data_fingerprint == changed.fingerprint() != first.data_fingerprint
    wider = load_or_make_manifest(data, tmp_path, val_fraction=0.2)
    assert np.bincount(data.labels[wider.val], minlength=4).tolist() == [2, 3, 5, 8]
    assert load_or_make_manifest(data, tmp_path).sha256 == first.sha256
    (path,) = [p for p in tmp_path.glob("toy-*.json") if "val0.1" in p.name and data.fingerprint()[:16] in p.name]
    stored = json.loads(path.read_text())
    stored["val"].append(stored["train"].pop())  # a train image moved into val, hash left as it was
    path.write_text(json.dumps(stored))
    with pytest.raises(EnvironmentFailure, match="corrupted"):
        load_or_make_manifest(data, tmp_path)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["train"].append(m["test"][0]), "in both train and test"),
    (lambda m: m["val"].append(m["train"][0]), "in both train and val"),
    (lambda m: m["test"].append(m["test"][0]), "test holds an index twice"),
    (lambda m: m["train"].append(10_000), "train holds an index outside"),
    (lambda m: m["train"].append(121), r"train holds an index outside 0\.\.120"),  # _toy_data has 121 images
    (lambda m: m["val"].append(-1), r"val holds an index outside 0\.\.120"),
    (lambda m: m["val"].append(m["test"][0]), "in both val and test"),
])
def test_a_stored_manifest_whose_splits_overlap_is_refused_even_with_a_valid_hash(tmp_path, edit, problem):
    """A manifest written by a writer that got the splits wrong (its hash computed over the wrong lists) is
    refused with one line naming the file and the problem, before any run uses it: a test image in train
    or val would leak into what is evaluated. Catches a loader that trusts any manifest whose hash matches,
    the upper bound checked with '>' (index 121 of 121 images passes, then indexes past the data), negative
    indices passing (numpy reads them from the end) and val/test overlap unchecked."""
    from harness.data.datasets import _manifest_hash
    from harness.errors import EnvironmentFailure

    data = _toy_data()
    load_or_make_manifest(data, tmp_path)
    (path,) = tmp_path.glob("toy-*.json")
    stored = json.loads(path.read_text())
    edit(stored)
    stored["sha256"] = _manifest_hash({k: stored[k] for k in ("dataset", "data", "train", "val", "test")})
    path.write_text(json.dumps(stored))
    with pytest.raises(EnvironmentFailure, match=f"invalid .*{problem}"):
        load_or_make_manifest(data, tmp_path)


def test_digits_test_part_is_a_fifth_of_each_class():
    """scikit-learn's digits has no split: the harness takes round(0.2 n) of each class as test, 359 of 1,797."""
    data = load_dataset("digits", "unused")
    for c in range(10):
        n = int((data.labels == c).sum())
        assert int((~data.is_train & (data.labels == c)).sum()) == round(0.2 * n)
    assert int((~data.is_train).sum()) == 359


def test_encoder_checkpoint_loader_on_known_inputs(tmp_path):
    """``load_encoder`` reads a backbone's weights under 'state_dict', 'model' or 'encoder', strips stacked training
    prefixes (DDP's 'module.' around MoCo's 'encoder_q.'), drops a classifier 'fc.' head, and refuses with a
    UsageError non-finite weights, a mis-shaped weight and entries that are not tensors. Catches each of those
    rules dropped (a mis-shaped weight would end in torch's RuntimeError instead of one line)."""
    from harness.engine.checkpoint import load_encoder
    from harness.models.backbones import create_backbone

    state = create_backbone("small_cnn", 1).state_dict()
    key = "features.0.weight"

    def load(obj):
        path = tmp_path / "c.pt"
        torch.save(obj, path)
        return load_encoder(path, "small_cnn", 1)

    nested = {"model": {f"module.encoder_q.{k}": v for k, v in state.items()}}
    assert torch.equal(load(nested).state_dict()[key], state[key])
    assert torch.equal(load({"encoder": {**state, "fc.weight": torch.zeros(10, 64)}}).state_dict()[key], state[key])
    with pytest.raises(UsageError, match="finite"):
        load({**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(UsageError, match="mis-shaped"):
        load({**state, key: state[key][:1]})
    with pytest.raises(UsageError, match="no state_dict of tensors"):
        load({"epoch": 3, "lr": 0.1})


def test_the_digits_manifest_made_now_is_the_one_the_committed_records_were_evaluated_on(tmp_path):
    """Every committed record of a digits suite names the split manifest it was trained and evaluated on; a fresh
    clone must make that same manifest (same data, same seeded, rounded, per-class validation draw), or its
    leaderboard would mix runs of other splits with the committed ones. Catches an unseeded or unshuffled
    validation draw, a floor for the rounding and any other change of the lists."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results"
    committed = {json.loads(p.read_text())["split_sha256"] for p in results.glob("*/*.json")
                 if json.loads(p.read_text())["spec"]["dataset"] == "digits"}
    assert len(committed) == 1, committed
    data = load_dataset("digits", tmp_path)
    assert make_manifest(data).sha256 == load_or_make_manifest(data, tmp_path).sha256 == committed.pop()


def test_a_dataset_config_overrides_the_method_config_on_its_dataset_only():
    """A method's ``dataset_config`` for digits wins over its ``config`` there and nowhere else; the spec's
    backbone is the row's own, else the suite's. Catches the two merged the other way round (the per-dataset
    lr silently ignored) and a row's backbone dropped."""
    from harness.execution.runner import plan

    suite = make_suite([{"name": "simclr", "config": {"lr": 0.1, "batch_size": 64},
                         "dataset_config": {"digits": {"lr": 0.2}}},
                        {"name": "moco", "backbone": "resnet18_cifar"}], datasets=["digits", "mnist"])
    spec = {(job.entry.label, job.dataset): job.spec for job in plan(suite)}
    assert spec["simclr", "digits"]["config"]["lr"] == 0.2 and spec["simclr", "mnist"]["config"]["lr"] == 0.1
    assert spec["simclr", "digits"]["config"]["batch_size"] == spec["simclr", "mnist"]["config"]["batch_size"] == 64
    assert spec["simclr", "digits"]["backbone"] == "small_cnn" and spec["moco", "mnist"]["backbone"] == "resnet18_cifar"


def test_plan_is_the_whole_grid_with_one_run_id_per_cell():
    """2 datasets x 2 methods x 2 seeds x 2 budgets: 16 jobs, nested in that order, 16 different run ids; the
    split settings (val fraction, train split, determinism) each change a run's id. Catches a dimension of the
    grid dropped and a setting that changes results left out of the spec that names the record."""
    from harness.execution.runner import plan

    suite = make_suite(["simclr", "moco"], seeds=[0, 1], budget=["steps=2", "epochs=1"], datasets=["digits", "mnist"])
    jobs = plan(suite)
    assert [(j.dataset, j.entry.label, j.seed, str(j.budget)) for j in jobs][:3] == [
        ("digits", "simclr", 0, "steps=2"), ("digits", "simclr", 0, "epochs=1"), ("digits", "simclr", 1, "steps=2")]
    assert len(jobs) == len({j.run_id for j in jobs}) == 16
    base = plan(make_suite(["simclr"]))[0].run_id
    for change in ({"val_fraction": 0.2}, {"train_split": "train_full"}, {"deterministic": False}):
        assert plan(make_suite(["simclr"], **change))[0].run_id != base, change


def test_a_runner_loads_each_val_fraction_of_a_dataset_with_its_own_manifest(tmp_path):
    """Two suites on digits with val fractions 0.1 and 0.2 in one process get 143 and 287 validation images,
    and the same fraction asked twice is the same (cached) manifest. Catches a dataset cache keyed by name alone,
    which would hand the second suite the first one's splits."""
    from harness.execution.runner import Runner

    runner = Runner(tmp_path / "r", tmp_path / "d", device="cpu", quiet=True)
    (_, tenth), (_, fifth) = runner.dataset("digits", 0.1), runner.dataset("digits", 0.2)
    assert (len(tenth.val), len(fifth.val)) == (143, 287) and tenth.sha256 != fifth.sha256
    assert runner.dataset("digits", 0.1)[1] is tenth


@pytest.mark.parametrize("split,size", [("train", 1295), ("train_full", 1438), ("all", 1797)])
def test_train_split_is_the_set_of_images_a_run_trains_on(tmp_path, split, size):
    """``train_split`` of a suite picks the indices the adapter trains on: digits' 1,438 training images less
    143 for validation, all 1,438, or all 1,797. Catches a runner that always trains on 'train'."""
    from harness.execution.runner import Runner, plan

    (job,) = plan(make_suite(["simclr"], train_split=split))
    runner = Runner(tmp_path / "r", tmp_path / "d", device="cpu", quiet=True)
    data, manifest = runner.dataset("digits", job.spec["val_fraction"])
    method, train_idx, _ = runner.build(job, data, manifest)
    assert len(train_idx) == method.info.num_samples == size
    assert train_idx.tolist() == manifest.split(split).tolist()


@pytest.mark.parametrize("method,level,classes", [("supervised", "labels", 10), ("supcon", "coarse_labels", 2)])
def test_a_labelled_method_trains_on_the_labels_of_its_level(tmp_path, monkeypatch, method, level, classes):
    """On digits, a fine-label method's classifier has 10 outputs and its batches carry the images' digits; a
    coarse-label one has 2 outputs (0-4 vs 5-9) and its batches carry the coarse labels. Catches a coarse method
    sized for, or handed, the fine labels."""
    from harness.execution.runner import Runner, plan
    from methods import METHODS

    cls, seen = METHODS.get(method), []
    real_step = cls.training_step

    def recording_step(self, batch):
        seen.append((self.classifier.out_features, batch.index.tolist(), batch.labels.tolist()))
        return real_step(self, batch)

    monkeypatch.setattr(cls, "training_step", recording_step)
    (job,) = plan(make_suite([method], budget="steps=2", protocols={"knn": {"k": 5}}))
    runner = Runner(tmp_path / "r", tmp_path / "d", device="cpu", quiet=True, log=lambda s: None)
    assert runner.run([job])[0]["status"] == "ok" and len(seen) == 2
    data, manifest = runner.dataset("digits", job.spec["val_fraction"])
    for outputs, index, labels in seen:
        assert outputs == classes and labels == getattr(data, level)[manifest.train[index]].tolist()


def test_a_yaml_merge_key_gives_defaults_that_a_suite_may_override(tmp_path):
    """``<<: *defaults`` merges a shared mapping and a key beside it overrides the merged one (YAML's rule), while
    a key written twice by hand is an error. Catches the duplicate-key check applied to merged keys."""
    from harness.execution.suite import load_suite

    path = tmp_path / "merged.yaml"
    path.write_text("datasets: [digits]\nseeds: [0]\nbudget: {steps: 1}\nmethods: [random]\n"
                    "protocols:\n  knn: &knn {k: 5, temperature: 0.1}\n  val_knn:\n    <<: *knn\n    k: 7\n")
    suite = load_suite(str(path))
    assert suite.protocols["val_knn"]["k"] == 7 and suite.protocols["val_knn"]["temperature"] == 0.1
    path.write_text(path.read_text() + "seeds: [1]\n")
    with pytest.raises(UsageError, match="key 'seeds' appears twice"):
        load_suite(str(path))


def test_knn_k_is_checked_against_the_train_and_val_images_it_votes_from(tmp_path):
    """kNN votes from train + val (1,438 digits at val fraction 0.1): k 1,438 passes the check before training
    and 1,439 is refused, naming that split, when digits has runs to do; a dataset left out of the check (its runs
    all stored) is not even loaded. Catches k checked against train alone (1,295, which would refuse a valid k), a
    check that skips the datasets it is given and one that loads the data of a fully stored suite."""
    from harness.execution.runner import Runner
    from harness.execution.suite import check_against_data

    runner = Runner(tmp_path / "r", tmp_path / "d", device="cpu", quiet=True)
    check_against_data(make_suite(["random"], protocols={"knn": {"k": 1438}}), runner.dataset)
    with pytest.raises(UsageError, match=r"knn k=1439 is larger than the train_full split of digits \(1438 samples\)"):
        check_against_data(make_suite(["random"], protocols={"knn": {"k": 1439}}), runner.dataset, datasets={"digits"})

    def no_loading(name, val_fraction):
        raise AssertionError(f"{name} loaded")

    check_against_data(make_suite(["random"], protocols={"knn": {"k": 1439}}), no_loading, datasets=set())


def test_counts_take_the_noun_in_the_numbers_form(tmp_path, capsys):
    """A one-run suite's first line says "1 run (1 method x 1 dataset x 1 seed x 1 budget)", not "1 runs"."""
    import yaml

    from harness.cli import count, main

    assert [count(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    assert count(1, "second copy", "second copies") == "1 second copy" and count(3, "copy", "copies") == "3 copies"
    suite = tmp_path / "one.yaml"
    suite.write_text(yaml.safe_dump({"name": "one", "datasets": ["digits"], "methods": ["random"], "seeds": [0],
                                     "budget": "steps=1", "protocols": {"knn": {"k": 5}}}))
    assert main(["run", str(suite), "--quiet", "--data-dir", str(tmp_path / "d"), "--results-dir",
                 str(tmp_path / "r")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "suite one: 1 run (1 method x 1 dataset x 1 seed x 1 budget): 1 to train", first


@pytest.mark.parametrize("patch,match", [
    ({"methods": []}, "'methods' must be 'all' or a non-empty list"),
    ({"methods": [{"name": "simclr", "lr": 0.1}]}, r"unknown key \['lr'\] in method entry"),
    ({"methods": [{"name": "simclr", "backbone": "resnet9000"}]}, "unknown backbone 'resnet9000'"),
    ({"methods": [{"name": "simclr", "as": "   "}]}, "'as' of method 'simclr' must be a non-empty string"),
    ({"scale": "gpu"}, r"unknown scale 'gpu' \(valid: cpu, paper\)"),
    ({"datasets": ["digits", "digits"]}, "'datasets' lists digits more than once"),
    ({"protocols": {}}, "'protocols' must be a non-empty mapping"),
    ({"train_split": "validation"}, r"unknown train_split 'validation' \(valid: train, train_full, all\)"),
    ({"tables": {"extra": []}}, "'tables' must map a table name to a non-empty list of metric prefixes"),
    ({"protocols": {"clustering": {"n_init": 0}}},
     "parameter 'n_init' of protocol 'clustering' must be a positive integer, got 0"),
])
def test_suite_shapes_that_would_go_wrong_later_are_refused_when_the_suite_is_read(patch, match):
    """Each of these is refused by ``parse_suite`` with one line naming it, before anything trains: no method rows, a
    key a method entry does not have (``lr`` beside ``name`` instead of under ``config``), a row's unknown backbone, a
    blank row label, an unknown scale, a dataset listed twice, no protocols, an unknown train split, a table with no
    metric prefix, and k-means restarts of 0. Catches: each of those checks dropped (the suite then plans nothing,
    silently ignores the key, fails at the row's turn after others trained, or twice trains one run)."""
    base = {"methods": ["simclr"], "seeds": [0], "budget": "epochs=1", "protocols": {"knn": {}}}
    base.update(patch)
    methods = base.pop("methods")
    with pytest.raises(UsageError, match=match):
        make_suite(methods, **base)


def test_suite_values_at_the_edge_of_the_valid_ones_are_accepted(tmp_path):
    """A name of exactly 100 characters (the limit), a protocol written with no parameters (``knn:`` in YAML is
    null: the protocol's defaults, k 200 and temperature 0.1 for kNN), and a table claiming the metrics prefix
    ``knn`` without its slash are all valid. Catches: the name limit made exclusive, a null parameter mapping
    refused, and a prefix matched only where it ends in the protocol's '/'."""
    from harness.execution.suite import load_suite

    assert make_suite(["random"], name="x" * 100).name == "x" * 100
    path = tmp_path / "null.yaml"
    path.write_text("datasets: [digits]\nseeds: [0]\nbudget: {steps: 1}\nmethods: [random]\n"
                    "protocols:\n  knn:\n  clustering: {}\ntables:\n  neighbours: [knn]\n")
    suite = load_suite(str(path))
    assert suite.protocols["knn"] == {"k": 200, "temperature": 0.1, "backend": "auto", "grid_k": [10, 20, 100, 200],
                                      "grid_temperature": [0.07, 0.1, 0.5]}
    assert suite.tables == {"neighbours": ["knn"]}


def test_a_suite_path_ending_in_yml_that_is_not_there_is_named_as_a_missing_file(tmp_path):
    """``run mine.yml`` for a file that does not exist says the file does not exist (as for ``.yaml``), not that there
    is no shipped suite called 'mine.yml'. Catches: ``.yml`` paths taken for shipped suite names."""
    from harness.execution.suite import load_suite

    for name in ("mine.yml", "mine.yaml"):
        with pytest.raises(UsageError, match=f"suite file '.*{name}' does not exist"):
            load_suite(str(tmp_path / name))


def test_coarse_label_readers_and_a_rows_own_k_are_checked_against_the_data(tmp_path):
    """On digits with its coarse labels taken away, protocol coarse_to_fine and method supcon (which trains on the
    coarse level) are refused before training, naming the reader, and a suite reading none passes. A row's own kNN
    k wins over the suite's in the check: the row's 1,439 is refused against the 1,438 train+val images while the
    suite's 5 would pass, and the row's 5 passes where the suite's 1,439 would not. Catches: coarse_to_fine or a
    coarse-level method not counted as reading coarse labels (the run failing after training), and the suite's k
    checked instead of the row's."""
    from harness.data.datasets import load_split_data
    from harness.execution.suite import check_against_data

    data, manifest = load_split_data("digits", tmp_path, 0.1)
    no_coarse = dataclasses.replace(data, coarse_labels=None)

    def without_coarse(name, val_fraction):
        return no_coarse, manifest

    with pytest.raises(UsageError, match="random on digits: protocol 'coarse_to_fine' reads coarse labels"):
        check_against_data(make_suite(["random"], protocols={"knn": {"k": 5}, "coarse_to_fine": {"k": 5}}),
                           without_coarse)
    with pytest.raises(UsageError, match="supcon on digits: method 'supcon' reads coarse labels"):
        check_against_data(make_suite(["supcon"], protocols={"knn": {"k": 5}}), without_coarse)
    check_against_data(make_suite(["random", "simclr"], protocols={"knn": {"k": 5}}), without_coarse)

    def whole(name, val_fraction):
        return data, manifest

    with pytest.raises(UsageError, match=r"random on digits: knn k=1439 is larger than the train_full split"):
        check_against_data(make_suite([{"name": "random", "protocols": {"knn": {"k": 1439}}}],
                                      protocols={"knn": {"k": 5}}), whole)
    check_against_data(make_suite([{"name": "random", "protocols": {"knn": {"k": 5}}}],
                                  protocols={"knn": {"k": 1439}}), whole)


def test_numeric_bounds_are_inclusive_and_a_numeric_string_for_a_float_is_a_float():
    """A momentum-encoder ema of exactly 1.0 is inside its range [0, 1]; the largest seed is 2**31 - 1 and 2**31 is
    refused; ``--image-size 4096`` is the largest accepted; a positive number must be above 0; the string '1' for a
    float key is the float 1.0 (its run id is that of 1.0, not of the integer 1). Catches: a range's upper bound
    made exclusive, the seed limit off by one, the image-size limit exclusive, 0 taken as positive, and a numeric
    string for a float left an int."""
    import argparse

    from harness.execution.validate import coerce_like, image_size, is_seed, number_in_range, positive_number

    assert make_suite([{"name": "moco", "config": {"ema": 1.0}}]).methods[0].config == {"ema": 1.0}
    assert number_in_range(1.0, 0.0, 1.0, "ema") == 1.0 and number_in_range(0.0, 0.0, 1.0, "ema") == 0.0
    assert is_seed(2 ** 31 - 1) and not is_seed(2 ** 31)
    assert image_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="at most 4096"):
        image_size("4097")
    assert positive_number("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive number, got '0'"):
        positive_number("0")
    value = coerce_like("1", 0.1, "lr")
    assert value == 1.0 and type(value) is float


def _png(path, pixels) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def test_an_image_folder_with_an_image_of_another_width_is_one_line(tmp_path):
    """An image 10 pixels wide among 8 x 8 ones (the same height) stops with one line naming both sizes. Catches: a
    size check comparing heights only (numpy's stack then fails with a traceback)."""
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "0.png", np.zeros((8, 8, 3)))
    _png(tmp_path / "test" / "b" / "1.png", np.zeros((8, 10, 3)))
    with pytest.raises(UsageError, match=r"1.png is 10x8 pixels but .*0.png is 8x8"):
        load_image_folder(tmp_path, "toy")


def test_an_image_folders_normalisation_is_the_mean_and_std_of_all_its_pixels(tmp_path):
    """Four 2 x 2 images whose left column is 0 and right column 200 in every channel: each channel's mean is
    100/255 and its std (unbiased, over the 16 values) (100/255) sqrt(16/15). Catches: a std taken per column
    (0 here) or over some other axes."""
    column = np.array([[0, 200], [0, 200]])
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(tmp_path / split / cls / "0.png", np.repeat(column[:, :, None], 3, axis=2))
    data = load_image_folder(tmp_path, "toy")
    assert data.mean == pytest.approx((100 / 255,) * 3, rel=1e-6)
    assert data.std == pytest.approx((100 / 255 * (16 / 15) ** 0.5,) * 3, rel=1e-5)


def test_an_image_folder_of_the_cifar10_classes_gets_vehicles_and_animals_as_coarse_labels(tmp_path):
    """A tree whose class folders are CIFAR-10's ten classes has CIFAR-10's coarse labels (0 for airplane, automobile,
    ship and truck, 1 for the animals), so coarse_to_fine runs on it; a tree with other class names has none.
    Catches: the coarse labels of a CIFAR-10 tree dropped (coarse_to_fine then refused on cifar10-jpeg)."""
    from harness.data.datasets import CIFAR10_CLASSES

    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            _png(tmp_path / "cifar" / split / cls / "0.png", np.zeros((2, 2, 3)))
        for cls in ("a", "b"):
            _png(tmp_path / "other" / split / cls / "0.png", np.zeros((2, 2, 3)))
    data = load_image_folder(tmp_path / "cifar", "c")
    assert data.labels.tolist() == list(range(10)) * 2
    assert data.coarse_labels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0] * 2
    assert load_image_folder(tmp_path / "other", "o").coarse_labels is None


def test_an_image_folder_path_may_hold_a_colon():
    """``imagefolder:/data/run:2/tree`` names the folder ``/data/run:2/tree``; only the first colon separates the
    prefix. Catches: the path cut at its second colon."""
    from pathlib import Path

    from harness.data.datasets import parse_dataset_name

    assert parse_dataset_name("imagefolder:/data/run:2/tree") == ("imagefolder", Path("/data/run:2/tree"))
    assert parse_dataset_name("digits") == ("digits", None)


@pytest.mark.parametrize("protocols,match", [
    ({"knn": {"grid_k": [10, 0]}}, "value 1 of parameter 'grid_k' of protocol 'knn' must be a positive integer, "
                                   "got 0"),
    ({"knn": {"grid_temperature": [0.1, 0]}}, "value 1 of parameter 'grid_temperature' of protocol 'knn' must be "
                                              "positive, got 0"),
    ({"lbfgs": {"l2_grid": []}}, r"parameter 'l2_grid' of protocol 'lbfgs' must be a non-empty list, got \[\]"),
    ({"coarse_to_fine": {"l2_grid": [1e-3, -1]}}, "value 1 of parameter 'l2_grid' of protocol 'coarse_to_fine' "
                                                  "must be positive, got -1"),
    ({"clustering": {"tol": -1e-4}}, "parameter 'tol' of protocol 'clustering' must be at least 0, got -0.0001"),
    ({"sgd": {"momentum": -0.5}}, r"parameter 'momentum' of protocol 'sgd' must be in \[0, 1\], got -0.5"),
    ({"sgd": {"weight_decay": -1}}, "parameter 'weight_decay' of protocol 'sgd' must be at least 0, got -1"),
    ({"val_knn": {"k": 0}}, "parameter 'k' of protocol 'val_knn' must be a positive integer"),
    ({"clustering": {"k": [10, 0]}}, "parameter 'k' of protocol 'clustering' must be a positive integer"),
])
def test_protocol_parameters_evaluation_refuses_are_refused_when_the_suite_is_read(protocols, match):
    """Each of these made the protocol raise only when the run was evaluated, after its training (exit 1, reported as
    the run's own error): a kNN grid point k 0 or temperature 0, no L2 strength or a negative one to sweep, a negative
    k-means tolerance, a negative probe momentum or weight decay (torch's SGD refuses them), val_knn's k 0 (clamped
    to its split, never checked against it). Now the suite is refused when read, in one line. The same parameters at
    their least valid values are accepted. Catches: a protocol parameter checked only by the protocol."""
    with pytest.raises(UsageError, match=match):
        make_suite(["simclr"], protocols=protocols)
    suite = make_suite(["simclr"], protocols={"knn": {"grid_k": [], "grid_temperature": [1e-3]}, "lbfgs": {
        "l2_grid": [1e-6]}, "clustering": {"tol": 0, "k": [2]}, "sgd": {"momentum": 0, "weight_decay": 0},
        "val_knn": {"k": 1}})
    assert suite.protocols["clustering"]["tol"] == 0 and suite.protocols["sgd"]["momentum"] == 0
