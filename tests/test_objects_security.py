"""The object store against another local user, crashes mid-write and hostile JSON.

Every attack here is performed for real on real directories: swapping the store directory
(for one owned by another uid when the tests run as root), symlinks planted in place of
``.meta``, sidecars and the lock file, writes stopped part-way through the injected
``after_step`` seam or by a process that exits mid-write, and JSON nested 100k deep.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve.errors import BadRequest, ObjectNotFound, ObjectStoreError
from anyserve.objects import MAX_JSON_DEPTH, ObjectStore

from .conftest import Procs, start_api_server

NOBODY = 65534


class MakesDir:
    """Unpickling it creates a directory: proof of whether a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.path),))


def files(directory: Path) -> dict[str, bytes]:
    """Every regular file under ``directory`` and its content, hidden ones included."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def plant(directory: Path, key: str, payload: bytes, content_type: str) -> None:
    """Write an object and a sidecar that describes it exactly as a store would."""
    (directory / ".meta").mkdir(mode=0o700, exist_ok=True)
    data = directory / key
    data.write_bytes(payload)
    st = data.stat()
    meta = {
        "key": key,
        "content_type": content_type,
        "created_at": 1.0,
        "size": st.st_size,
        "ino": st.st_ino,
        "previous": None,
    }
    (directory / ".meta" / f"{key}.json").write_text(json.dumps(meta))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pickle-was-loaded"


# --------------------------------------------------------------------------- a swapped directory


def swap_directory(root: Path, marker: Path, owner: int | None) -> Path:
    """Do what the attacker does: move the store away and plant a new one at its path.

    Returns where the original directory went. The impostor holds a pickle under the key the
    store already uses and under a new key, each with a sidecar declaring it a pickle.
    """
    moved = root.with_name("objects-moved")
    root.rename(moved)
    root.mkdir(mode=0o700)
    payload = pickle.dumps(MakesDir(marker))
    plant(root, "k", payload, "pickle")
    plant(root, "planted", payload, "pickle")
    if owner is not None:
        for path in (root, *root.rglob("*")):
            os.chown(path, owner, owner)
    return moved


def assert_swapped_store_refused(store: ObjectStore, root: Path, marker: Path) -> None:
    before = files(root)
    checks: list[Any] = [
        lambda: store.get("k"),
        lambda: store.get("planted"),
        lambda: store.get(str(root / "planted")),
        lambda: store.stat("planted"),
        lambda: store.open("planted"),
        lambda: store.exists("planted"),
        lambda: store.list(),
        lambda: store.create({"new": True}, key="new"),
        lambda: store.create(b"x"),
        lambda: store.write_stream([b"x"], key="streamed"),
        lambda: store.delete("planted"),
        lambda: store.cleanup(0),
    ]
    for check in checks:
        with pytest.raises(ObjectStoreError, match="removed or replaced"):
            check()
    assert not marker.exists(), "a planted pickle was loaded"
    assert files(root) == before, "the store wrote into, or removed from, the new directory"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory for uid 65534")
def test_directory_recreated_by_another_user_is_never_used(root: Path, marker: Path) -> None:
    store = ObjectStore(root, allow_pickle=True)
    store.create({"mine": True}, key="k")
    moved = swap_directory(root, marker, owner=NOBODY)
    assert root.stat().st_uid == NOBODY
    assert_swapped_store_refused(store, root, marker)
    # The original directory, wherever it went, still holds the store's own object whole.
    assert json.loads((moved / "k").read_bytes()) == {"mine": True}
    # A fresh store refuses the impostor outright.
    with pytest.raises(ObjectStoreError, match="owned by uid 65534"):
        ObjectStore(root, allow_pickle=True)


def test_directory_removed_and_recreated_is_never_used(root: Path, marker: Path) -> None:
    # The same attack without root: even a directory of the right owner and mode is not
    # the one this store verified, so it is refused rather than trusted.
    store = ObjectStore(root, allow_pickle=True)
    store.create({"mine": True}, key="k")
    swap_directory(root, marker, owner=None)
    assert_swapped_store_refused(store, root, marker)


def test_directory_removed_is_reported(root: Path) -> None:
    store = ObjectStore(root)
    store.create(b"x", key="k")
    root.rename(root.with_name("elsewhere"))
    with pytest.raises(ObjectStoreError, match="removed or replaced"):
        store.get("k")
    assert not root.exists()


def test_swap_during_a_write_lands_in_the_original_directory(root: Path, tmp_path: Path) -> None:
    # The path is checked before each operation; a swap right after that check must still
    # not redirect the rest of the write. The seam swaps between the two renames.
    moved = tmp_path / "objects-moved"

    def swap(step: str) -> None:
        if step == "meta-renamed":
            root.rename(moved)
            root.mkdir(mode=0o700)

    ObjectStore(root).create(b"old", key="k")
    store = ObjectStore(root, after_step=swap)
    ref = store.create(b"new", key="k")
    assert files(root) == {}
    assert (moved / "k").read_bytes() == b"new"
    again = ObjectStore(moved)
    assert (again.stat("k").size, again.stat("k").content_type) == (ref.size, "bytes")
    assert again.get("k") == b"new"


def test_user_paths_inside_the_store_still_work(root: Path) -> None:
    store = ObjectStore(root)
    ref = store.create([1, 2], key="k")
    assert store.get(str(root / "k")) == [1, 2]
    assert store.get(ref.path) == [1, 2]
    assert store.exists(root / "k")


# --------------------------------------------------------------------------- planted symlinks


def test_meta_directory_swapped_for_a_symlink_is_refused(
    root: Path, tmp_path: Path, marker: Path
) -> None:
    store = ObjectStore(root, allow_pickle=True)
    # Raw bytes that happen to be a pickle: safe as long as nothing calls them a pickle.
    store.create(pickle.dumps(MakesDir(marker)), key="k", content_type="bytes")
    fake = tmp_path / "fake-meta"
    fake.mkdir()
    st = (root / "k").stat()
    (fake / "k.json").write_text(
        json.dumps(
            {"content_type": "pickle", "created_at": 1.0, "size": st.st_size, "ino": st.st_ino}
        )
    )
    (root / ".meta").rename(tmp_path / "old-meta")
    (root / ".meta").symlink_to(fake)
    for check in (lambda: store.get("k"), store.list, lambda: store.create(b"x", key="n")):
        with pytest.raises(ObjectStoreError, match="metadata directory"):
            check()
    assert not marker.exists()
    assert sorted(os.listdir(fake)) == ["k.json"]
    with pytest.raises(ObjectStoreError, match="symlink"):
        ObjectStore(root)


def test_symlinked_sidecar_is_not_followed(root: Path, tmp_path: Path, marker: Path) -> None:
    store = ObjectStore(root, allow_pickle=True)
    payload = pickle.dumps(MakesDir(marker))
    store.create(payload, key="k", content_type="bytes")
    st = (root / "k").stat()
    claim = tmp_path / "claim.json"
    claim.write_text(
        json.dumps(
            {"content_type": "pickle", "created_at": 1.0, "size": st.st_size, "ino": st.st_ino}
        )
    )
    (root / ".meta" / "k.json").unlink()
    (root / ".meta" / "k.json").symlink_to(claim)
    assert store.get("k") == payload  # served as raw bytes, the claim unread
    assert store.stat("k").content_type == "bytes"
    assert not marker.exists()


def test_symlinked_object_is_replaced_not_written_through(root: Path, tmp_path: Path) -> None:
    store = ObjectStore(root)
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (root / "k").symlink_to(target)
    assert not store.exists("k")
    with pytest.raises(ObjectStoreError, match="symlink"):
        store.get("k")
    store.create(b"new", key="k")
    assert target.read_bytes() == b"precious"
    assert not (root / "k").is_symlink()
    assert store.get("k") == b"new"
    assert store.delete("k") is True
    assert target.read_bytes() == b"precious"


def test_symlinked_lock_file_is_not_followed(root: Path, tmp_path: Path) -> None:
    store = ObjectStore(root)
    target = tmp_path / "target"
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(target)
    with pytest.raises(ObjectStoreError, match="lock file"):
        store.create(b"x", key="k")
    assert not target.exists()
    assert not (root / "k").exists()


# --------------------------------------------------------------------------- crashes mid-write


class Crash(Exception):
    """Stands for the process dying at a step of a write."""


def crash_at(step: str) -> Any:
    def hook(name: str) -> None:
        if name == step:
            raise Crash(step)

    return hook


@pytest.mark.parametrize(
    ("step", "survivor"),
    [("data-written", "old"), ("meta-renamed", "old"), ("data-renamed", "new")],
)
def test_crash_at_each_step_leaves_one_whole_object(
    root: Path, marker: Path, step: str, survivor: str
) -> None:
    # The dangerous mix: old raw bytes that are a pickle, paired with new metadata saying
    # "pickle", would run code. The reader must see the old bytes as bytes or the new pickle.
    old = pickle.dumps(MakesDir(marker))
    ObjectStore(root, clock=lambda: 100.0).create(old, key="k", content_type="bytes")
    new = {"the", "new", "set"}
    crashing = ObjectStore(root, allow_pickle=True, clock=lambda: 200.0, after_step=crash_at(step))
    with pytest.raises(Crash):
        crashing.create(new, key="k", content_type="pickle")
    fresh = ObjectStore(root, allow_pickle=True)
    ref = fresh.stat("k")
    if survivor == "old":
        assert (ref.content_type, ref.created_at, ref.size) == ("bytes", 100.0, len(old))
        assert fresh.get("k") == old
    else:
        assert (ref.content_type, ref.created_at) == ("pickle", 200.0)
        assert fresh.get("k") == new
    assert not marker.exists()
    assert [r.key for r in fresh.list()] == ["k"]


@pytest.mark.parametrize("step", ["data-written", "meta-renamed"])
def test_crash_before_a_new_key_is_published_leaves_nothing(root: Path, step: str) -> None:
    with pytest.raises(Crash):
        ObjectStore(root, after_step=crash_at(step)).create({"a": 1}, key="k")
    fresh = ObjectStore(root)
    with pytest.raises(ObjectNotFound):
        fresh.get("k")
    assert fresh.list() == []
    fresh.cleanup(0)  # sweeps the orphan sidecar
    assert [p.name for p in root.rglob("*") if p.is_file() and p.name != ".lock"] == []


def test_crash_at_each_step_alternating_types(root: Path) -> None:
    # JSON replaced by bytes and back: each crash leaves one version with its own type.
    store = ObjectStore(root)
    store.create({"v": 0}, key="k")
    versions: list[Any] = [{"v": 0}]
    for i, step in enumerate(["data-written", "meta-renamed", "data-renamed"] * 2, start=1):
        value: Any = f"v{i}".encode() if i % 2 else {"v": i}
        with pytest.raises(Crash):
            ObjectStore(root, after_step=crash_at(step)).create(value, key="k")
        if step == "data-renamed":
            versions.append(value)
        assert ObjectStore(root).get("k") == versions[-1]


CRASHING_WRITER = """
import os, sys
from anyserve.objects import ObjectStore

