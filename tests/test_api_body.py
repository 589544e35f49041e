"""`handler.api.body.decode_json`: the one reading of request bodies, for the HTTP routes and
the SageMaker toolkit's `input_fn` (tests/test_server_errors.py and
tests/test_sagemaker_toolkit.py check both ends)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from handler.api.body import UnsupportedMediaType, decode_json
from handler.errors import ClientError

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b'{"inputs": "x"}', "application/json", {"inputs": "x"}),
        ('{"inputs": "x"}', None, {"inputs": "x"}),
        (bytearray(b'{"a": [1, 2]}'), "text/plain", {"a": [1, 2]}),
        ('{"a": "é"}'.encode("utf-16"), "application/json; charset=utf-16", {"a": "é"}),
        (b'\xef\xbb\xbf{"a": 1}', None, {"a": 1}),  # a UTF-8 byte order mark
        (b'{"a": 1}', "application/octet-stream", {"a": 1}),  # JSON whatever the type says
        (b'{"a": "\\ud83d\\ude00"}', None, {"a": "😀"}),  # an escaped pair is one character
        (b"[" * 500 + b"]" * 500, None, json.loads("[" * 500 + "]" * 500)),
    ],
)
def test_json_bodies_are_read_whatever_the_content_type(
    body: str | bytes, content_type: str | None, expected: Any
) -> None:
    assert decode_json(body, content_type) == expected


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b'{"inputs": ', "application/json", 400, "not valid JSON"),
        (b"", None, 400, "not valid JSON"),
        (b'{"inputs": "\xff"}', "text/plain", 400, "not valid JSON"),
        (b"a,b", "Text/CSV; charset=utf-8", 415, "Content-Type text/csv is not supported"),
        (DEEP, "application/json", 400, "nested too deeply"),
        (DEEP.decode(), None, 400, "nested too deeply"),
        (b'{"inputs": "\\ud800"}', None, 400, "unpaired UTF-16 surrogate"),
        (b'{"a": {"\\uDFFFb": 1}}', None, 400, "unpaired UTF-16 surrogate"),  # in a key
        ('{"inputs": "\ud800"}', None, 400, "unpaired UTF-16 surrogate"),  # a str body
        # The bytes of a lone surrogate (`json.loads` alone would decode them to one).
        (b'{"inputs": "\xed\xa0\x80"}', "application/json", 400, "not valid JSON"),
    ],
)
def test_other_bodies_are_client_errors(
    body: str | bytes, content_type: str | None, status: int, says: str
) -> None:
    with pytest.raises(ClientError) as raised:
        decode_json(body, content_type)
    assert raised.value.status == status and says in raised.value.message
    assert isinstance(raised.value, UnsupportedMediaType) == (status == 415)
    assert raised.value.error_type == ("unsupported_media_type" if status == 415 else "bad_request")
