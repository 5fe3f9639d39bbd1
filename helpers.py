"""An MNIST digit plus a random number 0..9 in; the digit and their sum out.

Everything reusable for ``Assignment3.ipynb`` lives here, in the order the notebook tells the
story: device and precision, data, model, training, evaluation, using a model, checkpoints;
then what serves them: preparing a picture, pictures of no digit for outlier exposure,
pictures to test on, plots, the benchmark and the command line (``python helpers.py --help``).

Three conventions hold in every function:
- device: only entry points choose one, with `choose_device` (the command line, `benchmark`,
  the notebook's first cell). Everything else follows what it is given: a `Split`'s
  tensors for training and evaluation, the model's weights for `predict`.
- precision: "auto" by default; `choose_precision` resolves it once, by the one policy under
  "device and precision" below. Scores and answers are always computed in fp32.
- data: `root=None` means $MNIST_DATA_DIR, or ./data when that is unset.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from tqdm.auto import tqdm

__version__ = "4.0"  # the notebook checks this: a helpers.py it was not written for says so

NUM_DIGITS = 10  # image classes, and the random number is drawn from 0..9 too
NUM_SUMS = 19  # 0 + 0 .. 9 + 9
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DATA_DIR_ENV = "MNIST_DATA_DIR"
TEST_NUMBERS_SEED = 2024  # fixed, so every run scores the same test pairs

# The reference recipe, as the original write-up trained it.
_REFERENCE_BATCH_SIZE = 32
_REFERENCE_SGD = {"lr": 0.01, "momentum": 0.9}
_REFERENCE_EPOCHS_TO_99 = 5  # measured for it on a GPU (issue 4)


# ----------------------------------------------------------------------------- device and precision

#
# The one policy for where and how the network computes.
#
# Device: entry points (the command line, `benchmark`, the notebook's first cell) pick one with
# `choose_device`; every other function follows the tensors it is given.
#
# Precision: `choose_precision` resolves "auto" once, for the device at hand:
#
#   device  "auto" gives                                 may also ask for
#   cpu     bf16 where the CPU computes it natively        fp32; bf16 anywhere (emulated bf16
#           (AVX512-BF16 or AMX), else fp32                is slower than fp32)
#   cuda    bf16 where the GPU has it natively (compute    fp32; fp16; bf16 only where native
#           capability 8.0 and up: A100, L4, H100), else
#           fp16 with a gradient scaler (T4, V100)
#   mps     fp32: mixed precision there is unmeasured      nothing else
#
# Only the convolutions run in bf16 or fp16 (`autocast`); the weights, the optimizer, the sum
# head and the losses stay fp32. Every score and every answer (`evaluate`, `predict`) is
# computed in fp32, so a model gives the same answers whatever it was trained in.

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; a named device must be available here."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None
                 and torch.backends.mps.is_available()}
    if name == "auto":
        name = next(n for n in ("cuda", "mps", "cpu") if available[n])
    if name not in available:
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {name!r}")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def _has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device does bf16 arithmetic in hardware.

    CPU: AVX512-BF16 or AMX, by PyTorch's own feature probes (a version without them counts as
    no). CUDA: compute capability 8.0 or later; `torch.cuda.is_bf16_supported()` is no guide,
    since by default it also answers True where bf16 is only emulated (a T4).
    """
    device = torch.device(device)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def auto_precision(device_type: str, native_bf16: bool) -> str:
    """What "auto" gives on a device of `device_type` ("cpu", "cuda", "mps") that has native
    bf16 or not: the table above, as a rule."""
    if native_bf16 and device_type in ("cpu", "cuda"):
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


def choose_precision(precision: str, device: torch.device) -> str:
    """"fp32", "bf16" or "fp16" for `precision` on `device`, by the table above; a precision
    the device cannot run raises ValueError with what to use instead."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    kind = device.type
    if precision == "auto":
        return auto_precision(kind, kind in ("cpu", "cuda") and _has_native_bf16(device))
    if precision == "fp32":
        return precision
    if kind == "mps":
        raise ValueError(f"{precision} is not offered on MPS: mixed precision there has not been "
                         f"measured; use fp32")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{precision} runs on the CPU or a CUDA GPU, not on {kind}; use fp32")
    if precision == "fp16" and kind == "cpu":
        raise ValueError("fp16 runs on CUDA GPUs only: CPUs have no fast fp16; use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not _has_native_bf16(device):
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no native bf16 "
                         f"(it needs compute capability 8.0 or later); use fp16 or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    """Runs convolutions and matrix products in a resolved `precision`; fp32 changes nothing."""
    if precision == "fp32":  # no autocast object at all: torch 2.3 and 2.4 refuse one on MPS
        return nullcontext()
    return torch.autocast(device.type, dtype=_HALF_TYPES[precision])


def _full_precision(device: torch.device):
    """Turns an enclosing `autocast` off on any device, for code that must run in fp32."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()  # no autocast ever runs elsewhere (see `choose_precision`)


def _gradient_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16, whose small gradients would otherwise round to zero; None for
    fp32 and bf16, which have fp32's range."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last where a measurement says it helps: on the CPU, convolutions train about
    1.4 times as fast with it. On CUDA it is unmeasured here; on MPS its convolutions' backward
    gave wrong results in torch 2.5 (pytorch issues 140902 and 142344)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _synchronize(device: torch.device):
    """Waits until the device has done all the work queued on it, so a timer reads real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware, for stating where a figure was measured."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    if device.type == "cpu":
        bf16 = "native bf16" if _has_native_bf16(device) else "no native bf16"
        return f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}"
    return f"{device.type.upper()}, torch {torch.__version__}"


def _cpu_name() -> str:
    import platform
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies results to the CPU: the one place where evaluation waits for the device."""
    return [tensor.cpu() for tensor in tensors]


# ----------------------------------------------------------------------------- data


class MnistNotFoundError(FileNotFoundError):
    """MNIST is not on disk and could not be downloaded."""


def _default_data_dir() -> str:
    return os.environ.get(_DATA_DIR_ENV, "data")


