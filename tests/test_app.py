"""The SDK's records: capabilities, the decorator, handler lookup."""

from __future__ import annotations

import pytest

from anyserve import AnyServe
from anyserve.app import Capability


def test_capability_exact_partial_and_no_match() -> None:
    cap = Capability({"type": "chat", "model": "demo"})
    assert cap.matches({"type": "chat", "model": "demo"})
    assert cap.equals({"type": "chat", "model": "demo"})
    assert cap.matches({"type": "chat"})  # partial
    assert not cap.equals({"type": "chat"})
    assert not cap.matches({"type": "embed"})
    assert not cap.matches({"type": "chat", "gpus": "2"})


def test_capability_values_compare_as_text() -> None:
    cap = Capability({"type": "heavy", "gpus": 2, "fast": True})
    assert cap.matches({"gpus": "2"})
    assert cap.matches({"fast": "true"})
    assert not cap.matches({"gpus": "2.0"})


def test_capability_to_dict_marks_streams() -> None:
    assert Capability({"type": "chat"}).to_dict() == {"type": "chat"}
    assert Capability({"type": "chat"}, stream=True).to_dict() == {"type": "chat", "stream": True}


def test_decorator_records_and_returns_function_unchanged() -> None:
    app = AnyServe()

    def handler(request):  # type: ignore[no-untyped-def]
        return request

    assert app.capability(type="chat")(handler) is handler
    assert len(app.handlers) == 1
    assert app.handlers[0].func is handler
    assert not app.handlers[0].wants_context


def test_decorator_detects_context_argument_and_async() -> None:
    app = AnyServe()

    @app.capability(type="a")
    def one(request):  # type: ignore[no-untyped-def]
        ...

    @app.capability(type="b")
    async def two(request, context):  # type: ignore[no-untyped-def]
        ...

    @app.capability(type="c", stream=True)
    def three(request, context, stream):  # type: ignore[no-untyped-def]
        ...

    by_type = {h.capability.attrs["type"]: h for h in app.handlers}
    assert (by_type["a"].arity, by_type["a"].is_async) == (1, False)
    assert (by_type["b"].arity, by_type["b"].is_async, by_type["b"].wants_context) == (
        2,
        True,
        True,
    )
    assert by_type["c"].arity == 3 and by_type["c"].capability.stream


def test_decorator_rejects_bad_declarations() -> None:
    app = AnyServe()
    with pytest.raises(ValueError, match="at least one attribute"):
        app.capability()
    with pytest.raises(TypeError, match="values are"):
        app.capability(type=["x"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected"):

        @app.capability(type="x")
        def too_many(a, b, c):  # type: ignore[no-untyped-def]
            ...

    @app.capability(type="dup")
    def first(request):  # type: ignore[no-untyped-def]
        ...

    with pytest.raises(ValueError, match="declared twice"):

        @app.capability(type="dup")
        def second(request):  # type: ignore[no-untyped-def]
            ...


def test_get_capabilities() -> None:
    app = AnyServe()
    app.capability(type="chat", model="demo")(lambda r: r)
    app.capability(type="chat", stream=True)(lambda r, c, s: None)
    assert app.get_capabilities() == [
        {"type": "chat", "model": "demo"},
        {"type": "chat", "stream": True},
    ]


def test_find_handler_exact_partial_none() -> None:
    app = AnyServe()
    app.capability(type="chat", model="other")(lambda r: "other")
    app.capability(type="chat", model="demo")(lambda r: "demo")
    app.capability(type="chat", stream=True)(lambda r, c, s: None)

    exact = app.find_handler({"type": "chat", "model": "demo"})
    assert exact is not None and exact.capability.attrs["model"] == "demo"
    partial = app.find_handler({"type": "chat"}, stream=False)
    assert partial is not None and partial.capability.attrs["model"] == "other"
    streaming = app.find_handler({"type": "chat"}, stream=True)
    assert streaming is not None and streaming.capability.stream
    assert app.find_handler({"type": "embed"}) is None
