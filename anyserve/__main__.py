"""``python -m anyserve`` is the ``anyserve`` command."""

from __future__ import annotations

from anyserve.cli import main

main()
