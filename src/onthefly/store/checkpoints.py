"""Checkpoint files: weights in safetensors, everything else in a tensors-only file.

Nothing here unpickles code: weights load with safetensors, the rest with
``torch.load(..., weights_only=True)``. A checkpoint is written into a temporary folder and
synced, and renamed into place, so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import StoreError

__all__ = ["check_tensors_only", "folder_size", "read_checkpoint", "write_checkpoint"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "checkpoint.json"
FORMAT_VERSION = 1

_PLAIN = (int, float, bool, str, bytes, type(None))


def check_tensors_only(value: Any, where: str = "state") -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_tensors_only(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise StoreError(f"{where} has a key of type {type(key).__name__}; only str and int keys can be saved")
            check_tensors_only(item, f"{where}[{key!r}]")
        return
    raise StoreError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which cannot be saved "
        "without pickling code. Checkpoints keep tensors, numbers, strings, lists and dicts only; "
        "give the object a state_dict() made of those."
    )


def write_checkpoint(folder: Path, model_tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> int:
    """Write a checkpoint folder atomically; returns its size in bytes."""
    check_tensors_only(dict(state))
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                    and not (folder / MANIFEST_FILE).is_file())):
        raise StoreError(
            f"{folder} exists and is not an On The Fly checkpoint; refusing to replace it. "
            "Give save_checkpoint() a new or empty folder (or an earlier checkpoint's folder)."
        )
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(dict(model_tensors), str(tmp / MODEL_FILE))
        torch.save(dict(state), tmp / STATE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION}))
        _sync(tmp)  # the files' bytes reach the disk before the rename makes them the checkpoint
        if folder.exists():  # an empty folder or an earlier checkpoint: set it aside, then swap
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _sync_dir(folder.parent)  # and the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder_size(folder)


def _sync(folder: Path) -> None:
    for name in (MODEL_FILE, STATE_FILE, MANIFEST_FILE):
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint folder written by :func:`write_checkpoint` (on the CPU)."""
    folder = Path(folder)
    missing = [n for n in (MODEL_FILE, STATE_FILE, MANIFEST_FILE) if not (folder / n).is_file()]
    if missing:
        raise StoreError(
            f"{folder} is not a complete On The Fly checkpoint: missing {', '.join(missing)}. "
            "Pass the folder that save_checkpoint() returned."
        )
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{folder} has checkpoint format {manifest.get('format_version')!r}; this version of "
            f"On The Fly reads format {FORMAT_VERSION}."
        )
    try:
        model_tensors = load_file(str(folder / MODEL_FILE))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StoreError(f"cannot read the checkpoint in {folder}: {exc}") from exc
    return model_tensors, state


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
