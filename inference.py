"""Using a trained network on pictures: read any picture of a digit, answer with the digit, the
sum and how sure, and score folders of labelled pictures.

    answer = inference.answer(model, pictures.read_image("digit.jpg"), 7)
    print(answer)  # digit 3 (98 % sure), 3 + 7 = 10; or: not sure: 3 (61 %) or 5 (30 %)

Every picture is framed as MNIST's digits are (`pictures.frame_digit`) and read in plain fp32,
whatever the network was trained in. An answer is sure by one rule, `is_sure`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import helpers as h
from pictures import NoDigitError, frame_digit, read_image

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit


def _as_number(number) -> int:
    if isinstance(number, torch.Tensor) and number.numel() == 1 and not number.is_floating_point() \
            and number.dtype != torch.bool:
        number = int(number)
    elif isinstance(number, np.integer):
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"number must be an integer 0..9, got {number!r} ({type(number).__name__})")
    if not 0 <= number < h.NUM_DIGITS:
        raise ValueError(f"number must be in 0..9, got {number}")
    return number


def _checked_batch(images, numbers) -> tuple[list, list[int]]:
    """`read_pictures`' inputs as a list of pictures and a list of numbers 0..9, or one clear error."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a batch of pictures [B, H, W] or [B, C, H, W], "
                             f"got shape {list(images.shape)}")
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of pictures, or a batch array or tensor, "
                        f"got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("the batch of images is empty")
    if isinstance(numbers, (torch.Tensor, np.ndarray)):
        numbers = numbers.tolist() if numbers.ndim == 1 else [numbers]
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, "__len__"):
        raise TypeError(f"numbers must be a sequence of integers, got {type(numbers).__name__}")
    numbers = [_as_number(number) for number in numbers]
    if len(numbers) != len(images):
        raise ValueError(f"got {len(images)} images but {len(numbers)} numbers")
    return list(images), numbers


@torch.no_grad()
def _probabilities(model: h.Net, framed: list[torch.Tensor], numbers: list[int]):
    """Digit probabilities [B, 10] and sum probabilities [B, 19], on the CPU, for framed
    pictures [28, 28] and numbers, on the model's device, in exact fp32."""
    batch = h.normalize(torch.stack(framed))[:, None]
    device = next(model.parameters()).device
    model.eval()
    with h.exact_fp32(device):
        answers = [model(batch[start:start + 1000].to(device),  # a thousand at a time: bounded memory
                         torch.tensor(numbers[start:start + 1000], device=device))
                   for start in range(0, len(batch), 1000)]
    return [log_probs.exp() for log_probs in h.to_host(*(torch.cat(parts) for parts in zip(*answers)))]


def read_pictures(model: h.Net, images, numbers, framing=frame_digit):
    """(digit probabilities [N, 10], sum probabilities [N, 19]) for many pictures and their
    numbers, each picture framed by `framing` (`pictures.frame_digit`, or another from there to
    compare). A picture that shows no digit (NoDigitError) gets a row of NaN, and the others
    are still read; any other mistake in the call raises.

    `images`: a list of pictures, each as `frame_digit` takes it, or one array or tensor
    whose first dimension is the batch ([B, H, W], or [B, C, H, W] for a tensor).
    """
    images, numbers = _checked_batch(images, numbers)
    framed = []
    for image in images:
        try:
            framed.append(framing(image))
        except NoDigitError:
            framed.append(None)
    read = [index for index, picture in enumerate(framed) if picture is not None]
    digit_probs, sum_probs = torch.full((len(framed), h.NUM_DIGITS), float("nan")), \
        torch.full((len(framed), h.NUM_SUMS), float("nan"))
    if read:
        digit_probs[read], sum_probs[read] = _probabilities(model, [framed[i] for i in read],
                                                            [numbers[i] for i in read])
    return digit_probs, sum_probs


# Below this top digit probability an answer is "not sure". Chosen with outlier exposure on:
# at 0.8, most pictures of no digit fall below it (their top probability is near 0.1), while
# handwritten digits, MNIST's and photographed ones, stay above it (see README).
MIN_CONFIDENCE = 0.8


