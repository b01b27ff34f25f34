"""The package's one-direction rule (docs/design.md §6): a module imports only from its own layer or the layers
below it, and no two modules import each other, directly or around a loop — type-only imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sublora_cli"
RANK = {"errors": 0, "constants": 0, "interrupts": 0, "core": 1, "formats": 2, "model": 3, "pipeline": 4,
        "training": 5, "commands": 6, "cli": 7, "__init__": 0, "__main__": 8}  # fmt: skip


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every sublora_cli module `path` imports, anywhere in the file (TYPE_CHECKING and function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sublora_cli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists() or (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).is_dir())  # noqa: E501
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sublora_cli"))
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_sits_in_a_known_layer():
    assert {layer(m) for m in GRAPH} <= set(RANK), sorted({layer(m) for m in GRAPH} - set(RANK))


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if t != "sublora_cli" and RANK[layer(t)] > RANK[layer(m)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    known = {t: {u for u in GRAPH.get(t, ()) if u in GRAPH and u != t} for t in GRAPH}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(known[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(known):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


MAX_LINES = 460
# core/select.py (~600 lines) holds the gain rules, the greedy ledger and the enumerating searches; splitting it
# waits for the objective change of the data-free method to land (issue 23), which rewrites the ledger's scores.
TOO_LONG_FOR_NOW = {"sublora_cli.core.select"}


def test_no_module_is_long():
    long = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES and module_name(p) not in TOO_LONG_FOR_NOW
    }
    assert not long, long
