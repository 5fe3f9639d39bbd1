"""Reading a picture: preparing any picture the way MNIST was made, `predict`, and the one
rule for when an answer is "not sure"."""
import numpy as np
import pytest
import torch
from PIL import Image

import helpers
import inference
from conftest import predict
import pictures
import synthetic
import plots


def test_predict_accepts_every_image_form(trained, raw_test):
    model, _ = trained
    digit_probs, sum_probs = inference.read_pictures(model, raw_test[:8], list(range(8)))
    assert digit_probs.shape == (8, 10) and sum_probs.shape == (8, 19)
    for index in range(3):
        answer = (int(digit_probs[index].argmax()), int(sum_probs[index].argmax()))
        image = raw_test[index]
        colour = image.numpy()[:, :, None].repeat(3, axis=2)
        for form in (image, image.float() / 255, image[None], image.numpy(),
                     image.numpy().astype(np.float64) / 255, Image.fromarray(image.numpy()),
                     colour, Image.fromarray(colour), image[None].expand(3, 28, 28)):
            assert predict(model, form, index) == answer
        assert predict(model, image, np.int64(index)) == answer
        assert predict(model, image, torch.tensor(index)) == answer


def test_prepared_mnist_keeps_its_answers(trained, raw_test, test_split):
    """MNIST is already in MNIST's form: preparing it again changes next to no answer.

    Counted on the answers the model is sure of (top probability at least 0.9): a borderline
    answer can flip with the last bit of a kernel, which differs between CPUs.
    """
    model, _ = trained
    count = 1000
    direct = helpers.normalize(raw_test[:count].float() / 255)[:, None]
    numbers = test_split.numbers[:count]
    with torch.no_grad():
        digit_lp, sum_lp = model.eval()(direct, numbers)
    sure = digit_lp.exp().amax(1) >= 0.9
    assert sure.float().mean() > 0.8
    after = [probs.argmax(1) for probs in inference.read_pictures(model, raw_test[:count], numbers)]
    for old, new in zip((digit_lp.argmax(1), sum_lp.argmax(1)), after):
        assert (old == new)[sure].float().mean() >= 0.998  # at most 2 of 1,000 differ
        assert (old == new).float().mean() >= 0.99


def as_photo(digit: torch.Tensor, size=(150, 120), at=(10, 30), paper=200, scale=3):
    """An MNIST digit as dark ink on light paper: enlarged, anywhere in a bigger picture."""
    big = torch.nn.functional.interpolate(digit[None, None].float(), scale_factor=scale,
                                          mode="bilinear")[0, 0]
    page = torch.zeros(size)
    page[at[0]:at[0] + big.shape[0], at[1]:at[1] + big.shape[1]] = big
    return (paper - page / 255 * (paper - 20)).round().clamp(0, 255).to(torch.uint8)


def test_an_inverted_enlarged_off_centre_digit_reads_as_its_label(trained, raw_mnist):
    """Twenty MNIST digits the model reads right as they are, each drawn dark on light,
    enlarged three times, in two corners of a larger picture."""
    model, _ = trained
    right = 0
    for index in range(20):
        digit, label = raw_mnist.data[index], int(raw_mnist.targets[index])
        for at in ((5, 5), (60, 20)):
            photo = as_photo(digit, at=at)
            assert photo[0, 0] == 200 and photo.float().mean() > 150  # dark on light
            right += predict(model, photo, 5) == (label, label + 5)
    assert right >= 38  # of 40; enlarging and shrinking back resamples the strokes


