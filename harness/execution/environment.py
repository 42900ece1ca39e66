"""What a record says about where it ran: packages, device, git commit."""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from harness.errors import EnvironmentFailure, UsageError

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "pandas", "faiss-gpu", "faiss-cpu")


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when there is a GPU, else the CPU; a device that does not exist here (``tpu``,
    ``cuda`` without a GPU, ``cuda:3`` with two) stops with one line before anything runs."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = device.partition(":")
    if device != "cpu" and not (kind == "cuda" and (index.isdigit() or not colon)):
        raise UsageError(f"unknown device {device!r} (valid: {', '.join(DEVICES)})")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"device {device!r} is not available: {why}; use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} is not available: {torch.cuda.device_count()} GPU(s) visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_writable(directory: Path, option: str) -> None:
    """Create ``directory`` and write and remove a probe file in it, so that a read-only or missing
    location stops before any training, not when the first record is written."""
    if directory.exists() and not directory.is_dir():
        raise EnvironmentFailure(f"{option} {str(directory)!r} is a file, not a directory; pass a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write to {directory} ({exc.strerror or exc}); fix its permissions "
                                 f"or pass another {option}") from None


def git_commit() -> str:
    """HEAD of the checkout the harness runs from; in a copy of the tree without ``.git`` (a lent GPU
    machine gets only the files) the commit named by the environment variable ``SSL_HARNESS_COMMIT``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("SSL_HARNESS_COMMIT", "")


def environment(device: str) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "device": device, "device_name": name, "threads": torch.get_num_threads(), "git_commit": git_commit()}
