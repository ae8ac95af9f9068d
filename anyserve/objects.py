"""The object store: a private directory through which replicas hand each other data.

A store is a plain directory (default ``/tmp/anyserve-objects``) shared by the replicas
of a host, or mounted over NFS. Its layout::

    <store>/                 mode 0700, owned by the user running AnyServe
      <key>                  the object's raw data: JSON text, raw bytes or a pickle
      .meta/<key>.json       {"key", "content_type", "created_at", "size", "ino", "previous"}
      .lock                  flock'ed while an object's metadata and data change together
      .tmp-*                 files being written, renamed into place once complete

Keys are plain file names, so ``ref.path`` is an ordinary file any tool can read. Every
write goes to a temp file in the same directory, is fsynced and then renamed over the
final name, so a reader sees either the whole old object or the whole new one, and a
failed write (disk full, a value that cannot be encoded, a broken upload) leaves nothing.

Crashes. A write renames the metadata into place first and the data second. The metadata
names the data file it describes (inode and size) and also carries the description of the
data it replaces (``previous``), so a crash between the two renames leaves the old data
paired with its own old description: a reader always sees the whole old object or the
whole new one, never new metadata over old bytes. Data that no metadata describes (a file
copied in by hand, or one edited in place) is served as raw bytes, which never runs code.

Against other local users. The directory is opened once, when the store is created, and
verified then: a real directory (not a symlink), owned by this user, not writable by
others; ``.meta`` likewise. From then on every open, stat, rename, unlink and listing goes
through those two open directory descriptors with ``O_NOFOLLOW``, never through the path
again, so a symlink planted as an object or a swapped ``.meta`` is never followed. Before
each operation the store also checks that its path still names the directory it opened:
if the directory was removed or replaced (by another user re-creating
``/tmp/anyserve-objects``, say, possibly holding planted objects and pickles), every
operation raises :class:`ObjectStoreError` instead of quietly carrying on. Carrying on in
the old, unlinked directory would hand out refs whose paths name the impostor's files to
every other process, so failing loudly is the safer choice; restart (or reopen the store)
once the path is fixed. Even if the path is swapped between that check and the operation,
the operation acts on the original directory, never the new one.

JSON is nested at most :data:`MAX_JSON_DEPTH` deep, checked by a scan over the bytes
before parsing, so a deeply nested upload or file is refused with :class:`BadRequest`
instead of exhausting the interpreter's recursion limit.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import math
import os
import pickle
import re
import secrets
import stat
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

from anyserve.defaults import OBJECT_STORE_PATH
from anyserve.errors import (
    BadRequest,
    InvalidKey,
    ObjectNotFound,
    ObjectStoreError,
    PayloadTooLarge,
)

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_PATH",
    "MAX_JSON_DEPTH",
    "MAX_KEY_LENGTH",
    "ObjRef",
    "ObjectStore",
    "RefLike",
    "parse_duration",
    "validate_key",
]

DEFAULT_PATH = OBJECT_STORE_PATH
CONTENT_TYPES = ("json", "bytes", "pickle")
# File names are limited to 255 bytes; the sidecar adds ".json", and a margin keeps
# keys comfortable for the paths and URLs they end up in.
MAX_KEY_LENGTH = 200
# Deeper JSON is refused: real data is rarely nested a few dozen levels, and the parser
# (and every encoder downstream) recurses once per level.
MAX_JSON_DEPTH = 256

# Letters, digits, '.', '_' and '-', never a leading '.': this rules out '.', '..', '/',
# NUL and every other separator, and keeps the store's own hidden files out of reach.
_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_TMP_PREFIX = ".tmp-"
_META_DIR = ".meta"
_LOCK_FILE = ".lock"
# Temp files are only swept once this old, so a slow upload in another process survives
# ``cleanup(0)``: its file's mtime moves with every chunk written.
_TEMP_GRACE = 3600.0
# A sidecar is a few hundred bytes; anything much larger was not written by a store.
_MAX_META_SIZE = 64 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def validate_key(key: object) -> str:
    """Return ``key`` if it is a safe object key, else raise :class:`InvalidKey`.

    A key is a plain file name of 1 to 200 characters taken from letters, digits, ``.``,
    ``_`` and ``-``, not starting with ``.``.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKey("object key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"object key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    if not _KEY_RE.fullmatch(key):
        raise InvalidKey(
            f"invalid object key {key!r}: use letters, digits, '.', '_' and '-' only, "
            "not starting with '.'"
        )
    return key


def _is_key(name: str) -> bool:
    return len(name) <= MAX_KEY_LENGTH and _KEY_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class ObjRef:
    """A reference to a stored object: what replicas pass to each other.

    ``str(ref)`` is the object's path (the form the demo apps pass between replicas as text),
    ``to_dict()``/``from_dict()`` the JSON form used over HTTP. A ref parsed from a bare
    path or key knows only those: ``size`` is ``-1``, ``content_type`` ``""`` and
    ``created_at`` ``0.0`` until :meth:`ObjectStore.stat` fills them in.
    """

    key: str
    path: str
    size: int = -1
    content_type: str = ""
    created_at: float = 0.0

    def __str__(self) -> str:
        return self.path or self.key

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form: ``{"key", "path", "size", "content_type", "created_at"}``."""
        return {
            "key": self.key,
            "path": self.path,
            "size": self.size,
            "content_type": self.content_type,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjRef:
        """Build a ref from its dict form; ``key`` (or ``path``) is required, the rest optional.

        Raises :class:`BadRequest` when a field has the wrong type.
        """
        path = data.get("path") or ""
        if not isinstance(path, str):
            raise BadRequest(f"object reference 'path' must be a string, not {type(path).__name__}")
        key = data.get("key") or (os.path.basename(path) if path else None)
        if not isinstance(key, str) or not key:
            raise BadRequest("object reference needs a 'key' (or a 'path')")
        size = data.get("size", -1)
        if isinstance(size, bool) or not isinstance(size, int):
            raise BadRequest(f"object reference 'size' must be an integer, not {size!r}")
        content_type = data.get("content_type") or ""
        if not isinstance(content_type, str):
            raise BadRequest(f"object reference 'content_type' must be a string: {content_type!r}")
        created_at = data.get("created_at", 0.0)
        if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
            raise BadRequest(f"object reference 'created_at' must be a number: {created_at!r}")
        return cls(key, path, size, content_type, float(created_at))

    @classmethod
    def parse(cls, value: RefLike) -> ObjRef:
        """Read a ref from an ``ObjRef``, its dict form, its JSON text, a path or a bare key.

        A string holding a path separator is a path (its key is the file name); any other
        string is a key. Raises :class:`BadRequest` for anything else, :class:`InvalidKey`
        for a string whose key is not valid.
        """
        if isinstance(value, ObjRef):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise BadRequest(
                "expected an object reference (ObjRef, its dict or JSON form, a path or a key), "
                f"not {type(value).__name__}"
            )
        if value.lstrip().startswith("{"):
            try:
                data = json.loads(value)
            except ValueError as exc:
                raise BadRequest(f"object reference is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise BadRequest("object reference JSON must be an object")
            return cls.from_dict(data)
        if "/" in value or os.sep in value:
            return cls(key=validate_key(os.path.basename(value)), path=value)
        return cls(key=validate_key(value), path="")


# Everything ``get``/``stat``/``exists``/``delete``/``open`` accept as a reference.
RefLike: TypeAlias = "ObjRef | Mapping[str, Any] | str | os.PathLike[str]"


class ObjectStore:
    """A directory of objects shared by the replicas of a host.

    ``path`` is created private to the user (mode 0700) when missing; an existing path that
    is a symlink, is owned by another user or is writable by others is refused with
    :class:`ObjectStoreError`, since whoever controls it controls what replicas read. The
    directory is opened once and used through that descriptor; if the path is later removed
    or replaced, operations raise :class:`ObjectStoreError` (see the module docstring).
    ``allow_pickle`` lets the store write and read pickles; leave it off unless every
    writer is trusted, because loading a pickle runs code. ``max_size`` caps each object
    (:class:`PayloadTooLarge` beyond it). ``clock`` stamps ``created_at`` and drives
    :meth:`cleanup`. ``after_step``, when given, is called with the name of each step of a
    write as it completes (``"data-written"``, ``"meta-renamed"``, ``"data-renamed"``): a
    seam to stop a write part-way, as a crash would.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        allow_pickle: bool = False,
        max_size: int | None = None,
        *,
        clock: Callable[[], float] = time.time,
        after_step: Callable[[str], object] | None = None,
    ) -> None:
        if max_size is not None and max_size < 0:
            raise BadRequest(f"max_size must be >= 0, not {max_size}")
        # abspath, not resolve(): resolving would follow the very symlink we must refuse.
        self._root = os.path.abspath(os.fspath(path))
        self.path = Path(self._root)
        self.allow_pickle = allow_pickle
        self.max_size = max_size
        self._clock = clock
        self._after_step = after_step
        self._meta_dir = os.path.join(self._root, _META_DIR)
        parent, name = os.path.split(self._root)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(
                f"cannot create object store directory {self._root}: {exc.strerror}"
            ) from exc
        self._root_fd = _open_private_dir(name, self._root, parent_fd=None, parent=parent)
        try:
            self._meta_fd = _open_private_dir(
                _META_DIR, self._meta_dir, parent_fd=self._root_fd, parent=None
            )
        except BaseException:
            os.close(self._root_fd)
            raise
        self._root_id = _identity(os.fstat(self._root_fd))
        self._meta_id = _identity(os.fstat(self._meta_fd))
        self._closer = weakref.finalize(self, _close_all, self._root_fd, self._meta_fd)

    def __repr__(self) -> str:
        return f"ObjectStore({self._root!r}, allow_pickle={self.allow_pickle})"

    def close(self) -> None:
        """Release the directory descriptors; the store is unusable afterwards.

        Optional: they are also released when the store is garbage collected.
        """
        self._closer()

    # ------------------------------------------------------------------ writing

    def create(self, data: Any, key: str | None = None, content_type: str | None = None) -> ObjRef:
        """Store ``data`` under ``key`` (generated when omitted) and return its ref.

        ``content_type`` is ``"json"``, ``"bytes"`` or ``"pickle"``. By default bytes-like
        values are stored as bytes, anything JSON can encode as JSON, and the rest as a
        pickle when the store allows it. An existing key is replaced atomically.
        """
        key = self._new_key() if key is None else validate_key(key)
        if content_type is not None and content_type not in CONTENT_TYPES:
            raise BadRequest(_unknown_type(content_type))
        if content_type is None and isinstance(data, (bytes, bytearray, memoryview)):
            content_type = "bytes"
        limit = self.max_size
        if content_type == "bytes":
            view = _byte_view(data)
            _check_size(key, view.nbytes, limit)
            return self._write(key, "bytes", lambda sink: sink.write(view), limit)
        if content_type in (None, "json"):
            try:
                encoded = json.dumps(data, ensure_ascii=False).encode()
            except RecursionError:
                raise BadRequest(_too_deep(key)) from None
            except (TypeError, ValueError) as exc:
                if content_type == "json":
                    raise BadRequest(f"object {key!r} cannot be stored as JSON: {exc}") from None
                if not self.allow_pickle:
                    raise ObjectStoreError(
                        _pickle_disabled(
                            f"object {key!r} ({type(data).__name__}) is not JSON-serializable"
                        )
                    ) from None
            else:
                _check_size(key, len(encoded), limit)
                # What is stored must read back: get() refuses JSON nested deeper.
                _check_json_depth(encoded, key)
                return self._write(key, "json", lambda sink: sink.write(encoded), limit)
        elif not self.allow_pickle:
            raise ObjectStoreError(_pickle_disabled(f"cannot store object {key!r} as a pickle"))

        def dump(sink: _Sink) -> None:
            # Streamed into the file: a large pickle is never held in memory twice.
            try:
                pickle.dump(data, sink, protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
                raise BadRequest(f"object {key!r} cannot be pickled: {exc}") from None

        return self._write(key, "pickle", dump, limit)

    def write_stream(
        self,
        chunks: Iterable[bytes | bytearray | memoryview],
        key: str | None = None,
        content_type: str = "bytes",
        max_size: int | None = None,
    ) -> ObjRef:
        """Store an object from an iterable of byte chunks (an upload) without buffering it.

        The object appears only once every chunk is written. Going over ``max_size`` (or the
        store's) raises :class:`PayloadTooLarge`; that, or an iterator that raises, leaves
        nothing behind. JSON content is checked to be valid JSON, nested at most
        :data:`MAX_JSON_DEPTH` deep, before it is kept.
        """
        key = self._new_key() if key is None else validate_key(key)
        if content_type not in CONTENT_TYPES:
            raise BadRequest(_unknown_type(content_type))
        if content_type == "pickle" and not self.allow_pickle:
            raise ObjectStoreError(_pickle_disabled(f"cannot store object {key!r} as a pickle"))
        limits = [m for m in (max_size, self.max_size) if m is not None]
        limit = min(limits) if limits else None

        def fill(sink: _Sink) -> None:
            for chunk in chunks:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise BadRequest(f"upload chunks must be bytes, not {type(chunk).__name__}")
                sink.write(chunk)
            if content_type == "json":
                _check_json(sink.fd, key)

        return self._write(key, content_type, fill, limit)

    def _new_key(self) -> str:
        return f"obj_{uuid.uuid4().hex}"

    def _write(
        self, key: str, content_type: str, fill: Callable[[_Sink], object], limit: int | None
    ) -> ObjRef:
        """Write via ``fill`` to a temp file, then rename metadata and data into place."""
        created_at = self._clock()
        root_fd, meta_fd = self._dirs()
        data_tmp: str | None = None
        meta_tmp: str | None = None
        try:
            fd, data_tmp = _create_temp(root_fd)
            try:
                sink = _Sink(fd, key, limit)
                fill(sink)
                os.fsync(fd)  # the data must be on disk before a rename can publish it
                written = os.fstat(fd)
            finally:
                os.close(fd)
            self._step("data-written")
            with self._locked(exclusive=True):
                # The sidecar describes the new data and the data it replaces, so whichever
                # of the two the key holds after a crash below, it is read with its own type.
                meta = {
                    "key": key,
                    **_entry(content_type, created_at, written),
                    "previous": self._current_entry(key),
                }
                fd, meta_tmp = _create_temp(meta_fd)
                try:
                    _write_all(fd, memoryview(json.dumps(meta).encode()))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(meta_tmp, key + ".json", src_dir_fd=meta_fd, dst_dir_fd=meta_fd)
                meta_tmp = None
                # Durable before the data rename: after a power cut the data must never be
                # newer than the sidecar that describes it.
                _fsync_quietly(meta_fd)
                self._step("meta-renamed")
                os.replace(data_tmp, key, src_dir_fd=root_fd, dst_dir_fd=root_fd)
                data_tmp = None
                self._step("data-renamed")
        except OSError as exc:
            raise ObjectStoreError(
                f"could not write object {key!r} to {self._root}: {exc.strerror or exc}"
            ) from exc
        finally:
            if data_tmp is not None:
                _unlink_quietly(data_tmp, root_fd)
            if meta_tmp is not None:
                _unlink_quietly(meta_tmp, meta_fd)
        # Make the data rename itself durable; best effort, some filesystems refuse.
        _fsync_quietly(root_fd)
        return ObjRef(key, self._data_path(key), sink.size, content_type, created_at)

    def _step(self, name: str) -> None:
        if self._after_step is not None:
            self._after_step(name)

    def _current_entry(self, key: str) -> dict[str, Any] | None:
        """How a reader sees ``key``'s data right now, for the sidecar's ``previous``."""
        try:
            fd, info = self._describe(key)
        except (ObjectNotFound, ObjectStoreError):
            return None
        try:
            return _entry(info.content_type, info.created_at, os.fstat(fd))
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def get(self, ref: RefLike) -> Any:
        """The stored value: JSON as Python data, bytes as ``bytes``, a pickle as its object.

        ``ref`` is an :class:`ObjRef`, its dict or JSON form, a key, or a path inside the store.
        A pickle is only loaded when the store allows pickle. JSON nested deeper than
        :data:`MAX_JSON_DEPTH` raises :class:`BadRequest`.
        """
        fd, info = self._open(self._key_of(ref))
        with builtins.open(fd, "rb") as f:
            # read() of a fresh buffered file is one readall() sized from fstat: no copies.
            if info.content_type == "bytes":
                return f.read()
            if info.content_type == "json":
                return _load_json(f.read(), info.key, ObjectStoreError)
            if info.content_type == "pickle":
                if not self.allow_pickle:
                    raise ObjectStoreError(
                        _pickle_disabled(f"object {info.key!r} is a pickle and was not loaded")
                    )
                try:
                    return pickle.load(f)
                except Exception as exc:
                    raise ObjectStoreError(
                        f"object {info.key!r} could not be unpickled: {exc}"
                    ) from exc
            raise ObjectStoreError(
                f"object {info.key!r} has unknown content type {info.content_type!r}"
            )

    def open(self, ref: RefLike) -> BinaryIO:
        """A binary file object over the object's raw data, for streaming it out.

        The caller closes it. The data stays readable even if the object is replaced or
        deleted meanwhile (the open file keeps the old version).
        """
        fd, _ = self._open(self._key_of(ref))
        return builtins.open(fd, "rb")

    def stat(self, ref: RefLike) -> ObjRef:
        """The object's full ref (size, content type, created_at).

        Raises :class:`ObjectNotFound` when there is no such object.
        """
        fd, info = self._open(self._key_of(ref))
        os.close(fd)
        return info

    def exists(self, ref: RefLike) -> bool:
        """Whether the object exists (an invalid key or outside path still raises)."""
        key = self._key_of(ref)
        root_fd, _ = self._dirs()
        try:
            return stat.S_ISREG(os.stat(key, dir_fd=root_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def list(self) -> builtins.list[ObjRef]:
        """Every object in the store, oldest first."""
        refs = []
        for key in self._keys():
            try:
                fd, info = self._open(key)
            except (ObjectNotFound, ObjectStoreError):
                continue  # deleted meanwhile, or not a regular file
            os.close(fd)
            refs.append(info)
        refs.sort(key=lambda r: (r.created_at, r.key))
        return refs

    # ------------------------------------------------------------------ removing

    def delete(self, ref: RefLike) -> bool:
        """Delete the object; ``True`` if it existed."""
        return self._remove(self._key_of(ref), None)

    def cleanup(self, max_age: float) -> int:
        """Delete objects created more than ``max_age`` seconds ago; return how many.

        Also sweeps what crashed writers left: temp files (once an hour old, or ``max_age``
        if longer) and metadata without data.
        """
        if not max_age >= 0:  # also refuses NaN
            raise BadRequest(f"max_age must be a number of seconds >= 0, not {max_age!r}")
        now = self._clock()
        cutoff = now - max_age
        removed = sum(
            1 for ref in self.list() if ref.created_at < cutoff and self._remove(ref.key, cutoff)
        )
        self._sweep(now - max(max_age, _TEMP_GRACE))
        return removed

    def _remove(self, key: str, cutoff: float | None) -> bool:
        with self._locked(exclusive=True):
            root_fd, meta_fd = self._root_fd, self._meta_fd
            if cutoff is not None:
                # Checked again under the lock: the key may have been written anew since
                # cleanup listed it, and a fresh object must not be collected.
                try:
                    fd, info = self._describe(key)
                except (ObjectNotFound, ObjectStoreError):
                    return False
                os.close(fd)
                if info.created_at >= cutoff:
                    return False
            try:
                os.unlink(key, dir_fd=root_fd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise ObjectStoreError(f"could not delete object {key!r}: {exc.strerror}") from exc
            _unlink_quietly(key + ".json", meta_fd)
        return True

    def _sweep(self, temp_cutoff: float) -> None:
        for directory in self._dirs():
            for name in _scan(directory):
                if not name.startswith(_TMP_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                    if st.st_mtime < temp_cutoff:
                        os.unlink(name, dir_fd=directory)
        with self._locked(exclusive=True):
            for name in _scan(self._meta_fd):
                key, ext = os.path.splitext(name)
                if ext != ".json" or not _is_key(key):
                    continue
                try:
                    os.stat(key, dir_fd=self._root_fd, follow_symlinks=False)
                except FileNotFoundError:
                    _unlink_quietly(name, self._meta_fd)

    # ------------------------------------------------------------------ helpers

    def _dirs(self) -> tuple[int, int]:
        """The verified directory descriptors, once the path is checked to still name them.

        Raises :class:`ObjectStoreError` when the store directory or its ``.meta`` was removed
        or replaced since the store opened them.
        """
        if not self._closer.alive:
            raise ObjectStoreError(f"object store {self._root} is closed")
        try:
            current = _identity(os.lstat(self._root))
        except OSError:
            current = None
        if current != self._root_id:
            raise ObjectStoreError(
                f"object store directory {self._root} was removed or replaced after this "
                "store opened it; refusing to use whatever is there now (another user may "
                "have created it). Check the directory, then restart to open it again"
            )
        try:
            meta = _identity(os.stat(_META_DIR, dir_fd=self._root_fd, follow_symlinks=False))
        except OSError:
            meta = None
        if meta != self._meta_id:
            raise ObjectStoreError(
                f"object store metadata directory {self._meta_dir} was removed or replaced "
                "after this store opened it; refusing to use it. Restart to open the store again"
            )
        return self._root_fd, self._meta_fd

    def _data_path(self, key: str) -> str:
        return os.path.join(self._root, key)

    def _keys(self) -> builtins.list[str]:
        # Symlinks and other non-files among them are refused when list() opens them.
        root_fd, _ = self._dirs()
        return [name for name in _scan(root_fd) if _is_key(name)]

    def _key_of(self, ref: RefLike) -> str:
        """The key ``ref`` names, refusing invalid keys and paths outside the store."""
        parsed = ObjRef.parse(ref)
        if not parsed.path:
            return validate_key(parsed.key)
        key = self._key_in_store(parsed.path)
        if parsed.key != key:
            raise BadRequest(f"object reference names key {parsed.key!r} but path {parsed.path}")
        return key

    def _key_in_store(self, path: str) -> str:
        # Only maps a path to its key; the object is then found through the store's own
        # directory descriptor, whatever the path resolves to now.
        if "\0" in path:
            raise InvalidKey("object path must not contain NUL")
        # abspath folds '..' textually, so '<store>/../etc/passwd' lands outside and is refused.
        parent, name = os.path.split(os.path.abspath(path))
        if parent != self._root and os.path.realpath(parent) != os.path.realpath(self._root):
            raise InvalidKey(f"path {path} is outside the object store {self._root}")
        return validate_key(name)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        root_fd, _ = self._dirs()
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(_LOCK_FILE, flags, 0o600, dir_fd=root_fd)
        except OSError as exc:
            # ELOOP: a symlink where the lock file belongs; never followed.
            raise ObjectStoreError(
                f"cannot open the lock file of object store {self._root}: {exc.strerror}"
            ) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError as exc:
                # An NFS mount without lock support: carry on unlocked. The sidecar still
                # names the data it describes, so readers never pair it with other data.
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _open(self, key: str) -> tuple[int, ObjRef]:
        with self._locked(exclusive=False):
            return self._describe(key)

    def _describe(self, key: str) -> tuple[int, ObjRef]:
        """Open the object's data and read its metadata; the caller holds the lock."""
        try:
            # O_NOFOLLOW: a symlink planted under a valid key must not lead outside the store;
            # O_NONBLOCK: a FIFO planted there must not hang the reader.
            fd = os.open(
                key,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._root_fd,
            )
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self._root}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ObjectStoreError(
                    f"object {key!r} is a symlink; refusing to follow it"
                ) from None
            raise ObjectStoreError(f"could not open object {key!r}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ObjectStoreError(f"object {key!r} is not a regular file")
            described = self._read_meta(key, st)
        except BaseException:
            os.close(fd)
            raise
        # No sidecar describing this data: a file someone copied in by hand. It is served as
        # raw bytes, which never runs code, and ages by its mtime.
        content_type, created_at = described or ("bytes", st.st_mtime)
        return fd, ObjRef(key, self._data_path(key), st.st_size, content_type, created_at)

    def _read_meta(self, key: str, data: os.stat_result) -> tuple[str, float] | None:
        """The content type and creation time the sidecar gives for the data file ``data``."""
        try:
            fd = os.open(
                key + ".json",
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._meta_fd,
            )
        except OSError:
            return None
        with builtins.open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = f.read(_MAX_META_SIZE + 1)
        if len(raw) > _MAX_META_SIZE:
            return None
        try:
            meta = _load_json(raw, key, BadRequest)
        except BadRequest:
            return None
        if not isinstance(meta, dict):
            return None
        for entry in (meta, meta.get("previous")):
            described = _describes(entry, data, legacy=entry is meta)
            if described is not None:
                return described
        return None


class _Sink:
    """The write end of a temp file: counts bytes and stops at the size limit.

    Unbuffered on purpose: large writes go straight to the kernel without a copy, and
    pickle does its own framing.
    """

    def __init__(self, fd: int, key: str, limit: int | None) -> None:
        self.fd = fd
        self.key = key
        self.limit = limit
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = _byte_view(data)
        n = view.nbytes
        _check_size(self.key, self.size + n, self.limit)
        _write_all(self.fd, view)
        self.size += n
        return n


def _byte_view(data: Any) -> memoryview:
    """A flat byte view of a bytes-like value, copying only if it is not contiguous."""
    try:
        view = memoryview(data)
    except TypeError:
        raise BadRequest(f"expected bytes-like data, not {type(data).__name__}") from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _write_all(fd: int, view: memoryview) -> None:
    # os.write may write less than asked (and at most ~2 GiB at once); slicing a
    # memoryview is free, so loop without copying.
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _check_size(key: str, size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise PayloadTooLarge(f"object {key!r} is larger than the {limit}-byte limit")


def _check_json(fd: int, key: str) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    with builtins.open(fd, "rb", buffering=0, closefd=False) as f:
        _load_json(f.readall(), key, BadRequest)


# A JSON string, escapes included. An unterminated one runs to the end of the data instead
# of failing, so the pattern never backtracks or retries: one linear pass strips them all.
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _check_json_depth(data: bytes, key: str) -> None:
    """Raise :class:`BadRequest` if ``data`` nests arrays/objects deeper than the limit.

    Iterative, so it costs no recursion: strings are cut out (their brackets do not count),
    the brackets kept, and their depth counted. The copies are at most the size of ``data``
    each and short-lived. Invalid JSON is left for the parser to report.
    """
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return  # cannot nest deeper than it has brackets: the common, small case
    brackets = _JSON_STRING_RE.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte == 0x5B or byte == 0x7B:  # '[' or '{'
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(_too_deep(key))
        else:
            depth -= 1


def _load_json(data: bytes, key: str, invalid: type[Exception]) -> Any:
    """Parse JSON ``data`` after the depth check; ``invalid`` is raised for bad syntax."""
    _check_json_depth(data, key)
    try:
        return json.loads(data)
    except RecursionError:  # a lower recursion limit than usual in this thread
        raise BadRequest(_too_deep(key)) from None
    except ValueError as exc:
        raise invalid(f"object {key!r} is not valid JSON: {exc}") from None


def _too_deep(key: str) -> str:
    return f"object {key!r} is JSON nested more than {MAX_JSON_DEPTH} levels deep; flatten it"


def _entry(content_type: str, created_at: float, data: os.stat_result) -> dict[str, Any]:
    """A sidecar's description of one data file: its type and age, and which file it is."""
    return {
        "content_type": content_type,
        "created_at": created_at,
        "size": data.st_size,
        "ino": data.st_ino,
    }


def _describes(entry: object, data: os.stat_result, legacy: bool) -> tuple[str, float] | None:
    """``entry``'s content type and creation time if it describes the data file ``data``."""
    if not isinstance(entry, dict):
        return None
    content_type, created_at = entry.get("content_type"), entry.get("created_at")
    if not isinstance(content_type, str) or not isinstance(created_at, (int, float)):
        return None
    if "ino" not in entry and "size" not in entry:
        # A sidecar written before they named their data: trusted as it always was.
        return (content_type, float(created_at)) if legacy else None
    if entry.get("ino") != data.st_ino or entry.get("size") != data.st_size:
        return None
    return content_type, float(created_at)


def _unknown_type(content_type: object) -> str:
    return f"unknown content type {content_type!r}; expected one of {', '.join(CONTENT_TYPES)}"


def _pickle_disabled(what: str) -> str:
    return (
        f"{what}: pickle is disabled for this object store (loading a pickle runs code). "
        "Store JSON or bytes, or open the store with allow_pickle=True (--allow-pickle) "
        "if every writer is trusted"
    )


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _fsync_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _create_temp(dir_fd: int) -> tuple[int, str]:
    """Create a fresh private temp file in ``dir_fd``: ``(fd, name)``.

    ``O_EXCL`` with ``O_NOFOLLOW``: never an existing file, nor a symlink planted there.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = _TMP_PREFIX + secrets.token_hex(8)
        try:
            return os.open(name, flags, 0o600, dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp file name")


def _scan(dir_fd: int) -> builtins.list[str]:
    """The names in the directory ``dir_fd``, read through a descriptor of its own.

    Scanning ``dir_fd`` itself would share its read offset with other threads' scans.
    """
    fd = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            return [entry.name for entry in entries]
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _close_all(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_private_dir(name: str, path: str, parent_fd: int | None, parent: str | None) -> int:
    """Create the directory ``name`` (mode 0700) if missing, open it and verify it is safe.

    ``name`` is relative to ``parent_fd`` (or the directory ``parent``); ``path`` is only for
    messages. The returned descriptor is the directory checked: a real directory (never a
    symlink), owned by this user and not writable by others.
    """
    where = os.path.join(parent, name) if parent_fd is None and parent is not None else name
    try:
        os.mkdir(where, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass  # checked below, like any existing directory
    except OSError as exc:
        raise ObjectStoreError(
            f"cannot create object store directory {path}: {exc.strerror}"
        ) from exc
    try:
        fd = os.open(where, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        # A symlink could be re-pointed by whoever owns it: only the real directory will do.
        # (Which of ELOOP and ENOTDIR a symlink gives depends on the kernel and flags.)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(where, parent_fd):
            raise ObjectStoreError(
                f"object store path {path} is a symlink; refusing it. Use the real directory path"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise ObjectStoreError(
                f"object store path {path} exists and is not a directory"
            ) from None
        raise ObjectStoreError(
            f"cannot open object store directory {path}: {exc.strerror}"
        ) from exc
    try:
        _check_private(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_private(st: os.stat_result, path: str) -> None:
    # Another user's directory could hold planted objects; one others can write to could
    # have them planted later.
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ObjectStoreError(
            f"object store directory {path} is owned by uid {st.st_uid}, not by this user "
            f"(uid {uid}); use another path (--object-store) or fix its owner"
        )
    if st.st_mode & 0o022:
        raise ObjectStoreError(
            f"object store directory {path} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod go-w {path}"
        )


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:ms|s|m|h|d|w)"
_DURATION_RE = re.compile(rf"(?:\s*{_NUMBER}\s*{_UNIT})+\s*")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})\s*({_UNIT})")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float) -> float:
    """Seconds in a duration such as ``"45s"``, ``"30m"``, ``"1h30m"``, ``"2d"`` or ``"90"``.

    Units are ``ms``, ``s``, ``m``, ``h``, ``d`` and ``w``; a plain number is seconds (a
    number passed as such, as TOML gives it, is taken as seconds too). Raises
    :class:`BadRequest` for anything else, including negative values.
    """
    expected = "expected a duration such as 45s, 30m, 1h30m, 2d or a number of seconds"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BadRequest(f"{expected}, not {text!r}")
    if not isinstance(text, str):
        if not math.isfinite(text) or text < 0:
            raise BadRequest(f"{expected}, not {text!r}")
        return float(text)
    lowered = text.strip().lower()
    if re.fullmatch(_NUMBER, lowered):
        return float(lowered)
    if not _DURATION_RE.fullmatch(lowered):
        raise BadRequest(f"{expected}, not {text!r}")
    return sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART_RE.findall(lowered))
