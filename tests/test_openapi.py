"""`/openapi.json`: a valid OpenAPI 3.1 document with every route the Flask app serves.

The fuzz tests (`test_fuzz.py`) generate requests from this document and check every answer
against it; here, without a model, that it is complete and well formed.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from handler.config import read_settings
from handler.server.app import create_app
from handler.server.metrics import Metrics
from handler.server.state import ServerState

IGNORED_METHODS = {"HEAD", "OPTIONS"}
"""Added by Flask to every GET route and every route: not documented."""


@pytest.fixture(scope="module")
def app() -> Flask:
    return create_app(ServerState(read_settings([], {})), Metrics())


@pytest.fixture(scope="module")
def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json


def test_it_is_a_valid_openapi_3_1_document(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    errors = [str(error) for error in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert not errors, errors[:5]
    for ref in refs(document):
        name = ref.removeprefix("#/components/schemas/")
        assert name in document["components"]["schemas"], ref


def test_it_lists_every_route_of_the_app_and_nothing_else(
    app: Flask, document: dict[str, Any]
) -> None:
    served = {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods - IGNORED_METHODS
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented
    assert len(served) == 18
    assert "static" not in {rule.endpoint for rule in app.url_map.iter_rules()}


def test_errors_have_tgis_body_and_streams_are_server_sent_events(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error", "error_type"]
    streaming = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "200" in responses, (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    (schema,) = response["content"].values()
                    name = schema["schema"]["$ref"].rsplit("/", 1)[-1]
                    assert set(schemas[name]["required"]) >= {"error", "error_type"}
            if method == "post":
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                assert refs(body), (method, path)
                assert {"400", "413", "415", "422"} <= set(responses), (method, path)
            if "text/event-stream" in responses["200"]["content"]:
                streaming.add(path)
    assert streaming == {
        "/generate_stream",
        "/",
        "/invocations",
        "/v1/chat/completions",
        "/v1/completions",
    }
    generate = document["paths"]["/generate"]["post"]
    assert {"424", "429", "500", "503"} <= set(generate["responses"])
    parameters = schemas["GenerateParameters"]["properties"]
    assert "max_new_tokens" in parameters and parameters["max_new_tokens"]["description"]


def refs(value: Any) -> list[str]:
    """Every `$ref` in a JSON value."""
    if isinstance(value, dict):
        found = [value["$ref"]] if "$ref" in value else []
        return found + [ref for item in value.values() for ref in refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in refs(item)]
    return []
