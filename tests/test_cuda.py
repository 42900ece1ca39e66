"""Training and evaluation on CUDA (issue 15): every test body runs on each device of ``DEVICES``.

``cuda`` (marker ``cuda``) runs where torch sees a GPU and is skipped elsewhere, so CI stays
green; there each method trains 20 steps at its paper configuration with ResNet-18 (CIFAR
stem) on CIFAR-sized uint8 data. ``cpu`` runs the same bodies at CPU scale (small CNN, CPU
configs, 64 images of 8 px, 2 steps) so that the tests themselves are exercised on every machine.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import methods.sela
from harness.data.augment import Augmenter, get_preset
from harness.models.backbones import create_backbone
from harness.models.batchnorm import SplitBatchNorm
from harness.bench.gpu import synthetic_cifar
from harness.engine.budget import Budget
from harness.engine.seeding import seed_everything
from harness.engine.train import TrainResult, train
from methods import METHODS, Batch, DataInfo, create_method, resolve_config
from methods.sinkhorn import sinkhorn_knopp
from protocols.clustering import kmeans
from protocols.knn import weighted_knn_predict
from tests.test_sinkhorn import official_loop

#: The shipped adapters (``methods/``) that train; test modules register throwaway ones (NaN losses, kills).
TRAINED = [name for name in METHODS.names()
           if METHODS.get(name).trains and METHODS.get(name).__module__.startswith("methods.")]
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA GPU")])]
#: Per device: training scale, backbone, images, side in px, training steps.
SCALE = {"cuda": ("paper", "resnet18_cifar", 2048, 32, 20), "cpu": ("cpu", "small_cnn", 64, 8, 2)}
#: |loss_bf16 - loss_fp32| <= BF16_REL_TOL * |loss_fp32| at the first step. bf16 keeps 8 significant bits
#: (relative rounding 2^-9 per operation); a ResNet-18 forward accumulates about 1e-2 of relative error in
#: its features, and temperatures of 0.07-0.5 magnify logit errors 2-14x before the log-sum-exp, whose
#: value at initialisation (log of the batch or bank size, 4-8) damps them again.
BF16_REL_TOL = 0.05


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


class StepLosses:
    """A training logger that keeps every step's loss and kills the run during step ``kill_at``, after its
    update and before its checkpoint."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.kill_at = kill_at

    def log_scalars(self, step: int, scalars: dict) -> None:
        if step == self.kill_at:
            raise Killed(f"killed in step {step}")  # the checkpoint holds step - 1
        self.losses.append(scalars["train/loss"])


def train_steps(name: str, device: str, steps: int, *, precision: str = "auto", checkpoint=None,
                kill_at: int | None = None, compile_backbone: bool = False,
                ) -> tuple[TrainResult, list[float], torch.nn.Module]:
    """``name`` trained ``steps`` steps at the device's scale, as the runner builds it: (result, losses, method)."""
    scale, backbone, n, side, _ = SCALE[device]
    cls = METHODS.get(name)
    data = synthetic_cifar(n, side, seed=1)
    cfg = resolve_config(cls, scale)
    labels = data.coarse_labels if cls.label_level == "coarse" else data.labels
    classes = {"fine": data.num_classes, "coarse": data.num_coarse}.get(cls.label_level)
    generator = seed_everything(0)  # deterministic algorithms, as suites train
    method = create_method(name, create_backbone(backbone, 3), cfg, DataInfo(n, data.image_shape, classes))
    augmenter = Augmenter(get_preset(cfg["augment"], **cfg["augment_overrides"]), data.mean, data.std)
    log = StepLosses(kill_at)
    result = train(method, data.images.to(device), torch.as_tensor(labels).to(device), Budget("steps", steps),
                   augmenter, cfg, device=device, seed=0, generator=generator, quiet=True, logger=log,
                   precision=precision, checkpoint=checkpoint, checkpoint_seconds=0.0,
                   compile_backbone=compile_backbone)
    return result, log.losses, method


