"""The per-image reference pipeline: the classic torchvision transform on PIL images, from an AugmentConfig.

:mod:`harness.data.augment` augments whole uint8 batches on the device. This module builds, from the
same :class:`~harness.data.augment.AugmentConfig`, the per-image pipeline self-supervised code bases
traditionally run in DataLoader workers (torchvision.transforms on PIL images)::

    RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio)      # bilinear, antialiased
    RandomHorizontalFlip(flip)                                       # when flips are allowed
    RandomApply([ColorJitter(*jitter)], p=jitter_p)                  # random order of the 4 ops
    RandomGrayscale(grayscale)                                       # RGB only
    RandomApply([GaussianBlur(k, sigma=blur_sigma)], p=blur)         # k as in augment._gaussian_blur
    ToTensor(), Normalize(mean, std)
    RandomErasing(erasing, scale=erasing_scale, ratio=erasing_ratio, value=0)

It serves three uses: the reference the batched pipeline is compared with (same distribution of
augmentations, ``tests/test_augment_distribution.py``), the "old per-image DataLoader path" of the
training benchmark (``harness/bench/train.py``), and a drop-in replacement of the batched
:class:`~harness.data.augment.Augmenter` for :func:`harness.engine.train.train`:

* :func:`per_image_transform` - the transform of one PIL image;
* :class:`PerImageViews` and :func:`per_image_loader` - a Dataset over a uint8 (N, C, H, W) tensor
  returning ``(view_1, ..., view_V, index)`` and a DataLoader over it with worker processes;
* :class:`PerImageAugmenter` - ``(uint8 batch, generator) -> normalised views``, each image
  transformed on the CPU, torchvision's random draws seeded from the generator;
* :class:`TrainOrderSampler` and :class:`LoaderAugmenter` - views prefetched by DataLoader workers
  in exactly the order :func:`harness.engine.train.train` draws its batches, handed to it through the
  augmenter argument (train has no hook for a batch source; see :class:`LoaderAugmenter`).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import fields
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms.functional import to_pil_image

from harness.data.augment import AugmentConfig, Augmenter, blur_kernel_size
from harness.engine.seeding import epoch_order

#: Every AugmentConfig field this module maps to a torchvision transform. A field added to
#: AugmentConfig without a mapping here makes :func:`per_image_transform` raise, so the two
#: pipelines cannot silently drift apart.
MAPPED_FIELDS = frozenset({"crop_scale", "crop_ratio", "flip", "jitter", "jitter_p", "grayscale", "blur",
                           "blur_sigma", "erasing", "erasing_scale", "erasing_ratio"})


def default_workers() -> int:
    """DataLoader worker processes by default: min(4, CPU count)."""
    return min(4, os.cpu_count() or 1)


def check_mappable(cfg: AugmentConfig) -> None:
    """Raise ValueError naming every field of ``cfg`` that has no per-image equivalent here."""
    unknown = [f.name for f in fields(cfg) if f.name not in MAPPED_FIELDS]
    if unknown:
        raise ValueError(f"AugmentConfig field(s) {', '.join(unknown)} have no per-image equivalent in "
                         f"harness.data.pil_augment (mapped: {', '.join(sorted(MAPPED_FIELDS))}); add the "
                         "matching torchvision transform to per_image_transform")
    if len(cfg.jitter) != 4:
        raise ValueError(f"AugmentConfig.jitter must be (brightness, contrast, saturation, hue), got {cfg.jitter!r}")


BACKENDS = ("pil", "tensor")


def per_image_transform(cfg: AugmentConfig | None, mean: Sequence[float], std: Sequence[float], size: int,
                        channels: int = 3, allow_flip: bool = True, backend: str = "pil") -> T.Compose:
    """The torchvision transform of one image -> normalised float (C, size, size).

    ``backend="pil"`` (the classic path) takes a PIL image (mode ``L`` or ``RGB``): every step
    works on 8-bit pixels, as PIL does. ``backend="tensor"`` takes a float (C, H, W) tensor in
    [0, 1] and runs the same torchvision transforms on it in floating point (no 8-bit rounding
    between steps). ``size`` is the output side: the batched Augmenter's ``out_size or H``. The
    steps and their conditions mirror :class:`harness.data.augment.Augmenter` (a step whose
    probability or strength is zero is left out). ``cfg=None`` is normalisation only (a resize to
    ``size`` first if needed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
    ops: list = []
    if cfg is None:
        ops.append(T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True))
    else:
        check_mappable(cfg)
        ops.append(T.RandomResizedCrop((size, size), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                       interpolation=T.InterpolationMode.BILINEAR, antialias=True))
        if allow_flip and cfg.flip > 0:
            ops.append(T.RandomHorizontalFlip(cfg.flip))
        if cfg.jitter_p > 0 and any(cfg.jitter):
            ops.append(T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p))
        if cfg.grayscale > 0 and channels == 3:
            ops.append(T.RandomGrayscale(cfg.grayscale))
        if cfg.blur > 0:
            ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=tuple(cfg.blur_sigma))],
                                     p=cfg.blur))
    ops += [T.ToTensor()] if backend == "pil" else []
    ops.append(T.Normalize(tuple(mean), tuple(std)))
    if cfg is not None and cfg.erasing > 0:
        ops.append(T.RandomErasing(cfg.erasing, scale=tuple(cfg.erasing_scale), ratio=tuple(cfg.erasing_ratio), value=0))
    return T.Compose(ops)


