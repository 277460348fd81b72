"""The shape of the code: no import cycle inside `services/`, and a domain core
(`services/core/`) that imports no framework (issue 14).

Imports are read from the source with `ast`, wherever they stand (a function-level import is
still a dependency), except under `if TYPE_CHECKING:` (type hints only). A submodule
importing its own package's `__init__` counts; the implicit import of a parent package when
a submodule is imported does not (every package has it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services"
FRAMEWORKS = ("flask", "werkzeug", "celery", "kombu", "sqlalchemy", "alembic", "gunicorn", "redis")
HTTP_CLIENTS = ("httpx", "requests", "urllib3", "aiohttp")
# The HTTP inference backend is the one place in the core that speaks HTTP.
HTTP_ALLOWED = {"services.core.backends.openai_http", "services.core.backends.template_source"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SERVICES.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """Every module `name` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found


def test_no_import_cycle_inside_services() -> None:
    graph = {name: {t for t in imports_of(name) if t in MODULES and t != name} for name in MODULES}
    cycles = _strongly_connected(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_imports_no_framework() -> None:
    offences = []
    for name in MODULES:
        if not name.startswith("services.core"):
            continue
        for imported in imports_of(name):
            top = imported.split(".")[0]
            if top in FRAMEWORKS or (top in HTTP_CLIENTS and name not in HTTP_ALLOWED):
                offences.append(f"{name} imports {imported}")
            outside = imported.startswith("services.") and not imported.startswith("services.core")
            if outside and imported != "services.settings":  # the settings object is shared
                offences.append(f"{name} imports {imported} (outside the core)")
    assert offences == []


def test_a_cycle_and_a_framework_import_are_caught(tmp_path, monkeypatch) -> None:
    """The checks above can fail: two modules importing each other form a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(graph) == [["a", "b", "c"]]
    source = "from services.core import steps\nimport flask\n"
    tree_imports = {a.name for n in ast.walk(ast.parse(source)) for a in getattr(n, "names", [])}
    assert "flask" in tree_imports


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)
