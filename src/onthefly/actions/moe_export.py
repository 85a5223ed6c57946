"""A standalone inference artifact: one folder that runs a model (a gated mixture of experts, or
any module taking one batch-first tensor and returning one tensor) with torch alone.

The folder holds

* ``program.pt2``: the module traced by ``torch.export`` with a dynamic batch dimension, so it
  takes any batch size >= 1 (traced on a batch of at least 2: a batch of 1 would fix the size);
* ``weights.safetensors``: the module's tensors (``state_dict``) for those who load weights only;
* ``model.onnx``, when the dynamo ONNX exporter handles the module and onnxruntime reproduces
  torch's output on the example; otherwise the reason is recorded and no file is left;
* ``manifest.json``, written last: input and output shapes, each file's size and sha256, and
  a three-line snippet that loads the program.

Every file is written under a temporary name and renamed when complete; if tracing fails,
nothing is left. ``torch.export.load`` unpickles: its docstring warns never to load untrusted
files, and in torch 2.13 it reads pickled weights and constants with ``torch.load(...,
weights_only=False)`` and ``pickle.loads``, so :func:`load_artifact` is only for folders this
process wrote or the user trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, StoreError

__all__ = ["copy_artifact", "load_artifact", "write_artifact"]

PROGRAM, WEIGHTS, ONNX, MANIFEST = "program.pt2", "weights.safetensors", "model.onnx", "manifest.json"
ONNX_TOLERANCE = 1e-4  # onnxruntime's output may differ from torch's by rtol = atol = this
LOAD_SNIPPET = """import torch
program = torch.export.load("program.pt2").module()
outputs = program(inputs)  # inputs: see "input" (any batch size >= 1)"""


def write_artifact(module: nn.Module, example: torch.Tensor, folder: Path, *, manifest: Mapping[str, Any],
                   onnx: bool = True) -> dict[str, Any]:
    """Write the artifact of ``module`` to ``folder`` (absent or empty), traced on ``example``
    (a batch-first input). ``manifest`` is merged into the written manifest, which is returned.
    The module's train/eval modes are restored afterwards."""
    folder = Path(folder)
    if not isinstance(example, torch.Tensor) or example.dim() == 0 or example.shape[0] == 0:
        raise ConfigError(f"the example must be a non-empty batch-first tensor, got {type(example).__name__} "
                          f"{tuple(getattr(example, 'shape', ()))}: pass one input batch")
    created = _prepare_empty(folder)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            output = module(example)
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"the module must return one tensor, it returned {type(output).__name__}: "
                              "wrap it so that forward returns a single tensor")
        # A batch of 1 would be specialised to the constant 1 by torch.export: trace on two rows.
        traced_on = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
        program = _export(module, traced_on)
        _write_atomic(folder / PROGRAM, lambda tmp: torch.export.save(program, tmp))
        _write_atomic(folder / WEIGHTS, lambda tmp: _save_weights(module, tmp))
        onnx_record = _write_onnx(module, traced_on, example, output, folder / ONNX) if onnx else \
            {"written": False, "error": "not requested", "max_abs_diff": None}
        written = [PROGRAM, WEIGHTS] + ([ONNX] if onnx_record["written"] else [])
        record = {**manifest, "format": 1, "torch": torch.__version__,
                  "input": _tensor_spec(example), "output": _tensor_spec(output),
                  "files": {name: _file_record(folder / name) for name in written},
                  "onnx": onnx_record, "load": LOAD_SNIPPET}
        _write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
        return record
    except BaseException:
        _clear(folder, created)
        raise
    finally:
        for m, training in modes.items():
            m.training = training


