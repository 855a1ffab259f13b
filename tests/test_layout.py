"""The package layout follows the pipeline: no module imports a later stage, and no import
cycle exists (imports inside functions count too). The stages are those of
docs/architecture.md; a module's stage is that of its longest listed prefix."""

import ast
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"

STAGES = {
    "winnow._version": 0,
    "winnow.options": 0,
    "winnow.devices": 0,
    "winnow.io": 0,
    "winnow.core": 1,
    "winnow.data": 2,
    "winnow.models": 2,
    "winnow.inputs": 2,
    "winnow.training": 3,
    "winnow.resumable": 3,
    "winnow.distributed": 3,
    "winnow.criteria": 4,
    "winnow.schedules": 5,
    "winnow.structured": 6,
    "winnow.regularizers": 6,
    "winnow.variational": 6,
    "winnow.bayesian": 6,
    "winnow.neurons": 6,
    "winnow.analysis": 6,
    "winnow.layerwise": 6,
    "winnow.formats": 7,
    "winnow.inference": 7,
    "winnow.experiments": 8,
    "winnow.cli": 9,
    "winnow": 10,  # the facade: nothing inside the package imports it
}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name."""
    found = {}
    for path in sorted((root / "winnow").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at top level or inside functions)."""
    known = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                candidates = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
                ]
            else:
                continue
            for candidate in candidates:
                if candidate == "winnow" or candidate.startswith("winnow."):
                    target = resolve(candidate)
                    if target and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def stage(module: str) -> int:
    prefix = module
    while prefix not in STAGES:
        prefix = prefix.rpartition(".")[0]
    return STAGES[prefix]


def backwards(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module of one stage to a module of a later stage."""
    return sorted(
        f"{source} (stage {stage(source)}) imports {target} (stage {stage(target)})"
        for source, targets in graph.items()
        for target in targets
        if stage(target) > stage(source)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in graph:
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_every_module_has_a_stage():
    for name in modules(SOURCE):
        assert stage(name) >= 0


def test_no_module_imports_a_later_stage():
    assert backwards(imports(SOURCE)) == []


def test_no_import_cycles():
    assert cycles(imports(SOURCE)) == []


@pytest.fixture
def tree(tmp_path):
    """A copy of the package to plant imports in."""
    import shutil

    shutil.copytree(SOURCE / "winnow", tmp_path / "winnow")
    return tmp_path


def test_the_checks_catch_a_backwards_import_and_a_cycle(tree):
    core = tree / "winnow" / "core" / "masks.py"
    core.write_text(
        core.read_text() + "\n\ndef _late():\n    from winnow.experiments import store\n"
    )
    assert backwards(imports(tree)) == [
        "winnow.core.masks (stage 1) imports winnow.experiments.store (stage 8)"
    ]
    io = tree / "winnow" / "io" / "atomic.py"
    io.write_text(io.read_text() + "\nimport winnow.io.container\n")
    assert ["winnow.io.atomic", "winnow.io.container"] in cycles(imports(tree))
