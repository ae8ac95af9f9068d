"""Options shared by the commands of more than one audience."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The topology file.", show_default=True)
]