def test_preparation_frames_the_digit_as_mnist_did(raw_test):
    """An MNIST digit, enlarged and inverted at the bottom left of a larger picture, comes back
    light on black, its longer side 20 px, centred by mass, and looking like the original."""
    original = raw_test[0].float() / 255
    steps = pictures.preparation_steps(as_photo(raw_test[0], at=(60, 0)))
    assert set(steps) == {"picture", "ink", "kept", "cropped", "framed"}
    framed = steps["framed"]
    assert framed.shape == (28, 28) and framed[0].max() == 0 and framed.max() > 0.9  # light on black
    rows, cols = framed.sum(1), framed.sum(0)
    centre = [float((line * torch.arange(28)).sum() / line.sum()) for line in (rows, cols)]
    assert all(abs(c - 14) <= 0.5 for c in centre), centre  # MNIST: 14.0 in pixel indices
    box = framed.nonzero()
    assert (box.max(0).values - box.min(0).values + 1).max() == 20  # longer side fits 20 px
    likeness = torch.nn.functional.cosine_similarity(framed.flatten(), original.flatten(), dim=0)
    assert likeness > 0.85, likeness  # the same digit, not just some digit


PHOTO = {"paper": "ruled", "size": (700, 900), "height": 300, "at": (200, 350), "pen": 0.3,
         "light": 0.55, "quality": 60, "stray": False, "table": False}


