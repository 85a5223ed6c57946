"""Shared fixtures: every test gets its own ONTHEFLY_HOME, and tiny deterministic data."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]

# Tiny models run fastest on one thread, and the suite shares 2 cores with its child processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def onthefly_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "otf-home"
    monkeypatch.setenv("ONTHEFLY_HOME", str(home))
    # quickstart starts the dashboard server by default; tests that want it ask for it.
    monkeypatch.setenv("ONTHEFLY_DASHBOARD", "0")
    yield home


@pytest.fixture
def subprocess_env(onthefly_home: Path) -> dict[str, str]:
    """Environment for child Python processes: same interpreter, same ONTHEFLY_HOME."""
    env = dict(os.environ)
    env["ONTHEFLY_HOME"] = str(onthefly_home)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def toy_data(n: int = 256, features: int = 20, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :classes].argmax(dim=1)).long()
    return TensorDataset(x, y)


def toy_model(features: int = 20, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))


@pytest.fixture
def toy() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, DataLoader(toy_data(), batch_size=32, shuffle=True)


PYTHON = sys.executable


WRITER_HOLD = 120.0  # a held writer outlasts any deadline a test waits on while it is held


@pytest.fixture
def block() -> Iterator[Callable[[Any], threading.Event]]:
    """Park a store writer's thread (a StoreWriter) on a task until the returned event is set (at
    the latest, at teardown). The task is taken off the queue alone: nothing else is handed over
    until it runs, so the whole queue bound is free while the writer is held."""
    releases: list[threading.Event] = []

    def park(writer: Any) -> threading.Event:
        started, release = threading.Event(), threading.Event()
        releases.append(release)

        def wait() -> list[Any]:
            started.set()
            release.wait(WRITER_HOLD)
            return []

        writer.task(wait, wait=False)
        assert started.wait(60.0)
        return release

    yield park
    for release in releases:
        release.set()
