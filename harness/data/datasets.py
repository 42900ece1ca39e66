"""Dataset registry, in-memory image tensors and identical split manifests.

Every dataset loads once into a :class:`ImageData`: a uint8 tensor (N, C, H, W) of all
samples (the source's train part first, then its test part), fine labels, coarse labels
where the literature defines them, and which samples came from the source's train part.
Splits are a manifest of index lists written once per (dataset, data content) and hashed;
the hash goes into every result record so that different data never share a leaderboard cell.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.errors import EnvironmentFailure, UsageError, choices_error
from harness.registry import Registry
from harness.execution.store import write_atomic, write_torch_atomic

#: CIFAR-100 fine label (alphabetical index) -> superclass index, the standard table
#: (Krizhevsky 2009; as used by SCAN, CC and CD for "CIFAR-100-20").
CIFAR100_FINE_TO_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
])

#: CIFAR-10 coarse labels: 0 = vehicles {airplane, automobile, ship, truck}, 1 = animals.
CIFAR10_FINE_TO_COARSE = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: Digits 0-4 -> 0, 5-9 -> 1 (MNIST and scikit-learn digits).
DIGITS_FINE_TO_COARSE = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])

#: The 10 ImageNet classes of ImageNet-10 (Chang et al. 2017, used by CC and CD).
IMAGENET10_WNIDS = ("n02056570", "n02085936", "n02128757", "n02690373", "n02692877",
                    "n03095699", "n04254680", "n04285008", "n04467665", "n07747607")

#: Per-channel mean/std used to normalise images of each dataset (computed once, fixed here).
CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

#: The CIFAR-10 constants much CIFAR code copies (kuangliu/pytorch-cifar), whose std is not CIFAR-10's:
#: lemniscate's ``cifar.py``, CLD's ``datasets/dataloader.py`` (for CIFAR-100 too), SeLa's ``cifar.py`` and
#: MoCo's CIFAR-10 demo normalise with them.
LEGACY_CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))

#: How a run's images are normalised (its config key ``input_norm``): ``dataset``, by the dataset's own
#: per-channel mean and std; ``none``, fed as pixels in [0, 1] (CC's and CD's official transforms end at
#: ``ToTensor()``); ``legacy_cifar10``, by :data:`LEGACY_CIFAR10_MEAN_STD` (3-channel images only).
INPUT_NORMS = ("dataset", "none", "legacy_cifar10")


@dataclass
class ImageData:
    """All samples of a dataset in memory. ``images`` is uint8 (N, C, H, W)."""

    name: str
    images: torch.Tensor
    labels: np.ndarray
    coarse_labels: np.ndarray | None
    is_train: np.ndarray  # bool (N,): sample comes from the source's train part
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    is_labeled: np.ndarray | None = None  # False for unlabeled extra data (STL-10 unlabeled)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def flips(self) -> bool:
        """Whether a horizontal flip is a label-preserving augmentation: not for handwritten digits."""
        return self.name not in ("digits", "mnist")

    @property
    def num_coarse(self) -> int:
        return 0 if self.coarse_labels is None else int(self.coarse_labels.max()) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels: changes whenever the data changes."""
        h = hashlib.sha256()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


def with_input_norm(data: ImageData, norm: str) -> ImageData:
    """``data`` with the mean and std that normalise its images as ``norm`` says (:data:`INPUT_NORMS`); the
    images themselves are shared."""
    channels = data.image_shape[0]
    check_input_norm(norm, data.name, channels)
    if norm == "none":
        return replace(data, mean=(0.0,) * channels, std=(1.0,) * channels)
    if norm == "legacy_cifar10":
        return replace(data, mean=LEGACY_CIFAR10_MEAN_STD[0], std=LEGACY_CIFAR10_MEAN_STD[1])
    return data


