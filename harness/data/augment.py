"""Batched image augmentation on tensors, with independent random parameters per sample.

One place for the SimCLR-style pipeline every method shares (Chen et al. 2020, App. A):
random resized crop, horizontal flip, colour jitter, random grayscale, Gaussian blur; and, after
normalisation, random erasing (Zhong et al. 2020; CLD's ``--erasing``).
Whole uint8 batches are augmented on the device they live on (CPU or GPU), so training is
not starved by per-image PIL work. Presets name the exact parameter ranges each paper uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from harness.errors import UsageError, choices_error


@dataclass(frozen=True)
class AugmentConfig:
    """Parameter ranges; probabilities are per sample. Jitter strengths follow torchvision's ColorJitter."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # torchvision's RandomErasing(p=erasing, scale, ratio, value=0) after normalisation
    erasing: float = 0.0
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)


PRESETS: dict[str, AugmentConfig | None] = {
    # SimCLR's CIFAR recipe (no blur on 32 px images).
    "simclr": AugmentConfig(),
    # SimCLR/BYOL ImageNet recipe with blur (p=0.5).
    "simclr_blur": AugmentConfig(blur=0.5),
    # CLD's CIFAR scripts (datasets/dataloader.py), lemniscate's and SeLa's cifar.py: RandomResizedCrop
    # (scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.4) on every image (no RandomApply), gray 0.2, flip.
    "cld": AugmentConfig(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0),
    # Contrastive Clustering (Li et al. 2021): ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with s=0.5, p=0.8.
    "cc": AugmentConfig(jitter=(0.4, 0.4, 0.4, 0.1)),
    # Linear-evaluation augmentation: crop and flip only.
    "probe": AugmentConfig(crop_scale=(0.5, 1.0), jitter=(0, 0, 0, 0), jitter_p=0.0, grayscale=0.0),
    # Mild crops and intensity changes, for tiny images such as 8x8 digits.
    "mild": AugmentConfig(crop_scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), grayscale=0.0),
    # No augmentation: the identity (normalisation only).
    "none": None,
}


#: Allowed range of each AugmentConfig field's numbers (probabilities in [0, 1], crop area in (0, 1], ...).
OVERRIDE_RANGES = {"crop_scale": (0, 1), "crop_ratio": (0, None), "flip": (0, 1), "jitter": (0, None), "jitter_p": (0, 1),
                   "grayscale": (0, 1), "blur": (0, 1), "blur_sigma": (0, None), "erasing": (0, 1),
                   "erasing_scale": (0, 1), "erasing_ratio": (0, None)}


def _override(key: str, value, default):
    """One ``augment_overrides`` value shaped like its default (a number, or a list of as many numbers) and in
    :data:`OVERRIDE_RANGES`; pairs (crop_scale, crop_ratio, blur_sigma, erasing_scale, erasing_ratio) low <= high."""
    low, high = OVERRIDE_RANGES[key]
    shape = f"a list of {len(default)} numbers" if isinstance(default, tuple) else "a number"
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    ok = (len(numbers) == len(values) == (len(default) if isinstance(default, tuple) else 1)
          and isinstance(value, (list, tuple)) == isinstance(default, tuple)
          and all(v >= low and (high is None or v <= high) for v in numbers)
          and (len(numbers) != 2 or numbers[0] <= numbers[1]))
    if not ok:
        bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise UsageError(f"augment_overrides {key!r} must be {shape} {bounds}"
                         f"{' (low, high)' if isinstance(default, tuple) and len(default) == 2 else ''}, got {value!r}")
    return tuple(values) if isinstance(default, tuple) else values[0]


def get_preset(name: str, **overrides) -> AugmentConfig | None:
    """The preset ``name`` with ``overrides`` (checked: known fields, their shapes and ranges)."""
    if name not in PRESETS:
        raise choices_error("augmentation", name, PRESETS)
    unknown = sorted(map(str, set(overrides) - set(OVERRIDE_RANGES)))
    if unknown:
        raise choices_error("augment_overrides key", unknown[0], OVERRIDE_RANGES)
    cfg = PRESETS[name]
    if cfg is None or not overrides:
        return cfg
    return replace(cfg, **{k: _override(k, v, getattr(cfg, k)) for k, v in overrides.items()})


