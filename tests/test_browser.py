"""The drawing widget's JavaScript in a real browser. Headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver, so nothing is downloaded) loads the very `_esm` and `_css`
that `drawing.py` ships, as anywidget loads them, with a stand-in for anywidget's model. Pointer
events draw with a mouse and with a finger; the pictures the widget sends are read by the Python
half and the tests' model. The webcam is Chromium's fake camera, playing a made-up video of a
digit on paper. The screen has 2 pixels per CSS pixel, as a phone's or a laptop's.

Without Chromium and chromedriver these tests skip, saying why; with CI=true they fail instead
(`.ci/run` installs them)."""
import base64
import functools
import http.server
import io
import json
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

import drawing
import drawn

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # requirements-dev.txt has it; without it, the tests skip or fail below
    webdriver = None

SIDE = drawn.CANVAS  # the canvas's CSS size, px
HARNESS = """<!doctype html><meta charset="utf-8"><title>drawing.py's widget</title>
<style>body { margin: 16px; background: #fff; }\n%(css)s</style>
<div id="widget"></div>
<script type="module">
// A stand-in for anywidget's model: what the widget sets and saves is kept in `sent`;
// `receive` is Python's answer arriving.
class Model {
  constructor(state) { this.state = state; this.handlers = {}; this.pending = {}; this.sent = []; }
  get(name) { return this.state[name]; }
  set(name, value) { this.state[name] = value; this.pending[name] = value; this.emit(name); }
  save_changes() { this.sent.push({ ...this.pending, at: performance.now() }); this.pending = {}; }
  on(event, handler) { (this.handlers[event] ||= []).push(handler); }
  off(event, handler) { this.handlers[event] = (this.handlers[event] || []).filter((h) => h !== handler); }
  emit(name) { for (const handler of this.handlers["change:" + name] || []) handler(); }
  receive(name, value) { this.state[name] = value; this.emit(name); }
}
const source = URL.createObjectURL(new Blob([%(esm)s], { type: "text/javascript" }));
const widget = (await import(source)).default;  // as anywidget loads _esm
window.model = new Model({ number: 3, picture: {}, answer: {} });
window.cleanup = widget.render({ model: window.model, el: document.getElementById("widget") });
window.ready = true;
</script>
"""


def _browser_or_skip():
    """Chromium and chromedriver's paths, and Selenium; or a skip that says what is missing
    (a failure with CI=true)."""
    missing = ["selenium (pip install -r requirements-dev.txt)"] if webdriver is None else []
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    missing += [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
    if missing:
        why = f"no {', '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, and {why}")
        pytest.skip(why)
    return browser, driver


