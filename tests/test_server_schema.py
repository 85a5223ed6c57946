"""The OpenAPI document is the API's contract: Schemathesis generates requests from it (valid and
invalid) and sends them to a live server, checking that none gets a 5xx and that every response
(status, content type, body) is one the document describes.

The generated tests are built when the module is collected, from the document the app publishes
(the same app the live server runs: a test checks that its /openapi.json is this document). The
server serves a throwaway run that trained one epoch and idles (keep_alive): generated commands
may change it (a new lr, a checkpoint, a test, even a stop), which is fine; a callback keeps a
generated ``train_more`` (up to 100 000 epochs) to one epoch so the run stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast, get_args

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import onthefly
from live_server import LiveSession, live, make_trainer
from onthefly.engine.control import COMMAND_KINDS, COMMANDS, AnyCommand, ClusterArgs, CompareArgs
from onthefly.server import models
from onthefly.server.app import create_app

# The document depends on no session: build it from an app that will never serve.
DOCUMENT = create_app(cast(Any, None), "unused", set).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


class OneEpochAtATime(onthefly.Callback):
    def on_epoch_end(self, run: onthefly.Run) -> None:
        run.target_epochs = min(run.target_epochs, run.epoch + 1)


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSession]:
    home: Path = tmp_path_factory.mktemp("otf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONTHEFLY_HOME", str(home))
        for session in live(make_trainer(callbacks=(OneEpochAtATime(),)), 1):
            session.status_event("idle")
            yield session


def test_the_live_server_publishes_this_document(idle: LiveSession) -> None:
    assert idle.get("/openapi.json") == DOCUMENT
    assert httpx.get(f"{idle.base}/openapi.json").status_code == 401  # the contract needs the token too


def test_the_document_describes_every_endpoint() -> None:
    operations = {op.ok().label for op in schema.get_all_operations()}
    assert operations == {
        "GET /api/session", "GET /api/runs/{run_id}", "GET /api/runs/{run_id}/metrics", "GET /api/events",
        "POST /api/runs/{run_id}/commands", "GET /api/runs/{run_id}/distribution",
        "GET /api/runs/{run_id}/hard-samples", "GET /api/runs/{run_id}/samples",
        "GET /api/runs/{run_id}/samples/{index}/history", "POST /api/runs/{run_id}/clusters",
        "GET /api/runs/{run_id}/clusters", "GET /api/clusterings/{clustering_id}", "GET /api/slices",
        "POST /api/slices", "GET /api/slices/{name}", "DELETE /api/slices/{name}", "POST /api/slices/{name}/exports",
        "GET /api/exports/{export_id}", "GET /api/exports/{export_id}/file", "POST /api/session/archives",
        "GET /api/session/archives/{archive_id}", "GET /api/session/archives/{archive_id}/file",
        "GET /api/session/report", "GET /api/plans", "GET /api/plans/{plan_id}", "POST /api/plans",
        "PATCH /api/plans/{plan_id}", "POST /api/plans/{plan_id}/discard", "POST /api/plans/{plan_id}/approve",
        "POST /api/plans/{plan_id}/preview",
        "GET /api/lineage", "POST /api/runs/{run_id}/comparisons", "GET /api/comparisons",
        "GET /api/comparisons/{comparison_id}", "GET /api/runs/{run_id}/mixture", "POST /api/runs/{run_id}/health",
        "POST /api/runs/{run_id}/verify",
    }


def schema_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            if key != "properties":  # property names are not keywords
                yield from schema_keys(value)
            else:
                for prop in value.values():
                    yield from schema_keys(prop)
    elif isinstance(node, list):
        for item in node:
            yield from schema_keys(item)


def test_bounds_are_json_schema_keywords_that_clients_can_read() -> None:
    """A bound pydantic could not translate leaks out as "ge"/"le", which no client understands."""
    keys = set(schema_keys(DOCUMENT["components"]["schemas"])) | set(schema_keys(DOCUMENT["paths"]))
    assert not keys & {"ge", "le", "gt", "lt"}
    group = DOCUMENT["components"]["schemas"]["SetLrCommand"]["properties"]["group"]
    assert {"type": "integer", "minimum": 0, "maximum": 10_000} in [
        {k: v for k, v in option.items() if k in ("type", "minimum", "maximum")} for option in group["anyOf"]]


def without_nulls(node: Any) -> Any:
    """FastAPI writes the document without null values (so no "default": null)."""
    if isinstance(node, dict):
        return {key: without_nulls(value) for key, value in node.items() if value is not None}
    if isinstance(node, list):
        return [without_nulls(item) for item in node]
    return node


def request_schema(path: str) -> Any:
    return DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_the_command_bodies_are_the_engines_models() -> None:
    """One definition of every command: the document publishes the engine's models as they are."""
    assert models.CommandBody is AnyCommand
    outside = get_args(get_args(AnyCommand)[0])  # the union's models
    mapping = request_schema("/api/runs/{run_id}/commands")["discriminator"]["mapping"]
    # Every command the queue takes but those only the server sends: "export" (for
    # POST /api/slices/{name}/exports: a page cannot name an export's file itself),
    # "execute_plan" (POST /api/plans/{id}/approve: a card is approved, not executed) and
    # "preview_plan" (POST /api/plans/{id}/preview), "compare" (POST /api/runs/{id}/comparisons) and
    # "health_check" (POST /api/runs/{id}/health) and "verify_suspects" (POST /api/runs/{id}/verify).
    assert list(mapping) == [kind for kind in COMMAND_KINDS
                             if kind not in ("export", "execute_plan", "preview_plan", "compare", "health_check",
                                             "verify_suspects")]
    assert [ref.rsplit("/", 1)[-1] for ref in mapping.values()] == [model.__name__ for model in outside]
    for model in (*outside, ClusterArgs, CompareArgs):
        engine = model.model_json_schema(ref_template="#/components/schemas/{model}")
        assert DOCUMENT["components"]["schemas"][model.__name__] == without_nulls(engine), model.__name__
    assert request_schema("/api/runs/{run_id}/clusters") == {"$ref": "#/components/schemas/ClusterArgs"}
    assert request_schema("/api/runs/{run_id}/comparisons") == {"$ref": "#/components/schemas/CompareArgs"}
    # Over HTTP nobody chooses where files are written: only an in-process checkpoint takes a path.
    assert "path" not in DOCUMENT["components"]["schemas"]["CheckpointCommand"]["properties"]
    assert "path" in COMMANDS["checkpoint"].model_fields


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_generated_requests_get_no_5xx_and_documented_responses(case: schemathesis.Case, idle: LiveSession) -> None:
    case.call_and_validate(base_url=idle.base, headers={"Authorization": f"Bearer {idle.token}"})
