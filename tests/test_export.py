"""Slice export from Python and the CLI: streamed, exact rows, clear errors, never a partial file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import onthefly
from conftest import REPO, toy_data, toy_model
from onthefly.actions import export as export_module
from onthefly.errors import ConfigError, DataError, NotFoundError


@pytest.fixture
def finished() -> tuple[Path, torch.utils.data.TensorDataset]:
    data = toy_data(n=300)
    model = toy_model()
    summary = onthefly.Trainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=nn.CrossEntropyLoss(),
        train_loader=DataLoader(data, batch_size=32, shuffle=True), project="export", run_name="r", progress=False,
    ).fit(2)
    return summary.session_dir, data


def test_python_export_of_a_definition_with_the_dataset(finished: tuple[Path, Dataset], tmp_path: Path) -> None:
    folder, data = finished
    out = tmp_path / "hard.parquet"
    result = onthefly.export_slice(folder, {"kind": "flag", "flag": "hard"}, out, dataset=data)
    table = pq.read_table(out)
    stats = onthefly.open_session(folder).sample_stats(1)
    hard = sorted(stats.filter(stats.column("hard")).column("index").to_pylist())
    assert table.column("index").to_pylist() == hard and result["rows"] == len(hard) == table.num_rows
    x, y = data.tensors
    row = table.slice(0, 1).to_pylist()[0]
    assert [row[f"x_{j}"] for j in range(20)] == pytest.approx(x[hard[0]].tolist())
    assert row["y"] == int(y[hard[0]])


def test_a_large_slice_is_written_in_several_batches(finished: tuple[Path, Dataset], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder, data = finished
    monkeypatch.setattr(export_module, "ROWS_PER_CHUNK", 7)  # many batches from a small slice
    out = tmp_path / "all.json"
    onthefly.export_slice(folder, {"kind": "quantile_band", "low": 0.0, "high": 1.0}, out, dataset=data)
    rows = json.loads(out.read_text())
    assert [r["index"] for r in rows] == list(range(300))


@pytest.mark.parametrize(("target", "fmt", "error", "match"), [
    ("missing-folder/out.csv", None, ConfigError, "does not exist"),
    ("taken.csv", None, ConfigError, "is a folder"),
    ("out.xlsx", None, ConfigError, "unknown export format 'xlsx'"),
    ("out.csv", "yaml", ConfigError, "unknown export format 'yaml'"),
])
def test_bad_targets_are_refused_before_writing(finished: tuple[Path, Dataset], tmp_path: Path, target: str,
                                                fmt: str | None, error: type[Exception], match: str) -> None:
    folder, _ = finished
    out = tmp_path / "out"
    (out / "taken.csv").mkdir(parents=True)
    with pytest.raises(error, match=match):
        onthefly.export_slice(folder, {"kind": "label", "label": 0}, out / target, format=fmt)
    assert [p.name for p in out.iterdir()] == ["taken.csv"]


def test_a_failing_dataset_leaves_no_partial_file(finished: tuple[Path, Dataset], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder, data = finished
    monkeypatch.setattr(export_module, "ROWS_PER_CHUNK", 16)

    class Breaks(Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> object:
            if i >= 200:
                raise OSError("disk image unreadable")
            return data[i]

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"reading sample 2\d\d from the dataset failed: OSError"):
        onthefly.export_slice(folder, {"kind": "quantile_band", "low": 0.0, "high": 1.0}, out / "x.parquet",
                              dataset=Breaks())
    assert list(out.iterdir()) == []


def test_unknown_slice_name_says_what_exists(finished: tuple[Path, Dataset], tmp_path: Path) -> None:
    folder, _ = finished
    with pytest.raises(NotFoundError, match=r"no slice named 'nope'.*none yet"):
        onthefly.export_slice(folder, "nope", tmp_path / "x.csv")


def test_cli_export_slice(finished: tuple[Path, Dataset], tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    folder, _ = finished
    out = tmp_path / "wrong.csv"
    definition = json.dumps({"kind": "filter", "where": [{"signal": "margin", "op": "<", "value": 0}]})
    done = subprocess.run([sys.executable, "-m", "onthefly.cli", "export-slice", str(folder), definition, str(out)],
                          capture_output=True, text=True, env=subprocess_env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = onthefly.open_session(folder).sample_stats(1)
    wrong = sorted(i for i, m in zip(stats.column("index").to_pylist(), stats.column("margin").to_pylist(),
                                     strict=True) if m < 0)
    lines = out.read_text().splitlines()
    assert len(lines) == len(wrong) + 1 and f"wrote {len(wrong):,} rows" in done.stdout
    assert [int(line.split(",")[0]) for line in lines[1:]] == wrong

    hard = subprocess.run([sys.executable, "-m", "onthefly.cli", "export-slice", str(folder), "hard",
                           str(tmp_path / "hard.parquet")], capture_output=True, text=True, env=subprocess_env,
                          cwd=REPO, timeout=120)
    assert hard.returncode == 0, hard.stderr
    assert pq.read_table(tmp_path / "hard.parquet").column("hard").to_pylist() == [True] * 30

    bad = subprocess.run([sys.executable, "-m", "onthefly.cli", "export-slice", str(folder), "nope",
                          str(tmp_path / "x.csv")], capture_output=True, text=True, env=subprocess_env, cwd=REPO,
                         timeout=120)
    assert bad.returncode == 2 and "no slice named 'nope'" in bad.stderr
    assert not (tmp_path / "x.csv").exists()
