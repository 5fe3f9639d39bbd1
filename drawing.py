"""Draw a digit, or hold one up to the webcam, and the network reads it live.

`pad(model)` gives a widget (anywidget's, so it runs in Colab, JupyterLab and VS Code): a canvas
to draw a digit on with a mouse or a finger, a random number to add to it, and the webcam for a
digit written on paper. As you draw, it shows the 28 x 28 picture that the network reads, the ten
digit probabilities, and the answer with the project's one rule for "sure". Its JavaScript is
inline (`DigitPad._esm`), so this file is all it needs beside ``inference.py`` and ``pictures.py``.
Where no widget can run (GitHub's page, nbval, a plain Python run), it shows one line: how to read
a picture file instead.

`answer_picture` is the Python half, with no browser in it: a picture's data URL in, the answer
out as plain data, ready to send back to the browser.
"""
from __future__ import annotations

import base64
import binascii
import io
import random
import re

import anywidget
import numpy as np
import traitlets

import inference
import pictures

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit

NO_WIDGET = ("Draw a digit here in Colab, JupyterLab or VS Code; elsewhere read a file: "
             "inference.answer(model, pictures.read_image('digit.png'), 7)")
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,")


def _picture_bytes(data_url: str) -> bytes:
    """The file inside a picture's data URL ("data:image/png;base64,..."), or one clear error."""
    head = _DATA_URL.match(data_url) if isinstance(data_url, str) else None
    if head is None:
        raise ValueError(f"expected a picture as a data URL (data:image/png;base64,...), got "
                         f"{str(data_url)[:40]!r}")
    try:
        return base64.b64decode(data_url[head.end():], validate=True)
    except binascii.Error as error:
        raise ValueError(f"the picture's data URL is not valid base64 ({error})") from None


