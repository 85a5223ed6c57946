"""The control server's HTTP API against a real training run: who may talk to it, what it refuses,
what it reports, and that commands sent over HTTP take effect in the run.

A run started with ``wait_for_run=True`` sits in "created" until a "run" command: commands are
applied there at once and nothing trains, which makes the refusal tests deterministic. To show a
refused request left the session unchanged, a harmless probe command follows it: the queue is
FIFO and numbers what it accepts, so the probe's id and its being the only command event prove
nothing was queued before it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import onthefly
import onthefly.server.app
from conftest import REPO
from live_server import (
    DEADLINE,
    STEPS_PER_EPOCH,
    TRAIN_SAMPLES,
    LiveSession,
    live,
    make_trainer,
    read_events,
)
from onthefly.engine.control import CommandQueue
from onthefly.errors import ConfigError
from onthefly.server import DashboardServer
from onthefly.server.auth import cookie_name_for


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ONTHEFLY_HOME for sessions shared by a module's tests."""
    home = tmp_path_factory.mktemp("otf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONTHEFLY_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the built dashboard: the page and one asset."""
    folder = tmp_path_factory.mktemp("dashboard")
    (folder / "assets").mkdir()
    (folder / "index.html").write_text("<!doctype html><title>On The Fly</title>")
    (folder / "assets" / "app.js").write_text("console.log('dashboard')")
    return folder


@pytest.fixture(scope="module")
def waiting(module_home: Path, page_dir: Path) -> Iterator[LiveSession]:
    """A run waiting for "run": nothing trains, commands are applied at once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONTHEFLY_DASHBOARD_DIR", str(page_dir))  # read by the server process
        for session in live(make_trainer(wait_for_run=True), 1):
            session.bus.wait_for(lambda e: e.kind == "waiting", "the run waiting for 'run'")
            yield session


@pytest.fixture(scope="module")
def trained(module_home: Path) -> Iterator[LiveSession]:
    """A run that trained one epoch and now idles (keep_alive), everything written to the store."""
    for session in live(make_trainer(wait_for_run=True), 1):
        session.bus.wait_for(lambda e: e.kind == "waiting", "the run waiting for 'run'")
        session.accepted("run")
        session.status_event("idle")
        assert session.run.session.flush()
        yield session


@pytest.fixture
def training() -> Iterator[LiveSession]:
    """A run training for far longer than any test waits; finish() stops it."""
    for session in live(make_trainer(), 10_000):
        session.bus.wait_for(lambda e: e.kind == "progress", "training progress")
        yield session


def probe(session: LiveSession) -> Any:
    """Queue a command that changes nothing (weight decay stays 0); its applied event."""
    return session.applied(session.accepted("set_weight_decay", weight_decay=0.0))


# ---- auth ----------------------------------------------------------------------------------------
UNAUTHENTICATED = [
    ("GET", "/api/session", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/", None),
    ("GET", "/assets/app.js", None),
    ("GET", "/api/events", None),
    ("POST", "/api/runs/1/commands", {"kind": "set_lr", "lr": 0.5}),
]


@pytest.mark.parametrize(("method", "path", "body"), UNAUTHENTICATED)
def test_requests_without_a_token_get_401(waiting: LiveSession, method: str, path: str, body: Any) -> None:
    before = len(waiting.bus.command_events())
    response = httpx.request(method, waiting.base + path, json=body)
    assert response.status_code == 401
    assert "token" in response.json()["detail"]
    assert len(waiting.bus.command_events()) == before
    assert waiting.run.optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("how", ["bearer", "query", "cookie", "bearer-empty", "basic"])
def test_a_wrong_token_gets_401(waiting: LiveSession, how: str) -> None:
    wrong = waiting.token[:-1] + ("A" if waiting.token[-1] != "A" else "B")
    headers, params = {}, {}
    if how == "bearer":
        headers["Authorization"] = f"Bearer {wrong}"
    elif how == "bearer-empty":
        headers["Authorization"] = "Bearer"
    elif how == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"x:{waiting.token}".encode()).decode()
    elif how == "query":
        params["token"] = wrong
    else:
        headers["Cookie"] = f"{cookie_name_for(waiting.server.port)}={wrong}"
    response = httpx.get(waiting.base + "/api/session", headers=headers, params=params)
    assert response.status_code == 401
    assert "token" in response.json()["detail"]


def test_the_token_is_accepted_as_bearer_or_query_and_the_cookie_opens_no_api(waiting: LiveSession) -> None:
    url = waiting.base + "/api/session"
    by_header = httpx.get(url, headers={"Authorization": f"Bearer {waiting.token}"})
    by_query = httpx.get(url, params={"token": waiting.token})
    for response in (by_header, by_query):
        assert response.status_code == 200, response.text
        assert response.json()["runs"][0]["id"] == waiting.run.run_id
    # Another page on a loopback port makes the browser send the cookie: it opens no API call.
    name = cookie_name_for(waiting.server.port)
    cookie = {"Cookie": f'odd={{"a": 1}}; {name}={waiting.token}; sp=a b'}
    assert httpx.get(url, headers=cookie).status_code == 401
    command = httpx.post(waiting.base + f"/api/runs/{waiting.run.run_id}/commands", json={"kind": "pause"},
                         headers=cookie)
    assert command.status_code == 401
    assert "cookie" in command.json()["detail"]
    # ...while the page itself reloads with it (odd cookies of other local apps do not hide ours).
    assert httpx.get(waiting.base + "/", headers=cookie).status_code == 200


def test_the_page_sets_a_cookie_that_lets_its_assets_load(waiting: LiveSession) -> None:
    page = httpx.get(waiting.base + "/", params={"token": waiting.token})
    assert page.status_code == 200
    assert "On The Fly" in page.text
    cookie = page.headers["set-cookie"]
    name = cookie_name_for(waiting.server.port)
    assert cookie.startswith(f"{name}={waiting.token};")
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    with httpx.Client(base_url=waiting.base) as browser:  # keeps the cookie, sends no token itself
        browser.cookies.set(name, page.cookies[name])
        asset = browser.get("/assets/app.js")
        assert asset.status_code == 200
        assert asset.text == "console.log('dashboard')"
        assert browser.get("/api/session").status_code == 401  # the API needs the token itself


@pytest.mark.parametrize("host", [
    "evil.example",
    "evil.example:{port}",
    "127.0.0.1.evil.example",
    "127.0.0.1.evil.example:{port}",
    "localhost.evil.example:{port}",
    "0.0.0.0:{port}",
    "10.0.0.1:{port}",
    "[::2]:{port}",
    "",
])
def test_a_host_header_that_is_not_loopback_gets_403_even_with_the_token(waiting: LiveSession, host: str) -> None:
    response = waiting.http.get("/api/session", headers={"Host": host.format(port=waiting.port)})
    assert response.status_code == 403
    assert "Host" in response.json()["detail"]


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST:{port}",
                                  "localhost"])
def test_a_loopback_host_header_is_accepted(waiting: LiveSession, host: str) -> None:
    response = waiting.http.get("/api/session", headers={"Host": host.format(port=waiting.port)})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("token", ["", "wrong"])
def test_a_websocket_without_the_token_is_refused(waiting: LiveSession, token: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(waiting.ws_url(token=token), open_timeout=DEADLINE)
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1.evil.example",
                                    "http://127.0.0.1:{other}", "https://127.0.0.1:{port}", "null"])
def test_a_websocket_from_a_foreign_origin_is_refused(waiting: LiveSession, origin: str) -> None:
    origin = origin.format(port=waiting.port, other=waiting.port + 1 if waiting.port < 65535 else 1)
    with pytest.raises(InvalidStatus) as refused:
        connect(waiting.ws_url(), additional_headers={"Origin": origin}, open_timeout=DEADLINE)
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:{port}", None])
def test_a_websocket_from_the_dashboard_or_a_tool_is_accepted(waiting: LiveSession, origin: str | None) -> None:
    headers = {"Origin": origin.format(port=waiting.port)} if origin else {}
    with connect(waiting.ws_url(after_seq=0), additional_headers=headers, open_timeout=DEADLINE) as ws:
        events = read_events(ws, until_seq=1)
    assert events[0]["seq"] == 1
    assert events[0]["kind"] == "run_created"


def _listening(port: int) -> list[str]:
    """The local addresses of every socket listening on ``port`` (Linux: /proc/net/tcp, tcp6)."""
    addresses = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc writes each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4))
                addresses.append(str(ipaddress.ip_address(raw)))
    return addresses


def test_the_server_and_the_channel_listen_on_loopback_only(waiting: LiveSession) -> None:
    server = waiting.server
    assert server.host == "127.0.0.1"
    assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
    for port in (server.port, server.channel.port):
        addresses = _listening(port)
        assert addresses, port
        assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


def test_the_server_runs_in_its_own_process_at_a_lower_priority(waiting: LiveSession) -> None:
    server_pid = waiting.server.pid
    assert server_pid is not None and server_pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, server_pid) > os.getpriority(os.PRIO_PROCESS, 0)
    # What the page reads comes from that process (the training process serves no HTTP).
    assert waiting.get("/api/session")["runs"][0]["id"] == waiting.run.run_id


def test_the_channel_takes_nothing_without_its_token(waiting: LiveSession) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", waiting.server.channel.port), timeout=10) as sock:
        sock.sendall(b'{"token": "wrong"}\n{"id": 1, "op": "command", "run_id": 1, "kind": "run"}\n')
        sock.settimeout(10)
        assert sock.recv(4096) == b""  # closed without an answer
    assert not [e for e in waiting.bus.snapshot() if e.kind == "command_applied"]


def test_the_token_has_at_least_128_random_bits(waiting: LiveSession) -> None:
    token = waiting.token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(raw) * 8 >= 128
    assert len(token) * 6 >= 128
    assert token != DashboardServer(waiting.run.session.dir, project="p", session_id="s").token


# ---- the JSON handshake ----------------------------------------------------------------------------
def test_the_quickstart_prints_one_json_handshake_line_and_exits_by_itself(subprocess_env: dict[str, str]) -> None:
    env = {**subprocess_env, "ONTHEFLY_HANDSHAKE": "json", "ONTHEFLY_DASHBOARD": "1"}
    env.pop("ONTHEFLY_KEEP_ALIVE", None)
    env.pop("ONTHEFLY_PORT", None)
    child = subprocess.Popen([sys.executable, str(REPO / "examples" / "quickstart.py")], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err
    handshakes = [line for line in out.splitlines() if line.startswith("{")]
    assert len(handshakes) == 1, out
    message = json.loads(handshakes[0])
    assert set(message) == {"onthefly"}
    info = message["onthefly"]
    assert set(info) == {"url", "token", "pid"}
    assert info["pid"] == child.pid
    assert len(info["token"]) * 6 >= 128
    assert info["url"].startswith("http://127.0.0.1:")
    assert f"token={info['token']}" in info["url"]
    assert info["url"] in err  # the human-readable announcement names the same URL
    assert "finished" in out  # the summary


@pytest.mark.parametrize(("handshake", "lines"), [("json", 1), (None, 0), ("text", 0)])
def test_the_handshake_line_is_printed_only_when_asked(
    waiting: LiveSession, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    handshake: str | None, lines: int,
) -> None:
    if handshake is None:
        monkeypatch.delenv("ONTHEFLY_HANDSHAKE", raising=False)
    else:
        monkeypatch.setenv("ONTHEFLY_HANDSHAKE", handshake)
    waiting.server.announce()
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == lines
    if lines:
        assert json.loads(out)["onthefly"] == {"url": waiting.server.url, "token": waiting.token,
                                               "pid": os.getpid()}
    assert waiting.server.url in err


# ---- malformed requests -------------------------------------------------------------------------
MALFORMED = [
    # (case, body, expected detail type, expected last element of loc, text in msg)
    ("not JSON", b"{kind: pause", "json_invalid", None, "JSON"),
    ("a list", [{"kind": "pause"}], None, None, ""),
    ("no kind", {"lr": 0.5}, "union_tag_not_found", None, "kind"),
    ("unknown kind", {"kind": "explode"}, "union_tag_invalid", None, "explode"),
    ("missing lr", {"kind": "set_lr"}, "missing", "lr", "required"),
    ("missing epochs", {"kind": "train_more"}, "missing", "epochs", "required"),
    ("extra field", {"kind": "pause", "force": True}, "extra_forbidden", "force", "not permitted"),
    ("extra field on set_lr", {"kind": "set_lr", "lr": 0.5, "momentum": 0.9}, "extra_forbidden", "momentum", ""),
    ("lr zero", {"kind": "set_lr", "lr": 0}, "greater_than", "lr", "greater than 0"),
    ("lr negative", {"kind": "set_lr", "lr": -0.1}, "greater_than", "lr", "greater than 0"),
    ("lr NaN", b'{"kind": "set_lr", "lr": NaN}', "finite_number", "lr", "finite"),
    ("lr Infinity", b'{"kind": "set_lr", "lr": Infinity}', "finite_number", "lr", "finite"),
    ("lr 'NaN'", {"kind": "set_lr", "lr": "NaN"}, None, "lr", ""),
    ("lr string", {"kind": "set_lr", "lr": "fast"}, None, "lr", ""),
    ("lr numeric string", {"kind": "set_lr", "lr": "0.5"}, None, "lr", ""),
    ("lr true", {"kind": "set_lr", "lr": True}, None, "lr", ""),
    ("lr null", {"kind": "set_lr", "lr": None}, None, "lr", ""),
    ("epochs zero", {"kind": "train_more", "epochs": 0}, "greater_than_equal", "epochs", "1"),
    ("epochs fraction", {"kind": "train_more", "epochs": 1.5}, None, "epochs", "integer"),
    ("epochs numeric string", {"kind": "train_more", "epochs": "2"}, None, "epochs", ""),
    ("epochs true", {"kind": "train_more", "epochs": True}, None, "epochs", ""),
    ("epochs huge", {"kind": "train_more", "epochs": 10**12}, "less_than_equal", "epochs", ""),
    ("group negative", {"kind": "set_lr", "lr": 0.5, "group": -1}, "greater_than_equal", "group", "0"),
    ("group fraction", {"kind": "set_lr", "lr": 0.5, "group": 0.5}, None, "group", ""),
    ("weight decay negative", {"kind": "set_weight_decay", "weight_decay": -1}, "greater_than_equal",
     "weight_decay", ""),
    # The engine's checkpoint takes a path; over HTTP nobody chooses where files are written.
    ("checkpoint path", {"kind": "checkpoint", "path": "/tmp/x"}, "extra_forbidden", "path", ""),
]


@pytest.mark.parametrize(("body", "error_type", "field", "text"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_a_malformed_command_gets_422_and_changes_nothing(
    waiting: LiveSession, body: Any, error_type: str | None, field: str | None, text: str,
) -> None:
    run = waiting.run
    before = waiting.bus.command_events()
    if isinstance(body, bytes):
        response = waiting.http.post("/api/runs/1/commands", content=body,
                                     headers={"Content-Type": "application/json"})
    else:
        response = waiting.http.post("/api/runs/1/commands", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    error = detail[0]
    assert error["msg"]
    if error_type is not None:
        assert error["type"] == error_type, detail
    if field is not None:
        assert error["loc"][-1] == field, detail
    assert text in error["msg"], detail
    # Nothing was queued: the probe is the next command the run applies, and the only one.
    applied = probe(waiting)
    after = waiting.bus.command_events()
    assert after[len(before):] == [applied]
    assert applied.payload["id"] == max([e.payload["id"] for e in before], default=0) + 1
    assert run.status == "created"
    assert run.global_step == 0
    assert [g["lr"] for g in run.optimizer.param_groups] == [0.1]
    assert waiting.get("/api/runs/1")["status"] == "created"


def test_a_body_that_is_not_utf8_gets_400_and_changes_nothing(waiting: LiveSession) -> None:
    before = waiting.bus.command_events()
    response = waiting.http.post("/api/runs/1/commands", content=b'{"kind": "\xff\xfe"}',
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "parsing the body" in response.json()["detail"]
    assert after_probe_only(waiting, before)


def test_a_json_integer_may_be_written_as_a_whole_number_float(waiting: LiveSession) -> None:
    response = waiting.command("set_weight_decay", weight_decay=0, group=0.0)
    assert response.status_code == 202, response.text
    assert response.json()["args"] == {"weight_decay": 0.0, "group": 0}
    assert waiting.applied(response.json()["id"]).payload["args"] == {"weight_decay": 0.0, "group": 0}


# One model per command, so one bound: what the engine's queue refuses, the API refuses, and a
# value at the bound passes both.
BOUNDS = [
    # (kind, a value past the bound, the value at it, the field)
    ("train_more", {"epochs": 100_001}, {"epochs": 100_000}, "epochs"),
    ("train_more", {"epochs": 0}, {"epochs": 1}, "epochs"),
    ("set_lr", {"lr": 0.5, "group": 10_001}, {"lr": 0.5, "group": 10_000}, "group"),
    ("set_weight_decay", {"weight_decay": 0.0, "group": -1}, {"weight_decay": 0.0, "group": 0}, "group"),
    ("cluster", {"k": 51}, {"k": 50}, "k"),
    ("cluster", {"epoch": 2**31 + 1}, {"epoch": 2**31}, "epoch"),
    ("cluster", {"layer": "x" * 501}, {"layer": "x" * 500}, "layer"),
]


@pytest.mark.parametrize(("kind", "past", "at", "field"), BOUNDS,
                         ids=[f"{kind}-{field}-{next(iter(past.values()))!s:.8}" for kind, past, _, field in BOUNDS])
def test_a_bound_is_the_same_for_the_engine_and_the_api(
    waiting: LiveSession, kind: str, past: dict[str, Any], at: dict[str, Any], field: str,
) -> None:
    doors = [("/api/runs/1/commands", {"kind": kind})]
    if kind == "cluster":
        doors.append(("/api/runs/1/clusters", {}))  # the same command, its own endpoint
    before = waiting.bus.command_events()
    with pytest.raises(ConfigError, match=f"^{field} must be "):
        waiting.run.request(kind, **past)
    for path, head in doors:
        response = waiting.http.post(path, json={**head, **past})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][-1] == field
    assert after_probe_only(waiting, before)

    assert CommandQueue().put(kind, **at).args.items() >= at.items()  # a queue of its own: nothing runs
    for path, head in doors:
        response = waiting.http.post(path, json={**head, **at})
        # Valid: queued (202), or refused for the run's state (409), never for the value.
        assert response.status_code in (202, 409), response.text
        if response.status_code == 202:
            settled(waiting, response.json()["id"])


@pytest.mark.parametrize(("path", "params", "field"), [
    ("/api/runs/1/metrics", {"start_step": 2**63}, "start_step"),
    ("/api/runs/1/metrics", {"end_step": 2**64}, "end_step"),
    ("/api/runs/1/metrics", {"start_step": -1}, "start_step"),
    ("/api/runs/1/metrics", {"points": 1}, "points"),
    ("/api/runs/1/metrics", {"points": 20_001}, "points"),
    ("/api/runs/1/metrics", {"names": "a;DROP TABLE metrics"}, "names"),
    ("/api/runs/1/metrics", {"names": ""}, "names"),
    ("/api/events", {"after_seq": 2**64}, "after_seq"),
    ("/api/events", {"after_seq": -1}, "after_seq"),
    ("/api/events", {"limit": 0}, "limit"),
    ("/api/events", {"limit": "many"}, "limit"),
    ("/api/runs/1/distribution", {"bins": 0}, "bins"),
    ("/api/runs/1/distribution", {"epoch": -1}, "epoch"),
    ("/api/runs/1/hard-samples", {"k": 0}, "k"),
    ("/api/runs/1/hard-samples", {"k": 1001}, "k"),
    ("/api/runs/one", {}, "run_id"),
])
def test_out_of_range_query_values_get_422_not_500(waiting: LiveSession, path: str, params: dict[str, Any],
                                                    field: str) -> None:
    response = waiting.http.get(path, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == field


@pytest.mark.parametrize("path", ["/api/runs/1/distribution", "/api/runs/1/hard-samples"])
def test_a_far_epoch_or_run_is_empty_or_404_not_500(waiting: LiveSession, path: str) -> None:
    assert waiting.http.get(path, params={"epoch": 2**64}).status_code == 200
    assert waiting.http.get(path.replace("/1/", f"/{2**64}/")).status_code == 404


def test_unknown_runs_get_404(waiting: LiveSession) -> None:
    for path in ("/api/runs/7", "/api/runs/7/metrics", "/api/runs/7/distribution", "/api/runs/7/hard-samples"):
        response = waiting.http.get(path)
        assert response.status_code == 404, path
        assert "no run 7" in response.json()["detail"]
    before = waiting.bus.command_events()
    response = waiting.command("set_lr", run_id=7, lr=0.5)
    assert response.status_code == 404
    assert "no run 7" in response.json()["detail"]
    assert after_probe_only(waiting, before)


def settled(session: LiveSession, command_id: int) -> Any:
    """The event that says what became of a queued command (applied or rejected)."""
    return session.bus.wait_for(lambda e: e.kind in ("command_applied", "command_rejected")
                                and e.payload["id"] == command_id, f"the outcome of command {command_id}")


def after_probe_only(session: LiveSession, before: list[Any]) -> bool:
    applied = probe(session)
    return session.bus.command_events()[len(before):] == [applied]


@pytest.mark.parametrize("kind", ["pause", "resume", "train_more"])
def test_a_command_impossible_while_waiting_for_run_gets_409(waiting: LiveSession, kind: str) -> None:
    before = waiting.bus.command_events()
    args = {"epochs": 1} if kind == "train_more" else {}
    response = waiting.command(kind, **args)
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"cannot {kind} while the run is created" in detail
    assert "possible now: run, stop" in detail
    assert after_probe_only(waiting, before)
    assert waiting.run.status == "created"


# ---- what the server reports ---------------------------------------------------------------------
def test_the_session_lists_the_run_with_its_live_state(trained: LiveSession) -> None:
    session = trained.get("/api/session")
    run = trained.run
    assert session["id"] == run.session.id
    assert session["project"] == "server"
    assert session["pid"] == os.getpid()
    assert Path(session["dir"]) == run.session.dir
    [info] = session["runs"]
    assert info == trained.get("/api/runs/1")
    assert info["id"] == 1 and info["name"] == "r"
    assert info["live"] is True
    assert info["status"] == "idle" == run.status
    assert info["step"] == STEPS_PER_EPOCH
    assert info["epoch"] == 1 and info["target_epochs"] == 1
    assert info["batches_per_epoch"] == STEPS_PER_EPOCH
    assert info["lr"] == 0.1
    assert info["loss"] == pytest.approx(run.latest["loss"])
    assert info["commands"] == run.possible_commands()
    assert "train_more" in info["commands"] and "pause" not in info["commands"]


def test_metrics_return_the_loss_and_lr_series(trained: LiveSession) -> None:
    series = trained.get("/api/runs/1/metrics", names="train_loss,lr")["series"]
    assert set(series) == {"train_loss", "lr"}
    reader = onthefly.open_session(trained.run.session.dir)  # what the store holds
    for name in ("train_loss", "lr"):
        rows = reader.metrics(1, name)
        assert series[name]["total"] == len(rows) == STEPS_PER_EPOCH
        assert series[name]["step"] == [r["step"] for r in rows] == list(range(1, STEPS_PER_EPOCH + 1))
        assert series[name]["value"] == pytest.approx([r["value"] for r in rows])
        assert series[name]["min"] == series[name]["max"] == series[name]["value"]
    assert series["lr"]["value"] == [0.1] * STEPS_PER_EPOCH
    assert all(v > 0 for v in series["train_loss"]["value"])


def test_an_unknown_metric_is_an_empty_series(trained: LiveSession) -> None:
    series = trained.get("/api/runs/1/metrics", names="no_such_metric")["series"]
    assert series == {"no_such_metric": {"step": [], "value": [], "min": [], "max": [], "total": 0}}


BIG = 100_000
SPIKE_STEP = 54_321


@pytest.fixture(scope="module")
def big_series(trained: LiveSession) -> np.ndarray:
    """100k rows of a metric of our own, written straight to the store, with one spike."""
    values = (np.arange(BIG) % 1000).astype(float)
    values[SPIKE_STEP] = 1e6
    trained.run.session.metrics([(1, "big", step, 0, 0.0, float(v)) for step, v in enumerate(values)])
    assert trained.run.session.flush()
    return values


@pytest.mark.parametrize("points", [2, 100, 2000, 20_000])
def test_a_long_series_is_downsampled_with_its_extremes(trained: LiveSession, big_series: np.ndarray,
                                                         points: int) -> None:
    series = trained.get("/api/runs/1/metrics", names="big", points=points)["series"]["big"]
    assert series["total"] == BIG
    assert 2 <= len(series["step"]) <= points
    assert len(series["value"]) == len(series["min"]) == len(series["max"]) == len(series["step"])
    assert series["step"] == sorted(series["step"])
    assert 0 <= series["step"][0] and series["step"][-1] <= BIG - 1
    for low, mean, high in zip(series["min"], series["value"], series["max"], strict=True):
        assert low <= mean <= high
    assert max(series["max"]) == 1e6  # the spike survives
    assert min(series["min"]) == 0.0
    # Each bucket's mean is a mean of raw values: the overall mean is within their range.
    assert min(series["value"]) <= big_series.mean() <= max(series["value"])


def test_start_and_end_step_narrow_the_series(trained: LiveSession, big_series: np.ndarray) -> None:
    exact = trained.get("/api/runs/1/metrics", names="big", start_step=1000, end_step=1999)["series"]["big"]
    assert exact["total"] == 1000
    assert exact["step"] == list(range(1000, 2000))
    assert exact["value"] == big_series[1000:2000].tolist()
    coarse = trained.get("/api/runs/1/metrics", names="big", start_step=50_000, end_step=59_999,
                         points=10)["series"]["big"]
    assert coarse["total"] == 10_000
    assert len(coarse["step"]) <= 10
    assert all(50_000 <= s <= 59_999 for s in coarse["step"])
    assert max(coarse["max"]) == 1e6
    tail = trained.get("/api/runs/1/metrics", names="big", start_step=BIG - 5)["series"]["big"]
    assert tail["step"] == list(range(BIG - 5, BIG))
    assert trained.get("/api/runs/1/metrics", names="big", start_step=10, end_step=5)["series"]["big"]["total"] == 0


def test_events_after_a_sequence_number_come_in_order(trained: LiveSession) -> None:
    published = {e.seq: e for e in trained.bus.snapshot()}
    last = max(published)
    page = trained.get("/api/events", after_seq=0, limit=10_000)
    seqs = [e["seq"] for e in page["events"]]
    assert seqs == list(range(1, last + 1))
    assert page["last_seq"] == last
    assert page["events"][0]["kind"] == "run_created"  # from before the server subscribed: from the store
    for event in page["events"][1:]:
        assert event["kind"] == published[event["seq"]].kind
    after = trained.get("/api/events", after_seq=5)
    assert [e["seq"] for e in after["events"]] == list(range(6, last + 1))
    assert after["events"] == page["events"][5:]
    # Paging with last_seq walks the same list.
    walked, cursor = [], 0
    while True:
        chunk = trained.get("/api/events", after_seq=cursor, limit=3)
        if not chunk["events"]:
            assert chunk["last_seq"] == cursor
            break
        assert len(chunk["events"]) <= 3
        walked.extend(chunk["events"])
        cursor = chunk["last_seq"]
    assert walked == page["events"]
    assert trained.get("/api/events", after_seq=last)["events"] == []


def stored_epoch(trained: LiveSession) -> tuple[np.ndarray, np.ndarray]:
    table = onthefly.open_session(trained.run.session.dir).samples(1, epoch=0)
    return table.column("index").to_numpy(), table.column("loss").to_numpy()


@pytest.mark.parametrize("bins", [1, 10, 50])
def test_the_distribution_matches_the_stored_losses(trained: LiveSession, bins: int) -> None:
    _, losses = stored_epoch(trained)
    assert len(losses) == TRAIN_SAMPLES
    dist = trained.get("/api/runs/1/distribution", bins=bins)
    assert dist["epoch"] == 0 and dist["epochs"] == [0]
    assert dist["count"] == TRAIN_SAMPLES
    assert len(dist["counts"]) == bins and len(dist["edges"]) == bins + 1
    assert sum(dist["counts"]) == TRAIN_SAMPLES
    assert dist["edges"][0] == pytest.approx(float(losses.min()))
    assert dist["edges"][-1] == pytest.approx(float(losses.max()))
    q = dist["quantiles"]
    assert q["p50"] <= q["p90"] <= q["p99"]
    expected = np.quantile(losses.astype(np.float64), [0.5, 0.9, 0.99])
    assert [q["p50"], q["p90"], q["p99"]] == pytest.approx(expected.tolist(), rel=1e-6)
    assert q["p95"] == pytest.approx(float(np.quantile(losses.astype(np.float64), 0.95)), rel=1e-6)
    median = float(np.median(losses.astype(np.float64)))
    assert dist["median"] == pytest.approx(median, rel=1e-6) and dist["exact"] is True
    assert dist["mad"] == pytest.approx(float(np.median(np.abs(losses - median))), rel=1e-5)
    assert trained.get("/api/runs/1/distribution", epoch=0, bins=bins) == dist


def test_the_distribution_of_an_epoch_not_recorded_is_empty(trained: LiveSession) -> None:
    dist = trained.get("/api/runs/1/distribution", epoch=5)
    assert dist == {"epoch": 5, "epochs": [0], "count": 0, "edges": [], "counts": [], "quantiles": None,
                    "live": False, "exact": True, "mean": None, "median": None, "mad": None}


def test_hard_samples_are_the_highest_losses_in_descending_order(trained: LiveSession) -> None:
    indices, losses = stored_epoch(trained)
    result = trained.get("/api/runs/1/hard-samples", k=5)
    assert result["epoch"] == 0
    rows = result["rows"]
    assert len(rows) == 5
    got = [r["loss"] for r in rows]
    assert got == sorted(got, reverse=True)
    top = np.argsort(-losses, kind="stable")[:5]
    assert [r["index"] for r in rows] == indices[top].tolist()
    assert got == pytest.approx(losses[top].tolist())
    for row in rows:  # classification signals come along
        assert row["label"] in (0, 1, 2) and row["pred"] in (0, 1, 2)
        assert row["correct"] == (row["label"] == row["pred"])
        assert math.isfinite(row["margin"])
    everything = trained.get("/api/runs/1/hard-samples", k=1000)["rows"]
    assert len(everything) == TRAIN_SAMPLES


# ---- commands over HTTP --------------------------------------------------------------------------
def test_pause_stops_the_steps_and_resume_continues(training: LiveSession) -> None:
    training.accepted("pause")
    paused = training.status_event("paused")
    info = training.get("/api/runs/1")
    assert info["status"] == "paused"
    assert info["step"] == paused.step
    assert "resume" in info["commands"] and "pause" not in info["commands"]
    # A command applied while paused shows the loop is waiting at that step, not training.
    assert probe(training).step == paused.step
    assert training.get("/api/runs/1")["step"] == paused.step == training.run.global_step
    training.accepted("resume")
    running = training.status_event("running", after_seq=paused.seq)
    training.bus.wait_for(lambda e: e.kind == "progress" and e.step > paused.step, "a step after resuming",
                          after_seq=running.seq)
    assert training.get("/api/runs/1")["status"] == "running"


def test_resume_while_running_gets_409_and_queues_nothing(training: LiveSession) -> None:
    first = training.accepted("set_weight_decay", weight_decay=0.0)
    response = training.command("resume")
    assert response.status_code == 409
    assert "cannot resume while the run is running" in response.json()["detail"]
    assert training.accepted("set_weight_decay", weight_decay=0.0) == first + 1
    training.applied(first + 1)
    kinds = [e.payload["command"] for e in training.bus.command_events()]
    assert kinds == ["set_weight_decay", "set_weight_decay"]


def test_set_lr_changes_the_optimizer_from_the_next_step(training: LiveSession) -> None:
    applied = training.applied(training.accepted("set_lr", lr=0.025))
    assert applied.payload["args"] == {"lr": 0.025, "group": None}
    assert applied.step is not None and applied.step > 0
    assert training.run.optimizer.param_groups[0]["lr"] == 0.025
    training.bus.wait_for(lambda e: e.kind == "progress" and e.step > applied.step + 1, "steps after set_lr",
                          after_seq=applied.seq)
    training.wait_until(lambda: training.get("/api/runs/1")["lr"] == 0.025, "the run reports the new lr")
    assert training.run.session.flush()
    lr = training.get("/api/runs/1/metrics", names="lr", end_step=applied.step + 1, points=20_000)
    steps, values = lr["series"]["lr"]["step"], lr["series"]["lr"]["value"]
    assert steps == list(range(1, applied.step + 2))
    assert values == [0.1] * applied.step + [0.025]  # the step it was applied at still used 0.1


def test_the_test_command_runs_an_evaluation(training: LiveSession) -> None:
    applied = training.applied(training.accepted("test"))
    result = training.bus.wait_for(lambda e: e.kind == "eval", "an eval event")
    assert result.payload["split"] == "test"
    assert result.payload["samples"] == 64
    assert result.seq < applied.seq
    events = training.get("/api/events", after_seq=result.seq - 1, limit=1)["events"]
    assert events[0]["kind"] == "eval" and events[0]["payload"]["split"] == "test"


# ---- offline: nothing the server serves loads anything from outside the machine ----------------
def test_no_page_the_server_serves_loads_anything_from_outside_the_machine(tmp_path: Path) -> None:
    import re
    from urllib.parse import urljoin, urlparse

    from onthefly.server.app import DASHBOARD_DIR

    if not (DASHBOARD_DIR / "index.html").is_file():
        pytest.fail("the dashboard is not built: run bash scripts/setup.sh")
    store = onthefly.store.SessionStore("offline")  # a session to serve, without a training process
    server = DashboardServer(store.dir, project="offline", session_id=store.id)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    auth = {"Authorization": f"Bearer {server.token}"}
    try:
        with httpx.Client(base_url=base, headers=auth) as client:
            for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):  # Swagger UI / ReDoc load CDN scripts
                assert client.get(path).status_code == 404, path
            assert client.get("/openapi.json").status_code == 200
            page = client.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            referenced = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
            assert referenced, page.text[:500]
            for ref in referenced:
                url = urlparse(urljoin(base + "/", ref))
                if url.scheme == "data":
                    continue  # inline: nothing is fetched
                assert url.hostname == "127.0.0.1" and url.port == server.port, ref
                asset = client.get(url.path)
                assert asset.status_code == 200, ref
                text = asset.text
                # What a stylesheet or a script would fetch: url(...), @import, import("..."), fetch("...").
                loads = re.findall(r"""url\(\s*["']?(https?:)?//|@import\s+["']?(?:https?:)?//|"""
                                   r"""import\(\s*["'](?:https?:)?//|fetch\(\s*["'](?:https?:)?//""", text)
                assert not loads, (ref, loads[:3])
    finally:
        server.stop(drain_timeout=0)
        store.close()
