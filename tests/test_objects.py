"""The object store on real files: formats, lookups, lifetime, safety and concurrency."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from anyserve.errors import (
    BadRequest,
    InvalidKey,
    ObjectNotFound,
    ObjectStoreError,
    PayloadTooLarge,
)
from anyserve.objects import ObjectStore, ObjRef, parse_duration


class Clock:
    """A settable clock, so ages are set by the test instead of waited for."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def store(root: Path) -> ObjectStore:
    return ObjectStore(root)


@pytest.fixture
def pickle_store(root: Path) -> ObjectStore:
    return ObjectStore(root, allow_pickle=True)


def all_files(root: Path) -> list[str]:
    """Every file under the store, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def leftovers(root: Path) -> list[str]:
    """Files under the store other than the lock file: objects, sidecars, temp files."""
    return [f for f in all_files(root) if f != ".lock"]


class Bomb:
    """Pickles fine until it is reached, then fails: a write that breaks half-way."""

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle a Bomb")


class MakesDir:
    """Unpickling it creates a directory: proof of whether a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.path),))


# --------------------------------------------------------------------------- formats


def test_create_json(store: ObjectStore) -> None:
    value = {"data": "value", "n": [1, 2.5, None, True], "text": "héllo"}
    ref = store.create(value)
    assert ref.content_type == "json"
    assert ref.key.startswith("obj_")
    assert ref.path == str(store.path / ref.key)
    # The data file is plain JSON any tool can read.
    assert json.loads(Path(ref.path).read_text("utf-8")) == value
    assert ref.size == Path(ref.path).stat().st_size
    assert store.get(ref) == value


def test_create_bytes(store: ObjectStore) -> None:
    for value in (b"\x00\xffraw", bytearray(b"array"), memoryview(b"view")):
        ref = store.create(value)
        assert ref.content_type == "bytes"
        assert Path(ref.path).read_bytes() == bytes(value)
        assert store.get(ref) == bytes(value)


def test_create_bytes_from_typed_buffer(store: ObjectStore) -> None:
    import array

    values = array.array("i", [1, 2, 3])
    ref = store.create(values, content_type="bytes")
    assert ref.size == values.itemsize * 3
    assert store.get(ref) == values.tobytes()


def test_create_pickle_when_allowed(pickle_store: ObjectStore) -> None:
    value = {Fraction(1, 3), Fraction(2, 3)}  # a set: JSON cannot hold it
    ref = pickle_store.create(value)
    assert ref.content_type == "pickle"
    assert pickle_store.get(ref) == value
    explicit = pickle_store.create([1, 2], content_type="pickle")
    assert explicit.content_type == "pickle"
    assert pickle_store.get(explicit) == [1, 2]


def test_pickle_refused_on_create_when_not_allowed(store: ObjectStore, root: Path) -> None:
    with pytest.raises(ObjectStoreError, match="pickle is disabled"):
        store.create({1, 2, 3})
    with pytest.raises(ObjectStoreError, match="pickle is disabled"):
        store.create([1], content_type="pickle")
    with pytest.raises(ObjectStoreError, match="pickle is disabled"):
        store.write_stream([b"\x80\x05N."], content_type="pickle")
    assert leftovers(root) == []


def test_explicit_content_types(store: ObjectStore) -> None:
    assert store.create("text", content_type="json").content_type == "json"
    with pytest.raises(BadRequest, match="cannot be stored as JSON"):
        store.create(object(), content_type="json")
    with pytest.raises(BadRequest, match="bytes-like"):
        store.create("not bytes", content_type="bytes")
    with pytest.raises(BadRequest, match="unknown content type"):
        store.create(b"x", content_type="yaml")


def test_large_bytes_round_trip(store: ObjectStore) -> None:
    data = os.urandom(8 << 20)
    ref = store.create(memoryview(data))
    assert ref.size == len(data)
    assert store.get(ref) == data


# --------------------------------------------------------------------------- lookups


@pytest.fixture
def stored(store: ObjectStore) -> ObjRef:
    return store.create({"answer": 42}, key="answer")