class _Draws:
    """Per-sample random numbers from the CPU generator ``g``, drawn for a batch of ``total`` rows
    and cut to ``rows``: a rank of a data-parallel run that augments its share of the global
    batch gets exactly the parameters a single process draws for those rows."""

    def __init__(self, g: torch.Generator, total: int, rows: slice) -> None:
        self.g, self.total, self.rows = g, total, rows
        self.n = len(range(total)[rows])

    def rand(self) -> torch.Tensor:
        return torch.rand(self.total, generator=self.g)[self.rows]

    def rand_rows(self, k: int) -> torch.Tensor:
        """(k, n): what ``k`` calls of :meth:`rand` return, in one draw (the CPU generator fills a tensor
        in order, so the numbers are the same)."""
        return torch.rand(k, self.total, generator=self.g)[:, self.rows]

    def uniform(self, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * self.rand()


def _first_fitting_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], draw: _Draws, *,
                       erasing: bool) -> tuple[torch.Tensor, ...]:
    """torchvision's box sampling, its up to 10 tries computed at once from the draws 10 sequential tries would
    take: an area of ``scale`` times the image's and a log-uniform aspect ratio per try, the first box that fits
    kept, at a uniform position. Returns its height, width, top, left and whether any try fit (per sample).

    ``erasing`` False: ``RandomResizedCrop`` (ratio = width / height; fits when inside the image and not empty).
    True: ``RandomErasing`` (ratio = height / width; fits when strictly smaller than the image)."""
    u = draw.rand_rows(40).view(10, 4, draw.n)  # per try: area, log-ratio, left, top
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * (h * w)
    r = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 1])
    long_side, short_side = torch.sqrt(target * r).round(), torch.sqrt(target / r).round()
    bh, bw = (long_side, short_side) if erasing else (short_side, long_side)
    fits = (bh < h) & (bw < w) if erasing else (bw <= w) & (bh <= h) & (bw > 0) & (bh > 0)
    left = (u[:, 2] * (w - bw + 1)).floor()
    top = (u[:, 3] * (h - bh + 1)).floor()
    first = fits.to(torch.uint8).argmax(0, keepdim=True)  # the first try that fits (0 when none does)
    bh, bw, top, left = (t.gather(0, first)[0] for t in (bh, bw, top, left))
    return bh, bw, top, left, fits.any(0)


def _crop_flip_grid(h: int, w: int, cfg: AugmentConfig, allow_flip: bool, draw: _Draws) -> torch.Tensor:
    """Affine matrices (n, 2, 3) of a random resized crop (:func:`_first_fitting_box`) plus flip."""
    n = draw.n
    ch, cw, y0, x0, found = _first_fitting_box(h, w, cfg.crop_scale, cfg.crop_ratio, draw, erasing=False)
    # fallback: the whole image (torchvision centre-crops; the full image is the same here)
    scale = torch.where(found[:, None], torch.stack([cw / w, ch / h], 1), 1.0)
    centre = torch.where(found[:, None], torch.stack([(x0 + cw / 2) / w * 2 - 1, (y0 + ch / 2) / h * 2 - 1], 1), 0.0)
    theta = torch.zeros(n, 2, 3)
    sign = torch.ones(n)
    if allow_flip and cfg.flip > 0:
        sign = torch.where(draw.rand() < cfg.flip, -1.0, 1.0)
    theta[:, 0, 0] = scale[:, 0] * sign
    theta[:, 1, 1] = scale[:, 1]
    theta[:, :, 2] = centre
    return theta


def _erasing_boxes(h: int, w: int, cfg: AugmentConfig, draw: _Draws) -> torch.Tensor:
    """Boxes (n, 4) of torchvision's ``RandomErasing`` on (h, w) views: top, left, height, width. Applied with
    probability ``erasing``, then :func:`_first_fitting_box` (area ``erasing_scale``, ratio ``erasing_ratio``).
    No box (height and width 0) when not applied or when no try fits."""
    apply = draw.rand() < cfg.erasing
    bh, bw, top, left, found = _first_fitting_box(h, w, cfg.erasing_scale, cfg.erasing_ratio, draw, erasing=True)
    keep = (found & apply).float()
    return torch.stack([top, left, bh * keep, bw * keep], 1)


