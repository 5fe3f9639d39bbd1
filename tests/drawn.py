"""Digits drawn on a canvas, made here for the tests and to measure: pen strokes of any width,
the digit anywhere on a 280 px canvas and at any size, exported as a browser exports a canvas
(a PNG whose page is transparent black), or on white.

Each digit is one of STYLES, a few pen strokes through control points in a unit box, jittered
(turned, slanted, squeezed, every point moved a little). Part of them are drawn rough, as a mouse
or a finger draws: jagged, sampled sparsely, with a gap where the pen skipped, or a stroke gone
over twice. `python tests/drawn.py MODEL.pt` prints how a model reads them.
"""
import io
import math
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 280  # px, the widget's canvas
PENS = (3, 30)  # px, thinnest and thickest
SIZES = {"small": (0.25, 0.45), "medium": (0.45, 0.75), "large": (0.75, 0.95), "full": (1.0, 1.0)}
PLACES = ("centre", "anywhere", "edge", "corner")
_SUPERSAMPLE = 4  # drawn 4 times larger, then shrunk: anti-aliased edges, as a browser's


def _ellipse(cx, cy, rx, ry, start, end, steps=16):
    """Points along an ellipse from angle `start` to `end` (degrees; y points down, so 90 is the
    bottom and angles grow clockwise)."""
    angles = np.radians(np.linspace(start, end, steps))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _eight(steps=40):
    """A figure of eight in one stroke, crossing itself in the middle."""
    t = np.linspace(0.15, 2 * math.pi + 0.3, steps)
    return [(0.5 + 0.75 * math.sin(a) * math.cos(a), 0.5 - 0.5 * math.cos(a)) for a in t]


# Each style: (width / height of its box, strokes). A stroke is a list of control points in the
# unit box, joined by a smooth curve; a point given twice is a corner.
STYLES = {
    "0 oval": (0.65, [_ellipse(0.5, 0.5, 0.5, 0.5, -80, -445, 24)]),
    "0 round": (0.9, [_ellipse(0.5, 0.5, 0.5, 0.5, -100, 265, 24)]),
    "0 overshoot": (0.6, [_ellipse(0.5, 0.5, 0.5, 0.5, -60, -420, 24) + [(0.45, 0.2)]]),
    "1 plain": (0.3, [[(0.5, 0.0), (0.5, 1.0)]]),
    "1 flag": (0.4, [[(0.1, 0.22), (0.6, 0.0), (0.6, 0.0), (0.6, 1.0)]]),
    "1 flag and foot": (0.55, [[(0.1, 0.2), (0.55, 0.0), (0.55, 0.0), (0.55, 1.0)], [(0.1, 1.0), (1.0, 1.0)]]),
    "2 curve": (0.65, [_ellipse(0.5, 0.3, 0.45, 0.3, 195, 395, 10) + [(0.02, 1.0), (0.02, 1.0), (1.0, 1.0)]]),
    "2 curl": (0.65, [_ellipse(0.5, 0.3, 0.45, 0.3, 195, 395, 10)
                      + [(0.15, 0.95), (0.05, 0.85), (0.2, 0.82), (0.3, 0.97), (1.0, 1.0)]]),
    "2 pointed": (0.6, [[(0.05, 0.15), (0.45, 0.0), (0.85, 0.12), (0.85, 0.35), (0.02, 1.0), (0.02, 1.0),
                         (1.0, 1.0)]]),
    "3 round": (0.6, [_ellipse(0.5, 0.25, 0.45, 0.25, 200, 450, 12) + _ellipse(0.5, 0.73, 0.5, 0.27, -90, 155, 12)[1:]]),
    "3 flat top": (0.6, [[(0.05, 0.0), (0.9, 0.0), (0.9, 0.0), (0.4, 0.42), (0.4, 0.42)]
                         + _ellipse(0.48, 0.71, 0.5, 0.29, -100, 155, 12)]),
    "4 open": (0.7, [[(0.15, 0.0), (0.08, 0.6), (0.08, 0.6), (1.0, 0.6)], [(0.75, 0.05), (0.75, 1.0)]]),
    "4 closed": (0.7, [[(0.7, 0.0), (0.0, 0.68), (0.0, 0.68), (1.0, 0.68)], [(0.7, 0.0), (0.7, 1.0)]]),
    "4 one stroke": (0.7, [[(0.7, 1.0), (0.7, 0.0), (0.7, 0.0), (0.0, 0.68), (0.0, 0.68), (1.0, 0.68)]]),
    "5 two strokes": (0.6, [[(0.15, 0.0), (0.1, 0.45), (0.1, 0.45)] + _ellipse(0.47, 0.7, 0.47, 0.3, -140, 150, 14),
                            [(0.15, 0.0), (0.95, 0.0)]]),
    "5 one stroke": (0.6, [[(0.95, 0.0), (0.15, 0.0), (0.15, 0.0), (0.1, 0.45), (0.1, 0.45)]
                           + _ellipse(0.47, 0.7, 0.47, 0.3, -140, 150, 14)]),
    "6 loop": (0.6, [[(0.8, 0.02), (0.4, 0.15), (0.1, 0.55), (0.2, 0.92), (0.55, 1.0), (0.88, 0.8),
                      (0.8, 0.55), (0.45, 0.5), (0.12, 0.7)]]),
    "6 straight": (0.6, [[(0.65, 0.0), (0.15, 0.65), (0.3, 0.98), (0.75, 0.95), (0.85, 0.7), (0.5, 0.52),
                          (0.15, 0.7)]]),
    "7 plain": (0.65, [[(0.0, 0.0), (1.0, 0.0), (1.0, 0.0), (0.35, 1.0)]]),
    "7 bar": (0.65, [[(0.0, 0.0), (1.0, 0.0), (1.0, 0.0), (0.35, 1.0)], [(0.35, 0.5), (0.9, 0.5)]]),
    "7 curved": (0.65, [[(0.0, 0.05), (1.0, 0.0), (1.0, 0.0), (0.6, 0.45), (0.45, 1.0)]]),
    "8 figure": (0.7, [_eight()]),
    "8 two loops": (0.65, [_ellipse(0.5, 0.24, 0.36, 0.24, -90, 270, 16), _ellipse(0.5, 0.73, 0.5, 0.27, -90, 270, 16)]),
    "9 straight": (0.55, [_ellipse(0.45, 0.27, 0.45, 0.27, 0, -360, 18) + [(0.88, 0.6), (0.85, 1.0)]]),
    "9 curved": (0.55, [_ellipse(0.45, 0.27, 0.45, 0.27, 0, -360, 18) + [(0.88, 0.6), (0.7, 0.95), (0.3, 1.0)]]),
}
_BY_DIGIT = {digit: [name for name in STYLES if name.startswith(str(digit))] for digit in range(10)}


