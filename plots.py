"""Figures for the notebooks: pictures with their titles, training curves, confusions, the sum
head's number line, and how sure the network is. Each function draws one figure and shows it."""
from __future__ import annotations

import inspect
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm

import helpers as h
import inference
import pictures

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit


class _Source(str):
    """Source code that shows as highlighted Python where Markdown renders, and as plain text
    where it does not (a static page's fallback)."""

    def __repr__(self):
        return str(self)

    def _repr_markdown_(self):
        return f"```python\n{self}\n```"


def show_source(*objects) -> _Source:
    """The source of classes, functions or methods of this file, for the notebook to show the
    code it runs (not a copy of it)."""
    return _Source("\n\n".join(inspect.getsource(obj).rstrip() for obj in objects))



def _grid(count, columns, size=1.5, title_lines=1):
    rows = math.ceil(count / columns)
    height = size * (1 + 0.2 * title_lines) * rows + 0.4 * title_lines
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, height), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return figure, axes.flat


def _finish(figure):
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    plt.show()


def _show(axis, image, title, color="black"):
    image = image.squeeze().cpu()
    image = image / 255 if image.dtype == torch.uint8 else h.denormalize(image)
    axis.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    axis.set_title(title, fontsize=10, color=color)


def show_examples(images, labels, numbers, sums, columns=8, row_titles=()):
    """Draws the images titled `digit + number = sum`, with `row_titles` left of the rows."""
    figure, axes = _grid(len(images), columns)
    axes = list(axes)
    for axis, image, label, number, total in zip(axes, images, labels, numbers, sums):
        _show(axis, image, f"{int(label)} + {int(number)} = {int(total)}")
    for row, title in enumerate(row_titles):
        axes[row * columns].annotate(title, (-0.12, 0.5), xycoords="axes fraction", rotation=90,
                                     ha="right", va="center", fontsize=11, fontweight="bold")
    _finish(figure)


def _square(picture) -> np.ndarray:
    """A picture padded to a square with its own median, so every thumbnail shows at one size."""
    shown = np.asarray(picture.convert("RGB")) if hasattr(picture, "convert") else np.asarray(picture)
    height, width = shown.shape[:2]
    side = max(height, width)
    fill = np.median(shown.reshape(height * width, -1), axis=0).astype(shown.dtype)
    square = np.broadcast_to(fill, (side, side, *shown.shape[2:])).copy()
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = shown
    return square


def show_pictures(pictures, titles, columns=6, size=2.0):
    """Any pictures (PIL, or arrays and tensors in [0, 1]) with a title each, each padded to a
    square so that all show at the same size."""
    figure, axes = _grid(len(pictures), columns, size=size)
    for axis, picture, title in zip(axes, pictures, titles):
        shown = _square(picture)
        axis.imshow(shown, cmap="gray", vmin=0, vmax=1 if shown.dtype.kind == "f" else 255)
        axis.set_title(title, fontsize=10)
    _finish(figure)


def plot_confidence(groups: dict[str, torch.Tensor]):
    """How sure the network is: for each group of pictures, the share of them at each top digit
    probability (NaN: refused by the preparation, counted in the legend), and inference.MIN_CONFIDENCE,
    on a logarithmic axis so that a few pictures show beside thousands."""
    figure, axis = plt.subplots(figsize=(10, 5))
    bins = np.linspace(0, 1, 21)
    for index, (name, top) in enumerate(groups.items()):
        style = ("-", "--", "-.", ":")[index % 4]
        read = top[~top.isnan()].numpy()
        flagged = float(((top < inference.MIN_CONFIDENCE) | top.isnan()).float().mean())
        share = np.histogram(read, bins)[0] / max(len(top), 1) * 100
        axis.stairs(np.maximum(share, 1e-3), bins, linestyle=style, linewidth=3.5 if index == 0 else 2,
                    label=f"{name}: {len(top):,}, {1 - len(read) / max(len(top), 1):.0%} refused, "
                          f"{flagged:.1%} refused or below the line")
    axis.axvline(inference.MIN_CONFIDENCE, color="black", linewidth=1)
    axis.annotate(f"MIN_CONFIDENCE = {inference.MIN_CONFIDENCE}:\nbelow it, 'not sure'", (inference.MIN_CONFIDENCE, 0.45),
                  xycoords=("data", "axes fraction"), xytext=(-6, 0), textcoords="offset points",
                  ha="right", va="center", fontsize=9)
    axis.set(xlabel="the network's top digit probability", ylabel="pictures in the group (%, log scale)",
             title="How sure is it?", xlim=(0, 1), yscale="log", ylim=(0.05, 150))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    _finish(figure)