def handmade_photo(digit: torch.Tensor, **changes):
    """A phone photo made by hand, independently of synthetic.photo_digits: an MNIST digit drawn
    as a pen stroke `height` px tall (a lower `pen` is a thicker pen) in dark blue ink at `at`
    on plain, ruled or squared paper, the light falling to `light` across the page, maybe a
    stray dot or a dark table along the left edge, saved as JPEG at `quality` (see PHOTO)."""
    import io
    setting = {**PHOTO, **changes}
    paper, (rows, cols), height, at, pen = (setting[key] for key in ("paper", "size", "height", "at", "pen"))
    page = np.full((rows, cols, 3), 235, np.float32)
    if paper in ("ruled", "squared"):
        page[20::40] = page[21::40] = (150, 185, 230)  # light blue lines, 2 px thick
    if paper == "squared":
        page[:, 20::40] = page[:, 21::40] = (170, 200, 235)
    scale = height / 20  # MNIST's digits are about 20 px tall
    big = Image.fromarray(digit.numpy()).resize((round(28 * scale),) * 2, Image.Resampling.BICUBIC)
    stroke = np.clip((np.asarray(big, np.float32) / 255 - pen) * 4, 0, 1)[:, :, None]
    box = page[at[0]:at[0] + stroke.shape[0], at[1]:at[1] + stroke.shape[1]]
    box += (np.array([25, 30, 110], np.float32) - box) * stroke[:box.shape[0], :box.shape[1]]
    if setting["stray"]:
        page[rows - 80:rows - 68, 60:72] = (25, 30, 110)
    if setting["table"]:
        page[:, :cols // 12] = (70, 60, 50)
    page *= np.linspace(1, setting["light"], cols, dtype=np.float32)[None, :, None]
    buffer = io.BytesIO()
    Image.fromarray(page.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=setting["quality"])
    return Image.open(buffer)


def first_read_right(model, raw_test, digit):
    """The first MNIST test image of `digit` that the model reads right as it is."""
    for index in (raw_test.targets == digit).nonzero().flatten().tolist():
        if predict(model, raw_test.data[index], 0)[0] == digit:
            return raw_test.data[index]
    raise AssertionError(f"the model reads no {digit} right")


def test_thick_four_on_lined_paper_in_uneven_light_reads_four(trained, raw_mnist):
    """The issue's own example: a 900 x 700 JPEG of a thick-pen 4 on lined paper, with the
    light falling off across the page. The previous preparation read it as a 1."""
    model, _ = trained
    photo = handmade_photo(first_read_right(model, raw_mnist, 4), pen=0.05)
    assert photo.size == (900, 700) and photo.format == "JPEG"
    assert predict(model, photo, 3) == (4, 7)


PHOTO_CASES = {
    "ruled paper": {},
    "squared paper": {"paper": "squared"},
    "plain paper, uneven light": {"paper": "plain", "light": 0.4},
    "small digit in a big frame": {"size": (900, 1200), "height": 80, "at": (600, 150)},
    "thin pen, JPEG quality 40": {"pen": 0.5, "quality": 40},
    "a stray mark": {"stray": True},
    "the sheet's edge": {"table": True},
}


@pytest.mark.parametrize("case", PHOTO_CASES, ids=list(PHOTO_CASES))
def test_photos_read_like_the_digits_they_show(trained, raw_mnist, case):
    model, _ = trained
    right = 0
    for digit in range(10):
        photo = handmade_photo(first_read_right(model, raw_mnist, digit), **PHOTO_CASES[case])
        right += predict(model, photo, 5) == (digit, digit + 5)
    assert right >= 9  # of 10


def test_photo_set_reads_far_better_prepared_than_naive(trained):
    model, _ = trained
    digits, labels = helpers.mnist_test_sample(40, seed=7)
    photos, papers = synthetic.photo_digits(digits, seed=7)
    assert {"plain", "ruled", "squared"} <= {paper.split("+")[0] for paper in papers}
    assert all(min(p.size) >= 225 and p.mode == "RGB" for p in photos)
    numbers = helpers.draw_numbers(40, seed=8)
    prepared, everything, naive = (inference.tally(model, photos, labels, numbers, framing)["right"] / 40
                                   for framing in (pictures.frame_digit, pictures.frame_all_ink, pictures.squash))
    assert prepared >= 0.85 and prepared > everything + 0.2 and prepared > naive + 0.5


def test_clean_digits_read_well(trained):
    model, _ = trained
    digits, labels = helpers.mnist_test_sample(40, seed=7)
    drawn = synthetic.clean_digits(digits, seed=7)
    assert all(p.mode == "L" and 150 <= min(p.size) <= 400 for p in drawn)
    assert inference.tally(model, drawn, labels, helpers.draw_numbers(40, seed=8))["right"] >= 34


def test_font_digits_read_well_and_far_better_than_naive(trained):
    """Printed digits, from matplotlib's fonts: 95 % read right when written, naive 10 %."""
    model, _ = trained
    printed, labels = synthetic.font_digits(60, seed=0)
    assert len(printed) == 60 and labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert all(min(p.size) >= 64 and p.mode == "L" for p in printed)
    numbers = helpers.draw_numbers(60, seed=1)
    prepared = inference.tally(model, printed, labels, numbers)["right"]
    naive = inference.tally(model, printed, labels, numbers, pictures.squash)["right"]
    assert prepared >= 50 and prepared > naive + 30, (prepared, naive)


@pytest.mark.parametrize("page, message", [
    (np.full((90, 60), 230, np.uint8), "no ink"),
    (np.full((28, 28), 0, np.uint8), "no ink"),
    (np.random.default_rng(0).integers(0, 256, (100, 100)).astype(np.uint8), "no digit"),
    (np.random.default_rng(1).random((40, 40)), "no digit"),
], ids=["white page", "black square", "noise", "float noise"])
def test_no_ink_no_answer(trained, page, message):
    with pytest.raises(pictures.NoDigitError, match=message):
        predict(trained[0], page, 3)


BAD_INPUTS = [
    ("number 10", lambda img: (img, 10), ValueError, "0..9"),
    ("number -1", lambda img: (img, -1), ValueError, "0..9"),
    ("number 3.5", lambda img: (img, 3.5), TypeError, "integer"),
    ("number '7'", lambda img: (img, "7"), TypeError, "integer"),
    ("number None", lambda img: (img, None), TypeError, "integer"),
    ("number True", lambda img: (img, True), TypeError, "integer"),
    ("float tensor number", lambda img: (img, torch.tensor(3.0)), TypeError, "integer"),
    ("five channels", lambda img: (img[None].expand(5, 28, 28), 1), ValueError, "C 1, 3 or 4"),
    ("a batch, not one image", lambda img: (img[None, None].expand(2, 1, 28, 28), 1), ValueError,
     "one grayscale or colour picture"),
    ("empty image", lambda img: (img[:0], 1), ValueError, "empty"),
    ("NaN pixel", lambda img: (torch.full((28, 28), float("nan")), 1), ValueError, "NaN"),
    ("normalized float", lambda img: ((img.float() / 255 - 0.13) / 0.31, 1), ValueError, r"\[0, 1\]"),
    ("integer above 255", lambda img: (img.long() * 2, 1), ValueError, "0..255"),
    ("a list", lambda img: (img.tolist(), 1), TypeError, "tensor, NumPy array or PIL"),
    ("bool image", lambda img: (img > 0, 1), TypeError, "dtype"),
    ("string array", lambda img: (np.array([["a"] * 28] * 28), 1), TypeError, "dtype"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_a_wrong_call_gets_a_clear_error_not_no_digit(trained, raw_test, case):
    model, _ = trained
    _, make, error, message = case
    picture, number = make(raw_test[0])
    with pytest.raises(error, match=message) as raised:
        predict(model, picture, number)
    assert not isinstance(raised.value, pictures.NoDigitError)
    with pytest.raises(error, match=message):  # and the batch function does not hide it
        inference.read_pictures(model, [raw_test[1], picture], [2, number])


def test_an_answer_holds_probabilities_that_sum_to_one_and_agree_with_the_batch(trained, raw_test):
    model, _ = trained
    batch = inference.read_pictures(model, raw_test[:5], [6] * 5)
    for index in range(5):
        answer = inference.answer(model, raw_test[index], 6)
        assert answer.digit_probs.shape == (10,) and answer.sum_probs.shape == (19,)
        assert float(answer.digit_probs.sum()) == pytest.approx(1, abs=1e-5)
        assert float(answer.sum_probs.sum()) == pytest.approx(1, abs=1e-5)
        assert torch.allclose(answer.digit_probs, batch[0][index], atol=1e-5)
        assert (answer.digit, answer.total) == (int(batch[0][index].argmax()), int(batch[1][index].argmax()))


def test_a_picture_with_no_digit_does_not_stop_the_others(trained, raw_test):
    model, _ = trained
    images = [raw_test[0], np.full((60, 60), 250, np.uint8), raw_test[1]]
    digit_probs, sum_probs = inference.read_pictures(model, images, [1, 2, 3])
    assert digit_probs[1].isnan().all() and sum_probs[1].isnan().all()
    assert not digit_probs[[0, 2]].isnan().any()
    assert (int(digit_probs[0].argmax()), int(sum_probs[0].argmax())) == predict(model, raw_test[0], 1)
    labels = [int(digit_probs[0].argmax()), 0, int(digit_probs[2].argmax())]  # the refused one is a 0
    counts = inference.tally(model, images, labels, [1, 2, 3])
    assert counts["pictures"] == 3 and counts["refused"] == 1 and counts["right"] == 2
    assert counts["flagged"] >= 1 and counts["confidently_wrong"] == 0


def one_hot(index, classes, value=0.91):
    probs = torch.full((classes,), (1 - value) / (classes - 1))
    probs[index] = value
    return probs


def test_an_answer_is_sure_only_when_confident_and_the_heads_agree():
    sure = inference.Answer(one_hot(4, 10), one_hot(11, 19), 7)
    assert sure.sure and str(sure) == "digit 4 (91 % sure), 4 + 7 = 11" and sure.title == "4 + 7 = 11"
    unsure_digit = torch.zeros(10)
    unsure_digit[4], unsure_digit[9], unsure_digit[1] = 0.55, 0.40, 0.05
    unsure = inference.Answer(unsure_digit, one_hot(11, 19), 7)
    assert not unsure.sure and str(unsure) == "not sure: 4 (55 %) or 9 (40 %)"
    assert unsure.title == "not sure: 4 or 9, + 7"
    disagree = inference.Answer(one_hot(4, 10), one_hot(12, 19), 7)  # 4 + 7 is not 12
    assert not disagree.sure and "+ 7 = 12" not in str(disagree) and "4 + 7 = 11" not in disagree.title
    assert str(disagree) == "not sure: the digit looks like a 4 (91 %), but the sum head answers 12, not 4 + 7 = 11"
    rows = inference.is_sure(torch.stack([one_hot(4, 10), one_hot(4, 10), unsure_digit]),
                           torch.stack([one_hot(11, 19), one_hot(12, 19), one_hot(11, 19)]), [7, 7, 7])
    assert rows.tolist() == [True, False, False]
    line = inference.MIN_CONFIDENCE  # the line itself is sure; a hair below it is not
    at_line = inference.Answer(one_hot(4, 10, value=line), one_hot(11, 19), 7)
    below = inference.Answer(one_hot(4, 10, value=line - 1e-4), one_hot(11, 19), 7)
    assert at_line.sure and not below.sure and str(below).startswith("not sure: 4")


def test_the_mistakes_grid_never_prints_false_arithmetic(monkeypatch, test_split):
    """Each mistake reads "<kind> / true 3 + 4 = 7 / read 5, sum 10", never "5 + 4 = 10": the rare
    pairs where one head is wrong come before those where both are, so that every kind shows."""
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, "show", lambda: None)
    test = test_split.first(3)
    digit_pred, sum_pred = test.labels.clone(), test.sums.clone()
    digit_pred[0] = (digit_pred[0] + 1) % 10  # digit wrong, sum right: the heads disagree
    sum_pred[1] += 1  # digit right, sum wrong
    digit_pred[2], sum_pred[2] = (digit_pred[2] + 1) % 10, sum_pred[2] + 1  # both wrong: shown last
    result = helpers.Evaluation(0.0, 0.0, 1, 2, 1, 1, 3, torch.zeros(10, 10), torch.zeros(19, 19),
                                digit_pred, sum_pred)
    plots.show_mistakes(test, result)
    titles = [axis.get_title() for axis in plt.gcf().axes if axis.get_title()]
    plt.close("all")
    assert [title.splitlines()[0] for title in titles] == ["sum wrong", "digit wrong", "both wrong"]
    for title, i in zip(titles, (1, 0, 2)):
        truth, said = title.splitlines()[1:]
        assert truth == f"true {int(test.labels[i])} + {int(test.numbers[i])} = {int(test.sums[i])}"
        assert said == f"read {int(digit_pred[i])}, sum {int(sum_pred[i])}", said


def test_pictures_of_no_digit_are_flagged_and_digits_are_not(trained):
    """Flagged: refused by the preparation, or not sure. The small test model trained with
    outlier exposure, on 8,000 images; the full model's rates are the notebook's."""
    model, _ = trained
    nondigits = synthetic.nondigit_photos(60, seed=5)
    assert len(nondigits) == 60 and all(min(p.size) >= 1 for p in nondigits)
    counts = inference.tally(model, nondigits, [0] * 60, [0] * 60)
    assert 0 < counts["refused"] < 60  # some refused outright, some read and doubted
    assert counts["flagged"] >= 51  # 85 %
    digits, labels = helpers.mnist_test_sample(40, seed=5)
    photos, _ = synthetic.photo_digits(digits, seed=5)
    digits = inference.tally(model, photos, labels, helpers.draw_numbers(40, seed=0))
    assert digits["flagged"] <= 6 and digits["confidently_wrong"] <= 1, digits  # 15 %; 2.5 %


def test_phone_orientation_and_16_bit_pictures_read_as_they_look(trained, raw_test, tmp_path):
    """A phone stores a portrait photo sideways with an EXIF tag saying how to turn it; a
    scanner may save 16-bit grayscale. Both must read as the picture looks."""
    model, _ = trained
    upright = Image.fromarray(as_photo(raw_test[0], size=(150, 120), at=(20, 20)).numpy())
    expected = predict(model, upright, 3)
    sideways = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=95, exif=exif)
    assert expected == (7, 10)  # MNIST's first test digit is a 7
    assert predict(model, pictures.read_image(sideways), 3) == expected
    sixteen = Image.fromarray((np.asarray(upright, np.uint16) * 257).astype(np.uint16))
    assert sixteen.mode.startswith("I;16") and predict(model, sixteen, 3) == expected
    assert predict(model, np.asarray(upright).astype(np.uint16), 3) == expected
    with pytest.raises(ValueError, match="0..255"):
        predict(model, np.asarray(upright).astype(np.uint16) * 257, 3)


def test_a_stroke_lost_with_an_edge_line_is_refused_clearly(trained):
    page = np.full((100, 100), 240, np.uint8)
    page[:2] = 20  # a line along the top edge
    page[3, 40:52] = 20  # a thin stroke just below it, within the line's rim
    with pytest.raises(pictures.NoDigitError, match="no digit found: only lines along"):
        predict(trained[0], page, 1)


def test_read_pictures_refuses_a_wrong_batch_in_one_line(trained, raw_test):
    model, _ = trained
    images = raw_test[:3]
    for call, error, message in [((images[:0], []), ValueError, "empty"),
                                 ((images, [1, 2]), ValueError, "3 images but 2 numbers"),
                                 ((images, 5), TypeError, "sequence"),
                                 ((images, [1, 2.5, 3]), TypeError, "integer"),
                                 ((images[0], [1]), ValueError, "batch of pictures")]:
        with pytest.raises(error, match=message):
            inference.read_pictures(model, *call)
    digit_probs, _ = inference.read_pictures(model, images, torch.tensor([1, 2, 3]))
    mixed = [as_photo(raw_test[0]), raw_test[1].numpy(), Image.fromarray(raw_test[2].numpy())]
    mixed_probs, _ = inference.read_pictures(model, mixed, [1, 2, 3])  # a list: any sizes
    assert torch.equal(mixed_probs.argmax(1), digit_probs.argmax(1))


# ----------------------------------------------------------------------------- pictures people really have

def mnist_digits(model, raw_mnist):
    """One MNIST test digit of each kind that the model reads right as it is."""
    return {digit: first_read_right(model, raw_mnist, digit) for digit in range(10)}


def on_paper(digit: torch.Tensor, scale: int, paper, ink, margin: int = 0) -> Image.Image:
    """An MNIST digit enlarged `scale` times (bicubic), cropped to its ink, drawn in colour
    `ink` on colour `paper` with `margin` px around it."""
    rows, cols = digit.nonzero(as_tuple=True)
    box = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1].numpy()
    big = np.asarray(Image.fromarray(box).resize((box.shape[1] * scale, box.shape[0] * scale),
                                                 Image.Resampling.BICUBIC), np.float32) / 255
    cover = np.pad(big, margin)[:, :, None]
    page = np.asarray(paper, np.float32) * (1 - cover) + np.asarray(ink, np.float32) * cover
    return Image.fromarray(page.clip(0, 255).round().astype(np.uint8))


