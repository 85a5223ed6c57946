"""Device choice: CUDA, then Apple's MPS, then the CPU, unless the user names one."""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["amp_mode", "autocast_dtype", "model_device", "pick_device"]

AMP_MODES = {True: "auto", "auto": "auto", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
             "bfloat16": "bfloat16"}


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


def amp_mode(amp: bool | str) -> str | None:
    """``amp`` as given to the Trainer: None (off), "auto" (True: float16 on CUDA, bfloat16
    elsewhere), "float16" ("fp16") or "bfloat16" ("bf16")."""
    if amp is False or amp is None:
        return None
    mode = AMP_MODES.get(amp) if isinstance(amp, (bool, str)) else None
    if mode is None:
        raise ConfigError(f"amp must be True, False, 'fp16' or 'bf16', got {amp!r}")
    return mode


def autocast_dtype(device: torch.device, mode: str | None = "auto") -> torch.dtype:
    """float16 on CUDA (with a GradScaler), bfloat16 elsewhere (no scaler needed); or the
    ``mode`` asked for ("float16" off CUDA is refused: CPU autocast computes in bfloat16)."""
    if mode == "bfloat16":
        return torch.bfloat16
    if mode == "float16":
        if device.type != "cuda":
            raise ConfigError(f"amp='fp16' needs a CUDA device (float16 with a GradScaler); on {device.type} use "
                              "amp='bf16' or amp=True")
        return torch.float16
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model lives: its first parameter's (or buffer's) device, else the CPU."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
