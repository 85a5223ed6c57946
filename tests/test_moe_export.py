from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from onthefly.actions.moe_export import copy_artifact, load_artifact, write_artifact
from onthefly.errors import ConfigError, StoreError

SHAPE = (3, 4)  # one sample; inputs are (batch, 3, 4)
FILES = {"program.pt2", "weights.safetensors", "model.onnx", "manifest.json"}


class Mixture(nn.Module):
    """A Linear gate and two expert MLPs, hard top-1 routing written without Python branching."""

    def __init__(self) -> None:
        super().__init__()
        features = SHAPE[0] * SHAPE[1]
        self.gate = nn.Linear(features, 2)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 5)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        weights = F.one_hot(self.gate(flat).argmax(1), 2).to(x.dtype)
        return torch.einsum("be,bec->bc", weights, torch.stack([e(flat) for e in self.experts], 1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return x


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 6, bias=False)
        self.decode = nn.Linear(6, 6, bias=False)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).tanh())


def infer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the exported program should compute: the model in eval mode, without autograd."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(training)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Mixture, Path, dict[str, Any]]:
    torch.manual_seed(0)
    model = Mixture()  # left in train mode: write_artifact must restore it
    folder = tmp_path_factory.mktemp("artifact") / "mixture"
    manifest = write_artifact(model, torch.randn(8, *SHAPE), folder, manifest={"kind": "mixture", "experts": 2})
    return model, folder, manifest


def test_manifest_describes_the_artifact(exported: tuple[Mixture, Path, dict[str, Any]]) -> None:
    model, folder, manifest = exported
    assert model.training and all(m.training for m in model.modules())
    assert {p.name for p in folder.iterdir()} == FILES
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["kind"] == "mixture" and manifest["format"] == 1 and manifest["torch"] == torch.__version__
    assert manifest["input"] == {"shape": [None, 3, 4], "dtype": "float32"}
    assert manifest["output"] == {"shape": [None, 5], "dtype": "float32"}
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    for name, record in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert "torch.export.load" in manifest["load"] and len(manifest["load"].splitlines()) == 3


def test_program_runs_in_a_process_that_cannot_import_onthefly(
        exported: tuple[Mixture, Path, dict[str, Any]], tmp_path: Path) -> None:
    model, folder, manifest = exported
    torch.manual_seed(1)
    inputs = {"one": torch.randn(1, *SHAPE), "many": torch.randn(37, *SHAPE)}
    torch.save(inputs, tmp_path / "inputs.pt")
    # Blocks onthefly, then runs the manifest's load snippet verbatim in the artifact's folder.
    code = f"""
import importlib.abc, sys

class NoOnTheFly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onthefly" or name.startswith("onthefly."):
            raise ImportError("onthefly is blocked in this process")
        return None

sys.meta_path.insert(0, NoOnTheFly())
try:
    import onthefly
except ImportError:
    pass
else:
    raise SystemExit("onthefly could be imported")

import torch
results = {{}}
for key, inputs in torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True).items():
    exec({manifest["load"]!r})
    results[key] = outputs
torch.save(results, {str(tmp_path / "outputs.pt")!r})
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for key, x in inputs.items():
        assert outputs[key].shape == (x.shape[0], 5)
        assert torch.equal(outputs[key], infer(model, x))


def test_load_artifact_gives_the_same_function(exported: tuple[Mixture, Path, dict[str, Any]]) -> None:
    model, folder, _ = exported
    x = torch.randn(5, *SHAPE)
    program = load_artifact(folder)
    assert torch.equal(program(x), infer(model, x))


def test_weights_file_holds_the_state_dict(exported: tuple[Mixture, Path, dict[str, Any]]) -> None:
    model, folder, _ = exported
    weights = load_file(folder / "weights.safetensors")
    state = model.state_dict()
    assert set(weights) == set(state)
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor)


def test_onnx_matches_torch(exported: tuple[Mixture, Path, dict[str, Any]]) -> None:
    import onnxruntime

    model, folder, manifest = exported
    assert manifest["onnx"]["written"] is True and manifest["onnx"]["error"] is None
    assert manifest["onnx"]["max_abs_diff"] <= 1e-5
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 37):
        x = torch.randn(batch, *SHAPE)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, infer(model, x), rtol=0, atol=1e-5)


def test_copy_artifact_copies_every_file(exported: tuple[Mixture, Path, dict[str, Any]], tmp_path: Path) -> None:
    _, folder, manifest = exported
    assert copy_artifact(folder, tmp_path / "copy") == manifest
    for name in FILES:
        assert (tmp_path / "copy" / name).read_bytes() == (folder / name).read_bytes()


def test_copy_artifact_detects_a_corrupted_byte(
        exported: tuple[Mixture, Path, dict[str, Any]], tmp_path: Path) -> None:
    _, folder, _ = exported
    damaged = tmp_path / "damaged"
    copy_artifact(folder, damaged)
    data = bytearray((damaged / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"weights\.safetensors.*damaged"):
        copy_artifact(damaged, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"weights\.safetensors"):
        copy_artifact(damaged, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_data_dependent_control_flow_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data-dependent.*traceable by torch\.export"):
        write_artifact(Branchy(), torch.randn(3, 4), tmp_path / "new", manifest={})
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"traceable by torch\.export"):
        write_artifact(Branchy(), torch.randn(3, 4), tmp_path / "empty", manifest={})
    assert list((tmp_path / "empty").iterdir()) == []


def test_non_empty_target_is_refused(exported: tuple[Mixture, Path, dict[str, Any]], tmp_path: Path) -> None:
    model, folder, _ = exported
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_artifact(model, torch.randn(2, *SHAPE), tmp_path / "full", manifest={})
    with pytest.raises(ConfigError, match="not an empty folder"):
        copy_artifact(folder, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_tied_weights_and_a_batch_of_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    manifest = write_artifact(model, torch.randn(1, 6), tmp_path / "tied", manifest={}, onnx=False)
    assert manifest["onnx"]["written"] is False and set(manifest["files"]) == {"program.pt2", "weights.safetensors"}
    weights = load_file(tmp_path / "tied" / "weights.safetensors")
    assert torch.equal(weights["encode.weight"], weights["decode.weight"])
    program = load_artifact(tmp_path / "tied")
    x = torch.randn(9, 6)
    assert torch.equal(program(x), model(x))


def test_onnx_problems_are_recorded_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no ONNX for this op\nlong traceback")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    manifest = write_artifact(Tied(), torch.randn(4, 6), tmp_path / "refused", manifest={})
    assert manifest["onnx"] == {"written": False, "error": "RuntimeError: no ONNX for this op", "max_abs_diff": None}
    assert sorted(p.name for p in (tmp_path / "refused").iterdir()) == ["manifest.json", "program.pt2",
                                                                      "weights.safetensors"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    manifest = write_artifact(Tied(), torch.randn(4, 6), tmp_path / "missing", manifest={})
    assert manifest["onnx"]["error"] == "onnxruntime is not installed"
    assert not (tmp_path / "missing" / "model.onnx").exists()
