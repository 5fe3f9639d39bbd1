"""Made-up pictures to test the preparation and the network on, with known labels: MNIST test
digits drawn as pen strokes on photographed paper (`photo_digits`) or cleanly on flat paper
(`clean_digits`), digits printed in fonts (`font_digits`), and crops of ordinary photos that
show no digit (`nondigit_photos`). Seeded, so a seed repeats them; the photos and fonts come
with matplotlib.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit


_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralItalic.ttf",
              "STIXGeneralBol.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf")


def font_digits(count: int = 500, seed: int = 0) -> tuple[list, torch.Tensor]:
    """Digits that are not MNIST: (PIL pictures, labels), dark ink on light paper.

    Each is printed in one of the fonts matplotlib ships, on a square picture of 64 to 200 px,
    with a random size, stroke width, slant, position, paper and ink brightness, a brightness
    gradient across the paper and pixel noise. The digits cycle 0..9.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    made = []
    for index in range(count):
        side = int(rng.integers(64, 201))
        font = ImageFont.truetype(str(folder / _FONT_FILES[rng.integers(len(_FONT_FILES))]),
                                  int(side * rng.uniform(0.4, 0.75)))
        glyph = Image.new("L", (2 * side, 2 * side), 0)
        ImageDraw.Draw(glyph).text((side, side), str(index % 10), fill=255, font=font,
                                   anchor="mm", stroke_width=int(rng.integers(0, side // 40 + 1)),
                                   stroke_fill=255)
        slant = rng.uniform(-0.25, 0.25)
        glyph = glyph.transform(glyph.size, Image.Transform.AFFINE, (1, slant, -slant * side, 0, 1, 0),
                                resample=Image.Resampling.BILINEAR)
        left, top = (side // 2 + rng.integers(-side // 6, side // 6 + 1, size=2)).tolist()
        ink = np.asarray(glyph.crop((left, top, left + side, top + side)), dtype=np.float32) / 255
        ramp = np.linspace(0, 1, side, dtype=np.float32)
        light = 1 - rng.uniform(0, 0.3) * (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
        paper = rng.uniform(0.6, 1.0) * light
        page = paper * (1 - ink) + rng.uniform(0, 0.3) * ink
        page = page + rng.normal(0, 0.03, page.shape).astype(np.float32)
        made.append(Image.fromarray((255 * page.clip(0, 1)).round().astype(np.uint8)))
    return made, torch.arange(count) % 10


def _pen_stroke(digit: np.ndarray, height: int, rng) -> np.ndarray:
    """An MNIST digit as a crisp pen stroke `height` px tall: ink cover [h, w] in [0, 1].

    The digit is enlarged smoothly (bicubic), then cut at a level: a high level keeps only
    the middle of MNIST's soft strokes (a thin ballpoint), a low one all of it (a marker);
    a max filter thickens a quarter of them further (felt tips).
    """
    from PIL import Image, ImageFilter
    rows, cols = np.nonzero(digit)
    box = np.pad(digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1], 2)  # room to grow
    scale = height / (rows.max() - rows.min() + 1)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))
    smooth = np.asarray(Image.fromarray(box).resize(size, Image.Resampling.BICUBIC), np.float32) / 255
    level = rng.uniform(0.15, 0.55)  # the pen: 0.55 a ballpoint .. 0.15 a marker
    cover = np.clip((smooth - level) * scale + 0.5, 0, 1)  # edges about 1.5 px soft
    if rng.random() < 0.25:
        width = 2 * int(rng.integers(1, max(2, round(0.02 * height)) + 1)) + 1
        cover = np.asarray(Image.fromarray((255 * cover).astype(np.uint8))
                           .filter(ImageFilter.MaxFilter(width)), np.float32) / 255
    return cover


def _lighting(height: int, width: int, rng) -> np.ndarray:
    """Light falling off across the page [H, W, 1]: a gradient, a vignette, maybe a shadow.
    Worked out on a grid 8 times coarser, then enlarged: light varies slowly."""
    from PIL import Image
    y, x = np.ogrid[-1:1:(height // 8 + 2) * 1j, -1:1:(width // 8 + 2) * 1j]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y + 1.5) / 3  # 0..1 across the page
    light = 1 - rng.uniform(0, 0.5) * ramp - rng.uniform(0, 0.35) * (x * x + y * y) / 2
    if rng.random() < 0.3:  # the soft shadow of a hand or a phone across one side
        angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)
        side = np.cos(angle) * x + np.sin(angle) * y - offset
        light = light * (1 - rng.uniform(0.15, 0.4) / (1 + np.exp(-side / rng.uniform(0.03, 0.15))))
    light = Image.fromarray(light.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(light)[:, :, None]


def _draw_lines(page, kind, paper, digit_height, long, pad, left, rng):
    """The lines of ruled paper (maybe with a red margin left of the digit) or squared paper."""
    colour = (np.array([rng.uniform(0.5, 0.7), rng.uniform(0.65, 0.8), 0.92])
              if rng.random() < 0.6 else np.full(3, rng.uniform(0.55, 0.75)))  # blue or grey
    if kind == "squared":
        colour = colour + 0.4 * (paper - colour)  # a lighter grid
    spacing = digit_height * (rng.uniform(0.2, 0.5) if kind == "squared" else rng.uniform(0.5, 1.3))
    thick = max(1, round(rng.uniform(0.7, 2.5) * long / 1000))
    for y in np.arange(rng.uniform(0, spacing), page.shape[0], spacing).astype(int):
        page[y:y + thick] = colour
    if kind == "squared":
        for x in np.arange(rng.uniform(0, spacing), page.shape[1], spacing).astype(int):
            page[:, x:x + thick] = colour
    elif rng.random() < 0.4:
        x = int(rng.uniform(pad, max(pad + 1, left - 2 * thick)))
        page[:, x:x + 2 * thick] = (0.85, rng.uniform(0.3, 0.45), rng.uniform(0.35, 0.45))


def _stray_mark(page, ink, digit, margin, rng):
    """A dot or a short scribble at least a third of the digit's height away from it."""
    from PIL import Image, ImageDraw
    top, left, bottom, right = digit
    size, gap = (bottom - top) * rng.uniform(0.03, 0.25), (bottom - top) / 3
    for _ in range(20):
        y = int(rng.uniform(margin, page.shape[0] - margin - size))
        x = int(rng.uniform(margin, page.shape[1] - margin - size))
        if not (top - gap - size < y < bottom + gap and left - gap - size < x < right + gap):
            break
    else:
        return
    mark = Image.new("L", (int(size) + 1, int(size) + 1), 0)
    if rng.random() < 0.5:
        ImageDraw.Draw(mark).ellipse((0, 0, size / 2, size / 2), fill=255)
    else:
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(4)]
        ImageDraw.Draw(mark).line(points, fill=255, width=max(2, round(0.03 * (bottom - top))))
    box = page[y:y + mark.size[1], x:x + mark.size[0]]
    box += (ink - box) * (np.asarray(mark, np.float32) / 255)[:, :, None]


def _camera(page, width, height, rng):
    """The page [H, W, 3] in [0, 1] photographed: turned a little about its centre and cropped
    to width x height, then `_phone_camera`."""
    from PIL import Image
    picture = Image.fromarray((255 * page).clip(0, 255).astype(np.uint8))
    turn = np.radians(rng.uniform(-5, 5))
    cos, sin = np.cos(turn), np.sin(turn)
    cx, cy = page.shape[1] / 2, page.shape[0] / 2  # frame (u, v) -> page (x, y) about the centre
    matrix = (cos, sin, cx - cos * width / 2 - sin * height / 2,
              -sin, cos, cy + sin * width / 2 - cos * height / 2)
    return _phone_camera(picture.transform((width, height), Image.Transform.AFFINE, matrix,
                                           Image.Resampling.BILINEAR), rng)


def _phone_camera(picture, rng):
    """An RGB picture as a phone saves it: blurred, noisy (the sensor), JPEG at quality 50 to 90."""
    from PIL import Image, ImageFilter
    picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.8)))
    noise = rng.standard_normal((picture.size[1], picture.size[0], 1), np.float32) * rng.uniform(1, 6)
    picture = Image.fromarray((np.asarray(picture, np.float32) + noise).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=int(rng.integers(50, 91)))
    return Image.open(buffer).convert("RGB")