@pytest.mark.parametrize("name", TRAINED)
def test_method_trains_in_bf16_and_fp32(device, name, monkeypatch):
    """Each method trains its steps in fp32 and in bf16 autocast with finite losses; the first step's
    bf16 loss is within BF16_REL_TOL of fp32's (same weights, same batch); every floating-point
    parameter and buffer (memory banks, queues, prototypes, classifier weights, BN statistics) is
    still float32 after bf16 training; SeLa's Sinkhorn-Knopp gets float32 logits.

    Catches: autocast leaking into the epoch hooks (bf16 Sinkhorn input), a bank or queue rebuilt
    from bf16 features, a loss that overflows or turns NaN in bf16, a bf16 path that computes a
    different loss (beyond rounding)."""
    sinkhorn_inputs = []

    def recording_sinkhorn(logits, *args, **kwargs):
        sinkhorn_inputs.append(logits.dtype)
        return sinkhorn_knopp(logits, *args, **kwargs)

    monkeypatch.setattr(methods.sela, "sinkhorn_knopp", recording_sinkhorn)
    steps = SCALE[device][4]
    first = {}
    for precision in ("fp32", "bf16"):
        result, losses, method = train_steps(name, device, steps, precision=precision)
        assert result.status == "ok", result.reason
        assert len(losses) == steps and all(math.isfinite(v) for v in losses), (precision, losses)
        first[precision] = losses[0]
        wrong = {k: v.dtype for k, v in method.state_dict().items()
                 if v.is_floating_point() and v.dtype != torch.float32}
        assert not wrong, f"{precision}: state that is not float32: {wrong}"
    assert first["bf16"] == pytest.approx(first["fp32"], rel=BF16_REL_TOL), first
    if name == "sela":
        assert sinkhorn_inputs and set(sinkhorn_inputs) == {torch.float32}, sinkhorn_inputs


@pytest.mark.parametrize("name", ["npid_cld", "sela"])
def test_killed_run_resumes_with_the_uninterrupted_next_loss(device, name, tmp_path):
    """Killed in step 6 of 10 (checkpoints after every step), a run started again from scratch (new
    adapter, new generator) resumes from its checkpoint and computes the same losses for steps 6-10 as
    the run that was never stopped: weights, optimiser, memory bank or pseudo-labels, data order and
    augmentation state all come back, and so does the per-epoch history (loss means and the adapter's
    scalars). npid_cld is the runbook's long GPU run. On the CPU an epoch is one step, so the
    checkpoint was saved on an epoch's last step.

    Catches: a buffer or optimiser state missing from the checkpoint, a generator state not restored,
    a resume that restarts the epoch or repeats a step, one that fails or loses the epoch's scalars
    when the checkpoint fell on an epoch's last step."""
    uninterrupted, whole, _ = train_steps(name, device, 10)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train_steps(name, device, 10, checkpoint=checkpoint, kill_at=6)
    result, resumed, _ = train_steps(name, device, 10, checkpoint=checkpoint)
    assert result.status == "ok" and result.usage.steps == 10
    tolerance = 1e-5 if device == "cpu" else 1e-3  # CUDA: bf16 autocast, atomics in scatter/index_add
    assert resumed == pytest.approx(whole[5:], rel=tolerance), (resumed, whole)

    def history(r: TrainResult) -> list[dict]:
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in r.history]

    assert history(result) == [pytest.approx(entry, rel=tolerance) for entry in history(uninterrupted)]


def reference_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, temperature: float,
                  num_classes: int) -> np.ndarray:
    """NPID's weighted vote in float64 numpy: cosine similarities, k nearest, weights exp(s / T)."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    nearest = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(b), num_classes))
    for row, (idx, s) in enumerate(zip(nearest, np.take_along_axis(sims, nearest, 1))):
        np.add.at(votes[row], train_y[idx], np.exp(s / temperature))
    return votes.argmax(1)


def test_torch_knn_on_the_device_predicts_what_the_reference_and_cpu_predict(device):
    """The torch kNN backend on the device predicts the float64 reference's labels, and the CPU's.

    Catches: similarities or votes computed on the wrong device or in reduced precision, a top-k
    that drops or repeats neighbours on the device."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(10, 64)) * 0.3
    train_y, test_y = rng.integers(0, 10, 3000), rng.integers(0, 10, 500)
    train_x = (means[train_y] + rng.normal(size=(3000, 64))).astype(np.float32)
    test_x = (means[test_y] + rng.normal(size=(500, 64))).astype(np.float32)
    on_device = weighted_knn_predict(train_x, train_y, test_x, k=50, temperature=0.1, backend="torch", device=device)
    on_cpu = weighted_knn_predict(train_x, train_y, test_x, k=50, temperature=0.1, backend="torch", device="cpu")
    np.testing.assert_array_equal(on_device, reference_knn(train_x, train_y, test_x, 50, 0.1, 10))
    np.testing.assert_array_equal(on_device, on_cpu)