def die(step):
    if step == sys.argv[2]:
        os._exit(3)

ObjectStore(sys.argv[1], after_step=die).create({"new": True}, key="k")
"""


@pytest.mark.parametrize(("step", "expected"), [("meta-renamed", b"old"), ("data-renamed", None)])
def test_process_dying_mid_write(root: Path, step: str, expected: bytes | None) -> None:
    ObjectStore(root).create(b"old", key="k")
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(root), step], timeout=60, check=False
    )
    assert child.returncode == 3
    got = ObjectStore(root).get("k")
    assert got == (expected if expected is not None else {"new": True})


# --------------------------------------------------------------------------- hostile JSON


DEEP = b"[" * 100_000 + b"]" * 100_000


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_deeply_nested_json_upload_is_refused(root: Path) -> None:
    store = ObjectStore(root)
    for body in (DEEP, b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(BadRequest, match=f"nested more than {MAX_JSON_DEPTH}"):
            store.write_stream([body], key="deep", content_type="json")
    assert [p.name for p in root.rglob("*") if p.is_file() and p.name != ".lock"] == []


def test_json_depth_limit_is_exact(root: Path) -> None:
    store = ObjectStore(root)
    at_limit = json.dumps(nested(MAX_JSON_DEPTH)).encode()
    assert store.get(store.write_stream([at_limit], content_type="json")) == nested(MAX_JSON_DEPTH)
    assert store.get(store.create(nested(MAX_JSON_DEPTH))) == nested(MAX_JSON_DEPTH)
    over = json.dumps(nested(MAX_JSON_DEPTH + 1)).encode()
    with pytest.raises(BadRequest, match="nested"):
        store.write_stream([over], content_type="json")
    with pytest.raises(BadRequest, match="nested"):
        store.create(nested(MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_do_not_count(root: Path) -> None:
    store = ObjectStore(root)
    value = {"text": "[" * 10_000 + '\\"{' * 1000, "list": ["]]]", "{{{"]}
    ref = store.write_stream([json.dumps(value).encode()], content_type="json")
    assert store.get(ref) == value


def test_too_deep_python_value_is_refused_on_create(root: Path) -> None:
    store = ObjectStore(root)
    with pytest.raises(BadRequest, match="nested"):
        store.create(nested(100_000))
    with pytest.raises(BadRequest, match="nested"):
        store.create(nested(100_000), content_type="json")


def test_deeply_nested_json_file_is_refused_on_read(root: Path) -> None:
    store = ObjectStore(root)
    plant(root, "deep", DEEP, "json")
    with pytest.raises(BadRequest, match=f"nested more than {MAX_JSON_DEPTH}"):
        store.get("deep")
    # The raw bytes stay readable, and the store keeps working.
    with store.open("deep") as f:
        assert f.read() == DEEP
    assert store.get(store.create([1])) == [1]


def test_unterminated_strings_are_scanned_in_linear_time(root: Path) -> None:
    # Each '"' opens a string that never ends: a naive scan would restart at every one. The
    # leading brackets are enough of them that the depth scan runs rather than being skipped.
    store = ObjectStore(root)
    body = b"[]" * (MAX_JSON_DEPTH + 1) + b'["' + b'\\"' * 2_000_000
    with pytest.raises(BadRequest, match="not valid JSON"):
        store.write_stream([body], content_type="json")


def test_depth_check_memory_is_a_small_multiple_of_the_upload(root: Path) -> None:
    store = ObjectStore(root)
    body = b"[" * (8 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="nested"):
            store.write_stream([body], content_type="json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The read of the temp file and the scan's two short-lived copies, nothing more.
    assert peak < 4 * len(body)


def test_deeply_nested_json_over_http_is_a_400(procs: Procs, root: Path) -> None:
    api = start_api_server(procs, extra=["--object-store", str(root)])
    reply = httpx.post(api.url + "/objects", params={"key": "deep", "type": "json"}, content=DEEP)
    assert reply.status_code == 400, reply.text
    assert "nested" in reply.text
    assert "Traceback" not in reply.text
    ok = httpx.post(api.url + "/objects", params={"key": "fine", "type": "json"}, content=b"[[1]]")
    assert ok.status_code == 201, ok.text