def _output_side(images: torch.Tensor, out_size: int | None) -> int:
    return int(out_size or images.shape[-2])


class PerImageViews(Dataset):
    """``views`` independently augmented views of each image of a uint8 (N, C, H, W) tensor.

    Item ``i`` is ``(view_1, ..., view_V, i)``: each view a normalised float (C, S, S) tensor made by
    converting image ``i`` to PIL and applying :func:`per_image_transform` (the classic dataset
    ``__getitem__``: decode to PIL, then transform; ``backend="tensor"`` hands the transform a
    float tensor instead). Random draws use torch's global RNG, which DataLoader seeds per worker.
    """

    def __init__(self, images: torch.Tensor, cfg: AugmentConfig | None, mean: Sequence[float],
                 std: Sequence[float], views: int = 2, allow_flip: bool = True, out_size: int | None = None,
                 backend: str = "pil") -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()
        self.views = views
        self.transform = per_image_transform(cfg, mean, std, _output_side(images, out_size), images.shape[1],
                                             allow_flip, backend)
        self.backend = backend

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = _decode(self.images[i], self.backend)
        return (*(self.transform(image) for _ in range(self.views)), i)


def _decode(image: torch.Tensor, backend: str):
    """One uint8 (C, H, W) image as the transform's input: a PIL image, or a float tensor in [0, 1]."""
    return to_pil_image(image) if backend == "pil" else image.float() / 255


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker killed by it
    would fail the step before the training loop checkpoints it; the loop closes them when it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def per_image_loader(images: torch.Tensor, cfg: AugmentConfig | None, mean: Sequence[float], std: Sequence[float],
                     *, views: int = 2, batch_size: int = 256, allow_flip: bool = True, out_size: int | None = None,
                     num_workers: int | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                     batch_sampler: Sampler | None = None, pin_memory: bool = False,
                     prefetch_factor: int = 2, backend: str = "pil") -> DataLoader:
    """The per-image DataLoader path: batches ``(view_1, ..., view_V, index)`` of :class:`PerImageViews`.

    ``num_workers`` defaults to :func:`default_workers`. The shuffle order and the workers' random
    streams follow from ``seed``. With ``batch_sampler`` (for example :class:`TrainOrderSampler`),
    ``batch_size``, ``shuffle`` and ``drop_last`` are ignored.
    """
    dataset = PerImageViews(images, cfg, mean, std, views, allow_flip, out_size, backend)
    workers = default_workers() if num_workers is None else num_workers
    common = {"num_workers": workers, "pin_memory": pin_memory,
              "generator": torch.Generator().manual_seed(seed),
              **({"prefetch_factor": prefetch_factor, "persistent_workers": False, "worker_init_fn": ignore_interrupts}
                 if workers > 0 else {})}
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)


