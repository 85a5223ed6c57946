"""Checkpoint files: weights in safetensors, everything else in a tensors-only file.

Nothing here unpickles code: weights load with safetensors, the rest with
``torch.load(..., weights_only=True)``. A checkpoint is written into a temporary folder and
synced, and renamed into place, so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
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
        save_file(_untied(model_tensors), str(tmp / MODEL_FILE))
        torch.save(dict(state), tmp / STATE_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION}))
        _sync(tmp)  # the files' bytes reach the disk before the rename makes them the checkpoint
        if folder.exists():  # an empty folder or an earlier checkpoint: swap it out
            _replace_folder(tmp, folder)
        else:
            os.replace(tmp, folder)
        _sync_dir(folder.parent)  # and the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder_size(folder)


def _untied(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors can write them: a tensor that shares memory with an earlier one
    (tied weights: an embedding and the output layer of a language model) is written as a copy,
    so that every key of the state dict is in the file and loads by name; non-contiguous ones
    contiguous."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0) if tensor.numel() else None
        if storage is not None and storage in seen:
            out[key] = tensor.detach().clone(memory_format=torch.contiguous_format)
            continue
        if storage is not None:
            seen.add(storage)
        out[key] = tensor if tensor.is_contiguous() else tensor.contiguous()
    return out


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Make the complete ``tmp`` the checkpoint ``folder``, replacing what is there. Where two
    names can be exchanged in one step (Linux), ``folder`` holds the earlier checkpoint or the
    new one at every moment: a crash never leaves a registered checkpoint missing. Elsewhere the
    earlier one is set aside first, and a crash between the two renames leaves it in ``.old``."""
    if _exchange(tmp, folder):
        shutil.rmtree(tmp, ignore_errors=True)  # it holds the earlier checkpoint now
        return
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # <linux/fs.h>


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an old kernel, a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


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