def plot_history(history: list[dict], smoothing: int = 25):
    """Left: the two parts of the training loss at every step (faint) and their running mean over
    `smoothing` steps; the test split's cross-entropies after each epoch (dots); the epochs'
    ends (dotted). Right: the share of test pairs answered wrong after each epoch, on a
    logarithmic axis, so that 4 % and 0.5 % both show."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=[3, 2])
    steps = torch.tensor([pair for record in history for pair in record["step_losses"]])  # [S, 2]
    per_epoch = len(history[0]["step_losses"])
    ends = [per_epoch * record["epoch"] for record in history]
    window = torch.ones(1, 1, smoothing) / smoothing
    for column, (name, colour) in enumerate((("digit", "tab:blue"), ("sum", "tab:orange"))):
        left.plot(range(1, len(steps) + 1), steps[:, column], color=colour, alpha=0.25, linewidth=0.8,
                  label=f"{name}: each training step")
        mean = F.conv1d(steps[None, None, :, column], window)[0, 0]
        left.plot(range(smoothing, len(steps) + 1), mean, color=colour, label=f"{name}: mean of {smoothing} steps")
        left.plot(ends, [record[f"{name}_loss"] for record in history], "o", color=colour,
                  markeredgecolor="black", label=f"{name}: test split, cross-entropy")
    for end in ends[:-1]:
        left.axvline(end, color="gray", linewidth=0.8, linestyle=":", label="end of an epoch" if end == ends[0] else None)
    left.set(xlabel="training step", ylabel="loss (log scale)", yscale="log", title="Training loss and test loss")
    epochs = [record["epoch"] for record in history]
    for key, label, marker, size in (("digit_acc", "digit", "o-", 10), ("sum_acc", "sum", "s--", 5)):
        right.plot(epochs, [100 * (1 - r[key]) for r in history], marker, markersize=size, label=label)
    right.set(xlabel="epoch", ylabel="test pairs answered wrong (%, log scale)", yscale="log",
              title="Test error after each epoch")
    right.set_xticks(epochs)
    right.yaxis.set_major_locator(plt.FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    right.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    right.yaxis.set_minor_formatter(plt.NullFormatter())
    for axis in (left, right):
        axis.grid(alpha=0.3, which="major")
    left.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    right.legend(fontsize=9)
    _finish(figure)


def plot_confusions(result: h.Evaluation):
    """Digit and sum confusion matrices, each cell numbered with its count of test pairs, on one
    logarithmic colour scale so that single mistakes show; empty cells are left white."""
    figure, axes = plt.subplots(1, 2, figsize=(14, 6.6), layout="constrained")
    matrices = {"digit": result.digit_confusion, "sum": result.sum_confusion}
    scale = LogNorm(vmin=1, vmax=max(int(m.max()) for m in matrices.values()))
    for axis, (name, matrix) in zip(axes, matrices.items()):
        shown = matrix.float().clone()
        shown[shown == 0] = float("nan")
        image = axis.imshow(shown, cmap="viridis", norm=scale)
        small = len(matrix) > h.NUM_DIGITS
        for (true, said), count in np.ndenumerate(matrix.numpy()):
            if count:
                axis.text(said, true, str(count), ha="center", va="center", fontsize=8 if small else 9,
                          color="black" if count > 30 else "white")
        axis.set_xticks(range(len(matrix)))
        axis.set_yticks(range(len(matrix)))
        axis.tick_params(labelsize=9 if small else 10)
        axis.set(xlabel=f"predicted {name}", ylabel=f"true {name}",
                 title=f"{name.capitalize()}: {int(matrix.sum() - matrix.trace())} errors")
    figure.colorbar(image, ax=axes[1], shrink=0.6, pad=0.02, label="test pairs (log scale); white: none")
    _finish(figure)


def show_mistakes(split: h.Split, result: h.Evaluation, count=16, columns=8):
    """Test pairs where either head is wrong, each titled with what is wrong (also its colour),
    the truth and the answer, in one format. The rare pairs where only one head is wrong come
    first, so that every kind shows."""
    digit_wrong, sum_wrong = result.digit_pred != split.labels.cpu(), result.sum_pred != split.sums.cpu()
    kinds = {"both wrong": ("tab:red", digit_wrong & sum_wrong),
             "digit wrong": ("tab:orange", digit_wrong & ~sum_wrong),
             "sum wrong": ("tab:purple", ~digit_wrong & sum_wrong)}
    index = torch.cat([wrong.nonzero().flatten() for _, wrong in reversed(kinds.values())])[:count]
    figure, axes = _grid(len(index), columns, size=1.7, title_lines=3)
    for axis, i in zip(axes, index.tolist()):
        number = int(split.numbers[i])
        kind, (colour, _) = next((kind, value) for kind, value in kinds.items() if value[1][i])
        truth = f"true {int(split.labels[i])} + {number} = {int(split.sums[i])}"
        said = f"read {int(result.digit_pred[i])}, sum {int(result.sum_pred[i])}"
        _show(axis, split.images[i], f"{kind}\n{truth}\n{said}", color=colour)
    figure.suptitle(f"{len(index)} of the {int((digit_wrong | sum_wrong).sum())} test pairs answered wrong: "
                    + ", ".join(f"{kind} {int(wrong.sum())}" for kind, (_, wrong) in kinds.items()))
    _finish(figure)


def plot_pair_errors(per_pair_grids: dict, held_out=h.HOLDOUT_PAIRS):
    """The share of sums answered wrong for every (digit, number) cell, one panel per head, on a
    logarithmic scale, so that 0.3 % and 3 % look different; white: no mistake. The held-out
    pairs are outlined."""
    figure, axes = plt.subplots(1, len(per_pair_grids), figsize=(6 * len(per_pair_grids), 5.4),
                                squeeze=False, layout="constrained")
    for axis, (title, grid) in zip(axes.flat, per_pair_grids.items()):
        wrong = 100 * (1 - grid.numpy())
        image = axis.imshow(np.where(wrong > 0, wrong, np.nan), cmap="magma_r", norm=LogNorm(0.1, 100))
        for (digit, number), value in np.ndenumerate(wrong):
            axis.text(number, digit, "0" if value == 0 else f"{value:.0f}" if value >= 10 else f"{value:.1f}",
                      ha="center", va="center", fontsize=8.5, color="white" if value > 20 else "black")
        for digit, number in held_out:
            axis.add_patch(plt.Rectangle((number - 0.45, digit - 0.45), 0.9, 0.9, fill=False,
                                         edgecolor="deepskyblue", linewidth=2.5))
        axis.set_xticks(range(h.NUM_DIGITS))
        axis.set_yticks(range(h.NUM_DIGITS))
        axis.set(xlabel="random number", ylabel="digit in the image", title=title)
    figure.colorbar(image, ax=list(axes.flat), shrink=0.8, label="sums answered wrong (%, log scale); white: none")
    figure.suptitle("Sum errors per (digit, number) pair; outlined: the pairs held out of training")
    _finish(figure)


def plot_adder_idea(example=(3, 4)):
    """`plot_number_line` for an adder whose positions are set by hand: digit d at d, number n at
    n, sum s at s."""
    ideal = h.AdderHead()
    with torch.no_grad():
        for positions in (ideal.digit_position, ideal.number_position, ideal.sum_position):
            positions.copy_(torch.arange(float(len(positions))))
    plot_number_line(ideal, "The adder's idea, with positions set by hand", example)


def plot_number_line(head: h.SumHead, title="What the sum head learned", example=(3, 4)):
    """The positions of a line head (the adder, the number line): each digit's x_d, number's
    y_n and sum's z_s, on three rows of one line. For the `example` pair (d, n), a star marks
    where x_d + y_n lands on the sums' row, with the sum nearest to it."""
    if not isinstance(head, h.LineHead):
        raise ValueError(f"a {type(head).__name__} has no learned positions to plot")
    positions = head.learned_positions()
    figure, axis = plt.subplots(figsize=(11, 3.2))
    for row, name in enumerate(("sum", "number", "digit")):  # sums at the bottom, digits on top
        axis.scatter(positions[name], [row] * len(positions[name]), s=14)
        for value, position in enumerate(positions[name].tolist()):
            axis.annotate(str(value), (position, row), textcoords="offset points", xytext=(0, 6),
                          ha="center", fontsize=9)
    digit, number = example
    total = float(positions["digit"][digit] + positions["number"][number])
    nearest = int((positions["sum"] - total).abs().argmin())
    axis.scatter([total], [0], marker="*", s=220, color="tab:red", zorder=3)
    axis.annotate(f"x{_subscript(digit)} + y{_subscript(number)} lands here: nearest sum {nearest}",
                  (total, 0), textcoords="offset points", xytext=(0, -16), ha="center", fontsize=9,
                  color="tab:red")
    for row, name, value in ((2, "digit", digit), (1, "number", number)):
        axis.scatter([positions[name][value]], [row], s=90, facecolors="none", edgecolors="tab:red")
    axis.set_yticks(range(3), ["sums z", "numbers y", "digits x"])
    axis.set_ylim(-0.9, 2.6)
    axis.set(xlabel="position on the line", title=title)
    axis.grid(axis="x", alpha=0.3)
    _finish(figure)


