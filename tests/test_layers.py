"""The package's layering, checked on the source: which layer may import which (design.md, Layout).

Every import counts - at module level, inside a function, under ``TYPE_CHECKING`` - because each
one is a dependency a reader of the lower layer has to know about.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "onthefly"

# layer -> the layers it must never import. `signals` is pure computation over values; reading
# the session folder is `store`'s job, and `store` may use `signals`, never the other way round.
FORBIDDEN = {
    "signals": {"store", "server", "cli"},
    "engine": {"server", "cli"},
    "store": {"server", "cli"},
    "actions": {"server", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[tuple[str, int]]:
    """(absolute name, line) of every ``onthefly`` module or name that ``source`` imports."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            if target == "onthefly":  # `from .. import server`: the names are the layers
                found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "onthefly"]


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(source: str, module: str, *, is_package: bool = False, where: str = "") -> list[str]:
    banned = FORBIDDEN.get(layer_of(module), set())
    return sorted({f"{where or module}:{line} imports {name}"
                   for name, line in imports_of(source, module, is_package=is_package)
                   if layer_of(name) in banned})


def source_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_it_must_not_know(layer: str) -> None:
    modules = [p for p in source_modules() if layer_of(module_name(p)) == layer]
    assert modules, f"no modules found for the layer {layer!r} under {PACKAGE}"
    found = [v for p in modules
             for v in violations(p.read_text(), module_name(p), is_package=p.name == "__init__.py",
                                 where=str(p.relative_to(REPO)))]
    assert not found, f"{layer} must not import {', '.join(sorted(FORBIDDEN[layer]))}:\n" + "\n".join(found)


def test_the_check_sees_relative_lazy_and_type_checking_imports() -> None:
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
from ..store.duck import cursor
from .. import server
from .quantiles import robust_summary
if TYPE_CHECKING:
    from onthefly.cli import main

def later() -> None:
    import onthefly.engine.run
"""
    names = {name for name, _ in imports_of(source, "onthefly.signals.example")}
    assert {"onthefly.store.duck", "onthefly.server", "onthefly.cli", "onthefly.engine.run",
            "onthefly.signals.quantiles"} <= names
    assert violations(source, "onthefly.signals.example") == [
        "onthefly.signals.example:4 imports onthefly.store.duck",
        "onthefly.signals.example:5 imports onthefly.server",
        "onthefly.signals.example:8 imports onthefly.cli",
    ]
    # A package's own relative imports start from the package, not its parent.
    assert ("onthefly.store.reader", 1) in imports_of("from .reader import SessionReader", "onthefly.store",
                                                      is_package=True)