@dataclass
class Drawn:
    """One drawn digit: the PNG a browser sends, and how it was drawn."""
    png: bytes
    label: int
    style: str
    pen: int  # px
    size: str  # a key of SIZES
    place: str  # one of PLACES
    rough: bool
    page: str  # "transparent" or "white"
    strokes: list = field(repr=False, default_factory=list)  # in canvas px

    @property
    def picture(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png))


def _spline(points, step):
    """A Catmull-Rom curve through `points` [N, 2], sampled about every `step` units."""
    points = np.asarray(points, float)
    if len(points) < 3:
        count = max(2, int(np.linalg.norm(points[-1] - points[0]) / step) + 1)
        return points[0] + np.linspace(0, 1, count)[:, None] * (points[-1] - points[0])
    padded = np.vstack([points[:1], points, points[-1:]])
    curve = []
    for p0, p1, p2, p3 in zip(padded, padded[1:], padded[2:], padded[3:]):
        count = max(2, int(np.linalg.norm(p2 - p1) / step) + 1)
        t = np.linspace(0, 1, count)[:-1, None]
        curve.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                            + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    return np.vstack(curve + [points[-1:]])


def _jittered(style: str, rng) -> list[np.ndarray]:
    """A style's strokes as smooth curves in its box, turned, slanted, squeezed and nudged."""
    ratio, strokes = STYLES[style]
    turn, slant, squeeze = np.radians(rng.uniform(-8, 8)), rng.uniform(-0.2, 0.2), rng.uniform(0.85, 1.15)
    matrix = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]]) \
        @ np.array([[ratio * squeeze, slant], [0, 1]])
    curves = []
    for stroke in strokes:
        points = np.asarray(stroke, float) + rng.normal(0, 0.02, (len(stroke), 2))
        curves.append(_spline(points, 0.01) @ matrix.T)
    return curves


def _offset(low: float, high: float, extent: float, place: str, pen: float, rng) -> float:
    """Where a box `extent` long goes along one side of the canvas, between `low` and `high` (the
    side's edges), for a place: "edge" puts the pen's middle from a fifth of a pen beyond the edge
    to 40 % of a pen inside it, so the ink touches the edge and loses at most a little."""
    if place == "centre":
        return (low + high - extent) / 2 + rng.uniform(-0.05, 0.05) * CANVAS
    if place == "anywhere":
        margin = pen / 2 + 2
        return rng.uniform(low + margin, max(low + margin, high - margin - extent))
    inside = rng.uniform(-0.2, 0.4) * pen
    return low + inside if rng.random() < 0.5 else high - extent - inside