def reads(model, drawn: dict) -> int:
    """How many of {digit: picture} are read as their digit, with the sum right."""
    return sum(predict(model, picture, 2) == (digit, digit + 2) for digit, picture in drawn.items())


def test_a_tight_crop_reads_although_its_strokes_touch_the_edges(trained, raw_mnist):
    """Each digit cropped to its own ink, enlarged 8 times, dark grey on light grey paper: the
    strokes touch all four edges, and the paper must still go to black."""
    model, _ = trained
    crops = {digit: on_paper(image, 8, (205,) * 3, (40,) * 3) for digit, image in mnist_digits(model, raw_mnist).items()}
    framed = pictures.preparation_steps(crops[0])["framed"]
    assert float(framed[:, :3].max()) == 0 and float(framed[:, -3:].max()) == 0  # black beside the digit
    assert reads(model, crops) >= 9


PEN_STROKES = {  # digits as a person draws them with a pen, in a unit box (x right, y down)
    1: [[(0.6, 0.0), (0.45, 1.0)]],
    4: [[(0.7, 1.0), (0.7, 0.0), (0.0, 0.65), (1.0, 0.65)]],
    7: [[(0.0, 0.0), (1.0, 0.0), (0.35, 1.0)]],
    0: "ellipse",
}


def pen_digit(digit, pen: int, canvas=(1200, 900), height=420, at=(300, 240)):
    """One digit drawn with a `pen` px line, `height` px tall, on a large light page."""
    from PIL import ImageDraw
    page = Image.new("RGB", canvas, (236, 236, 232))
    draw = ImageDraw.Draw(page)
    width = 0.6 * height
    left, top = at
    if PEN_STROKES[digit] == "ellipse":
        draw.ellipse((left, top, left + width, top + height), outline=(25, 25, 60), width=pen)
    for line in [] if PEN_STROKES[digit] == "ellipse" else PEN_STROKES[digit]:
        draw.line([(left + x * width, top + y * height) for x, y in line], fill=(25, 25, 60), width=pen, joint="curve")
    return page


