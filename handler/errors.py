"""One exception hierarchy for the whole server.

`ClientError`s are the caller's fault (4xx), `ServerError`s are ours (5xx, or 424 when the model
failed). The HTTP layer turns any `ServingError` into the TGI error body
`{"error": message, "error_type": error_type}` with `status`, in one place.
`ConfigError` is separate: it stops start-up and never reaches a client.
"""

from __future__ import annotations


class ConfigError(Exception):
    """Invalid configuration found before loading the model. The message tells how to fix it."""


class ServingError(Exception):
    """Base of every error a request can end with."""

    status: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(ServingError):
    status = 400
    error_type = "bad_request"


class ValidationError(ClientError):
    """A request parameter is invalid (TGI: 422 `validation`)."""

    status = 422
    error_type = "validation"

    def __init__(self, message: str) -> None:
        super().__init__(f"Input validation error: {message}")


class TemplateError(ClientError):
    status = 422
    error_type = "template_error"


class OverloadedError(ClientError):
    """Too many requests in flight (TGI: 429 `overloaded`)."""

    status = 429
    error_type = "overloaded"


class ServerError(ServingError):
    status = 500
    error_type = "server_error"


class GenerationError(ServerError):
    """The model failed while generating this request (TGI: 424 `generation`)."""

    status = 424
    error_type = "generation"


class UnavailableError(ServerError):
    """The server is loading, draining or its scheduler died (503)."""

    status = 503
    error_type = "healthcheck"