def is_sure(digit_probs: torch.Tensor, sum_probs: torch.Tensor, numbers) -> torch.Tensor:
    """The one rule for every answer this project prints, row by row: an answer is sure when
    the digit's top probability reaches MIN_CONFIDENCE and the sum head's answer is that digit
    plus the number. Otherwise it is "not sure", and so is a refused picture (a row of NaN)."""
    digits, numbers = digit_probs.argmax(-1), torch.as_tensor(numbers)
    return (digit_probs.amax(-1) >= MIN_CONFIDENCE) & (sum_probs.argmax(-1) == digits + numbers)


@dataclass(frozen=True)
class Answer:
    """What the network says about one picture and number, by `is_sure`'s rule: `str()` gives
    the line the command line prints, `title` the short one the figures show."""
    digit_probs: torch.Tensor  # [10]
    sum_probs: torch.Tensor  # [19]
    number: int

    @property
    def digit(self) -> int:
        return int(self.digit_probs.argmax())

    @property
    def total(self) -> int:
        """The sum head's answer."""
        return int(self.sum_probs.argmax())

    @property
    def sure(self) -> bool:
        return bool(is_sure(self.digit_probs, self.sum_probs, self.number))

    def __str__(self) -> str:
        (first, second), (digit, runner_up) = (values.tolist() for values in self.digit_probs.topk(2))
        if self.sure:
            return f"digit {digit} ({100 * first:.0f} % sure), {digit} + {self.number} = {self.total}"
        if first >= MIN_CONFIDENCE:  # the heads disagree
            return (f"not sure: the digit looks like a {digit} ({100 * first:.0f} %), but the sum "
                    f"head answers {self.total}, not {digit} + {self.number} = {digit + self.number}")
        return f"not sure: {digit} ({100 * first:.0f} %) or {runner_up} ({100 * second:.0f} %)"

    @property
    def title(self) -> str:
        if self.sure:
            return f"{self.digit} + {self.number} = {self.total}"
        return f"not sure: {self.digit} or {int(self.digit_probs.topk(2).indices[1])}, + {self.number}"


def answer(model: h.Net, picture, number, framing=frame_digit) -> Answer:
    """What the network says about one picture of a digit (any picture `frame_digit` takes) and a
    number 0..9, as an `Answer`. A picture with no digit raises NoDigitError; a wrong call,
    another ValueError or a TypeError."""
    number = _as_number(number)
    digit_probs, sum_probs = _probabilities(model, [framing(picture)], [number])
    return Answer(digit_probs[0], sum_probs[0], number)


def _judged(digit_probs, sum_probs, labels, numbers) -> tuple[torch.Tensor, ...]:
    """Per picture, (right, sure, refused): digit and sum both right; sure by `is_sure`; and no
    digit found (a row of NaN)."""
    labels, numbers = torch.as_tensor(labels), torch.as_tensor(numbers)
    refused = digit_probs.isnan().any(1)  # argmax reads a row of NaN as digit 0
    right = (digit_probs.argmax(1) == labels) & (sum_probs.argmax(1) == labels + numbers) & ~refused
    return right, is_sure(digit_probs, sum_probs, numbers), refused


def _counts(right: torch.Tensor, sure: torch.Tensor, refused: torch.Tensor) -> dict[str, int]:
    """The five counts every score reports: `pictures`; `right`; `flagged`, refused or not sure;
    `refused`; and `confidently_wrong`, wrong yet sure, the worst outcome."""
    return {"pictures": len(right), "right": int(right.sum()), "flagged": int((~sure).sum()),
            "refused": int(refused.sum()), "confidently_wrong": int((sure & ~right).sum())}


def tally(model: h.Net, images, labels, numbers, framing=frame_digit) -> dict[str, int]:
    """The five counts of `_counts` for many labelled pictures, each framed by `framing` (see
    `read_pictures`)."""
    return _counts(*_judged(*read_pictures(model, images, numbers, framing), labels, numbers))


