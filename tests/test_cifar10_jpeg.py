"""``cifar10-jpeg`` without the archive: encoded once from torchvision's CIFAR-10.

torchvision's CIFAR-10 cannot be downloaded here, so ``load_cifar10`` is replaced by generated
CIFAR-shaped data (smooth colour gradients, 3 train + 1 test image per class): what is tested is
the encoding (names, order, labels, JPEG settings, atomic tree) and the messages, not CIFAR itself.
"""
import numpy as np
import pytest
import torch

from harness.data import datasets
from harness.data.datasets import CIFAR10_CLASSES, ImageData, load_dataset
from harness.errors import UsageError

#: The first row of the archive's luminance quantisation table: PIL's default quality 75.
ARCHIVE_LUMA_ROW = [8, 6, 5, 8, 12, 20, 26, 31]


def generated_cifar(root, download) -> ImageData:
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 4)
    is_train = np.arange(40) < 30
    ramp = np.linspace(0, 1, 32)
    images = []
    for _ in labels:
        colour = rng.uniform(40, 215, size=3)
        slope = rng.uniform(-40, 40, size=3)
        images.append(colour[:, None, None] + slope[:, None, None] * (ramp[None, :, None] + ramp[None, None, :]))
    x = torch.as_tensor(np.clip(np.stack(images), 0, 255).astype(np.uint8))
    return ImageData("cifar10", x, labels, None, is_train, CIFAR10_CLASSES, (0.5,) * 3, (0.25,) * 3)