class PerImageAugmenter(Augmenter):
    """Drop-in for :class:`harness.data.augment.Augmenter` that runs the per-image pipeline.

    ``augmenter(uint8 batch (n, C, H, W), generator)`` transforms each image on the CPU with
    :func:`per_image_transform` (as PIL images, or float tensors with ``backend="tensor"``) and
    returns the normalised float batch on the input's device. torchvision draws from torch's
    global RNG: one seed per image, drawn from ``generator``, seeds it inside
    :func:`torch.random.fork_rng`, so the result is a function of the generator's state and the
    global RNG is left as it was. ``normalize`` is the Augmenter's.
    """

    def __init__(self, cfg: AugmentConfig | None, mean, std, allow_flip: bool = True,
                 out_size: int | None = None, backend: str = "pil") -> None:
        super().__init__(cfg, mean, std, allow_flip, out_size)
        if cfg is not None:
            check_mappable(cfg)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (valid: {', '.join(BACKENDS)})")
        self.backend = backend
        self._transforms: dict[tuple[int, int], T.Compose] = {}

    def transform(self, side: int, channels: int) -> T.Compose:
        key = (side, channels)
        if key not in self._transforms:
            self._transforms[key] = per_image_transform(self.cfg, self.mean.flatten().tolist(),
                                                        self.std.flatten().tolist(), side, channels,
                                                        self.allow_flip, self.backend)
        return self._transforms[key]

    def __call__(self, images: torch.Tensor, g: torch.Generator, rows: slice | None = None,
                 total: int | None = None) -> torch.Tensor:
        """Augment a uint8 batch; ``rows`` of a batch of ``total`` as in :class:`~harness.data.augment.Augmenter`
        (one seed per row of the whole batch is drawn, so a row's views do not depend on the split)."""
        transform = self.transform(_output_side(images, self.out_size), images.shape[1])
        n = len(images) if total is None else total
        seeds = torch.randint(0, 2**62, (n,), generator=g)[slice(None) if rows is None else rows].tolist()
        if len(seeds) != len(images):
            raise ValueError(f"rows {rows} of a batch of {total} hold {len(seeds)} images, got {len(images)}")
        views = []
        with torch.random.fork_rng(devices=[]):
            for image, seed in zip(images.cpu(), seeds):
                # the CPU generator only: torch.manual_seed also queues lazy CUDA/XPU seeding (~0.5 ms a call)
                torch.default_generator.manual_seed(seed)
                views.append(transform(_decode(image, self.backend)))
        return torch.stack(views).to(images.device)


class TrainOrderSampler(Sampler):
    """Index batches in the order :func:`harness.engine.train.train` draws them.

    train() takes, in epoch ``e``, the permutation ``harness.engine.seeding.epoch_order(n, e, seed)`` in
    ``n // batch_size`` full batches. The sampler yields ``steps`` batches (endless with ``None``:
    train() stops at its budget) from ``start=(epoch, step)``, where a resumed run begins.
    """

    def __init__(self, n: int, batch_size: int, seed: int, steps: int | None = None,
                 start: tuple[int, int] = (0, 0)) -> None:
        self.n, self.batch_size, self.seed, self.steps, self.start = n, min(batch_size, n), seed, steps, start

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch_size
        first = self.start[0] * per_epoch + self.start[1]
        order, order_epoch, step = None, -1, first
        while self.steps is None or step < first + self.steps:
            epoch, k = divmod(step, per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, epoch, self.seed), epoch
            yield order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless TrainOrderSampler has no length")
        return self.steps


