"""The code itself: short functions, and a notebook that uses only what helpers.py offers."""
import ast
import json
import re

import helpers
from conftest import ROOT


def test_no_function_in_helpers_is_over_50_lines():
    tree = ast.parse((ROOT / "helpers.py").read_text())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 50}
    assert not long, long


def test_the_notebook_uses_only_public_names_that_exist():
    cells = json.loads((ROOT / "Assignment3.ipynb").read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    used = set(re.findall(r"\bh\.([A-Za-z_]\w*)", code))
    assert used, "the notebook no longer calls helpers as h"
    assert not {name for name in used if name.startswith("_") and not name.endswith("__")}
    assert not {name for name in used if not hasattr(helpers, name)}
