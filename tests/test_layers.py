"""The house rules, read from the code's own imports (every `import` statement, those inside functions too).

    .venv/bin/python -m pytest tests/test_layers.py -q      # a second, no torch needed

1. Rooms of rcm_core import only the rooms below them (README "Architecture"):
   config → networks, parallel, data → method → eval → run.
2. Only workflows/ imports ray or mlflow; kernels/ imports nothing of the project; nothing below workflows imports it.
3. No import circles anywhere in the project's source (rcm_core, kernels, workflows, cluster, experiments).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("rcm_core", "kernels", "workflows", "cluster", "experiments")

# room -> the rooms (besides itself) it may import. `config` is the dataclass schema every room reads.
ALLOWED = {
    "config": set(),
    "networks": {"config"},
    "parallel": {"config"},
    "data": {"config"},
    "method": {"config", "networks", "parallel", "data"},
    "eval": {"config", "networks", "method", "data"},
    "run": {"config", "networks", "parallel", "data", "method", "eval"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_FOLDERS for p in (REPO / d).rglob("*.py"))


def imported_modules(path: Path, known: set[str] | None = None) -> set[str]:
    """Every module an `import` or `from … import` names. `from pkg import mod` counts as `pkg.mod` alone when
    `pkg.mod` is one of the `known` modules (Python runs pkg/__init__ for every submodule: no file-to-file tie)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = {f"{base}.{a.name}" for a in node.names}
            found.update(names)
            if known is None or not names <= known:
                found.add(base)
    return found


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules of ours are dropped)."""
    modules = {module_name(p): p for p in source_files()}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imported_modules(path, set(modules)) if m in modules and m != name}
    return graph


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rcm_core" or len(parts) < 2:
        return None
    return parts[1]


def test_every_rcm_core_module_is_in_a_room():
    rooms = {room_of(m) for m in project_graph() if m.startswith("rcm_core.")}
    assert rooms <= set(ALLOWED), f"modules outside the known rooms: {sorted(rooms - set(ALLOWED))}"


def test_rooms_import_only_rooms_below_them():
    bad = []
    for module, targets in project_graph().items():
        room = room_of(module)
        if room is None:
            continue
        for target in targets:
            other = room_of(target)
            if other is not None and other != room and other not in ALLOWED[room]:
                bad.append(f"{module} ({room}) imports {target} ({other})")
    assert not bad, "imports that point up:\n" + "\n".join(sorted(bad))


def test_only_workflows_import_ray_or_mlflow():
    bad = []
    for path in source_files():
        top = module_name(path).split(".")[0]
        if top in ("workflows", "cluster", "experiments"):
            continue
        for m in imported_modules(path):
            if m.split(".")[0] in ("ray", "mlflow", "workflows", "cluster", "experiments"):
                bad.append(f"{module_name(path)} imports {m}")
            if top == "kernels" and m.split(".")[0] == "rcm_core":
                bad.append(f"{module_name(path)} imports {m}")
    assert not bad, "\n".join(sorted(bad))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    # A package importing its own submodules (`__init__` re-exports) is not a circle of files unless a
    # submodule imports the package back, which the graph shows as an edge to the package's name.
    assert find_cycles(project_graph()) == []


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder_finds_known_circles(graph, expected):
    assert find_cycles(graph) == expected


def test_import_reader_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The loop ↔ pipeline circle this test replaced ran through an import inside a function body."""
    f = REPO / "rcm_core" / "run" / "loop.py"
    lazy = "def f():\n    from rcm_core.run.pipeline import cli_main\n"
    monkeypatch.setattr(Path, "read_text", lambda self: lazy if self == f else Path.read_bytes(self).decode())
    assert "rcm_core.run.pipeline" in imported_modules(f)