class LoaderAugmenter(Augmenter):
    """Feeds :func:`harness.engine.train.train` views prefetched by the workers of a per-image DataLoader.

    train() calls ``augmenter(images[index], generator)`` ``views`` times per step. The first call
    of each step takes the next batch ``(view_1, ..., view_V, index)`` from the loader (whose batch
    sampler must reproduce train's order, :class:`TrainOrderSampler`), checks that the loader's
    images are the ones train indexed (a clear error otherwise), and returns view 1; the next
    calls return views 2..V. The generator is not used: the workers' own seeded streams drive the
    augmentation. ``step_times[k]`` is when step k asked for its views (for steady-state timing).

    ``loader`` is a DataLoader (its workers start at once) or a function ``(epoch, step) ->
    DataLoader`` that train() calls through :meth:`start` with the position it starts from, so a
    resumed run gets the batches it stopped at (:func:`training_feed`).
    """

    def __init__(self, loader: DataLoader | Callable[[int, int], DataLoader], images: torch.Tensor, mean, std,
                 views: int, out_size: int | None = None) -> None:
        super().__init__(None, mean, std, out_size=out_size)  # out_size: the size of plain views (train's hooks)
        self.images, self.views = images, views
        self._make = None if isinstance(loader, DataLoader) else loader
        self.loader = loader if self._make is None else None
        self._it = iter(loader) if self._make is None else None  # workers start now and begin prefetching
        self._batch: list[torch.Tensor] = []
        self._k = 0
        self.step_times: list[float] = []

    def __call__(self, images: torch.Tensor, g: torch.Generator, rows: slice | None = None,
                 total: int | None = None) -> torch.Tensor:
        """View k of the current step (``rows`` of it in a data-parallel run)."""
        rows = slice(None) if rows is None else rows
        if self._k == 0:
            self.step_times.append(time.perf_counter())
            try:
                *views, index = next(self._it)
            except StopIteration:
                raise RuntimeError("LoaderAugmenter: the loader has no batch left for this step (its "
                                   "TrainOrderSampler's steps are fewer than the training budget)") from None
            if len(views) != self.views:
                raise ValueError(f"loader gives {len(views)} views per image, train asks for {self.views}")
            index = index.to(images.device)[rows]
            if images.shape[0] != len(index) or not torch.equal(images, self.images[index]):
                raise RuntimeError("LoaderAugmenter: the loader's batch is not the batch train() indexed; its "
                                   "batch sampler must reproduce train's order (TrainOrderSampler)")
            self._batch = [v[rows].to(images.device, non_blocking=True) for v in views]
        view = self._batch[self._k]
        self._k = (self._k + 1) % self.views
        return view

    def start(self, epoch: int, step: int) -> None:
        """Build the loader from the factory at train()'s starting position (nothing for a given loader)."""
        if self._make is not None:
            self.close()
            self.loader = self._make(epoch, step)
            self._it, self._k = iter(self.loader), 0

    def close(self) -> None:
        """Stop the worker processes."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def training_feed(images: torch.Tensor, cfg: AugmentConfig | None, mean: Sequence[float], std: Sequence[float], *,
                  views: int, batch_size: int, seed: int, allow_flip: bool = True, out_size: int | None = None,
                  num_workers: int | None = None, backend: str = "pil") -> LoaderAugmenter:
    """The per-image DataLoader path as the training loop's view source (``run --pipeline per_image``).

    ``num_workers`` processes (default :func:`default_workers`) transform the images one by one
    with torchvision and prefetch whole batches in train()'s order; train() starts the loader at
    its starting step. The workers' random streams are seeded from (seed, epoch, step) of that
    start, so a resumed run sees the right images with freshly drawn augmentations. ``out_size``
    is the side of every view (crops resized to it), as in :class:`~harness.data.augment.Augmenter`.
    """
    cpu_images = images.cpu()

    def make(epoch: int, step: int) -> DataLoader:
        sampler = TrainOrderSampler(len(images), batch_size, seed, start=(epoch, step))
        return per_image_loader(cpu_images, cfg, mean, std, views=views, allow_flip=allow_flip, out_size=out_size,
                                num_workers=num_workers, seed=hash((seed, epoch, step)) % 2**62,
                                batch_sampler=sampler, pin_memory=images.is_cuda, backend=backend)

    return LoaderAugmenter(make, images, mean, std, views, out_size)