_PAPERS = ("plain", "ruled", "squared")
_INKS = {"blue": ((0.05, 0.2), (0.1, 0.3), (0.45, 0.75)),  # ranges of red, green and blue
        "black": ((0.03, 0.18),) * 3, "pencil": ((0.3, 0.45),) * 3}


def _photo_of(digit: np.ndarray, rng):
    """One phone photo of `digit` written on paper (see `photo_digits`): (picture, paper kind)."""
    long = int(rng.integers(400, 1201))
    short = round(long / rng.choice([1, 5 / 4, 4 / 3, 3 / 2, 16 / 9]))
    height, width = (long, short) if rng.random() < 0.5 else (short, long)
    pad = round(0.06 * long)  # drawn larger, then turned and cropped to the frame
    paper = np.clip(rng.uniform(0.82, 1.0) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    page = np.empty((height + 2 * pad, width + 2 * pad, 3), np.float32)
    page[:] = paper
    stroke = _pen_stroke(digit, int(rng.integers(80, round(0.7 * min(height, width)) + 1)), rng)
    # Its place: inside the frame, clear of the table beyond the sheet's edge, if there is one.
    side = int(rng.integers(4)) if rng.random() < 0.2 else None  # top, bottom, left, right
    band = pad + round(rng.uniform(0.04, 0.15) * min(height, width)) if side is not None else 0
    margin = pad + round(0.02 * long)
    low = [margin + band * (side == 0), margin + band * (side == 2)]
    high = [page.shape[0] - margin - band * (side == 1) - stroke.shape[0],
            page.shape[1] - margin - band * (side == 3) - stroke.shape[1]]
    top, left = (int(rng.integers(lo, max(lo, hi) + 1)) for lo, hi in zip(low, high))
    kind = _PAPERS[int(rng.integers(3))]
    if kind != "plain":
        _draw_lines(page, kind, paper, stroke.shape[0], long, pad, left, rng)
    if side is not None:  # a darker table along one side
        colour = rng.uniform(0.15, 0.5) * np.array([1, rng.uniform(0.75, 1), rng.uniform(0.55, 1)])
        page[[np.s_[:band], np.s_[-band:], np.s_[:, :band], np.s_[:, -band:]][side]] = colour
    ink_kind = ("blue", "black", "pencil")[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    ink = np.array([rng.uniform(*span) for span in _INKS[ink_kind]], np.float32)
    box = page[top:top + stroke.shape[0], left:left + stroke.shape[1]]
    stroke = stroke[:box.shape[0], :box.shape[1]]  # a digit wider than a narrow page is cut
    box += (ink - box) * (rng.uniform(0.85, 1.0) * stroke)[:, :, None]
    if rng.random() < 0.3:
        _stray_mark(page, ink, (top, left, top + stroke.shape[0], left + stroke.shape[1]), margin, rng)
    page *= _lighting(*page.shape[:2], rng)
    return _camera(page, width, height, rng), kind + ("+table" if side is not None else "")


def photo_digits(digits, seed: int = 0) -> tuple[list, list]:
    """Phone photos of handwritten `digits` (uint8 [N, 28, 28], MNIST's test digits in this
    project: `helpers.mnist_test_sample`): (PIL RGB pictures, paper kinds).

    Each digit is drawn as a pen stroke, thin to thick. Each picture is 400 to 1200 px (square to 16:9, either way up)
    of plain, ruled or squared paper with one digit in blue, black or pencil-grey ink, from
    80 px tall up to 70 % of the shorter side, anywhere. The light falls off across the page;
    sometimes there is a stray mark, a red margin line, or the dark table beyond the sheet's
    edge; the whole is turned by up to 5 degrees, blurred, noisy and saved as JPEG at quality
    50 to 90.
    """
    rng = np.random.default_rng(seed)
    photos, papers = zip(*(_photo_of(np.asarray(digit), rng) for digit in digits)) if len(digits) else ((), ())
    return list(photos), list(papers)


def clean_digits(digits, seed: int = 0) -> list:
    """Handwritten `digits` (uint8 [N, 28, 28], as `photo_digits` takes them) drawn dark on flat
    light paper: PIL grayscale pictures.

    Each is a pen stroke (thin to thick), 30 to 70 % of the shorter side tall, off-centre on a
    150 to 400 px picture, with mild pixel noise.
    """
    from PIL import Image
    rng = np.random.default_rng(seed)
    made = []
    for digit in np.asarray(digits):
        height, width = rng.integers(150, 401, size=2)
        stroke = _pen_stroke(digit, round(rng.uniform(0.3, 0.7) * min(height, width)), rng)
        stroke = stroke[:height - 4, :width - 4]  # a very wide digit on a narrow picture
        top = int(rng.integers(2, height - stroke.shape[0] - 1))
        left = int(rng.integers(2, width - stroke.shape[1] - 1))
        paper, ink = rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.3)
        page = np.full((height, width), paper, np.float32)
        page[top:top + stroke.shape[0], left:left + stroke.shape[1]] -= (paper - ink) * stroke
        page += rng.normal(0, rng.uniform(0.003, 0.02), page.shape)
        made.append(Image.fromarray((255 * page.clip(0, 1)).round().astype(np.uint8)))
    return made


_SAMPLE_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
_SAMPLE_GRIDS = ("s1045.ima.gz", "jacksboro_fault_dem.npz", "topobathy.npz",
                "axes_grid/bivariate_normal.npy")


def _sample_grid(name: str, rng):
    """One of matplotlib's sample grids (an MRI slice, elevations) as a picture: plain,
    hill-shaded or colour-mapped."""
    import matplotlib.cbook as cbook
    from matplotlib import colormaps
    from matplotlib.colors import LightSource
    from PIL import Image
    if name.endswith(".gz"):
        with cbook.get_sample_data(name) as file:
            grid = np.frombuffer(file.read(), np.uint16).reshape(256, 256).astype(np.float32)
    elif name.endswith(".npz"):
        data = cbook.get_sample_data(name)
        grid = data["elevation" if "elevation" in data else "topo"].astype(np.float32)
    else:
        grid = np.load(cbook.get_sample_data(name, asfileobj=False)).astype(np.float32)
    grid = (grid - grid.min()) / max(float(np.ptp(grid)), 1e-6)
    style = 0 if name.endswith(".gz") else int(rng.integers(3))
    if style == 1:
        grid = LightSource(azdeg=rng.uniform(0, 360), altdeg=rng.uniform(20, 60)).hillshade(
            grid, vert_exag=rng.uniform(5, 50))
    if style == 2:
        colours = colormaps[("viridis", "terrain", "gray", "magma")[int(rng.integers(4))]](grid)
        return Image.fromarray((255 * colours[..., :3]).astype(np.uint8), "RGB")
    return Image.fromarray((255 * grid.clip(0, 1)).astype(np.uint8), "L")


def nondigit_photos(count: int = 500, seed: int = 0) -> list:
    """Pictures that show no digit: crops of matplotlib's sample pictures (PIL images).

    The sources take turns: Grace Hopper's portrait, a blue present, the matplotlib logo
    (keeping its transparency in half of its crops), an MRI slice and three elevation maps
    (plain, hill-shaded or colour-mapped). Each crop covers 15 to 100 % of its source's shorter
    side, with an aspect from 1:2 to 2:1, is resized to 64 to 600 px, and most are then
    blurred, made noisy and saved as JPEG, as a phone would.
    """
    import matplotlib.cbook as cbook
    from PIL import Image
    rng = np.random.default_rng(seed)
    photos = {name: Image.open(cbook.get_sample_data(name, asfileobj=False)) for name in _SAMPLE_PHOTOS}
    names = _SAMPLE_PHOTOS + _SAMPLE_GRIDS
    made = []
    for index in range(count):
        name = names[index % len(names)]
        source = photos[name] if name in photos else _sample_grid(name, rng)
        width, height = source.size
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        side = rng.uniform(0.15, 1.0) * min(width, height)
        w = max(8, min(width, round(side * math.sqrt(aspect))))
        h = max(8, min(height, round(side / math.sqrt(aspect))))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        scale = int(rng.integers(64, 601)) / max(w, h)
        crop = source.crop((x, y, x + w, y + h)).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        if not (crop.mode == "RGBA" and rng.random() < 0.5) and rng.random() < 0.8:
            crop = _phone_camera(crop.convert("RGB"), rng)
        made.append(crop)
    return made

