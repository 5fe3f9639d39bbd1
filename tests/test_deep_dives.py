"""DeepDives.ipynb runs a section at a time: each after the shared set-up alone, with nothing that
an earlier section made. (nbval runs the notebook top to bottom and compares its outputs.)"""
import json
import re

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "DeepDives.ipynb"
# Run after the set-up, then before each section: the names the set-up made are all a section may use.
KEEP = "_setup_names = {name for name in globals() if not name.startswith('_')}"
FORGET = ("for _name in [name for name in globals() if not name.startswith('_') and name not in _setup_names]:\n"
          "    del globals()[_name]")


def sections(notebook=NOTEBOOK):
    """(the set-up's cells, {section title: its cells}), split at the '## N.' headings."""
    cells = nbformat.reads(notebook.read_text(), as_version=4).cells
    setup, parts, title = [], {}, None
    for cell in cells:
        heading = re.search(r"^## (\d+\. .*)$", cell.source, re.MULTILINE) if cell.cell_type == "markdown" else None
        if heading:
            title = heading[1]
            parts[title] = []
        if cell.cell_type == "code":
            (parts[title] if title else setup).append(cell.source)
    return setup, parts


def test_the_notebook_has_a_set_up_and_sections():
    setup, parts = sections()
    assert len(setup) == 2 and len(parts) >= 5 and all(parts.values())


def test_each_section_runs_alone_after_the_shared_set_up():
    setup, parts = sections()
    sources = [*setup, KEEP]
    owner = []  # the section of each cell, to name a failure
    for title, cells in parts.items():
        sources += [FORGET, *cells]
        owner += [title] * (len(cells) + 1)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    NotebookClient(notebook, timeout=1800, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    failed = {}
    for index, cell in enumerate(notebook.cells):
        for output in cell.outputs:
            if output.output_type == "error":
                where = "the set-up" if index < len(setup) + 1 else owner[index - len(setup) - 1]
                failed.setdefault(where, f"{output.ename}: {output.evalue}")
    assert not failed, json.dumps(failed, indent=1)