def _erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each sample's box (:func:`_erasing_boxes`) set to 0, torchvision's ``value=0`` on normalised views."""
    top, left, bh, bw = (b[:, None] for b in boxes.unbind(1))
    rows = torch.arange(x.shape[2], device=x.device, dtype=boxes.dtype)
    cols = torch.arange(x.shape[3], device=x.device, dtype=boxes.dtype)
    inside = (((rows >= top) & (rows < top + bh))[:, None, :, None]
              & ((cols >= left) & (cols < left + bw))[:, None, None, :])
    return x.masked_fill(inside, 0.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _brightness(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * _per_sample(f)).clamp(0, 1)


def _contrast(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) * _per_sample(f) + mean).clamp(0, 1)


def _saturation(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    gray = _gray(y)
    return ((y - gray) * _per_sample(f) + gray).clamp(0, 1)


def _hue(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB ``y`` by ``shift`` (a fraction of the circle, per sample): to HSV, shift, back, with
    torchvision's formulas in few operators (on a GPU each is a launch, and a view runs this at 4 positions)."""
    r, g, b = y.unbind(1)
    minc, maxc = torch.aminmax(y, dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), 0.0)
    dz = delta.clamp_min(1e-8)
    h = torch.where(maxc == r, ((g - b) / dz) % 6, torch.where(maxc == g, (b - r) / dz + 2, (r - g) / dz + 4))
    h = (torch.where(delta > 0, h / 6, 0.0) + shift.view(-1, 1, 1)) % 1.0
    # back to RGB: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6 with n = (5, 3, 1)
    k = (torch.arange(5, 0, -2, device=y.device, dtype=y.dtype).view(1, 3, 1, 1) + (h * 6)[:, None]) % 6
    v = maxc[:, None]
    return (v - v * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 1)


#: torchvision's ColorJitter ops, in the order of its factors (brightness, contrast, saturation, hue).
JITTER_OPS = {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue}


@dataclass
class _Jitter:
    """Colour-jitter draws of a batch: ``ops`` (the names of the active ones of :data:`JITTER_OPS`), ``factors``
    (len(ops), n) and ``takes`` (4 positions, len(ops), n): whether a sample applies op k at position p (each
    sample that jitters applies every op once, in its own random order)."""

    ops: tuple[str, ...]
    factors: torch.Tensor
    takes: torch.Tensor


def _draw_jitter(cfg: AugmentConfig, colour: bool, draw: _Draws) -> _Jitter:
    """Brightness, contrast, saturation and hue factors drawn per sample, and a random order per sample,
    as torchvision's ColorJitter permutes its four ops on every call (saturation and hue do not commute)."""
    apply = draw.rand() < cfg.jitter_p
    b, c, s, hue = cfg.jitter
    ops = [(op, draw.uniform(lo, hi)) for op, strength, lo, hi in (
        ("brightness", b, max(0, 1 - b), 1 + b), ("contrast", c, max(0, 1 - c), 1 + c),
        ("saturation", s if colour else 0, max(0, 1 - s), 1 + s), ("hue", hue if colour else 0, -hue, hue))
        if strength > 0]
    order = draw.rand_rows(4).T.argsort(1)  # a permutation of the 4 slots per sample
    takes = apply & (order.T[:, None, :] == torch.arange(len(ops))[None, :, None])  # (position, slot, sample)
    factors = torch.stack([f for _, f in ops]) if ops else torch.empty(0, draw.n)
    return _Jitter(tuple(op for op, _ in ops), factors, takes)


def _color_jitter(x: torch.Tensor, factors: torch.Tensor, takes: torch.Tensor, ops: tuple[str, ...]) -> torch.Tensor:
    """Apply the drawn jitter on the CPU: each op runs on the rows that take it at that position (a quarter
    of the work of :func:`jitter_whole_batch`, which gives the same views)."""
    y = x.clone()
    for position in range(4):
        for slot, op in enumerate(ops):
            rows = takes[position, slot]
            if rows.any():
                idx = rows.nonzero().squeeze(1)
                y[idx] = JITTER_OPS[op](y[idx], factors[slot][rows])
    return y


def jitter_whole_batch(x: torch.Tensor, factors: torch.Tensor, takes: torch.Tensor, ops: tuple[str, ...]) -> torch.Tensor:
    """Apply the drawn jitter on a GPU, with the views of :func:`_color_jitter`: every position's ops on the whole
    batch, each sample keeping its own result (torch.where). No index tensors, no data-dependent shapes and no host
    checks, so nothing makes the host wait for the device, and ``torch.compile`` can fuse it into a few kernels.

    Uncompiled, each operator is a launch, so a position's brightness, contrast and saturation are one
    computation, ``(y - z) f + z`` clamped to [0, 1], with the sample's own factor ``f`` and ``z`` = 0 for
    brightness, its grey mean for contrast, its grey image for saturation: the same floats as the three
    formulas, in about a third of the operators."""
    slot = {op: i for i, op in enumerate(ops)}
    linear = [op for op in ops if op != "hue"]
    if linear:  # per (position, sample): the factor of the linear op it takes there, and whether it takes one
        f = torch.ones_like(takes[:, 0], dtype=x.dtype)
        for op in linear:
            f = torch.where(takes[:, slot[op]], factors[slot[op]], f)
        any_linear = takes[:, [slot[op] for op in linear]].any(1)
    y = x
    for position in range(4):
        if linear:
            z = 0.0
            if "contrast" in slot or "saturation" in slot:
                gray = _gray(y)
                if "contrast" in slot:
                    z = torch.where(_per_sample(takes[position, slot["contrast"]]), gray.mean(dim=(1, 2, 3), keepdim=True), z)
                if "saturation" in slot:
                    z = torch.where(_per_sample(takes[position, slot["saturation"]]), gray, z)
            y = torch.where(_per_sample(any_linear[position]), ((y - z) * _per_sample(f[position]) + z).clamp(0, 1), y)
        if "hue" in slot:
            y = torch.where(_per_sample(takes[position, slot["hue"]]), _hue(y, factors[slot["hue"]]), y)
    return y