def y4m_of_a_digit_on_paper(path, style="7 plain"):
    """A two-frame 640 x 480 video (YUV4MPEG2, 4:2:0, grey) of a digit written on paper, for
    Chromium's fake camera: slightly grey, unevenly lit paper with two faint ruled lines, the
    digit 200 px tall in dark ink in the middle, a little blur and sensor noise."""
    rng = np.random.default_rng(0)
    curves = drawn.strokes(style, 16, "large", "centre", rng)
    cover = np.asarray(drawn.Drawn(drawn.canvas_png(curves, 16), *[None] * 7).picture)[..., 3] / 255
    cover = np.asarray(Image.fromarray((255 * cover).astype(np.uint8)).resize((224, 224)), np.float32) / 255
    x = np.linspace(0, 1, 640)[None, :]
    paper = np.repeat(205 + 25 * x, 480, axis=0)  # light falling off to the left
    paper[150:152] -= 25
    paper[340:342] -= 25
    paper[128:352, 208:432] += (45 - paper[128:352, 208:432]) * cover
    frames = []
    for _ in range(2):
        luma = np.asarray(Image.fromarray(paper.clip(0, 255).astype(np.uint8)).resize((640, 480)), np.float32)
        luma = (luma + rng.normal(0, 3, luma.shape)).clip(0, 255).astype(np.uint8)
        frames.append(b"FRAME\n" + luma.tobytes() + bytes([128]) * (2 * 320 * 240))
    path.write_bytes(b"YUV4MPEG2 W640 H480 F30:1 Ip A1:1 C420jpeg\n" + b"".join(frames))
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The harness page, served on 127.0.0.1 (a secure context, as Colab's https is)."""
    folder = tmp_path_factory.mktemp("site")
    esm, css = drawing.DigitPad._esm, drawing.DigitPad._css
    (folder / "index.html").write_text(HARNESS % {"esm": json.dumps(str(esm)), "css": str(css)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/index.html"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with 2 device pixels per CSS pixel and a fake camera."""
    chromium, chromedriver = _browser_or_skip()
    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--force-device-scale-factor=2", "--window-size=900,700",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={y4m_of_a_digit_on_paper(folder / 'seven.y4m')}",
                 f"--user-data-dir={folder / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, site):
    """The widget, freshly rendered."""
    browser.get(site)
    WebDriverWait(browser, 10).until(lambda driver: driver.execute_script("return window.ready === true"))
    return browser


def find(page, name):
    return page.find_element(By.CSS_SELECTOR, name)


def set_pen(page, width: int):
    page.execute_script("const pen = document.querySelector('.dp-pen'); pen.value = arguments[0];"
                        "pen.dispatchEvent(new Event('input'));", width)


def stroke(page, points, kind="mouse", pause_ms=0):
    """One stroke through `points` (canvas px), with a mouse or a finger (touch pointer events)."""
    pointer = PointerInput(interaction.POINTER_TOUCH if kind == "touch" else interaction.POINTER_MOUSE, kind)
    actions = ActionBuilder(page, mouse=pointer, duration=pause_ms)
    canvas = find(page, ".dp-canvas")
    for index, (x, y) in enumerate(np.round(points).astype(int).tolist()):
        actions.pointer_action.move_to(canvas, x - SIDE // 2, y - SIDE // 2)  # from the canvas's centre
        if index == 0:
            actions.pointer_action.pointer_down()
    actions.pointer_action.pointer_up()
    actions.perform()


def draw(page, curves, pen: int, kind: str):
    set_pen(page, pen)
    for curve in curves:
        stroke(page, drawn.resampled(np.asarray(curve, float), 6), kind)


def pictures_sent(page) -> list[dict]:
    return page.execute_script("return window.model.sent.filter((m) => 'picture' in m).map((m) => m.picture)")


def last_picture(page) -> dict:
    WebDriverWait(page, 5).until(pictures_sent)
    return pictures_sent(page)[-1]


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def answer_in_page(page, model, picture: dict) -> dict:
    """The Python half's answer to a picture the widget sent, sent back to the widget, as the
    widget's `_read` does."""
    answer = drawing.answer_picture(model, picture["url"], page.execute_script("return window.model.get('number')"),
                                    drawing=not picture["photo"])
    page.execute_script("window.model.receive('answer', arguments[0])", {**answer, "id": picture["id"]})
    return answer


CASES = {  # style, pen, size, pointer
    "1, thick, large, mouse": ("1 plain", 24, "large", "mouse"),
    "1 with a flag, thin, small, touch": ("1 flag", 4, "small", "touch"),
    "7, thin, small, touch": ("7 plain", 4, "small", "touch"),
    "7 with a bar, thick, large, mouse": ("7 bar", 26, "large", "mouse"),
    "0, thin, large, touch": ("0 oval", 5, "large", "touch"),
    "0, thick, small, mouse": ("0 round", 14, "small", "mouse"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_drawn_digit_is_sent_and_read_right(page, trained, case):
    style, pen, size, kind = CASES[case]
    draw(page, drawn.strokes(style, pen, size, "anywhere", np.random.default_rng(len(case))), pen, kind)
    picture = last_picture(page)
    assert picture["photo"] is False and decoded(picture["url"]).size == (SIDE, SIDE)
    answer = answer_in_page(page, trained[0], picture)
    assert answer["digit"] == int(style[0]) and answer["total"] == int(style[0]) + 3, answer["line"]


@pytest.mark.parametrize("pen, kind, start, end", [(6, "mouse", 0, SIDE - 1), (28, "touch", 1, SIDE + 30),
                                                   (12, "touch", -1, SIDE - 1)])
def test_a_tall_1_from_edge_to_edge_is_never_refused(page, trained, pen, kind, start, end):
    """From the canvas's top edge (or its frame, just above) to its bottom edge (or on past it:
    the pointer is captured), with a mouse or a finger: a drawing, not a ruled line."""
    set_pen(page, pen)
    stroke(page, [(150, start), (146, (start + end) / 2), (142, end)], kind)
    picture = last_picture(page)
    ink = np.asarray(decoded(picture["url"]))[..., 3] > 128
    assert ink[0].any() and ink[-1].any()  # it touches both edges
    answer = answer_in_page(page, trained[0], picture)
    assert answer["status"] != "no digit" and answer["digit"] == 1, answer["line"]


def test_pictures_go_while_drawing_and_when_the_pen_lifts(page):
    """A slow stroke sends a picture every 200 ms or so, and one more when the pen lifts; the
    backing store is crisp (2 pixels a CSS pixel) but the picture is the canvas's CSS size."""
    assert page.execute_script("return window.devicePixelRatio") == 2
    assert page.execute_script("return document.querySelector('.dp-canvas').width") == 2 * SIDE
    set_pen(page, 18)
    stroke(page, [(60 + 8 * step, 140) for step in range(20)], "mouse", pause_ms=50)  # about a second
    sent = pictures_sent(page)
    times = page.execute_script("return window.model.sent.map((m) => m.at)")
    assert len(sent) >= 3 and min(np.diff(times)[:-1]) >= 190, np.diff(times)  # the last: the pen lifts
    assert [picture["id"] for picture in sent] == list(range(1, len(sent) + 1))
    assert all(decoded(picture["url"]).size == (SIDE, SIDE) for picture in sent)
    last = np.asarray(decoded(sent[-1]["url"]))
    assert last[140, 60:210, 3].min() == 255 and last[0, 0, 3] == 0  # the whole stroke, on a transparent page


def test_clear_and_a_new_number(page):
    set_pen(page, 12)
    stroke(page, [(140, 60), (140, 220)])
    find(page, ".dp-clear").click()
    assert pictures_sent(page)[-1] == {}  # Python answers nothing
    shown = [find(page, ".dp-n").text]
    for _ in range(5):
        find(page, ".dp-new").click()
        shown.append(find(page, ".dp-n").text)
        assert shown[-1] == str(page.execute_script("return window.model.get('number')"))
    assert shown[0] == "3" and all(new != old for old, new in zip(shown, shown[1:])), shown


def test_the_answer_is_shown(page, trained, tmp_path):
    """The 28 x 28 picture enlarged with crisp pixels, the sum and the status, the line, and ten
    bars, the highest marked."""
    draw(page, drawn.strokes("7 plain", 18, "large", "centre", np.random.default_rng(1)), 18, "mouse")
    answer = answer_in_page(page, trained[0], last_picture(page))
    assert answer["status"] == "sure" and find(page, ".dp-sum").text == f"7 + 3 = {answer['total']}"
    assert find(page, ".dp-status").text == answer["status"] and find(page, ".dp-line").text == answer["line"]
    assert page.execute_script("return getComputedStyle(document.querySelector('.dp-framed')).imageRendering") == "pixelated"
    assert find(page, ".dp-framed").size == {"width": 112, "height": 112}
    bars = page.execute_script("return [...document.querySelectorAll('.dp-bar')].map((b) => "
                               "[b.classList.contains('top'), b.querySelector('.dp-fill').style.width])")
    assert len(bars) == 10 and [top for top, _ in bars].index(True) == 7
    page.save_screenshot(str(tmp_path / "drawn.png"))


def test_a_webcam_picture_of_a_digit_on_paper_is_read(page, trained, tmp_path):
    """Chromium's fake camera plays a 7 written on ruled paper; the picture taken is the
    square in the middle, sent as a photo, and read by the photo's rules."""
    find(page, ".dp-camera").click()
    WebDriverWait(page, 10).until(lambda driver: driver.execute_script(
        "const v = document.querySelector('.dp-video'); return !v.hidden && v.readyState >= 2 && v.videoWidth > 0"))
    assert find(page, ".dp-camera").text == "Stop camera"
    page.save_screenshot(str(tmp_path / "camera.png"))
    find(page, ".dp-take").click()
    picture = last_picture(page)
    assert picture["photo"] is True and decoded(picture["url"]).size == (480, 480)
    answer = answer_in_page(page, trained[0], picture)
    assert answer["digit"] == 7 and answer["status"] != "no digit", answer["line"]
    find(page, ".dp-camera").click()
    assert page.execute_script("return document.querySelector('.dp-video').srcObject") is None
    assert find(page, ".dp-note").text == "Draw a digit with the mouse or a finger."


@pytest.mark.parametrize("without, message", [
    ("navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('denied', 'NotAllowedError'))",
     "No camera: the browser refused it: allow the camera for this page, then try again."),
    ("navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('none', 'NotFoundError'))",
     "No camera: none was found."),
    ("Object.defineProperty(navigator, 'mediaDevices', { value: undefined })",
     "No camera here: this browser offers none to this page (it needs https)."),
], ids=["refused", "none", "insecure page"])
def test_without_a_camera_one_line_says_so(page, without, message):
    page.execute_script(without)
    find(page, ".dp-camera").click()
    WebDriverWait(page, 5).until(lambda driver: find(driver, ".dp-note").text == message)
    assert not find(page, ".dp-video").is_displayed() and not find(page, ".dp-take").is_displayed()
    assert find(page, ".dp-camera").text == "Camera"


def test_a_doubtful_answer_and_no_digit_look_so(page):
    """A "not sure" answer's sum is grey with a question mark; "no digit" shows its reason alone."""
    doubt = {"status": "not sure", "line": "not sure: 1 (62 %) or 7 (30 %)", "digit": 1, "number": 3, "total": 4,
             "digit_probs": [0, 0.62, 0, 0, 0, 0, 0, 0.3, 0.08, 0], "picture": "data:image/png;base64,"}
    page.execute_script("window.model.receive('answer', arguments[0])", doubt)
    assert find(page, ".dp-sum").text == "1 + 3 = 4 ?" and "doubt" in find(page, ".dp-sum").get_attribute("class")
    assert find(page, ".dp-status").text == "not sure" and find(page, ".dp-bar.top b").text == "1"
    refused = {"status": "no digit", "line": "no digit found: the ink forms a blob or several shapes"}
    page.execute_script("window.model.receive('answer', arguments[0])", refused)
    assert find(page, ".dp-sum").text == "" and find(page, ".dp-line").text == refused["line"]
    assert not find(page, ".dp-framed").is_displayed() and find(page, ".dp-status").text == "no digit"
    assert not page.find_elements(By.CSS_SELECTOR, ".dp-bar.top")
