"""``python -m anyserve`` is the ``anyserve`` command."""

from anyserve.cli import main

main()