def _placed(curves, size: str, place: str, pen: int, rng) -> list[np.ndarray]:
    """The curves scaled to a height in `size`'s range and put at `place` on the canvas."""
    points = np.vstack(curves)
    low, high = points.min(0), points.max(0)
    height = rng.uniform(*SIZES[size]) * CANVAS
    if size == "full":  # top to bottom: the pen's middle within a fifth of a pen of each edge
        height += rng.uniform(-0.4, 0.4) * pen
    scale = min(height / (high - low)[1], (CANVAS - pen) / max((high - low)[0], 1e-6))
    extent = (high - low) * scale
    sides = {"centre": ("centre", "centre"), "anywhere": ("anywhere", "anywhere"),
             "edge": [("edge", "centre"), ("centre", "edge")][int(rng.integers(2))], "corner": ("edge", "edge")}[place]
    if size == "full":
        sides = (sides[0] if sides[0] != "edge" or place == "corner" else "centre", "full")
    corner = [(CANVAS - extent[1]) / 2 if side == "full" else _offset(0, CANVAS, extent[axis], side, pen, rng)
              for axis, side in zip((0, 1), sides)]
    return [(curve - low) * scale + corner for curve in curves]


def _rough(curves, rng) -> list[np.ndarray]:
    """The curves as a mouse or a finger draws them: maybe a gap where the pen skipped (3 to 8 %
    of the longest stroke), maybe one stroke drawn over again a few pixels off, then sampled 2 to
    20 px apart, each point shaken by up to 2 px and rounded to whole pixels; all within the
    smooth curves' box, so that the digit keeps its place."""
    points = np.vstack(curves)
    low, high = points.min(0), points.max(0)
    curves = [resampled(curve, 1) for curve in curves]
    longest = int(np.argmax([len(curve) for curve in curves]))
    if rng.random() < 0.4 and len(curves[longest]) > 40:
        curve = curves.pop(longest)
        skip = max(2, round(rng.uniform(0.03, 0.08) * len(curve)))
        cut = int(rng.integers(10, len(curve) - skip - 10))
        curves += [curve[:cut], curve[cut + skip:]]
    if rng.random() < 0.4:
        curves.append(curves[int(rng.integers(len(curves)))] + rng.uniform(-4, 4, 2))
    step, shake = rng.choice([2, 2, 8, 20]), rng.uniform(0.3, 2.0)
    sparse = [resampled(curve, step) for curve in curves]
    return [np.round(curve + rng.normal(0, shake, curve.shape)).clip(low, high) for curve in sparse]


def resampled(curve: np.ndarray, step: float) -> np.ndarray:
    """Points along `curve` every `step` px (and its last point)."""
    along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    marks = np.append(np.arange(0, along[-1], step), along[-1])
    return np.stack([np.interp(marks, along, curve[:, axis]) for axis in (0, 1)], 1)


def canvas_png(curves, pen: float, page: str = "transparent") -> bytes:
    """Pen strokes (point lists in canvas px) drawn as a browser's canvas draws them, with round
    caps and joins and anti-aliased edges, in black: a PNG of CANVAS x CANVAS px whose page is
    transparent black (what `toDataURL` gives) or white."""
    scale = _SUPERSAMPLE
    cover = Image.new("L", (CANVAS * scale, CANVAS * scale), 0)
    draw, radius = ImageDraw.Draw(cover), pen * scale / 2
    for curve in curves:
        points = [tuple(point) for point in np.asarray(curve, float) * scale]
        if len(points) > 1:
            draw.line(points, fill=255, width=max(1, round(pen * scale)))
        for x, y in points:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    alpha = cover.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    if page == "white":
        picture = Image.merge("RGB", [alpha.point(lambda value: 255 - value)] * 3)
    else:
        black = Image.new("L", alpha.size, 0)
        picture = Image.merge("RGBA", (black, black, black, alpha))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def strokes(style: str, pen: int, size: str, place: str, rng) -> list[np.ndarray]:
    """The smooth pen strokes of a digit of `style`, `size` tall, at `place` on the canvas: point
    lists in canvas px, for `canvas_png` or for a browser to draw."""
    return _placed(_jittered(style, rng), size, place, pen, rng)


