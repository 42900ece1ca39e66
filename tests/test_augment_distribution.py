"""The batched on-device augmentation and the per-image torchvision pipeline draw the same augmentations (#8).

Not equality: the two pipelines draw their random parameters from different streams. Each check
augments one synthetic image N times with both, reads a statistic off every output and compares
the two samples (two-sample Kolmogorov-Smirnov test, or a binomial tolerance for rates):

* geometry: a coordinate image (channel 0 = 8 x column, channel 1 = 8 x row) turns every output
  pixel into the source position it was sampled from, so the crop's width, height, area fraction,
  aspect ratio and centre and the flip can be read off each view exactly;
* colour: each jitter op alone (the strengths of the ``cld`` and ``simclr`` presets) on a
  four-colour patch image, read as mean luma (brightness), luma std (contrast), mean HSV saturation
  and circular mean hue; grayscale rate and all statistics of the whole ``simclr``, ``cld`` and
  ``cc`` presets; and each jitter op against torchvision's functional op on known factors (exact);
* blur: mean absolute horizontal gradient of a noise image (``simclr_blur``), and the kernel rule.

The per-image pipeline runs with both backends of :mod:`harness.data.pil_augment`: ``tensor`` (the
torchvision transforms in floating point: KS at alpha = 1e-3) and ``pil`` (the classic path: PIL
truncates every op's result to 8 bits and quantises hue shifts to 1/255 turn, so its checks allow
a KS distance of 0.08; the geometry needs no allowance). Outputs of both sides are put on the
8-bit grid before colour statistics so that exact ties (views left unjittered) stay ties.

The jitter-order check: torchvision's ColorJitter applies its four ops in a random order per
image, and so does ``augment._color_jitter`` (saturation and hue do not commute, which a constant
colour image shows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from scipy.stats import ks_2samp

from harness.data.augment import AugmentConfig, Augmenter, get_preset
from harness.data.pil_augment import (BACKENDS, LoaderAugmenter, PerImageAugmenter, TrainOrderSampler,
                                 blur_kernel_size, per_image_loader, per_image_transform)

N = 2000            # views per pipeline and check
ALPHA = 1e-3        # KS significance for the float pipelines (seeds are fixed: the outcome is deterministic)
PIL_MAX_KS = 0.08   # KS distance allowed against the 8-bit PIL pipeline (quantisation; see the docstring)
IDENTITY_CROP = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- images and sampling
def coordinate_image(side: int = 32) -> torch.Tensor:
    """uint8 (3, side, side): channel 0 = 8 x column, channel 1 = 8 x row, channel 2 = 128."""
    x = torch.arange(side) * 8
    return torch.stack([x[None, :].expand(side, side), x[:, None].expand(side, side),
                        torch.full((side, side), 128)]).to(torch.uint8)


def patch_image(side: int = 16) -> torch.Tensor:
    """uint8 (3, side, side): four quadrants of different saturated colours."""
    colours = torch.tensor([[200, 60, 50], [40, 160, 90], [70, 80, 210], [230, 220, 120]], dtype=torch.uint8)
    img, h = torch.empty(3, side, side, dtype=torch.uint8), side // 2
    for k, (r, c) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        img[:, r:r + h, c:c + h] = colours[k, :, None, None]
    return img


def constant_image(colour, side: int = 16) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, side, side).contiguous()


def noise_image(side: int = 64) -> torch.Tensor:
    return (torch.rand(3, side, side, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


_CACHE: dict = {}


def both(cfg: AugmentConfig, image: torch.Tensor, backend: str, n: int = N, allow_flip: bool = True,
         out_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n views of ``image`` by the batched Augmenter and by the per-image pipeline, in [0, 1]."""
    key = (cfg, image.numpy().tobytes(), backend, n, allow_flip, out_size)
    if key not in _CACHE:
        batch = image[None].expand(n, -1, -1, -1).contiguous()
        mean, std = (0.0,) * image.shape[0], (1.0,) * image.shape[0]
        batched = Augmenter(cfg, mean, std, allow_flip, out_size)(batch, torch.Generator().manual_seed(0))
        per_image = PerImageAugmenter(cfg, mean, std, allow_flip, out_size, backend=backend)(
            batch, torch.Generator().manual_seed(1))
        _CACHE[key] = batched, per_image
    return _CACHE[key]


