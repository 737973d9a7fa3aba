"""The package's layers: each part of `wasmflow` imports only parts below it (or its own).

Read from the source with `ast`, imports inside functions included, so a lazy import that reaches up
fails here as surely as a top-level one. The order is the README's Layout table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wasmflow"

# From the ground floor up. Parts on one floor do not import each other either: a part imports only
# floors below its own, so no two parts can import each other (no circle).
FLOORS: list[set[str]] = [
    {"storage", "fields", "build", "terminal", "process", "loopback", "__init__"},
    {"host_functions"},
    {"engine", "wasi_nn"},
    {"flows"},
    {"runtime", "exec_command"},
    {"cli_support"},
    {"console"},
    {"platform"},
    {"scaffold"},
    {"cli"},
    {"devtools"},
]
FLOOR = {part: n for n, parts in enumerate(FLOORS) for part in parts}


def _part(module: str) -> str | None:
    """`wasmflow.platform.queue` -> `platform`; None for modules outside the package."""
    names = module.split(".")
    if names[0] != "wasmflow":
        return None
    return names[1] if len(names) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, relative ones resolved."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])  # the file's package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_of_the_package_has_a_floor() -> None:
    parts = {_part(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in _sources()}
    assert parts - FLOOR.keys() == set(), "add the new part to FLOORS (and the README's Layout table)"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_reaches_a_higher_floor(path: Path) -> None:
    own = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    upward = []
    for line, module in _imports(path):
        target = _part(module)
        if target is None or target == own or target not in FLOOR:
            continue
        if FLOOR[target] >= FLOOR[own]:
            upward.append(f"line {line}: {module} (floor {FLOOR[target]}, this file is on {FLOOR[own]})")
    assert upward == [], f"{path.relative_to(PACKAGE.parent)} reaches up: {upward}"
