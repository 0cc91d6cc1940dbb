"""The house's layout holds: imports point one way, no cycle, short functions (README, "Layout")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bp_service"
README = PACKAGE.parent / "README.md"

# Who may import whom: a part may import itself and the parts listed. The core is the teaching
# engine (torch only); "shared" are the formats and plumbing every command uses (no Lightning, no
# Hydra); training and serving are the service; explain and bench are tools, never imported by it.
CORE = {"functions", "layers", "gradcheck", "capture"}
SHARED = {"bundle", "tables", "files", "home", "commands"}
MAY_IMPORT = {
    "core": {"core"},
    "shared": {"core", "shared"},
    "training": {"core", "shared", "training"},
    "serving": {"core", "shared", "serving"},
    "explain": {"core", "shared", "explain"},
    "bench": {"core", "shared", "training", "bench"},
    "entry": {"shared"},  # bp_service/cli.py and __init__.py name commands as strings, imported on use
}
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__init__"):
        return "entry"
    if parts[1] in CORE:
        return "core"
    if parts[1] in SHARED:
        return "shared"
    return parts[1]  # a subpackage: training, serving, explain, bench


def imports_in(source: str) -> set[str]:
    """Every bp_service module a source imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bp_service")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bp_service"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str) -> set[str]:
    return imports_in(MODULES[module].read_text()) - {"bp_service", module}


def test_every_module_belongs_to_a_known_part():
    assert {part_of(m) for m in MODULES} <= set(MAY_IMPORT)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    """Core <- shared <- training, serving, tools; the service never imports a tool, serving never training."""
    wrong = wrong_way(module, imports_of(module))
    assert not wrong, f"{module} ({part_of(module)}) imports {wrong}"


def wrong_way(module: str, imported: set[str]) -> list[str]:
    return sorted(i for i in imported - {"bp_service"} if part_of(i) not in MAY_IMPORT[part_of(module)])


def test_the_rule_catches_a_wrong_way_import():
    """The check can fail: the core importing the service, or the service a tool, is reported."""
    core = MODULES["bp_service.layers"].read_text() + "\nfrom bp_service.training.module import BPModule\n"
    assert wrong_way("bp_service.layers", imports_in(core)) == ["bp_service.training.module"]
    service = "def f():\n    from bp_service.bench import cli\n"
    assert wrong_way("bp_service.training.recipe", imports_in(service)) == ["bp_service.bench", "bp_service.bench.cli"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    graph = {m: {i for i in imports_of(m) if i in MODULES} for m in MODULES}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # ...and the search finds one where there is one (bench.py and bench_jobs.py once imported each other).
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def long_functions() -> dict[str, int]:
    found = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{module}.{node.name}"] = lines
    return found


def test_functions_are_short_or_the_readme_says_why():
    """No function over 60 lines, unless README's layout section names it (with its reason)."""
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    excused = set(re.findall(r"`(bp_service\.[\w.]+)`", layout))
    unexplained = {name: n for name, n in long_functions().items() if name not in excused}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines not explained in README: {unexplained}"
