"""The object store against plain files, and 64 MiB through the API server's object routes.

``ObjectStore.create`` writes a temp file, fsyncs it, writes the metadata sidecar, renames
both into place and fsyncs the directories; the plain baseline is what a program without
the store would do at least: open, write, fsync, close. Reads are ``ObjectStore.get``
against ``open().read()``; both come from the page cache, since the bytes were just
written. Store and plain operations alternate, so drift on a shared machine hits both.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from anyserve.objects import ObjectStore
from benchmarks.http import Connection, HttpError, build_request
from benchmarks.servers import ApiServer
from benchmarks.settings import Settings

MIB = 1 << 20
HTTP_SIZE = 64 * MIB


def _label(size: int) -> str:
    return f"{size // MIB}MiB" if size >= MIB else f"{size // 1024}KiB"


def _timed(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def _plain_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _rates(size: int, seconds: list[float]) -> tuple[float, float]:
    """MiB/s and operations/s from the median time of one operation."""
    median = statistics.median(seconds)
    return size / median / MIB, 1 / median


def local(work_dir: Path, settings: Settings) -> dict[str, Any]:
    """``{"1KiB": figures, "1MiB": ..., "64MiB": ...}`` for the store against plain files."""
    store = ObjectStore(work_dir / "store")
    plain = work_dir / "plain"
    plain.mkdir(mode=0o700, exist_ok=True)
    out: dict[str, Any] = {}
    for size, reps in settings.object_reps:
        data = os.urandom(size)
        label = _label(size)
        create, write, get, read = [], [], [], []
        for i in range(reps):
            key, path = f"bench-{label}-{i}", plain / f"bench-{label}-{i}"
            create.append(_timed(partial(store.create, data, key=key)))
            write.append(_timed(partial(_plain_write, path, data)))
        for i in range(reps):
            key, path = f"bench-{label}-{i}", plain / f"bench-{label}-{i}"
            get.append(_timed(partial(store.get, key)))
            read.append(_timed(partial(_plain_read, path)))
        for i in range(reps):
            store.delete(f"bench-{label}-{i}")
            (plain / f"bench-{label}-{i}").unlink()
        figures: dict[str, Any] = {"size": size, "reps": reps}
        for name, seconds in (("create", create), ("write", write), ("get", get), ("read", read)):
            mib_s, ops = _rates(size, seconds)
            figures[f"{name}_mib_s"] = round(mib_s, 1)
            figures[f"{name}_ops_s"] = round(ops, 1)
        figures["create_over_write"] = round(figures["create_mib_s"] / figures["write_mib_s"], 3)
        figures["get_over_read"] = round(figures["get_mib_s"] / figures["read_mib_s"], 3)
        out[label] = figures
        settings.progress(
            f"objects {label:6} create {figures['create_mib_s']:8.1f} MiB/s "
            f"(plain {figures['write_mib_s']:.1f}), get {figures['get_mib_s']:8.1f} MiB/s "
            f"(plain {figures['read_mib_s']:.1f})"
        )
    return out


async def over_http(api: ApiServer, settings: Settings, local_64: dict[str, Any]) -> dict[str, Any]:
    """Upload (``POST /objects?key=``) and download (``GET /objects/{key}``) of 64 MiB."""
    data = os.urandom(HTTP_SIZE)
    conn = await Connection.open("127.0.0.1", api.port)
    up, down = [], []
    try:
        for i in range(settings.http_object_reps):
            key = f"bench-http-{os.getpid()}-{i}"
            upload = build_request(
                "POST",
                "127.0.0.1",
                api.port,
                f"/objects?key={key}",
                data,
                {"Content-Type": "application/octet-stream"},
            )
            t0 = time.perf_counter()
            status, body = await conn.request(upload)
            up.append(time.perf_counter() - t0)
            if status != 201:
                raise HttpError(f"upload answered {status}: {body[:300]!r}")
            del upload
            download = build_request("GET", "127.0.0.1", api.port, f"/objects/{key}")
            t0 = time.perf_counter()
            status, body = await conn.request(download)
            down.append(time.perf_counter() - t0)
            if status != 200 or len(body) != HTTP_SIZE:
                raise HttpError(f"download answered {status} with {len(body)} bytes")
            delete = build_request("DELETE", "127.0.0.1", api.port, f"/objects/{key}")
            await conn.request(delete)
    finally:
        await conn.close()
    upload_mib_s, _ = _rates(HTTP_SIZE, up)
    download_mib_s, _ = _rates(HTTP_SIZE, down)
    figures = {
        "size": HTTP_SIZE,
        "reps": len(up),
        "upload_mib_s": round(upload_mib_s, 1),
        "download_mib_s": round(download_mib_s, 1),
        "upload_s": round(statistics.median(up), 3),
        "download_s": round(statistics.median(down), 3),
        # Against the store used directly, in this process: what HTTP adds.
        "upload_over_create": round(upload_mib_s / local_64["create_mib_s"], 3),
        "download_over_get": round(download_mib_s / local_64["get_mib_s"], 3),
    }
    settings.progress(
        f"objects http   upload {upload_mib_s:8.1f} MiB/s, download {download_mib_s:8.1f} MiB/s"
    )
    return figures