def _labelled_files(folder: Path) -> tuple[list[tuple[Path, int, str]], list[Path]]:
    """(path, label, group) for each file under `folder` whose label is a digit: the name of its
    folder when that is a single digit, else the first character of its own name. Its group is
    its folder under `folder`, less a digit folder. Also the files with no such label."""
    found, unlabelled = [], []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        parents = relative.parts[:-1]
        in_digit_folder = bool(parents) and len(parents[-1]) == 1 and parents[-1].isdigit()
        label = parents[-1] if in_digit_folder else path.name[0]
        if not label.isdigit():
            unlabelled.append(path)
            continue
        found.append((path, int(label), "/".join(parents[:-1] if in_digit_folder else parents) or "."))
    return found, unlabelled


def score_folder(model: h.Net, folder, seed: int = 0) -> dict:
    """Reads every labelled picture under `folder` (see `_labelled_files`), one at a time, each
    with a number drawn from `seed`, and counts as `tally` does, per group and in `all`. Also
    `mistakes` (path, label, number, Answer or None when refused), `unreadable` and
    `unlabelled` files. An empty folder, or one with no labelled picture, raises ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder")
    files, unlabelled = _labelled_files(folder)
    if not files:
        raise ValueError(f"no labelled pictures in '{folder}': name each file after its digit "
                         f"(3_anything.png) or put it in a folder named 0 to 9")
    answers, read, unreadable = [], [], []
    for (path, label, group), number in zip(files, h.draw_numbers(len(files), seed).tolist()):
        try:
            picture = read_image(path)
        except ValueError:
            unreadable.append(path)
            continue
        answers.append(read_pictures(model, [picture], [number]))
        read.append((path, label, group, number))
    if not read:
        raise ValueError(f"none of the {len(files)} labelled files in '{folder}' could be read as a picture")
    (digit_probs, sum_probs), (paths, labels, groups, numbers) = (torch.cat(p) for p in zip(*answers)), zip(*read)
    right, sure, refused = _judged(digit_probs, sum_probs, labels, numbers)
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    mistakes = [(paths[i], labels[i], numbers[i], None if refused[i] else Answer(digit_probs[i], sum_probs[i], numbers[i]))
                for i in (~(right & sure)).nonzero().flatten().tolist()]
    return {"groups": {group: _counts(right[i], sure[i], refused[i]) for group, i in members.items()},
            "all": _counts(right, sure, refused), "mistakes": mistakes, "unreadable": unreadable,
            "unlabelled": unlabelled}


def _mistake_rank(mistake) -> tuple:
    """Worst first: wrong and sure, then wrong and unsure, then refused, then right but unsure;
    within each, the surer first."""
    _, label, number, answer = mistake
    if answer is None:
        return (2, 0.0)
    right = (answer.digit, answer.total) == (label, label + number)
    return (3 if right else 0 if answer.sure else 1, -float(answer.digit_probs.max()))


def score_report(result: dict, worst: int) -> list[str]:
    """`score_folder`'s counts as a table (a row per group when there are several), the files
    skipped, and the `worst` mistakes."""
    rows = {**(result["groups"] if len(result["groups"]) > 1 else {}), "all": result["all"]}
    lines = [f"{'pictures':>8} {'right':>8} {'flagged':>8} {'refused':>8} {'confidently wrong':>18}  folder"]
    for name, row in rows.items():
        share = {key: 100 * value / row["pictures"] for key, value in row.items()}
        lines.append(f"{row['pictures']:8} {share['right']:7.1f}% {share['flagged']:7.1f}% {share['refused']:7.1f}% "
                     f"{share['confidently_wrong']:17.1f}%  {name}")
    for key, why in (("unlabelled", "with no digit label (name it 3_... or put it in a folder 3)"),
                     ("unreadable", "that are not pictures Pillow reads")):
        if result[key]:
            names = ", ".join(path.name for path in result[key][:5]) + (", ..." if len(result[key]) > 5 else "")
            lines.append(f"skipped {len(result[key])} file(s) {why}: {names}")
    mistakes = sorted(result["mistakes"], key=_mistake_rank)[:worst]
    if mistakes:
        lines.append("worst mistakes:")
    for path, label, number, answer in mistakes:
        article = "an" if label == 8 else "a"
        lines.append(f"  {path}: {article} {label} with {number}; "
                     + ("refused: no digit found" if answer is None else str(answer)))
    return lines
