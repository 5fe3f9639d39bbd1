"""An MNIST digit plus a random number 0..9 in; the digit and their sum out.

This file is the assignment, in the order the notebook tells its story: device and precision,
data, model, training, evaluation, using a model, checkpoints, and the command line (``python helpers.py --help``).
Beside it, ``pictures.py`` reads pictures and frames them as MNIST's digits are (and makes the
pictures of no digit that training shows), ``plots.py`` draws the notebooks' figures, and
``benchmark.py`` measures training speed.

Three conventions hold in every function:
- device: only entry points choose one, with `choose_device` (the command line, the benchmark,
  the notebooks' first cell). Everything else follows what it is given: a `Split`'s tensors
  for training and evaluation, the model's weights for `predict`.
- precision: "auto" by default; `Precision` resolves it once, by the one policy under
  "device and precision" below. Scores and answers are always computed in plain fp32.
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from tqdm.auto import tqdm

import pictures
from pictures import NoDigitError, frame_digit, read_image

__version__ = "5.0"  # the notebooks check this, and that pictures.py and plots.py match it

NUM_DIGITS = 10  # image classes, and the random number is drawn from 0..9 too
NUM_SUMS = 19  # 0 + 0 .. 9 + 9
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DATA_DIR_ENV = "MNIST_DATA_DIR"
TEST_NUMBERS_SEED = 2024  # fixed, so every run scores the same test pairs
if pictures.__version__ != __version__:
    raise ImportError(f"pictures.py {pictures.__version__} is not helpers.py's {__version__}: "
                      f"take both from one commit")


# ----------------------------------------------------------------------------- device and precision

#
# The one policy for where and how the network computes.
#
# Device: entry points (the command line, the benchmark, the notebooks' first cell) pick one with
# `choose_device`; every other function follows the tensors it is given.
#
# Precision: `Precision` resolves a name ("auto" included) once, for the device at hand, by
# `choose_precision`:
#
#   device  "auto" gives                                     may also ask for
#   cpu     bf16 where the CPU computes it natively            fp32; bf16 anywhere (emulated bf16
#           (AVX512-BF16 or AMX), else fp32                    is slower than fp32)
#   cuda    bf16 from compute capability 8.0 (A100, L4, H100); fp32; fp16 from 7.0; bf16 only
#           fp16 with a gradient scaler from 7.0 (V100, T4);   from 8.0
#           fp32 below (older GPUs have no fast fp16)
#   mps     fp32: mixed precision there is unmeasured          nothing else
#
# Only the digit reader's convolutions run in bf16 or fp16 (`Precision.autocast`); the weights,
# the optimizer, the sum head and the losses stay fp32. fp16 always comes with its gradient
# scaler, and on CUDA the optimizer is fused Adam, which takes the scaler's overflow flag on the
# GPU: no training step waits for the host. Every score and every answer (`evaluate`, `predict`)
# is computed in plain fp32 (`exact_fp32`: autocast off, and no TF32 on CUDA), so a model gives
# the same answers whatever it was trained in. Training in "fp32" on a GPU of compute capability
# 8.0 or later does let cuDNN use TF32 in its convolutions, PyTorch's default.

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether the device does bf16 arithmetic in hardware.

    CPU: AVX512-BF16 or AMX, by PyTorch's own feature probes (a version without them counts as
    no). CUDA: compute capability 8.0 or later; `torch.cuda.is_bf16_supported()` is no guide,
    since by default it also answers True where bf16 is only emulated (a T4).
    """
    device = torch.device(device)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _has_fast_fp16(device: torch.device) -> bool:
    """Whether the device is a CUDA GPU with fast fp16 (tensor cores): compute capability 7.0 on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def auto_precision(device_type: str, native_bf16: bool, fast_fp16: bool = False) -> str:
    """What "auto" gives on a device of `device_type` ("cpu", "cuda", "mps") with or without
    native bf16 and fast fp16: the table above, as a rule."""
    if native_bf16 and device_type in ("cpu", "cuda"):
        return "bf16"
    return "fp16" if device_type == "cuda" and fast_fp16 else "fp32"


def choose_precision(precision: str, device: torch.device) -> str:
    """"fp32", "bf16" or "fp16" for `precision` on `device`, by the table above; a precision
    the device cannot run raises ValueError with what to use instead."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = device.type
    if precision == "auto":
        return auto_precision(kind, kind in ("cpu", "cuda") and has_native_bf16(device),
                              _has_fast_fp16(device))
    if precision == "fp32":
        return precision
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"{precision} is not offered on {kind}: mixed precision there has not been "
                         f"measured; use fp32")
    if precision == "fp16" and not _has_fast_fp16(device):
        raise ValueError("fp16 runs on CUDA GPUs of compute capability 7.0 or later only (a CPU or "
                         "an older GPU has no fast fp16); use " + ("bf16 or fp32" if kind == "cpu" else "fp32"))
    if precision == "bf16" and kind == "cuda" and not has_native_bf16(device):
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no native bf16 "
                         f"(it needs compute capability 8.0 or later); use fp16 or fp32")
    return precision