def test_a_thin_pen_on_a_large_page_is_thickened_as_mnist_strokes(trained):
    """A 3 px pen line on a 1200 px page would frame about 0.15 px wide: a ghost. Prepared, it
    frames about as wide as MNIST's strokes, and reads."""
    model, _ = trained
    for pen in (2, 3):
        drawn = {digit: pen_digit(digit, pen) for digit in PEN_STROKES}
        for picture in drawn.values():
            framed = pictures.preparation_steps(picture)["framed"]
            assert framed.max() > 0.9 and (framed > 0.5).sum() >= 25  # solid strokes, not a faint line
        assert reads(model, drawn) == len(PEN_STROKES), pen


def test_a_thin_pen_on_a_tiny_picture_is_thickened_too(trained):
    """A 1 px line on a 28 x 28 picture, as paint programs save them. At that size a 1 px and a
    2 px stroke look alike to the outline measure, so the digit is measured enlarged: prepared,
    its strokes are about twice as wide as drawn (as MNIST's are), and it reads."""
    model, _ = trained
    drawn = {digit: pen_digit(digit, 1, canvas=(28, 28), height=20, at=(8, 4)) for digit in PEN_STROKES}
    for picture in drawn.values():
        inked = int((np.asarray(picture.convert("L")) < 128).sum())
        assert (pictures.preparation_steps(picture)["framed"] > 0.5).sum() >= 1.5 * inked
    assert reads(model, drawn) == len(PEN_STROKES)


