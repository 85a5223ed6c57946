"""Device choice: CUDA, then Apple's MPS, then the CPU, unless the user names one."""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["autocast_dtype", "model_device", "pick_device"]


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    if requested is not None:
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device={requested!r} is not a device name like 'cpu', 'cuda', 'cuda:1', 'mps'") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device='mps' was asked for but MPS is not available; use device='cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (with a GradScaler), bfloat16 elsewhere (no scaler needed)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model lives: its first parameter's (or buffer's) device, else the CPU."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
