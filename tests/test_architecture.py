"""The house's layout holds: imports point one way, no cycle, short functions (docs/architecture.md, "Layout")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bp_service"
README = PACKAGE.parent / "docs" / "architecture.md"  # its "Layout" section

# Who may import whom: a part may import itself and the parts listed. The core is the teaching
# engine (torch only); "shared" are the formats and plumbing every command uses (no Lightning, no
# Hydra); training and serving are the service; explain and bench are tools, never imported by it.
CORE = {"activations", "dispatch", "functions", "layers", "gradcheck", "capture"}
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
    """No function over 60 lines, unless docs/architecture.md's layout section names it (with its reason)."""
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    excused = set(re.findall(r"`(bp_service\.[\w.]+)`", layout))
    unexplained = {name: n for name, n in long_functions().items() if name not in excused}
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines not explained in the layout: {unexplained}"


# --------------------------------------------------------------------------- data: named by its class
CONF_DATA = PACKAGE.parent / "conf" / "data"
DATA_PACKAGE = "bp_service.training.data"


def test_every_data_option_names_its_schema_and_no_code_branches_on_its_name():
    """A data= option is a YAML file that includes its source's schema (which names the class by _target_);
    outside the data package, no service module spells an option's name, so none can choose data by it."""
    import yaml

    from bp_service.training.config import DATA_SCHEMAS

    options = {p.stem: yaml.safe_load(p.read_text()) for p in CONF_DATA.glob("*.yaml")}
    for name, node in options.items():
        schemas = [str(entry).lstrip("/").partition("@")[0] for entry in node.get("defaults", [])]
        assert [s for s in schemas if s in DATA_SCHEMAS], f"conf/data/{name}.yaml includes no data schema"
        assert "_target_" not in node, f"conf/data/{name}.yaml: the schema names the class"
    for schema in DATA_SCHEMAS.values():
        assert schema._target_.startswith(f"{DATA_PACKAGE}."), schema
    spelled = {
        f"{module}:{node.lineno} {node.value!r}"
        for module, path in MODULES.items()
        if part_of(module) in ("training", "serving") and not module.startswith(DATA_PACKAGE)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in options
    }
    assert not spelled, f"data options named outside {DATA_PACKAGE}: {sorted(spelled)}"


# --------------------------------------------------------------------------- the tracker behind its interface
TRACKING = "bp_service.training.tracking"
# The interface (and its no-op twin), the one place that names a backend, and backend-neutral records (params,
# names, the metric buffer, the pictures); then MLflow's backend: its run, its writer, its Lightning logger, its
# tracking process, its sweeps, its dashboard views.
TRACKING_MODULES = {
    *("interface", "backends", "names", "params", "buffer", "pictures"),
    *("run", "writer", "logger", "sidecar", "sweep", "dashboard"),
}
# What records a run through the interface alone: adding a tracking backend leaves these as they are.
TRACKED_THROUGH_INTERFACE = ("recipe", "lifecycle", "artifacts")


def third_party_imports(source: str) -> set[str]:
    """The top-level package of every import, at the top or inside a function (``mlflow`` for ``mlflow.entities``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_tracking_is_split_by_concern():
    assert {m.rsplit(".", 1)[1] for m in MODULES if m.startswith(f"{TRACKING}.")} == TRACKING_MODULES


@pytest.mark.parametrize("name", TRACKED_THROUGH_INTERFACE)
def test_the_recipe_records_through_the_tracking_interface(name):
    """No MLflow, no store, no backend module: only what ``bp_service.training.tracking`` exports."""
    module = f"bp_service.training.{name}"
    assert "mlflow" not in third_party_imports(MODULES[module].read_text()), module
    behind = sorted(i for i in imports_of(module) if i.startswith(f"{TRACKING}.") or i == "bp_service.training.store")
    assert not behind, f"{module} imports {behind}"


def test_only_open_tracker_names_a_backend():
    """MLflow's tracker is imported in one place (backends.py), and the interface's modules never load MLflow."""
    assert {m for m in MODULES if f"{TRACKING}.run" in imports_of(m)} == {f"{TRACKING}.backends"}
    for name in ("interface", "names", "params", "buffer", "pictures"):
        assert "mlflow" not in third_party_imports(MODULES[f"{TRACKING}.{name}"].read_text()), name
