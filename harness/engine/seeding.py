"""One function to seed everything, and the deterministic mode."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return the CPU generator that drives data order
    and augmentation. ``deterministic`` selects torch's deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # the mode would also fill every new tensor with NaN first, a guard for code that reads memory it never
        # wrote (none here does): one extra kernel per allocation, which the results do not need
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
    return torch.Generator().manual_seed(seed)


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The training loop's data order for ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch),
    so a resumed run, every rank of a data-parallel run and a DataLoader feed all see the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