class Precision:
    """How training computes on one device, resolved once from any name in PRECISIONS: `name` is
    "fp32", "bf16" or "fp16", and fp16 comes with its gradient `scaler` (None otherwise), which
    multiplies the loss so that fp16's small gradients do not round to zero."""

    def __init__(self, name: str, device: torch.device | str):
        self.device = torch.device(device)
        self.name = choose_precision(name, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    def __repr__(self):
        return f"Precision({self.name!r}, {str(self.device)!r})"

    def autocast(self):
        """Inside, convolutions and matrix products compute in bf16 or fp16; fp32 changes nothing."""
        if self.name == "fp32":  # no autocast object at all: torch 2.3 and 2.4 refuse one on MPS
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_HALF_TYPES[self.name])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer):
        """The backward pass and the optimizer's step; in fp16 through the scaler, which skips a
        step whose gradients overflowed and adjusts its scale on the device."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def _full_precision(device: torch.device):
    """Turns an enclosing autocast off on any device, for code that must run in fp32."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()  # no autocast ever runs elsewhere (see `choose_precision`)


@contextmanager
def exact_fp32(device: torch.device):
    """Inside, the network computes in plain fp32: autocast off, and on CUDA no TF32 (which
    cuDNN uses for fp32 convolutions by default from compute capability 8.0)."""
    with _full_precision(device):
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def adam(groups: list[dict]) -> torch.optim.Adam:
    """Adam over parameter `groups`, fused on the CPU and CUDA: one kernel a step, which reads
    nothing back to the host (its step count stays a tensor) and, under fp16's scaler, skips an
    overflowed step on the GPU instead of reading the overflow flag on the host."""
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.Adam(groups, fused=fused or None)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last where a measurement says it helps: on the CPU, convolutions train about
    1.4 times as fast with it. On CUDA it is unmeasured here; on MPS its convolutions' backward
    gave wrong results in torch 2.5 (pytorch issues 140902 and 142344)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def synchronize(device: torch.device):
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
        bf16 = "native bf16" if has_native_bf16(device) else "no native bf16"
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


def mnist_test_sample(count: int, seed: int = 0, *, root=None) -> tuple[np.ndarray, torch.Tensor]:
    """`count` MNIST *test* digits (uint8 [count, 28, 28]) and their labels, drawn without
    repeats from `seed`: handwriting by writers the network never trained on, for
    `pictures.photo_digits` and `pictures.clean_digits` to draw."""
    mnist = load_mnist(False, root=root, transform=None)
    order = np.random.default_rng(seed).permutation(len(mnist.data))[:count]
    return mnist.data[order].numpy(), mnist.targets[order]


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


# Outlier exposure (Hendrycks et al., 2019): a few made-up pictures that are not digits ride
# along with every training batch, and the digit reader learns to answer them with no
# preference, so that a picture of no digit gets a low top probability (see MIN_CONFIDENCE).
_OUTLIER_BANK = 4096  # at most this many pictures of no digit are made a run (one epoch of the
#                      default recipe draws 3,752); each epoch draws from them