def on_8bit_grid(x: torch.Tensor) -> torch.Tensor:
    return (x.double().clamp(0, 1) * 255).round() / 255


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, what: str, backend: str) -> None:
    res = ks_2samp(a.numpy(), b.numpy())
    detail = (f"{what}: batched mean {a.mean():.4f} (q05 {a.quantile(0.05):.4f}, q95 {a.quantile(0.95):.4f}), "
              f"per-image[{backend}] mean {b.mean():.4f} (q05 {b.quantile(0.05):.4f}, q95 {b.quantile(0.95):.4f}), "
              f"KS D = {res.statistic:.4f}, p = {res.pvalue:.2g}")
    if backend == "pil":
        assert res.statistic <= PIL_MAX_KS, detail
    else:
        assert res.pvalue > ALPHA, detail


def assert_same_rate(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    pa, pb = float(a.double().mean()), float(b.double().mean())
    p = (pa + pb) / 2
    tol = 4 * math.sqrt(max(p * (1 - p), 1 / len(a)) * (1 / len(a) + 1 / len(b)))
    assert abs(pa - pb) <= tol, f"{what}: batched rate {pa:.4f}, per-image rate {pb:.4f} (tolerance {tol:.4f})"


# ----------------------------------------------------------------------------- geometry
def geometry(views: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
    """Crop box and flip of each view of :func:`coordinate_image` (``side`` px), from its pixels.

    Output pixel i of a crop of width w starting at x0 samples source position
    x0 + w (i + 0.5) / S - 0.5 (S = output side), so channel 0 is a ramp of slope 8 w / S (negative
    when flipped) whose value at the view's centre is 8 (x0 + w / 2 - 0.5). The ramp is fitted on
    the central half (never clamped at the image border); widths are integers and centres
    half-integers by construction, so the estimates are rounded to them.
    """
    v = views.double() * 255 / 8
    s = views.shape[-1]
    q = torch.arange(s // 4, 3 * s // 4, dtype=torch.float64)
    qc = q - q.mean()

    def ramp(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = profile[:, s // 4:3 * s // 4]
        slope = (p - p.mean(1, keepdim=True)) @ qc / (qc @ qc)
        return slope, p.mean(1) + slope * ((s - 1) / 2 - q.mean())

    sx, cx = ramp(v[:, 0].mean(1))
    sy, cy = ramp(v[:, 1].mean(2))
    w, h = (sx.abs() * s).round(), (sy.abs() * s).round()
    return {"width": w, "height": h, "area": w * h / side**2, "ratio": w / h,
            "centre_x": ((cx + 0.5) * 2).round() / 2, "centre_y": ((cy + 0.5) * 2).round() / 2,
            "flipped": sx < 0}


def test_geometry_reader_recovers_known_crops():
    img = coordinate_image(32).float() / 255
    for top, left, h, w, out, flip in [(0, 0, 32, 32, 32, False), (3, 5, 20, 11, 32, True), (10, 0, 9, 12, 24, False)]:
        view = T.functional.resized_crop(img, top, left, h, w, [out, out], antialias=True)
        if flip:
            view = view.flip(-1)
        g = geometry(view[None], 32)
        assert (g["width"].item(), g["height"].item()) == (w, h)
        assert (g["centre_x"].item(), g["centre_y"].item()) == (left + w / 2, top + h / 2)
        assert g["flipped"].item() == flip


#: Crop ranges unlike every preset's (all end at area 1 and share the 3/4-4/3 ratios): catches either pipeline
#: ignoring the configured largest area or the configured ratios.
NARROW = {"crop_scale": (0.2, 0.6), "crop_ratio": (0.5, 2.0)}
GEOMETRY_CASES = [  # (preset, overrides, out_size, backend); both backends share torchvision's crop sampling
    # (RandomResizedCrop.get_params): one tensor case
    ("simclr", {}, None, "pil"), ("cld", {}, None, "pil"), ("mild", {}, None, "pil"), ("simclr", {}, 24, "pil"),
    ("cld", {}, None, "tensor"), ("simclr", NARROW, None, "pil")]


@pytest.mark.parametrize("preset,overrides,out_size,backend", GEOMETRY_CASES,
                         ids=[f"{p}{'-narrow' if o else ''}-{s}-{b}" for p, o, s, b in GEOMETRY_CASES])
def test_crop_and_flip_distributions(preset, overrides, out_size, backend):
    cfg = get_preset(preset, jitter_p=0.0, grayscale=0.0, blur=0.0, **overrides)
    batched, per_image = both(cfg, coordinate_image(32), backend, out_size=out_size)
    a, b = geometry(batched, 32), geometry(per_image, 32)
    lo, hi = cfg.crop_scale
    for g in (a, b):  # areas within the scale range, up to rounding the sides to pixels
        assert g["area"].min() >= lo * 0.8 and g["area"].max() <= min(hi * 1.1, 1.0)
        assert g["ratio"].min() >= cfg.crop_ratio[0] * 0.8 and g["ratio"].max() <= cfg.crop_ratio[1] * 1.25
    for key in ("width", "height", "area", "ratio", "centre_x", "centre_y"):
        res = ks_2samp(a[key].numpy(), b[key].numpy())
        assert res.pvalue > ALPHA, (f"{preset} out_size={out_size} {key}: batched mean {a[key].mean():.3f}, "
                                    f"per-image[{backend}] mean {b[key].mean():.3f}, KS D = {res.statistic:.4f}, "
                                    f"p = {res.pvalue:.2g}")
    assert_same_rate(a["flipped"], b["flipped"], f"{preset} flip rate")
    assert abs(a["flipped"].double().mean() - cfg.flip) < 0.05


def test_no_flips_when_not_allowed():
    cfg = get_preset("simclr", jitter_p=0.0, grayscale=0.0)
    batched, per_image = both(cfg, coordinate_image(32), "pil", n=300, allow_flip=False)
    assert not geometry(batched, 32)["flipped"].any() and not geometry(per_image, 32)["flipped"].any()


def test_flips_happen_at_the_configured_probability():
    """Both pipelines flip at ``flip`` = 0.2 (at the presets' 0.5, flipping at 1 - p would pass unseen)."""
    cfg = get_preset("simclr", flip=0.2, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale=0.0)
    for views in both(cfg, coordinate_image(32), "tensor", n=1000):
        assert abs(geometry(views, 32)["flipped"].double().mean() - 0.2) < 0.05


# ----------------------------------------------------------------------------- colour
def colour_stats(views: torch.Tensor) -> dict[str, torch.Tensor]:
    x = on_8bit_grid(views)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    maxc, minc = x.max(1).values, x.min(1).values
    saturation = torch.where(maxc > 0, (maxc - minc) / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    r, g, b = x.unbind(1)
    delta = (maxc - minc).clamp_min(1e-12)
    hue = torch.where(maxc == r, ((g - b) / delta) % 6,
                      torch.where(maxc == g, (b - r) / delta + 2, (r - g) / delta + 4))
    angle = hue[:, :x.shape[-2] // 2, :x.shape[-1] // 2] * (math.pi / 3)  # the top-left (red) patch
    return {"brightness": luma.mean((1, 2)), "contrast": luma.std((1, 2)),
            "saturation": saturation.mean((1, 2)),
            "hue": torch.atan2(angle.sin().mean((1, 2)), angle.cos().mean((1, 2))) / (2 * math.pi),
            "grayscale": (maxc - minc).amax((1, 2)) < 1.5 / 255}


JITTER_OPS = [  # (op, preset whose strength is used, index in jitter, statistic it moves)
    ("brightness", "cld", 0, "brightness"),
    ("contrast", "cld", 1, "contrast"),
    ("saturation", "cld", 2, "saturation"),
    ("hue", "cld", 3, "hue"),
    ("hue", "simclr", 3, "hue"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,preset,index,stat", JITTER_OPS, ids=[f"{o}-{p}" for o, p, _, _ in JITTER_OPS])
def test_single_jitter_op_distribution(op, preset, index, stat, backend):
    """One jitter op at a time (order plays no part): its factor range and the jitter probability."""
    base = get_preset(preset)
    jitter = tuple(v if i == index else 0.0 for i, v in enumerate(base.jitter))
    cfg = replace(base, jitter=jitter, grayscale=0.0, **IDENTITY_CROP)
    batched, per_image = both(cfg, patch_image(), backend)
    assert_same_distribution(colour_stats(batched)[stat], colour_stats(per_image)[stat],
                             f"{preset} {op} {jitter} -> {stat}", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["simclr", "cld", "cc"])
def test_whole_preset_colour_distribution(preset, backend):
    """Crop, jitter (all four ops), grayscale together: every statistic and the grayscale rate."""
    cfg = get_preset(preset)
    batched, per_image = both(cfg, patch_image(), backend)
    a, b = colour_stats(batched), colour_stats(per_image)
    for stat in ("brightness", "contrast", "saturation", "hue"):
        assert_same_distribution(a[stat], b[stat], f"{preset} -> {stat}", backend)
    assert_same_rate(a["grayscale"], b["grayscale"], f"{preset} grayscale rate")
    assert abs(a["grayscale"].double().mean() - cfg.grayscale) < 0.04


def test_each_jitter_op_equals_torchvisions_on_known_factors():
    """Brightness, contrast, saturation and hue, each with its own factor per sample, equal torchvision's
    functional ops (what ColorJitter applies) image by image. Catches contrast blending with each channel's
    own mean instead of the whole image's mean gray level: that leaves luma, the statistic the distribution
    checks read, unchanged. Up to torchvision's gray weights (red 0.2989, here 0.299)."""
    from torchvision.transforms import functional as TF

    from harness.data.augment import _brightness, _contrast, _hue, _saturation

    images = torch.stack([patch_image(16), noise_image(16), patch_image(16).flip(0), noise_image(16).flip(0)]) / 255
    for op, reference, factors in [(_brightness, TF.adjust_brightness, [0.6, 1.3, 0.8, 1.4]),
                                   (_contrast, TF.adjust_contrast, [0.6, 1.3, 0.8, 1.4]),
                                   (_saturation, TF.adjust_saturation, [0.6, 1.3, 0.0, 1.4]),
                                   (_hue, TF.adjust_hue, [-0.4, 0.3, 0.1, -0.05])]:
        expected = torch.stack([reference(image, f) for image, f in zip(images, factors)])
        torch.testing.assert_close(op(images, torch.tensor(factors)), expected, atol=3e-4, rtol=0, msg=op.__name__)


def test_jitter_order_matches_torchvision():
    colour = (180, 60, 60)
    cfg = replace(get_preset("cld"), jitter=(0.0, 0.0, 0.4, 0.4), jitter_p=1.0, grayscale=0.0, **IDENTITY_CROP)
    batched, per_image = both(cfg, constant_image(colour), "tensor", n=1000)
    luma = (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) / 255
    a, b = (max(colour) / 255 - luma), (luma - min(colour) / 255)

    # saturation then hue keeps (b V + a m) / (a + b) at the input's luma (V, m: max and min channel);
    # hue then saturation shifts it by (1 - s)(luma' - luma), luma' that of the rotated colour
    def moved(views):
        v, m = views.amax((1, 2, 3)).double(), views.amin((1, 2, 3)).double()
        return ((b * v + a * m) / (a + b) - luma).abs() > 2 / 255

    fa, fb = moved(batched).double().mean().item(), moved(per_image).double().mean().item()
    assert abs(fa - fb) < 0.05, f"fraction of views with the luma invariant moved: batched {fa:.3f}, per-image {fb:.3f}"


# ----------------------------------------------------------------------------- blur
def sharpness(views: torch.Tensor) -> torch.Tensor:
    x = on_8bit_grid(views)
    return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_distribution(backend):
    cfg = get_preset("simclr_blur", jitter_p=0.0, grayscale=0.0, **IDENTITY_CROP)
    batched, per_image = both(cfg, noise_image(64), backend, n=1000)
    a, b = sharpness(batched), sharpness(per_image)
    assert_same_distribution(a, b, "simclr_blur -> sharpness", backend)
    unblurred = sharpness(noise_image(64)[None].float() / 255)
    assert_same_rate(a < unblurred - 1e-6, b < unblurred - 1e-6, "blur rate")


def test_blur_happens_at_the_configured_probability():
    """Both pipelines blur at ``blur`` = 0.2 (the presets' 0.5 would not show blurring at 1 - p); sigmas of
    1-2 px so that every blurred view is visibly smoother than the image."""
    cfg = get_preset("simclr_blur", blur=0.2, blur_sigma=(1.0, 2.0), jitter_p=0.0, grayscale=0.0, **IDENTITY_CROP)
    unblurred = sharpness(noise_image(64)[None].float() / 255)
    for views in both(cfg, noise_image(64), "tensor", n=1000):
        assert abs((sharpness(views) < unblurred - 1e-6).double().mean() - 0.2) < 0.05


@pytest.mark.parametrize("side,size", [(8, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_is_a_tenth_of_the_side_rounded_to_odd(side, size):
    """SimCLR's rule (App. A: 10% of the side); 23 px at 224 is SimCLR's and CC's ImageNet kernel. Both
    pipelines take the size from this function, so comparing them cannot catch a slip in it."""
    assert blur_kernel_size(side) == size


@pytest.mark.parametrize("side", [32, 64, 96])
def test_blur_kernel_rule_matches(side):
    """Same kernel size and sigma: the batched blur equals torchvision's GaussianBlur on the same image."""
    image = noise_image(side)
    cfg = AugmentConfig(blur=1.0, blur_sigma=(1.3, 1.3), jitter_p=0.0, grayscale=0.0, **IDENTITY_CROP)
    batched = Augmenter(cfg, (0.0,) * 3, (1.0,) * 3)(image[None], torch.Generator().manual_seed(0))[0]
    reference = T.GaussianBlur(blur_kernel_size(side), sigma=(1.3, 1.3))(image.float() / 255)
    assert torch.allclose(batched, reference, atol=1e-5)


# ----------------------------------------------------------------------------- erasing
def erased_boxes(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top, left, height and width of the zeroed box in each view of a white image (height and width 0: none),
    and whether the zeros fill exactly that box."""
    zero = (views == 0).all(1)  # (n, H, W)
    spans = {}
    for name, mask in (("top", zero.any(2)), ("left", zero.any(1))):
        count = mask.sum(1)
        spans[name] = torch.where(count > 0, mask.to(torch.uint8).argmax(1), 0).double()
        spans["height" if name == "top" else "width"] = count.double()
    spans["filled"] = zero.sum((1, 2)).double() == spans["height"] * spans["width"]
    return spans


@pytest.mark.parametrize("scale,ratio", [((0.02, 0.33), (0.3, 3.3)), ((0.1, 0.5), (1.5, 3.0)), ((0.4, 0.9), (0.3, 3.3))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_erasing_boxes_distribution(scale, ratio, backend):
    """Random erasing (CLD's ``--erasing``: torchvision's RandomErasing(p=1) after normalisation, value 0) zeroes
    one box per view with the same height, width, top and left distributions in both pipelines: torchvision's
    defaults, boxes taller than wide (ratio 1.5-3: height = sqrt(area x ratio)), and large boxes that often find
    no fitting try in 10 (those views are left whole, as often in both). Catches: height and width swapped,
    ``<=`` for torchvision's strict fit test, positions off by one or biased, the area drawn from another
    range, erasing before normalisation (the box would not be 0 here), a box not filled."""
    cfg = AugmentConfig(jitter_p=0.0, grayscale=0.0, erasing=1.0, erasing_scale=scale, erasing_ratio=ratio,
                        **IDENTITY_CROP)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    a, b = (erased_boxes(views) for views in both(cfg, white, backend))
    assert a["filled"].all() and b["filled"].all()
    assert_same_rate(a["height"] > 0, b["height"] > 0, f"erased views at scale {scale}")
    erased = a["height"] > 0
    assert (a["height"][erased] < 32).all() and (a["top"] + a["height"] <= 32).all()
    assert (a["width"][erased] < 32).all() and (a["left"] + a["width"] <= 32).all()
    for key in ("height", "width", "top", "left"):
        assert_same_distribution(a[key], b[key], f"erasing {key} (scale {scale}, ratio {ratio})", backend)


def test_erasing_happens_at_the_configured_probability_after_the_other_ops():
    """At ``erasing`` 0.3 about 30% of views have a box, in both pipelines; and the box is 0 in normalised units
    (the mean colour), whatever the normalisation. Catches: the probability compared the wrong way round, the box
    filled before normalisation (it would read -mean/std)."""
    cfg = AugmentConfig(jitter_p=0.0, grayscale=0.0, erasing=0.3, **IDENTITY_CROP)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    for views in both(cfg, white, "tensor", n=1000):
        assert abs(float((erased_boxes(views)["height"] > 0).double().mean()) - 0.3) < 0.05
    batch = white[None].expand(200, -1, -1, -1)
    views = Augmenter(cfg, (0.5,) * 3, (0.25,) * 3)(batch, torch.Generator().manual_seed(0))
    assert set(views.unique().tolist()) == {0.0, 2.0}  # (1 - 0.5) / 0.25 outside the boxes


def test_per_image_blur_uses_the_batched_pipelines_kernel_size():
    """The per-image (torchvision) pipeline blurs with the kernel size of the batched one,
    ``blur_kernel_size(side)`` (5 for 40 px), so with a fixed sigma and the crop, flip, jitter and grayscale
    switched off both pipelines give the same view of a noise image. Catches: the per-image GaussianBlur built
    with another kernel size (e.g. ``blur_kernel_size(size) + 2``), which the distribution tests, reading
    a mean gradient, do not separate."""
    from harness.data.augment import AugmentConfig, Augmenter, blur_kernel_size
    from harness.data.pil_augment import per_image_transform

    side, sigma = 40, 1.5
    image = torch.randint(0, 256, (3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale=0.0,
                        blur=1.0, blur_sigma=(sigma, sigma))
    mean, std = (0.0,) * 3, (1.0,) * 3
    torch.manual_seed(1)
    per_image = per_image_transform(cfg, mean, std, side, 3, backend="tensor")(image.float() / 255)
    batched = Augmenter(cfg, mean, std)(image[None], torch.Generator().manual_seed(0))[0]
    # independent reference: separable Gaussian of width blur_kernel_size(40) = 5, reflect padding
    size = blur_kernel_size(side)
    assert size == 5
    r = torch.arange(size, dtype=torch.float32) - size // 2
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad((image.float() / 255)[None], (2, 2, 2, 2), mode="reflect")
    reference = F.conv2d(F.conv2d(x, k.view(1, 1, 1, size).repeat(3, 1, 1, 1), groups=3),
                         k.view(1, 1, size, 1).repeat(3, 1, 1, 1), groups=3)[0]
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_image, reference, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the per-image API
def test_unmapped_config_field_is_a_clear_error():
    @dataclass(frozen=True)
    class WithSolarize(AugmentConfig):
        solarize: float = 0.2

    with pytest.raises(ValueError, match="solarize"):
        per_image_transform(WithSolarize(), (0.5,) * 3, (0.5,) * 3, size=32)
    with pytest.raises(ValueError, match="solarize"):
        PerImageAugmenter(WithSolarize(), (0.5,) * 3, (0.5,) * 3)


def test_per_image_augmenter_is_seeded_by_the_generator_and_splits_by_rows():
    images = (torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    aug = PerImageAugmenter(get_preset("simclr"), (0.5,) * 3, (0.25,) * 3)
    state = torch.get_rng_state()
    first = aug(images, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(first, aug(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, aug(images, torch.Generator().manual_seed(4)))
    part = aug(images[2:4], torch.Generator().manual_seed(3), slice(2, 4), 6)  # one rank's share of the batch
    assert torch.equal(part, first[2:4])


def test_a_sampler_started_mid_run_gives_the_batches_of_an_unbroken_run_from_there():
    """A resumed per-image run (training_feed starts its sampler at train()'s (epoch, step)) is fed the
    batches an unbroken run gets from that step on. Catches a start that drops the step within the epoch."""
    whole = list(TrainOrderSampler(40, 16, seed=5, steps=6))  # 2 steps per epoch
    assert list(TrainOrderSampler(40, 16, seed=5, steps=3, start=(1, 1))) == whole[3:]
    assert list(TrainOrderSampler(40, 16, seed=5, steps=2, start=(2, 0))) == whole[4:]


def test_dataset_and_loader_give_views_and_index():
    images = (torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = per_image_loader(images, None, mean, std, views=2, batch_size=8, num_workers=1, seed=0)
    seen = []
    norm = Augmenter(None, mean, std)
    for v1, v2, index in loader:
        assert v1.shape == (8, 3, 12, 12) and index.dtype == torch.int64
        assert torch.allclose(v1, norm.normalize(images[index]), atol=1e-6) and torch.equal(v1, v2)
        seen += index.tolist()
    assert sorted(seen) == list(range(40))
    loader = per_image_loader(images, get_preset("simclr"), mean, std, views=3, batch_size=8, num_workers=0,
                              out_size=16)
    *views, index = next(iter(loader))
    assert len(views) == 3 and views[0].shape == (8, 3, 16, 16) and not torch.equal(views[0], views[1])


def test_loader_augmenter_feeds_train_in_its_order(tmp_path):
    """train() run on the DataLoader path: the sampler reproduces train's batch order across epochs."""
    from harness.models.backbones import create_backbone
    from harness.engine.budget import Budget
    from harness.engine.train import train
    from methods import DataInfo, create_method, resolve_config
    from methods.simclr import SimCLR

    images = (torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    cfg = resolve_config(SimCLR, "cpu", {"batch_size": 16})
    sampler = TrainOrderSampler(len(images), 16, seed=5, steps=5)  # 2 steps per epoch: crosses epochs
    loader = per_image_loader(images, get_preset("mild"), (0.5,), (0.25,), views=2, batch_sampler=sampler,
                              num_workers=0)
    aug = LoaderAugmenter(loader, images, (0.5,), (0.25,), views=2)
    method = create_method("simclr", create_backbone("small_cnn", 1), cfg, DataInfo(40, (1, 8, 8)))
    result = train(method, images, None, Budget("steps", 5), aug, cfg, device="cpu", seed=5,
                   generator=torch.Generator().manual_seed(0), quiet=True)
    assert result.status == "ok" and len(aug.step_times) == 5
    wrong = LoaderAugmenter(per_image_loader(images, None, (0.5,), (0.25,), views=2, num_workers=0,
                                             batch_sampler=TrainOrderSampler(40, 16, seed=6, steps=1)),
                            images, (0.5,), (0.25,), views=2)
    with pytest.raises(RuntimeError, match="order"):
        train(create_method("simclr", create_backbone("small_cnn", 1), cfg, DataInfo(40, (1, 8, 8))), images, None,
              Budget("steps", 1), wrong, cfg, device="cpu", seed=5, generator=torch.Generator(), quiet=True)


#: Jitter configurations: the presets' (all four ops) and ones with some ops off, on 3- and 1-channel images.
JITTERS = [pytest.param("simclr", {}, 3, id="simclr"), pytest.param("cld", {}, 3, id="cld"),
           pytest.param("cc", {}, 3, id="cc"), pytest.param("mild", {}, 1, id="mild-1-channel"),
           pytest.param("simclr", {}, 1, id="simclr-1-channel"),
           pytest.param("simclr", {"jitter": [0.4, 0, 0, 0]}, 3, id="brightness-only"),
           pytest.param("simclr", {"jitter": [0, 0, 0, 0.3]}, 3, id="hue-only"),
           pytest.param("simclr", {"jitter": [0.4, 0, 0, 0.3]}, 3, id="brightness-hue"),
           pytest.param("simclr", {"jitter": [0, 0, 0.5, 0.3]}, 3, id="saturation-hue")]


@pytest.mark.parametrize("preset, overrides, channels", JITTERS)
def test_jitter_of_the_whole_batch_with_a_select_gives_the_rows_own_jitter(preset, overrides, channels):
    """The GPU path (every op on the whole batch, each sample keeps its own result) gives bit for bit the
    views of the CPU path (each op on the rows that take it at that position). Catches: a select that
    keeps another position's or op's result, a factor of the whole batch applied to a subset, a sample changed
    at a position where it takes no op."""
    from harness.data.augment import _Draws, _color_jitter, _draw_jitter, jitter_whole_batch

    # a little outside [0, 1], as an interpolation's rounding can leave pixels: a sample that takes no op at a
    # position keeps them there (a clamp of every sample at every position would not)
    x = torch.rand(64, channels, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.02 - 0.01
    cfg = get_preset(preset, **overrides)
    jitter = _draw_jitter(cfg, channels == 3, _Draws(torch.Generator().manual_seed(1), 64, slice(None)))
    assert jitter.ops and jitter.takes.sum(1).le(1).all()  # at each position a sample takes at most one op
    rows_only = _color_jitter(x, jitter.factors, jitter.takes, jitter.ops)
    whole = jitter_whole_batch(x, jitter.factors, jitter.takes, jitter.ops)
    assert torch.equal(rows_only, whole) and not torch.equal(rows_only, x)


def test_a_batchs_parameters_unpack_to_their_shapes_and_dtypes():
    """What the GPU path copies in one go (crop matrices, jitter factors and flags, grayscale and blur
    draws) comes back as it went. Catches an offset or shape slip in the split."""
    from harness.data.augment import pack, unpack

    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(5, 2, 3, generator=g), torch.rand(3, 5, generator=g), torch.rand(4, 3, 5, generator=g) < 0.5,
               torch.rand(5, generator=g) < 0.2, torch.rand(5, generator=g)]
    back = unpack(pack(tensors, torch.device("cpu")), tuple((tuple(t.shape), t.dtype) for t in tensors))
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(back, tensors))


@pytest.mark.parametrize("preset,overrides", [("simclr", {}), ("cld", {}), ("simclr_blur", {}),
                                              ("simclr_blur", {"erasing": 1.0})])
def test_the_gpu_path_compiles_as_one_graph_and_gives_the_cpu_views(preset, overrides):
    """On a GPU, ``Augmenter`` packs a batch's parameters and applies them in one function, which ``--compile``
    runs through torch.compile: it traces as one graph (fullgraph: no host checks, no data-dependent shapes) and
    gives, bit for bit, the CPU path's views (which jitter only the rows that take each op). Traced here with the
    eager backend (inductor's code generation is exercised on a GPU by tests/test_cuda.py)."""
    from harness.data.augment import (Augmenter, _augment_packed, _crop_flip_grid, _draw_jitter, _Draws, _erasing_boxes,
                                      augment_drawn, compiled_augment, pack)

    cfg = get_preset(preset, **overrides)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draw = _Draws(torch.Generator().manual_seed(1), 32, slice(None))
    jitter = _draw_jitter(cfg, True, draw)
    params = [_crop_flip_grid(8, 8, cfg, True, draw), jitter.factors, jitter.takes, draw.rand() < cfg.grayscale]
    parts = ["crop", "jitter", "gray"]
    if cfg.blur:
        params, parts = params + [draw.uniform(*cfg.blur_sigma), draw.rand() < cfg.blur], parts + ["blur"]
    if cfg.erasing:
        params, parts = params + [_erasing_boxes(8, 8, cfg, draw)], parts + ["erase"]
    mean, std = Augmenter(cfg, (0.5,) * 3, (0.25,) * 3)._stats(torch.device("cpu"))
    expected = augment_drawn(images, params, tuple(parts), jitter.ops, 8, mean, std, whole_batch=False)
    args = (images, pack(params, torch.device("cpu")), tuple((tuple(t.shape), t.dtype) for t in params), tuple(parts),
            jitter.ops, 8, mean, std)
    assert torch.equal(_augment_packed(*args), expected)
    torch._dynamo.reset()
    one_graph = torch.compile(_augment_packed, fullgraph=True, backend="eager")  # raises on a graph break
    assert torch.equal(one_graph(*args), expected)
    assert torch.equal(compiled_augment("eager")(*args), expected)


def test_loader_workers_leave_ctrl_c_to_the_training_loop():
    """Ctrl-C reaches every process of the group: the per-image path's workers ignore it, so the loop can
    finish its step and checkpoint (a worker killed by it failed the step first)."""
    import signal

    from harness.data.pil_augment import per_image_loader

    images = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    loader = per_image_loader(images, None, (0.5,), (0.25,), batch_size=4, num_workers=1)
    previous = signal.getsignal(signal.SIGINT)
    try:
        loader.worker_init_fn(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert per_image_loader(images, None, (0.5,), (0.25,), batch_size=4, num_workers=0).worker_init_fn is None


def sequential_crop_boxes(h: int, w: int, cfg, g: torch.Generator, n: int):
    """torchvision's RandomResizedCrop sampling written try by try for each sample, from the draws the
    harness takes (per try: area, log-ratio, x0, y0 for the whole batch): (cw, ch, x0, y0) or None."""
    u = [[torch.rand(n, generator=g) for _ in range(4)] for _ in range(10)]
    lo, hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    boxes = []
    for i in range(n):
        box = None
        for area_u, ratio_u, x_u, y_u in u:
            target = float((cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * area_u[i:i + 1]) * h * w)
            ratio = float(torch.exp(lo + (hi - lo) * ratio_u[i:i + 1]))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                box = (cw, ch, math.floor(float(x_u[i]) * (w - cw + 1)), math.floor(float(y_u[i]) * (h - ch + 1)))
                break
        boxes.append(box)
    return boxes


@pytest.mark.parametrize("crop_scale,crop_ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.8, 1.0), (0.5, 3.0))])
def test_crop_boxes_are_the_first_try_that_fits(crop_scale, crop_ratio):
    """The 10 tries computed at once keep, per sample, the first that fits, as a try-by-try loop does; no
    try fits -> the whole image (the second setting forces that often). Catches: the last fitting try kept,
    draws of one try used for another, the fallback applied to samples that found a box."""
    from harness.data.augment import AugmentConfig, _crop_flip_grid, _Draws

    cfg = AugmentConfig(crop_scale=crop_scale, crop_ratio=crop_ratio, flip=0.0)
    h, w, n = 20, 33, 300
    theta = _crop_flip_grid(h, w, cfg, False, _Draws(torch.Generator().manual_seed(3), n, slice(None)))
    boxes = sequential_crop_boxes(h, w, cfg, torch.Generator().manual_seed(3), n)
    assert 0 < sum(box is None for box in boxes) < n if crop_scale[0] > 0.5 else None not in boxes
    for i, box in enumerate(boxes):
        cw, ch, x0, y0 = box or (w, h, 0, 0)
        expected = [cw / w, ch / h, (x0 + cw / 2) / w * 2 - 1, (y0 + ch / 2) / h * 2 - 1]
        got = [theta[i, 0, 0], theta[i, 1, 1], theta[i, 0, 2], theta[i, 1, 2]]
        assert [float(v) for v in got] == pytest.approx(expected, abs=1e-6), i
