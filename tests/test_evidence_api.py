"""The evidence endpoints against a live server: per-sample tables and histories, clusterings,
slices and their exports. Every answer is checked against the stored per-sample rows."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import onthefly
from live_server import TRAIN_SAMPLES, LiveSession, live, make_trainer

EPOCHS = 3


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSession]:
    """A run that trained EPOCHS epochs and waits for commands (keep_alive)."""
    home: Path = tmp_path_factory.mktemp("otf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONTHEFLY_HOME", str(home))
        for session in live(make_trainer(), EPOCHS):
            session.status_event("idle")
            session.run.session.flush()
            yield session


def stored_losses(session: LiveSession, epoch: int) -> dict[int, float]:
    table = onthefly.open_session(session.run.session.dir).samples(1, epoch=epoch)
    return dict(zip(table.column("index").to_pylist(), table.column("loss").to_pylist(), strict=True))


def post_slice(session: LiveSession, name: str, definition: dict[str, object], **extra: object) -> dict:
    response = session.http.post("/api/slices", json={"name": name, "run_id": 1, "definition": definition, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# ---- per-sample table and history ------------------------------------------------------------
def test_the_sample_table_is_the_last_epoch_sorted_by_loss(idle: LiveSession) -> None:
    table = idle.get("/api/runs/1/samples", limit=1000)
    assert table["epoch"] == EPOCHS - 1 and table["epochs"] == list(range(EPOCHS))
    assert table["total"] == TRAIN_SAMPLES and len(table["rows"]) == TRAIN_SAMPLES
    losses = stored_losses(idle, EPOCHS - 1)
    assert {r["index"]: r["loss"] for r in table["rows"]} == pytest.approx(losses)
    shown = [r["loss"] for r in table["rows"]]
    assert shown == sorted(shown, reverse=True)
    assert all(r["epochs"] == EPOCHS for r in table["rows"])
    assert table["grad_norm_method"] is None and "p90" in table["rule"]["hard"]
    assert table["sample_ids"] == "index"  # dataset indices (an IterableDataset's: "position")
    hard = [r for r in table["rows"] if r["hard"]]
    assert len(hard) == table["flags"]["hard"] == pytest.approx(TRAIN_SAMPLES / 10, abs=2)
    assert min(r["loss"] for r in hard) >= max(r["loss"] for r in table["rows"] if not r["hard"])


def test_the_sample_table_filters_sorts_and_pages(idle: LiveSession) -> None:
    everything = idle.get("/api/runs/1/samples", limit=1000)["rows"]
    hard = idle.get("/api/runs/1/samples", flag="hard", limit=1000)
    assert hard["total"] == hard["flags"]["hard"] and all(r["hard"] for r in hard["rows"])
    label = idle.get("/api/runs/1/samples", label=2, sort="index", order="asc", limit=1000)
    assert [r["index"] for r in label["rows"]] == sorted(r["index"] for r in everything if r["label"] == 2)
    page = idle.get("/api/runs/1/samples", sort="margin", order="asc", limit=10, offset=5)
    margins = sorted(r["margin"] for r in everything)
    assert [r["margin"] for r in page["rows"]] == pytest.approx(margins[5:15])
    early = idle.get("/api/runs/1/samples", epoch=0, limit=1)
    assert early["epoch"] == 0 and early["rows"][0]["epochs"] == 1


@pytest.mark.parametrize(("params", "field"), [
    ({"sort": "nonsense"}, "sort"), ({"flag": "odd"}, "flag"), ({"limit": 0}, "limit"),
    ({"hard_quantile": 1.5}, "hard_quantile"), ({"order": "up"}, "order"),
])
def test_bad_sample_table_queries_get_422(idle: LiveSession, params: dict[str, object], field: str) -> None:
    response = idle.http.get("/api/runs/1/samples", params=params)
    assert response.status_code == 422 and field in response.text


def test_a_sample_history_has_one_row_per_epoch(idle: LiveSession) -> None:
    history = idle.get("/api/runs/1/samples/7/history")
    assert [r["epoch"] for r in history["rows"]] == list(range(EPOCHS))
    for row in history["rows"]:
        assert row["loss"] == pytest.approx(stored_losses(idle, row["epoch"])[7])
    assert idle.get("/api/runs/1/samples/99999/history")["rows"] == []
    assert idle.http.get("/api/runs/9/samples/1/history").status_code == 404


# ---- slices ------------------------------------------------------------------------------------
def test_a_quantile_band_slice_is_saved_with_its_indices(idle: LiveSession) -> None:
    saved = post_slice(idle, "top decile", {"kind": "quantile_band", "low": 0.9, "high": 1.0})
    losses = stored_losses(idle, EPOCHS - 1)
    cut = np.quantile(np.array(list(losses.values()), dtype=np.float64), 0.9)
    expected = sorted(i for i, v in losses.items() if v >= cut)
    assert saved["epoch"] == EPOCHS - 1 and saved["count"] == len(expected)
    assert saved["definition"] == {"kind": "quantile_band", "low": 0.9, "high": 1.0}
    reader = onthefly.open_session(idle.run.session.dir)
    assert reader.slice_indices(reader.slice("top decile")).tolist() == expected
    assert "top decile" in [s["name"] for s in idle.get("/api/slices")]
    assert idle.get("/api/slices/top decile")["count"] == len(expected)


def test_slice_kinds_resolve_to_the_expected_samples(idle: LiveSession) -> None:
    rows = idle.get("/api/runs/1/samples", epoch=1, limit=1000)["rows"]
    cases = {
        "band": ({"kind": "loss_band", "low": 0.5, "high": None}, {r["index"] for r in rows if r["loss"] >= 0.5}),
        "label one": ({"kind": "label", "label": 1}, {r["index"] for r in rows if r["label"] == 1}),
        "picked": ({"kind": "indices", "indices": [3, 1, 3]}, {1, 3}),
        "wrong and unsure": ({"kind": "filter", "where": [{"signal": "margin", "op": "<", "value": 0},
                                                          {"signal": "loss", "op": ">=", "value": "p50"}]},
                             {r["index"] for r in rows if r["margin"] < 0
                              and r["loss"] >= np.quantile([x["loss"] for x in rows], 0.5)}),
        "flagged hard": ({"kind": "flag", "flag": "hard"}, {r["index"] for r in rows if r["hard"]}),
    }
    reader = onthefly.open_session(idle.run.session.dir)
    for name, (definition, expected) in cases.items():
        saved = post_slice(idle, name, definition, epoch=1)
        assert saved["epoch"] == 1
        assert set(reader.slice_indices(reader.slice(name)).tolist()) == expected, name


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"name": "x", "run_id": 1, "definition": {"kind": "nope"}}, 422, "kind"),
    ({"name": "-bad", "run_id": 1, "definition": {"kind": "label", "label": 1}}, 422, "name"),
    ({"name": "x", "run_id": 1, "definition": {"kind": "quantile_band", "low": 2}}, 422, "low"),
    ({"name": "x", "run_id": 1, "definition": {"kind": "label", "label": 1}, "extra": 1}, 422, "extra"),
    ({"name": "x", "run_id": 7, "definition": {"kind": "label", "label": 1}}, 404, "no run 7"),
    ({"name": "x", "run_id": 1, "definition": {"kind": "indices", "indices": [100000]}}, 404, "100000"),
    ({"name": "x", "run_id": 1, "definition": {"kind": "cluster", "clustering": 999, "cluster": 0}}, 404, "999"),
])
def test_bad_slices_are_refused_and_nothing_is_saved(idle: LiveSession, body: dict, status: int, text: str) -> None:
    before = idle.get("/api/slices")
    response = idle.http.post("/api/slices", json=body)
    assert response.status_code == status and text in response.text, response.text
    assert idle.get("/api/slices") == before


def test_a_slice_name_is_unique_and_a_deleted_slice_is_gone(idle: LiveSession) -> None:
    post_slice(idle, "twice", {"kind": "label", "label": 0})
    again = idle.http.post("/api/slices", json={"name": "twice", "run_id": 1, "definition": {"kind": "label", "label": 1}})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    path = idle.run.session.dir / onthefly.open_session(idle.run.session.dir).slice("twice")["path"]
    assert path.is_file()
    assert idle.http.delete("/api/slices/twice").status_code == 204
    assert idle.http.get("/api/slices/twice").status_code == 404
    assert idle.http.delete("/api/slices/twice").status_code == 404
    assert not path.exists()


# ---- export ------------------------------------------------------------------------------------
def export(session: LiveSession, name: str, **body: object) -> dict:
    """POST an export, wait until it is no longer pending; its final state."""
    response = session.http.post(f"/api/slices/{name}/exports", json=body)
    assert response.status_code == 202, response.text
    state = response.json()
    session.wait_until(lambda: session.get(f"/api/exports/{state['id']}")["status"] != "pending",
                       f"export {state['id']} finishing")
    return session.get(f"/api/exports/{state['id']}")


def test_a_slice_exports_to_every_format_with_the_sample_data(idle: LiveSession) -> None:
    saved = post_slice(idle, "for export", {"kind": "quantile_band", "low": 0.75, "high": 1.0})
    reader = onthefly.open_session(idle.run.session.dir)
    expected = reader.slice_indices(reader.slice("for export")).tolist()
    x, y = idle.trainer.train_loader.original.dataset.tensors
    tables = {}
    for fmt in ("parquet", "csv", "json"):
        state = export(idle, "for export", format=fmt)
        assert state["status"] == "ready" and state["rows"] == saved["count"], state
        assert state["data"] is True and state["note"] is None and len(state["id"]) == 32
        response = idle.http.get(f"/api/exports/{state['id']}/file")
        assert response.status_code == 200, response.text
        assert f'filename="for-export.{fmt}"' in response.headers["content-disposition"]
        if fmt == "parquet":
            tables[fmt] = pq.read_table(io.BytesIO(response.content))
        elif fmt == "csv":
            tables[fmt] = pacsv.read_csv(io.BytesIO(response.content))
        else:
            tables[fmt] = pa.Table.from_pylist(json.loads(response.content))
    for fmt, table in tables.items():
        assert table.num_rows == saved["count"], fmt
        assert table.column("index").to_pylist() == expected, fmt
        first = expected[0]
        row = table.slice(0, 1).to_pylist()[0]
        assert [row[f"x_{j}"] for j in range(x.shape[1])] == pytest.approx(x[first].tolist()), fmt
        assert row["y"] == int(y[first]) == row["label"], fmt
        assert {"loss", "margin", "aum", "forgetting", "hard", "mislabelled"} <= set(table.column_names)
    without = export(idle, "for export", data=False)
    assert without["status"] == "ready"
    table = pq.read_table(io.BytesIO(idle.http.get(f"/api/exports/{without['id']}/file").content))
    assert "x_0" not in table.column_names and table.num_rows == saved["count"]


def test_export_of_an_unknown_slice_or_format_or_export_is_refused(idle: LiveSession) -> None:
    assert idle.http.post("/api/slices/nothing/exports", json={}).status_code == 404
    post_slice(idle, "fmt", {"kind": "label", "label": 0})
    response = idle.http.post("/api/slices/fmt/exports", json={"format": "xlsx"})
    assert response.status_code == 422 and "format" in response.text
    for path in ("/api/exports/" + "0" * 32, "/api/exports/" + "0" * 32 + "/file", "/api/exports/..%2Fx/file"):
        assert idle.http.get(path).status_code == 404, path


def test_the_download_opens_with_the_pages_cookie_and_no_get_writes_a_file(idle: LiveSession) -> None:
    post_slice(idle, "cookie", {"kind": "label", "label": 1})
    state = export(idle, "cookie", format="csv")
    folder = idle.run.session.dir

    def files() -> set[tuple[str, int]]:
        return {(str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                if p.is_file() and not p.name.startswith("session.db")}

    before = files()
    cookie = {"Cookie": f"onthefly_token_{idle.port}={idle.token}"}
    with httpx.Client(base_url=idle.base) as browser:  # the page's native download: no header
        assert browser.get(f"/api/exports/{state['id']}/file", headers=cookie).status_code == 200
        assert browser.get(f"/api/exports/{state['id']}", headers=cookie).status_code == 401
    for path in ("/api/session", "/api/runs/1", "/api/runs/1/samples", "/api/runs/1/distribution",
                 "/api/runs/1/hard-samples", "/api/runs/1/samples/3/history", "/api/runs/1/clusters",
                 "/api/slices", "/api/slices/cookie", f"/api/exports/{state['id']}",
                 f"/api/exports/{state['id']}/file", "/api/events", "/openapi.json"):
        assert idle.http.get(path).status_code == 200, path
    assert files() == before


# ---- clustering ----------------------------------------------------------------------------------
def cluster(idle: LiveSession, **body: object) -> dict:
    response = idle.http.post("/api/runs/1/clusters", json=body)
    assert response.status_code == 202, response.text
    event = idle.applied(response.json()["id"])
    return idle.get(f"/api/clusterings/{event.payload['result']['clustering']}")


def test_clustering_on_signals_covers_every_sample(idle: LiveSession) -> None:
    result = cluster(idle, features="signals", k=3)
    assert result["k"] == 3 and result["chosen_by"] == "given" and result["epoch"] == EPOCHS - 1
    assert len(result["points"]["index"]) == TRAIN_SAMPLES
    assert sorted(result["points"]["index"]) == list(range(TRAIN_SAMPLES))
    sizes = [c["size"] for c in result["clusters"]]
    assert sum(sizes) == TRAIN_SAMPLES and len(sizes) == 3
    counts = np.bincount(result["points"]["cluster"], minlength=3)
    assert counts.tolist() == sizes
    assert sum(sum(c["labels"].values()) for c in result["clusters"]) == TRAIN_SAMPLES
    # A cluster becomes a slice.
    saved = post_slice(idle, "cluster one", {"kind": "cluster", "clustering": result["id"], "cluster": 1})
    assert saved["count"] == sizes[1]
    assert result["id"] in [c["id"] for c in idle.get("/api/runs/1/clusters")]


def test_clustering_on_embeddings_picks_k_by_silhouette(idle: LiveSession) -> None:
    step = idle.run.global_step
    result = cluster(idle, features="embeddings", subset="hard")
    assert result["layer"] == "2" and result["chosen_by"] == "silhouette" and 2 <= result["k"] <= 8
    assert len(result["points"]["index"]) == idle.get("/api/runs/1/samples")["flags"]["hard"]
    assert idle.run.global_step == step  # taking embeddings does not train


def test_bad_cluster_requests_are_refused(idle: LiveSession) -> None:
    assert idle.http.post("/api/runs/1/clusters", json={"k": 1}).status_code == 422
    assert idle.http.post("/api/runs/1/clusters", json={"features": "pixels"}).status_code == 422
    assert idle.http.post("/api/runs/5/clusters", json={}).status_code == 404
    response = idle.http.post("/api/runs/1/clusters", json={"features": "embeddings", "layer": "nope"})
    event = idle.bus.wait_for(lambda e: e.kind == "command_rejected" and e.payload["id"] == response.json()["id"],
                              "the rejection")
    assert "no module named 'nope'" in event.payload["reason"]
    assert idle.http.get("/api/clusterings/999").status_code == 404


# ---- the live distribution -----------------------------------------------------------------------
def test_the_distribution_of_the_epoch_in_progress_is_live(tmp_path: Path) -> None:
    class PauseMidEpoch(onthefly.Callback):
        def on_step_end(self, run: onthefly.Run) -> None:
            if run.global_step == 10:
                run.request("pause")

    for session in live(make_trainer(samples=2048, callbacks=(PauseMidEpoch(),)), 2):
        session.status_event("paused")
        expected = session.run.global_step * 32  # the pause flushed every recorded row to the host
        assert 0 < expected < 2048
        session.wait_until(lambda s=session, n=expected: s.get("/api/runs/1/distribution")["count"] == n,
                           "the live distribution has every sample so far")
        dist = session.get("/api/runs/1/distribution")
        assert dist["live"] is True and dist["epoch"] == 0 and dist["exact"] is True  # all kept so far
        assert sum(dist["counts"]) == expected and dist["epochs"] == [0]
        assert dist["quantiles"]["p50"] <= dist["quantiles"]["p95"] <= dist["quantiles"]["p99"]


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize(("offset", "limit"), [(0, 50), (37, 20), (990, 50), (400, 600), (2000, 10)])
def test_a_table_page_is_the_full_sorts_page(descending: bool, offset: int, limit: int) -> None:
    """The partial sort the table endpoint uses gives exactly the rows of a full sort: missing
    values last, ties in index order."""
    from onthefly.server.samples import _page

    rng = np.random.default_rng(0)
    values = rng.integers(0, 30, size=1000).astype(np.float64)  # many ties
    values[rng.choice(1000, 40, replace=False)] = np.nan
    values[:3] = np.inf
    table = pa.table({"index": np.arange(1000), "loss": values})
    key = np.where(np.isfinite(values), -values if descending else values, 0.0)
    reference = np.lexsort((np.arange(1000), key, ~np.isfinite(values)))[offset : offset + limit]
    assert _page(table, "loss", descending, offset, limit).tolist() == reference.tolist()
