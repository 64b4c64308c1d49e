"""The package's shape: every import, function-local and TYPE_CHECKING ones included, points down the
layers (shm -> stages -> pipeline.observe -> pipeline.runtime -> pipeline.cli -> bench), no two modules
import each other even through others, and shm needs nothing but numpy and the standard library.

Read from the source with ast, so a cycle hidden inside a function body counts as much as one at the top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder in the repository -> the package it installs as (pyproject.toml's package-dir)
PACKAGE_DIRS = {"shm": "rtpipe.shm", "stages": "rtpipe.stages", "pipeline": "rtpipe.pipeline", "bench": "rtpipe.bench"}
# lowest first: a module may import its own layer and the ones before it, never one after
LAYERS = [
    "rtpipe.shm",
    "rtpipe.stages",
    "rtpipe.pipeline.observe",
    "rtpipe.pipeline.runtime",
    "rtpipe.pipeline.cli",
    "rtpipe.bench",
]


def discover_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = discover_modules()
# C extensions, built from a .c file beside the modules
EXTENSIONS = {"rtpipe.shm._futex"}


def imported_names(path: Path, module: str) -> set[str]:
    """Every module `module` imports, anywhere in its body, resolved to absolute names."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from package import submodule` needs the submodule (the package's __init__ runs for any
            # submodule, so it is no edge of its own); `from module import name`, the module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                names.add(submodule if submodule in MODULES or submodule in EXTENSIONS else origin)
    return names


def project_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        imported = imported_names(path, module)
        # `from rtpipe.stages import x` where x is a submodule needs only the submodule, not the package
        graph[module] = {name for name in imported if name in MODULES and name != module}
    return graph


def layer_of(module: str) -> int:
    best = -1
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = index
    if best < 0:  # a package's own __init__ above its layers (rtpipe.pipeline): the highest it holds
        best = max(i for i, prefix in enumerate(LAYERS) if prefix.startswith(module + "."))
    return best


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
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
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_modules_are_found():
    assert "rtpipe.shm.ring" in MODULES and "rtpipe.pipeline.runtime.supervisor" in MODULES
    assert "rtpipe.pipeline.cli.main" in MODULES and "rtpipe.bench.pipeline" in MODULES


def test_no_module_imports_itself_back_through_others():
    cycles = [group for group in strongly_connected(project_graph()) if len(group) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_every_import_points_down_the_layers():
    upward = [
        f"{module} -> {name}"
        for module, names in project_graph().items()
        for name in sorted(names)
        if layer_of(name) > layer_of(module)
    ]
    assert upward == [], "imports that point upward:\n" + "\n".join(upward)


def test_shm_needs_only_numpy_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"numpy", "rtpipe"}
    foreign = sorted(
        {
            f"{module} -> {name}"
            for module, path in MODULES.items()
            if module.startswith("rtpipe.shm")
            for name in imported_names(path, module)
            if name and name.split(".")[0] not in allowed
        }
    )
    assert foreign == []


def test_stages_and_the_pipeline_never_import_the_benchmarks():
    reach = [
        f"{module} -> {name}"
        for module, names in project_graph().items()
        if not module.startswith("rtpipe.bench")
        for name in names
        if name.startswith("rtpipe.bench")
    ]
    assert reach == []


@pytest.mark.parametrize(
    "module, imported, layer_above",
    [
        ("rtpipe.shm.ring", "rtpipe.stages.base", True),
        ("rtpipe.pipeline.observe.report", "rtpipe.pipeline.runtime.supervisor", True),
        ("rtpipe.pipeline.cli.run", "rtpipe.pipeline.runtime.config", False),
    ],
)
def test_the_layer_check_itself_sees_an_upward_import(module, imported, layer_above):
    assert (layer_of(imported) > layer_of(module)) is layer_above


def test_the_cycle_check_itself_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [group for group in strongly_connected(graph) if len(group) > 1] == [["a", "b", "c"]]