def test_tiny_and_faint_pictures_read(trained, raw_mnist):
    """A photo already shrunk to 28 x 28 in faint pencil (ink 0.16 darker than the paper), and a
    small digit in a 100 px picture."""
    model, _ = trained
    digits = mnist_digits(model, raw_mnist)
    faint = {digit: on_paper(image, 1, (200,) * 3, (158,) * 3, margin=4).resize((28, 28)) for digit, image in digits.items()}
    assert reads(model, faint) >= 9
    small = {}
    for digit, image in digits.items():
        page = Image.new("L", (100, 100), 230)
        page.paste(on_paper(image, 1, (230,) * 3, (30,) * 3).convert("L"), (40, 35))
        small[digit] = page
    assert reads(model, small) >= 9


def test_coloured_paper_and_coloured_ink_read(trained, raw_mnist):
    """A dark teal marker on a yellow-green sticky note, and red ink on white paper."""
    model, _ = trained
    digits = mnist_digits(model, raw_mnist)
    for paper, ink in (((200, 225, 110), (20, 80, 90)), ((250, 250, 250), (200, 30, 30))):
        drawn = {digit: on_paper(image, 6, paper, ink, margin=30) for digit, image in digits.items()}
        assert reads(model, drawn) >= 9, (paper, ink)


def test_a_transparent_background_reads_as_white_paper(trained, raw_mnist):
    """A PNG whose background is transparent, with black under the transparency (as some
    drawing programs save it): composited over white, the strokes show; read as RGB, the
    picture would be all black."""
    model, _ = trained
    drawn = {}
    for digit, image in mnist_digits(model, raw_mnist).items():
        cover = np.asarray(on_paper(image, 5, (0,) * 3, (255,) * 3, margin=20).convert("L"))
        rgba = np.zeros(cover.shape + (4,), np.uint8)
        rgba[..., 3] = cover  # ink opaque, paper transparent; the colour is black everywhere
        drawn[digit] = Image.fromarray(rgba, "RGBA")
    assert reads(model, drawn) >= 9
    with pytest.raises(pictures.NoDigitError):
        predict(model, drawn[3].convert("RGB"), 2)  # transparency thrown away: black
