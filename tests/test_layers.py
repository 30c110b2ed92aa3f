"""The architecture, checked from the source: imports only go down the layer order, and no module cycle.

Every `import` counts, at module level, inside functions and under `TYPE_CHECKING` alike: a cycle hidden
behind a lazy import is still a cycle. docs/development.md explains the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer and the layers before it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("mvt_kernels",)),
    ("core", ("export.core", "export")),  # `export` itself: the package's __init__ (its version only)
    ("models", ("export.models",)),
    ("graph", ("export.graph",)),
    ("engine", ("export.engine",)),
    ("runners", ("export.runners",)),
    ("precision", ("export.precision",)),
    ("check", ("export.check",)),
    ("orchestration", ("export.pipeline", "export.variants", "export.torch_side", "export.rebuild",
                       "export.build_engine")),
    ("applications", ("triton_repo", "embed", "parity_tests", "scripts")),
)
SOURCES = ("mvt_kernels", "export", "triton_repo", "embed", "parity_tests", "scripts")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    """{dotted name: file} for every Python file of the product and the scripts (tests/ excluded)."""
    found = {}
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            if "test_" not in path.name and path.name != "conftest.py" and "backend_models" not in path.parts:
                found[module_name(path, root)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (each resolved to the longest known module)."""
    is_pkg = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_pkg else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name:
                    targets.add(prefix)
                    break
    return targets


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names `module`."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"{module} is in no layer; add its package to LAYERS")
    return best


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(path, name, known) for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(source):
                bad.append(f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_only_go_down_the_layers():
    assert upward_imports(graph(ROOT)) == []


def test_no_import_cycle_between_modules():
    assert cycles(graph(ROOT)) == []


def test_the_kernels_package_imports_nothing_of_export():
    edges = graph(ROOT)
    assert not {t for s, ts in edges.items() if s.startswith("mvt_kernels") for t in ts if t.startswith("export")}


def test_clis_are_imported_by_nobody():
    """A CLI module is the top of its stage: what its siblings share lives below it (triton_repo.build imported
    by forms, kserve and modes was the cycle this layout removed)."""
    edges = graph(ROOT)
    clis = ("triton_repo.build", "export.build_engine", "parity_tests.__main__", "embed.__main__", "triton_repo.serve")
    assert {(s, t) for s, ts in edges.items() for t in ts if t in clis} == set()
    assert {"triton_repo.repository", "triton_repo.options"} <= edges["triton_repo.build"]  # relative imports seen


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_an_upward_import_is_caught_even_when_lazy(tmp_path):
    root = _tree(tmp_path, {
        "export/__init__.py": "",
        "export/core/__init__.py": "",
        "export/core/errors.py": "def f():\n    from export.engine.target import probe\n",
        "export/engine/__init__.py": "",
        "export/engine/target.py": "from export.core.errors import f\n",
    })
    edges = graph(root)
    assert upward_imports(edges) == ["export.core.errors (core) imports export.engine.target (engine)"]
    assert cycles(edges) == [["export.core.errors", "export.engine.target"]]


def test_a_type_checking_cycle_is_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "triton_repo/__init__.py": "",
        "triton_repo/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "triton_repo/b.py": "from triton_repo import a\n",
    })
    edges = graph(root)
    assert upward_imports(edges) == []
    assert cycles(edges) == [["triton_repo.a", "triton_repo.b"]]
