"""The package's layers: no import circle, and no lower layer importing an upper one.

Read from the source (every `import` / `from ... import`, at any depth of a module, so an
import hidden in a function counts too), not from what happens to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gateway"

# Each package (or module) and the upper layers it must never import: money is counted by
# metering, priced by pricing, moved by the ledger, and a call's life (billing) drives them.
FORBIDDEN = {
    "gateway.money": ("gateway.",),
    "gateway.usage_record": ("gateway.ledger", "gateway.pricing", "gateway.metering"),
    "gateway.pricing": ("gateway.metering", "gateway.ledger", "gateway.billing", "gateway.api"),
    # The config's types and reading (its reloading, above them, checks prices with pricing).
    "gateway.config.schema": (
        "gateway.ledger",
        "gateway.billing",
        "gateway.api",
        "gateway.pricing",
    ),
    "gateway.config.types": ("gateway.ledger", "gateway.billing", "gateway.api", "gateway.pricing"),
    "gateway.config.loader": (
        "gateway.ledger",
        "gateway.billing",
        "gateway.api",
        "gateway.pricing",
    ),
    "gateway.ledger": (
        "gateway.api",
        "gateway.admin",
        "gateway.accounts",
        "gateway.billing",
        "gateway.metering",
        "gateway.proxy",
        "gateway.pricing",
    ),
    "gateway.metering": ("gateway.api", "gateway.admin", "gateway.billing", "gateway.accounts"),
    "gateway.billing": ("gateway.api", "gateway.admin", "gateway.app", "gateway.cli"),
    "gateway.accounts": ("gateway.api", "gateway.admin", "gateway.billing", "gateway.app"),
    "gateway.observability": ("gateway.api", "gateway.billing", "gateway.admin"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The gateway modules a source file imports (a name imported from a package counts as
    the submodule it names, if there is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("gateway"):
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("gateway")}
    return out


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


def test_the_walker_sees_imports() -> None:
    """Lest the checks below pass vacuously."""
    assert "gateway.pricing" in GRAPH["gateway.billing.call"]
    assert "gateway.ledger.transport" in GRAPH["gateway.ledger.ledger"]


def test_no_import_circle() -> None:
    """No module reaches itself through the imports of others."""
    circles = []
    for start in GRAPH:
        seen, todo = set(), [(start, (start,))]
        while todo:
            node, path = todo.pop()
            for nxt in GRAPH.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join((*path, nxt)))
                elif nxt in GRAPH and nxt not in seen:
                    seen.add(nxt)
                    todo.append((nxt, (*path, nxt)))
    assert circles == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(layer: str) -> None:
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target.startswith(prefix) for prefix in FORBIDDEN[layer])
        and not target.startswith(layer)
    )
    assert bad == []