def test_tree_is_encoded_from_torchvision_cifar10_when_missing(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(datasets, "load_cifar10", generated_cifar)
    source = generated_cifar(None, False)
    data = load_dataset("cifar10-jpeg", tmp_path)
    tree = tmp_path / "cifar10-jpeg"
    assert sorted(p.name for p in (tree / "train" / "cat").iterdir()) == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert sorted(p.name for p in (tree / "test" / "cat").iterdir()) == ["0000.jpg"]
    assert not (tmp_path / "cifar10-jpeg.partial").exists()
    with Image.open(tree / "train" / "cat" / "0000.jpg") as im:
        assert list(im.quantization[0])[:8] == ARCHIVE_LUMA_ROW
    # the folder loader reads train before test and classes in order: the source's order per class
    order = np.concatenate([np.flatnonzero((source.labels == c) & part)
                            for part in (source.is_train, ~source.is_train) for c in range(10)])
    assert data.classes == CIFAR10_CLASSES
    np.testing.assert_array_equal(data.labels, source.labels[order])
    np.testing.assert_array_equal(data.is_train, source.is_train[order])
    error = (data.images.float() - source.images[torch.as_tensor(order)].float()).abs().mean()
    assert 0 < error < 3, f"JPEG round trip mean abs error {error:.2f} grey levels"


def test_a_kill_while_encoding_leaves_no_tree(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(datasets, "load_cifar10", generated_cifar)
    save, calls = Image.Image.save, []

    def save_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10-jpeg", tmp_path)
    assert not (tmp_path / "cifar10-jpeg").exists()
    monkeypatch.setattr(Image.Image, "save", save)
    assert len(load_dataset("cifar10-jpeg", tmp_path)) == 40  # the next run starts over


def test_no_tree_no_archive_no_torchvision_copy_is_one_line(tmp_path, monkeypatch):
    def offline(root, download):
        raise UsageError("dataset 'cifar10' not found under x and could not be downloaded; run once with internet")

    monkeypatch.setattr(datasets, "load_cifar10", offline)
    with pytest.raises(UsageError) as exc:
        load_dataset("cifar10-jpeg-10k", tmp_path)
    message = str(exc.value)
    assert "\n" not in message and "cifar10-jpeg.tar.gz" in message and "run once with internet" in message


def test_the_10k_subset_is_the_first_800_train_and_200_test_images_of_each_class(tmp_path, monkeypatch):
    """From generated CIFAR-shaped data of 1,000 train + 250 test images a class (one pixel each, whose bytes
    spell the image's index), ``cifar10-jpeg-10k`` keeps, in source order, the first 800 train and first 200 test
    images of every class: 8,000 + 2,000. Catches the two counts swapped or the parts mixed up."""
    labels, is_train = np.tile(np.arange(10), 1250), np.arange(12500) < 10000
    index = np.arange(12500)
    pixels = np.stack([index // 65536, index // 256 % 256, index % 256], 1).astype(np.uint8)[:, :, None, None]
    source = ImageData("cifar10-jpeg", torch.as_tensor(pixels), labels, None, is_train, CIFAR10_CLASSES,
                       (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(datasets, "load_cifar10_jpeg", lambda root, download: source)
    subset = load_dataset("cifar10-jpeg-10k", tmp_path)
    kept = subset.images[:, 0, 0, 0].long() * 65536 + subset.images[:, 1, 0, 0].long() * 256 + subset.images[:, 2, 0, 0]
    expected = sorted(i for c in range(10) for part, n in ((is_train, 800), (~is_train, 200))
                      for i in np.flatnonzero(part & (labels == c))[:n])
    assert kept.tolist() == expected and subset.name == "cifar10-jpeg-10k"
    assert (subset.is_train.sum(), len(subset)) == (8000, 10000)
    assert subset.labels.tolist() == labels[expected].tolist()


def _archive_of_a_tree(tmp_path, nested: bool = True) -> "Path":
    """cifar10-jpeg.tar.gz of the generated tree, its members under cifar10-jpeg/ (as the shared archive) or, not
    ``nested``, train/ and test/ at its top."""
    import tarfile

    source = tmp_path / "source"
    datasets.write_jpeg_tree(generated_cifar(None, False), source / "cifar10-jpeg")
    archive = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        if nested:
            tar.add(source / "cifar10-jpeg", arcname="cifar10-jpeg")
        else:
            for part in ("train", "test"):
                tar.add(source / "cifar10-jpeg" / part, arcname=part)
    return archive


@pytest.mark.parametrize("nested", [True, False], ids=["under cifar10-jpeg/", "at the top"])
def test_an_archive_with_its_tree_under_a_folder_or_at_its_top_gives_the_same_data(tmp_path, nested):
    """Both layouts of cifar10-jpeg.tar.gz extract to cifar10-jpeg/train and cifar10-jpeg/test: 30 train and 10
    test images with the generated labels. Catches an archive whose files are at its top taken for one with a
    folder (the extraction then finds no cifar10-jpeg/ to move into place)."""
    root = _archive_of_a_tree(tmp_path, nested).parent
    data = load_dataset("cifar10-jpeg", root)
    source = generated_cifar(None, False)
    assert sorted(p.name for p in (root / "cifar10-jpeg").iterdir()) == ["test", "train"]
    assert (len(data), int(data.is_train.sum())) == (40, 30)
    assert sorted(data.labels.tolist()) == sorted(source.labels.tolist())


def test_the_archive_is_extracted_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill in the middle of extracting leaves no cifar10-jpeg/ (a partial tree would be taken for the data:
    fewer images, or a missing class, on every later run), and the next run extracts it all; a cut-short
    archive is one line naming it."""
    import tarfile

    archive = _archive_of_a_tree(tmp_path)
    root = archive.parent
    extract, calls = tarfile.TarFile.makefile, []  # writes each regular file

    def extract_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "makefile", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10-jpeg", root)
    assert sorted(p.name for p in root.iterdir()) == ["cifar10-jpeg.tar.gz"]
    monkeypatch.setattr(tarfile.TarFile, "makefile", extract)
    # a process that finds the tree already renamed into place by another one keeps that tree
    datasets.extract_whole(archive, root / "cifar10-jpeg")
    first = sorted(str(p.relative_to(root)) for p in (root / "cifar10-jpeg").rglob("*"))
    datasets.extract_whole(archive, root / "cifar10-jpeg")
    assert sorted(str(p.relative_to(root)) for p in (root / "cifar10-jpeg").rglob("*")) == first
    assert sorted(p.name for p in root.iterdir()) == ["cifar10-jpeg", "cifar10-jpeg.tar.gz"]
    data = load_dataset("cifar10-jpeg", root)
    assert len(data) == 40 and data.classes == CIFAR10_CLASSES
    assert sorted(p.name for p in root.iterdir()) == ["cache", "cifar10-jpeg", "cifar10-jpeg.tar.gz"]

    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "cifar10-jpeg.tar.gz").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UsageError) as info:
        load_dataset("cifar10-jpeg", cut)
    message = str(info.value)
    assert "\n" not in message and "cifar10-jpeg.tar.gz" in message and "complete copy" in message
    assert sorted(p.name for p in cut.iterdir()) == ["cifar10-jpeg.tar.gz"]
