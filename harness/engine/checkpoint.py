"""Load an external encoder checkpoint safely (``weights_only=True``: a pickle cannot run code)."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from harness.models.backbones import create_backbone
from harness.errors import UsageError

#: Prefixes that training frameworks put in front of encoder weights.
PREFIXES = ("module.", "backbone.", "encoder.", "encoder_q.", "model.")


def _state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "encoder"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UsageError("checkpoint holds no state_dict of tensors (expected a dict, or one under "
                     "'state_dict'/'model'/'encoder')")


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line (torch's own message is a
    paragraph of advice to load it unsafely)."""
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (f"it pickles {refused.group(1)}, which could run code when loaded; save the encoder's "
                f"state_dict() instead (torch.save(model.state_dict(), path))")
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if isinstance(exc, (pickle.UnpicklingError, IndexError, ValueError)):  # a plain pickle, or not a pickle at all
        return "it is not a file torch.save wrote (a plain pickle, another format, or damaged)"
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def load_encoder(path: Path, arch: str, in_channels: int) -> nn.Module:
    """Build backbone ``arch`` and load the checkpoint's weights into it, strictly."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {str(path)!r} " + ("is a directory" if Path(path).is_dir() else "does not exist"))
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a plain pickle
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe pickles, RuntimeError for non-torch files, EOFError if empty
        raise UsageError(f"cannot load {str(path)!r} as a weights-only checkpoint (a state_dict saved with "
                         f"torch.save): {_load_failure(exc)}") from None
    state = _state_dict(obj)
    bad = [k for k, v in state.items() if not isinstance(k, str) or (v.is_floating_point() and not v.isfinite().all())]
    if bad:
        raise UsageError(f"checkpoint {str(path)!r} has {len(bad)} entries that are not named weights of finite "
                         f"values, e.g. {bad[0]!r}")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    model = create_backbone(arch, in_channels)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier heads are not the encoder
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or shape:
        detail = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected
                  else f"shape of {shape[0]!r} is {tuple(state[shape[0]].shape)}, expected {tuple(expected[shape[0]].shape)}")
        raise UsageError(f"checkpoint does not match architecture {arch!r} ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shape)} mis-shaped keys; first: {detail})")
    model.load_state_dict(state)
    return model
