"""The package's shape holds: layers import downwards only, and no private names cross modules.

The layers are the import-linter contracts in pyproject.toml (docs/architecture.md draws
them); the private-name rule is STYLE.md's: a ``_name`` is its module's business.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "anyserve"


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter)")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def private_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every ``from <anyserve module> import _name`` in ``source`` (of ``module``)."""
    found = []
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            base = package.split(".")
            target = ".".join(base[: len(base) - node.level + 1] + ([target] if target else []))
        if not (target == "anyserve" or target.startswith("anyserve.")):
            continue
        for alias in node.names:
            private = alias.name.startswith("_") and not alias.name.startswith("__")
            if private:
                found.append(f"{module}:{node.lineno} imports {alias.name} from {target}")
    return found


def test_the_checker_finds_private_imports() -> None:
    # The rule below must be able to fail: these are what it looks for.
    source = "from anyserve.kserve import _v2, routes\nfrom . import _x\nimport os\n"
    assert private_imports(source, "anyserve.server.routes") == [
        "anyserve.server.routes:1 imports _v2 from anyserve.kserve",
        "anyserve.server.routes:2 imports _x from anyserve.server",
    ]
    # Public names, dunders and other packages are fine.
    assert private_imports("from anyserve import __version__\nfrom os import _exit\n", "a.b") == []


def test_no_module_imports_a_private_name_from_another() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        if relative.parts[:2] == ("anyserve", "_proto"):
            continue  # generated code
        module = ".".join(relative.parts).removesuffix(".__init__")
        found += private_imports(path.read_text(), module, path.name == "__init__.py")
    assert found == [], "\n".join(found)
