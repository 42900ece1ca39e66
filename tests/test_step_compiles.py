"""Every shipped adapter's training step traces as one graph under ``torch.compile`` (issue 15).

A GPU spends a step's time launching kernels unless the step is compiled (or replayed as CUDA graphs), which
needs a step without host syncs (``.item()``, ``if tensor``), data-dependent shapes (boolean indexing) or
other graph breaks. ``fullgraph=True`` raises on the first break. Traced with the ``aot_eager`` backend, which
also traces the backward pass (inductor's code generation is left to the GPU: ``bench gpu``'s compiled rows),
with the views in one pass as training on a GPU runs them.
"""
from __future__ import annotations

import copy

import pytest
import torch

from harness.models.backbones import create_backbone
from harness.models.batchnorm import split_batchnorms
from methods import METHODS, Batch, DataInfo, create_method, resolve_config

SHIPPED = [name for name in METHODS.names()
           if METHODS.get(name).trains and METHODS.get(name).__module__.startswith("methods.")]


@pytest.mark.parametrize("name", SHIPPED)
def test_training_step_compiles_as_one_graph_with_the_eager_loss(name):
    """Catches: a host sync or data-dependent shape added to an adapter's step (a graph break), a step whose
    traced graph computes another loss than eager."""
    cls = METHODS.get(name)
    torch.manual_seed(0)
    cfg = resolve_config(cls, "cpu")
    method = create_method(name, create_backbone("small_cnn", 3), cfg,
                           DataInfo(64, (3, 8, 8), 10 if cls.label_level else None)).train()
    split_batchnorms(method.backbone)
    method.views_in_one_pass = True
    g = torch.Generator().manual_seed(1)
    batch = Batch([torch.randn(16, 3, 8, 8, generator=g) + v for v in range(cfg["views"])], torch.arange(16),
                  torch.arange(16) % 10 if cls.label_level else None)
    eager = copy.deepcopy(method)
    losses = []
    torch._dynamo.reset()
    for step in (eager, torch.compile(method, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(2)  # MoCo's key shuffle draws from the global generator
        out = step(batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
