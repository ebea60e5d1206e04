"""Which device a run or a sampler uses: ``auto``, ``cpu`` or ``cuda[:N]``."""
from __future__ import annotations

import torch

from ..errors import DdpmError


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; a cuda request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DdpmError("--device cuda asked for, but this PyTorch sees no CUDA device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DdpmError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)
