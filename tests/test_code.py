"""The code itself: modules by role that import one way, short functions, and notebooks that use
only what the modules offer."""
import ast
import json
import re

import pytest

import benchmark
import helpers
import pictures
import plots
from conftest import ROOT

MODULES = {"pictures": pictures, "helpers": helpers, "plots": plots, "benchmark": benchmark}
# Who may import whom: each module only the ones before it, so no two import each other.
LAYERS = {"pictures": set(), "helpers": {"pictures"}, "plots": {"helpers", "pictures"},
          "benchmark": {"helpers"}}
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))


def tree(name):
    return ast.parse((ROOT / f"{name}.py").read_text())


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_only_the_layers_below_it(name):
    imported = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported & set(MODULES) == LAYERS[name]


@pytest.mark.parametrize("name", MODULES)
def test_no_module_is_over_1800_lines_nor_any_function_over_50(name):
    assert len((ROOT / f"{name}.py").read_text().splitlines()) <= 1800
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree(name))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 50}
    assert not long, long


def test_the_modules_come_from_one_release():
    assert helpers.__version__ == pictures.__version__ == plots.__version__


def notebook_code(path):
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def module_attributes(code):
    """(alias, name) for each `h.name`, `pictures.name` and `plots.name` the code uses, read from
    its syntax tree, so "plots.py" in a string names a file, not an attribute."""
    return {(node.value.id, node.attr) for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in ("h", "pictures", "plots")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_the_notebooks_use_only_public_names_that_exist(path):
    used = module_attributes(notebook_code(path))
    assert {alias for alias, _ in used} >= {"h"}, "the notebook no longer calls helpers as h"
    modules = {"h": helpers, "pictures": pictures, "plots": plots}
    assert not {(alias, name) for alias, name in used if name.startswith("_") and not name.endswith("__")}
    assert not {(alias, name) for alias, name in used if not hasattr(modules[alias], name)}


def test_every_public_name_serves_something_besides_the_tests():
    """A name only the tests use is private: every public function, class and constant of a
    module is used by another module, a notebook, the command line, or its own module's code."""
    sources = {name: (ROOT / f"{name}.py").read_text() for name in MODULES}
    sources.update({path.name: notebook_code(path) for path in NOTEBOOKS})
    unused = []
    for name in MODULES:
        for node in tree(name).body:
            defined = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
            for public in (d for d in defined if not d.startswith("_")):
                uses = sum(len(re.findall(rf"\b{public}\b", text)) for text in sources.values())
                if uses <= 1:  # its definition alone
                    unused.append(f"{name}.{public}")
    assert not unused, unused
