"""The object routes of the API server: list, upload, download, delete, limits, key checks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from anyserve.objects import ObjectStore

from .conftest import ApiServer, Procs, start_api_server

LIMIT = 64 * 1024


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def api(procs: Procs, store_dir: Path) -> ApiServer:
    return start_api_server(
        procs, extra=["--object-store", str(store_dir), "--max-object-size", str(LIMIT)]
    )


def test_upload_list_download_delete(api: ApiServer, store_dir: Path) -> None:
    data = os.urandom(LIMIT - 1)
    reply = httpx.post(api.url + "/objects", params={"key": "blob.bin"}, content=data)
    assert reply.status_code == 201, reply.text
    ref = reply.json()
    assert ref["key"] == "blob.bin"
    assert ref["size"] == len(data)
    assert ref["content_type"] == "bytes"
    assert ref["path"] == str(store_dir / "blob.bin")

    listing = httpx.get(api.url + "/objects").json()
    assert listing["total"] == 1
    assert [o["key"] for o in listing["objects"]] == ["blob.bin"]

    download = httpx.get(api.url + "/objects/blob.bin")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-length"] == str(len(data))
    assert download.headers["x-object-type"] == "bytes"
    assert hashlib.sha256(download.content).digest() == hashlib.sha256(data).digest()

    assert httpx.delete(api.url + "/objects/blob.bin").status_code == 200
    missing = httpx.get(api.url + "/objects/blob.bin")
    assert missing.status_code == 404
    assert "blob.bin" in missing.json()["detail"]
    assert httpx.delete(api.url + "/objects/blob.bin").status_code == 404
    assert httpx.get(api.url + "/objects").json() == {"objects": [], "total": 0}


def test_upload_is_streamed_in_chunks(api: ApiServer) -> None:
    chunks = [os.urandom(1000) for _ in range(20)]

    def body() -> Iterator[bytes]:
        yield from chunks  # no Content-Length: sent chunked

    reply = httpx.post(api.url + "/objects", content=body())
    assert reply.status_code == 201, reply.text
    key = reply.json()["key"]  # generated
    assert httpx.get(f"{api.url}/objects/{key}").content == b"".join(chunks)


def test_json_objects(api: ApiServer, store_dir: Path) -> None:
    reply = httpx.post(
        api.url + "/objects", params={"key": "cfg", "type": "json"}, content=b'{"a": [1, 2]}'
    )
    assert reply.status_code == 201
    assert reply.json()["content_type"] == "json"
    download = httpx.get(api.url + "/objects/cfg")
    assert download.headers["content-type"] == "application/json"
    assert download.json() == {"a": [1, 2]}
    # The replicas read the same directory.
    assert ObjectStore(store_dir).get("cfg") == {"a": [1, 2]}
    bad = httpx.post(api.url + "/objects", params={"key": "bad", "type": "json"}, content=b"{nope")
    assert bad.status_code == 400
    assert httpx.get(api.url + "/objects/bad").status_code == 404


def test_objects_written_by_replicas_are_listed(api: ApiServer, store_dir: Path) -> None:
    ref = ObjectStore(store_dir).create({"x": 1}, key="from-replica")
    listing = httpx.get(api.url + "/objects").json()["objects"]
    assert [o["key"] for o in listing] == ["from-replica"]
    assert listing[0]["path"] == str(ref)


@pytest.mark.parametrize("key", ["../escape", ".hidden", "a b", "x" * 300])
def test_bad_upload_key_is_400(api: ApiServer, key: str) -> None:
    reply = httpx.post(api.url + "/objects", params={"key": key}, content=b"x")
    assert reply.status_code == 400
    assert "key" in reply.json()["detail"]


@pytest.mark.parametrize("path", ["/objects/..%2Fetc%2Fpasswd", "/objects/a/b", "/objects/.meta"])
def test_bad_key_in_path_is_400(api: ApiServer, path: str) -> None:
    for method in ("GET", "DELETE"):
        reply = httpx.request(method, api.url + path)
        assert reply.status_code == 400, (method, path, reply.text)


def test_unknown_type_is_400(api: ApiServer) -> None:
    reply = httpx.post(api.url + "/objects", params={"type": "pickle"}, content=b"x")
    assert reply.status_code == 400


def test_oversize_upload_is_413(api: ApiServer, store_dir: Path) -> None:
    declared = httpx.post(api.url + "/objects", params={"key": "big"}, content=b"x" * (LIMIT + 1))
    assert declared.status_code == 413
    assert str(LIMIT) in declared.json()["detail"]

    def body() -> Iterator[bytes]:
        for _ in range(LIMIT // 1000 + 2):
            yield b"y" * 1000

    chunked = httpx.post(api.url + "/objects", params={"key": "big"}, content=body())
    assert chunked.status_code == 413
    assert httpx.get(api.url + "/objects").json()["total"] == 0
    assert not any(p.name.startswith(".tmp") for p in store_dir.iterdir())
