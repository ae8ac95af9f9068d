"""``python -m benchmarks``: run the benchmark (see ``benchmarks.run``)."""

from __future__ import annotations

from benchmarks.run import main

main()
