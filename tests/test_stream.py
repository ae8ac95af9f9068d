"""Stream: the thread-safe channel between a stream handler and the server."""

from __future__ import annotations

import asyncio
import threading

import pytest

from anyserve import (
    ModelInferResponse,
    ModelStreamInferResponse,
    Stream,
    StreamCancelled,
    StreamClosed,
)


def msg(text: str) -> ModelStreamInferResponse:
    return ModelStreamInferResponse(infer_response=ModelInferResponse(id=text))


def test_new_stream_is_open_and_empty() -> None:
    stream = Stream()
    assert not stream.closed and not stream.cancelled
    stream.close()
    assert list(stream) == []


def test_send_then_iterate() -> None:
    stream = Stream()
    stream.send(msg("a"))
    stream.close()
    assert [m.infer_response.id for m in stream] == ["a"]


def test_several_sends_keep_order_and_bare_responses_are_wrapped() -> None:
    stream = Stream()
    for i in range(5):
        stream.send(msg(str(i)))
    stream.send(ModelInferResponse(id="bare"))
    stream.close()
    assert [m.infer_response.id for m in stream] == ["0", "1", "2", "3", "4", "bare"]


def test_send_after_close_raises() -> None:
    stream = Stream()
    stream.close()
    assert stream.closed
    with pytest.raises(StreamClosed):
        stream.send(msg("late"))


def test_send_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="ModelStreamInferResponse"):
        Stream().send("text")  # type: ignore[arg-type]


def test_error_sends_error_message_and_closes() -> None:
    stream = Stream()
    stream.send(msg("a"))
    stream.error("model exploded")
    items = list(stream)
    assert items[-1].error_message == "model exploded"
    assert stream.closed
    with pytest.raises(StreamClosed):
        stream.send(msg("b"))


def test_cancel_makes_next_send_raise_cancelled() -> None:
    stream = Stream()
    stream.cancel()
    with pytest.raises(StreamCancelled):
        stream.send(msg("x"))


def test_iterator_protocol() -> None:
    stream = Stream()
    assert iter(stream) is stream
    stream.send(msg("only"))
    stream.close()
    assert next(stream).infer_response.id == "only"
    with pytest.raises(StopIteration):
        next(stream)


def test_threaded_producer_consumer_with_backpressure() -> None:
    stream = Stream(maxsize=4)
    count = 500

    def produce() -> None:
        for i in range(count):
            stream.send(msg(str(i)))
        stream.close()

    producer = threading.Thread(target=produce)
    producer.start()
    received = [m.infer_response.id for m in stream]
    producer.join(timeout=10)
    assert received == [str(i) for i in range(count)]


def test_async_consumer_of_threaded_producer() -> None:
    stream = Stream(maxsize=8)

    def produce() -> None:
        for i in range(200):
            stream.send(msg(str(i)))
        stream.close()

    async def consume() -> list[str]:
        thread = threading.Thread(target=produce)
        thread.start()
        out = [m.infer_response.id async for m in stream.messages()]
        thread.join(timeout=10)
        return out

    assert asyncio.run(consume()) == [str(i) for i in range(200)]


def test_blocked_producer_is_released_by_cancel() -> None:
    stream = Stream(maxsize=1)
    stream.send(msg("fills the buffer"))
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            stream.send(msg("blocks"))
        except StreamClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    stream.cancel()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], StreamCancelled)


def test_byte_budget_blocks_before_the_message_count_does() -> None:
    stream = Stream(maxsize=100, max_bytes=1000)
    big = ModelStreamInferResponse(infer_response=ModelInferResponse(id="x" * 600))
    stream.send(big)
    stream.send(big)  # over the budget now: the next send must wait for the consumer
    sent = threading.Event()

    def produce() -> None:
        stream.send(big)
        sent.set()

    thread = threading.Thread(target=produce)
    thread.start()
    assert not sent.wait(0.3)
    next(stream)
    assert sent.wait(5)
    thread.join(timeout=5)


def test_one_message_larger_than_the_budget_still_goes_through() -> None:
    stream = Stream(max_bytes=10)
    stream.send(ModelStreamInferResponse(infer_response=ModelInferResponse(id="x" * 100)))
    stream.close()
    assert [len(m.infer_response.id) for m in stream] == [100]


def test_send_may_be_awaited() -> None:
    stream = Stream()

    async def produce() -> None:
        await stream.send(msg("awaited"))
        stream.send(msg("not awaited"))

    asyncio.run(produce())
    stream.close()
    assert [m.infer_response.id for m in stream] == ["awaited", "not awaited"]