def test_sinkhorn_on_the_device_gives_the_cpu_and_official_labels(device):
    """Sinkhorn-Knopp on logits on the device gives SeLa's plain float64 loop's labels and the CPU's.

    Catches: device-dependent chunking or precision in the solver, vectors left on the wrong device."""
    logits = torch.randn(2000, 20, generator=torch.Generator().manual_seed(3)) * 2
    official, _, _ = official_loop(logits, 10.0, tol=1e-9)  # converged far enough that no label is in doubt
    on_device = sinkhorn_knopp(logits.to(device), 10.0, tol=1e-9)
    on_cpu = sinkhorn_knopp(logits, 10.0, tol=1e-9)
    assert on_device.labels.device.type == torch.device(device).type
    assert torch.equal(on_device.labels.cpu(), official)
    assert torch.equal(on_device.labels.cpu(), on_cpu.labels)


def test_clustering_kmeans_on_the_device_recovers_separated_blobs(device):
    """The clustering protocol's k-means (torch backend) on the device finds 8 well-separated blobs
    exactly (ARI 1 against the blob ids, scikit-learn's metric), as on the CPU.

    Catches: k-means failing or mis-assigning on the device (dtype, device transfers, empty clusters)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16)) * 10
    blobs = rng.integers(0, 8, 4000)
    x = (centres[blobs] + rng.normal(size=(4000, 16))).astype(np.float32)
    on_device = kmeans(x, 8, 0, backend="torch", device=device)
    assert adjusted_rand_score(blobs, on_device) == 1.0
    assert adjusted_rand_score(kmeans(x, 8, 0, backend="torch", device="cpu"), on_device) == 1.0


def test_views_are_channels_last_and_in_one_pass_on_cuda(device):
    """The loop's views on CUDA are channels-last and the model's weights too (the bf16 fast path), and the two
    views go through the backbone in one pass (``Method.encode_views``, its BatchNorms split per view); on the
    CPU they stay contiguous and take a pass each (the stored records' path). Checked through a SimCLR step that
    records its input.

    Catches: channels-last dropped from the views or the model on CUDA; the one-pass views off on CUDA or on
    on the CPU."""
    recorded = []
    scale, backbone, n, side, _ = SCALE[device]
    cfg = resolve_config(METHODS.get("simclr"), scale)
    data = synthetic_cifar(n, side)
    method = create_method("simclr", create_backbone(backbone, 3), cfg, DataInfo(n, data.image_shape))
    method.backbone.register_forward_pre_hook(lambda module, args: recorded.append(args[0]))
    augmenter = Augmenter(get_preset(cfg["augment"]), data.mean, data.std)
    train(method, data.images.to(device), None, Budget("steps", 1), augmenter, cfg, device=device, seed=0,
          generator=seed_everything(0), quiet=True)
    cuda = device.startswith("cuda")
    view = recorded[0]
    assert view.dtype == torch.float32 and view.device.type == torch.device(device).type
    assert view.is_contiguous(memory_format=torch.channels_last) == cuda
    conv = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cuda
    batch = min(cfg["batch_size"], n)
    assert [len(x) for x in recorded] == ([2 * batch] if cuda else [batch, batch])
    assert method.views_in_one_pass == cuda
    assert any(isinstance(m, SplitBatchNorm) for m in method.backbone.modules()) == cuda


@pytest.mark.parametrize("preset,overrides", [("simclr", {}), ("simclr_blur", {}), ("cld", {}),
                                              ("simclr_blur", {"crop_scale": [0.2, 1.0], "erasing": 1.0})])
def test_views_on_the_device_are_the_cpus_views(device, preset, overrides):
    """The same generator gives the same views on the device as on the CPU (the GPU path moves all of a
    batch's random parameters in one non-blocking copy and jitters the whole batch with a per-sample
    select; the CPU path jitters the rows that take each op), and leaves the generator in the same state.

    Catches: a parameter unpacked into the wrong slot or dtype after the one copy (a crop, jitter factor,
    order, grayscale or blur flag or erasing box of another sample), draws consumed in another order on the
    device."""
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augmenter = Augmenter(get_preset(preset, **overrides), (0.5,) * 3, (0.25,) * 3)
    g_device, g_cpu = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(2):
        on_device = augmenter(images.to(device), g_device).cpu()
        on_cpu = augmenter(images, g_cpu)
        torch.testing.assert_close(on_device, on_cpu, rtol=0, atol=2e-4)  # float32 rounding; a wrong parameter moves pixels by >0.01
    assert torch.equal(g_device.get_state(), g_cpu.get_state())
    if device == "cuda" and preset == "simclr":  # --compile: the augmentation through inductor, once (its build takes
        # tens of seconds; on the CPU minutes)
        augmenter.compile()
        compiled = augmenter(images.to(device), torch.Generator().manual_seed(4)).cpu()
        torch.testing.assert_close(compiled, augmenter(images, torch.Generator().manual_seed(4)), rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["simclr", "cc", "cd", "npid_cld", "moco_cld"])
def test_views_in_one_pass_train_as_a_pass_per_view(device, name):
    """On one GPU the training loop sends a step's views through the backbone as one batch whose BatchNorms
    normalise each view apart (``Method.encode_views``). From the same weights and views, in float32 (no TF32):
    the loss, gradients and BatchNorm state of a pass per view, to float rounding (a layer's weight gradient is
    summed over the views at once instead of view by view). Catches: the views normalised together (one
    running-statistics update of the joint batch instead of one per view), an adapter that bypasses
    ``encode_views`` (two backbone calls)."""
    import copy

    from harness.models.batchnorm import split_batchnorms

    scale, backbone, *_ = SCALE[device]
    torch.manual_seed(0)
    cfg = resolve_config(METHODS.get(name), scale, {"queue_size": 256} if "moco" in name else {})
    per_view = create_method(name, create_backbone(backbone, 3), cfg, DataInfo(256, (3, 32, 32))).to(device).train()
    one_pass = copy.deepcopy(per_view)
    split_batchnorms(one_pass.backbone)
    one_pass.views_in_one_pass = True
    g = torch.Generator().manual_seed(1)
    views = [(torch.randn(32, 3, 32, 32, generator=g) * (1 + v) + v).to(device) for v in range(cfg["views"])]
    batch = Batch(views, torch.arange(32, device=device))
    results, passes = [], []
    one_pass.backbone.register_forward_hook(lambda *args: passes.append(1))
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        for method in (per_view, one_pass):
            torch.manual_seed(2)  # MoCo's key shuffle draws from the global generator
            out = method(batch)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            results.append((loss.detach(), {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None},
                            {k: b.clone() for k, b in method.backbone.state_dict().items()}))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    assert len(passes) == 1  # the queries' views in one pass (MoCo's keys go through the key encoder)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("backbone.") for k in grads_a)
    for key in grads_a:  # relative to the gradient's size: single elements near 0 carry only rounding
        assert (grads_b[key] - grads_a[key]).norm() <= 1e-4 * grads_a[key].norm() + 1e-8, key
    for key in state_a:  # num_batches_tracked exactly (one update per view), running statistics to rounding
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-7, msg=key)


# Last: the compiling tests, whose inductor builds are the slowest part on a GPU (the runbook caps the run)
def test_compiled_backbone_trains(device):
    """SimCLR with ``torch.compile`` on the backbone trains its steps with finite losses, and its first
    loss matches the eager run's (the compiled graph computes the same network).

    Catches: a compile failure on the channels-last bf16 path, a graph break that changes results."""
    if device == "cpu":
        pytest.skip("inductor's C++ build takes minutes on a small CPU; the CUDA run is the check")
    steps = SCALE[device][4]
    result, losses, _ = train_steps("simclr", device, steps, compile_backbone=True)
    assert result.status == "ok", result.reason
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    _, eager, _ = train_steps("simclr", device, 1)
    assert losses[0] == pytest.approx(eager[0], rel=BF16_REL_TOL)


def test_profiled_steps_see_the_device(device):
    """The GPU benchmark's ``limit`` cell profiles real training steps: on a GPU the profiler records their
    kernels (a step that trains a network launches hundreds) and busy time within the step's wall time; on
    the CPU there is no device figure. Catches: a profile that records no GPU activity (CUPTI missing) yet
    calls every method host-bound, or a busy share above 100% (device time of another window)."""
    from harness.bench.profile import profile_training

    scale, backbone, n, side, _ = SCALE[device]
    profiled = profile_training("simclr", synthetic_cifar(n, side, seed=1), backbone, scale, device, warmup=1, steps=2)
    assert profiled.ops > 50 and profiled.wall_ms > 0
    if device == "cpu":
        assert profiled.device_ms is None and profiled.kernels is None
    else:
        assert profiled.kernels > 100 and 0 < profiled.device_ms <= profiled.wall_ms, profiled
