"""A digit that touches the picture's edge is read: at each edge and corner of a larger page, and
cropped close on one to four sides, in blue or black ink, on white, grey or yellow paper, under
even or uneven light. The page's own structure is still dropped: a ruled line, the table beyond
the sheet, specks."""
import numpy as np
import pytest
from PIL import Image

import inference
from conftest import predict
import pages
import pictures
from test_pictures import first_read_right

STYLES = [("blue", "white", False), ("black", "grey", True), ("blue", "yellow", True), ("black", "white", True)]


def uci_digits(model):
    """One of UCI's 8 x 8 digits (scikit-learn's copy) of each kind that the model reads right
    on the middle of a page: handwriting by other writers, scanned far coarser than MNIST."""
    from sklearn.datasets import load_digits
    uci = load_digits()
    chosen = {}
    for image, label in zip(uci.images, uci.target.tolist()):
        if label in chosen:
            continue
        cover = pages.enlarged(image, 84)
        if predict(model, pages.at_place(cover, "centre", 200), 0) == (label, label):
            chosen[label] = cover
        if len(chosen) == 10:
            return chosen
    raise AssertionError(f"the model reads no UCI digit right of kinds {set(range(10)) - set(chosen)}")


@pytest.fixture(scope="module")
def digits(trained, raw_mnist):
    model = trained[0]
    mnist = {digit: pages.enlarged(first_read_right(model, raw_mnist, digit).numpy(), 84) for digit in range(10)}
    return {"MNIST": mnist, "UCI": uci_digits(model)}


def read(model, drawn: dict) -> tuple[int, int]:
    """(refused, read right) over {digit: picture}, each with the number 4."""
    labels = list(drawn)
    counts = inference.tally(model, [drawn[digit] for digit in labels], labels, [4] * len(labels))
    return counts["refused"], counts["right"]


@pytest.mark.parametrize("source", ["MNIST", "UCI"])
@pytest.mark.parametrize("place", pages.EDGES + pages.CORNERS)
def test_a_digit_at_an_edge_or_a_corner_of_the_page_is_read(trained, digits, source, place):
    drawn = {digit: pages.at_place(cover, place, 200, *STYLES[digit % 4], seed=digit)
             for digit, cover in digits[source].items()}
    assert read(trained[0], drawn) == (0, 10)


@pytest.mark.parametrize("source, crop, most_refused, least_right", [
    ("MNIST", "top", 0, 10), ("MNIST", "top+bottom", 0, 9), ("MNIST", "top+bottom+left", 0, 9),
    ("MNIST", "all four", 0, 9), ("UCI", "top", 0, 9),
    ("UCI", "top+bottom", 1, 7), ("UCI", "top+bottom+left", 1, 7), ("UCI", "all four", 2, 6),
])
def test_a_digit_cropped_close_is_read(trained, digits, source, crop, most_refused, least_right):
    """UCI's blurred strokes, as thick as a quarter of the digit, read worse cropped close on
    several sides, the known shortfall: where the light is uneven, the paper's brightness is
    found with a window narrower than such strokes, which erases part of them."""
    drawn = {digit: pages.cropped(cover, crop, 30, *STYLES[digit % 4], seed=digit)
             for digit, cover in digits[source].items()}
    refused, right = read(trained[0], drawn)
    assert refused <= most_refused and right >= least_right, (refused, right)


def test_the_page_s_structure_is_dropped_beside_a_digit(trained, digits):
    """A ruled line across the page, the dark table along one side, and specks: the digit is
    read as if they were not there."""
    model = trained[0]
    for digit, cover in digits["MNIST"].items():
        sheet = np.zeros((240, 240), np.float32)
        sheet[70:70 + cover.shape[0], 90:90 + cover.shape[1]] = cover
        sheet[40:42] = sheet[200:202] = 1.0  # two ruled lines across the page
        sheet[:, :22] = 1.0  # the table beyond the sheet's left edge
        sheet[220:223, 200:203] = sheet[15:17, 150:152] = 1.0  # specks
        picture = pages._on_paper(sheet, "black", "white", uneven=False, seed=digit)
        kept = pictures.preparation_steps(picture)["kept"].numpy()
        rows, cols = np.nonzero(kept)
        assert rows.min() >= 65 and cols.min() >= 85 and rows.max() <= 160, digit  # the digit alone
        assert predict(model, picture, 4) == (digit, digit + 4)


@pytest.mark.parametrize("make, message", [
    (lambda sheet: sheet.__setitem__((slice(None), slice(0, 30)), 1.0), "only lines"),  # a table, no digit
    (lambda sheet: sheet.__setitem__((slice(100, 103), slice(None)), 1.0), "only lines"),  # a ruled line
], ids=["the table's edge alone", "a ruled line alone"])
def test_a_page_with_only_its_structure_is_refused(make, message):
    sheet = np.zeros((200, 260), np.float32)
    make(sheet)
    with pytest.raises(pictures.NoDigitError, match=message):
        pictures.frame_digit(pages._on_paper(sheet, "black", "white", uneven=False, seed=0))


def test_the_pages_look_as_described():
    """The pictures these tests make: the digit's ink touches the edges named, and nothing else."""
    cover = np.zeros((40, 30), np.float32)
    cover[:, 10:14] = 1.0  # a bar, top to bottom
    for crop, touched in (("top", {"top"}), ("top+bottom", {"top", "bottom"}),
                          ("all four", {"top", "bottom"})):  # the bar's box is the crop's box
        picture = np.asarray(pages.cropped(cover, crop, 20).convert("L")) < 128
        sides = {"top": picture[0], "bottom": picture[-1], "left": picture[:, 0], "right": picture[:, -1]}
        assert {name for name, side in sides.items() if side.any()} == touched, crop
    corner = np.asarray(pages.at_place(np.ones((30, 20), np.float32), "bottom-right", 100).convert("L")) < 128
    assert corner[-1, -1] and not corner[0, 0] and corner.sum() == 600
    assert isinstance(pages.at_place(cover, "centre", 100, "blue", "yellow", True), Image.Image)
