"""Context: the store and API server a handler reaches, and the clear errors without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyserve import Context, ObjectStore
from anyserve.context import build_request, parse_capability
from anyserve.errors import BadRequest, ObjectStoreError, Unavailable


def test_context_objects_access(tmp_path: Path) -> None:
    ctx = Context(objects=ObjectStore(tmp_path / "store"), replica_id="r1", request_id="q1")
    ref = ctx.objects.create({"a": 1})
    assert ctx.objects.get(ref) == {"a": 1}
    assert (ctx.replica_id, ctx.request_id) == ("r1", "q1")


def test_context_without_store_gives_clear_error() -> None:
    with pytest.raises(ObjectStoreError, match="--object-store"):
        Context().objects.create({"a": 1})


def test_context_call_without_api_server_gives_clear_error() -> None:
    with pytest.raises(Unavailable, match="--api-server"):
        Context().call({"type": "embed"}, {"text": "x"})


def test_parse_capability_forms() -> None:
    assert parse_capability("type=embed, model=x") == {"type": "embed", "model": "x"}
    assert parse_capability({"type": "heavy", "gpus": 2}) == {"type": "heavy", "gpus": "2"}
    with pytest.raises(BadRequest):
        parse_capability("type")


def test_build_request_accepts_text_bytes_numbers_lists_and_refs(tmp_path: Path) -> None:
    ref = ObjectStore(tmp_path / "s").create(b"data")
    req = build_request(
        {"text": "hi", "raw": b"\xff", "n": 3, "xs": [1.5, 2], "flag": True, "ref": ref}
    )
    by_name = {t.name: t for t in req.inputs}
    assert by_name["text"].datatype == "BYTES"
    assert list(by_name["text"].contents.bytes_contents) == [b"hi"]
    assert list(by_name["raw"].contents.bytes_contents) == [b"\xff"]
    assert by_name["n"].datatype == "INT64" and list(by_name["n"].contents.int64_contents) == [3]
    assert by_name["xs"].datatype == "FP32" and list(by_name["xs"].shape) == [2]
    assert by_name["flag"].datatype == "BOOL"
    assert list(by_name["ref"].contents.bytes_contents) == [str(ref).encode()]
    with pytest.raises(BadRequest, match="input 'bad'"):
        build_request({"bad": [object()]})
