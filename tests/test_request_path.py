"""The API server's per-request shortcuts write and answer exactly what the long way did."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

from anyserve import api_server
from anyserve.api_server import LOG_FORMAT, FastInfo


@contextlib.contextmanager
def only_handler() -> Iterator[logging.StreamHandler[io.StringIO]]:
    """The root logger as ``run()`` configures it, writing to a string (and, for the
    while, without pytest's capturing handlers)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_fast_info_lines_are_the_lines_logging_writes() -> None:
    log = logging.getLogger("anyserve.api_server")
    fast = FastInfo()
    with only_handler() as handler:
        fast.install(log)
        assert fast.handler is handler
        log.info("request abc POST /infer/json 200 1.0ms")
        fast.write("request abc POST /infer/json 200 1.0ms")
    slow, quick = handler.stream.getvalue().splitlines()
    # Same text but for the milliseconds of the time stamp.
    assert slow.split(" ", 2)[2] == quick.split(" ", 2)[2]
    assert slow[:19] == quick[:19] or slow[:16] == quick[:16]
    assert quick.endswith(" INFO anyserve.api_server: request abc POST /infer/json 200 1.0ms")


def test_fast_info_follows_the_level() -> None:
    fast = FastInfo()
    with only_handler() as handler:
        fast.install(api_server.log)
        assert fast.handler is handler
        logging.getLogger().setLevel(logging.WARNING)
        fast.write("request abc GET /objects 200 1.0ms")
    assert handler.stream.getvalue() == ""


def test_fast_info_stands_aside_for_other_logging_setups() -> None:
    fast = FastInfo()
    with only_handler() as handler:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        fast.install(api_server.log)
        assert fast.handler is None  # another format: lines go through logging
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(logging.NullHandler())
        fast.install(api_server.log)
        assert fast.handler is None  # more than one handler
