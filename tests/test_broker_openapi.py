"""The OpenAPI document: valid OpenAPI 3.1, served without auth, and in step with the app."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from broker.app import create_app
from broker.openapi import build_openapi
from broker.settings import BrokerSettings
from rlm_wire import broker_models as p
from tests.support.servers import BrokerServer

SETTINGS = BrokerSettings(redis_url="redis://127.0.0.1:1", admin_token="unused")
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): spec
        for path, item in document["paths"].items()
        for method, spec in item.items()
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_openapi(SETTINGS)
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = create_app(SETTINGS)
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # Starlette adds HEAD to every GET
    }
    assert len(routes) == len(app.routes)  # one method per route, all of them plain Routes
    assert set(_operations(build_openapi(SETTINGS))) == routes


def test_every_error_status_answers_the_error_body() -> None:
    for (method, path), spec in _operations(build_openapi(SETTINGS)).items():
        for status, response in spec["responses"].items():
            if int(status) >= 400 and path != "/health":  # /health's 503 is `Health`
                assert response["content"]["application/json"]["schema"] == ERROR_REF, (
                    method,
                    path,
                    status,
                )


def test_schemas_are_the_wire_models() -> None:
    schemas = build_openapi(SETTINGS)["components"]["schemas"]
    for model in (p.ErrorBody, p.LLMRequest, p.Answer, p.PendingRequest, p.SessionClosed):
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schemas[model.__name__] == expected
    # the models' "exactly one of" validators are in the schema too
    assert [b["required"] for b in schemas["LLMRequest"]["oneOf"]] == [["prompt"], ["messages"]]


def test_bodies_and_security() -> None:
    document = build_openapi(SETTINGS)
    operations = _operations(document)
    enqueue = operations["POST", "/enqueue"]["requestBody"]["content"]["application/json"]
    assert enqueue["schema"]["oneOf"] == [
        {"$ref": "#/components/schemas/LLMRequest"},
        {"$ref": "#/components/schemas/EnqueueBatch"},
    ]
    respond = operations["POST", "/respond"]["requestBody"]["content"]["application/json"]
    assert len(respond["schema"]["oneOf"]) == 2
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]
    public = {key for key, spec in operations.items() if spec.get("security") == []}
    assert public == {
        ("GET", "/health"),
        ("GET", "/health/live"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    }


def test_query_bounds_follow_the_settings() -> None:
    settings = BrokerSettings(
        redis_url="redis://127.0.0.1:1",
        max_wait_s=7.5,
        default_wait_s=2.0,
        default_pending_wait_s=1.0,
        max_pending_batch=9,
    )
    operations = _operations(build_openapi(settings))
    pending = {q["name"]: q["schema"] for q in operations["GET", "/pending"]["parameters"]}
    assert pending["max"] == {"type": "integer", "minimum": 1, "maximum": 9, "default": 9}
    assert pending["wait"] == {"type": "number", "minimum": 0, "maximum": 7.5, "default": 1.0}
    wait, key = operations["POST", "/enqueue"]["parameters"]
    assert (wait["name"], wait["in"]) == ("wait", "query")
    assert wait["schema"]["default"] == 2.0
    assert wait["schema"]["maximum"] == 7.5
    assert (key["name"], key["in"]) == ("Idempotency-Key", "header")
    # 1-200 printable ASCII, with the whitespace HTTP strips around a header value allowed.
    pattern = re.compile(key["schema"]["pattern"])
    for accepted in ("k", " k\t", "k" * 200, "a b"):
        assert pattern.match(accepted), accepted
    for refused in ("", " ", "k" * 201, "a\tb", "é"):
        assert not pattern.match(refused), refused


@pytest.mark.parametrize("overrides", [{}, {"max_pending_batch": 5}])
def test_served_without_auth(
    broker_factory: Callable[..., BrokerServer],
    overrides: dict[str, Any],
) -> None:
    broker: BrokerServer = broker_factory(**overrides)
    response = httpx2.get(f"{broker.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == build_openapi(broker.settings)
