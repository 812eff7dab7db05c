"""The layers a reader can name: ``ctapp`` at the bottom, ``training`` and
``pages`` on top of it; no import running back down-up, no two modules that
import each other (directly or round a longer circle), no file too long to read.

Imports are read from the source (ast), so an import inside a function counts
as much as one at the top of a file."""
import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("ctapp", "training", "pages")
MAX_LINES = 600


def module_files() -> dict[str, Path]:
    """Module name -> file, for every Python file of the three packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``path`` (module ``name``) imports."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from . import x, from ..x import y
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *([base] if base else [])])
            # "from package import name" imports the submodule when there is one of that name
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c of a module a.b: a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    """The checks below are only as good as the reader: absolute, relative, submodule and lazy imports."""
    source = tmp_path / "mod.py"
    source.write_text("import ctapp.models\nfrom . import checkpoint\nfrom .data import DatasetError\n"
                      "from ctapp import __version__\nimport numpy\n"
                      "def later():\n    from training.fit import run\n")
    known = {"ctapp", "ctapp.models", "ctapp.checkpoint", "ctapp.data", "ctapp.mod", "training.fit"}
    assert imported_modules("ctapp.mod", source, known) == {"ctapp.models", "ctapp.checkpoint", "ctapp.data",
                                                            "ctapp", "training.fit"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    assert len(graph) > 40 and graph["training.fit"]  # the tree was read
    assert cycles(graph) == []


def test_the_core_imports_neither_training_nor_the_pages():
    upward = {name: sorted(m for m in imports if m.split(".")[0] in ("training", "pages"))
              for name, imports in import_graph().items() if name.split(".")[0] == "ctapp"}
    assert {name: found for name, found in upward.items() if found} == {}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


TRAINING_LAYERS = {"training.fit": 3,  # the command line
                   "training.single_split": 2, "training.crossval": 2,  # the two runs
                   "training.trainer": 1,  # one model's epochs and checkpoints
                   "training.card": 0, "training.engine": 0}  # the model card; one epoch


def test_training_is_layered_cli_over_run_over_card_and_loop():
    """Whatever a layer imports, directly or through helpers of its own, lies in a lower layer."""
    graph = import_graph()
    assert set(TRAINING_LAYERS) <= set(graph)
    upward = {module: sorted(m for m in reachable(graph, module) if TRAINING_LAYERS.get(m, -1) >= level)
              for module, level in TRAINING_LAYERS.items()}
    assert {module: found for module, found in upward.items() if found} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_file_is_longer_than_a_reader_can_hold(package):
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines())
               for path in (ROOT / package).glob("*.py")}
    assert lengths and {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
