"""POST /api/runs/{id}/verify against a live server: the flagged samples verified out of fold by
the training process, the confirmed ones saved as a slice the API serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import onthefly
from live_server import live
from onthefly.actions import verify
from test_verify import separable, small_model


def test_verify_suspects_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONTHEFLY_HOME", str(tmp_path))
    data, wrong = separable()
    torch.manual_seed(0)
    model = small_model()
    trainer = onthefly.Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                               loss_fn=nn.CrossEntropyLoss(), project="verify", progress=False, keep_alive=True,
                               train_loader=DataLoader(data, batch_size=32, shuffle=True,
                                                       generator=torch.Generator().manual_seed(0)))
    verify.attach(trainer)
    for session in live(trainer, 8):
        session.status_event("idle")
        assert session.http.post("/api/runs/1/verify", json={"folds": 1}).status_code == 422
        assert session.http.post("/api/runs/1/verify", json={"slice": "../x"}).status_code == 422
        assert session.http.post("/api/runs/9/verify", json={}).status_code == 404
        response = session.http.post("/api/runs/1/verify", json={"folds": 3, "epochs": 10})
        assert response.status_code == 202, response.text
        result = session.applied(response.json()["id"]).payload["result"]
        assert result["confirmed"] >= 10 and result["slice"] == "verified mislabelled"
        saved = session.get("/api/slices/verified mislabelled")
        assert saved["count"] == result["confirmed"]
        assert saved["definition"]["kind"] == "indices"
        assert len(set(saved["definition"]["indices"]) & set(wrong.tolist())) >= 10
