"""The OpenAPI 3.1 document of every route, built from the pydantic wire schemas.

`/openapi.json` serves it; the fuzz tests generate requests from it (schemathesis) and check the
answers against it. Each route lists every status it can answer with: errors have TGI's body
`{"error", "error_type"}`. A stream's schema describes one server-sent event, as OpenAPI 3.1
tools read it (3.2 calls it `itemSchema`): its `data` is JSON text whose schema is the
`contentSchema`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from handler import __version__
from handler.api import openai, tgi
from handler.api.common import ErrorResponse

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "The body is not valid JSON",
    401: "Missing or wrong API key (with `--api-key`)",
    406: "The `Accept` header asks for something other than JSON or server-sent events",
    413: "The body is larger than `PAYLOAD_LIMIT`",
    415: "A content type other than JSON with a body that is not JSON",
    422: "A parameter is invalid (`validation`) or the chat template failed (`template_error`)",
    424: "The model failed while generating (`generation`)",
    429: "`MAX_CONCURRENT_REQUESTS` are in flight (`overloaded`)",
    500: "A bug in the server (`server_error`)",
    503: "The model is loading, the server is draining, or its scheduler died (`healthcheck`)",
}
GENERATION_ERRORS = (400, 401, 413, 415, 422, 424, 429, 500, 503)


@dataclass(frozen=True)
class Route:
    """One method on one path, as the document describes it."""

    method: str
    path: str
    summary: str
    body: tuple[type[pydantic.BaseModel], ...] = ()
    """Request body schemas (several: any of them)."""
    json: Any = None
    """Schema of the 200 JSON answer: a model, `list[model]`, or a tuple of alternatives."""
    events: tuple[type[pydantic.BaseModel], ...] = ()
    """Schemas of the events of a 200 `text/event-stream` answer."""
    text: str = ""
    """The media type of a 200 answer that is text, not JSON (`text/plain`, `text/html`...)."""
    errors: tuple[int, ...] = (401,)
    headers: tuple[str, ...] = ()
    """Request headers the route reads."""
    public: bool = False
    """Reachable without the API key."""
    extra: dict[int, type[pydantic.BaseModel]] = field(default_factory=dict)
    """Statuses other than 200 whose body has its own schema."""


GENERATE_EVENTS = (tgi.StreamResponse, ErrorResponse)
ROUTES = (
    Route(
        "post",
        "/generate",
        "TGI generate: the whole answer at once",
        body=(tgi.GenerateRequest,),
        json=tgi.GenerateResponse,
        errors=GENERATION_ERRORS,
    ),
    Route(
        "post",
        "/generate_stream",
        "TGI generate as server-sent events, one per token",
        body=(tgi.GenerateRequest,),
        events=GENERATE_EVENTS,
        errors=GENERATION_ERRORS,
    ),
    Route(
        "post",
        "/",
        "TGI compatible generate: a list of one answer, or a stream with `stream: true`",
        body=(tgi.GenerateRequest,),
        json=list[tgi.GenerateResponse],
        events=GENERATE_EVENTS,
        errors=GENERATION_ERRORS,
    ),
    Route(
        "post",
        "/invocations",
        "SageMaker: `inputs` = generate, `messages` = chat, `prompt` = completions; streams "
        "with `stream: true` or `Accept: text/event-stream`",
        body=(tgi.GenerateRequest, openai.ChatCompletionRequest, openai.CompletionRequest),
        json=(list[tgi.GenerateResponse], openai.ChatCompletion, openai.Completion),
        events=(
            *GENERATE_EVENTS,
            openai.ChatCompletionChunk,
            openai.Completion,
            openai.StreamError,
        ),
        errors=(*GENERATION_ERRORS, 406),
        headers=("Accept",),
    ),
    Route(
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions (streams end with `data: [DONE]`)",
        body=(openai.ChatCompletionRequest,),
        json=openai.ChatCompletion,
        events=(openai.ChatCompletionChunk, openai.StreamError),
        errors=GENERATION_ERRORS,
    ),
    Route(
        "post",
        "/v1/completions",
        "OpenAI completions (streams end with `data: [DONE]`)",
        body=(openai.CompletionRequest,),
        json=openai.Completion,
        events=(openai.Completion, openai.StreamError),
        errors=GENERATION_ERRORS,
    ),
    Route(
        "post",
        "/tokenize",
        "Token ids of `inputs` with their text and UTF-8 byte offsets",
        body=(tgi.GenerateRequest,),
        json=list[tgi.TokenizedToken],
        errors=(400, 401, 413, 415, 422, 500, 503),
    ),
    Route(
        "post",
        "/chat_tokenize",
        "The chat template applied to `messages`, and its tokens",
        body=(openai.ChatCompletionRequest,),
        json=tgi.ChatTokenizeResponse,
        errors=(400, 401, 413, 415, 422, 500, 503),
    ),
    Route("get", "/info", "Model, limits and server information", json=tgi.Info),
    Route("get", "/v1/models", "The served model", json=openai.ModelList, errors=(401, 503)),
    Route("get", "/metrics", "Prometheus metrics under TGI's names", text="text/plain"),
    Route("get", "/openapi.json", "This document", json=dict[str, Any]),
    # Swagger UI (handler/server/docs.py): public, and never an error of its own.
    Route(
        "get", "/docs", "Swagger UI over this document", text="text/html", errors=(), public=True
    ),
    Route(
        "get",
        "/docs/swagger-ui-bundle.js",
        "Swagger UI's script, from the bundled package",
        text="text/javascript",
        errors=(),
        public=True,
    ),
    Route(
        "get",
        "/docs/swagger-ui.css",
        "Swagger UI's stylesheet, from the bundled package",
        text="text/css",
        errors=(),
        public=True,
    ),
    *(
        Route(
            "get",
            path,
            summary,
            json=tgi.Health,
            errors=(),
            public=True,
            extra={503: tgi.Unhealthy},
        )
        for path, summary in (
            ("/ping", "SageMaker health check: 200 once ready, 503 while not"),
            ("/health", "TGI health check: 200 once ready, 503 while not"),
            ("/", "Health check (GET)"),
        )
    ),
)


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; it depends on the code only)."""
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hf-neuron-serving",
            "version": __version__,
            "description": "Text Generation Inference, OpenAI and SageMaker routes of one model.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{route.method}_{route.path.strip('/').replace('/', '_') or 'root'}",
        "summary": route.summary,
        "responses": _responses(route, schemas),
    }
    if not route.public:
        operation["security"] = [{}, {"apiKey": []}]
    if route.headers:
        operation["parameters"] = [
            {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
            for name in route.headers
        ]
    if route.body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _any_of(route.body, schemas, "validation")}},
        }
    return operation