def _png_url(framed) -> str:
    """A framed picture [28, 28] in [0, 1] as a PNG data URL, ink white on black as the network sees it."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray((255 * np.asarray(framed)).round().astype(np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def answer_picture(model, data_url: str, number: int, drawing: bool = True) -> dict:
    """What the network reads in a picture from the browser, and the number added: a dict of
    plain values (JSON), for the widget to show.

    `data_url`: the picture, as a canvas's or a camera frame's `toDataURL` gives it (a
    transparent page counts as white paper). `drawing`: True for a drawing on the blank canvas,
    which has no page (`pictures.preparation_steps`); False for a photo, which keeps the photo's
    rules. Returns "status": "sure", "not sure" or "no digit"; "line": what the command line
    prints (the answer, or why no digit was found); and, unless no digit was found, "picture": the
    28 x 28 picture the network reads (a PNG data URL), "digit_probs" (ten), "digit", "number"
    and "total" (the sum head's answer). A picture that cannot be read raises ValueError.
    """
    picture = pictures.read_image("the drawing" if drawing else "the photo", _picture_bytes(data_url))
    try:
        framed = pictures.frame_digit(picture, drawing=drawing)
    except pictures.NoDigitError as error:
        return {"status": "no digit", "line": str(error)}
    answer = inference.answer(model, framed, number, framing=_as_framed)
    return {"status": "sure" if answer.sure else "not sure", "line": str(answer), "picture": _png_url(framed),
            "digit_probs": [round(p, 4) for p in answer.digit_probs.tolist()], "digit": answer.digit,
            "number": int(number), "total": answer.total}


def _as_framed(framed):
    """The framing for a picture framed already."""
    return framed


class DigitPad(anywidget.AnyWidget):
    """A canvas to draw a digit on, and the webcam; the network's answer, live. See `pad`.

    The browser sets `picture` ({"url": a data URL, "photo": whether it is a camera frame, "id"});
    Python answers in `answer` (`answer_picture`'s dict, with that "id"). `number` is added.
    """
    picture = traitlets.Dict().tag(sync=True)
    number = traitlets.Int(0, min=0, max=9).tag(sync=True)
    answer = traitlets.Dict().tag(sync=True)

    def __init__(self, model, number: int | None = None, **kwargs):
        self._model = model  # before the traits: setting them calls _read
        super().__init__(number=random.randrange(10) if number is None else number, **kwargs)

    @traitlets.observe("picture", "number")
    def _read(self, _change=None):
        """Answers the picture the browser sent last, with the number: a new picture or number
        from the browser calls it."""
        if not self.picture.get("url"):
            self.answer = {}
            return
        try:
            answer = answer_picture(self._model, self.picture["url"], self.number,
                                    drawing=not self.picture.get("photo"))
        except ValueError as error:  # a picture the browser sent that cannot be read
            answer = {"status": "error", "line": str(error)}
        self.answer = {**answer, "id": self.picture.get("id")}

    def __repr__(self) -> str:  # a plain Python run
        return NO_WIDGET

    def _repr_mimebundle_(self, **kwargs):
        """The widget, and the text shown where no widget can run (GitHub, nbval), whole: anywidget
        0.9.0 left it to ipywidgets, which cuts it at 110 characters (0.9.21 does not)."""
        data, metadata = super()._repr_mimebundle_(**kwargs)
        return {**data, "text/plain": NO_WIDGET}, metadata

    _css = """
.digit-pad { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; padding: 12px;
  font: 14px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
  background: #fff; color-scheme: light; border: 1px solid #d0d7de; border-radius: 10px; max-width: 640px; }
.digit-pad button { font: inherit; padding: 4px 10px; border: 1px solid #afb8c1; border-radius: 6px;
  background: #f6f8fa; color: #1f2328; cursor: pointer; }
.digit-pad button:hover { background: #eaeef2; }
.digit-pad [hidden] { display: none !important; }
.dp-stage { position: relative; width: 280px; height: 280px; border: 1px solid #8c959f;
  border-radius: 6px; overflow: hidden; background: #fff; touch-action: none; }
.dp-canvas { display: block; touch-action: none; cursor: crosshair; }
.dp-video { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: cover; background: #000; }
.dp-tools { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-top: 8px; width: 282px; }
.dp-tools label { display: flex; align-items: center; gap: 4px; color: #57606a; }
.dp-tools input { width: 80px; }
.dp-note { margin-top: 6px; width: 282px; color: #9a6700; min-height: 1.35em; }
.dp-right { width: 300px; }
.dp-number { font-size: 16px; display: flex; align-items: center; gap: 10px; }
.dp-n { font-size: 40px; font-weight: 700; line-height: 1; }
.dp-seen { display: flex; gap: 12px; align-items: center; margin: 12px 0; }
.dp-box { width: 112px; height: 112px; background: #000; border-radius: 4px; overflow: hidden; flex: none; }
.dp-framed { display: block; width: 112px; height: 112px; image-rendering: pixelated; }
.dp-caption { color: #57606a; font-size: 12px; }
.dp-answer { min-height: 40px; }
.dp-sum { font-size: 30px; font-weight: 700; }
.dp-sum.doubt { color: #8c959f; }
.dp-status { display: inline-block; margin-left: 10px; padding: 1px 8px; border-radius: 10px;
  font-size: 13px; vertical-align: middle; background: #eaeef2; }
.dp-status.sure { background: #dafbe1; color: #116329; }
.dp-status.not-sure { background: #fff8c5; color: #7d4e00; }
.dp-status.no-digit, .dp-status.error { background: #ffebe9; color: #a40e26; }
.dp-line { color: #57606a; font-size: 12px; min-height: 2.7em; margin: 4px 0 8px; }
.dp-bar { display: flex; align-items: center; gap: 6px; height: 18px; font-variant-numeric: tabular-nums; }
.dp-bar b { width: 12px; text-align: right; }
.dp-track { flex: 1; height: 12px; background: #eaeef2; border-radius: 3px; overflow: hidden; }
.dp-fill { height: 100%; background: #8c959f; }
.dp-bar.top .dp-fill { background: #0969da; }
.dp-pc { width: 44px; text-align: right; color: #57606a; font-size: 12px; }
"""

    _esm = r"""
const SIDE = 280;        // px: the canvas's size on the page, and the picture's that Python reads
const SEND_EVERY = 200;  // ms: while the pen moves, a picture goes to Python at most this often

const HINT = "Draw a digit with the mouse or a finger.";
const HTML = `
  <div class="dp-left">
    <div class="dp-stage"><canvas class="dp-canvas"></canvas>
      <video class="dp-video" playsinline muted hidden></video></div>
    <div class="dp-tools">
      <button class="dp-clear" title="Clear the canvas">Clear</button>
      <label>pen <input class="dp-pen" type="range" min="3" max="30" value="18"></label>
      <button class="dp-camera">Camera</button>
      <button class="dp-take" hidden>Take picture</button>
    </div>
    <div class="dp-note">${HINT}</div>
  </div>
  <div class="dp-right">
    <div class="dp-number">number <span class="dp-n"></span>
      <button class="dp-new" title="Draw a new random number">new number</button></div>
    <div class="dp-seen"><div class="dp-box"><img class="dp-framed" alt=""></div>
      <div class="dp-caption">the 28 × 28 picture<br>that the network reads</div></div>
    <div class="dp-answer"><span class="dp-sum"></span><span class="dp-status" hidden></span></div>
    <div class="dp-line"></div>
    <div class="dp-bars"></div>
  </div>`;

// Pen strokes on a canvas whose backing store has devicePixelRatio pixels per CSS pixel (crisp),
// exported at SIDE x SIDE whatever the screen. Pointer events serve mouse, pen and touch alike. A
// stroke may start on the canvas's frame (where a tall 1 starts), not on the camera's picture.
function pen(canvas, width, changed) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = canvas.height = Math.round(SIDE * ratio);
  canvas.style.width = canvas.style.height = SIDE + "px";
  const context = canvas.getContext("2d");
  context.scale(ratio, ratio);
  context.lineCap = context.lineJoin = "round";
  let active = null, last = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * SIDE / box.width, (event.clientY - box.top) * SIDE / box.height];
  };
  const line = (to) => {
    context.lineWidth = width();
    context.beginPath();
    context.moveTo(...last);
    context.lineTo(...to);
    context.stroke();
    last = to;
  };
  const down = (event) => {
    if (active !== null || event.button > 0 || event.target.tagName === "VIDEO") return;  // one pen at a time
    active = event.pointerId;
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    line(last);  // a tap leaves a dot
    event.preventDefault();
    changed(false);
  };
  const move = (event) => {
    if (event.pointerId !== active) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const each of events.length ? events : [event]) line(at(each));
    changed(false);
  };
  const up = (event) => {
    if (event.pointerId !== active) return;
    active = null;
    changed(true);
  };
  canvas.parentElement.addEventListener("pointerdown", down);
  canvas.addEventListener("pointermove", move);
  canvas.addEventListener("pointerup", up);
  canvas.addEventListener("pointercancel", up);
  return {
    clear: () => context.clearRect(0, 0, SIDE, SIDE),
    picture: () => {
      const out = document.createElement("canvas");
      out.width = out.height = SIDE;
      out.getContext("2d").drawImage(canvas, 0, 0, SIDE, SIDE);
      return out.toDataURL("image/png");  // the page stays transparent: Python lays it on white
    },
  };
}

// The webcam in a square: what the square shows is what is taken.
function camera(video, note) {
  let stream = null;
  const start = async () => {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      note("No camera here: this browser offers none to this page (it needs https).");
      return false;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (error) {
      const why = { NotAllowedError: "the browser refused it: allow the camera for this page, then try again",
                    NotFoundError: "none was found", NotReadableError: "another program is using it" };
      note(`No camera: ${why[error.name] || error.message || error.name}.`);
      return false;
    }
    video.srcObject = stream;
    await video.play();
    note("Hold a digit written on paper in the square, then take a picture.");
    return true;
  };
  const stop = () => {
    if (stream) stream.getTracks().forEach((track) => track.stop());
    stream = null;
    video.srcObject = null;
  };
  const picture = () => {
    const side = Math.min(video.videoWidth, video.videoHeight), size = Math.min(side, 640);
    const out = document.createElement("canvas");
    out.width = out.height = size;
    out.getContext("2d").drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2,
                                   side, side, 0, 0, size, size);
    return out.toDataURL("image/jpeg", 0.92);
  };
  return { start, stop, picture, on: () => stream !== null };
}

function bars(box) {
  box.innerHTML = Array.from({ length: 10 }, (_, digit) =>
    `<div class="dp-bar"><b>${digit}</b><div class="dp-track"><div class="dp-fill"></div></div>` +
    `<span class="dp-pc"></span></div>`).join("");
  return [...box.children];
}

function showAnswer(root, rows, answer) {
  const find = (name) => root.querySelector(name);
  const probs = answer.digit_probs || [], top = probs.length ? probs.indexOf(Math.max(...probs)) : -1;
  rows.forEach((row, digit) => {
    const p = probs.length ? probs[digit] : 0;
    row.querySelector(".dp-fill").style.width = `${100 * p}%`;
    row.querySelector(".dp-pc").textContent = probs.length ? `${(100 * p).toFixed(p < 0.1 ? 1 : 0)} %` : "";
    row.classList.toggle("top", digit === top);
  });
  find(".dp-framed").src = answer.picture || "";
  find(".dp-framed").style.visibility = answer.picture ? "visible" : "hidden";
  const status = find(".dp-status");
  status.hidden = !answer.status;
  status.textContent = answer.status || "";
  status.className = "dp-status " + (answer.status || "").replace(" ", "-");
  const sum = find(".dp-sum");  // a doubtful answer in grey, with a question mark
  sum.textContent = "digit" in answer ? `${answer.digit} + ${answer.number} = ${answer.total}` : "";
  if (answer.status === "not sure") sum.textContent += " ?";
  sum.classList.toggle("doubt", answer.status !== "sure");
  find(".dp-line").textContent = answer.line || "";
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "digit-pad";
  root.innerHTML = HTML;
  el.appendChild(root);
  const find = (name) => root.querySelector(name);
  const note = (text) => { find(".dp-note").textContent = text; };
  let sent = 0, timer = null;
  const send = (url, photo) => {
    clearTimeout(timer);
    timer = null;
    model.set("picture", url ? { url, photo, id: ++sent } : {});
    model.save_changes();
  };
  const drawn = pen(find(".dp-canvas"), () => Number(find(".dp-pen").value), (lifted) => {
    if (lifted) send(drawn.picture(), false);
    else if (timer === null) timer = setTimeout(() => send(drawn.picture(), false), SEND_EVERY);
  });
  const cam = camera(find(".dp-video"), note);
  const rows = bars(find(".dp-bars"));
  const showCamera = (on) => {
    find(".dp-video").hidden = find(".dp-take").hidden = !on;
    find(".dp-camera").textContent = on ? "Stop camera" : "Camera";
  };
  find(".dp-clear").onclick = () => { drawn.clear(); send(null); };
  find(".dp-new").onclick = () => {
    model.set("number", (model.get("number") + 1 + Math.floor(Math.random() * 9)) % 10);
    model.save_changes();
  };
  find(".dp-camera").onclick = async () => {
    if (cam.on()) { cam.stop(); showCamera(false); note(HINT); return; }
    showCamera(await cam.start());
  };
  find(".dp-take").onclick = () => { if (cam.on()) send(cam.picture(), true); };
  const number = () => { find(".dp-n").textContent = model.get("number"); };
  const answer = () => showAnswer(root, rows, model.get("answer") || {});
  model.on("change:number", number);
  model.on("change:answer", answer);
  number();
  answer();
  return () => {  // the view is removed: let go of the camera and the model
    cam.stop();
    clearTimeout(timer);
    model.off("change:number", number);
    model.off("change:answer", answer);
  };
}

export default { render };
"""


def pad(model, number: int | None = None) -> DigitPad:
    """A canvas to draw a digit on, or the webcam, read live by `model` with `number` added (a
    random one when None; the widget draws new ones). Where no widget can run, its text is one
    line, `NO_WIDGET`, and nothing waits."""
    return DigitPad(model, number)
