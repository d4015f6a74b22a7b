"""The product's import graph: no module imports itself through others, and layers only import downwards.

The graph is read from the source (every `import` and `from ... import`, also those inside functions, but
not those under `if TYPE_CHECKING:`, which never run), with the folders mapped to their installed names as
pyproject.toml's `package-dir` maps them; networkx finds the cycles.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> dict[str, Path]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every module of the product (the mapped folders do not nest)."""
    modules: dict[str, Path] = {}
    for package, folder in _package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The product modules an import statement loads (a `from package import name` loads the submodule
    `package.name` when there is one, else the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    targets = set()
    for name in names:
        while name and name not in known:  # `import a.b.c` also runs a and a.b; the deepest known counts
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def import_graph() -> nx.DiGraph:
    modules = _modules()
    known = set(modules)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _runtime_imports(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module and not module.startswith(target + "."):  # a package's own parents run first
                    graph.add_edge(module, target)
    return graph


def _external_imports(prefix: str) -> dict[str, set[str]]:
    """Top-level names of third-party packages each module under `prefix` imports at run time."""
    found: dict[str, set[str]] = {}
    for module, path in _modules().items():
        if not (module == prefix or module.startswith(prefix + ".")):
            continue
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.setdefault(module, set()).update(name.split(".")[0] for name in names)
    return found


def test_the_graph_sees_the_whole_product() -> None:
    graph = import_graph()
    for module in ("pagedserve", "pagedserve.engine.core.llm_engine", "pagedserve.engine.runner.model_runner",
                   "pagedserve.cache.block_pool", "pagedserve.serve_app.ingress", "pagedserve.config.engine",
                   "pagedserve.demo.model", "pagedserve.engine.kernels.attention.triton"):
        assert module in graph, module
    assert graph.has_edge("pagedserve.engine.core.llm_engine", "pagedserve.engine.core.scheduler")
    assert graph.has_edge("pagedserve.engine.runner.model_runner", "pagedserve.engine.runner.cuda_graphs")
    assert graph.number_of_edges() > 100


def test_no_import_cycles() -> None:
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*cycle, cycle[0]]) for cycle in cycles[:10])


LAYERS = ("pagedserve.serve_app", "pagedserve.engine", "pagedserve.cache")  # top to bottom


@pytest.mark.parametrize("lower", range(1, len(LAYERS)))
def test_lower_layers_never_import_upper_ones(lower: int) -> None:
    upper = LAYERS[:lower]
    bad = [(a, b) for a, b in import_graph().edges
           if a.startswith(LAYERS[lower] + ".") and any(b == u or b.startswith(u + ".") for u in upper)]
    assert not bad, bad


def test_layers_keep_their_dependencies() -> None:
    """cache/ is pure Python bookkeeping (only sizing may ask torch); engine/ knows neither Ray nor HTTP;
    config/ is below the engine."""
    for module, names in _external_imports("pagedserve.cache").items():
        assert not names & {"torch", "transformers", "ray"} or module == "pagedserve.cache.sizing", (module, names)
    for module, names in _external_imports("pagedserve.engine").items():
        assert not names & {"ray", "fastapi", "starlette", "uvicorn"}, (module, names)
    engine_or_above = ("pagedserve.engine", "pagedserve.serve_app")
    bad = [(a, b) for a, b in import_graph().edges
           if a.startswith("pagedserve.config.") and b.startswith(engine_or_above)]
    assert not bad, bad
