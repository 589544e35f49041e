"""Request bodies decoded as JSON, one way for every entry point (the HTTP routes and the
SageMaker toolkit's `input_fn`).

A body that is JSON is read whatever its content type says: curl sends form-urlencoded and
`boto3` users often leave the default. One that is not JSON is a 415 under a content type that
is not a JSON one, else a 400. Whatever is decoded holds only valid Unicode: no tokenizer or
encoder accepts a lone UTF-16 surrogate.
"""

from __future__ import annotations

import json
import re
from typing import Any

from handler.errors import ClientError

JSON_TYPES = ("application/json", "text/json", "application/x-www-form-urlencoded", "text/plain")
"""Media types under which a body that is not JSON is a 400 (bad JSON), not a 415."""
SURROGATE_IN_TEXT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
"""A JSON escape of a UTF-16 surrogate, or a surrogate itself (a `str` body): a sign that the
decoded body may hold a lone one (a valid escaped pair decodes to one character)."""
SURROGATE = re.compile("[\ud800-\udfff]")
"""A surrogate code point in a decoded string: always unpaired (pairs decode to one character)."""


class UnsupportedMediaType(ClientError):
    """A body that is not JSON, sent under a content type that says it is something else."""

    status = 415
    error_type = "unsupported_media_type"


def media_type(content_type: str | None) -> str:
    """`Application/JSON; charset=utf-8` -> `application/json`; none -> empty."""
    return (content_type or "").split(";")[0].strip().lower()


def decode_json(body: str | bytes | bytearray, content_type: str | None) -> Any:
    """`body` decoded as JSON; `content_type` only chooses between a 400 and a 415 for a body
    that is not JSON. Bytes are decoded strictly, in the encoding JSON's rules detect (UTF-8,
    -16 or -32): `json.loads` would let the bytes of a lone surrogate through.

    Raises `ClientError` (400) for a body that is not JSON, is nested deeper than the decoder
    goes (about 1,000 levels, Python's recursion limit) or holds a lone surrogate, and
    `UnsupportedMediaType` (415) for one that is not JSON under a non-JSON content type.
    """
    try:
        text = body if isinstance(body, str) else bytes(body).decode(json.detect_encoding(body))
        data = json.loads(text)
    except RecursionError:
        raise ClientError(
            "The body is nested too deeply: this server decodes JSON up to about 1,000 levels"
        ) from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        kind = media_type(content_type)
        if kind and kind not in JSON_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {kind} is not supported: send application/json"
            ) from None
        raise ClientError("The body is not valid JSON") from None
    if SURROGATE_IN_TEXT.search(text) and _holds_lone_surrogate(data):
        raise ClientError(
            "The body is not valid JSON text: a string holds an unpaired UTF-16 surrogate "
            "(\\ud800-\\udfff); send valid Unicode"
        )
    return data


def _holds_lone_surrogate(data: Any) -> bool:
    """True when a string (or key) anywhere in decoded JSON holds a surrogate code point; walks
    without recursion, since the body may be nested as deep as the JSON decoder allows."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
