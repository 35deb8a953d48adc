"""The shape of the code, read from its imports: no circle among the
project's own modules, and an agent package that stands apart from the OMA.

Every import statement counts, at module level or inside a function (a
lazy import is a dependency all the same; it only hides the circle from
Python's import machinery). Imports under `if TYPE_CHECKING:` never run
and do not count. Migrations and tests are not product code."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("replication", "vma_agent", "oma_site")
SKIPPED_DIRS = {"migrations", "tests", "__pycache__"}

# The agent runs on its own host with no database and no OMA: nothing of
# it imports the OMA's packages. Django reaches only the modules that run in
# a Django process: its progress API's views and routes (api.py, urls.py,
# mounted by the web process) and its Celery task wrappers (tasks.py, which
# read the agent host's settings).
AGENT_DJANGO_MODULES = {"vma_agent.api", "vma_agent.urls", "vma_agent.tasks"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            relative = path.relative_to(PROJECT_ROOT)
            if SKIPPED_DIRS & set(relative.parts[:-1]):
                continue
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, however deeply nested, except TYPE_CHECKING-only ones."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names a module imports (for `from a import b`: a.b and a)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. A name is resolved to the
    longest project module it names (`from replication.services import jobs`
    depends on replication.services.jobs; `from replication.models import X`
    on replication.models)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per circle found: each found cycle is reported and broken
    at one edge, and the search goes on until the graph sorts."""
    graph = {module: set(targets) for module, targets in graph.items()}
    cycles = []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as exc:
            # The sorter's graph maps a node to its predecessors: its cycle
            # reads against the import direction.
            cycle = list(reversed(exc.args[1]))
            cycles.append(cycle)
            graph[cycle[0]].discard(cycle[1])
        else:
            return cycles


def test_no_import_cycle_among_the_projects_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (a -> b: a imports b):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_function_level_imports():
    graph = import_graph()
    # replication.apps imports the roles inside a signal receiver only.
    assert "replication.roles" in graph["replication.apps"]
    # replication.tasks imports the services at module level; a service that
    # imported tasks back inside a function would be a circle the check must see.
    graph["replication.services.jobs"] = graph["replication.services.jobs"] | {"replication.tasks"}
    cycles = import_cycles(graph)
    assert any({"replication.tasks", "replication.services.jobs"} <= set(cycle) for cycle in cycles), cycles


def test_the_agent_imports_nothing_of_the_oma():
    graph = import_graph()
    reaching = {module: sorted(t for t in targets if t.split(".")[0] in ("replication", "oma_site"))
                for module, targets in graph.items() if module.startswith("vma_agent")}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_django_reaches_only_the_agents_views_and_task_wrappers():
    modules = project_modules()
    using_django = {module for module, path in modules.items() if module.startswith("vma_agent")
                    and any(name.split(".")[0] == "django" for name in imported_names(module, path))}
    assert using_django <= AGENT_DJANGO_MODULES, sorted(using_django - AGENT_DJANGO_MODULES)