def copy_artifact(source: Path, out: Path) -> dict[str, Any]:
    """Copy the artifact in ``source`` to ``out`` (absent or empty), checking each copy's size and
    sha256 against the manifest. Returns the manifest."""
    source, out = Path(source), Path(out)
    try:
        record: dict[str, Any] = json.loads((source / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{source / MANIFEST} cannot be read as an artifact manifest ({e}): "
                         "point at a folder written by write_artifact") from e
    for name in files:
        if name != Path(name).name or name.startswith("."):
            raise StoreError(f"the manifest in {source} lists {name!r}, which is not a plain file name: "
                             "the manifest was altered; write the artifact again")
    created = _prepare_empty(out)
    try:
        for name, expected in files.items():
            _write_atomic(out / name, partial(_copy_file, source / name))
            found = _file_record(out / name)
            if found != {"bytes": expected.get("bytes"), "sha256": expected.get("sha256")}:
                raise StoreError(f"the copy of {name} from {source} has {found['bytes']} bytes and sha256 "
                                 f"{found['sha256']}, the manifest says {expected.get('bytes')} bytes and "
                                 f"{expected.get('sha256')}: the source file is damaged; write the artifact again")
        _write_atomic(out / MANIFEST, lambda tmp: _copy_file(source / MANIFEST, tmp))
    except BaseException:
        _clear(out, created)
        raise
    return record


def load_artifact(folder: Path) -> nn.Module:
    """The program in ``folder`` as a module. Unpickles: only for artifacts this process wrote or
    the user trusts (see the module docstring)."""
    path = Path(folder) / PROGRAM
    if not path.is_file():
        raise StoreError(f"{path} does not exist: point at a folder written by write_artifact")
    return torch.export.load(path).module()


def _export(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"torch.export cannot trace the module ({type(e).__name__}: {first}): the model must "
                          "be traceable by torch.export - no Python control flow on tensor values (use "
                          "torch.where or torch.cond) and a forward taking one batch-first tensor") from e


def _write_onnx(module: nn.Module, traced_on: torch.Tensor, example: torch.Tensor, expected: torch.Tensor,
                path: Path) -> dict[str, Any]:
    # Never raises: an ONNX problem is recorded and the artifact is complete without the file.
    tmp = _temp_for(path)
    diff: float | None = None
    try:
        try:
            import onnxruntime
        except ImportError:
            return {"written": False, "error": "onnxruntime is not installed", "max_abs_diff": None}
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(module, (traced_on,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        program.save(str(tmp), external_data=False)  # one self-contained file (protobuf's 2 GiB limit)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
        want = expected.detach().cpu()
        if got.shape != want.shape:
            raise RuntimeError(f"onnxruntime returned shape {tuple(got.shape)}, torch {tuple(want.shape)}")
        diff = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        if not torch.allclose(got.to(want.dtype), want, rtol=ONNX_TOLERANCE, atol=ONNX_TOLERANCE):
            raise RuntimeError(f"onnxruntime's output differs from torch's by up to {diff:.3g} "
                               f"(tolerance {ONNX_TOLERANCE:g})")
        os.replace(tmp, path)
        return {"written": True, "error": None, "max_abs_diff": diff}
    except Exception as e:
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0]
        return {"written": False, "error": f"{type(e).__name__}: {first}", "max_abs_diff": diff}


def _save_weights(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # One contiguous CPU copy per entry: tied tensors (shared storage) are refused by safetensors.
    tensors = {name: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
               for name, t in module.state_dict().items() if isinstance(t, torch.Tensor)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": [None, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _copy_file(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as e:
        raise StoreError(f"{source} cannot be copied ({e}): the artifact is incomplete; write it again") from e


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = _temp_for(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_empty(folder: Path) -> bool:
    """Make sure ``folder`` exists and is empty; True when it was created here."""
    if folder.exists():
        if not folder.is_dir() or any(folder.iterdir()):
            raise ConfigError(f"{folder} is not an empty folder: artifacts are written to a new or empty "
                              "folder; choose another path or empty it")
        return False
    folder.mkdir(parents=True)
    return True


def _clear(folder: Path, created: bool) -> None:
    # Only what this call wrote: the folder was empty (or absent) when it began.
    for path in folder.iterdir():
        path.unlink(missing_ok=True)
    if created:
        folder.rmdir()