def test_get_by_ref(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get(stored) == {"answer": 42}


def test_get_by_dict(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get(stored.to_dict()) == {"answer": 42}
    assert store.get({"key": "answer"}) == {"answer": 42}


def test_get_by_json_string(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get(json.dumps(stored.to_dict())) == {"answer": 42}


def test_get_by_string(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get(str(stored)) == {"answer": 42}


def test_get_by_key(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get("answer") == {"answer": 42}


def test_get_by_path_in_store(store: ObjectStore, stored: ObjRef) -> None:
    assert store.get(Path(stored.path)) == {"answer": 42}
    assert store.get(str(store.path / "sub" / ".." / "answer")) == {"answer": 42}


def test_get_missing(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="nope"):
        store.get("nope")
    with pytest.raises(ObjectNotFound):
        store.stat(str(store.path / "nope"))


def test_stat(store: ObjectStore, stored: ObjRef) -> None:
    assert store.stat("answer") == stored
    assert store.stat(ObjRef.parse(str(stored))) == stored


def test_metadata_survives_reopening(root: Path) -> None:
    ref = ObjectStore(root, clock=Clock(1234.5)).create([1, 2], key="kept")
    again = ObjectStore(root)
    assert again.stat("kept") == ref
    assert again.stat("kept").created_at == 1234.5
    assert again.get("kept") == [1, 2]


def test_custom_key(store: ObjectStore) -> None:
    ref = store.create(b"one", key="my-object_1.bin")
    assert ref.key == "my-object_1.bin"
    assert ref.path == str(store.path / "my-object_1.bin")
    assert store.get("my-object_1.bin") == b"one"


def test_custom_key_is_replaced_with_its_new_type(store: ObjectStore) -> None:
    store.create(b"raw", key="k")
    ref = store.create({"now": "json"}, key="k")
    assert ref.content_type == "json"
    assert store.get("k") == {"now": "json"}
    assert [r.key for r in store.list()] == ["k"]


def test_exists(store: ObjectStore, stored: ObjRef) -> None:
    assert store.exists(stored)
    assert store.exists("answer")
    assert store.exists(stored.path)
    assert not store.exists("missing")


def test_delete(store: ObjectStore, stored: ObjRef, root: Path) -> None:
    assert store.delete(stored) is True
    assert not store.exists("answer")
    assert leftovers(root) == []  # the sidecar went with it
    assert store.delete("answer") is False
    with pytest.raises(ObjectNotFound):
        store.get(stored)


def test_list_sorted_by_created_at(root: Path) -> None:
    clock = Clock()
    store = ObjectStore(root, clock=clock)
    for key, at in (("b", 30.0), ("a", 10.0), ("c", 20.0)):
        clock.now = at
        store.create(key.encode(), key=key)
    refs = store.list()
    assert [r.key for r in refs] == ["a", "c", "b"]
    assert [r.created_at for r in refs] == [10.0, 20.0, 30.0]
    assert all(r.size == 1 and r.content_type == "bytes" for r in refs)


def test_list_empty(store: ObjectStore) -> None:
    assert store.list() == []


def test_file_copied_in_by_hand_is_served_as_bytes(store: ObjectStore) -> None:
    (store.path / "dropped").write_bytes(b"\x80\x05plain")
    ref = store.stat("dropped")
    assert ref.content_type == "bytes"
    assert store.get("dropped") == b"\x80\x05plain"
    assert [r.key for r in store.list()] == ["dropped"]


# --------------------------------------------------------------------------- lifetime


def test_cleanup_removes_old_objects(root: Path) -> None:
    clock = Clock(1000.0)
    store = ObjectStore(root, clock=clock)
    store.create({"old": True}, key="old")
    clock.now = 4000.0
    store.create({"new": True}, key="new")
    clock.now = 5000.0
    assert store.cleanup(max_age=3600) == 1
    assert [r.key for r in store.list()] == ["new"]
    assert not (root / ".meta" / "old.json").exists()
    assert store.cleanup(max_age=3600) == 0


def test_cleanup_ages_files_without_metadata_by_mtime(store: ObjectStore) -> None:
    old = store.path / "old-file"
    old.write_bytes(b"x")
    os.utime(old, (1.0, 1.0))
    store.create(b"y", key="fresh")
    assert store.cleanup(max_age=3600) == 1
    assert [r.key for r in store.list()] == ["fresh"]


def test_cleanup_sweeps_crash_leftovers(store: ObjectStore, root: Path) -> None:
    stale_tmp = root / ".tmp-crashed"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (1.0, 1.0))
    fresh_tmp = root / ".tmp-uploading"  # another process is writing it right now
    fresh_tmp.write_bytes(b"partial")
    (root / ".meta" / "orphan.json").write_text('{"content_type": "json", "created_at": 1}')
    assert store.cleanup(max_age=0) == 0
    assert leftovers(root) == [".tmp-uploading"]


def test_cleanup_rejects_negative_age(store: ObjectStore) -> None:
    with pytest.raises(BadRequest):
        store.cleanup(-1)


# --------------------------------------------------------------------------- ObjRef


def test_objref_dict_round_trip(stored: ObjRef) -> None:
    as_dict = stored.to_dict()
    assert set(as_dict) == {"key", "path", "size", "content_type", "created_at"}
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert ObjRef.from_dict(as_dict) == stored
    assert ObjRef.parse(as_dict) == stored
    assert ObjRef.parse(json.dumps(as_dict)) == stored
    assert ObjRef.parse(stored) is stored


def test_objref_string_round_trip(stored: ObjRef) -> None:
    assert str(stored) == stored.path
    parsed = ObjRef.parse(str(stored))
    assert (parsed.key, parsed.path) == (stored.key, stored.path)
    assert (parsed.size, parsed.content_type) == (-1, "")  # unknown until stat()
    bare = ObjRef.parse("answer")
    assert (bare.key, bare.path, str(bare)) == ("answer", "", "answer")


@pytest.mark.parametrize(
    "value",
    [123, None, "", "{not json", "[1, 2]", {"size": 1}, {"key": 5}, {"key": "k", "size": "big"}],
)
def test_objref_parse_rejects_garbage(value: Any) -> None:
    with pytest.raises(BadRequest):
        ObjRef.parse(value)


# --------------------------------------------------------------------------- streams


def test_write_stream_and_open(store: ObjectStore) -> None:
    chunks: list[bytes | bytearray | memoryview] = [
        b"a" * 100_000,
        bytearray(b"b" * 50_000),
        memoryview(b"c" * 7),
    ]
    ref = store.write_stream(iter(chunks), key="upload")
    assert (ref.key, ref.size, ref.content_type) == ("upload", 150_007, "bytes")
    with store.open(ref) as f:
        parts = iter(lambda: f.read(65536), b"")
        assert b"".join(parts) == b"".join(bytes(c) for c in chunks)
    assert store.get("upload") == b"".join(bytes(c) for c in chunks)


def test_write_stream_json(store: ObjectStore) -> None:
    ref = store.write_stream([b'{"a": ', b"[1, 2]}"], content_type="json")
    assert store.get(ref) == {"a": [1, 2]}
    with pytest.raises(BadRequest, match="not valid JSON"):
        store.write_stream([b'{"a": '], content_type="json")


def test_open_missing(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.open("missing")


def test_open_keeps_reading_a_replaced_object(store: ObjectStore) -> None:
    store.create(b"first", key="k")
    with store.open("k") as f:
        store.create(b"second", key="k")
        assert f.read() == b"first"
    assert store.get("k") == b"second"


def test_write_stream_over_max_size_leaves_nothing(store: ObjectStore, root: Path) -> None:
    chunks = (b"x" * 1000 for _ in range(10))
    with pytest.raises(PayloadTooLarge):
        store.write_stream(chunks, key="big", max_size=5000)
    assert leftovers(root) == []
    assert store.write_stream([b"x" * 5000], max_size=5000).size == 5000


def test_store_max_size_applies_to_every_write(root: Path) -> None:
    store = ObjectStore(root, allow_pickle=True, max_size=100)
    with pytest.raises(PayloadTooLarge):
        store.create(b"x" * 101)
    with pytest.raises(PayloadTooLarge):
        store.create(["x" * 200])
    with pytest.raises(PayloadTooLarge):
        store.create({b"x" * 200}, content_type="pickle")
    with pytest.raises(PayloadTooLarge):
        store.write_stream([b"x" * 101], max_size=1000)
    assert leftovers(root) == []
    assert store.create(b"x" * 100).size == 100


# --------------------------------------------------------------------------- safety: keys and paths


BAD_KEYS = ["../x", "/etc/passwd", "a/b", "", "nul\0byte", ".", "..", ".hidden", "k" * 201, "a\\b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_on_create(store: ObjectStore, root: Path, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.create(b"x", key=key)
    with pytest.raises(InvalidKey):
        store.write_stream([b"x"], key=key)
    assert leftovers(root) == []


@pytest.mark.parametrize("key", ["", "nul\0byte", ".", "..", ".lock", "k" * 201])
def test_invalid_keys_are_refused_on_lookup(store: ObjectStore, key: str) -> None:
    for op in (store.get, store.stat, store.exists, store.delete, store.open):
        with pytest.raises(InvalidKey):
            op(key)


def test_longest_key_is_accepted(store: ObjectStore) -> None:
    key = "k" * 200
    assert store.get(store.create(b"x", key=key)) == b"x"


def test_get_etc_passwd_is_refused(store: ObjectStore) -> None:
    with pytest.raises(InvalidKey, match="outside the object store"):
        store.get("/etc/passwd")


@pytest.mark.parametrize(
    "ref",
    [
        "../x",
        "{root}/../outside",
        "{root}/.meta/k.json",
        "{root}/sub/k",
        {"key": "passwd", "path": "/etc/passwd"},
        '{"key": "passwd", "path": "/etc/passwd"}',
        ObjRef("passwd", "/etc/passwd", 1, "bytes", 0.0),
    ],
)
def test_paths_outside_the_store_are_refused(store: ObjectStore, ref: Any) -> None:
    (store.path.parent / "outside").write_bytes(b"secret")
    if isinstance(ref, str):
        ref = ref.replace("{root}", str(store.path))
    for op in (store.get, store.stat, store.exists, store.delete, store.open):
        with pytest.raises(InvalidKey):
            op(ref)
    assert (store.path.parent / "outside").exists()


def test_ref_whose_key_and_path_disagree_is_refused(store: ObjectStore, stored: ObjRef) -> None:
    with pytest.raises(BadRequest, match="names key"):
        store.get({"key": "other", "path": stored.path})


def test_symlink_inside_the_store_is_not_followed(store: ObjectStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (store.path / "link").symlink_to(secret)
    with pytest.raises(ObjectStoreError, match="symlink"):
        store.get("link")
    assert store.list() == []


# --------------------------------------------------------------------------- safety: pickle


def test_pickle_is_not_loaded_by_a_store_without_pickle(
    root: Path, pickle_store: ObjectStore, tmp_path: Path
) -> None:
    marker = tmp_path / "pickle-was-loaded"
    ref = pickle_store.create(MakesDir(marker))
    with pytest.raises(ObjectStoreError, match="pickle"):
        ObjectStore(root).get(ref)
    with pytest.raises(ObjectStoreError, match="pickle"):
        ObjectStore(root).get(ref.key)
    assert not marker.exists()
    # The same bytes are still readable as raw data, which runs nothing.
    with ObjectStore(root).open(ref) as f:
        assert f.read(1) == b"\x80"
    # And the payload is live: a store that allows pickle does run it.
    pickle_store.get(ref)
    assert marker.is_dir()


def test_ref_cannot_claim_a_safer_content_type(root: Path, pickle_store: ObjectStore) -> None:
    ref = pickle_store.create({1, 2})
    claimed = {**ref.to_dict(), "content_type": "bytes"}
    with pytest.raises(ObjectStoreError, match="pickle"):
        ObjectStore(root).get(claimed)


# --------------------------------------------------------------------------- safety: atomic writes


def test_failing_pickle_write_leaves_nothing(pickle_store: ObjectStore, root: Path) -> None:
    # Megabytes go to the temp file before the Bomb is reached.
    value = [os.urandom(1 << 20) for _ in range(4)] + [Bomb()]
    with pytest.raises(BadRequest, match="cannot be pickled"):
        pickle_store.create(value, key="broken")
    assert leftovers(root) == []


def test_failing_write_keeps_the_previous_version(pickle_store: ObjectStore, root: Path) -> None:
    pickle_store.create({"v": 1}, key="k")
    with pytest.raises(BadRequest):
        pickle_store.create([b"x" * 100_000, Bomb()], key="k")
    assert pickle_store.get("k") == {"v": 1}
    assert leftovers(root) == [".meta/k.json", "k"]


def test_failing_stream_leaves_nothing(store: ObjectStore, root: Path) -> None:
    class Disconnected(Exception):
        pass

    def chunks() -> Iterator[bytes]:
        yield b"x" * 100_000
        yield b"y" * 100_000
        raise Disconnected("client went away")

    with pytest.raises(Disconnected):
        store.write_stream(chunks(), key="upload")
    assert leftovers(root) == []


def test_non_bytes_chunk_is_refused(store: ObjectStore, root: Path) -> None:
    with pytest.raises(BadRequest, match="chunks must be bytes"):
        store.write_stream([b"ok", "text"])  # type: ignore[list-item]
    assert leftovers(root) == []


# --------------------------------------------------------------------------- safety: the directory


def test_directory_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "objects"
    ObjectStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / ".meta").stat().st_mode) == 0o700


def test_object_files_are_private(store: ObjectStore) -> None:
    ref = store.create(b"x")
    assert stat.S_IMODE(os.stat(ref.path).st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_directory_owned_by_another_user_is_refused(root: Path) -> None:
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(ObjectStoreError, match="owned by uid 65534"):
        ObjectStore(root)


def test_symlinked_store_path_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ObjectStoreError, match="symlink"):
        ObjectStore(link)


def test_directory_writable_by_others_is_refused(root: Path) -> None:
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(ObjectStoreError, match="writable by other users"):
        ObjectStore(root)


def test_store_path_that_is_a_file_is_refused(root: Path) -> None:
    root.write_bytes(b"")
    with pytest.raises(ObjectStoreError, match="not a directory"):
        ObjectStore(root)


def test_existing_private_directory_is_reused(root: Path) -> None:
    ObjectStore(root).create(b"x", key="k")
    assert ObjectStore(root).get("k") == b"x"


# --------------------------------------------------------------------------- concurrency


def test_concurrent_creates_from_threads(store: ObjectStore) -> None:
    json_value = {"kind": "json", "pad": "j" * 50_000}
    bytes_value = b"b" * 70_000
    stop = threading.Event()
    bad: list[object] = []

    def write(i: int) -> ObjRef:
        store.create(json_value if i % 2 else bytes_value, key="shared")
        return store.create({"i": i})

    def read() -> None:
        # Every read of the shared key must be one whole version with its own type.
        while not stop.is_set():
            try:
                value = store.get("shared")
            except ObjectNotFound:
                continue
            if value not in (json_value, bytes_value):
                bad.append(value)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            refs = list(pool.map(write, range(40)))
    finally:
        stop.set()
        reader.join()
    assert bad == []
    assert [store.get(r) for r in refs] == [{"i": i} for i in range(40)]
    assert len(store.list()) == 41
    assert not [f for f in all_files(store.path) if ".tmp-" in f]


WRITER = """
import sys
from anyserve.objects import ObjectStore
store = ObjectStore(sys.argv[1])
n = int(sys.argv[2])
for i in range(50):
    store.create({"writer": n, "i": i}, key=f"w{n}-{i}")
    store.create({"writer": n} if i % 2 else bytes([n]) * 10_000, key="shared")
"""


def test_concurrent_creates_from_processes(store: ObjectStore) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(n)]) for n in range(3)
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0, 0]
    for n in range(3):
        for i in range(50):
            assert store.get(f"w{n}-{i}") == {"writer": n, "i": i}
    shared = store.get("shared")
    assert shared in [{"writer": n} for n in range(3)] + [bytes([n]) * 10_000 for n in range(3)]
    assert len(store.list()) == 151
    assert not [f for f in all_files(store.path) if ".tmp-" in f]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45.0),
        ("30m", 1800.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("1w", 604800.0),
        ("90", 90.0),
        ("2.5", 2.5),
        (" 10M ", 600.0),
        (120, 120.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "h", "1x", "1 hour", "-5s", "-5", "1h-30m", "inf", "nan", "1e3", True, -1, None]
)
def test_parse_duration_rejects_garbage(text: Any) -> None:
    with pytest.raises(BadRequest, match="expected a duration"):
        parse_duration(text)