def _subscript(value: int) -> str:
    return str(value).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def plot_holdout_sweep(sweep: dict[str, dict[int, dict]], evidence: dict[int, dict]):
    """Against how many of the 100 pairs were held out of training: each head's sum accuracy
    (`held_out_accuracy`) on the held-out pairs and on the seen ones; how many independent
    equations the seen pairs give a line (`line_evidence`); how many sums no seen pair has."""
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4), width_ratios=[2, 1, 1])
    counts = sorted(evidence)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, by_count), colour, marker in zip(sweep.items(), colours, "osD^v"):
        for key, style, part in (("held_out_acc", "-", "held-out pairs"), ("seen_acc", ":", "seen pairs")):
            left.plot(counts, [100 * by_count[k][key] for k in counts], style, marker=marker, color=colour,
                      label=f"{name}: {part}")
    left.set(xlabel="pairs held out of training (of 100)", ylabel="sum accuracy (%)", ylim=(-3, 103),
             title="Sum accuracy")
    left.legend(fontsize=9, loc="center left")
    shown = [evidence[k] for k in counts]
    middle.plot(counts, [e["equations"] for e in shown], "o-", color="black")
    middle.axhline(shown[0]["needed"], color="gray", linestyle="--", label=f"{shown[0]['needed']}: enough to fix the line")
    middle.set(xlabel="pairs held out", ylabel="independent equations", title="What the seen pairs fix")
    middle.legend(fontsize=9, loc="lower left")
    bars = right.bar(counts, [e["unseen_sums"] for e in shown], width=5, color="tab:red", alpha=0.7)
    right.bar_label(bars, fontsize=9)
    right.set(xlabel="pairs held out", ylabel="sums", title="Sums never seen in training")
    for axis in (left, middle, right):
        axis.set_xticks(counts)
        axis.grid(alpha=0.3)
    _finish(figure)


def show_preparation(model: h.Net, picture, number: int) -> inference.Answer:
    """`preparation_steps` on one picture, in equal panels, and the model's `Answer`, which it
    returns."""
    steps = pictures.preparation_steps(picture)
    answer = inference.answer(model, picture, number)
    titles = {"picture": f"picture, {steps['picture'].shape[1]} x {steps['picture'].shape[0]} px",
              "ink": "ink found (inverted)", "kept": "kept: the digit's pieces",
              "cropped": "cropped to their box, all ink",
              "framed": f"framed 28 x 28:\n{answer.title} (digit {100 * float(answer.digit_probs.max()):.0f} %)"}
    figure, axes = _grid(len(steps), len(steps), size=2.6, title_lines=1)
    for axis, (name, image) in zip(axes, steps.items()):
        side = max(image.shape)  # pad to a square, so every panel is the same size
        square = torch.full((side, side), float(image.median() if name == "picture" else 0))
        top, left = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
        square[top:top + image.shape[0], left:left + image.shape[1]] = image
        axis.imshow(square, cmap="gray", vmin=0, vmax=1)
        axis.set_title(titles.get(name, name), fontsize=11)
    _finish(figure)
    return answer

