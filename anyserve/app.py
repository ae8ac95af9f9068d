"""The handler SDK: :class:`AnyServe` and its ``@app.capability`` decorator.

The decorator only records a :class:`Handler`; nothing runs until a replica serves
the app. Capabilities are free key/values compared as text, so ``gpus=2`` matches a
request asking for ``gpus="2"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyserve.capability import value_text
from anyserve.signature import Signature, Tensor

F = TypeVar("F", bound=Callable[..., Any])

AttrValue = str | int | float | bool


@dataclass(frozen=True)
class Capability:
    """What a handler serves: free attributes plus whether it streams."""

    attrs: Mapping[str, AttrValue]
    stream: bool = False

    def text(self) -> dict[str, str]:
        """The attributes as the text they are compared by."""
        return {k: value_text(v) for k, v in self.attrs.items()}

    def matches(self, query: Mapping[str, object]) -> bool:
        """True when every key of ``query`` is an attribute with an equal value (as text)."""
        return all(
            k in self.attrs and value_text(self.attrs[k]) == value_text(v) for k, v in query.items()
        )

    def equals(self, query: Mapping[str, object]) -> bool:
        """True when ``query`` names exactly these attributes with equal values."""
        return len(query) == len(self.attrs) and self.matches(query)

    def to_dict(self) -> dict[str, Any]:
        """The registration form: the attributes, plus ``"stream": true`` for streams."""
        out: dict[str, Any] = dict(self.attrs)
        if self.stream:
            out["stream"] = True
        return out

    def label(self) -> str:
        """A short human form, e.g. ``type=chat,model=demo`` (``+stream`` for streams)."""
        text = ",".join(f"{k}={v}" for k, v in self.text().items())
        return text + (" (stream)" if self.stream else "")


@dataclass(frozen=True)
class Handler:
    """A recorded handler: its capability, the function, and how to call it."""

    capability: Capability
    func: Callable[..., Any]
    arity: int
    is_async: bool
    is_generator: bool = False
    name: str = ""
    #: The declared tensors, or None for an undeclared handler (nothing is checked).
    signature: Signature | None = None

    @property
    def wants_context(self) -> bool:
        return self.arity >= 2


def _positional_arity(func: Callable[..., Any]) -> int:
    params = inspect.signature(func).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 3
    return sum(1 for p in params if p.kind in kinds)


@dataclass
class AnyServe:
    """An app: a set of handlers, each declared with :meth:`capability`.

    >>> app = AnyServe()
    >>> @app.capability(type="chat", model="demo")
    ... def chat(request, context): ...
    """

    name: str = "anyserve-app"
    handlers: list[Handler] = field(default_factory=list)

    def capability(
        self,
        stream: bool = False,
        inputs: Iterable[Tensor] | None = None,
        outputs: Iterable[Tensor] | None = None,
        **attrs: AttrValue,
    ) -> Callable[[F], F]:
        """Declare that the decorated function serves the capability ``attrs``.

        Non-stream handlers take ``(request)`` or ``(request, context)`` and return a
        ``ModelInferResponse``. Stream handlers take ``(request, context, stream)`` and call
        ``stream.send(...)``, or are generators that yield the messages. ``async def``
        works for both. The function is returned unchanged.

        ``inputs`` and ``outputs`` optionally declare the tensors as
        :class:`~anyserve.signature.Tensor` (name, datatype, shape with ``-1`` for any size):
        a request that does not fit is refused before the handler runs, and the declarations
        are what v2 model metadata reports.
        """
        if not attrs:
            raise ValueError("a capability needs at least one attribute, e.g. type='chat'")
        for key, value in attrs.items():
            if not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"capability {key}={value!r}: values are str, int, float or bool")
        cap = Capability(attrs=dict(attrs), stream=bool(stream))
        signature = Signature(inputs, outputs)

        def record(func: F) -> F:
            if any(h.capability == cap for h in self.handlers):
                raise ValueError(f"capability {cap.label()} is declared twice")
            arity = _positional_arity(func)
            lo, hi = (1, 3) if stream else (1, 2)
            if not lo <= arity <= hi:
                shape = "(request, context, stream)" if stream else "(request[, context])"
                raise TypeError(
                    f"handler {func.__name__} takes {arity} arguments; expected {shape}"
                )
            is_gen = inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
            self.handlers.append(
                Handler(
                    capability=cap,
                    func=func,
                    arity=arity,
                    is_async=inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func),
                    is_generator=is_gen,
                    name=getattr(func, "__qualname__", repr(func)),
                    signature=signature or None,
                )
            )
            return func

        return record

    def get_capabilities(self) -> list[dict[str, Any]]:
        """Every capability in its registration form (see :meth:`Capability.to_dict`), with
        ``"inputs"``/``"outputs"`` when declared so the API server can answer v2 metadata."""
        return [
            {**h.capability.to_dict(), **h.signature.metadata()}
            if h.signature is not None
            else h.capability.to_dict()
            for h in self.handlers
        ]

    def find_handler(
        self, query: Mapping[str, object], stream: bool | None = None
    ) -> Handler | None:
        """The handler for ``query``: an exact match first, else the first partial match.

        ``stream`` restricts the search to stream (True) or unary (False) handlers.
        """
        candidates: Iterable[Handler] = self.handlers
        if stream is not None:
            candidates = [h for h in self.handlers if h.capability.stream == stream]
        partial = None
        for handler in candidates:
            if handler.capability.equals(query):
                return handler
            if partial is None and handler.capability.matches(query):
                partial = handler
        return partial
