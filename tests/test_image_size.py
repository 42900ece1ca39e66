"""The suite option ``image_size``: every view the encoder sees, in training and in evaluation, has that side.

CC and CD train ResNet-34 at 224 px on 32 px CIFAR (CC config/config.yaml ``image_size``, CD
dataset.py ``get_transforms``) and resize their test images with ``Resize((224, 224))``. Here a
suite on 8x8 digits at ``image_size: 48`` stands in for it.
"""
from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms.functional import to_pil_image

from conftest import make_suite
from harness.data.augment import Augmenter, get_preset, resize
from harness.models.backbones import SmallCNN
from harness.errors import UsageError
from harness.data.pil_augment import PerImageAugmenter, training_feed
from harness.execution.runner import Runner, plan
from harness.engine.seeding import epoch_order
from harness.execution.suite import load_suite
from harness.engine.train import PlainLoader

SIZE = 48
FAST = {"knn": {"k": 10}}
MEAN, STD = (0.5,), (0.25,)


def _record_backbone_inputs(monkeypatch) -> list[tuple[bool, tuple[int, int]]]:
    """Give the runner's jobs a narrow SmallCNN (width 4: 48 px stays fast on a busy CPU) that logs
    (training mode, input H x W) of every forward call."""
    import harness.execution.runner as runner

    seen: list[tuple[bool, tuple[int, int]]] = []

    def logged(name: str, in_channels: int):
        backbone = SmallCNN(in_channels, width=4)
        backbone.register_forward_pre_hook(lambda module, args: seen.append((module.training,
                                                                             tuple(args[0].shape[-2:]))))
        return backbone

    monkeypatch.setattr(runner, "create_backbone", logged)
    return seen


@pytest.mark.parametrize("pipeline", ["batched", "per_image"])
def test_backbone_sees_image_size_in_training_and_evaluation(tmp_path, monkeypatch, one_torch_thread, pipeline):
    """Catches a suite option that does not reach the training views (the Augmenter, or the
    per-image feed, built without out_size: 8x8 inputs in training) or the evaluation pass
    (RunContext without image_size: 8x8 inputs in eval mode)."""
    seen = _record_backbone_inputs(monkeypatch)
    suite = make_suite(["simclr"], budget="steps=3", protocols=FAST, image_size=SIZE)
    runner = Runner(tmp_path / "results", tmp_path / "data", device="cpu", quiet=True, log=lambda s: None,
                    pipeline=pipeline, loader_workers=0)
    (record,) = runner.run(plan(suite))
    assert record["status"] == "ok" and record["budget"]["used"]["steps"] == 3
    assert record["spec"]["image_size"] == SIZE
    training = {shape for mode, shape in seen if mode}
    evaluation = {shape for mode, shape in seen if not mode}
    assert training == {(SIZE, SIZE)} and evaluation == {(SIZE, SIZE)}


def test_training_hooks_plain_batches_are_resized():
    """The unaugmented batches the training hooks read (SeLa's pseudo-labels, memory refreshes) have
    the views' size; catches PlainLoader normalising the stored 8x8 images without resizing."""
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    batches = list(PlainLoader(images, Augmenter(get_preset("mild"), MEAN, STD, out_size=SIZE), batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 1, SIZE, SIZE), (4, 1, SIZE, SIZE), (2, 1, SIZE, SIZE)]


@pytest.mark.parametrize("size", [SIZE, 5])
def test_plain_view_is_torchvision_resize_of_the_pil_image(size):
    """The evaluation input equals CC's and CD's test transform ``Resize((s, s)), ToTensor()`` on the
    PIL image up to PIL's 8-bit rounding, upsampling (8 -> 48) and downsampling (8 -> 5). Catches
    nearest-neighbour or align_corners=True resampling (off by up to 0.5 upsampling) and a missing
    antialias filter (off by 0.25 downsampling)."""
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    official = T.Compose([T.Resize((size, size)), T.ToTensor()])(to_pil_image(image))
    ours = Augmenter(None, (0.0,) * 3, (1.0,) * 3, out_size=size).plain(image[None])[0]
    assert ours.shape == (3, size, size)
    assert (ours - official).abs().max() <= 1.5 / 255
    assert torch.equal(resize(official[None], size), official[None])  # already that size: untouched


