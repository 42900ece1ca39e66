"""Load an external encoder checkpoint safely (``weights_only=True``: a pickle cannot run code)."""
from __future__ import annotations

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


def load_encoder(path: Path, arch: str, in_channels: int) -> nn.Module:
    """Build backbone ``arch`` and load the checkpoint's weights into it, strictly."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {str(path)!r} " + ("is a directory" if Path(path).is_dir() else "does not exist"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe pickles, RuntimeError for non-torch files, EOFError if empty
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot load {str(path)!r} as a weights-only checkpoint (a state_dict saved with "
                         f"torch.save): {first}") from None
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