def blur_kernel_size(side: int) -> int:
    """Gaussian-blur kernel size for images of ``side`` pixels: ~10% of the side, odd, at least 3 (SimCLR)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, kernel :func:`blur_kernel_size`, standard deviation ``sigma`` (drawn from
    ``blur_sigma``), on the samples where ``apply`` (both on ``x``'s device)."""
    n, c, h, w = x.shape
    size = blur_kernel_size(min(h, w))
    r = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (n*c, size)
    flat = x.reshape(1, n * c, h, w)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), k.view(n * c, 1, 1, size), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), k.view(n * c, 1, size, 1), groups=n * c)
    return torch.where(_per_sample(apply), flat.view(n, c, h, w), x)


#: Shape and dtype (float32 or bool) of each random parameter of a batch, in the order they are packed.
Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The CPU ``tensors`` (float32 or bool) as one flat float32 tensor on ``device``, in one copy. On a GPU the
    copy is from pinned memory and does not block: each separate copy of ordinary (pageable) memory makes the host
    wait until the device has finished all queued work, which would cost a batch one such stall per parameter."""
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    return flat.to(device, non_blocking=True)


def unpack(flat: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Split the float32 ``flat`` (:func:`pack`) back into the shapes and dtypes of ``layout`` (bool from 0/1)."""
    out, start = [], 0
    for shape, dtype in layout:
        numel = math.prod(shape)
        part = flat[start:start + numel].view(shape)
        out.append(part > 0.5 if dtype == torch.bool else part)
        start += numel
    return out