def normalize(intensities: torch.Tensor) -> torch.Tensor:
    """Intensities in [0, 1] (ink bright) as the network reads them: MNIST's mean and spread."""
    return (intensities - MNIST_MEAN) / MNIST_STD


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize`: network inputs back to intensities in [0, 1]."""
    return images * MNIST_STD + MNIST_MEAN


_MNIST_TRANSFORM = transforms.Compose([transforms.ToTensor(), normalize])


def load_mnist(train: bool, *, root=None, transform=_MNIST_TRANSFORM) -> datasets.MNIST:
    """The torchvision MNIST split, downloading it if it is missing and we can."""
    root = Path(root if root is not None else _default_data_dir())
    try:
        return datasets.MNIST(root, train=train, download=True, transform=transform)
    except (RuntimeError, OSError) as error:
        raw = root / "MNIST" / "raw"
        raise MnistNotFoundError(
            f"MNIST is not in '{raw}' and could not be downloaded ({error}).\n"
            f"Put these four uncompressed files there: {', '.join(_MNIST_FILES)}\n"
            f"(from the .gz originals: gunzip -c FILE.gz > '{raw}/FILE'), or choose another "
            f"folder with root= in Python, --data on the command line, or the {_DATA_DIR_ENV} "
            f"variable.") from None


def draw_numbers(count: int, seed: int) -> torch.Tensor:
    """`count` random numbers in 0..9, both included, from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_DIGITS, (count,), generator=generator)


class DigitPlusNumber(Dataset):
    """Per-sample view, as in the reference: (image, label, one-hot number, sum).

    The numbers are drawn once, from `seed`, so an index always gives the same pair.
    """

    def __init__(self, mnist: Dataset, seed: int = TEST_NUMBERS_SEED):
        self.mnist = mnist
        self.numbers = draw_numbers(len(mnist), seed)

    def __len__(self):
        return len(self.mnist)

    def __getitem__(self, index):
        image, label = self.mnist[index]
        number = self.numbers[index]
        return image, label, F.one_hot(number, NUM_DIGITS).float(), label + int(number)


@dataclass
class Split:
    """One MNIST split as tensors on one device, so batches are taken by index.

    `numbers` is None for training, which draws fresh numbers every epoch.
    """
    images: torch.Tensor  # [N, 1, 28, 28] float, normalized
    labels: torch.Tensor  # [N] int64
    numbers: torch.Tensor | None = None  # [N] int64

    def __len__(self):
        return len(self.labels)

    @property
    def sums(self) -> torch.Tensor:
        if self.numbers is None:
            raise ValueError("a training split has no fixed numbers, so no fixed sums: each epoch "
                             "draws its own (see draw_training_numbers)")
        return self.labels + self.numbers

    def first(self, count: int) -> "Split":
        """The first `count` pairs."""
        return Split(self.images[:count], self.labels[:count],
                     None if self.numbers is None else self.numbers[:count])


def load_split(train: bool, *, root=None, device="cpu", limit: int | None = None) -> Split:
    """A split held as tensors on `device`; the test split gets fixed, seeded numbers.

    `limit` keeps the first `limit` images (the test numbers stay those of the full split).
    """
    mnist = load_mnist(train, root=root, transform=None)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    count = len(mnist) if limit is None else min(limit, len(mnist))
    images = normalize(mnist.data[:count].float() / 255).unsqueeze(1)
    numbers = None if train else draw_numbers(len(mnist), TEST_NUMBERS_SEED)[:count].to(device)
    return Split(images.to(device), mnist.targets[:count].to(device), numbers)


def _pairs_table(pairs) -> torch.Tensor:
    """A [10 digits, 10 numbers] boolean table with True at each (digit, number) in `pairs`."""
    table = torch.zeros(NUM_DIGITS, NUM_DIGITS, dtype=torch.bool)
    for pair in pairs:
        digit, number = (int(value) for value in pair)
        if not (0 <= digit < NUM_DIGITS and 0 <= number < NUM_DIGITS):
            raise ValueError(f"pair {tuple(pair)} is outside 0..9 x 0..9")
        table[digit, number] = True
    if table.all(dim=1).any() or table.all(dim=0).any():
        raise ValueError("holding out these pairs would remove a digit or a number from training")
    return table


# A permutation, so each digit and each number loses exactly one partner.
HOLDOUT_PAIRS = tuple((digit, (7 * digit + 3) % NUM_DIGITS) for digit in range(NUM_DIGITS))


def choose_holdout_pairs(count: int, seed: int = 0) -> tuple[tuple[int, int], ...]:
    """`count` random (digit, number) pairs to hold out, keeping every digit and every number
    in training: a pair is skipped if it would take the last partner of its digit or number."""
    most = NUM_DIGITS * NUM_DIGITS - NUM_DIGITS
    if not 0 <= count <= most:
        raise ValueError(f"count must be in 0..{most}, so every digit and number keeps a partner")
    generator = torch.Generator().manual_seed(seed)
    kept = torch.ones(NUM_DIGITS, NUM_DIGITS, dtype=torch.bool)  # [digit, number] still in training
    chosen = []
    for cell in torch.randperm(NUM_DIGITS * NUM_DIGITS, generator=generator).tolist():
        digit, number = divmod(cell, NUM_DIGITS)
        if len(chosen) < count and kept[digit].sum() > 1 and kept[:, number].sum() > 1:
            kept[digit, number] = False
            chosen.append((digit, number))
    if len(chosen) < count:
        raise ValueError(f"could not hold out {count} pairs with seed {seed}; try another seed")
    return tuple(sorted(chosen))


def draw_training_numbers(labels: torch.Tensor, generator: torch.Generator,
                          holdout: torch.Tensor | None = None) -> torch.Tensor:
    """Fresh numbers for one epoch, never a held-out (digit, number) pair, on `labels`' device.

    The random draws come from `generator` (on the CPU) and are copied once, so a seed gives
    the same numbers on every device, and the labels never leave theirs.
    """
    if holdout is None:
        return torch.randint(0, NUM_DIGITS, (len(labels),), generator=generator).to(labels.device)
    # Uniform over each digit's allowed numbers: allowed[d] lists them, held-out ones last.
    allowed = torch.sort(holdout.long(), dim=1, stable=True).indices.to(labels.device)
    counts = (~holdout).sum(dim=1).to(labels.device)[labels]
    choice = (torch.rand(len(labels), generator=generator).to(labels.device) * counts).long()
    return allowed[labels, torch.minimum(choice, counts - 1)]  # rand * n may round up to n


def _epoch_batches(labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                  holdout: torch.Tensor | None = None):
    """One training epoch as (index, numbers) batches on `labels`' device: a fresh order and
    fresh numbers, drawn at once."""
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    numbers = draw_training_numbers(labels, generator, holdout)
    for start in range(0, len(labels), batch_size):
        index = order[start:start + batch_size]
        yield index, numbers[index]


def _as_one_hot(numbers: torch.Tensor) -> torch.Tensor:
    """Numbers as integers [B] or already one-hot [B, 10] -> one-hot floats [B, 10]."""
    if numbers.dim() == 1 and not numbers.is_floating_point():
        return F.one_hot(numbers, NUM_DIGITS).float()
    if numbers.dim() == 2 and numbers.shape[1] == NUM_DIGITS:
        return numbers.float()
    raise ValueError(f"numbers must be integers [B] or one-hot [B, {NUM_DIGITS}], "
                     f"got {numbers.dtype} {list(numbers.shape)}")


# ----------------------------------------------------------------------------- model


class DigitReader(nn.Module):
    """The reference's convolutional path, layer for layer: images [B, 1, 28, 28] -> digit logits [B, 10].

    With `batch_norm`, a BatchNorm follows every convolution but the last, and those
    convolutions drop their bias, which the BatchNorm's own shift makes redundant.
    The two 1 x 1 convolutions (`pintconv`, pointwise) mix 64 channels down to 16 at each
    pixel, a cheap bottleneck before the next 3 x 3 convolutions.
    """
    lr_scale = 1.0  # learns at the base learning rate

    def __init__(self, batch_norm: bool = True):
        super().__init__()

        def conv(cin, cout, kernel=3, padding=0):
            return nn.Conv2d(cin, cout, kernel, padding=padding, bias=not batch_norm)

        def norm(channels):
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.conv1, self.norm1 = conv(1, 32, padding=1), norm(32)  # 28x28
        self.conv2, self.norm2 = conv(32, 64, padding=1), norm(64)
        self.pool1 = nn.MaxPool2d(2)  # 14x14
        self.pintconv1, self.norm3 = conv(64, 16, kernel=1), norm(16)
        self.conv3, self.norm4 = conv(16, 32, padding=1), norm(32)
        self.conv4, self.norm5 = conv(32, 64, padding=1), norm(64)
        self.pool2 = nn.MaxPool2d(2)  # 7x7
        self.pintconv2, self.norm6 = conv(64, 16, kernel=1), norm(16)
        self.conv5, self.norm7 = conv(16, 32), norm(32)  # 5x5
        self.conv6, self.norm8 = conv(32, 64), norm(64)  # 3x3
        self.conv7 = nn.Conv2d(64, NUM_DIGITS, 3)  # 1x1: the digit logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(images)))
        x = self.pool1(F.relu(self.norm2(self.conv2(x))))
        x = F.relu(self.norm3(self.pintconv1(x)))
        x = F.relu(self.norm4(self.conv3(x)))
        x = self.pool2(F.relu(self.norm5(self.conv4(x))))
        x = F.relu(self.norm6(self.pintconv2(x)))
        x = F.relu(self.norm7(self.conv5(x)))
        x = F.relu(self.norm8(self.conv6(x)))
        return self.conv7(x).flatten(1)


class SumHead(nn.Module):
    """What every sum head offers: log-probs of the 19 sums from (digit logits, one-hot number),
    the loss it trains on, and how fast its parameters learn (`lr_scale` times the base rate).

    Heads compute in fp32 even under bf16 autocast: they are tiny, so precision costs nothing.
    """
    lr_scale = 1.0

    def forward(self, digit_logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        """digit logits [B, 10] and one-hot numbers [B, 10] -> sum log-probs [B, 19]."""
        with _full_precision(digit_logits.device):
            return self.log_probs(digit_logits.float(), one_hot.float())

    def log_probs(self, digit_logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, digit_logits: torch.Tensor, one_hot: torch.Tensor, sums: torch.Tensor):
        """The training loss for integer `sums` [B]: the cross-entropy of the head's answer."""
        return F.nll_loss(self(digit_logits, one_hot), sums)


class MLPHead(SumHead):
    """The reference head: fc1 (20 -> 128), ReLU, fc2 (128 -> 19) on [digit, one-hot number].

    `input` "logits" feeds it the digit logits, as the reference did; "probs", their softmax.
    """

    def __init__(self, input: str = "logits"):
        super().__init__()
        if input not in ("logits", "probs"):
            raise ValueError(f"input must be 'logits' or 'probs', got {input!r}")
        self.input = input
        self.fc1 = nn.Linear(2 * NUM_DIGITS, 128)
        self.fc2 = nn.Linear(128, NUM_SUMS)

    def log_probs(self, digit_logits, one_hot):
        digit = digit_logits.softmax(1) if self.input == "probs" else digit_logits
        return F.log_softmax(self.fc2(F.relu(self.fc1(torch.cat([digit, one_hot], 1)))), 1)

    def extra_repr(self):
        return f"input={self.input!r}"


class LineHead(SumHead):
    """A learned number line: a position for each digit (x_d), number (y_n) and sum (z_s), all
    from random starts, and a sharpness k. A total t scores sum s by -k (t - z_s)^2.

    The 40 parameters learn 10x faster than the network: they must travel far from their
    random starts, and k must grow from 1 to several, while the one-cycle schedule still warms up.
    """
    lr_scale = 10.0

    def __init__(self):
        super().__init__()
        self.digit_position = nn.Parameter(0.1 * torch.randn(NUM_DIGITS))
        self.number_position = nn.Parameter(0.1 * torch.randn(NUM_DIGITS))
        self.sum_position = nn.Parameter(0.5 * torch.randn(NUM_SUMS))
        self.log_sharpness = nn.Parameter(torch.zeros(()))

    def sum_scores(self, total: torch.Tensor) -> torch.Tensor:
        """Log-probs of each sum for positions `total` [...]: nearer sums score higher."""
        scores = -self.log_sharpness.exp() * (total[..., None] - self.sum_position) ** 2
        return F.log_softmax(scores, dim=-1)

    def learned_positions(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{name}_position").detach().cpu()
                for name in ("digit", "number", "sum")}

    def extra_repr(self):
        sharpness = "?" if self.log_sharpness.is_meta else f"{float(self.log_sharpness.detach().exp()):.3g}"
        return f"positions: {NUM_DIGITS} digits, {NUM_DIGITS} numbers, {NUM_SUMS} sums; sharpness k = {sharpness}"


class AdderHead(LineHead):
    """For every digit d the image may show, the positions add, and the answers are mixed:

        p(s | image, n) = sum over d of p(d | image) q(s | d, n),
        q(s | d, n) = softmax over s of -k (x_d + y_n - z_s)^2.

    Nothing here says which positions are right: their order and spacing are learned.
    """

    def sum_given_digit(self, one_hot: torch.Tensor) -> torch.Tensor:
        """log q(s | d, n) for every digit d: [B, 10 digits, 19 sums]."""
        return self.sum_scores(self.digit_position + (one_hot @ self.number_position)[:, None])

    def log_probs(self, digit_logits, one_hot):
        per_digit = F.log_softmax(digit_logits, 1)[:, :, None] + self.sum_given_digit(one_hot)
        return torch.logsumexp(per_digit, dim=1)

    def training_loss(self, digit_logits, one_hot, sums):
        """The sum's cross-entropy -log q(s | d, n), averaged over the digits d with weights
        p(d | image).

        By Jensen's inequality (-log of a mixture is at most the mixture of -logs) this is an
        upper bound on the cross-entropy of the mixed answer. Its gradient moves the positions of
        the digit the network believes, where the mixture's own gradient can blame an unlikely
        digit and leave rare sums in the wrong place on the line. The weights p(d | image) are
        held fixed (detached): the digit reader learns from the digit labels alone, since a sum
        label says nothing more about the image.
        """
        with _full_precision(digit_logits.device):
            per_digit = self.sum_given_digit(one_hot.float())  # [B, 10, 19]
            weights = F.log_softmax(digit_logits.float(), 1).exp().detach()
            target = sums[:, None, None].expand(-1, NUM_DIGITS, 1)
            return -(weights * per_digit.gather(2, target)[..., 0]).sum(1).mean()


class NumberLineHead(LineHead):
    """The line fed the digit's *expected* position, sum over d of p(d | image) x_d: a digit
    the network hesitates over lands between two sums."""

    def log_probs(self, digit_logits, one_hot):
        total = digit_logits.softmax(1) @ self.digit_position + one_hot @ self.number_position
        return self.sum_scores(total)


SUM_HEADS = {"adder": AdderHead, "logits": partial(MLPHead, "logits"),
             "probs": partial(MLPHead, "probs"), "number_line": NumberLineHead}


def _make_sum_head(kind: str) -> SumHead:
    """The one place that turns a head's name into a head."""
    if kind not in SUM_HEADS:
        raise ValueError(f"sum_head must be one of {tuple(SUM_HEADS)}, got {kind!r}")
    return SUM_HEADS[kind]()


def _parameter_groups(lr: float, *modules: nn.Module) -> list[dict]:
    """Optimizer groups: each module's parameters at `lr` times its `lr_scale`."""
    return [{"params": list(module.parameters()), "lr": lr * module.lr_scale}
            for module in modules]


class Net(nn.Module):
    """The digit reader (the reference's convolutions) followed by a sum head.

    `sum_head`: "adder" (default), "logits" (the reference's fc1/fc2), "probs" (fc1/fc2 on the
    digit's probabilities) or "number_line"; see `SUM_HEADS`.
    """

    def __init__(self, batch_norm: bool = True, sum_head: str = "adder"):
        super().__init__()
        self.digit_reader = DigitReader(batch_norm)
        self.sum_head = _make_sum_head(sum_head)
        self._config = {"batch_norm": batch_norm, "sum_head": sum_head}

    def digit_logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 1, 28, 28] -> digit logits [B, 10]."""
        return self.digit_reader(images)

    def forward(self, images: torch.Tensor, numbers: torch.Tensor):
        """images [B, 1, 28, 28]; numbers int [B] or one-hot [B, 10].

        Returns (digit log-probs [B, 10], sum log-probs [B, 19]).
        """
        logits = self.digit_reader(images)
        return F.log_softmax(logits, dim=1), self.sum_head(logits, _as_one_hot(numbers))

    def training_loss(self, digit_logits: torch.Tensor, numbers: torch.Tensor, labels: torch.Tensor):
        """The training loss: the mean of the digit's cross-entropy and the sum head's own loss.

        `numbers` and `labels` are integers [B]; the sum label is their total.
        """
        digit_loss = F.cross_entropy(digit_logits.float(), labels)
        sum_loss = self.sum_head.training_loss(digit_logits, _as_one_hot(numbers), labels + numbers)
        return (digit_loss + sum_loss) / 2

    def parameter_groups(self, lr: float) -> list[dict]:
        return _parameter_groups(lr, self.digit_reader, self.sum_head)

    def config(self) -> dict:
        return dict(self._config)


# ----------------------------------------------------------------------------- training


# Mild distortions, so the reader meets handwriting a little unlike MNIST's.
_AUGMENT_DEGREES = 12  # rotation, either way
_AUGMENT_SCALE = 0.12  # enlarged or shrunk by up to 12 %
_AUGMENT_SHIFT = 2.5  # pixels, along each axis
_AUGMENT_THICKER, _AUGMENT_THINNER = 1 / 4, 1 / 3  # shares of images whose strokes change width
_AUGMENT_SOFT = 0.15  # share of images softened (a 3 x 3 mean, the strongest ink back to 1): 30 % of
#                      the outliers are blurred, and softness alone must not tell them from digits
#                      (0.3 flagged more real digits and read fewer MNIST ones, over two seeds each)


def _max3x3(images: torch.Tensor) -> torch.Tensor:
    """The maximum over each pixel's 3 x 3 neighbourhood, [B, 1, H, W], as the same result as
    F.max_pool2d(images, 3, 1, 1) but from shifted views: about 15 times faster on the CPU for
    single-channel images, where max_pool2d cost more than the rest of `augment` together."""
    padded = F.pad(images, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def draw_distortions(count: int, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random settings for `augment`, one row per image, [count, 7]: rotation (radians), scale,
    shift along x and y (pixels), which stroke change (below _AUGMENT_THICKER: thicker; then,
    up to _AUGMENT_THINNER more: thinner; else none), how much of it, and whether to soften
    (1) or not (0). `strength` scales every range, so 0 draws no change. Drawn on the CPU from
    `generator`, so a seed repeats them on every device; `train` draws a whole epoch's at once
    and copies them to the device once."""
    def uniform(*shape):  # in [-strength, strength]
        return strength * (2 * torch.rand(*shape, generator=generator) - 1)

    angle = uniform(count) * math.radians(_AUGMENT_DEGREES)
    scale = 1 + uniform(count) * _AUGMENT_SCALE
    shift = uniform(count, 2) * _AUGMENT_SHIFT
    pick = torch.rand(count, generator=generator)
    weight = (strength * torch.rand(count, generator=generator)).clamp(max=1)
    soft = (torch.rand(count, generator=generator) < strength * _AUGMENT_SOFT).float()
    return torch.stack([angle, scale, shift[:, 0], shift[:, 1], pick, weight, soft], 1)


def augment(images: torch.Tensor, distortions: torch.Tensor) -> torch.Tensor:
    """Normalized images [B, 1, H, W] distorted by `draw_distortions`' rows [B, 7], on the
    images' device, as batched tensor ops: each is rotated, scaled and shifted (one affine
    warp), its strokes are thickened or thinned by blending towards a 3 x 3 max-pool or
    min-pool, and some are softened."""
    angle, scale, shift_x, shift_y, pick, weight, soft = distortions.T[..., None, None, None]
    cos, sin = angle.cos() / scale, angle.sin() / scale
    shift_x, shift_y = (2 / images.shape[-1]) * shift_x, (2 / images.shape[-2]) * shift_y  # to [-1, 1]
    theta = torch.cat([cos, -sin, shift_x, sin, cos, shift_y], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    paper = -MNIST_MEAN / MNIST_STD  # black, normalized: what the warp brings in from outside
    warped = F.grid_sample(images - paper, grid, align_corners=False) + paper
    thicker, thinner = _max3x3(warped), -_max3x3(-warped)
    target = torch.where(pick < _AUGMENT_THICKER, thicker,
                         torch.where(pick < _AUGMENT_THICKER + _AUGMENT_THINNER, thinner, warped))
    distorted = warped + weight * (target - warped)
    ink = F.avg_pool2d(denormalize(distorted).clamp(0, 1), 3, 1, 1, count_include_pad=False)
    softened = normalize(ink / ink.amax((2, 3), keepdim=True).clamp(min=1e-6))
    return torch.where(soft > 0.5, softened, distorted)  # computed for all: no data-dependent shape


def outlier_loss(digit_logits: torch.Tensor) -> torch.Tensor:
    """Outlier exposure's loss: the cross-entropy from the uniform distribution over the 10
    digits to the answer, least (log 10) when the answer prefers no digit."""
    logits = digit_logits.float()
    return (logits.logsumexp(1) - logits.mean(1)).mean()


@dataclass
class Batch:
    """One training batch: normalized `images` [B, 1, 28, 28], `labels` and `numbers` [B], and
    `outliers` [K, 1, 28, 28], pictures of no digit for outlier exposure (None: none)."""
    images: torch.Tensor
    labels: torch.Tensor
    numbers: torch.Tensor
    outliers: torch.Tensor | None = None


def train_step(model: Net, optimizer, batch: Batch, precision: str,
               outlier_weight: float = 0.0, scaler=None) -> torch.Tensor:
    """One optimizer step on a batch, with `precision` already resolved.

    The outliers go through the digit reader with the images, and their digit answer is
    pulled towards no preference (`outlier_loss`, weighted by `outlier_weight`); the sum head
    never sees them. Only the convolutions run under autocast; the heads, the loss and the
    weights stay fp32. `scaler`: `_gradient_scaler(precision, device)`, needed for fp16.
    Returns the batch's `cross_entropies` [digit, sum], as the test line measures them, still
    on the device: reading them would make the CPU wait for the device.
    """
    count, images = len(batch.labels), batch.images
    if batch.outliers is not None and len(batch.outliers):  # one pass: they share the batch's
        images = torch.cat([images, batch.outliers])  # BatchNorm statistics (8 of 136 pictures)
    with autocast(precision, images.device):
        logits = model.digit_logits(images).float()
    digit_logits, numbers, labels = logits[:count], batch.numbers, batch.labels
    loss = model.training_loss(digit_logits, numbers, labels)
    if len(logits) > count:
        loss = loss + outlier_weight * outlier_loss(logits[count:])
    with torch.no_grad():  # the adder trains on a bound; report what the test line measures
        answers = F.log_softmax(digit_logits, 1), model.sum_head(digit_logits, _as_one_hot(numbers))
        measured = cross_entropies(*answers, labels, labels + numbers)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # fp16: scale the loss up so small gradients survive, and back down before the step
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return measured


def _one_cycle_adam(groups: list[dict], total_steps: int):
    """Adam over parameter `groups`, and a one-cycle schedule peaking at each group's lr."""
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=total_steps)
    return optimizer, schedule


@contextmanager
def _progress_bar(steps: int, desc: str, disable: bool = False):
    """A tqdm bar over range(steps) that redraws at most every 2 s.

    Few redraws, because in a notebook each is a message to the front end, and nbval's kernel
    client drops messages (and fails the cell) past about a thousand per cell. A notebook bar's
    saved text, which static renderers such as GitHub show, is captured when the bar appears;
    it is rendered again when the bar closes, so it reads finished rather than 0 %.
    """
    from tqdm.notebook import tqdm as notebook_tqdm
    in_notebook = issubclass(tqdm, notebook_tqdm) and not disable
    bar = tqdm(range(steps), desc=desc, disable=disable, mininterval=2,
               **({"display": False} if in_notebook else {}))
    shown = None
    if in_notebook:
        from IPython.display import display
        shown = display(bar.container, display_id=True)
    try:
        yield bar
    finally:
        bar.close()
        if shown is not None:
            shown.update(bar.container)


@dataclass(frozen=True)
class Recipe:
    """How to train. The defaults are the notebook's and the command line's."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01  # the peak of the one-cycle schedule
    seed: int = 0  # the order, the numbers and the augmentation of every epoch
    augment: float = 1.0  # the strength of `augment`; 0 trains on the images as they are
    outliers: int = 8  # pictures of no digit added to each batch (outlier exposure); 0: none
    outlier_weight: float = 0.1  # their loss's weight: 0.15 read MNIST 0.1 point worse on 4 seeds of 4
    holdout: tuple | None = None  # (digit, number) pairs that never occur in training
    precision: str = "auto"

    def __post_init__(self):
        counts = (self.epochs, self.batch_size, self.outliers, self.seed)
        if not all(isinstance(count, int) and not isinstance(count, bool) for count in counts):
            raise ValueError(f"epochs, batch_size, outliers and seed must be whole numbers, got {counts}")
        amounts = (self.lr, self.augment, self.outlier_weight)
        if min(self.epochs, self.batch_size) < 1 or not all(math.isfinite(a) for a in amounts) \
                or not self.lr > 0 or min(self.augment, self.outliers, self.outlier_weight) < 0:
            raise ValueError("epochs and batch_size must be at least 1, lr positive, and "
                             "augment, outliers and outlier_weight at least 0 (and finite)")


class _TrainingData:
    """The training split served one epoch at a time, as `train` consumes it: each epoch has a
    fresh order and fresh numbers (never a held-out pair), distorted images unless
    `recipe.augment` is 0, and `recipe.outliers` fresh pictures of no digit with each batch.
    Seeded by `recipe.seed`."""

    def __init__(self, split: Split, recipe: Recipe):
        self.split, self.recipe = split, recipe
        self.holdout = None if recipe.holdout is None else _pairs_table(recipe.holdout)
        self.data_rng = torch.Generator().manual_seed(recipe.seed)
        # Generators of their own, so the orders and numbers do not depend on the other settings.
        self.augment_rng = torch.Generator().manual_seed(recipe.seed + 1)
        self.outlier_rng = torch.Generator().manual_seed(recipe.seed + 2)

    def __len__(self):
        """Batches per epoch."""
        return math.ceil(len(self.split) / self.recipe.batch_size)

    def batch_sizes(self) -> torch.Tensor:
        """How many images each batch of an epoch holds; only the last may hold fewer."""
        sizes = torch.full((len(self),), self.recipe.batch_size)
        sizes[-1] = len(self.split) - (len(self) - 1) * self.recipe.batch_size
        return sizes

    def epoch(self):
        """One epoch of `Batch`es, on the split's device. Its random choices (order, numbers,
        distortions, outliers) are drawn at once and copied to the device once."""
        split, recipe, size, per_batch = self.split, self.recipe, self.recipe.batch_size, self.recipe.outliers
        outliers = outlier_batch(len(self) * per_batch, self.outlier_rng, split.images) if per_batch else None
        distortions = draw_distortions(len(split), self.augment_rng, recipe.augment) \
            .to(split.images.device) if recipe.augment else None
        for step, (index, numbers) in enumerate(_epoch_batches(split.labels, size, self.data_rng, self.holdout)):
            images = split.images[index]
            if distortions is not None:
                images = augment(images, distortions[step * size:(step + 1) * size])
            yield Batch(images, split.labels[index], numbers,
                        None if outliers is None else outliers[step * per_batch:(step + 1) * per_batch])


def _step_schedule(schedule):
    """schedule.step(), without torch's warning when fp16's scaler has just skipped a step
    whose gradients overflowed: the schedule moves on regardless, as intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        schedule.step()


def train(model: Net, train_split: Split, test_split: Split, recipe: Recipe = Recipe(), *,
          progress: bool = True, log=print, on_epoch=None, stop_requested=None) -> list[dict]:
    """Adam with a one-cycle schedule; fresh order, numbers and distortions every epoch.

    Trains on the splits' device, which the model is moved to. After each epoch, `log` gets the
    test line and `on_epoch` the history so far. Returns one dict per epoch: `epoch`,
    `train_seconds`, `precision`, `train_loss` (the test line's loss on the training batches,
    averaged over the epoch), `evaluate(...).summary()`, and `step_losses`, each step's
    [digit, sum] cross-entropies. `stop_requested`: checked after every step; once it returns
    True, training raises KeyboardInterrupt there, between two steps (the command line's Ctrl-C).
    """
    device = train_split.images.device
    if test_split.numbers is None:  # found now, not after the first epoch
        raise ValueError("the test split needs fixed numbers: use load_split(train=False)")
    if test_split.images.device != device:
        raise ValueError(f"the training split is on {device} but the test split on "
                         f"{test_split.images.device}: load both with the same device=")
    precision = choose_precision(recipe.precision, device)
    model.to(device, memory_format=_memory_format(device))
    data = _TrainingData(train_split, recipe)
    optimizer, schedule = _one_cycle_adam(model.parameter_groups(recipe.lr), recipe.epochs * len(data))
    scaler = _gradient_scaler(precision, device)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        started = time.perf_counter()
        with _progress_bar(len(data), f"Epoch {epoch}/{recipe.epochs}", disable=not progress) as bar:
            losses = torch.zeros(len(data), 2, device=device)  # per step; on the device until the end
            for step, batch in zip(bar, data.epoch()):
                losses[step] = train_step(model, optimizer, batch, precision, recipe.outlier_weight, scaler)
                _step_schedule(schedule)
                if stop_requested is not None and stop_requested():
                    raise KeyboardInterrupt
            _synchronize(device)
            seconds = time.perf_counter() - started
            losses = _to_host(losses)[0]
            train_loss = float((losses.mean(1) * data.batch_sizes()).sum() / len(train_split))
            bar.set_postfix(loss=f"{train_loss:.4f}")
        result = evaluate(model, test_split)
        history.append({"epoch": epoch, "train_seconds": seconds, "precision": precision,
                        "train_loss": train_loss, **result.summary(), "step_losses": losses.tolist()})
        if log:
            log(result.test_line())
        if on_epoch:
            on_epoch(history)
    return history


@contextmanager
def _seeded(seed: int):
    """Inside, the CPU's random generator starts from `seed`; after, the caller's generators
    (the CPU's and every GPU's) are as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed GPUs too
        yield


def train_sum_head(kind: str | SumHead, digit_logits: torch.Tensor, labels: torch.Tensor,
                   recipe: Recipe = Recipe(epochs=2), sum_classes: torch.Tensor | None = None) -> SumHead:
    """A fresh sum head of `kind` (a name in `SUM_HEADS`, or a `SumHead` of your own, which is
    trained in place), trained alone on the frozen digit logits of a trained network, on their
    device.

    The same loss, optimizer and schedule as `train` (and `recipe.holdout`), in seconds rather
    than minutes, because no convolution runs. `sum_classes` [19], if given, is the class each
    true sum is taught as: a permutation scrambles the labels.
    """
    with _seeded(recipe.seed):  # built on the CPU from a seeded start, then moved
        head = (_make_sum_head(kind) if isinstance(kind, str) else kind).to(digit_logits.device).train()
    generator = torch.Generator().manual_seed(recipe.seed)
    holdout = None if recipe.holdout is None else _pairs_table(recipe.holdout)
    classes = torch.arange(NUM_SUMS) if sum_classes is None else sum_classes
    classes = classes.to(labels.device)
    optimizer, schedule = _one_cycle_adam(_parameter_groups(recipe.lr, head),
                                         recipe.epochs * math.ceil(len(labels) / recipe.batch_size))
    for _ in range(recipe.epochs):
        for index, numbers in _epoch_batches(labels, recipe.batch_size, generator, holdout):
            loss = head.training_loss(digit_logits[index], _as_one_hot(numbers), classes[labels[index] + numbers])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


def sum_accuracy(head: SumHead, digit_logits: torch.Tensor, labels: torch.Tensor,
                 numbers: torch.Tensor, sum_classes: torch.Tensor | None = None) -> float:
    """The share of (digit logits, number) pairs whose sum `head` answers right; with
    `sum_classes`, right under those class names (see `train_sum_head`)."""
    with torch.no_grad():
        answers = head(digit_logits, _as_one_hot(numbers)).argmax(1)
    sums = labels + numbers
    truth = sums if sum_classes is None else sum_classes.to(sums.device)[sums]
    return float(_to_host((answers == truth).float().mean())[0])


# ----------------------------------------------------------------------------- evaluation


def cross_entropies(digit_log_probs, sum_log_probs, labels, sums) -> torch.Tensor:
    """[the digit's cross-entropy, the sum's], each averaged over the batch, from the two heads'
    log-probabilities. The test line's loss is their mean."""
    return torch.stack([F.nll_loss(digit_log_probs, labels), F.nll_loss(sum_log_probs, sums)])


@dataclass
class Evaluation:
    """Test metrics; `digit_pred` and `sum_pred` are per-image predictions."""
    digit_loss: float  # the digit's cross-entropy, averaged over the pairs
    sum_loss: float  # the sum's
    digit_correct: int
    sum_correct: int
    both_correct: int
    consistent: int
    count: int
    digit_confusion: torch.Tensor  # [10 true, 10 predicted]
    sum_confusion: torch.Tensor  # [19 true, 19 predicted]
    digit_pred: torch.Tensor
    sum_pred: torch.Tensor

    @property
    def loss(self) -> float:
        """The test line's "Average loss": the mean of the two cross-entropies."""
        return (self.digit_loss + self.sum_loss) / 2

    def summary(self) -> dict:
        """Plain numbers (accuracies as fractions), ready for JSON."""
        return {"loss": self.loss, "digit_loss": self.digit_loss, "sum_loss": self.sum_loss,
                "digit_acc": self.digit_correct / self.count, "sum_acc": self.sum_correct / self.count,
                "both_acc": self.both_correct / self.count, "consistency": self.consistent / self.count}

    def test_line(self) -> str:
        n = self.count
        return (f"Test set: Average loss: {self.loss:.4f}, "
                f"Digit accuracy: {self.digit_correct}/{n} ({100 * self.digit_correct / n:.2f}%), "
                f"Sum accuracy: {self.sum_correct}/{n} ({100 * self.sum_correct / n:.2f}%)")


def _confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(truth * classes + predicted, minlength=classes * classes).view(classes, classes)


@torch.no_grad()
def digit_logits_of(model: Net, split: Split, batch_size: int = 1000) -> torch.Tensor:
    """The digit logits [N, 10] of every image in the split, in fp32, on the split's device."""
    model.eval()
    return torch.cat([model.digit_logits(split.images[start:start + batch_size]).float()
                      for start in range(0, len(split), batch_size)])


@torch.no_grad()
def evaluate(model: Net, split: Split, batch_size: int = 1000) -> Evaluation:
    """Average loss, accuracies, consistency and confusion matrices on the split's numbers, in
    fp32 (as `predict` answers), whatever the model was trained in."""
    if split.numbers is None:
        raise ValueError("evaluate needs a split with fixed numbers (load_split(train=False))")
    logits = digit_logits_of(model, split, batch_size)
    digit_lp, sum_lp = F.log_softmax(logits, 1), model.sum_head(logits, _as_one_hot(split.numbers))
    losses = cross_entropies(digit_lp, sum_lp, split.labels, split.sums)
    losses, digit_pred, sum_pred, labels, numbers = _to_host(
        losses, digit_lp.argmax(1), sum_lp.argmax(1), split.labels, split.numbers)
    sums = labels + numbers
    digit_ok, sum_ok = digit_pred == labels, sum_pred == sums
    return Evaluation(
        digit_loss=float(losses[0]), sum_loss=float(losses[1]), digit_correct=int(digit_ok.sum()), sum_correct=int(sum_ok.sum()),
        both_correct=int((digit_ok & sum_ok).sum()),
        consistent=int((sum_pred == digit_pred + numbers).sum()), count=len(split),
        digit_confusion=_confusion_matrix(labels, digit_pred, NUM_DIGITS),
        sum_confusion=_confusion_matrix(sums, sum_pred, NUM_SUMS),
        digit_pred=digit_pred, sum_pred=sum_pred)


@torch.no_grad()
def evaluate_all_numbers(model: Net, split: Split) -> dict:
    """Every image with each of the 10 numbers: the convolutions once, the small head ten times.

    Returns `sum_acc` over all pairs, `per_number` [10] and `per_pair` [10 digits, 10 numbers]
    accuracies, and `pair_counts`, how many test pairs each cell holds.
    """
    return sum_accuracy_by_pair(model.sum_head, digit_logits_of(model, split), split.labels)


@torch.no_grad()
def sum_accuracy_by_pair(head: SumHead, digit_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """`evaluate_all_numbers` from digit logits already computed: the sum head alone."""
    digits = F.one_hot(labels, NUM_DIGITS).float()  # [N, 10]: counts per digit by a product
    correct = []
    for number in range(NUM_DIGITS):
        one_hot = F.one_hot(torch.full_like(labels, number), NUM_DIGITS).float()
        right = (head(digit_logits, one_hot).argmax(1) == labels + number).float()
        correct.append(right @ digits)  # [10 digits]
    correct, counts = _to_host(torch.stack(correct, 1), digits.sum(0))  # [digit, number], [digit]
    counts = counts[:, None].expand(-1, NUM_DIGITS)
    return {"sum_acc": float(correct.sum() / counts.sum()),
            "per_number": (correct.sum(0) / counts.sum(0)).tolist(),
            "per_pair": correct / counts, "pair_counts": counts.long()}


def results_table(result: Evaluation, all_numbers: dict) -> str:
    """The headline figures as a small text table."""
    summary = result.summary()
    pairs = int(all_numbers["pair_counts"].sum())
    rows = [("digit accuracy", summary["digit_acc"]), ("sum accuracy", summary["sum_acc"]),
            ("both correct", summary["both_acc"]),
            ("consistency (sum = digit + number)", summary["consistency"]),
            (f"sum accuracy, all {pairs:,} pairs", all_numbers["sum_acc"])]
    return "\n".join(f"{name:36} {100 * value:6.2f} %" for name, value in rows)


def held_out_accuracy(all_numbers: dict, pairs) -> dict:
    """Sum accuracy of `evaluate_all_numbers` on the given (held-out) pairs and on the rest."""
    table = _pairs_table(pairs)
    correct = all_numbers["per_pair"] * all_numbers["pair_counts"]
    counts = all_numbers["pair_counts"]
    return {"held_out_acc": float(correct[table].sum() / counts[table].sum()),
            "seen_acc": float(correct[~table].sum() / counts[~table].sum()),
            "held_out_count": int(counts[table].sum()), "seen_count": int(counts[~table].sum())}


def line_evidence(held_out) -> dict:
    """What the seen pairs tell a line head. Each seen pair (d, n) is one equation,
    x_d + y_n = z_{d+n}, on the 39 positions. Addition itself leaves 3 of them free (where 0 sits
    on the digits' and on the numbers' line, and the unit), so 36 independent equations fix every
    position; with fewer, some positions have no evidence, and the unseen pairs are a guess.
    Returns `equations` (independent ones), `needed` (36) and `unseen_sums`, the sums no seen
    pair has."""
    seen = (~_pairs_table(held_out)).nonzero().tolist()
    system = torch.zeros(len(seen), 2 * NUM_DIGITS + NUM_SUMS)
    for row, (digit, number) in enumerate(seen):
        system[row, [digit, NUM_DIGITS + number, 2 * NUM_DIGITS + digit + number]] = torch.tensor([1.0, 1, -1])
    return {"equations": int(torch.linalg.matrix_rank(system)), "needed": system.shape[1] - 3,
            "unseen_sums": NUM_SUMS - len({digit + number for digit, number in seen})}


# ----------------------------------------------------------------------------- using a model


def _as_number(number) -> int:
    if isinstance(number, torch.Tensor) and number.numel() == 1 and not number.is_floating_point() \
            and number.dtype != torch.bool:
        number = int(number)
    elif isinstance(number, np.integer):
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"number must be an integer 0..9, got {number!r} ({type(number).__name__})")
    if not 0 <= number < NUM_DIGITS:
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
def _log_probs(model: Net, inputs: list[torch.Tensor], numbers: list[int]):
    """Digit log-probs [B, 10] and sum log-probs [B, 19], on the CPU, for prepared inputs
    [1, 28, 28] and numbers, on the model's device, in fp32."""
    batch = torch.stack(inputs)
    device = next(model.parameters()).device
    model.eval()
    answers = [model(batch[start:start + 1000].to(device),  # a thousand at a time: bounded memory
                     torch.tensor(numbers[start:start + 1000], device=device))
               for start in range(0, len(batch), 1000)]
    return _to_host(*(torch.cat(parts) for parts in zip(*answers)))


def predict_proba(model: Net, image, number) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit probabilities [10], sum probabilities [19]), on the CPU, for one picture of a
    digit (any picture `prepare_image` takes) and a number 0..9. A picture with no digit
    raises NoDigitError; a wrong call, another ValueError or a TypeError."""
    number = _as_number(number)
    digit_lp, sum_lp = _log_probs(model, [prepare_image(image)], [number])
    return digit_lp[0].exp(), sum_lp[0].exp()


def predict(model: Net, image, number) -> tuple[int, int]:
    """(digit, sum): each head's answer for one picture and a number 0..9 (see `predict_proba`).
    Where they may disagree, or the network may be unsure, `Answer` says so."""
    digit_probs, sum_probs = predict_proba(model, image, number)
    return int(digit_probs.argmax()), int(sum_probs.argmax())


def read_pictures(model: Net, pictures, numbers, prepare=None):
    """(digit probabilities [N, 10], sum probabilities [N, 19]) for many pictures and their
    numbers, each picture made ready by `prepare` (default `prepare_image`). A picture that
    shows no digit (NoDigitError) gets a row of NaN, and the others are still read; any other
    mistake in the call raises.

    `pictures`: a list of pictures, each as `prepare_image` takes it, or one array or tensor
    whose first dimension is the batch ([B, H, W], or [B, C, H, W] for a tensor).
    """
    pictures, numbers = _checked_batch(pictures, numbers)
    prepare = prepare or prepare_image
    inputs = []
    for picture in pictures:
        try:
            inputs.append(prepare(picture))
        except NoDigitError:
            inputs.append(None)
    read = [index for index, prepared in enumerate(inputs) if prepared is not None]
    digit_probs, sum_probs = torch.full((len(inputs), NUM_DIGITS), float("nan")), \
        torch.full((len(inputs), NUM_SUMS), float("nan"))
    if read:
        digit_lp, sum_lp = _log_probs(model, [inputs[i] for i in read], [numbers[i] for i in read])
        digit_probs[read], sum_probs[read] = digit_lp.exp(), sum_lp.exp()
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
        return f"not sure ({self.digit} or {int(self.digit_probs.topk(2).indices[1])})"


def tally(model: Net, pictures, labels, numbers, prepare=None) -> dict[str, int]:
    """Counts for many labelled pictures: `pictures`; `right`, digit and sum both right;
    `flagged`, refused or not sure (`is_sure`); `refused`, no digit found by `prepare`; and
    `confidently_wrong`, wrong yet sure, the worst outcome."""
    digit_probs, sum_probs = read_pictures(model, pictures, numbers, prepare)
    labels, numbers = torch.as_tensor(labels), torch.as_tensor(numbers)
    right = (digit_probs.argmax(1) == labels) & (sum_probs.argmax(1) == labels + numbers)
    right &= ~digit_probs.isnan().any(1)  # argmax reads a row of NaN as digit 0
    sure = is_sure(digit_probs, sum_probs, numbers)
    return {"pictures": len(labels), "right": int(right.sum()), "flagged": int((~sure).sum()),
            "refused": int(digit_probs.isnan().any(1).sum()), "confidently_wrong": int((sure & ~right).sum())}


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


def score_folder(model: Net, folder, seed: int = 0) -> dict:
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
    numbers = draw_numbers(len(files), seed).tolist()
    counts, mistakes, unreadable = {}, [], []
    for (path, label, group), number in zip(files, numbers):
        try:
            picture = read_image(path)
        except ValueError:
            unreadable.append(path)
            continue
        try:
            answer = Answer(*(lp[0].exp() for lp in _log_probs(model, [prepare_image(picture)], [number])), number)
        except NoDigitError:
            answer = None
        right = answer is not None and (answer.digit, answer.total) == (label, label + number)
        sure = answer is not None and answer.sure
        for key in (group, "all"):
            row = counts.setdefault(key, dict.fromkeys(("pictures", "right", "flagged", "refused", "confidently_wrong"), 0))
            row["pictures"] += 1
            row["right"] += right
            row["flagged"] += not sure
            row["refused"] += answer is None
            row["confidently_wrong"] += sure and not right
        if not right or not sure:
            mistakes.append((path, label, number, answer))
    if not counts:
        raise ValueError(f"none of the {len(files)} labelled files in '{folder}' could be read as a picture")
    return {"groups": {key: row for key, row in counts.items() if key != "all"}, "all": counts.get("all"),
            "mistakes": mistakes, "unreadable": unreadable, "unlabelled": unlabelled}


# ----------------------------------------------------------------------------- checkpoints


_CHECKPOINT_FORMAT = "mnist-digit-plus-number"
_CHECKPOINT_VERSION = 2  # 2: the digit reader and the sum head are submodules of Net
_V1_SUM_HEAD_NAMES = ("digit_position", "number_position", "sum_position", "log_sharpness",
                     "fc1.", "fc2.")


class CheckpointError(ValueError):
    """The file is not a checkpoint written by `save_checkpoint`."""


def _plain(value, name: str):
    """`value` as what `load_checkpoint` can read back safely: None, bools, numbers, strings,
    tensors, and lists, tuples and dicts (with string keys) of them. NumPy numbers become
    Python's; anything else raises ValueError now, not when the file is loaded."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f"{name}[{index}]") for index, item in enumerate(value))
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _plain(item, f"{name}[{key!r}]") for key, item in value.items()}
    raise ValueError(f"checkpoint metadata {name} has type {type(value).__name__}, which cannot be "
                     f"loaded back safely; give numbers, strings, tensors, or lists and dicts of them")


def save_checkpoint(model: Net, path, **metadata) -> None:
    """Weights and what is needed to use them, with `metadata` (see `_plain` for what it may
    hold); atomic, so a failed save keeps the old file."""
    path = Path(path)
    checkpoint = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION,
                  "config": model.config(), "digit_classes": NUM_DIGITS, "sum_classes": NUM_SUMS,
                  "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
                  "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "metadata": {key: _plain(value, key) for key, value in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_state_dict(checkpoint: dict, path: Path) -> dict:
    """The checkpoint's weights under today's names; version 1 named them without submodules."""
    version = checkpoint.get("version")
    if version == _CHECKPOINT_VERSION:
        return checkpoint["state_dict"]
    if version == 1:
        return {(f"sum_head.{name}" if name.startswith(_V1_SUM_HEAD_NAMES) else
                 f"digit_reader.{name}"): value for name, value in checkpoint["state_dict"].items()}
    raise CheckpointError(f"'{path}' is a checkpoint of version {version!r}, and this helpers.py "
                          f"reads versions 1 to {_CHECKPOINT_VERSION}: update helpers.py, or retrain "
                          f"with `python helpers.py train`")


def _load_cause(error: Exception) -> str:
    """The cause in torch.load's error, in one line. Its message runs to many lines and
    suggests weights_only=False, which would run any code the file holds: not advice to pass on."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    cause = next((line.strip() for line in text.splitlines() if line.strip()), "")
    cause = cause.split(". Please use", 1)[0]  # torch's advice on allowlisting starts there
    return f"{type(error).__name__}: {cause}" if cause else type(error).__name__


def load_checkpoint(path, device="cpu") -> Net:
    """The model saved by `save_checkpoint` (any version so far), in eval mode on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({_load_cause(error)}); "
                              f"give a file saved by `helpers.py train` or save_checkpoint") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project "
                              f"(expected format {_CHECKPOINT_FORMAT!r})")
    state_dict = _current_state_dict(checkpoint, path)
    if (checkpoint["digit_classes"], checkpoint["sum_classes"]) != (NUM_DIGITS, NUM_SUMS) \
            or checkpoint["normalization"] != {"mean": MNIST_MEAN, "std": MNIST_STD}:
        raise CheckpointError(f"'{path}' was saved for other classes or normalization")
    model = Net(**checkpoint["config"])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"'{path}' has weights that do not fit the model: {error}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- preparing a picture

def _pil_as_array(image) -> np.ndarray:
    """A PIL picture as an array: turned upright as the camera's EXIF tag says, 16-bit
    grayscale scaled to [0, 1], transparency kept, anything else in PIL's own grayscale
    (the same weights as ours, and fast)."""
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image, np.float32) / 65535
    if image.mode in ("I", "F"):
        return np.asarray(image)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return np.asarray(image.convert("RGBA") if has_alpha else
                      image if image.mode == "L" else image.convert("L"))


def _as_channels_first(image) -> torch.Tensor:
    """A PIL image, NumPy array [H, W(, C)] or tensor [(C, )H, W] as a tensor [C, H, W]."""
    if hasattr(image, "getbands"):
        image = _pil_as_array(image)
    if isinstance(image, np.ndarray):
        if image.dtype == object or image.dtype.kind not in "uif":
            raise TypeError(f"image array must hold numbers, got dtype {image.dtype}")
        if image.dtype.kind == "u" and image.dtype.itemsize > 1:  # torch lacks most uint16 ops
            image = image.astype(np.int64)
        image = torch.tensor(image)  # a copy: arrays from PIL are read-only
        if image.dim() == 3:  # NumPy and PIL put channels last
            image = image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a tensor, NumPy array or PIL image, got {type(image).__name__}")
    image = image.detach().cpu()  # a picture on a GPU is prepared on the CPU, as any other
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"image must hold intensities, got dtype {image.dtype}")
    shape = list(image.shape)
    image = image[None] if image.dim() == 2 else image
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected one grayscale or colour picture: [H, W], [C, H, W] for a tensor "
                         f"or [H, W, C] for an array, with C 1, 3 or 4; got shape {shape}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    return image


def _as_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Float intensities in [0, 1] from uint8-style 0..255 integers or floats already in [0, 1]."""
    if not image.is_floating_point():
        if image.min() < 0 or image.max() > 255:
            raise ValueError("integer images must hold intensities in 0..255")
        return image.float() / 255
    if not torch.isfinite(image).all():
        raise ValueError("image has NaN or infinite pixels")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        raise ValueError(f"float images must hold raw intensities in [0, 1], got values in "
                         f"[{low:.3g}, {high:.3g}] (pass uint8 0..255, or divide by 255; "
                         f"do not normalize)")
    return image.float()


def _intensities(image) -> torch.Tensor:
    """Any picture as grayscale intensities [H, W] in [0, 1]; transparent areas become white."""
    image = _as_unit_range(_as_channels_first(image))
    if image.shape[0] == 4:  # composite over white paper
        alpha = image[3:]
        image = image[:3] * alpha + (1 - alpha)
    if image.shape[0] == 3:
        image = (torch.tensor([0.299, 0.587, 0.114])[:, None, None] * image).sum(0, keepdim=True)
    return image[0]

class NoDigitError(ValueError):
    """The picture shows no digit that the preparation can find: it is blank, faint, noise,
    a blob, or only lines along its edge. Every other ValueError is a wrong call."""


# A picture of one digit is made ready the way MNIST was made (see `preparation_steps`).
# Each threshold is named here; shares are of the picture, of the ink, or of the digit's size.
_DIGIT_BOX, _FRAME = 20, 28  # MNIST fits each digit into 20 x 20, then centres it in 28 x 28
_WORKING_SIDE = 512  # larger pictures are shrunk (area average) to this longer side: an 80 px
#                     digit in a 1200 px photo keeps 34 px, more than the 20 it is fitted to
_UNEVEN_BORDER = 0.05  # the border's spread (10th to 90th percentile) above which the paper is
#                       flattened; MNIST's black border skips that step
_PAPER_WINDOW = 0.25  # the paper's brightness is found by erasing strokes narrower than this
#                      share of the shorter side (a thick marker on the largest digit: ~15 %)
_MIN_CONTRAST = 0.10  # the strongest ink differs from the paper by at least this; the strongest
_INK_PIXELS = 8  # ... being the level that this many pixels reach: a 1 px pencil line in a 28 px
#                 picture has more, one hot pixel or a speck of dust fewer
_NOISE_FLOOR = 3  # ink below the paper's level plus 3 robust standard deviations is noise
_PEAK_WINDOW = 3  # the strongest ink is the brightest 3 x 3 mean: one hot pixel is not ink
_INK_SHARE = 0.5  # strokes are the pixels above half the strongest ink; ruled lines, what is
#                  left of uneven light, and JPEG noise stay below
_MIN_TOGETHER = 0.15  # strokes: next to a stroke pixel is another this much more often than chance
_MAX_INK_SHARE = 0.6  # a picture that is mostly ink has no digit on it
_EDGE_SPAN = 0.5  # a piece touching the picture's edge and spanning half of it is the table
#                  beyond the sheet or a line across the page, not the digit ...
_EDGE_CONTACT = 0.5  # ... and so is a piece touching the edge along half its own size
_PIECE_SHARE = 0.15  # another piece of the digit has at least 15 % of its largest piece's ink
_PIECE_GAP = 0.5  # ... and lies within half the digit's size of it (a broken stroke, a 5's bar)
_MAX_HALF_WIDTH = 0.35  # a stroke's half width is at most 35 % of the digit's size: not a blob
_MAX_APART = 1  # at most one sizable piece lies apart from the digit (a stray mark)
_MIN_DIGIT_SHARE = 0.7  # the digit's pieces hold at least 70 % of the strong ink: a stray mark or a
#                        table's corner beside a digit holds far less (photo-like digits with them:
#                        at least 80 % in 99.5 % of them); more ink elsewhere is clutter, no digit
_EDGE_ONLY_SIZE = 0.6  # ink found only at the edge must span 60 % of the picture's height or width,
#                        and both if it lies along the edge (_EDGE_CONTACT): a tight crop's digit
#                        does, the shading along a blank page's border does not
_SPECK_SIZE = 0.05  # a piece spanning under 5 % of the picture's shorter side is a speck, not a digit
#                    (the smallest digit the preparation is made for, 80 px in a 1200 px photo, spans
#                    7 %); with only specks away from the edge, the ink along it is the digit of a
#                    tight crop, not the table
_STRONG_INK = 90  # this percentile of the digit's ink becomes 1, as MNIST's strokes saturate
_STROKE_WIDTH = 2.0  # px in the 28 x 28 frame: MNIST's median stroke width (1.9 px, at half the
#                     ink's strength, on 2,000 training digits enlarged 4 times to measure it)
_MIN_STROKE = 1.3  # strokes thinner than all but 1 % of MNIST's once framed (a 3 px pen on a 1000 px
#                   picture frames to 0.3 px and fades) are thickened to _STROKE_WIDTH: at 1.4 (3 %),
#                   prepared MNIST test digits kept 99.90 % of their answers, against 99.95 %
_MEASURE_SIZE = 80  # px: a smaller digit is measured and evened enlarged to at least this size, as
#                     MNIST's widths were: at 1 px or 2 px, the outline is the whole stroke, so the
#                     two measure alike, and a stroke can only grow by whole pixels
_MAX_ZOOM = 4  # ... enlarged at most 4 times, as MNIST's were
_MAX_STROKE = 3.0  # strokes wider than MNIST's 90th percentile (2.8 px) once framed (a marker on a
#                   small digit) are thinned towards _STROKE_WIDTH, by at most a quarter of their width


def preparation_steps(image) -> dict[str, torch.Tensor]:
    """A picture of one digit made the way MNIST was made, step by step.

    Returns {"picture", "ink", "kept", "cropped", "framed"}, each [H, W] float in [0, 1];
    "framed" is the digit fitted into 20 x 20 (keeping its shape), light on black, with its
    centre of mass at the centre of 28 x 28. The steps:

    1. grayscale; pictures larger than 512 px are shrunk to 512 (area average);
    2. find the ink: the paper is the picture's typical level and the ink the extreme farthest
       from it; turn it so that ink is bright, as in MNIST;
    3. if the border is unevenly lit, flatten the paper: divide out its brightness, found by
       erasing the strokes (a grey opening a quarter of the shorter side wide);
    4. a blank or faint page raises NoDigitError("no ink found");
    5. threshold at half the strongest ink; if those pixels do not form strokes (noise, or a
       page mostly ink), raise NoDigitError("no digit found");
    6. keep the digit: the largest connected piece that is not along the picture's edge
       (pieces along it are the table beyond the sheet or a line across the page, unless
       only specks lie inside: then they are the digit of a tight crop; if they held the
       strongest ink, threshold again without them), grown by the pieces near it that are
       not tiny (a broken stroke, a 5's bar); specks and stray marks go;
    7. a blob, several digit-sized shapes apart, only lines along the edge, or a digit that
       holds under _MIN_DIGIT_SHARE of the strong ink raise NoDigitError("no digit found");
    8. stretch: the paper to 0, the digit's strong ink to 1;
    9. thicken strokes that would frame much thinner than MNIST's (a thin pen on a big
       picture), thin those much wider (a marker on a small digit);
    10. crop to the kept pieces with their soft edges, fit into 20 x 20, centre by mass.

    An MNIST image is already in this form and comes back nearly unchanged.
    """
    picture = _intensities(image).numpy()
    ink = _ink_on_flat_paper(_working_copy(picture))  # steps 1 to 3
    floor, peak = _ink_levels(ink)  # step 4
    strong = _strokes(ink, floor, peak)  # step 5
    ink, pieces = _without_edge_pieces(ink, strong, floor)  # step 6
    kept = _digit(pieces)  # steps 6 and 7
    ink = _stretched(ink, kept, floor)  # step 8
    ink, kept = _even_strokes(ink, kept)  # step 9
    cropped, framed = _framed(ink, kept)  # step 10
    steps = {"picture": picture, "ink": ink, "kept": kept.astype(np.float32), "cropped": cropped,
             "framed": framed}
    return {name: torch.from_numpy(step) for name, step in steps.items()}


def _working_copy(picture: np.ndarray) -> np.ndarray:
    """Step 1: at most _WORKING_SIDE px; the area average also removes noise and speeds up."""
    scale = _WORKING_SIDE / max(picture.shape)
    if scale >= 1:
        return picture
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)  # cv2 sizes are (w, h)


def _border(picture: np.ndarray) -> np.ndarray:
    """The pixels along a picture's four edges."""
    return np.concatenate([picture[0], picture[-1], picture[:, 0], picture[:, -1]])


def _ink_on_flat_paper(gray: np.ndarray) -> np.ndarray:
    """Steps 2 and 3: ink bright on dark paper, the paper's uneven light divided out. The ink is
    the extreme farthest from the picture's typical level, by the levels that _INK_PIXELS
    pixels reach on either side: a thin pen line on a large page may be far fewer than 1 %."""
    paper = np.median(gray)
    low, high = np.partition(gray, (_INK_PIXELS - 1, gray.size - _INK_PIXELS), axis=None)[
        [_INK_PIXELS - 1, gray.size - _INK_PIXELS]]  # the levels _INK_PIXELS pixels reach
    ink = 1 - gray if paper - low > high - paper else gray.copy()
    border = _border(ink)
    if np.quantile(border, 0.9) - np.quantile(border, 0.1) <= _UNEVEN_BORDER:
        return ink
    # The paper's brightness: the ink with its strokes erased (a grey opening). For dark ink,
    # (ink - paper) / (1 - paper) is exactly 1 - gray / paper: the picture divided by its paper.
    window = max(3, int(_PAPER_WINDOW * min(ink.shape))) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (window, window))
    background = cv2.morphologyEx(ink, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    return ((ink - background) / np.maximum(1 - background, 1e-3)).clip(0, 1)


def _strongest(ink: np.ndarray) -> float:
    return float(cv2.blur(ink, (_PEAK_WINDOW, _PEAK_WINDOW)).max())


def _noise_floor(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(paper level, noise floor) of paper `pixels` [..., N]: their median, and that plus
    _NOISE_FLOOR robust standard deviations, read from the pixels at or below the median (1.4826
    times their median distance from it), so that ink, ruled lines or a table among the pixels,
    all brighter than the paper, do not widen it."""
    paper = np.median(pixels, axis=-1, keepdims=True)
    below = np.where(pixels <= paper, paper - pixels, np.nan)
    spread = 1.4826 * np.nanmedian(below, axis=-1, keepdims=True)
    return paper[..., 0], (paper + _NOISE_FLOOR * spread)[..., 0]


def _ink_levels(ink: np.ndarray) -> tuple[float, float]:
    """Step 4: (noise floor, strongest ink), or NoDigitError for a blank or faint page. The
    paper is the lower of the picture's and its border's median: the border's when the digit
    fills most of the picture (a tight crop), the picture's when the border lies in shadow."""
    paper = min(float(np.median(ink)), float(np.median(_border(ink))))
    floor = float(_noise_floor(np.append(ink[ink <= paper], paper))[1])
    peak = _strongest(ink)
    if np.partition(ink, -_INK_PIXELS, axis=None)[-_INK_PIXELS] - paper < _MIN_CONTRAST:
        raise NoDigitError(f"no ink found: the picture is blank or too faint (its ink and paper "
                           f"differ by less than {_MIN_CONTRAST:.0%}), or the digit is too thin or "
                           f"small for the picture: crop closer")
    return floor, peak


def _strokes(ink: np.ndarray, floor: float, peak: float) -> np.ndarray:
    """Step 5: the pixels above half the strongest ink, which must lie together as strokes."""
    strong = ink > max(floor, _INK_SHARE * peak)
    share = strong.mean()
    together = ((strong[1:] & strong[:-1]).sum() + (strong[:, 1:] & strong[:, :-1]).sum()) / 2
    if strong.sum() < 4 or share > _MAX_INK_SHARE or together / strong.sum() - share < _MIN_TOGETHER:
        raise NoDigitError("no digit found: the ink does not form strokes (the picture looks like "
                         "noise, or is mostly ink)")
    return strong


@dataclass
class _Pieces:
    """The connected pieces of a mask: `labels` [H, W] (0 is background, piece i is i + 1),
    and per piece its box (`x`, `y`, `w`, `h`), its `area`, `edge`: whether it lies along
    the picture's edge (touching it along half its own size, or touching it and spanning half
    the picture), `inner`: away from the edge and larger than a speck (_SPECK_SIZE), and
    `along`: touching the edge along half its own size."""
    labels: np.ndarray
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    area: np.ndarray
    edge: np.ndarray
    inner: np.ndarray
    along: np.ndarray

    @classmethod
    def of(cls, strong: np.ndarray) -> "_Pieces":
        count, labels, stats, _ = cv2.connectedComponentsWithStats(strong.astype(np.uint8),
                                                                   connectivity=8)
        x, y, w, h, area = stats[1:].T
        contact = np.bincount(_border(labels), minlength=count)[1:]
        height, width = strong.shape
        along = contact >= _EDGE_CONTACT * np.maximum(w, h)
        edge = (contact > 0) & ((w >= _EDGE_SPAN * width) | (h >= _EDGE_SPAN * height) | along)
        inner = ~edge & (np.maximum(w, h) >= _SPECK_SIZE * min(height, width))
        return cls(labels, x, y, w, h, area, edge, inner, along)


def _without_edge_pieces(ink: np.ndarray, strong: np.ndarray, floor: float):
    """Step 6, first half: (ink, pieces) with the pieces along the edge and their soft rims
    zeroed and the threshold taken again, if there are both edge pieces and inner ones (with
    only specks inside, the edge pieces are the digit of a tight crop)."""
    pieces = _Pieces.of(strong)
    if not pieces.edge.any() or not pieces.inner.any():
        return ink, pieces
    along_edge = np.isin(pieces.labels, np.flatnonzero(pieces.edge) + 1).astype(np.uint8)
    ink = ink.copy()
    ink[cv2.dilate(along_edge, np.ones((5, 5), np.uint8)) > 0] = 0
    return ink, _Pieces.of(ink > max(floor, _INK_SHARE * _strongest(ink)))


def _digit(pieces: _Pieces) -> np.ndarray:
    """Steps 6 and 7: the mask of the digit's pieces, grown from the largest piece not along
    the edge by the sizable pieces near it, until no more join; or ValueError for a blob,
    clutter, or ink only along the edge."""
    x, y, w, h, area = pieces.x, pieces.y, pieces.w, pieces.h, pieces.area
    if len(area) == 0:  # what was left beside the lines along the edge went with them
        raise NoDigitError("no digit found: only lines along the picture's edge")
    candidates = np.flatnonzero(pieces.inner) if pieces.inner.any() else np.arange(len(area))
    main = candidates[area[candidates].argmax()]
    sizable = candidates[area[candidates] >= _PIECE_SHARE * area[main]]
    chosen, (left, top, right, bottom) = [main], (x[main], y[main], x[main] + w[main], y[main] + h[main])
    while True:
        apart = np.maximum.reduce([left - (x + w), x - right, top - (y + h), y - bottom, 0 * x])
        near = [i for i in sizable if i not in chosen
                and apart[i] <= _PIECE_GAP * max(right - left, bottom - top)]
        if not near:
            break
        chosen += near
        left, top = min(left, *x[near]), min(top, *y[near])
        right, bottom = max(right, *(x + w)[near]), max(bottom, *(y + h)[near])
    kept = np.isin(pieces.labels, np.array(chosen) + 1)
    _check_digit(pieces, main, max(right - left, bottom - top), len(sizable) - len(chosen))
    if kept.sum() < _MIN_DIGIT_SHARE * (pieces.labels > 0).sum():
        raise NoDigitError(f"no digit found: the digit's pieces hold less than {_MIN_DIGIT_SHARE:.0%} "
                         f"of the ink (clutter, or several shapes): crop closer")
    return kept


def _check_digit(pieces: _Pieces, main: int, size: int, apart: int):
    """Step 7: the digit's largest piece must be strokes (not a blob), with at most _MAX_APART
    sizable pieces elsewhere, and not only a line along the edge."""
    x, y, w, h = pieces.x[main], pieces.y[main], pieces.w[main], pieces.h[main]
    piece = np.pad(pieces.labels[y:y + h, x:x + w] == main + 1, 1).astype(np.uint8)
    half_width = cv2.distanceTransform(piece, cv2.DIST_L2, 3).max()
    spans = np.array([w / pieces.labels.shape[1], h / pieces.labels.shape[0]]) >= _EDGE_ONLY_SIZE
    along_edge = pieces.edge[main] and not (spans.all() if pieces.along[main] else spans.any())
    if half_width > _MAX_HALF_WIDTH * size or apart > _MAX_APART or along_edge:
        raise NoDigitError("no digit found: the ink forms a blob, several shapes, or only lines "
                         "along the picture's edge")


def _stretched(ink: np.ndarray, kept: np.ndarray, floor: float) -> np.ndarray:
    """Step 8: the noise floor to 0, the digit's strong ink (_STRONG_INK percentile) to 1."""
    strongest = np.percentile(ink[kept], _STRONG_INK)
    return ((ink - floor) / max(strongest - floor, 1e-3)).clip(0, 1).astype(np.float32)


def _stroke_width(kept: np.ndarray) -> float:
    """The strokes' mean width in px: twice their area over their outline's length."""
    mask = np.pad(kept.astype(np.uint8), 1)
    outline = mask & ~cv2.erode(mask, np.ones((3, 3), np.uint8))
    return 2 * float(mask.sum()) / max(int(outline.sum()), 1)


def _size(kept: np.ndarray) -> int:
    """The kept pieces' larger side, in px."""
    rows, cols = np.nonzero(kept)
    return int(max(np.ptp(rows), np.ptp(cols))) + 1


def _even_strokes(ink: np.ndarray, kept: np.ndarray, enlarge: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Step 9: (ink, kept) with strokes that would frame thinner than _MIN_STROKE thickened (a
    grey dilation of the digit's ink) so that they frame _STROKE_WIDTH px wide, as MNIST's, and
    strokes wider than _MAX_STROKE thinned towards it (a grey erosion, by at most a quarter).

    Thin strokes are measured and thickened on the digit enlarged to _MEASURE_SIZE (unless not
    `enlarge`). Thick ones are measured and thinned at the picture's own scale, in whole pixels:
    enlarged, MNIST's own thickest digits would be thinned too, and right answers would change."""
    zoom = min(math.ceil(_MEASURE_SIZE / _size(kept)), _MAX_ZOOM) if enlarge else 1
    measured = _enlarged(kept, zoom) > 0.5
    if _framed_width(measured) < _MIN_STROKE:
        return _regrown(_enlarged(ink, zoom), measured)  # the ink only now: most strokes pass
    if _framed_width(kept) > _MAX_STROKE:
        return _regrown(ink, kept)
    return ink, kept


def _enlarged(image: np.ndarray, zoom: int) -> np.ndarray:
    """`image` enlarged `zoom` times (bilinear), as float32; itself when `zoom` is 1."""
    if zoom == 1:
        return image
    return cv2.resize(np.asarray(image, np.float32), None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)


def _framed_width(kept: np.ndarray) -> float:
    """The strokes' width once the digit is framed (its larger side _DIGIT_BOX px), in px."""
    return _stroke_width(kept) * _DIGIT_BOX / _size(kept)


def _regrown(ink: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ink, kept) grown or shrunk by whole pixels so that the strokes frame _STROKE_WIDTH px wide,
    shrunk by at most a quarter of their width."""
    size, width = _size(kept), _stroke_width(kept)
    # Growing by r on each side: (width + 2r) / (size + 2r) = _STROKE_WIDTH / _DIGIT_BOX.
    radius = (_STROKE_WIDTH * size - _DIGIT_BOX * width) / (2 * (_DIGIT_BOX - _STROKE_WIDTH))
    radius = int(max(radius, -width / 4))  # towards zero: never more than a quarter
    if radius == 0:
        return ink, kept
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(radius) + 1,) * 2)
    ink = np.where(_near(kept), ink, 0).astype(np.float32)
    if radius < 0:
        return cv2.erode(ink, kernel), cv2.erode(kept.astype(np.uint8), kernel) > 0
    return cv2.dilate(ink, kernel), cv2.dilate(kept.astype(np.uint8), kernel) > 0


def _framed(ink: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 10: (cropped, framed), the ink cropped to the `kept` pieces and framed as MNIST's
    digits are. The one framing of the project: pictures and the training's outliers share it."""
    cropped = _cropped(ink, kept)
    return cropped, _fit_and_centre(cropped)


def _cropped(ink: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Step 10, first half: the box of the kept pieces and the ink within 1 px of them (their
    soft rims: without them MNIST's boxes shrink, and answers change)."""
    rows, cols = np.nonzero(_near(kept) & (ink > 0))
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _near(kept: np.ndarray) -> np.ndarray:
    """The kept pieces and the pixels within 1 px of them: their soft rims."""
    return cv2.dilate(kept.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def _fit_and_centre(cropped: np.ndarray) -> np.ndarray:
    """Step 10, second half: fitted into 20 x 20 keeping its shape, centre of mass at the
    centre of 28 x 28."""
    height, width = cropped.shape
    scale = _DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != (width, height):
        cropped = cv2.resize(cropped, size, interpolation=cv2.INTER_AREA if scale < 1
                             else cv2.INTER_LINEAR).clip(0, 1)
    mass = cropped.sum()
    y = (cropped.sum(1) * np.arange(cropped.shape[0])).sum() / mass
    x = (cropped.sum(0) * np.arange(cropped.shape[1])).sum() / mass
    top = int(min(max(round(_FRAME / 2 - y), 0), _FRAME - cropped.shape[0]))
    left = int(min(max(round(_FRAME / 2 - x), 0), _FRAME - cropped.shape[1]))
    framed = np.zeros((_FRAME, _FRAME), np.float32)
    framed[top:top + cropped.shape[0], left:left + cropped.shape[1]] = cropped
    return framed


def prepare_image(image) -> torch.Tensor:
    """A picture of one digit as `Net`'s normalized input [1, 28, 28] (see `preparation_steps`).

    The picture may be any size, grayscale or colour (PIL, NumPy [H, W] or [H, W, 3 or 4],
    tensor [H, W] or [C, H, W]; uint8 0..255 or float 0..1; transparent areas count as white
    paper), dark ink on light paper or light on dark, anywhere in the frame.
    """
    return _network_input(preparation_steps(image)["framed"])


def crop_to_all_ink(picture) -> torch.Tensor:
    """A weaker preparation, for comparison: the same ink and paper as `preparation_steps`
    (steps 1 to 4), then a crop to every pixel above the noise floor instead of to the digit's
    pieces, as this project's preparation did before version 3. Returns the network's input."""
    ink = _ink_on_flat_paper(_working_copy(_intensities(picture).numpy()))
    floor, _ = _ink_levels(ink)
    everything = ink > floor
    if not everything.any():
        raise NoDigitError("no ink found: nothing lies above the paper's noise")
    _, framed = _framed(_stretched(ink, everything, floor), everything)
    return _network_input(torch.from_numpy(framed))


def _network_input(framed: torch.Tensor) -> torch.Tensor:
    """A framed [28, 28] picture, intensities in [0, 1] with ink bright, as `Net`'s input [1, 28, 28]."""
    return normalize(framed)[None]


def naive_image(picture) -> torch.Tensor:
    """The naive way to feed a picture: inverted to light-on-dark and squashed to 28 x 28."""
    gray = 1 - _intensities(picture)
    resized = F.interpolate(gray[None, None], size=(_FRAME, _FRAME), mode="bilinear", antialias=True)
    return _network_input(resized[0, 0].clamp(0, 1))


# ----------------------------------------------------------------------------- pictures of no digit, for outlier exposure
# Outlier exposure (Hendrycks et al., 2019): a few made-up pictures that are not digits ride
# along with every training batch, and the digit reader learns to answer them with no
# preference, so that a picture of no digit gets a low top probability (see MIN_CONFIDENCE).
_OUTLIER_CANVAS = 32  # drawn a little larger than MNIST, then framed as a photo would be
_BAR_RATIO = 1 / 3  # an outlier whose strong ink fits a turned rectangle less than a third as wide
#                    as long is a lone bar: framed, it is a 1 (95 % of MNIST's 1s are), so it is left
#                    out (9 % of those drawn)
_SPARE_OUTLIERS = 0.25  # drawn beyond the count asked for, to replace the bars left out


def _canvas_grid(count: int):
    """The canvas's coordinates, y and x in [-1, 1], shaped to broadcast over `count` images."""
    y, x = torch.meshgrid(*[torch.linspace(-1, 1, _OUTLIER_CANVAS)] * 2, indexing="ij")
    return y.expand(count, -1, -1), x.expand(count, -1, -1)


def _scrambled_digits(count, generator, digits):
    """MNIST digits cut into 4 x 4 tiles, shuffled, each turned by a multiple of 90 degrees:
    the strokes of a digit, but no digit."""
    pick = torch.randint(len(digits), (count,), generator=generator)
    tiles = denormalize(_to_host(digits[pick])[0]).clamp(0, 1).unfold(2, 7, 7).unfold(3, 7, 7)
    tiles = tiles.reshape(count, 16, 7, 7)
    tiles = tiles[torch.arange(count)[:, None], torch.rand(count, 16, generator=generator).argsort(1)]
    turns = torch.randint(4, (count, 16), generator=generator)
    for turn in range(1, 4):
        tiles[turns == turn] = tiles[turns == turn].rot90(turn, (1, 2))
    image = tiles.reshape(count, 4, 4, 7, 7).permute(0, 1, 3, 2, 4).reshape(count, 1, 28, 28)
    return F.interpolate(image, size=(_OUTLIER_CANVAS,) * 2, mode="bilinear", align_corners=False)[:, 0]


def _blobs(count, generator, digits=None):
    """One to three large filled ellipses: a stain, a ball, a face."""
    y, x = _canvas_grid(count)
    field = torch.zeros(count, _OUTLIER_CANVAS, _OUTLIER_CANVAS)
    for index in range(3):  # the first always shows: no blank canvas
        centre_y, centre_x, radius_y, radius_x, shown = torch.rand(5, count, 1, 1, generator=generator)
        shown = shown * (index > 0)
        inside = ((y - 1.2 * centre_y + 0.6) / (0.25 + 0.6 * radius_y)) ** 2 \
            + ((x - 1.2 * centre_x + 0.6) / (0.25 + 0.6 * radius_x)) ** 2 < 1
        field = torch.maximum(field, (inside & (shown < 0.6)).float())
    return field * (0.6 + 0.4 * torch.rand(count, 1, 1, generator=generator))


def _textures(count, generator, digits=None):
    """Smooth noise above a level (a share of its highest, so never blank): patches of many
    shapes (leaves, gravel, fabric)."""
    field = torch.empty(count, _OUTLIER_CANVAS, _OUTLIER_CANVAS)
    cells = torch.randint(4, 15, (count,), generator=generator)
    for cell in cells.unique().tolist():
        chosen = (cells == cell).nonzero().flatten()
        coarse = torch.rand(len(chosen), 1, cell, cell, generator=generator)
        field[chosen] = F.interpolate(coarse, size=(_OUTLIER_CANVAS,) * 2, mode="bicubic",
                                      align_corners=False)[:, 0]
    level = (0.4 + 0.3 * torch.rand(count, 1, 1, generator=generator)) * field.amax((1, 2), keepdim=True)
    return (field - level).clamp(min=0) / (1 - level)


def _edges(count, generator, digits=None):
    """A soft or sharp step in brightness along a random line: a table's edge, a shadow."""
    y, x = _canvas_grid(count)
    angle, offset, softness = torch.rand(3, count, 1, 1, generator=generator)
    angle = 2 * math.pi * angle
    distance = torch.cos(angle) * x + torch.sin(angle) * y - (1.2 * offset - 0.6)
    return torch.sigmoid(distance / (0.01 + 0.3 * softness))


def _stripes(count, generator, digits=None):
    """Parallel or crossed bars at a random angle and spacing: ruled paper, blinds, a grid."""
    y, x = _canvas_grid(count)
    angle, spacing, width, phase, crossed = torch.rand(5, count, 1, 1, generator=generator)
    angle, spacing, width = math.pi * angle, 0.15 + 0.4 * spacing, 0.15 + 0.35 * width
    along = (torch.cos(angle) * x + torch.sin(angle) * y) / spacing + phase
    across = (-torch.sin(angle) * x + torch.cos(angle) * y) / spacing + phase
    bars = (along - along.floor() < width).float()
    return torch.maximum(bars, (crossed < 0.4) * (across - across.floor() < width).float())


def _scribbles(count, generator, digits=None):
    """Eight to fifteen random straight strokes across the canvas: hatching, clutter."""
    y, x = _canvas_grid(count)
    field = torch.zeros(count, _OUTLIER_CANVAS, _OUTLIER_CANVAS)
    strokes = torch.randint(8, 16, (count, 1, 1), generator=generator)
    width = 0.04 + 0.08 * torch.rand(count, 1, 1, generator=generator)
    for stroke in range(15):
        start, end = 2 * torch.rand(2, count, 2, 1, 1, generator=generator) - 1
        along = end - start
        t = (((x - start[:, 0]) * along[:, 0] + (y - start[:, 1]) * along[:, 1])
             / (along ** 2).sum(1).clamp(min=1e-6)).clamp(0, 1)
        distance = torch.hypot(x - start[:, 0] - t * along[:, 0], y - start[:, 1] - t * along[:, 1])
        field = torch.maximum(field, (1 - distance / width).clamp(0, 1) * (stroke < strokes))
    return field


_OUTLIER_KINDS = (_scrambled_digits, _blobs, _textures, _edges, _stripes, _scribbles)


def _frame_outliers(ink: torch.Tensor) -> torch.Tensor:
    """Drawn outliers [B, H, W] (ink bright on black paper) softened (a 3 x 3 mean, as a photo's
    edges are), then made ready one by one by the preparation's own steps: the strokes above
    _INK_SHARE of the strongest ink, stretched from the noise floor (step 8), thin ones
    thickened (9), cropped and framed (10). The refusals and the choice of the digit's pieces
    are skipped: an outlier is all kept. Its strokes are evened at the canvas's own scale: measured
    enlarged, as pictures are, the outliers changed training, and two seeds then read the real
    pictures no better (97.8 % right, against 98.35 %). -> [B, 28, 28]."""
    ink = F.avg_pool2d(ink[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    framed, ink = [], ink.clamp(0, 1).numpy()
    for drawn, floor in zip(ink, _noise_floor(ink.reshape(len(ink), -1))[1].tolist()):
        kept = drawn > max(floor, _INK_SHARE * _strongest(drawn))
        kept = kept if kept.any() else drawn >= drawn.max()
        stretched = _stretched(drawn, kept, min(floor, float(drawn.max()) / 2))
        framed.append(_framed(*_even_strokes(stretched, kept, enlarge=False))[1])
    return torch.from_numpy(np.stack(framed))


def outlier_batch(count: int, generator: torch.Generator, digits: torch.Tensor) -> torch.Tensor:
    """`count` made-up pictures that are not digits, as normalized network inputs [count, 1, 28, 28].

    Each is one of _OUTLIER_KINDS (scrambled `digits`, blobs, textures, edges, stripes or
    scribbles), drawn as batched tensor ops, given a little noise or blur as a photo would,
    then framed by the preparation's own steps; lone bars (`_lone_bar`) are left out.
    `digits`: normalized MNIST images [N, 1, 28, 28] to scramble. They are drawn and framed on
    the CPU (the framing is OpenCV's, the one the preparation uses) and handed over on
    `digits`' device in one copy; `train` asks for a whole epoch's at once. All draws come
    from `generator`, so a seed repeats them on any device.
    """
    wanted, count = count, count + math.ceil(_SPARE_OUTLIERS * count)
    kind = torch.randint(len(_OUTLIER_KINDS), (count,), generator=generator)
    ink = torch.zeros(count, _OUTLIER_CANVAS, _OUTLIER_CANVAS)
    for index, draw in enumerate(_OUTLIER_KINDS):
        chosen = (kind == index).nonzero().flatten()
        if len(chosen):
            ink[chosen] = draw(len(chosen), generator, digits)
    noise, noisy, blurry = torch.rand(count, _OUTLIER_CANVAS, _OUTLIER_CANVAS, generator=generator), \
        *torch.rand(2, count, 1, 1, generator=generator)
    ink = ink + 0.05 * noise * (noisy < 0.5)
    blurred = F.avg_pool2d(ink[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    ink = torch.where(blurry < 0.3, blurred, ink)
    framed = _frame_outliers(ink)
    bar = torch.tensor([_lone_bar(picture) for picture in framed.numpy()])
    order = torch.cat([(~bar).nonzero().flatten(), bar.nonzero().flatten()])  # bars only if short
    return normalize(framed[order[:wanted]])[:, None].to(digits.device)


def _lone_bar(framed: np.ndarray) -> bool:
    """Whether a framed outlier's strong ink is a lone bar (see _BAR_RATIO): it would read as a 1."""
    points = np.argwhere(framed > _INK_SHARE).astype(np.float32)
    if len(points) < 3:
        return False
    _, sides, _ = cv2.minAreaRect(points)
    return min(sides) < _BAR_RATIO * max(sides)


# ----------------------------------------------------------------------------- pictures to test on


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
    pictures = []
    for index in range(count):
        side = int(rng.integers(64, 201))
        font = ImageFont.truetype(str(folder / _FONT_FILES[rng.integers(len(_FONT_FILES))]),
                                  int(side * rng.uniform(0.4, 0.75)))
        glyph = Image.new("L", (2 * side, 2 * side), 0)
        ImageDraw.Draw(glyph).text((side, side), str(index % NUM_DIGITS), fill=255, font=font,
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
        pictures.append(Image.fromarray((255 * page.clip(0, 1)).round().astype(np.uint8)))
    return pictures, torch.arange(count) % NUM_DIGITS




def _mnist_test_digits(count: int, seed: int, root=None):
    """`count` MNIST *test* images (uint8 [28, 28]) and labels, drawn without repeats: their
    writers are not among the training set's."""
    mnist = load_mnist(False, root=root, transform=None)
    order = np.random.default_rng(seed).permutation(len(mnist.data))[:count]
    return mnist.data[order].numpy(), mnist.targets[order]


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
    import io

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


def photo_digits(count: int = 500, seed: int = 0, root=None) -> tuple[list, torch.Tensor, list]:
    """Phone photos of handwritten digits: (PIL RGB pictures, labels, paper kinds).

    The handwriting is MNIST's *test* set (writers the network never trained on), drawn as
    pen strokes, thin to thick. Each picture is 400 to 1200 px (square to 16:9, either way up)
    of plain, ruled or squared paper with one digit in blue, black or pencil-grey ink, from
    80 px tall up to 70 % of the shorter side, anywhere. The light falls off across the page;
    sometimes there is a stray mark, a red margin line, or the dark table beyond the sheet's
    edge; the whole is turned by up to 5 degrees, blurred, noisy and saved as JPEG at quality
    50 to 90.
    """
    digits, labels = _mnist_test_digits(count, seed, root)
    rng = np.random.default_rng(seed)
    pictures, papers = zip(*(_photo_of(digit, rng) for digit in digits)) if count else ((), ())
    return list(pictures), labels, list(papers)


def clean_digits(count: int = 500, seed: int = 0, root=None) -> tuple[list, torch.Tensor]:
    """Handwritten digits drawn dark on flat light paper: (PIL grayscale pictures, labels).

    MNIST *test* digits as pen strokes (thin to thick), 30 to 70 % of the shorter side tall,
    off-centre on a 150 to 400 px picture, with mild pixel noise.
    """
    from PIL import Image
    digits, labels = _mnist_test_digits(count, seed, root)
    rng = np.random.default_rng(seed)
    pictures = []
    for digit in digits:
        height, width = rng.integers(150, 401, size=2)
        stroke = _pen_stroke(digit, round(rng.uniform(0.3, 0.7) * min(height, width)), rng)
        stroke = stroke[:height - 4, :width - 4]  # a very wide digit on a narrow picture
        top = int(rng.integers(2, height - stroke.shape[0] - 1))
        left = int(rng.integers(2, width - stroke.shape[1] - 1))
        paper, ink = rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.3)
        page = np.full((height, width), paper, np.float32)
        page[top:top + stroke.shape[0], left:left + stroke.shape[1]] -= (paper - ink) * stroke
        page += rng.normal(0, rng.uniform(0.003, 0.02), page.shape)
        pictures.append(Image.fromarray((255 * page.clip(0, 1)).round().astype(np.uint8)))
    return pictures, labels


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
    pictures = []
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
        pictures.append(crop)
    return pictures


# ----------------------------------------------------------------------------- plots

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
    import inspect
    return _Source("\n\n".join(inspect.getsource(obj).rstrip() for obj in objects))



def layer_shapes(model: Net, images: torch.Tensor, numbers: torch.Tensor) -> list[tuple]:
    """(layer, output shape, parameters) for each layer of the digit reader and for the sum
    head, from a real forward pass; the parameters add up to the model's."""
    layers = [*model.digit_reader.named_children(), ("sum_head", model.sum_head)]
    rows, hooks = [], []
    for name, module in layers:
        if isinstance(module, nn.Identity):
            continue
        params = sum(p.numel() for p in module.parameters())
        hooks.append(module.register_forward_hook(
            lambda m, inputs, output, name=name, params=params:
            rows.append((name, tuple(output.shape), params))))
    try:
        with torch.no_grad():
            model.eval()(images, numbers)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def _grid(count, columns, size=1.5, title_lines=1):
    import matplotlib.pyplot as plt
    rows = math.ceil(count / columns)
    height = size * (1 + 0.2 * title_lines) * rows + 0.4 * title_lines
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, height), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return figure, axes.flat


def _finish(figure):
    import matplotlib.pyplot as plt
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    plt.show()


def _show(axis, image, title, color="black"):
    image = image.squeeze().cpu()
    image = image / 255 if image.dtype == torch.uint8 else denormalize(image)
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


def show_pictures(pictures, titles, columns=6, size=2.0):
    """Any pictures (PIL, or arrays and tensors in [0, 1]) with a title each."""
    figure, axes = _grid(len(pictures), columns, size=size)
    for axis, picture, title in zip(axes, pictures, titles):
        shown = np.asarray(picture.convert("RGB")) if hasattr(picture, "convert") else np.asarray(picture)
        axis.imshow(shown, cmap="gray", vmin=0, vmax=1 if shown.dtype.kind == "f" else 255)
        axis.set_title(title, fontsize=10)
    _finish(figure)


def plot_confidence(groups: dict[str, torch.Tensor]):
    """How sure the network is: for each group of pictures, the share of them at each top digit
    probability (NaN: refused by the preparation, counted in the legend), and MIN_CONFIDENCE,
    on a logarithmic axis so that a few pictures show beside thousands."""
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(10, 5))
    bins = np.linspace(0, 1, 21)
    for index, (name, top) in enumerate(groups.items()):
        style = ("-", "--", "-.", ":")[index % 4]
        read = top[~top.isnan()].numpy()
        flagged = float(((top < MIN_CONFIDENCE) | top.isnan()).float().mean())
        share = np.histogram(read, bins)[0] / max(len(top), 1) * 100
        axis.stairs(np.maximum(share, 1e-3), bins, linestyle=style, linewidth=3.5 if index == 0 else 2,
                    label=f"{name}: {len(top):,}, {1 - len(read) / max(len(top), 1):.0%} refused, "
                          f"{flagged:.1%} refused or below the line")
    axis.axvline(MIN_CONFIDENCE, color="black", linewidth=1)
    axis.annotate(f"MIN_CONFIDENCE = {MIN_CONFIDENCE}:\nbelow it, 'not sure'", (MIN_CONFIDENCE, 0.45),
                  xycoords=("data", "axes fraction"), xytext=(-6, 0), textcoords="offset points",
                  ha="right", va="center", fontsize=9)
    axis.set(xlabel="the network's top digit probability", ylabel="pictures in the group (%, log scale)",
             title="How sure is it?", xlim=(0, 1), yscale="log", ylim=(0.05, 150))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    _finish(figure)


def show_predictions(images, answers: list[Answer], truths, columns=8):
    """Each picture under its `Answer` (the short title, "not sure" included) and the true
    digit; a picture not read right and sure in red."""
    figure, axes = _grid(len(images), columns, size=1.6, title_lines=2)
    for axis, image, answer, truth in zip(axes, images, answers, truths):
        right = answer.sure and (answer.digit, answer.total) == (int(truth), int(truth) + answer.number)
        _show(axis, torch.as_tensor(np.asarray(image)), f"{answer.title}\n(it shows a {int(truth)})",
              color="black" if right else "firebrick")
    _finish(figure)


def plot_frequencies(numbers: torch.Tensor, sums: torch.Tensor, title=""):
    """How often each number and each sum occurs."""
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2), width_ratios=[10, 19])
    for axis, values, classes, name in ((left, numbers, NUM_DIGITS, "random number"),
                                        (right, sums, NUM_SUMS, "sum")):
        axis.bar(range(classes), torch.bincount(values.cpu(), minlength=classes))
        axis.set_xticks(range(classes))
        axis.set(xlabel=name, ylabel="count", title=f"{name} ({title})" if title else name)
    _finish(figure)


def plot_history(history: list[dict], smoothing: int = 25):
    """Left: the digit's and the sum's cross-entropy at every training step (faint), their
    running mean over `smoothing` steps, and the test split's at the end of each epoch (dots).
    Right: test accuracy per epoch."""
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8), width_ratios=[3, 2])
    steps = torch.tensor([pair for record in history for pair in record["step_losses"]])  # [S, 2]
    per_epoch = len(history[0]["step_losses"])
    ends = [per_epoch * record["epoch"] for record in history]
    window = torch.ones(1, 1, smoothing) / smoothing
    for column, (name, colour) in enumerate((("digit", "tab:blue"), ("sum", "tab:orange"))):
        left.plot(range(1, len(steps) + 1), steps[:, column], color=colour, alpha=0.25, linewidth=0.8)
        mean = F.conv1d(steps[None, None, :, column], window)[0, 0]
        left.plot(range(smoothing, len(steps) + 1), mean, color=colour, label=f"{name}, training batches")
        left.plot(ends, [record[f"{name}_loss"] for record in history], "o", color=colour,
                  markeredgecolor="black", label=f"{name}, test split")
    left.set(xlabel="training step (batches of the epoch, one after another)", ylabel="cross-entropy",
             yscale="log", title="Loss per step")
    for end in ends[:-1]:
        left.axvline(end, color="gray", linewidth=0.8, linestyle=":")
    epochs = [record["epoch"] for record in history]
    for key, label, marker in (("digit_acc", "digit", "o-"), ("sum_acc", "sum", "s--"),
                               ("both_acc", "both correct", "^:")):
        right.plot(epochs, [100 * r[key] for r in history], marker, label=label)
    right.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy, end of each epoch")
    right.set_xticks(epochs)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=9)
    _finish(figure)


def plot_confusions(result: Evaluation):
    """Digit and sum confusion matrices, each cell numbered with its count of test pairs, on one
    logarithmic colour scale so that single mistakes show; empty cells are left white."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    figure, axes = plt.subplots(1, 2, figsize=(14, 8), layout="constrained", width_ratios=[10, 19])
    matrices = {"digit": result.digit_confusion, "sum": result.sum_confusion}
    scale = LogNorm(vmin=1, vmax=max(int(m.max()) for m in matrices.values()))
    for axis, (name, matrix) in zip(axes, matrices.items()):
        shown = matrix.float().clone()
        shown[shown == 0] = float("nan")
        image = axis.imshow(shown, cmap="viridis", norm=scale)
        small = len(matrix) > NUM_DIGITS
        for (true, said), count in np.ndenumerate(matrix.numpy()):
            if count:
                axis.text(said, true, str(count), ha="center", va="center", fontsize=7 if small else 9,
                          color="black" if count > 30 else "white")
        axis.set_xticks(range(len(matrix)))
        axis.set_yticks(range(len(matrix)))
        axis.tick_params(labelsize=8 if small else 10)
        axis.set(xlabel=f"predicted {name}", ylabel=f"true {name}",
                 title=f"{name.capitalize()}: {int(matrix.sum() - matrix.trace())} errors")
    figure.colorbar(image, ax=list(axes), shrink=0.6, label="test pairs (log scale)")
    _finish(figure)


def show_mistakes(split: Split, result: Evaluation, count=16, columns=8):
    """Test pairs where either head is wrong: the truth, then the model's answer, coloured by
    what is wrong (the title counts each kind). Heads that disagree read "said 6, sum 10",
    never as false arithmetic."""
    digit_wrong, sum_wrong = result.digit_pred != split.labels.cpu(), result.sum_pred != split.sums.cpu()
    kinds = {"red": ("digit and sum wrong", digit_wrong & sum_wrong),
             "orange": ("digit wrong, sum right", digit_wrong & ~sum_wrong),
             "purple": ("digit right, sum wrong", ~digit_wrong & sum_wrong)}
    index = (digit_wrong | sum_wrong).nonzero().flatten()[:count]
    figure, axes = _grid(len(index), columns, size=1.7, title_lines=2)
    for axis, i in zip(axes, index.tolist()):
        number = int(split.numbers[i])
        colour = next(colour for colour, (_, wrong) in kinds.items() if wrong[i])
        digit, total = int(result.digit_pred[i]), int(result.sum_pred[i])
        said = f"said {digit}+{number}={total}" if digit + number == total else f"said {digit}, sum {total}"
        _show(axis, split.images[i], f"true {int(split.labels[i])}+{number}={int(split.sums[i])}\n{said}",
              color=f"tab:{colour}")
    figure.suptitle(f"The first {len(index)} of {int((digit_wrong | sum_wrong).sum())} test pairs answered wrong. "
                    + "; ".join(f"{colour}: {kind}, {int(wrong.sum())}" for colour, (kind, wrong) in kinds.items()))
    _finish(figure)


def plot_pair_errors(per_pair_grids: dict, held_out=HOLDOUT_PAIRS):
    """The share of sums answered wrong for every (digit, number) cell, one panel per head, on a
    logarithmic scale, so that 0.3 % and 3 % look different; white: no mistake. The held-out
    pairs are outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
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
        axis.set_xticks(range(NUM_DIGITS))
        axis.set_yticks(range(NUM_DIGITS))
        axis.set(xlabel="random number", ylabel="digit in the image", title=title)
    figure.colorbar(image, ax=list(axes.flat), shrink=0.8, label="sums answered wrong (%, log scale)")
    figure.suptitle("Sum errors per (digit, number) pair; outlined: the pairs held out of training")
    _finish(figure)


def plot_number_line(head: SumHead, title="What the sum head learned", example=(3, 4)):
    """The positions of a line head (the adder, the number line): each digit's x_d, number's
    y_n and sum's z_s, on three rows of one line. For the `example` pair (d, n), a star marks
    where x_d + y_n lands on the sums' row, with the sum nearest to it."""
    import matplotlib.pyplot as plt
    if not isinstance(head, LineHead):
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


def plot_sum_answer(sum_probs: torch.Tensor, title: str):
    """A sum head's answer [19] as bars, each labelled with its probability where it shows."""
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(10, 2.8))
    bars = axis.bar(range(NUM_SUMS), sum_probs.detach().cpu())
    axis.bar_label(bars, [f"{p:.2f}" if p >= 0.005 else "" for p in sum_probs.tolist()], fontsize=9)
    axis.set_xticks(range(NUM_SUMS))
    axis.set(xlabel="sum", ylabel="probability", ylim=(0, 1.1), title=title)
    _finish(figure)


def plot_holdout_sweep(sweep: dict[str, dict[int, dict]], evidence: dict[int, dict]):
    """Against how many of the 100 pairs were held out of training: each head's sum accuracy
    (`held_out_accuracy`) on the held-out pairs and on the seen ones; how many independent
    equations the seen pairs give a line (`line_evidence`); how many sums no seen pair has."""
    import matplotlib.pyplot as plt
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


def show_preparation(model: Net, picture, number: int) -> Answer:
    """`preparation_steps` on one picture, in equal panels, and the model's `Answer`, which it
    returns."""
    steps = preparation_steps(picture)
    digit_lp, sum_lp = _log_probs(model, [_network_input(steps["framed"])], [_as_number(number)])
    answer = Answer(digit_lp[0].exp(), sum_lp[0].exp(), number)
    titles = {"picture": f"picture, {steps['picture'].shape[1]} x {steps['picture'].shape[0]} px",
              "ink": "ink found (inverted)", "kept": "kept: read as the digit",
              "cropped": "cropped to their box",
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


# ----------------------------------------------------------------------------- benchmark


def _reference_loader(mnist: Dataset, batch_size: int = _REFERENCE_BATCH_SIZE, seed: int = 0,
                     workers: int = 0):
    """The reference pipeline: the per-sample Dataset behind a shuffling DataLoader."""
    return DataLoader(DigitPlusNumber(mnist, seed), batch_size=batch_size, shuffle=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(seed))


def _reference_batches(mnist: Dataset, device, seed: int = 0):
    """Endless (images, labels, numbers) batches from the reference pipeline, on `device`."""
    loader = _reference_loader(mnist, seed=seed, workers=2 if device.type == "cuda" else 0)
    while True:
        for images, labels, one_hot, _ in loader:
            yield Batch(images.to(device), labels.to(device), one_hot.argmax(1).to(device))


def _in_memory_batches(split: Split, recipe: Recipe):
    """Endless batches, exactly as `train` takes them."""
    data = _TrainingData(split, recipe)
    while True:
        yield from data.epoch()


def _images_per_second(model: Net, optimizer, batches, steps: int, precision: str,
                      outlier_weight: float = 0.0):
    """Training throughput over `steps` steps after 3 warm-up steps: (images/s, warm-up seconds).
    Outliers ride along but are not counted as images."""
    device = next(model.parameters()).device
    scaler = _gradient_scaler(precision, device)
    timings = []
    for count in (3, steps):  # warm-up first: allocations, kernel selection
        _synchronize(device)
        started, images = time.perf_counter(), 0
        for _ in range(count):
            batch = next(batches)
            train_step(model, optimizer, batch, precision, outlier_weight, scaler)
            images += len(batch.labels)
        _synchronize(device)
        timings.append((images, time.perf_counter() - started))
    (_, warm_up), (images, seconds) = timings
    return images / seconds, warm_up


def _seeded_net(device, seed: int = 0, **config) -> Net:
    """A Net built from `seed` (the caller's random state is kept), on `device`."""
    with _seeded(seed):
        model = Net(**config)
    return model.to(device, memory_format=_memory_format(device))


def _seconds_to_99(history: list[dict]) -> float | None:
    """Training seconds until both heads first reach 99 % on the test split, or None."""
    elapsed = 0.0
    for record in history:
        elapsed += record["train_seconds"]
        if min(record["digit_acc"], record["sum_acc"]) >= 0.99:
            return elapsed
    return None


_PIPELINE_ROUNDS = 3  # each feed is timed this many times, in turns; the median is reported


def _pipeline_rates(mnist: Dataset, train_split: Split, recipe: Recipe, steps: int, log) -> dict:
    """Images/s of our Net and Adam fed several ways, each from the same seeded start: the
    reference's per-sample Dataset and DataLoader (batch 32, fp32); our in-memory batches,
    plain, in fp32 and in half precision (bf16 on the CPU, the recipe's on a GPU); and the
    whole `recipe` (augmentation and
    outliers, whose drawing is timed too) at its precision. Each rate is the median of
    _PIPELINE_ROUNDS runs taken in turns. Also `warm_up_seconds`: the very first 3 steps (one-time
    set-up)."""
    device = train_split.images.device
    ours = max(1, steps * _REFERENCE_BATCH_SIZE // recipe.batch_size)
    # Epochs of `ours` steps, so that the timed steps include one epoch's drawing of outliers.
    subset, plain = train_split.first(ours * recipe.batch_size), replace(recipe, augment=0.0, outliers=0)
    feeds = [("reference pipeline", "fp32", _reference_batches(mnist, device, recipe.seed), steps, 0.0)]
    for feed_precision in dict.fromkeys(("fp32", "bf16" if device.type == "cpu" else recipe.precision)):
        feeds.append((f"ours {feed_precision}", feed_precision, _in_memory_batches(subset, plain), ours, 0.0))
    feeds.append((f"ours {recipe.precision}, whole recipe", recipe.precision,
                  _in_memory_batches(subset, recipe), ours, recipe.outlier_weight))
    runs = [(name, feed_precision, _seeded_net(device, recipe.seed), batches, count, outlier_weight)
            for name, feed_precision, batches, count, outlier_weight in feeds]
    optimizers = [torch.optim.Adam(model.parameters(), lr=recipe.lr) for _, _, model, *_ in runs]
    rates, warm_ups = {name: [] for name, *_ in runs}, []
    for _ in range(_PIPELINE_ROUNDS):  # taken in turns: this machine's speed drifts over minutes
        for (name, feed_precision, model, batches, count, weight), optimizer in zip(runs, optimizers):
            rate, warm = _images_per_second(model, optimizer, batches, count, feed_precision, weight)
            rates[name].append(rate)
            warm_ups.append(warm)
    rates = {name: float(np.median(values)) for name, values in rates.items()}
    for name, rate in rates.items():
        log(f"{name:30} {rate:6.0f} images/s ({rate / rates['reference pipeline']:.2f}x the reference "
            f"pipeline)")
    for half in ("bf16", "fp16"):
        if f"ours {half}" in rates:
            log(f"{half} / fp32: {rates[f'ours {half}'] / rates['ours fp32']:.2f}x"
                + ("" if half == "fp16" or _has_native_bf16(device) else " (this device emulates bf16)"))
    log(f"one-time warm-up (first 3 steps): {warm_ups[0]:.2f} s")
    return {"images_per_s": rates, "warm_up_seconds": warm_ups[0]}


def _reference_recipe_seconds(mnist: Dataset, device, seed: int, steps: int, log) -> dict:
    """The reference recipe's images/s (no BatchNorm, the logits head, SGD, batch 32, fp32) and
    so its time to 99 %, taken as _REFERENCE_EPOCHS_TO_99 epochs."""
    model = _seeded_net(device, seed, batch_norm=False, sum_head="logits")
    rate, _ = _images_per_second(model, torch.optim.SGD(model.parameters(), **_REFERENCE_SGD),
                                _reference_batches(mnist, device, seed), steps, "fp32")
    seconds = _REFERENCE_EPOCHS_TO_99 * len(mnist) / rate
    log(f"reference recipe (no BatchNorm, SGD, batch 32, fp32): {rate:.0f} images/s, so "
        f"{_REFERENCE_EPOCHS_TO_99} epochs to 99 % take about {seconds:.0f} s")
    return {"reference_recipe_images_per_s": rate, "reference_recipe_seconds_to_99": seconds}


def _recipe_time_to_99(train_split: Split, test_split: Split, recipe: Recipe, reference_seconds,
                      log) -> dict:
    """Trains our default model by `recipe` and reports its time to >= 99 % on both heads."""
    model = _seeded_net(train_split.images.device, recipe.seed)
    history = train(model, train_split, test_split, recipe, log=None, progress=False)
    final, reached = history[-1], _seconds_to_99(history)
    log(f"our recipe on {len(train_split):,} images ({recipe.epochs} epoch(s), {final['precision']}): "
        f"{sum(r['train_seconds'] for r in history):.1f} s of training; "
        f"digit {100 * final['digit_acc']:.2f} %, sum {100 * final['sum_acc']:.2f} %")
    log("  time to >= 99 % on both heads: "
        + (f"{reached:.1f} s, {reference_seconds / reached:.1f}x faster than the reference recipe"
           if reached else "not reached"))
    return {"images": len(train_split), "_seconds_to_99": reached, "history": history}


def benchmark(device, root=None, recipe: Recipe = Recipe(epochs=1), *, steps: int = 200,
              short_images: int | None = None, train_limit: int | None = None,
              test_limit: int | None = None, log=print) -> dict:
    """Training speed on one device, measured side by side in one run.

    1. `_pipeline_rates`: how fast the same Net trains when fed the reference's way and ours.
    2. `_reference_recipe_seconds`: the reference recipe's speed, and so its time to 99 %.
    3. `_recipe_time_to_99`: our `recipe` (at its precision), on the whole training split and on
       its first `short_images` images (None: skip).
    `train_limit` and `test_limit` keep the first images of each split, for a quick check.
    """
    log = log or _quiet
    recipe = replace(recipe, precision=choose_precision(recipe.precision, device))
    mnist = load_mnist(True, root=root)
    train_split = load_split(True, root=root, device=device, limit=train_limit)
    test_split = load_split(False, root=root, device=device, limit=test_limit)
    log(f"machine: {describe_machine(device)}")
    result = {"device": describe_machine(device), "precision": recipe.precision,
              **_pipeline_rates(mnist, train_split, recipe, steps, log),
              **_reference_recipe_seconds(mnist, device, recipe.seed, steps, log)}
    sizes = [len(train_split)] + ([short_images] if short_images and short_images < len(train_split) else [])
    result["runs"] = {size: _recipe_time_to_99(train_split.first(size), test_split, recipe,
                                              result["reference_recipe_seconds_to_99"], log)
                      for size in sizes}
    return result


# ----------------------------------------------------------------------------- command line


def _quiet(*_):
    """A `log` that prints nothing."""


def _to_stderr(line: str):
    print(line, file=sys.stderr)


def _positive(kind, zero_allowed: bool = False):
    """An argparse type: a number of `kind` (int or float) above zero (or at least zero), or
    one clear error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value >= 0 if zero_allowed else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'at least 0' if zero_allowed else 'above 0'}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _add_common(command, precision: bool = True):
    command.add_argument("--data", default=None, help=f"MNIST folder (default: ${_DATA_DIR_ENV} or ./data)")
    command.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    if precision:
        command.add_argument("--precision", default="auto", choices=_PRECISIONS,
                             help="of training: auto is bf16 where the CPU or GPU has it natively, "
                                  "fp16 on other CUDA GPUs, else fp32 (scores are always fp32)")
    return command


def _add_train(commands):
    recipe = _add_common(commands.add_parser(
        "train", help="train and save a model",
        description="Train a model, saving it to --out after every epoch. Ctrl-C stops training "
                    "at once and keeps the model of the last finished epoch; before the first "
                    "epoch ends nothing is saved."))
    recipe.add_argument("--epochs", type=_positive(int), default=Recipe.epochs)
    recipe.add_argument("--batch-size", type=_positive(int), default=Recipe.batch_size)
    recipe.add_argument("--lr", type=_positive(float), default=Recipe.lr)
    recipe.add_argument("--seed", type=int, default=Recipe.seed)
    recipe.add_argument("--limit", type=_positive(int), default=None, help="train on the first N images")
    recipe.add_argument("--no-augment", action="store_true",
                        help="train on the images as they are, without distortions")
    recipe.add_argument("--outliers", type=_positive(int, zero_allowed=True), default=Recipe.outliers,
                        help="pictures of no digit with each batch, so that the model learns to be "
                             "unsure of them (0: none; with --no-augment, the plain recipe)")
    recipe.add_argument("--no-batch-norm", action="store_true", help="the reference-faithful model")
    recipe.add_argument("--sum-head", choices=list(SUM_HEADS), default="adder")
    recipe.add_argument("--holdout", action="store_true",
                        help=f"never train on the pairs {HOLDOUT_PAIRS}, then score them apart")
    recipe.add_argument("--out", default="model.pt", help="checkpoint file (checked before training)")
    recipe.add_argument("--json", action="store_true",
                        help="one JSON object per epoch as it ends (then one for --holdout's scores)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    check = _add_common(commands.add_parser("evaluate", help="score a saved model (in fp32)"), precision=False)
    check.add_argument("--model", required=True)
    check.add_argument("--json", action="store_true")
    ask = commands.add_parser(
        "predict", help="digit and sum for one image file, and how sure",
        description=f"Reads the digit in one picture and adds the number. Below "
                    f"{MIN_CONFIDENCE:.0%} confidence it answers 'not sure' and names the two "
                    f"likeliest digits.")
    ask.add_argument("--model", required=True)
    ask.add_argument("image", help="a picture of one digit: any size, dark on light or light on dark")
    ask.add_argument("number", type=int, help="0..9")
    score = commands.add_parser(
        "score", help="read a folder of labelled pictures and count right, flagged and wrong",
        description="Reads every picture under FOLDER, one at a time, each with a random number "
                    "(seeded). A picture's label is its folder's name when that is a digit (FOLDER/3/"
                    "x.png), else the first character of its name (3_x.png). Prints a row per "
                    "sub-folder when there are several, then the worst mistakes.")
    score.add_argument("--model", required=True)
    score.add_argument("folder")
    score.add_argument("--seed", type=int, default=0, help="of the numbers added to the digits")
    score.add_argument("--worst", type=_positive(int, zero_allowed=True), default=10,
                       help="how many mistakes to list, worst first")
    score.add_argument("--json", action="store_true", help="the counts as one JSON object")
    bench = _add_common(commands.add_parser("benchmark", help="reference pipeline vs ours"))
    bench.add_argument("--steps", type=_positive(int), default=200, help="batch-32 steps to time")
    bench.add_argument("--epochs", type=_positive(int), default=1)
    bench.add_argument("--batch-size", type=_positive(int), default=Recipe.batch_size)
    bench.add_argument("--short-images", type=_positive(int), default=None,
                       help="also time the recipe on only the first N training images")
    bench.add_argument("--limit", type=_positive(int), default=None, help="use the first N training images")
    bench.add_argument("--json", action="store_true")
    return parser


def main(argv=None):
    args = _build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # a mistake in the input, or the machine's limits;
        print(f"error: {error}", file=sys.stderr)  # anything else is a bug and keeps its traceback
        return 2


def _check_writable(path) -> Path:
    """Makes the folder of `path` if needed and proves a file can be written there, or raises
    ValueError now, before minutes of training."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; name a file, for example '{path / 'model.pt'}'")
    folder = next((parent for parent in path.parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"cannot write '{path}': '{folder}' is a file, not a folder; "
                         f"choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as error:
        where = f" ('{error.filename}')" if error.filename else ""
        raise ValueError(f"cannot write '{path}': {error.strerror or error}{where}; "
                         f"choose another --out") from None
    return path


def _save_or_fall_back(model: Net, path: Path, log=print, **metadata) -> Path:
    """Saves to `path`; if that fails, to a fresh file in the current or temporary folder."""
    try:
        save_checkpoint(model, path, **metadata)
        return path
    except OSError as error:
        log(f"error: could not save '{path}' ({error})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        fallback = folder / f"model-rescued-{stamp}.pt"
        try:
            save_checkpoint(model, fallback, **metadata)
            return fallback
        except OSError:
            continue
    raise OSError("could not save the model anywhere: check disk space and permissions")


class _EpochSaver:
    """Saves the model after every finished epoch, so Ctrl-C or a crash keeps the last one.

    It saves to `path`; if that ever fails, to a rescue file (`_save_or_fall_back`), and from
    then on there.
    """

    def __init__(self, model: Net, path: Path, **metadata):
        self.model, self.path, self.metadata, self.epochs_saved = model, path, metadata, 0

    def save(self, history: list[dict]):
        self.path = _save_or_fall_back(self.model, self.path, log=_to_stderr, history=history,
                                      **self.metadata)
        self.epochs_saved = len(history)


@contextmanager
def _ctrl_c_sets_flag():
    """Inside, Ctrl-C only sets a flag, which the yielded function reads: an interrupt can never
    land inside a half-copied tensor or a half-built progress bar."""
    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _train_command(args):
    out = _check_writable(args.out)
    device = choose_device(args.device)
    recipe = Recipe(args.epochs, args.batch_size, args.lr, args.seed,
                    augment=0.0 if args.no_augment else Recipe.augment, outliers=args.outliers,
                    holdout=HOLDOUT_PAIRS if args.holdout else None,
                    precision=choose_precision(args.precision, device))
    train_split = load_split(True, root=args.data, device=device, limit=args.limit)
    test_split = load_split(False, root=args.data, device=device)
    torch.manual_seed(recipe.seed)
    model = Net(batch_norm=not args.no_batch_norm, sum_head=args.sum_head)
    say = _quiet if args.json else print
    saver = _EpochSaver(model, out, seed=recipe.seed, epochs=recipe.epochs, holdout=recipe.holdout)

    def finished(history):  # saved first, then reported: an epoch printed is an epoch kept
        saver.save(history)
        if args.json:
            print(json.dumps({k: v for k, v in history[-1].items() if k != "step_losses"}), flush=True)

    with _ctrl_c_sets_flag() as stop_requested:
        try:
            history = train(model, train_split, test_split, recipe, progress=not args.json,
                            log=say, on_epoch=finished, stop_requested=stop_requested)
        except KeyboardInterrupt:
            _to_stderr(f"interrupted: saved the model of epoch {saver.epochs_saved}/{recipe.epochs} "
                       f"to {saver.path}" if saver.epochs_saved else
                       "interrupted before the first epoch finished; nothing saved")
            return 130
    if recipe.holdout is not None:
        parts = held_out_accuracy(evaluate_all_numbers(model, test_split), recipe.holdout)
        history[-1].update(parts)
        saver.save(history)
        say(f"All {parts['held_out_count'] + parts['seen_count']:,} test pairs: held-out pairs "
            f"{100 * parts['held_out_acc']:.2f}%, seen pairs {100 * parts['seen_acc']:.2f}%")
        if args.json:
            print(json.dumps(parts))
    if saver.path != out:
        _to_stderr(f"saved the model to '{saver.path}' instead")
        return 1
    say(f"saved {out}")
    return 0


def _evaluate_command(args):
    device = choose_device(args.device)
    model = load_checkpoint(args.model, device)
    test_split = load_split(False, root=args.data, device=device)
    result = evaluate(model, test_split)
    every = evaluate_all_numbers(model, test_split)
    report = {**result.summary(), "all_numbers_sum_acc": every["sum_acc"],
              "per_number_sum_acc": every["per_number"]}
    if args.json:
        print(json.dumps(report))
        return 0
    print(result.test_line())
    print(f"Both correct: {100 * report['both_acc']:.2f}%, "
          f"consistency: {100 * report['consistency']:.2f}%")
    print(f"All {int(every['pair_counts'].sum()):,} pairs: sum accuracy {100 * every['sum_acc']:.2f}%")
    return 0


def read_image(path, data: bytes | None = None):
    """The picture at `path` as a PIL image, or one clear error. With `data`, the file's bytes
    (an upload), `path` is only its name."""
    import io

    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if data is None and path.is_dir():
        raise ValueError(f"'{path}' is a folder, not an image file")
    if data is None and not path.exists():
        raise FileNotFoundError(f"no image at '{path}'")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        head = data[:32] if data is not None else path.read_bytes()[:32]
        if b"ftypheic" in head or b"ftypheix" in head or b"ftypmif1" in head or path.suffix.lower() in (".heic", ".heif"):
            raise ValueError(f"cannot read '{path}': it is a HEIC photo (an iPhone's default), which "
                             f"Pillow does not read; save it as JPEG (on the iPhone: Settings > "
                             f"Camera > Formats > Most Compatible), or convert it") from None
        raise ValueError(f"cannot read '{path}' as an image ({error.__class__.__name__}); "
                         f"give a PNG, JPEG, BMP or another format Pillow reads") from None


def _predict_command(args):
    model = load_checkpoint(args.model)
    print(Answer(*predict_proba(model, read_image(args.image), args.number), args.number))
    return 0


def _score_command(args):
    result = score_folder(load_checkpoint(args.model), args.folder, args.seed)
    if args.json:
        print(json.dumps({"all": result["all"], "groups": result["groups"]}))
        return 0
    for line in _score_report(result, args.worst):
        print(line)
    return 0


def _mistake_rank(mistake) -> tuple:
    """Worst first: wrong and sure, then wrong and unsure, then refused, then right but unsure;
    within each, the surer first."""
    _, label, number, answer = mistake
    if answer is None:
        return (2, 0.0)
    right = (answer.digit, answer.total) == (label, label + number)
    return (3 if right else 0 if answer.sure else 1, -float(answer.digit_probs.max()))


def _score_report(result: dict, worst: int) -> list[str]:
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
        lines.append("worst mistakes:" if worst else "")
    for path, label, number, answer in mistakes:
        article = "an" if label == 8 else "a"
        lines.append(f"  {path}: {article} {label} with {number}; "
                     + ("refused: no digit found" if answer is None else str(answer)))
    return lines


def _benchmark_command(args):
    device = choose_device(args.device)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size,
                    precision=choose_precision(args.precision, device))
    result = benchmark(device, args.data, recipe, steps=args.steps, short_images=args.short_images,
                       train_limit=args.limit, log=_quiet if args.json else print)
    if args.json:
        print(json.dumps(result))
    return 0


_COMMANDS = {"train": _train_command, "evaluate": _evaluate_command, "predict": _predict_command,
             "score": _score_command, "benchmark": _benchmark_command}

if __name__ == "__main__":
    sys.exit(main())