def _responses(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if route.json is not None:
        alternatives = route.json if isinstance(route.json, tuple) else (route.json,)
        content["application/json"] = {"schema": _any_of(alternatives, schemas)}
    if route.events:
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "description": "One event, `data: {json}` and a blank line. OpenAI streams end "
                "with `data: [DONE]`; a failed stream ends with an error event.",
                "required": ["data"],
                "properties": {
                    "data": {
                        "type": "string",
                        "anyOf": [
                            {"const": "[DONE]"},
                            {
                                "contentMediaType": "application/json",
                                "contentSchema": _any_of(route.events, schemas),
                            },
                        ],
                    }
                },
            }
        }
    if route.text:
        content[route.text] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    error = {"application/json": {"schema": _schema(ErrorResponse, schemas)}}
    for status in sorted(route.errors):
        responses[str(status)] = {"description": ERRORS[status], "content": error}
    for status, model in route.extra.items():
        responses[str(status)] = {
            "description": ERRORS[status],
            "content": {"application/json": {"schema": _schema(model, schemas)}},
        }
    return responses


def _any_of(
    alternatives: tuple[Any, ...], schemas: dict[str, Any], mode: JsonSchemaMode = "serialization"
) -> dict[str, Any]:
    options = [_schema(a, schemas, mode) for a in alternatives]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _schema(
    annotation: Any, schemas: dict[str, Any], mode: JsonSchemaMode = "serialization"
) -> dict[str, Any]:
    """A JSON schema for a model or a `list[model]` / `dict[...]`; models go to `schemas`.
    `mode`: `validation` for request bodies (what is accepted), else what is sent."""
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        (item,) = annotation.__args__
        return {"type": "array", "items": _schema(item, schemas, mode)}
    if origin is dict:
        return {"type": "object"}
    _, definitions = models_json_schema([(annotation, mode)], ref_template=REF)
    schemas.update(definitions.get("$defs", {}))
    return {"$ref": REF.format(model=annotation.__name__)}