def augment_drawn(images: torch.Tensor, params: list[torch.Tensor], parts: tuple[str, ...], ops: tuple[str, ...],
                  out_size: int, mean: torch.Tensor, std: torch.Tensor, whole_batch: bool) -> torch.Tensor:
    """Normalised views of a uint8 batch with its random parameters already drawn, all on the batch's device.

    ``params`` are the tensors that ``parts`` name: "crop" (affine matrices), then any of "jitter" (factors and
    takes, :class:`_Jitter`), "gray" (flags), "blur" (sigmas and flags) and "erase" (boxes).
    ``whole_batch``: the GPU's jitter (:func:`jitter_whole_batch`), which has no data-dependent shapes or host
    checks, so on a GPU the whole function compiles as one graph (:func:`compiled_augment`); otherwise the
    CPU's (:func:`_color_jitter`)."""
    params = iter(params)
    x = images.float() / 255
    n, c = x.shape[:2]
    grid = F.affine_grid(next(params), [n, c, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if "jitter" in parts:
        x = (jitter_whole_batch if whole_batch else _color_jitter)(x, next(params), next(params), ops)
    if "gray" in parts:
        x = torch.where(_per_sample(next(params)), _gray(x).expand_as(x), x)
    if "blur" in parts:
        x = _gaussian_blur(x, next(params), next(params))
    x = (x - mean) / std
    if "erase" in parts:
        x = _erase(x, next(params))
    return x


def _augment_packed(images: torch.Tensor, flat: torch.Tensor, layout: Layout, parts: tuple[str, ...],
                    ops: tuple[str, ...], out_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`augment_drawn` on a GPU, from the parameters as :func:`pack` moved them: unpacking, cropping, jitter,
    grayscale, blur, normalisation and erasing in one function, which ``torch.compile`` fuses into a few kernels."""
    return augment_drawn(images, unpack(flat, layout), parts, ops, out_size, mean, std, whole_batch=True)


_COMPILED: dict[str, object] = {}


def compiled_augment(backend: str = "inductor"):
    """:func:`_augment_packed` under ``torch.compile``, made once per backend. Not ``fullgraph``: past torch's
    limit of recompilations (new batch shapes, presets) it then runs uncompiled instead of failing."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_augment_packed, backend=backend)
    return _COMPILED[backend]


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Float batch (n, C, H, W) -> (n, C, size, size): bilinear and antialiased, as torchvision's
    ``Resize((size, size))`` on PIL images, the test transform of CC and CD
    (Yunfan-Li/Contrastive-Clustering modules/transform.py, Hoper-J/Contrastive-Disentangling
    dataset.py). ``size`` None, or already the batch's size: unchanged."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Augmenter:
    """Callable uint8 (n, C, H, W) -> normalised float views. ``None`` config = normalisation only.

    ``out_size`` is the side of every view (the suite's ``image_size``): the random crop box is
    resampled to it, and unaugmented views (:meth:`plain`) are resized to it. ``None``: the
    images' own height. A batch is resized on its device when it is augmented, so a large
    ``out_size`` never holds the whole resized dataset in memory.
    """

    def __init__(self, cfg: AugmentConfig | None, mean, std, allow_flip: bool = True,
                 out_size: int | None = None) -> None:
        self.cfg = cfg
        self.allow_flip = allow_flip
        self.out_size = out_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._stats_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copied once per device
        self.compile_backend: str | None = None  # set by :meth:`compile`

    def compile(self, backend: str = "inductor") -> None:
        """Augment batches off the CPU through ``torch.compile`` (``--compile``): crop, jitter, grayscale, blur,
        normalisation and erasing fused into a few kernels instead of hundreds of launches a view."""
        self.compile_backend = backend

    def start(self, epoch: int, step: int) -> None:
        """Called by the training loop before its first step, at the (epoch, step) it starts from
        (not (0, 0) after a resume). A feed that prefetches batches (the per-image DataLoader
        path) starts there; on-device augmentation needs nothing."""

    def close(self) -> None:
        """Called by the training loop when it ends: stop any worker processes."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0,1] float batch -> (x - mean) / std."""
        if x.dtype == torch.uint8:
            x = x.float() / 255
        mean, std = self._stats(x.device)
        return (x - mean) / std

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, copied there once."""
        if device not in self._stats_on:
            self._stats_on[device] = (self.mean.to(device), self.std.to(device))
        return self._stats_on[device]

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The unaugmented view of a uint8 batch: resized to ``out_size`` (:func:`resize`), normalised.
        What evaluation and the training hooks' plain loader feed the encoder."""
        return self.normalize(resize(images.float() / 255, self.out_size))

    def __call__(self, images: torch.Tensor, g: torch.Generator, rows: slice | None = None,
                 total: int | None = None) -> torch.Tensor:
        """Augment a uint8 batch with parameters drawn from the CPU generator ``g``.

        ``images`` may be rows ``rows`` of a batch of ``total`` (one rank's share in data-parallel
        training): the parameters are drawn for the whole batch and cut to those rows.
        """
        cfg = self.cfg
        if cfg is None:
            return self.normalize(resize(images.float() / 255, self.out_size))
        n, c, h, w = images.shape
        out_size = self.out_size or h
        draw = _Draws(g, n if total is None else total, slice(None) if rows is None else rows)
        if draw.n != n:
            raise ValueError(f"rows {rows} of a batch of {total} hold {draw.n} images, got {n}")
        # every random parameter is drawn on the CPU first, in a fixed order
        params, parts, ops = [_crop_flip_grid(h, w, cfg, self.allow_flip, draw)], ["crop"], ()
        if cfg.jitter_p > 0 and any(cfg.jitter):
            jitter = _draw_jitter(cfg, c == 3, draw)
            params, parts, ops = params + [jitter.factors, jitter.takes], parts + ["jitter"], jitter.ops
        if cfg.grayscale > 0 and c == 3:
            params, parts = params + [draw.rand() < cfg.grayscale], parts + ["gray"]
        if cfg.blur > 0:
            params, parts = params + [draw.uniform(*cfg.blur_sigma), draw.rand() < cfg.blur], parts + ["blur"]
        if cfg.erasing > 0:
            params, parts = params + [_erasing_boxes(out_size, out_size, cfg, draw)], parts + ["erase"]
        mean, std = self._stats(images.device)
        if images.device.type == "cpu":
            return augment_drawn(images, params, tuple(parts), ops, out_size, mean, std, whole_batch=False)
        # then moved in one copy, and applied by one function (compiled with ``--compile``)
        layout = tuple((tuple(t.shape), t.dtype) for t in params)
        apply = compiled_augment(self.compile_backend) if self.compile_backend else _augment_packed
        return apply(images, pack(params, images.device), layout, tuple(parts), ops, out_size, mean, std)