@pytest.mark.parametrize("preset", ["simclr", "none"])
def test_per_image_pipeline_produces_image_size(preset):
    """Both pipelines give views of the suite's size, augmented or not, for 1- and 3-channel images;
    catches the per-image path keeping the stored size (its crop or its resize ignoring out_size)."""
    g = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        images = torch.randint(0, 256, (4, channels, 8, 8), dtype=torch.uint8)
        mean, std = (0.5,) * channels, (0.25,) * channels
        for augmenter in (Augmenter(get_preset(preset), mean, std, out_size=SIZE),
                          PerImageAugmenter(get_preset(preset), mean, std, out_size=SIZE)):
            assert augmenter(images, g).shape == (4, channels, SIZE, SIZE)


def test_training_feed_views_and_plain_batches_have_image_size():
    """The DataLoader feed of ``--pipeline per_image``: its views and its plain batches (for the
    training hooks) are resized; catches training_feed dropping out_size on either path."""
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    feed = training_feed(images, get_preset("mild"), MEAN, STD, views=2, batch_size=4, seed=0,
                         out_size=SIZE, num_workers=0)
    feed.start(0, 0)
    try:
        first = images[epoch_order(len(images), 0, 0)[:4]]
        views = [feed(first, torch.Generator()) for _ in range(2)]
    finally:
        feed.close()
    assert [tuple(v.shape) for v in views] == [(4, 1, SIZE, SIZE)] * 2
    assert feed.plain(images).shape == (8, 1, SIZE, SIZE)


def test_spec_names_image_size_only_when_set(monkeypatch):
    """A suite without image_size keeps the run id it had before the option existed; a set size is
    in the spec and changes the id. Catches make_spec writing ``image_size: None`` (or anything else
    new) into every spec, which would rename every stored record.

    The pinned id is of the shipped cifar10-invcls suite's job, computed with the code before
    ``image_size`` was added; the method config and the protocols are fixed here so that other
    changes (paper defaults, protocol parameters) do not move it.
    """
    import harness.execution.runner as runner

    (job,) = plan(load_suite("cifar10-invcls"))
    assert "image_size" not in job.spec
    from harness.execution.store import NEUTRAL_CONFIG

    # keys added since, at their neutral values (which the id leaves out)
    monkeypatch.setattr(runner, "resolve_config", lambda cls, scale, overrides: {**NEUTRAL_CONFIG, "lr": 0.48,
                                                                                 **overrides})
    suite = load_suite("cifar10-invcls")
    suite.protocols = {"knn": {"k": 200, "temperature": 0.15}}
    (job,) = plan(suite)
    assert job.run_id == "e945e3cb08351451"
    suite.image_size = SIZE
    (sized,) = plan(suite)
    assert sized.spec == {**job.spec, "image_size": SIZE} and sized.run_id != job.run_id


@pytest.mark.parametrize("bad", [0, -3, "big", 2.5, True])
def test_bad_image_size_is_a_one_line_usage_error(bad):
    """Zero, negative, non-integer and boolean sizes stop the suite before training with one line
    naming the value; catches a missing check (a crash deep in F.interpolate or a 0-px crop)."""
    with pytest.raises(UsageError) as err:
        make_suite(["simclr"], protocols=FAST, image_size=bad)
    message = str(err.value)
    assert "\n" not in message and "image_size" in message and repr(bad) in message


def test_cli_eval_resizes_to_image_size(tmp_path, monkeypatch, capsys):
    """``harness eval --image-size 16`` feeds the checkpoint's encoder 16x16 digits; catches the flag
    not reaching the RunContext (8x8 inputs)."""
    import harness.engine.checkpoint as checkpoint
    from harness.cli import main

    seen: list[tuple[int, int]] = []

    def logged(name: str, in_channels: int):
        backbone = SmallCNN(in_channels, width=4)
        backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        return backbone

    monkeypatch.setattr(checkpoint, "create_backbone", logged)
    torch.save(SmallCNN(1, width=4).state_dict(), tmp_path / "encoder.pt")
    code = main(["eval", "--checkpoint", str(tmp_path / "encoder.pt"), "--arch", "small_cnn", "--protocols", "knn",
                 "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--image-size", "16"])
    assert code == 0 and "knn/top1" in capsys.readouterr().out
    assert set(seen) == {(16, 16)}
