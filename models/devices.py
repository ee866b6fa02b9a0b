"""Where tensors live: one rule for the worker, the trainer and the tools."""

from __future__ import annotations

import torch

from fbp_errors import ConfigError


def pick_device(want: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) -> CUDA when present, else CPU; 'cuda' without a GPU is refused."""
    if want is None or str(want) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(want)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(want)!r} was asked for but torch sees no CUDA GPU; use auto or cpu")
    return d