class _OutlierBank:
    """Pictures of no digit (`pictures.draw_outliers`), made and framed once, before the first
    epoch, on the CPU, and held on the device as network inputs. Each epoch draws its outliers
    from them there, each flipped, transposed or not at random (the 8 symmetries of the square:
    still no digit), so no picture work runs inside the epoch loop."""

    def __init__(self, images: torch.Tensor, generator: torch.Generator, size: int):
        """`size` pictures; `images`: the training split's normalized images, whose digits are
        scrambled for some of them."""
        scrambled = torch.randperm(len(images), generator=generator)[:size].to(images.device)
        digits = _to_host(denormalize(images[scrambled, 0]).clamp(0, 1))[0]
        framed = pictures.draw_outliers(size, generator, digits)
        self.pictures = normalize(framed)[:, None].to(images.device)

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` outliers [count, 1, 28, 28], drawn with repeats, on the bank's device."""
        device = self.pictures.device
        chosen = self.pictures[torch.randint(len(self.pictures), (count,), generator=generator).to(device)]
        flip_x, flip_y, turn = (torch.rand(3, count, 1, 1, 1, generator=generator) < 0.5).to(device)
        chosen = torch.where(flip_x, chosen.flip(-1), chosen)
        chosen = torch.where(flip_y, chosen.flip(-2), chosen)
        return torch.where(turn, chosen.transpose(-1, -2), chosen)


@dataclass
class Batch:
    """One training batch: normalized `images` [B, 1, 28, 28], `labels` and `numbers` [B], and
    `outliers` [K, 1, 28, 28], pictures of no digit for outlier exposure (None: none)."""
    images: torch.Tensor
    labels: torch.Tensor
    numbers: torch.Tensor
    outliers: torch.Tensor | None = None


def train_step(model: Net, optimizer, batch: Batch, precision: Precision,
               outlier_weight: float = 0.0) -> torch.Tensor:
    """One optimizer step on a batch, computed as `precision` says (a `Precision`, which
    carries fp16's gradient scaler from step to step).

    The outliers go through the digit reader with the images, and their digit answer is
    pulled towards no preference (`outlier_loss`, weighted by `outlier_weight`); the sum head
    never sees them. Only the convolutions run under autocast; the heads, the loss and the
    weights stay fp32. Returns the batch's `cross_entropies` [digit, sum], as the test line
    measures them, still on the device: reading them would make the CPU wait for the device.
    """
    if not isinstance(precision, Precision):
        raise TypeError(f"precision must be a Precision, such as Precision('auto', device), so that "
                        f"fp16 keeps its gradient scaler from step to step; got {precision!r}")
    count, images = len(batch.labels), batch.images
    if batch.outliers is not None and len(batch.outliers):  # one pass: they share the batch's
        images = torch.cat([images, batch.outliers])  # BatchNorm statistics (8 of 136 pictures)
    with precision.autocast():
        logits = model.digit_logits(images).float()
    digit_logits, numbers, labels = logits[:count], batch.numbers, batch.labels
    loss = model.training_loss(digit_logits, numbers, labels)
    if len(logits) > count:
        loss = loss + outlier_weight * outlier_loss(logits[count:])
    with torch.no_grad():  # the adder trains on a bound; report what the test line measures
        answers = F.log_softmax(digit_logits, 1), model.sum_head(digit_logits, _as_one_hot(numbers))
        measured = cross_entropies(*answers, labels, labels + numbers)
    precision.backward_and_step(loss, optimizer)
    return measured


def _one_cycle_adam(groups: list[dict], total_steps: int):
    """`adam` over parameter `groups`, and a one-cycle schedule peaking at each group's lr."""
    optimizer = adam(groups)
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
    """How to train. The defaults are the notebooks' and the command line's."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01  # the peak of the one-cycle schedule
    seed: int = 0  # the order, the numbers, the augmentation and the outliers of every epoch
    augment: float = 1.0  # the strength of `augment`; 0 trains on the images as they are
    outliers: int = 8  # pictures of no digit added to each batch (outlier exposure); 0: none
    outlier_weight: float = 0.1  # their loss's weight (docs/experiments.md: 0.15 read MNIST worse)
    holdout: tuple | None = None  # (digit, number) pairs that never occur in training
    precision: str = "auto"  # any name in PRECISIONS; `train` resolves it for the device

    def __post_init__(self):
        for name in ("epochs", "batch_size", "outliers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name, least in (("epochs", 1), ("batch_size", 1), ("outliers", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        for name in ("lr", "augment", "outlier_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be {'above' if name == 'lr' else 'at least'} 0 and "
                                 f"finite, got {value}")


class TrainingData:
    """The training split served one epoch at a time, as `train` consumes it: each epoch has a
    fresh order and fresh numbers (never a held-out pair), distorted images unless
    `recipe.augment` is 0, and `recipe.outliers` pictures of no digit with each batch, drawn
    from a bank made once. Seeded by `recipe.seed`."""

    def __init__(self, split: Split, recipe: Recipe):
        self.split, self.recipe = split, recipe
        self.holdout = None if recipe.holdout is None else _pairs_table(recipe.holdout)
        self.data_rng = torch.Generator().manual_seed(recipe.seed)
        # Generators of their own, so the orders and numbers do not depend on the other settings.
        self.augment_rng = torch.Generator().manual_seed(recipe.seed + 1)
        self.outlier_rng = torch.Generator().manual_seed(recipe.seed + 2)
        bank = min(_OUTLIER_BANK, len(self) * recipe.outliers)  # no more than an epoch draws
        self.outliers = _OutlierBank(split.images, self.outlier_rng, bank) if bank else None

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
        outliers = self.outliers.draw(len(self) * per_batch, self.outlier_rng) if self.outliers else None
        distortions = draw_distortions(len(split), self.augment_rng, recipe.augment) \
            .to(split.images.device) if recipe.augment else None
        for step, (index, numbers) in enumerate(_epoch_batches(split.labels, size, self.data_rng, self.holdout)):
            images = split.images[index]
            if distortions is not None:
                images = augment(images, distortions[step * size:(step + 1) * size])
            yield Batch(images, split.labels[index], numbers,
                        None if outliers is None else outliers[step * per_batch:(step + 1) * per_batch])


def _check_places(model: Net, train_split: Split, test_split: Split) -> torch.device:
    """The one device of the splits and the model, or ValueError now, before any training."""
    device = train_split.images.device
    if test_split.numbers is None:
        raise ValueError("the test split needs fixed numbers: use load_split(train=False)")
    if test_split.images.device != device:
        raise ValueError(f"the training split is on {device} but the test split on "
                         f"{test_split.images.device}: load both with the same device=")
    model_device = next(model.parameters()).device
    if model_device != device:
        raise ValueError(f"the model is on {model_device} but the splits on {device}: move it "
                         f"with model.to(device) first")
    return device


def train(model: Net, train_split: Split, test_split: Split, recipe: Recipe = Recipe(), *,
          progress: bool = True, log=print, on_epoch=None, stop_requested=None) -> list[dict]:
    """Adam with a one-cycle schedule; fresh order, numbers and distortions every epoch.

    The model must be on the splits' device; on the CPU its weights are switched to channels_last
    (the same values, and convolutions that train about 1.4 times as fast). After each epoch,
    `log` gets the test line and `on_epoch` the history so far. Returns one dict per finished
    epoch: `epoch`, `train_seconds`, `precision`, `train_loss` (the test line's loss on the
    training batches, averaged over the epoch), `evaluate(...).summary()`, and `step_losses`,
    each step's [digit, sum] cross-entropies. `stop_requested` is asked after every step; once it
    answers True, training stops there and returns the epochs finished so far (the model keeps
    the weights of that last step).
    """
    device = _check_places(model, train_split, test_split)
    precision = Precision(recipe.precision, device)
    model.to(memory_format=memory_format(device))
    data = TrainingData(train_split, recipe)
    optimizer, schedule = _one_cycle_adam(model.parameter_groups(recipe.lr), recipe.epochs * len(data))
    history = []
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        started = time.perf_counter()
        with _progress_bar(len(data), f"Epoch {epoch}/{recipe.epochs}", disable=not progress) as bar:
            losses = torch.zeros(len(data), 2, device=device)  # per step; on the device until the end
            for step, batch in zip(bar, data.epoch()):
                losses[step] = train_step(model, optimizer, batch, precision, recipe.outlier_weight)
                schedule.step()
                if stop_requested is not None and stop_requested():
                    return history
            synchronize(device)
            seconds = time.perf_counter() - started
            losses = _to_host(losses)[0]
            train_loss = float((losses.mean(1) * data.batch_sizes()).sum() / len(train_split))
            bar.set_postfix(loss=f"{train_loss:.4f}")
        result = evaluate(model, test_split)
        history.append({"epoch": epoch, "train_seconds": seconds, "precision": precision.name,
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


def new_model(seed: int = 0, device: torch.device | str = "cpu", **config) -> Net:
    """A `Net(**config)` whose weights start from `seed`, on `device`; the caller's random
    generators are left as they were. The same seed gives the same start on every device."""
    with _seeded(seed):  # built on the CPU, then moved
        model = Net(**config)
    return model.to(device)


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
    """The digit logits [N, 10] of every image in the split, in exact fp32, on the split's device."""
    model.eval()
    with exact_fp32(split.images.device):
        return torch.cat([model.digit_logits(split.images[start:start + batch_size]).float()
                          for start in range(0, len(split), batch_size)])


@torch.no_grad()
def evaluate(model: Net, split: Split, batch_size: int = 1000) -> Evaluation:
    """Average loss, accuracies, consistency and confusion matrices on the split's numbers, in
    exact fp32 (as `predict` answers), whatever the model was trained in."""
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


def _network_input(framed: torch.Tensor) -> torch.Tensor:
    """A framed picture [28, 28] (intensities in [0, 1], ink bright) as `Net`'s input [1, 28, 28]."""
    return normalize(framed)[None]


def prepare_image(image) -> torch.Tensor:
    """A picture of one digit as `Net`'s normalized input [1, 28, 28]: `pictures.frame_digit`
    frames it as MNIST's digits are (see `pictures.preparation_steps`), from any picture (PIL,
    NumPy or a tensor; any size, colour or grey, dark ink on light paper or light on dark)."""
    return _network_input(frame_digit(image))


@torch.no_grad()
def _probabilities(model: Net, framed: list[torch.Tensor], numbers: list[int]):
    """Digit probabilities [B, 10] and sum probabilities [B, 19], on the CPU, for framed
    pictures [28, 28] and numbers, on the model's device, in exact fp32."""
    batch = torch.stack([_network_input(picture) for picture in framed])
    device = next(model.parameters()).device
    model.eval()
    with exact_fp32(device):
        answers = [model(batch[start:start + 1000].to(device),  # a thousand at a time: bounded memory
                         torch.tensor(numbers[start:start + 1000], device=device))
                   for start in range(0, len(batch), 1000)]
    return [log_probs.exp() for log_probs in _to_host(*(torch.cat(parts) for parts in zip(*answers)))]


def predict_proba(model: Net, image, number) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit probabilities [10], sum probabilities [19]), on the CPU, for one picture of a
    digit (any picture `prepare_image` takes) and a number 0..9. A picture with no digit
    raises NoDigitError; a wrong call, another ValueError or a TypeError."""
    number = _as_number(number)
    digit_probs, sum_probs = _probabilities(model, [frame_digit(image)], [number])
    return digit_probs[0], sum_probs[0]


def predict(model: Net, image, number) -> tuple[int, int]:
    """(digit, sum): each head's answer for one picture and a number 0..9 (see `predict_proba`).
    Where they may disagree, or the network may be unsure, `Answer` says so."""
    digit_probs, sum_probs = predict_proba(model, image, number)
    return int(digit_probs.argmax()), int(sum_probs.argmax())


def read_pictures(model: Net, images, numbers, framing=frame_digit):
    """(digit probabilities [N, 10], sum probabilities [N, 19]) for many pictures and their
    numbers, each picture framed by `framing` (`pictures.frame_digit`, or another from there to
    compare). A picture that shows no digit (NoDigitError) gets a row of NaN, and the others
    are still read; any other mistake in the call raises.

    `images`: a list of pictures, each as `prepare_image` takes it, or one array or tensor
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
    digit_probs, sum_probs = torch.full((len(framed), NUM_DIGITS), float("nan")), \
        torch.full((len(framed), NUM_SUMS), float("nan"))
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
        return f"not sure ({self.digit} or {int(self.digit_probs.topk(2).indices[1])})"


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


def tally(model: Net, images, labels, numbers, framing=frame_digit) -> dict[str, int]:
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
    answers, read, unreadable = [], [], []
    for (path, label, group), number in zip(files, draw_numbers(len(files), seed).tolist()):
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



# ----------------------------------------------------------------------------- command line


def _quiet(*_):
    """A `log` that prints nothing."""


def _to_stderr(line: str):
    print(line, file=sys.stderr)


def positive(kind, zero_allowed: bool = False):
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
        command.add_argument("--precision", default="auto", choices=PRECISIONS,
                             help="of training: auto is bf16 where the CPU or GPU has it natively, "
                                  "fp16 on other CUDA GPUs from compute capability 7.0, else fp32 "
                                  "(scores are always fp32)")
    return command


def _add_train(commands):
    recipe = _add_common(commands.add_parser(
        "train", help="train and save a model",
        description="Train a model, saving it to --out after every epoch. Ctrl-C stops training "
                    "at once and keeps the model of the last finished epoch; before the first "
                    "epoch ends nothing is saved."))
    recipe.add_argument("--epochs", type=positive(int), default=Recipe.epochs)
    recipe.add_argument("--batch-size", type=positive(int), default=Recipe.batch_size)
    recipe.add_argument("--lr", type=positive(float), default=Recipe.lr)
    recipe.add_argument("--seed", type=int, default=Recipe.seed)
    recipe.add_argument("--limit", type=positive(int), default=None, help="train on the first N images")
    recipe.add_argument("--no-augment", action="store_true",
                        help="train on the images as they are, without distortions")
    recipe.add_argument("--outliers", type=positive(int, zero_allowed=True), default=Recipe.outliers,
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
    score.add_argument("--worst", type=positive(int, zero_allowed=True), default=10,
                       help="how many mistakes to list, worst first")
    score.add_argument("--json", action="store_true", help="the counts as one JSON object")
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
                    holdout=HOLDOUT_PAIRS if args.holdout else None, precision=args.precision)
    train_split = load_split(True, root=args.data, device=device, limit=args.limit)
    test_split = load_split(False, root=args.data, device=device)
    model = new_model(recipe.seed, device, batch_norm=not args.no_batch_norm, sum_head=args.sum_head)
    say = _quiet if args.json else print
    saver = _EpochSaver(model, out, seed=recipe.seed, epochs=recipe.epochs, holdout=recipe.holdout)

    def finished(history):  # saved first, then reported: an epoch printed is an epoch kept
        saver.save(history)
        if args.json:
            print(json.dumps({k: v for k, v in history[-1].items() if k != "step_losses"}), flush=True)

    with _ctrl_c_sets_flag() as stop_requested:
        history = train(model, train_split, test_split, recipe, progress=not args.json,
                        log=say, on_epoch=finished, stop_requested=stop_requested)
    if len(history) < recipe.epochs:
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


def _predict_command(args):
    model = load_checkpoint(args.model)
    print(Answer(*predict_proba(model, read_image(args.image), args.number), args.number))
    return 0


def _score_command(args):
    result = score_folder(load_checkpoint(args.model), args.folder, args.seed)
    if args.json:
        print(json.dumps({"all": result["all"], "groups": result["groups"]}))
        return 0
    for line in score_report(result, args.worst):
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


_COMMANDS = {"train": _train_command, "evaluate": _evaluate_command, "predict": _predict_command,
             "score": _score_command}

if __name__ == "__main__":
    sys.exit(main())
