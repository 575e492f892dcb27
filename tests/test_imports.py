"""The package's import graph: no module imports one that imports it back, and `import jaxgpt` loads nothing."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxgpt"


def import_graph() -> dict[str, set[str]]:
    """module -> the jaxgpt modules it imports (read from the source, nothing is run)."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxgpt"):
                for alias in node.names:  # `from jaxgpt import data` imports the module jaxgpt.data
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("jaxgpt")}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append(path[path.index(dep):] + [dep])
            else:
                walk(dep, path + [dep])

    for start in graph:
        walk(start, [start])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"jaxgpt.model", "jaxgpt.training", "jaxgpt.convert.nanogpt"} <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})


def test_the_lecture_modules_need_no_training_machinery():
    graph = import_graph()

    def reachable(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    heavy = {"jaxgpt.training", "jaxgpt.checkpoint", "jaxgpt.config", "jaxgpt.convert"}
    for module in ("jaxgpt.attention", "jaxgpt.model", "jaxgpt.sampling", "jaxgpt.train_step"):
        assert not reachable(module) & heavy, module


@pytest.mark.slow
def test_import_jaxgpt_loads_no_submodule_until_a_name_is_used():
    code = ("import sys, jaxgpt; before = sorted(m for m in sys.modules if m.startswith('jaxgpt.')); "
            "jaxgpt.GPTConfig; after = 'jaxgpt.model' in sys.modules; "
            "print(before, after, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split()
    assert out == ["[]", "True", "True"]
