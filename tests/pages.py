"""Pictures of one digit that touches the picture's edge, made here for the tests: a digit at an
edge or a corner of a larger page, or cropped close on one to four sides, in blue or black ink on
white, grey or coloured paper, under even or uneven light."""
import numpy as np
from PIL import Image

INKS = {"blue": (35, 55, 150), "black": (25, 25, 28)}
PAPERS = {"white": (242, 242, 238), "grey": (168, 170, 172), "yellow": (236, 226, 140)}
EDGES = ("top", "bottom", "left", "right")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
CROPS = ("top", "top+bottom", "top+bottom+left", "all four")  # the sides a crop touches
_SHEET = 600  # px: a sheet of paper, photographed whole


def enlarged(digit: np.ndarray, height: int) -> np.ndarray:
    """A digit's ink [h, w] in [0, 1], cropped to its box and enlarged (bicubic) to `height` px."""
    digit = np.asarray(digit, np.float32)
    digit = digit / digit.max()
    rows, cols = np.nonzero(digit > 0.05)
    box = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    width = max(1, round(box.shape[1] * height / box.shape[0]))
    image = Image.fromarray((255 * box).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 255


def _on_paper(cover: np.ndarray, ink: str, paper: str, uneven: bool, seed: int) -> Image.Image:
    """Ink `cover` [H, W] in [0, 1] as an RGB picture: paper, ink, light and a little noise."""
    rng = np.random.default_rng(seed)
    colour = cover[:, :, None] * np.array(INKS[ink], np.float32) \
        + (1 - cover[:, :, None]) * np.array(PAPERS[paper], np.float32)
    if uneven:  # light falling off across the sheet, from a random side: by a third over
        height, width = cover.shape  # _SHEET px, so a close crop sees a part of that fall
        y, x = np.mgrid[0:height, 0:width]
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (x - width / 2) + np.sin(angle) * (y - height / 2)) / _SHEET + 0.5
        colour = colour * (1 - 0.35 * ramp.clip(0, 1))[:, :, None]
    colour = colour + rng.normal(0, 3, colour.shape)
    return Image.fromarray(colour.clip(0, 255).round().astype(np.uint8))


def at_place(cover: np.ndarray, place: str, page: int, ink="blue", paper="white", uneven=False, seed=0):
    """The digit's ink on a `page` x `page` picture, touching the edge or corner `place` names
    ("top", "bottom-left", ...; "centre" touches none), centred along the other direction."""
    height, width = cover.shape
    top = {"top": 0, "bottom": page - height}.get(next((s for s in ("top", "bottom") if s in place), ""), (page - height) // 2)
    left = {"left": 0, "right": page - width}.get(next((s for s in ("left", "right") if s in place), ""), (page - width) // 2)
    sheet = np.zeros((page, page), np.float32)
    sheet[top:top + height, left:left + width] = cover
    return _on_paper(sheet, ink, paper, uneven, seed)


def cropped(cover: np.ndarray, crop: str, margin: int, ink="blue", paper="white", uneven=False, seed=0):
    """The digit's ink with `margin` px of paper on each side but those `crop` names, where the
    ink touches the picture's edge."""
    touched = {side: crop == "all four" or side in crop.split("+") for side in EDGES}
    pads = tuple(0 if touched[side] else margin for side in EDGES)  # top, bottom, left, right
    sheet = np.pad(cover, ((pads[0], pads[1]), (pads[2], pads[3])))
    return _on_paper(sheet, ink, paper, uneven, seed)
