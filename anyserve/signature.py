"""Declared tensors: :class:`Tensor` and the check of a request or response against them.

A handler may declare its inputs and outputs (``@app.capability(..., inputs=[...])``). The
replica then refuses a request that does not fit before the handler runs, naming the tensor
and what was expected, and refuses to send a response that breaks the declared outputs.
Everything a check needs is computed once per capability (:class:`Signature`), so the request
path of a declared handler pays a dict lookup and a few comparisons per tensor.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from anyserve.errors import BadRequest
from anyserve.tensors import DATATYPE_FIELD, RAW_STRUCT_CODE, split_bytes

__all__ = ["Signature", "Tensor", "tensors_from_json"]

#: Bounds on a declaration, the same on the SDK side and wherever declarations are read.
MAX_TENSORS = 64
MAX_NAME = 64
MAX_DIMS = 8

# Bytes per element of each fixed-size datatype in raw contents.
_RAW_SIZE = {dt: struct.calcsize("<" + code) for dt, code in RAW_STRUCT_CODE.items()}


@dataclass(frozen=True)
class Tensor:
    """One declared tensor: its name, KServe v2 datatype and shape (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __init__(self, name: str, datatype: str, shape: Iterable[int]) -> None:
        dims = tuple(shape)
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"tensor name {name!r}: 1 to {MAX_NAME} printable characters")
        if datatype not in DATATYPE_FIELD:
            known = ", ".join(DATATYPE_FIELD)
            raise ValueError(f"tensor {name}: datatype {datatype!r} is not one of {known}")
        if len(dims) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in dims
        ):
            raise ValueError(
                f"tensor {name}: shape {list(dims)} must be at most {MAX_DIMS} integers >= -1"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "datatype", datatype)
        object.__setattr__(self, "shape", dims)

    def fits(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` has the declared rank and every fixed dimension."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        """The v2 metadata form: ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def tensors_from_json(raw: Any, what: str) -> tuple[Tensor, ...]:
    """Declarations as registered (``[{"name", "datatype", "shape"}, ...]``) read back;
    ``ValueError`` names what is wrong."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ValueError(f"{what!r} must be a list of at most {MAX_TENSORS} tensors")
    tensors = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"name", "datatype", "shape"}:
            raise ValueError(f"{what!r}: each tensor is {{'name', 'datatype', 'shape'}}")
        shape = item["shape"]
        if not isinstance(shape, list):
            raise ValueError(f"{what!r}: tensor {item['name']!r} has no shape list")
        tensors.append(Tensor(item["name"], item["datatype"], shape))
    return _tensors(tensors, what)


def _tensors(declared: Iterable[Tensor] | None, what: str) -> tuple[Tensor, ...]:
    tensors = tuple(declared or ())
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} {what} may be declared")
    names = set()
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} are declared as Tensor(name, datatype, shape), got {t!r}")
        if t.name in names:
            raise ValueError(f"{what[:-1]} {t.name} is declared twice")
        names.add(t.name)
    return tensors


def _count(tensor: Any, raw: bytes | None) -> int | None:
    """How many elements ``tensor`` carries, or None when raw BYTES cannot be split."""
    if raw is not None:
        size = _RAW_SIZE.get(tensor.datatype)
        if size is not None:
            return len(raw) // size if len(raw) % size == 0 else -1
        try:
            return len(split_bytes(raw))
        except BadRequest:
            return None
    field = DATATYPE_FIELD.get(tensor.datatype)
    return len(getattr(tensor.contents, field)) if field else 0


def _product(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _mismatch(want: Tensor, got: Any, raw: bytes | None) -> str | None:
    """What is wrong with ``got`` against ``want``, or None."""
    if got.datatype != want.datatype:
        return f"datatype {want.datatype}, got {got.datatype or '(none)'}"
    shape = list(got.shape)
    if not want.fits(shape):
        return f"shape {list(want.shape)}, got {shape}"
    count = _count(got, raw)
    expected = _product(shape)
    if count != expected:
        found = "contents that cannot be read" if count is None or count < 0 else str(count)
        return f"{expected} elements for shape {shape}, got {found}"
    return None


class Signature:
    """The declared inputs and outputs of one capability, with the checks precomputed."""

    def __init__(
        self, inputs: Iterable[Tensor] | None = None, outputs: Iterable[Tensor] | None = None
    ) -> None:
        self.inputs = _tensors(inputs, "inputs")
        self.outputs = _tensors(outputs, "outputs")
        self._inputs = {t.name: t for t in self.inputs}
        self._outputs = {t.name: t for t in self.outputs}

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)

    def check_request(self, request: Any) -> None:
        """Raise :class:`BadRequest` naming the first input that breaks the declaration."""
        if not self._inputs:
            return
        raw = request.raw_input_contents
        seen: set[str] = set()
        for i, got in enumerate(request.inputs):
            want = self._inputs.get(got.name)
            if want is None:
                continue  # undeclared extras are the handler's business (Triton ignores them)
            seen.add(got.name)
            problem = _mismatch(want, got, raw[i] if i < len(raw) else None)
            if problem:
                raise BadRequest(f"input {got.name}: expected {problem}")
        for name, want in self._inputs.items():
            if name not in seen:
                raise BadRequest(
                    f"input {name} is missing: expected {want.datatype} {list(want.shape)}"
                )

    def check_response(self, response: Any) -> str | None:
        """What is wrong with the outputs of ``response`` against the declaration, or None.

        Only outputs the response carries are checked: a request may ask for a subset.
        """
        if not self._outputs:
            return None
        raw = response.raw_output_contents
        for i, got in enumerate(response.outputs):
            want = self._outputs.get(got.name)
            if want is None:
                return f"output {got.name} is not declared (declared: {', '.join(self._outputs)})"
            problem = _mismatch(want, got, raw[i] if i < len(raw) else None)
            if problem:
                return f"output {got.name}: declared {problem}"
        return None

    def metadata(self) -> dict[str, list[dict[str, Any]]]:
        """The ``inputs`` and ``outputs`` lists of v2 model metadata."""
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
