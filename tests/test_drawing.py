"""The drawing widget's Python half, without a browser: a picture's data URL in, the answer out;
the widget answers each picture and number it is sent; in Colab it turns on Colab's widget
manager; where no widget can run, it is one line of text, and a notebook cell that shows it passes
nbval with its saved output."""
import ast
import base64
import json
import subprocess
import sys
import types
from functools import partial

import anywidget
import pytest

import drawing
import drawn
import inference
import pictures
from conftest import ROOT


def data_url(png: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(png).decode()


def test_a_drawn_digit_is_answered_as_plain_data(trained):
    item = drawn.drawn_digits(8, seed=0)[7]  # a 7
    answer = drawing.answer_picture(trained[0], data_url(item.png), 5)
    assert json.loads(json.dumps(answer)) == answer
    assert set(answer) == {"status", "line", "picture", "digit_probs", "digit", "number", "total"}
    assert (answer["digit"], answer["number"], answer["total"], answer["status"]) == (7, 5, 12, "sure")
    assert answer["line"].startswith("digit 7 (") and answer["line"].endswith("7 + 5 = 12")
    assert len(answer["digit_probs"]) == 10 and abs(sum(answer["digit_probs"]) - 1) < 1e-3
    framed = pictures.read_image("framed.png", base64.b64decode(answer["picture"].split(",")[1]))
    assert framed.size == (28, 28) and framed.mode == "L" and framed.getpixel((0, 0)) == 0  # white on black


def test_the_answer_follows_the_project_s_one_rule(trained):
    """The widget's words are `inference.Answer`'s: the line the command line prints, and its "sure"."""
    model, framing = trained[0], partial(pictures.frame_digit, drawing=True)
    for item in drawn.drawn_digits(10, seed=2):
        expected = inference.answer(model, item.picture, 3, framing)
        answer = drawing.answer_picture(model, data_url(item.png), 3)
        assert answer["line"] == str(expected) and answer["status"] == ("sure" if expected.sure else "not sure")


def test_a_blank_canvas_is_no_digit_with_the_reason(trained):
    answer = drawing.answer_picture(trained[0], data_url(drawn.canvas_png([], 10)), 4)
    assert answer["status"] == "no digit" and answer["line"].startswith("no ink found")
    assert set(answer) == {"status", "line"}


def test_a_tall_1_at_the_edge_is_read_as_a_drawing_and_refused_as_a_photo(trained):
    line = drawn.canvas_png([[(140, 0), (140, 279)]], 12)  # top edge to bottom edge
    assert drawing.answer_picture(trained[0], data_url(line), 2)["digit"] == 1
    assert drawing.answer_picture(trained[0], data_url(line), 2, drawing=False)["status"] == "no digit"


@pytest.mark.parametrize("bad, message", [
    (b"not a data url", "data URL"), ("data:text/plain;base64,aGk=", "data URL"),
    ("data:image/png;base64,%%%", "base64"), ("data:image/png;base64,aGVsbG8=", "cannot read 'the drawing'"),
])
def test_a_picture_that_cannot_be_read_gets_one_clear_error(trained, bad, message):
    with pytest.raises(ValueError, match=message):
        drawing.answer_picture(trained[0], bad, 1)


def test_a_wrong_number_gets_one_clear_error(trained):
    with pytest.raises(ValueError, match="0..9"):
        drawing.answer_picture(trained[0], data_url(drawn.drawn_digits(1)[0].png), 10)
    with pytest.raises(Exception, match="should not be greater than 9"):
        drawing.pad(trained[0], 10)


def test_the_widget_answers_each_picture_and_number(trained):
    """What the browser sets, the widget answers: a drawing, a new number, a cleared canvas, a
    photo (the photo's rules), and a picture it cannot read (one line, no exception)."""
    pad = drawing.pad(trained[0], 3)
    assert pad.number == 3 and pad.answer == {} and isinstance(pad, anywidget.AnyWidget)
    one = drawn.canvas_png([[(140, 0), (140, 279)]], 12)
    pad.picture = {"url": data_url(one), "photo": False, "id": 1}
    assert (pad.answer["digit"], pad.answer["total"], pad.answer["id"]) == (1, 4, 1)
    pad.number = 8
    assert pad.answer["total"] == 9 and pad.answer["line"].endswith("1 + 8 = 9")
    pad.picture = {"url": data_url(one), "photo": True, "id": 2}
    assert pad.answer["status"] == "no digit" and pad.answer["id"] == 2
    pad.picture = {"url": "data:image/png;base64,aGVsbG8=", "photo": False, "id": 3}
    assert pad.answer["status"] == "error" and "cannot read" in pad.answer["line"]
    pad.picture = {}
    assert pad.answer == {}
    assert {drawing.pad(trained[0]).number for _ in range(200)} == set(range(10))  # a random number (misses one: 1e-8)


def test_where_no_widget_runs_it_is_one_line_and_nbval_compares_only_that(trained):
    """GitHub's page and a plain run show a widget's text/plain; nbval compares it and skips
    the widget's own key (its model id is random), so the saved line is all that must match."""
    pad = drawing.pad(trained[0], 3)
    assert repr(pad) == str(pad) == drawing.NO_WIDGET and "\n" not in drawing.NO_WIDGET
    data, metadata = pad._repr_mimebundle_()
    assert set(data) == {"text/plain", "application/vnd.jupyter.widget-view+json"}
    assert data["text/plain"] == drawing.NO_WIDGET and metadata == {}
    hint = ast.parse(drawing.NO_WIDGET.split("file: ")[1], mode="eval")  # the line's code is Python
    assert isinstance(hint.body, ast.Call) and "inference.answer" in drawing.NO_WIDGET


def test_in_colab_the_widget_turns_on_colab_s_widget_manager(trained, monkeypatch):
    """anywidget turns on Colab's custom widget manager when `google.colab.output` is imported,
    as it is in every Colab kernel: a stand-in records the call."""
    calls = []
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: calls.append("enabled")
    output._widgets = types.SimpleNamespace(_installed_url="https://colab.example/manager.js")
    google = types.ModuleType("google")
    google.colab = types.ModuleType("google.colab")
    google.colab.output = output
    for name, module in (("google", google), ("google.colab", google.colab), ("google.colab.output", output)):
        monkeypatch.setitem(sys.modules, name, module)
    from anywidget import _util
    _util.enable_custom_widget_manager_once.cache_clear()  # once a process, and other tests may have run it
    pad = drawing.pad(trained[0], 2)
    data, metadata = pad._repr_mimebundle_()
    assert calls == ["enabled"]
    assert metadata[_util._WIDGET_MIME_TYPE]["colab"]["custom_widget_manager"]["url"].endswith("manager.js")
    assert data["text/plain"] == drawing.NO_WIDGET
    _util.enable_custom_widget_manager_once.cache_clear()


def test_a_cell_showing_the_widget_passes_nbval_and_does_not_wait(tmp_path):
    """A notebook whose cell shows the widget, executed and saved as the notebooks are (its
    output: the widget's view and its one line), then checked by nbval in a fresh kernel, where no
    browser will ever draw: it passes, and nothing waits."""
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    setup = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport drawing, helpers as h\nmodel = h.new_model(0)"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup),
                                               nbformat.v4.new_code_cell("drawing.pad(model)")])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    saved = notebook.cells[1].outputs
    assert len(saved) == 1 and saved[0]["data"]["text/plain"] == drawing.NO_WIDGET
    nbformat.write(notebook, tmp_path / "cell.ipynb")
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-q", "-p",
                          "no:cacheprovider", "cell.ipynb"],
                         check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:]