def check_input_norm(norm: str, dataset: str, channels: int | None) -> None:
    """``norm`` is one of :data:`INPUT_NORMS` and fits ``dataset``'s ``channels`` (None: not known yet)."""
    if norm not in INPUT_NORMS:
        raise choices_error("input_norm", norm, INPUT_NORMS)
    if norm == "legacy_cifar10" and channels not in (None, 3):
        raise UsageError(f"input_norm 'legacy_cifar10' normalises 3-channel images; dataset {dataset!r} has "
                         f"{channels} (valid for it: dataset, none)")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[[Path, bool], ImageData]
    description: str
    needs_download: bool = True
    channels: int | None = None  # None: known once loaded


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, description: str, needs_download: bool = True, channels: int | None = None):
    def decorator(loader):
        DATASETS.register(name)(DatasetSpec(name, loader, description, needs_download, channels))
        return loader
    return decorator


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Concatenate (images NHWC or NCHW uint8, labels) train/test parts; return NCHW tensor, labels, is_train."""
    imgs = [torch.as_tensor(np.ascontiguousarray(x)) for x, _ in parts]
    labels = np.concatenate([np.asarray(y, dtype=np.int64) for _, y in parts])
    is_train = np.concatenate([np.full(len(y), i == 0) for i, (_, y) in enumerate(parts)])
    return torch.cat(imgs).contiguous(), labels, is_train


def _missing(name: str, root: Path, how: str) -> UsageError:
    return UsageError(f"dataset {name!r} not found under {root} and could not be downloaded; {how}")


def _torchvision(name: str, cls_name: str, root: Path, download: bool, **kw):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    parts = []
    for split in (True, False):
        try:
            ds = cls(str(root), train=split, download=download, **kw)
        except Exception as exc:  # torchvision raises RuntimeError / URLError when offline
            raise _missing(name, root, f"run once with internet, or put torchvision's {cls_name} "
                                       f"files in --data-dir ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
        if data.ndim == 3:
            data = data[:, None]
        else:
            data = data.transpose(0, 3, 1, 2)
        parts.append((data, np.asarray(ds.targets)))
    return parts, tuple(ds.classes)


@register_dataset("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download)", needs_download=False,
                  channels=1)
def load_digits(root: Path, download: bool) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    # A fixed 80/20 train/test partition (scikit-learn ships no split); stratified, seed 0.
    rng = np.random.default_rng(0)
    test = np.zeros(len(d.target), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        test[idx[: round(0.2 * len(idx))]] = True
    order = np.concatenate([np.flatnonzero(~test), np.flatnonzero(test)])
    x, y, is_train = _stack([(images[order][~test[order]], d.target[order][~test[order]]),
                             (images[order][test[order]], d.target[order][test[order]])])
    m = float(x.float().mean() / 255)
    s = float(x.float().std() / 255)
    return ImageData("digits", x, y, DIGITS_FINE_TO_COARSE[y], is_train, tuple(map(str, range(10))), (m,), (s,))


@register_dataset("mnist", "MNIST (70,000 28x28 digits, 10 classes; coarse 0-4 vs 5-9)", channels=1)
def load_mnist(root: Path, download: bool) -> ImageData:
    parts, _ = _torchvision("mnist", "MNIST", root, download)
    x, y, is_train = _stack(parts)
    return ImageData("mnist", x, y, DIGITS_FINE_TO_COARSE[y], is_train, tuple(map(str, range(10))),
                     (0.1307,), (0.3081,))


@register_dataset("cifar10", "CIFAR-10 (60,000 32x32, 10 classes; coarse vehicles vs animals)", channels=3)
def load_cifar10(root: Path, download: bool) -> ImageData:
    parts, classes = _torchvision("cifar10", "CIFAR10", root, download)
    x, y, is_train = _stack(parts)
    return ImageData("cifar10", x, y, CIFAR10_FINE_TO_COARSE[y], is_train, classes, *CIFAR_MEAN_STD)


def _cifar100(name: str, root: Path, download: bool, coarse_as_labels: bool) -> ImageData:
    parts, classes = _torchvision(name, "CIFAR100", root, download)
    x, y, is_train = _stack(parts)
    coarse = CIFAR100_FINE_TO_COARSE[y]
    mean_std = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    if coarse_as_labels:
        return ImageData(name, x, coarse, None, is_train, tuple(f"superclass{i}" for i in range(20)), *mean_std)
    return ImageData(name, x, y, coarse, is_train, classes, *mean_std)


@register_dataset("cifar100", "CIFAR-100 (60,000 32x32, 100 fine classes; coarse 20 superclasses)", channels=3)
def load_cifar100(root: Path, download: bool) -> ImageData:
    return _cifar100("cifar100", root, download, coarse_as_labels=False)


@register_dataset("cifar100-20", "CIFAR-100 with its 20 superclasses as labels (the clustering benchmark)",
                  channels=3)
def load_cifar100_20(root: Path, download: bool) -> ImageData:
    return _cifar100("cifar100-20", root, download, coarse_as_labels=True)


@register_dataset("stl10", "STL-10 train+test (13,000 96x96, 10 classes); unlabeled split via stl10-unlabeled",
                  channels=3)
def load_stl10(root: Path, download: bool, unlabeled: bool = False) -> ImageData:
    import torchvision.datasets as tvd

    splits = ("train", "test", "unlabeled") if unlabeled else ("train", "test")
    parts = []
    for split in splits:
        try:
            ds = tvd.STL10(str(root), split=split, download=download)
        except Exception as exc:
            raise _missing("stl10", root, f"run once with internet or put stl10_binary/ in --data-dir "
                                          f"({type(exc).__name__})") from None
        parts.append((ds.data, ds.labels))
    x, y, is_train = _stack(parts)
    n_lab = sum(len(p[1]) for p in parts[:2])
    is_train[n_lab:] = True
    labeled = np.arange(len(y)) < n_lab
    y = np.where(labeled, y, 0)
    name = "stl10-unlabeled" if unlabeled else "stl10"
    return ImageData(name, x, y, None, is_train, tuple(ds.classes), (0.4467, 0.4398, 0.4066),
                     (0.2603, 0.2566, 0.2713), is_labeled=labeled)


@register_dataset("stl10-unlabeled", "STL-10 train+test plus the 100k unlabeled images (used for training only)",
                  channels=3)
def load_stl10_unlabeled(root: Path, download: bool) -> ImageData:
    return load_stl10(root, download, unlabeled=True)


def _image_files(folder: Path) -> list[Path]:
    """The files of a class folder in name order, hidden ones (``.DS_Store``) left out."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _read_rgb(path: Path, image_size: int | None) -> np.ndarray:
    """One image as an RGB uint8 array (H, W, 3), resized to ``image_size`` if given; a file PIL
    cannot decode (corrupt, truncated, not an image) is an :class:`EnvironmentFailure` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EnvironmentFailure(f"cannot read image {path} ({reason}); replace or remove that file") from None


def load_image_folder(root: Path, name: str, image_size: int | None = None,
                      classes: tuple[str, ...] | None = None) -> ImageData:
    """Load a ``train/<class>/*``, ``test/<class>/*`` tree (or a .tar.gz of one) into memory.

    Images are decoded with PIL, converted to RGB and resized to ``image_size`` (if given);
    without ``image_size`` they must all have one size. An empty class folder, images of mixed
    sizes or a file that is not a readable image stop with one line naming it.
    """
    root = Path(root)
    if not (root / "train").is_dir():
        raise UsageError(f"image folder {str(root)!r} has no train/<class>/ directory; expected "
                         f"train/<class>/*.jpg and test/<class>/*.jpg")
    classes = classes or tuple(sorted(p.name for p in (root / "train").iterdir()
                                      if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise UsageError(f"image folder {str(root / 'train')!r} has no class folders; expected train/<class>/*.jpg")
    parts, first = [], None
    for split in ("train", "test"):
        imgs, labels = [], []
        for c, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                raise UsageError(f"image folder is missing {folder}")
            files = _image_files(folder)
            if not files:
                raise UsageError(f"class folder {folder} has no images; add some or remove the folder")
            for f in files:
                imgs.append(_read_rgb(f, image_size))
                labels.append(c)
                first = first or (f, imgs[-1].shape)
                if imgs[-1].shape != first[1]:
                    (h, w, _), (h0, w0, _) = imgs[-1].shape, first[1]
                    raise UsageError(f"image {f} is {w}x{h} pixels but {first[0]} is {w0}x{h0}; an image folder "
                                     f"needs images of one size; resize them")
        parts.append((np.stack(imgs).transpose(0, 3, 1, 2), np.array(labels)))
    x, y, is_train = _stack(parts)
    xf = x.float() / 255
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).tolist())
    coarse = CIFAR10_FINE_TO_COARSE[y] if classes == CIFAR10_CLASSES else None
    return ImageData(name, x, y, coarse, is_train, classes, mean, std)


def tree_fingerprint(folder: Path) -> str:
    """sha256 of every file's path, size and modification time under ``folder``: changes whenever a
    file is added, removed, replaced or edited, without reading the images."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fname in sorted(filenames):
            path = Path(dirpath, fname)
            stat = path.stat()
            h.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def extract_whole(archive: Path, folder: Path) -> None:
    """Extract the ``.tar.gz`` ``archive`` (its members under ``folder.name/`` or at its top) into ``folder``,
    which appears whole or not at all: the files go to a hidden folder of this process beside it that is
    renamed into place, so a kill or a full disk mid-way never leaves a partial tree that later runs would
    take for the data, and processes extracting at once (ranks, workers) do not mix their files: the first
    rename wins and the others drop their copy. Such folders left by killed processes over an hour ago
    are removed."""
    import tarfile
    import tempfile
    import time

    for stale in folder.parent.glob(f".{folder.name}.partial-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        with tarfile.open(archive) as tar:
            nested = {m.name.split("/")[0] for m in tar.getmembers()} == {folder.name}
            tar.extractall(partial, filter="data")
        try:
            (partial / folder.name if nested else partial).rename(folder)
        except OSError:
            if not folder.is_dir():  # not another process's complete tree
                raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise UsageError(f"cannot extract {archive} ({exc}); replace it with a complete copy") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _cached_folder(name: str, root: Path, sub: str, image_size: int | None, cache_dir: Path,
                   classes=None) -> ImageData:
    """Decode an image tree once and cache it as a .pt tensor file (JPEG decoding is slow).

    The cache lives in the harness's ``cache_dir`` (``<data-dir>/cache``), never beside the user's
    data, and its name holds the tree's :func:`tree_fingerprint`, so a tree whose files changed is
    decoded again; an unreadable cache file is rebuilt.
    """
    folder = root / sub
    archive = root / f"{sub}.tar.gz"
    if not folder.is_dir() and archive.is_file():
        extract_whole(archive, folder)
    if not (folder / "train").is_dir():
        raise UsageError(f"dataset {name!r} not found: looked for {folder} (an ImageFolder tree "
                         f"train/<class>/, test/<class>/) and {archive}; pass --data-dir")
    key = hashlib.sha256(f"{tree_fingerprint(folder)} {classes} {image_size}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{name}-{image_size or 'native'}-{key}.pt"
    if cache.is_file():  # arrays are stored as tensors so the cache loads with weights_only=True
        try:
            d = torch.load(cache, weights_only=True)
            return ImageData(**{k: v.numpy() if k != "images" and torch.is_tensor(v) else v for k, v in d.items()})
        except (RuntimeError, EOFError, OSError, TypeError, pickle.UnpicklingError):
            pass  # a cache cut short by a kill or a full disk: decode the tree again
    data = load_image_folder(folder, name, image_size, classes)
    payload = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in data.__dict__.items()}
    write_torch_atomic(cache, payload)
    return data


def write_jpeg_tree(data: ImageData, folder: Path) -> None:
    """Encode ``data`` as an ImageFolder tree ``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``,
    numbered within each class in dataset order, with PIL's default JPEG settings (quality 75, 4:2:0).

    Those are the settings of the CIFAR-10 archive behind the committed ``cifar10-cpu`` records (read
    from its quantisation tables), with the same names. The tree appears whole or not at all: it is
    written beside ``folder`` and renamed into place.
    """
    from PIL import Image

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    images = data.images.permute(0, 2, 3, 1).numpy()
    for part, mask in (("train", data.is_train), ("test", ~data.is_train)):
        for c, cls in enumerate(data.classes):
            out = partial / part / cls
            out.mkdir(parents=True)
            for i, index in enumerate(np.flatnonzero(mask & (data.labels == c))):
                Image.fromarray(images[index]).save(out / f"{i:04d}.jpg")
    partial.rename(folder)


@register_dataset("cifar10-jpeg", "CIFAR-10 as JPEG files (ImageFolder tree cifar10-jpeg/ or cifar10-jpeg.tar.gz; "
                  "encoded once from torchvision's CIFAR-10 when neither is there)", channels=3)
def load_cifar10_jpeg(root: Path, download: bool) -> ImageData:
    folder, archive = root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"
    if not folder.is_dir() and not archive.is_file():
        try:
            source = load_cifar10(root, download)
        except UsageError as exc:
            raise UsageError(f"dataset 'cifar10-jpeg' not found: looked for {folder} (an ImageFolder tree "
                             f"train/<class>/, test/<class>/) and {archive}, and could not encode it from "
                             f"torchvision's CIFAR-10 ({exc})") from None
        write_jpeg_tree(source, folder)
    return _cached_folder("cifar10-jpeg", root, "cifar10-jpeg", None, root / "cache", CIFAR10_CLASSES)


def stratified_subset(data: ImageData, name: str, per_class_train: int, per_class_test: int) -> ImageData:
    """The first ``per_class_*`` samples of each class from the train and test parts (deterministic)."""
    keep = []
    for part in (data.is_train, ~data.is_train):
        n = per_class_train if part is data.is_train else per_class_test
        for c in range(data.num_classes):
            keep.append(np.flatnonzero(part & (data.labels == c))[:n])
    idx = np.sort(np.concatenate(keep))
    coarse = None if data.coarse_labels is None else data.coarse_labels[idx]
    return ImageData(name, data.images[torch.as_tensor(idx)].clone(), data.labels[idx], coarse, data.is_train[idx],
                     data.classes, data.mean, data.std)


@register_dataset("cifar10-jpeg-10k", "10,000-image stratified subset of cifar10-jpeg (800 train + 200 test per class)",
                  needs_download=False, channels=3)
def load_cifar10_jpeg_10k(root: Path, download: bool) -> ImageData:
    return stratified_subset(load_cifar10_jpeg(root, download), "cifar10-jpeg-10k", 800, 200)


@register_dataset("imagenet10", "ImageNet-10 (the 10 wnids of Chang et al. 2017) as an ImageFolder tree imagenet10/, 96 px",
                  needs_download=False, channels=3)
def load_imagenet10(root: Path, download: bool) -> ImageData:
    return _cached_folder("imagenet10", root, "imagenet10", 96, root / "cache", IMAGENET10_WNIDS)


def parse_dataset_name(name: str) -> tuple[str, Path | None]:
    """``imagefolder:/path/to/tree`` -> ("imagefolder", path); other names pass through."""
    if name.startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        if not path.strip():  # Path("") is the current directory, read as a tree named ''
            raise UsageError(f"dataset {name!r} names no folder; valid: imagefolder:PATH, PATH holding train/<class>/ "
                             f"and test/<class>/ folders of images")
        return "imagefolder", Path(path).expanduser().resolve()  # "imagefolder:." names the current folder
    return name, None


def dataset_channels(name: str) -> int | None:
    """Channels of a dataset's images where known before it loads (image folders are read as RGB)."""
    base, _ = parse_dataset_name(name)
    return 3 if base == "imagefolder" else DATASETS.get(base).channels


def validate_dataset_name(name: str) -> None:
    base, path = parse_dataset_name(name)
    if base == "imagefolder":
        return
    DATASETS.get(base)


def load_dataset(name: str, data_dir: str | Path, download: bool = True) -> ImageData:
    """Load a registered dataset (or ``imagefolder:PATH``) from ``data_dir``, downloading if allowed."""
    base, path = parse_dataset_name(name)
    root = Path(data_dir).expanduser()
    if base == "imagefolder":
        if not path.is_dir():
            raise UsageError(f"image folder {str(path)!r} " + ("is a file; give the folder that holds one folder "
                                                               "of images per class" if path.exists() else "does not exist"))
        return _cached_folder(path.name, path.parent, path.name, None, root / "cache")
    spec = DATASETS.get(base)
    if spec.needs_download:
        root.mkdir(parents=True, exist_ok=True)
    return spec.loader(root, download)


# ---------------------------------------------------------------- split manifests

@dataclass(frozen=True)
class SplitManifest:
    """Index lists into :class:`ImageData`, identical for every method. ``sha256`` identifies them."""

    dataset: str
    data_fingerprint: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    sha256: str

    def split(self, name: str) -> np.ndarray:
        if name == "train_full":
            return np.sort(np.concatenate([self.train, self.val]))
        if name == "all":
            return np.sort(np.concatenate([self.train, self.val, self.test]))
        if name in ("train", "val", "test"):
            return getattr(self, name)
        raise UsageError(f"unknown split {name!r} (valid: all, test, train, train_full, val)")


def _manifest_hash(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def make_manifest(data: ImageData, val_fraction: float = 0.1, seed: int = 0) -> SplitManifest:
    """Carve a stratified validation split out of train with a fixed seed; test is the source's test part.

    Unlabeled samples (STL-10 unlabeled) stay in train and are never in val or test.
    """
    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(data.is_train)
    labeled = data.is_labeled if data.is_labeled is not None else np.ones(len(data), bool)
    val = []
    for c in np.unique(data.labels[train_idx]):
        members = train_idx[(data.labels[train_idx] == c) & labeled[train_idx]]
        val.append(rng.permutation(members)[: int(round(val_fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], np.int64)
    train = np.setdiff1d(train_idx, val_idx)
    test = np.flatnonzero(~data.is_train)
    fields = {"dataset": data.name, "data": data.fingerprint(), "train": train.tolist(),
              "val": val_idx.tolist(), "test": test.tolist()}
    return SplitManifest(data.name, fields["data"], train, val_idx, test, _manifest_hash(fields))


def _split_problem(train: np.ndarray, val: np.ndarray, test: np.ndarray, n: int) -> str:
    """Why the index lists are not splits of ``n`` images (an index out of range, repeated, or in two
    splits: a test image in train or val would leak into what is evaluated), or "" when they are."""
    named = {"train": train, "val": val, "test": test}
    for name, idx in named.items():
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            return f"{name} holds an index outside 0..{n - 1}"
        if len(np.unique(idx)) != len(idx):
            return f"{name} holds an index twice"
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = np.intersect1d(named[a], named[b])
        if len(shared):
            return f"{len(shared)} images are in both {a} and {b}, e.g. index {shared[0]}"
    return ""


def load_or_make_manifest(data: ImageData, manifest_dir: Path, val_fraction: float = 0.1,
                          seed: int = 0) -> SplitManifest:
    """Read the manifest of this exact data from ``manifest_dir``, or write it (atomically) once.

    A manifest that is unreadable (cut short), fails its hash or does not hold disjoint splits of the data
    is an :class:`EnvironmentFailure` naming the file: deleting it is safe, the same splits are made again
    from the same data.
    """
    fingerprint = data.fingerprint()
    path = Path(manifest_dir) / f"{data.name}-{fingerprint[:16]}-val{val_fraction}-seed{seed}.json"
    if path.is_file():
        fix = "delete it to rebuild it (the same splits are made again from the same data)"
        try:
            d = json.loads(path.read_text())
            fields = {key: d[key] for key in ("dataset", "data", "train", "val", "test")}
            train, val, test = (np.array(d[k], dtype=np.int64) for k in ("train", "val", "test"))
            stored_hash = d["sha256"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EnvironmentFailure(f"split manifest {path} is unreadable ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else 'incomplete'}); {fix}") from None
        if _manifest_hash(fields) != stored_hash:
            raise EnvironmentFailure(f"split manifest {path} is corrupted (hash mismatch); {fix}")
        problem = _split_problem(train, val, test, len(data))
        if problem:  # hashed as written, but by a writer that got the splits wrong
            raise EnvironmentFailure(f"split manifest {path} is invalid ({problem}); {fix}")
        return SplitManifest(d["dataset"], d["data"], train, val, test, stored_hash)
    m = make_manifest(data, val_fraction, seed)
    payload = {"dataset": m.dataset, "data": m.data_fingerprint, "train": m.train.tolist(),
               "val": m.val.tolist(), "test": m.test.tolist(), "sha256": m.sha256}
    write_atomic(path, lambda f: json.dump(payload, f))
    return m


def load_split_data(name: str, data_dir: Path, val_fraction: float) -> tuple[ImageData, SplitManifest]:
    """A dataset and its split manifest (``<data-dir>/manifests``), as every run of it sees them."""
    data = load_dataset(name, data_dir)
    return data, load_or_make_manifest(data, Path(data_dir) / "manifests", val_fraction)
