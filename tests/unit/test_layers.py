"""The architecture, checked from the code's own imports: dependencies run one way, down the layers, and no
module imports itself back through a circle.

The layer order is written here once (and described in docs/design.md). A package may import packages of lower
layers only, never one of its own layer or above; every `import` counts, also one inside a function (a lazy
import still makes the lower layer depend on the higher one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS: tuple[tuple[str, ...], ...] = (
    ("foundation",),                                               # errors, config base, flags, version
    ("schemas",),                                                  # the contracts every part shares
    ("model_runtime", "message_bus", "feature_store", "model_registry"),  # platform: models, Kafka, SQL, MLflow
    ("serving", "shadow_scoring", "nightly_train"),                # the parts; no part imports another
    ("dags",),                                                     # the thin Airflow DAG over nightly_train
    ("shadow_distill",),                                           # application shell: CLI, demo, local stack
)
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYER_OF for p in (ROOT / pkg).rglob("*.py")}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:  # `from pkg.mod import func` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        src_pkg = src.split(".")[0]
        for dst in targets:
            dst_pkg = dst.split(".")[0]
            if dst_pkg != src_pkg and LAYER_OF[dst_pkg] >= LAYER_OF[src_pkg]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_project_package_has_a_layer():
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests", "bench"}
    assert top_level <= set(LAYER_OF), f"packages without a layer: {sorted(top_level - set(LAYER_OF))}"


def test_foundation_imports_nothing_of_the_project():
    graph = import_graph()
    outside = sorted(f"{src} -> {dst}" for src, targets in graph.items() if src.startswith("foundation")
                     for dst in targets if not dst.startswith("foundation"))
    assert outside == []


def test_no_import_runs_up_or_across_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder_on_hand_made_graphs(graph, expected):
    assert cycles(graph) == expected


def test_upward_import_is_reported():
    graph = {"schemas.trajectory": {"serving.config"}, "serving.config": {"schemas.trajectory"}}
    assert upward_imports(graph) == ["schemas.trajectory -> serving.config"]


def test_part_importing_another_part_is_reported():
    assert upward_imports({"serving.engine": {"nightly_train.losses"}}) == ["serving.engine -> nightly_train.losses"]
