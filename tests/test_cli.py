"""The `anyserve` command itself: help, speed of start-up, exit codes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def anyserve_cmd() -> list[str]:
    # The command installed beside this interpreter (the venv's), else python -m anyserve.
    exe = shutil.which("anyserve", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "anyserve"]


def test_help_lists_the_commands() -> None:
    result = subprocess.run([*anyserve_cmd(), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("replica", "api-server", "up", "call", "registry", "objects"):
        assert command in result.stdout, command
    for command in ("ps", "status", "restart", "scale", "down", "logs"):
        # A whole word at the start of a row of the command list, not inside a help text.
        assert re.search(rf"^\W*{command}\s", result.stdout, re.MULTILINE), command


def test_every_audience_is_registered_at_the_top_level() -> None:
    from anyserve.cli import command_names

    assert command_names() == {
        *("replica", "api-server", "up"),
        *("ps", "status", "restart", "scale", "down", "logs"),
        *("call", "registry", "objects"),
    }


def test_the_bare_app_form_means_replica() -> None:
    from anyserve.cli import command_names
    from anyserve.cli.launchers import bare_form

    names = command_names()
    assert bare_form(["pkg.mod:app", "--port", "0"], names) == [
        "replica",
        *("pkg.mod:app", "--port", "0"),
    ]
    for args in (["registry", "ls"], ["--help"], [], ["call", "a:b"]):
        assert bare_form(args, names) == args


def test_help_imports_nothing_heavy() -> None:
    # --help stays fast because grpc, uvicorn, httpx and watchfiles load inside commands.
    code = (
        "import sys; from anyserve import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('grpc', 'uvicorn', 'httpx', 'watchfiles', 'starlette', 'psutil')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    elapsed = time.perf_counter() - start
    print(f"anyserve --help took {elapsed * 1000:.0f} ms")
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [*anyserve_cmd(), "no-such-command"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
