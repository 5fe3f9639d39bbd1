"""Training speed, measured side by side in one run: the reference's data pipeline against ours,
the reference recipe against ours, and our time to 99 % on both heads; and how many operators
one training step dispatches.

    python benchmark.py                         # on the best device here, at the auto precision
    python benchmark.py --device cuda --precision fp16 --json
    python benchmark.py --operators             # aten operators per training step, per precision

Speed drifts between runs (by up to a third on shared CPUs), so each feed is timed in turns
with the others and the median is reported; compare figures from one run only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import helpers as h
import pictures
from cli import positive

# The reference recipe, as the original write-up trained it.
_REFERENCE_BATCH_SIZE = 32
_REFERENCE_SGD = {"lr": 0.01, "momentum": 0.9}
_REFERENCE_EPOCHS_TO_99 = 5  # measured for it on a GPU (issue 4)


def _quiet(*_):
    """A `log` that prints nothing."""


def _reference_loader(mnist: Dataset, batch_size: int = _REFERENCE_BATCH_SIZE, seed: int = 0,
                     workers: int = 0):
    """The reference pipeline: the per-sample Dataset behind a shuffling DataLoader."""
    return DataLoader(h.DigitPlusNumber(mnist, seed), batch_size=batch_size, shuffle=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(seed))


def _reference_batches(mnist: Dataset, device, seed: int = 0):
    """Endless (images, labels, numbers) batches from the reference pipeline, on `device`."""
    loader = _reference_loader(mnist, seed=seed, workers=2 if device.type == "cuda" else 0)
    while True:
        for images, labels, one_hot, _ in loader:
            yield h.Batch(images.to(device), labels.to(device), one_hot.argmax(1).to(device))


def _outliers(split: h.Split, recipe: h.Recipe) -> torch.Tensor | None:
    """The pictures of no digit `train` takes, made as the command line makes them."""
    if not recipe.outliers:
        return None
    return pictures.draw_outliers(min(pictures.OUTLIER_BANK, len(split)), h.random_streams(recipe.seed)["bank"],
                                  h.denormalize(split.images))


def _in_memory_batches(split: h.Split, recipe: h.Recipe):
    """Endless batches, exactly as `train` takes them."""
    data = h.TrainingData(split, recipe, _outliers(split, recipe))
    while True:
        yield from data.epoch()


class _ReferenceSGD:
    """The reference's optimizer, SGD with momentum and no schedule, in fp32, as `h.train_step`
    takes one."""

    def __init__(self, model: h.Net, device):
        self.sgd, self.precision = torch.optim.SGD(model.parameters(), **_REFERENCE_SGD), h.Precision("fp32", device)

    def step(self, loss: torch.Tensor):
        self.sgd.zero_grad(set_to_none=True)
        loss.backward()
        self.sgd.step()


def _images_per_second(model: h.Net, optimizer, batches, steps: int, outlier_weight: float = 0.0):
    """Training throughput over `steps` steps after 3 warm-up steps: (images/s, warm-up seconds).
    Outliers ride along but are not counted as images."""
    device = optimizer.precision.device
    timings = []
    for count in (3, steps):  # warm-up first: allocations, kernel selection
        h.synchronize(device)
        started, images = time.perf_counter(), 0
        for _ in range(count):
            batch = next(batches)
            h.train_step(model, optimizer, batch, outlier_weight)
            images += len(batch.labels)
        h.synchronize(device)
        timings.append((images, time.perf_counter() - started))
    (_, warm_up), (images, seconds) = timings
    return images / seconds, warm_up


def _seeded_net(device, seed: int = 0, **config) -> h.Net:
    """`h.new_model`, in the memory format it trains fastest in on `device`, as `train` uses."""
    return h.new_model(seed, device, **config).to(memory_format=h.memory_format(device))


def _seconds_to_99(history: list[dict]) -> float | None:
    """Training seconds until both heads first reach 99 % on the test split, or None."""
    elapsed = 0.0
    for record in history:
        elapsed += record["train_seconds"]
        if min(record["digit_acc"], record["sum_acc"]) >= 0.99:
            return elapsed
    return None


_PIPELINE_ROUNDS = 3  # each feed is timed this many times, in turns; the median is reported


def _pipeline_rates(mnist: Dataset, train_split: h.Split, recipe: h.Recipe, steps: int, log) -> dict:
    """Images/s of our h.Net and Adam fed several ways, each from the same seeded start: the
    reference's per-sample Dataset and DataLoader (batch 32, fp32); our in-memory batches,
    plain, in fp32 and in each 16-bit precision the device offers (bf16 alone on the CPU); and
    the whole `recipe` (augmentation and outliers, whose drawing is timed too) at its precision.
    Each rate is the median of _PIPELINE_ROUNDS runs taken in turns. Also `warm_up_seconds`: the
    very first 3 steps (one-time set-up)."""
    device = train_split.images.device
    ours = max(1, steps * _REFERENCE_BATCH_SIZE // recipe.batch_size)
    # Epochs of `ours` steps, so that the timed steps include one epoch's drawing of outliers.
    subset, plain = train_split.first(ours * recipe.batch_size), replace(recipe, augment=0.0, outliers=0)
    feeds = [("reference pipeline", "fp32", _reference_batches(mnist, device, recipe.seed), steps, 0.0)]
    halves = h.half_precisions(device)[:1 if device.type == "cpu" else None]  # the CPU's fp16: too slow to time
    for feed_precision in dict.fromkeys(("fp32", *halves)):
        feeds.append((f"ours {feed_precision}", feed_precision, _in_memory_batches(subset, plain), ours, 0.0))
    feeds.append((f"ours {recipe.precision}, whole recipe", recipe.precision,
                  _in_memory_batches(subset, recipe), ours, recipe.outlier_weight))
    runs = []
    for name, feed_precision, batches, count, outlier_weight in feeds:
        model = _seeded_net(device, recipe.seed)
        optimizer = h.OneCycleAdam(model.parameter_groups(recipe.lr), _PIPELINE_ROUNDS * (count + 3),
                                h.Precision(feed_precision, device))
        runs.append((name, model, optimizer, batches, count, outlier_weight))
    rates, warm_ups = {name: [] for name, *_ in runs}, []
    for _ in range(_PIPELINE_ROUNDS):  # taken in turns: this machine's speed drifts over minutes
        for name, model, optimizer, batches, count, weight in runs:
            rate, warm = _images_per_second(model, optimizer, batches, count, weight)
            rates[name].append(rate)
            warm_ups.append(warm)
    rates = {name: float(np.median(values)) for name, values in rates.items()}
    for name, rate in rates.items():
        log(f"{name:30} {rate:6.0f} images/s ({rate / rates['reference pipeline']:.2f}x the reference "
            f"pipeline)")
    for half in ("bf16", "fp16"):
        if f"ours {half}" in rates:
            log(f"{half} / fp32: {rates[f'ours {half}'] / rates['ours fp32']:.2f}x"
                + ("" if half == "fp16" or h.has_native_bf16(device) else " (this device emulates bf16)"))
    log(f"one-time warm-up (first 3 steps): {warm_ups[0]:.2f} s")
    return {"images_per_s": rates, "warm_up_seconds": warm_ups[0]}


def _reference_recipe_seconds(mnist: Dataset, device, seed: int, steps: int, log) -> dict:
    """The reference recipe's images/s (no BatchNorm, the logits head, SGD, batch 32, fp32) and
    so its time to 99 %, taken as _REFERENCE_EPOCHS_TO_99 epochs."""
    model = _seeded_net(device, seed, batch_norm=False, sum_head="logits")
    rate, _ = _images_per_second(model, _ReferenceSGD(model, device),
                                 _reference_batches(mnist, device, seed), steps)
    seconds = _REFERENCE_EPOCHS_TO_99 * len(mnist) / rate
    log(f"reference recipe (no BatchNorm, SGD, batch 32, fp32): {rate:.0f} images/s, so "
        f"{_REFERENCE_EPOCHS_TO_99} epochs to 99 % take about {seconds:.0f} s")
    return {"reference_recipe_images_per_s": rate, "reference_recipe_seconds_to_99": seconds}


def _recipe_time_to_99(train_split: h.Split, test_split: h.Split, recipe: h.Recipe, reference_seconds,
                      log) -> dict:
    """Trains our default model by `recipe` and reports its time to >= 99 % on both heads."""
    model = _seeded_net(train_split.images.device, recipe.seed)
    history = h.train(model, train_split, test_split, recipe, outlier_bank=_outliers(train_split, recipe), log=None)
    final, reached = history[-1], _seconds_to_99(history)
    log(f"our recipe on {len(train_split):,} images ({recipe.epochs} epoch(s), {final['precision']}): "
        f"{sum(r['train_seconds'] for r in history):.1f} s of training; "
        f"digit {100 * final['digit_acc']:.2f} %, sum {100 * final['sum_acc']:.2f} %")
    log("  time to >= 99 % on both heads: "
        + (f"{reached:.1f} s, {reference_seconds / reached:.1f}x faster than the reference recipe"
           if reached else "not reached"))
    return {"images": len(train_split), "seconds_to_99": reached, "history": history}


def benchmark(device, root=None, recipe: h.Recipe | None = None, *, steps: int = 200,
              short_images: int | None = None, train_limit: int | None = None,
              test_limit: int | None = None, log=print) -> dict:
    """Training speed on one device, measured side by side in one run.

    1. `_pipeline_rates`: how fast the same h.Net trains when fed the reference's way and ours.
    2. `_reference_recipe_seconds`: the reference recipe's speed, and so its time to 99 %.
    3. `_recipe_time_to_99`: our `recipe` (at its precision), on the whole training split and on
       its first `short_images` images (None: skip).
    `recipe`: one epoch of the default recipe unless given. `train_limit` and `test_limit` keep
    the first images of each split, for a quick check.
    """
    log = log or _quiet
    recipe = recipe or h.Recipe(epochs=1)
    recipe = replace(recipe, precision=h.Precision(recipe.precision, device).name)
    mnist = h.load_mnist(True, root=root)
    train_split = h.load_split(True, root=root, device=device, limit=train_limit)
    test_split = h.load_split(False, root=root, device=device, limit=test_limit)
    log(f"machine: {h.describe_machine(device)}")
    result = {"device": h.describe_machine(device), "precision": recipe.precision,
              **_pipeline_rates(mnist, train_split, recipe, steps, log),
              **_reference_recipe_seconds(mnist, device, recipe.seed, steps, log)}
    sizes = [len(train_split)] + ([short_images] if short_images and short_images < len(train_split) else [])
    result["runs"] = {size: _recipe_time_to_99(train_split.first(size), test_split, recipe,
                                              result["reference_recipe_seconds_to_99"], log)
                      for size in sizes}
    return result


def _top_level_operators(events) -> int:
    """How many aten operators the profiled code called itself, not through another operator."""
    return sum(1 for event in events if event.name.startswith("aten::") and (
        event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def operators_per_step(device, precision: str = "auto", root=None, steps: int = 32) -> float:
    """The aten operators one training step of the default recipe dispatches, on average: a
    one-epoch `h.train` of `steps` batches and one of twice as many, each under torch.profiler,
    and the difference per step, so that what runs once an epoch (the evaluation, the epoch's
    draws) cancels, and what runs once per 32 batches (`h.augment` on a chunk) counts its share.
    On a GPU each operator that computes is a kernel launch."""
    recipe = h.Recipe(epochs=1, precision=precision)
    counts = []
    for batches in (steps, 2 * steps):
        split = h.load_split(True, root=root, device=device, limit=batches * recipe.batch_size)
        test = h.load_split(False, root=root, device=device, limit=200)
        model, outliers = _seeded_net(device, recipe.seed), _outliers(split, recipe)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            h.train(model, split, test, recipe, outlier_bank=outliers, log=None)
        counts.append(_top_level_operators(profile.events()))
    return (counts[1] - counts[0]) / steps


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MNIST folder (default: $MNIST_DATA_DIR or ./data)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=h.PRECISIONS,
                        help="of our recipe's runs (the reference's always train in fp32)")
    parser.add_argument("--steps", type=positive(int), default=200, help="batch-32 steps to time")
    parser.add_argument("--epochs", type=positive(int), default=1)
    parser.add_argument("--batch-size", type=positive(int), default=h.Recipe.batch_size)
    parser.add_argument("--short-images", type=positive(int), default=None,
                        help="also time the recipe on only the first N training images")
    parser.add_argument("--limit", type=positive(int), default=None, help="use the first N training images")
    parser.add_argument("--json", action="store_true", help="every figure as one JSON object")
    parser.add_argument("--operators", action="store_true",
                        help="only count the aten operators of one training step, in each precision "
                             "the device offers")
    return parser


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        device = h.choose_device(args.device)
        if args.operators:
            halves = h.half_precisions(device)[:1 if device.type == "cpu" else None]  # the CPU's fp16: too slow
            for precision in ("fp32", *halves):
                print(f"{precision}: {operators_per_step(device, precision, args.data):.1f} aten operators "
                      f"per training step ({h.describe_machine(device)})")
            return 0
        recipe = h.Recipe(epochs=args.epochs, batch_size=args.batch_size, precision=args.precision)
        result = benchmark(device, args.data, recipe, steps=args.steps, short_images=args.short_images,
                           train_limit=args.limit, log=_quiet if args.json else print)
    except (ValueError, OSError) as error:  # as cli.py answers them
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