def draw_digit(style: str, pen: int, size: str, place: str, rough: bool, page: str, rng) -> Drawn:
    """One digit of `style` drawn with a `pen` px wide, `size` tall, at `place` on the canvas."""
    curves = strokes(style, pen, size, place, rng)
    if rough:
        curves = _rough(curves, rng)
    return Drawn(canvas_png(curves, pen, page), int(style[0]), style, pen, size, place, rough, page, curves)


def drawn_digits(count: int = 500, seed: int = 0) -> list[Drawn]:
    """`count` digits, their labels cycling 0..9, each of a style of its digit, with a pen 3 to
    30 px wide, at every size and place: "full" runs from the canvas's top edge to its bottom.
    A pen is at most a fifth of the digit's least height in its size (up to 14 px on a small
    digit, 30 px from a large one up), as MNIST's thickest strokes are. Two in five are rough; one in four is drawn on white."""
    rng = np.random.default_rng(seed)
    drawn = []
    for index in range(count):
        style = _BY_DIGIT[index % 10][int(rng.integers(len(_BY_DIGIT[index % 10])))]
        size, place = list(SIZES)[int(rng.integers(len(SIZES)))], PLACES[int(rng.integers(len(PLACES)))]
        pen = int(rng.integers(PENS[0], min(PENS[1], SIZES[size][0] * CANVAS / 5) + 1))
        page = "white" if rng.random() < 0.25 else "transparent"
        drawn.append(draw_digit(style, pen, size, place, rng.random() < 0.4, page, rng))
    return drawn


def tall_ones(count: int = 150, seed: int = 0) -> list[Drawn]:
    """Plain 1s from the canvas's top edge to its bottom edge, with every pen, smooth or rough,
    in the middle, anywhere, or along the left or right edge too."""
    rng = np.random.default_rng(seed)
    return [draw_digit("1 plain", int(rng.integers(PENS[0], PENS[1] + 1)), "full", PLACES[index % 4],
                       index % 3 == 0, "transparent", rng) for index in range(count)]


_PEN_BINS = ((3, 6), (7, 12), (13, 20), (21, 30))


def _bins(item: Drawn) -> dict[str, str]:
    """The bins a drawn digit is counted in, by category."""
    low, high = next((low, high) for low, high in _PEN_BINS if item.pen <= high)
    return {"pen": f"{low}-{high} px", "size": item.size, "place": item.place, "digit": str(item.label),
            "rough": "rough" if item.rough else "smooth", "page": item.page, "style": item.style}


def measure(model, drawn: list[Drawn], framing) -> dict:
    """{(category, bin): [pictures, right, not sure, refused, wrong yet sure]} over `drawn`, each
    read with the number (7 * index) % 10 and prepared by `framing`; ("all", "") counts them all.
    Right is digit and sum both right, sure or not, as `inference.score_folder` counts."""
    import inference
    numbers = [index * 7 % 10 for index in range(len(drawn))]
    digit_probs, sum_probs = inference.read_pictures(model, [item.picture for item in drawn], numbers, framing)
    refused = digit_probs.isnan().any(1).tolist()
    sure = inference.is_sure(digit_probs, sum_probs, numbers).tolist()
    table = {}
    for index, item in enumerate(drawn):
        right = int(digit_probs[index].argmax()) == item.label and not refused[index] \
            and int(sum_probs[index].argmax()) == item.label + numbers[index]
        row = [1, int(right), int(not sure[index] and not refused[index]), int(refused[index]),
               int(sure[index] and not right)]
        for key in [("all", "")] + list(_bins(item).items()):
            table[key] = [a + b for a, b in zip(table.get(key, [0] * 5), row)]
    return table


if __name__ == "__main__":  # python tests/drawn.py MODEL.pt [photo|drawing]
    from functools import partial
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import checkpoints
    import pictures
    model = checkpoints.load(sys.argv[1])
    framing = pictures.frame_digit
    if sys.argv[2:] == ["drawing"]:
        framing = partial(pictures.frame_digit, drawing=True)
    for name, items in (("drawn digits, seeds 0 to 3", [d for s in range(4) for d in drawn_digits(500, s)]),
                        ("tall 1s", tall_ones(150))):
        print(f"{name}: pictures, right, not sure, refused, wrong yet sure")
        for (category, value), (total, right, unsure, refused, wrong) in sorted(measure(model, items, framing).items()):
            print(f"  {category:6} {value:16} {total:5} {right:5} ({100 * right / total:5.1f} %) {unsure:4} {refused:4} {wrong:4}")
