"""Sizes as people write them: ``"64MiB"``, ``"200M"``, ``"1g"`` or a number of bytes.

One parser for the API server's command line and ``anyserve.toml``.
"""

from __future__ import annotations

_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes from ``"1G"``, ``"200M"``, ``"512k"``, ``"64 MiB"`` or a whole number;
    :class:`ValueError` unless it is a positive size."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G)")
    if isinstance(text, int):
        value = text
    else:
        cleaned = text.strip().lower().removesuffix("ib").removesuffix("b").strip()
        factor = _UNITS.get(cleaned[-1:], 1)
        number = cleaned[:-1].strip() if cleaned[-1:] in _UNITS else cleaned
        try:
            value = int(float(number) * factor)
        except (ValueError, OverflowError):  # "lots", or "inf" / "nan"
            raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value
