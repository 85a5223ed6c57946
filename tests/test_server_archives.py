"""The dashboard's session files: the archive of a live session (the current weights saved first,
training not paused), the report, their downloads (cookie allowed for these GETs only), and
`onthefly open` serving an ended session with no training process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from live_server import DEADLINE, LiveSession, live, make_trainer
from onthefly.store import open_session
from onthefly.store.archive import import_session, read_manifest


@pytest.fixture
def training() -> Iterator[LiveSession]:
    for session in live(make_trainer(), 10_000):
        session.bus.wait_for(lambda e: e.kind == "progress", "training progress")
        yield session


def wait_ready(session: LiveSession, archive_id: str) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def done() -> bool:
        state.update(session.get(f"/api/session/archives/{archive_id}"))
        return state["status"] != "pending"

    session.wait_until(done, "the session archive", timeout=120)
    return state


def test_a_live_session_exports_with_its_current_weights_while_training_goes_on(
        training: LiveSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created = training.http.post("/api/session/archives")
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "pending" and re.fullmatch(r"[0-9a-f]{32}", job["id"])
    state = wait_ready(training, job["id"])
    assert state["status"] == "ready", state
    saved = [e for e in training.bus.snapshot() if e.kind == "checkpoint" and e.payload["reason"] == "command"]
    assert saved, "the training process saved its current weights for the archive"
    assert state["final_checkpoint"]["id"] == saved[-1].payload["checkpoint_id"]
    step_then = saved[-1].step
    training.wait_until(lambda: training.run.global_step > step_then + 5, "training going on after the export")

    download = training.http.get(f"/api/session/archives/{job['id']}/file")
    assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
    assert job["filename"] in download.headers["content-disposition"]
    archive = tmp_path / "live.otf"
    archive.write_bytes(download.content)
    assert len(download.content) == state["bytes"]
    manifest = read_manifest(archive)
    assert manifest["session"]["id"] == training.run.session.id
    monkeypatch.setenv("ONTHEFLY_HOME", str(tmp_path / "elsewhere"))
    imported = import_session(archive)
    assert open_session(imported).checkpoint(state["final_checkpoint"]["id"])["step"] == step_then


def test_archive_and_report_downloads_take_the_cookie_but_nothing_else_does(training: LiveSession) -> None:
    page = httpx.get(f"{training.base}/?token={training.token}", follow_redirects=False)
    cookies = page.cookies
    assert cookies, "the page sets its cookie"
    job = training.http.post("/api/session/archives").json()
    assert wait_ready(training, job["id"])["status"] == "ready"
    with httpx.Client(base_url=training.base, cookies=cookies, timeout=DEADLINE) as browser:
        assert browser.get(f"/api/session/archives/{job['id']}/file").status_code == 200
        report = browser.get("/api/session/report")
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
        assert "<svg" in report.text and "http://" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", report.text)
        assert browser.post("/api/session/archives").status_code == 401  # a POST needs the token itself
        assert browser.get(f"/api/session/archives/{job['id']}").status_code == 401
    assert httpx.get(f"{training.base}/api/session/report").status_code == 401
    assert training.http.get("/api/session/archives/" + "0" * 32).status_code == 404
    assert training.http.get("/api/session/archives/" + "0" * 32 + "/file").status_code == 404


def test_onthefly_open_serves_an_imported_archive_without_a_training_process(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    for session in live(make_trainer(), 1):
        session.status_event("idle")  # trained its epoch; waits for commands (keep_alive)
        archive = tmp_path / "done.otf"
        job = session.http.post("/api/session/archives").json()
        assert wait_ready(session, job["id"])["status"] == "ready"
        archive.write_bytes(session.http.get(f"/api/session/archives/{job['id']}/file").content)
        session_id = session.run.session.id
    env = {**subprocess_env, "ONTHEFLY_HOME": str(tmp_path / "laptop"), "ONTHEFLY_HANDSHAKE": "json"}
    server = subprocess.Popen([sys.executable, "-m", "onthefly.cli", "open", str(archive), "--no-browser"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            if line.startswith('{"onthefly"'):  # the handshake line a tool reads (the VS Code extension)
                handshake = json.loads(line)["onthefly"]
                url = handshake["url"]
                assert handshake["pid"] == server.pid and url.endswith(f"?token={handshake['token']}")
        assert url, server.stderr.read() if server.poll() is not None else "no handshake printed"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[0-9A-Za-z_-]+", url)
        base, token = url.split("/?token=")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=DEADLINE) as http:
            info = http.get("/api/session").json()
            assert info["id"] == session_id
            runs = info["runs"]
            assert runs and runs[0]["status"] == "idle"  # as it was when it was exported
            run_id = runs[0]["id"]
            loss = http.get(f"/api/runs/{run_id}/metrics", params={"names": "train_loss"}).json()
            assert loss["series"]["train_loss"]["step"] == list(range(1, 9))
            assert http.get(f"/api/runs/{run_id}/distribution").status_code == 200
            assert http.get(f"/api/runs/{run_id}/samples").status_code == 200
            events = http.get("/api/events").json()
            assert {"run_created", "epoch_summary", "checkpoint"} <= {e["kind"] for e in events["events"]}
            refused = http.post(f"/api/runs/{run_id}/commands", json={"kind": "pause"})
            assert refused.status_code == 409 and "not live" in refused.text
            assert http.get("/api/session/report").status_code == 200
            saved = http.post("/api/slices", json={"name": "worst", "run_id": run_id,
                                                   "definition": {"kind": "quantile_band", "low": 0.9}})
            assert saved.status_code == 201, saved.text  # the open process writes the session's slices
            assert saved.json()["count"] > 0
            assert http.get("/api/slices/worst").json()["count"] == saved.json()["count"]
        assert json.loads((tmp_path / "laptop" / "sessions" / session_id / "imported.json").read_text())
    finally:
        server.terminate()
        server.wait(30)
    reader = open_session(tmp_path / "laptop" / "sessions" / session_id)
    assert [s["name"] for s in reader.slices()] == ["worst"]
    assert reader.info()["status"] == "running"  # as exported (live): `open` changes no status
    assert os.path.isdir(tmp_path / "laptop" / "sessions" / session_id)
