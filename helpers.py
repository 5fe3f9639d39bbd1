"""An MNIST digit plus a random number 0..9 in; the digit and their sum out.

This file is the assignment, in the order the notebook tells its story: device and precision,
data, model, training and evaluation. It needs PyTorch and torchvision only. Beside it, each in a
module named for its job: ``pictures.py`` reads any picture and frames it as MNIST's digits are,
and draws the pictures of no digit that training shows; ``synthetic.py`` makes pictures to test
on; ``inference.py`` uses a trained network on pictures; ``checkpoints.py`` saves and loads one;
``cli.py`` is the command line (``python cli.py --help``); ``plots.py`` draws the notebooks'
figures; ``drawing.py`` is the drawing pad; ``benchmark.py`` measures training speed;
``publish.py`` names the repository of a published copy.

Three conventions hold in every function:
- device: only entry points choose one, with `choose_device` (the command line, the benchmark,
  the notebooks' first cell). Everything else follows what it is given: a `Split`'s tensors
  for training and evaluation, the model's weights for reading a picture.
- precision: "auto" by default; `Precision` resolves it once, by the one policy under
  "device and precision" below. Scores and answers are always computed in plain fp32.
- data: `root=None` means $MNIST_DATA_DIR, or ./data when that is unset.
"""
from __future__ import annotations

import math
import os
import sys
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

__version__ = "6.0"  # the notebooks check that every file of the project says the same

NUM_DIGITS = 10  # image classes, and the random number is drawn from 0..9 too
NUM_SUMS = 19  # 0 + 0 .. 9 + 9
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_DIR_ENV = "MNIST_DATA_DIR"
TEST_NUMBERS_SEED = 2024  # fixed, so every run scores the same test pairs


# ----------------------------------------------------------------------------- device and precision

# The one policy for where and how the network computes. Entry points (the command line, the
# benchmark, the notebooks' first cell) pick a device with `choose_device`; every other function
# follows the tensors it is given. `Precision` resolves a precision's name once, for the device,
# by `choose_precision`:
#
#   device  "auto" gives                                         may also ask for
#   cpu     bf16 where the CPU computes it natively (AVX512-BF16  fp32; bf16 and fp16, emulated
#           or AMX), else fp32                                   where it lacks them (slow)
#   cuda    bf16 from compute capability 8.0 (A100, L4, H100),   fp32; fp16 from 7.0; bf16
#           fp16 from 7.0 (V100, T4), fp32 below                 from 8.0
#   mps     fp32: mixed precision there is unmeasured            nothing else
#
# Only the digit reader's convolutions compute in 16 bits (`Precision.autocast`); the weights, the
# optimizer, the sum head and the losses stay fp32, and fp16 always comes with its gradient scaler.
# Every score and answer is computed in plain fp32 (`exact_fp32`), so a model answers the same
# whatever it was trained in.

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
    if kind == "cpu":  # both run everywhere, emulated (and slower than fp32) where not native
        return precision
    if precision == "fp16" and not _has_fast_fp16(device):
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no fast fp16 (it needs "
                         f"compute capability 7.0 or later); use fp32")
    if precision == "bf16" and not has_native_bf16(device):
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no native bf16 "
                         f"(it needs compute capability 8.0 or later); use fp16 or fp32")
    return precision


def half_precisions(device: torch.device) -> list[str]:
    """The 16-bit precisions `device` can train in, by the policy above, the one it runs best
    first: bf16, then fp16, on a CPU (emulated where it lacks them; fp16's backward is very
    slow there), by compute capability on CUDA, none on MPS."""
    offered = []
    for name in _HALF_TYPES:
        try:
            offered.append(choose_precision(name, device))
        except ValueError:
            continue
    return offered


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


@contextmanager
def exact_fp32(device: torch.device):
    """Inside, the network computes in plain fp32: autocast off, and on CUDA no TF32 (which
    cuDNN uses for fp32 convolutions by default from compute capability 8.0)."""
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") \
        else nullcontext()  # no autocast ever runs elsewhere (see `choose_precision`)
    with no_autocast:
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class OneCycleAdam:
    """The optimizer of every training loop here: Adam over parameter `groups`, with a one-cycle
    schedule over `total_steps` that peaks at each group's lr, stepping as `precision` says.

    On the CPU and CUDA, Adam is fused: one kernel a step, which reads nothing back to the host
    (its step count stays a tensor) and, under fp16's gradient scaler, skips an overflowed step
    on the device instead of reading the overflow flag on the host."""

    def __init__(self, groups: list[dict], total_steps: int, precision: Precision):
        if not isinstance(precision, Precision):
            raise TypeError(f"precision must be a Precision, such as Precision('auto', device), so that "
                            f"fp16 keeps its gradient scaler from step to step; got {precision!r}")
        fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
        self.adam, self.precision = torch.optim.Adam(groups, fused=fused or None), precision
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.adam, max_lr=[group["lr"] for group in groups], total_steps=total_steps)

    def step(self, loss: torch.Tensor):
        """The backward pass of `loss`, Adam's step and the schedule's. In fp16 the scaler
        multiplies the loss first, divides the gradients back, skips a step whose gradients
        overflowed, and adjusts its scale, all on the device."""
        self.adam.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        if scaler is None:
            loss.backward()
            self.adam.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(self.adam)
            scaler.update()
        self.schedule.step()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on the CPU, where convolutions train about 1.4 times as fast with it, and on
    CUDA, as PyTorch's performance guide advises for 16-bit convolutions on tensor cores. Not on
    MPS: its convolutions' backward gave wrong results with it in torch 2.5 (pytorch issues 140902
    and 142344)."""
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor copied to `device` without making the host wait: on CUDA through pinned
    memory, so the copy queues behind the GPU's work instead of waiting for it."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies results to the CPU: the one place where evaluation waits for the device."""
    return [tensor.cpu() for tensor in tensors]


# ----------------------------------------------------------------------------- data


class MnistNotFoundError(FileNotFoundError):
    """MNIST is not on disk and could not be downloaded."""


def _default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "data")


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
            f"folder with root= in Python, --data on the command line, or the {DATA_DIR_ENV} "
            f"variable.") from None


def mnist_test_sample(count: int, seed: int = 0, *, root=None) -> tuple[np.ndarray, torch.Tensor]:
    """`count` MNIST *test* digits (uint8 [count, 28, 28]) and their labels, drawn without
    repeats from `seed`: handwriting by writers the network never trained on, for
    `synthetic.photo_digits` and `synthetic.clean_digits` to draw."""
    mnist = load_mnist(False, root=root, transform=None)
    order = np.random.default_rng(seed).permutation(len(mnist.data))[:count]
    return mnist.data[order].numpy(), mnist.targets[order]


def draw_numbers(count: int, seed: int) -> torch.Tensor:
    """`count` random numbers in 0..9, both included, from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_DIGITS, (count,), generator=generator)


class DigitPlusNumber(Dataset):
    """The assignment's per-sample view: (image, label, one-hot number, sum). Its numbers are drawn
    once, from `seed`, as the test split's are; training (`load_split`) draws fresh ones each epoch."""

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
    device = labels.device
    if holdout is None:
        return to_device(torch.randint(0, NUM_DIGITS, (len(labels),), generator=generator), device)
    # Uniform over each digit's allowed numbers: allowed[d] lists them, held-out ones last.
    allowed = to_device(torch.sort(holdout.long(), dim=1, stable=True).indices, device)
    counts = to_device((~holdout).sum(dim=1), device)[labels]
    choice = (to_device(torch.rand(len(labels), generator=generator), device) * counts).long()
    return allowed[labels, torch.minimum(choice, counts - 1)]  # rand * n may round up to n


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
        return self.conv7(x).flatten(1).float()  # 16 bits under autocast; heads and losses take fp32


class SumHead(nn.Module):
    """What every sum head offers: log-probs of the 19 sums from (digit logits, one-hot number),
    the loss it trains on, and how fast its parameters learn (`lr_scale` times the base rate).

    Heads compute in fp32: training runs only the digit reader under autocast. They are tiny, so
    precision costs nothing there.
    """
    lr_scale = 1.0

    def forward(self, digit_logits: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        """digit logits [B, 10] and one-hot numbers [B, 10] -> sum log-probs [B, 19]."""
        return self.log_probs(digit_logits, one_hot)

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
        per_digit = self.sum_given_digit(one_hot)  # [B, 10, 19]
        weights = digit_logits.softmax(1).detach()
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


# A run's random choices, a stream each: the weights' start, the pictures of no digit (made once,
# `pictures.draw_outliers`), and each epoch's order, numbers, distortions and outliers.
STREAMS = ("weights", "bank", "order", "numbers", "augment", "outliers")


def _stream_seeds(seed: int) -> dict[str, int]:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a whole number, 0 or more, got {seed!r}")
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(STREAMS, children)}


def random_streams(seed: int) -> dict[str, torch.Generator]:
    """A CPU generator for each of STREAMS, seeded from `seed` through NumPy's SeedSequence, so
    that the streams are independent of each other and across seeds (seed 1's order is not seed
    0's augmentation). On the CPU, so a seed repeats them on every device."""
    return {name: torch.Generator().manual_seed(value) for name, value in _stream_seeds(seed).items()}


def _epoch_order(labels: torch.Tensor, streams: dict, holdout: torch.Tensor | None = None):
    """One epoch's order of the training pictures and their fresh numbers (never a held-out
    pair), both on `labels`' device."""
    order = to_device(torch.randperm(len(labels), generator=streams["order"]), labels.device)
    return order, draw_training_numbers(labels, streams["numbers"], holdout)[order]


# Mild distortions, so the reader meets handwriting a little unlike MNIST's.
_AUGMENT_DEGREES = 12  # rotation, either way
_AUGMENT_SCALE = 0.12  # enlarged or shrunk by up to 12 %
_AUGMENT_SHIFT = 2.5  # pixels, along each axis
_AUGMENT_THICKER, _AUGMENT_THINNER = 1 / 4, 1 / 3  # shares of images whose strokes change width
_AUGMENT_SOFT = 0.15  # share of images softened (a 3 x 3 mean, the strongest ink back to 1), so
#                      that softness alone does not tell the blurred outliers from digits
_PAPER = -MNIST_MEAN / MNIST_STD  # black paper, normalized
_AUGMENT_CHUNK = 4096  # images distorted at once: few operators a step, and little memory


def draw_distortions(count: int, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random settings for `augment`, one row per image, [count, 7]: rotation (radians), scale,
    shift along x and y (pixels), which stroke change (below _AUGMENT_THICKER: thicker; then,
    up to _AUGMENT_THINNER more: thinner; else none), how much of it, and whether to soften
    (1) or not (0). `strength` scales every range, so 0 draws no change. Drawn on the CPU from
    `generator`, so a seed repeats them on every device."""
    def uniform(*shape):  # in [-strength, strength]
        return strength * (2 * torch.rand(*shape, generator=generator) - 1)

    angle = uniform(count) * math.radians(_AUGMENT_DEGREES)
    scale = 1 + uniform(count) * _AUGMENT_SCALE
    shift = uniform(count, 2) * _AUGMENT_SHIFT
    pick = torch.rand(count, generator=generator)
    weight = (strength * torch.rand(count, generator=generator)).clamp(max=1)
    soft = (torch.rand(count, generator=generator) < strength * _AUGMENT_SOFT).float()
    return torch.stack([angle, scale, shift[:, 0], shift[:, 1], pick, weight, soft], 1)


def _max3x3(images: torch.Tensor) -> torch.Tensor:
    """The maximum over each pixel's 3 x 3 neighbourhood, [B, 1, H, W], as the same result as
    F.max_pool2d(images, 3, 1, 1) but from shifted views: about 12 times faster on the CPU for
    single-channel images, where max_pool2d cost more than the rest of `augment` together."""
    padded = F.pad(images, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def augment(images: torch.Tensor, distortions: torch.Tensor) -> torch.Tensor:
    """Normalized images [B, 1, 28, 28] distorted by `draw_distortions`' rows [B, 7], which stay
    on the CPU: each image is rotated, scaled and shifted (one affine warp); its strokes are
    moved towards the 3 x 3 maximum (thicker) or minimum (thinner); and the chosen few are
    softened. Batched tensor ops on the images' device, which the host never waits for: every
    choice is made on the CPU and copied over at once, without waiting."""
    angle, scale, shift_x, shift_y, pick, weight, soft = distortions.T
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([cos, -sin, shift_x / 14, sin, cos, shift_y / 14], 1).view(-1, 2, 3)  # 14 px: half
    sign = torch.where(pick < _AUGMENT_THICKER, 1.0, -1.0).view(-1, 1, 1, 1)  # +1 thicker, -1 thinner,
    weight = (weight * (pick < _AUGMENT_THICKER + _AUGMENT_THINNER)).view(-1, 1, 1, 1)  # or 0: neither
    parts = (theta, sign, weight, soft.nonzero()[:, 0])
    theta, sign, weight, softened = (to_device(part, images.device) for part in parts)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    ink = F.grid_sample(images - _PAPER, grid, align_corners=False)  # 0 on the paper, which the
    ink = torch.lerp(ink, sign * _max3x3(sign * ink), weight)  # warp brings in from outside
    return ink.index_copy(0, softened, _softened(ink[softened])) + _PAPER


def _softened(ink: torch.Tensor) -> torch.Tensor:
    """Ink [B, 1, H, W] (0 on the paper, 1 / MNIST_STD at full strength) blurred by a 3 x 3
    mean, its strongest ink back to full."""
    blurred = F.avg_pool2d(ink, 3, 1, 1, count_include_pad=False)
    return blurred / (MNIST_STD * blurred.amax((2, 3), keepdim=True).clamp(min=1e-6))


def outlier_loss(digit_logits: torch.Tensor) -> torch.Tensor:
    """Outlier exposure's loss: the cross-entropy from the uniform distribution over the 10
    digits to the answer, least (log 10) when the answer prefers no digit."""
    return (digit_logits.logsumexp(1) - digit_logits.mean(1)).mean()


@dataclass
class Batch:
    """One training batch: normalized `images` [B, 1, 28, 28], `labels` and `numbers` [B], and
    `outliers` [K, 1, 28, 28], pictures of no digit for outlier exposure (None: none)."""
    images: torch.Tensor
    labels: torch.Tensor
    numbers: torch.Tensor
    outliers: torch.Tensor | None = None


def train_step(model: Net, optimizer: OneCycleAdam, batch: Batch, outlier_weight: float = 0.0):
    """One optimizer step; returns the loss's two parts [digit, sum], left on the device so the
    CPU need not wait. Only the reader runs in 16 bits; outliers ride in its pass, not the sum's."""
    count, images = len(batch.labels), batch.images
    if batch.outliers is not None:
        images = torch.cat([images, batch.outliers])
    with optimizer.precision.autocast():
        logits = model.digit_logits(images)
    digit_logits, outlier_logits = logits.split([count, len(logits) - count])
    digit_loss = F.cross_entropy(digit_logits, batch.labels)
    sums = batch.labels + batch.numbers
    sum_loss = model.sum_head.training_loss(digit_logits, _as_one_hot(batch.numbers), sums)
    loss = (digit_loss + sum_loss) / 2
    if len(outlier_logits):
        loss = loss + outlier_weight * outlier_loss(outlier_logits)
    optimizer.step(loss)
    with torch.no_grad():
        return torch.stack([digit_loss, sum_loss])


@contextmanager
def _progress_bar(steps: int, desc: str, disable: bool = False):
    """A tqdm bar over range(steps) that redraws at most every 2 s: in a notebook each redraw is a
    message, and nbval's client fails a cell past about a thousand. A notebook bar's saved text
    (what GitHub shows) is rendered again when it closes, so that it reads finished, not 0 %."""
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
    outlier_weight: float = 0.1  # their loss's weight, small beside the digit's
    holdout: tuple | None = None  # (digit, number) pairs that never occur in training
    precision: str = "auto"  # any name in PRECISIONS; `train` resolves it for the device

    def __post_init__(self):
        for name in ("epochs", "batch_size", "outliers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name, least in (("epochs", 1), ("batch_size", 1), ("outliers", 0), ("seed", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if self.augment > 2:  # stronger, a digit may be scaled to nothing
            raise ValueError(f"augment must be at most 2, got {self.augment}")
        for name in ("lr", "augment", "outlier_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be {'above' if name == 'lr' else 'at least'} 0 and "
                                 f"finite, got {value}")


def _checked_bank(bank) -> torch.Tensor:
    """Pictures of no digit as intensities [K, 1, 28, 28], from [K, 28, 28] or [K, 1, 28, 28],
    uint8 or floats in [0, 1]; or one clear error."""
    bank = torch.as_tensor(bank)
    if bank.dim() not in (3, 4) or bank.shape[-2:] != (28, 28) or (bank.dim() == 4 and bank.shape[1] != 1) \
            or len(bank) == 0:
        raise ValueError(f"outlier_bank must be pictures [K, 28, 28] or [K, 1, 28, 28], K at least 1 "
                         f"(pictures.draw_outliers makes them); got shape {list(bank.shape)}")
    bank = bank.float() / 255 if bank.dtype == torch.uint8 else bank.float()
    if bank.min() < 0 or bank.max() > 1:
        raise ValueError("outlier_bank must hold intensities in [0, 1] (or uint8 0..255)")
    return bank.reshape(-1, 1, 28, 28)


class TrainingData:
    """The training split served one epoch at a time, as `train` consumes it: each epoch has a
    fresh order and fresh numbers (never a held-out pair), distorted images unless
    `recipe.augment` is 0, and `recipe.outliers` of the pictures of no digit `outlier_bank`
    (intensities [K, 28, 28], made once a run by `pictures.draw_outliers`; None: none) with each
    batch, each flipped or turned at random. Seeded by `recipe.seed`, a stream per choice."""

    def __init__(self, split: Split, recipe: Recipe, outlier_bank: torch.Tensor | None = None):
        self.split, self.recipe = split, recipe
        self.holdout = None if recipe.holdout is None else _pairs_table(recipe.holdout)
        self.streams = random_streams(recipe.seed)
        self.outliers = None
        if outlier_bank is not None and recipe.outliers and recipe.outlier_weight:
            self.outliers = normalize(_checked_bank(outlier_bank)).to(split.images.device)

    def __len__(self):
        """Batches per epoch."""
        return math.ceil(len(self.split) / self.recipe.batch_size)

    def batch_sizes(self) -> torch.Tensor:
        """How many images each batch of an epoch holds; only the last may hold fewer."""
        sizes = torch.full((len(self),), self.recipe.batch_size)
        sizes[-1] = len(self.split) - (len(self) - 1) * self.recipe.batch_size
        return sizes

    def _outliers(self) -> torch.Tensor:
        """An epoch's outliers, `recipe.outliers` a batch, each flipped, transposed or not (the 8
        symmetries of the square: still no digit), on the device."""
        count, device = len(self) * self.recipe.outliers, self.outliers.device
        generator = self.streams["outliers"]
        chosen = torch.randint(len(self.outliers), (count,), generator=generator)
        chosen = self.outliers[to_device(chosen, device)]
        flip_x, flip_y, turn = to_device(torch.rand(3, count, 1, 1, 1, generator=generator) < 0.5, device)
        chosen = torch.where(flip_x, chosen.flip(-1), chosen)
        chosen = torch.where(flip_y, chosen.flip(-2), chosen)
        return torch.where(turn, chosen.transpose(-1, -2), chosen)

    def epoch(self):
        """One epoch of `Batch`es, on the split's device. Every random choice (order, numbers,
        distortions, outliers) is drawn on the CPU and copied to the device without waiting, once
        an epoch or once a chunk: the images are distorted _AUGMENT_CHUNK at a time, and a step
        only slices what is ready."""
        split, size, per_batch = self.split, self.recipe.batch_size, self.recipe.outliers
        order, numbers = _epoch_order(split.labels, self.streams, self.holdout)
        labels, outliers = split.labels[order], self._outliers() if self.outliers is not None else None
        distortions = draw_distortions(len(split), self.streams["augment"], self.recipe.augment) \
            if self.recipe.augment else None
        chunk = _AUGMENT_CHUNK // size * size or size  # whole batches
        for first in range(0, len(split), chunk):
            images = split.images[order[first:first + chunk]]
            if distortions is not None:
                images = augment(images, distortions[first:first + chunk])
            for start in range(first, min(first + chunk, len(split)), size):
                step = start // size
                yield Batch(images[start - first:start - first + size], labels[start:start + size],
                            numbers[start:start + size],
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
          outlier_bank: torch.Tensor | None = None, log=print, on_epoch=None,
          stop_requested=None) -> list[dict]:
    """Trains `model` (on the splits' device) by `recipe`, with `recipe.outliers` pictures of no
    digit from `outlier_bank` in each batch (`TrainingData`; None: none, and `log` says so).

    A progress bar shows each epoch, then `log` gets the test line (None: no bar, no line) and
    `on_epoch` the history. Returns a dict per finished epoch: `epoch`, `train_seconds`,
    `precision`, `train_loss` (the mean of the digit's and the sum head's training losses),
    `evaluate(...).summary()`, and `step_losses` ([digit, sum] per step). `stop_requested` is
    asked after every step; once it answers True, training stops there.
    """
    device = _check_places(model, train_split, test_split)
    precision = Precision(recipe.precision, device)
    model.to(memory_format=memory_format(device))
    data = TrainingData(train_split, recipe, outlier_bank)
    if log and recipe.outliers and outlier_bank is None:
        log("no pictures of no digit given (outlier_bank=): training without outlier exposure")
    if log and precision.name == "fp16" and device.type == "cpu":
        log("fp16 on a CPU is emulated, and its backward pass is very slow: bf16 or fp32 train far faster")
    optimizer = OneCycleAdam(model.parameter_groups(recipe.lr), recipe.epochs * len(data), precision)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        started, losses = time.perf_counter(), []
        with _progress_bar(len(data), f"Epoch {epoch}/{recipe.epochs}", disable=log is None) as bar:
            for _, batch in zip(bar, data.epoch()):
                losses.append(train_step(model, optimizer, batch, recipe.outlier_weight))
                if stop_requested is not None and stop_requested():
                    return history
            synchronize(device)
            seconds = time.perf_counter() - started
            losses = to_host(torch.stack(losses))[0]
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


def seconds_per_step(model: Net, batch: Batch, precision: Precision, steps: int = 20) -> float:
    """How long one `train_step` of `model` on `batch` takes in `precision`, on average over
    `steps` steps after 5 to warm up (the device's one-time set-up): to compare precisions."""
    optimizer = OneCycleAdam(model.parameter_groups(Recipe.lr), steps + 5, precision)
    for step in range(steps + 5):
        if step == 5:
            synchronize(precision.device)
            started = time.perf_counter()
        train_step(model, optimizer, batch, Recipe.outlier_weight)
    synchronize(precision.device)
    return (time.perf_counter() - started) / steps


@contextmanager
def _seeded(seed: int):
    """Inside, the CPU's random generator starts from `seed`; after, the caller's generators
    (the CPU's and every GPU's) are as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed GPUs too
        yield


def new_model(seed: int = 0, device: torch.device | str = "cpu", **config) -> Net:
    """A `Net(**config)` whose weights start from `seed`'s "weights" stream, on `device`; the
    caller's random generators are left as they were. The same seed gives the same start on
    every device."""
    with _seeded(_stream_seeds(seed)["weights"]):  # built on the CPU, then moved
        model = Net(**config)
    return model.to(device)


def train_sum_head(kind: str | SumHead, digit_logits: torch.Tensor, labels: torch.Tensor,
                   recipe: Recipe = Recipe(epochs=2), sum_classes: torch.Tensor | None = None) -> SumHead:
    """A fresh sum head of `kind` (a name in `SUM_HEADS`, or a `SumHead` of your own, which is
    trained in place), trained alone on the frozen digit logits of a trained network, on their
    device.

    The same loss, optimizer, schedule and random streams as `train` (and `recipe.holdout`; in
    fp32, with no pictures, so no augmentation nor outliers), in seconds rather than minutes.
    `sum_classes` [19], if given, is the class each true sum is taught as: a permutation
    scrambles the labels.
    """
    with _seeded(_stream_seeds(recipe.seed)["weights"]):  # built on the CPU, then moved
        head = (_make_sum_head(kind) if isinstance(kind, str) else kind).to(digit_logits.device).train()
    streams = random_streams(recipe.seed)
    holdout = None if recipe.holdout is None else _pairs_table(recipe.holdout)
    classes = (torch.arange(NUM_SUMS) if sum_classes is None else sum_classes).to(labels.device)
    steps = math.ceil(len(labels) / recipe.batch_size)
    optimizer = OneCycleAdam(_parameter_groups(recipe.lr, head), recipe.epochs * steps,
                          Precision("fp32", digit_logits.device))
    for _ in range(recipe.epochs):
        order, numbers = _epoch_order(labels, streams, holdout)
        for start in range(0, len(labels), recipe.batch_size):
            index, number = order[start:start + recipe.batch_size], numbers[start:start + recipe.batch_size]
            sums = classes[labels[index] + number]
            optimizer.step(head.training_loss(digit_logits[index], _as_one_hot(number), sums))
    return head.eval()


def sum_accuracy(head: SumHead, digit_logits: torch.Tensor, labels: torch.Tensor,
                 numbers: torch.Tensor, sum_classes: torch.Tensor | None = None) -> float:
    """The share of (digit logits, number) pairs whose sum `head` answers right; with
    `sum_classes`, right under those class names (see `train_sum_head`)."""
    with torch.no_grad(), exact_fp32(digit_logits.device):
        answers = head(digit_logits, _as_one_hot(numbers)).argmax(1)
    sums = labels + numbers
    truth = sums if sum_classes is None else sum_classes.to(sums.device)[sums]
    return float(to_host((answers == truth).float().mean())[0])


# ----------------------------------------------------------------------------- evaluation


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
        return torch.cat([model.digit_logits(split.images[start:start + batch_size])
                          for start in range(0, len(split), batch_size)])


@torch.no_grad()
def evaluate(model: Net, split: Split, batch_size: int = 1000, logits: torch.Tensor | None = None) -> Evaluation:
    """Average loss (the mean of the digit's and the sum's cross-entropies), accuracies,
    consistency and confusion matrices on the split's numbers, in exact fp32 (as `inference.answer`
    answers), whatever the model was trained in; `logits`: the split's `digit_logits_of`, if at hand."""
    if split.numbers is None:
        raise ValueError("evaluate needs a split with fixed numbers (load_split(train=False))")
    logits = digit_logits_of(model, split, batch_size) if logits is None else logits
    with exact_fp32(logits.device):
        digit_lp, sum_lp = F.log_softmax(logits, 1), model.sum_head(logits, _as_one_hot(split.numbers))
    losses = torch.stack([F.nll_loss(digit_lp, split.labels), F.nll_loss(sum_lp, split.sums)])
    losses, digit_pred, sum_pred, labels, numbers = to_host(
        losses, digit_lp.argmax(1), sum_lp.argmax(1), split.labels, split.numbers)
    sums = labels + numbers
    digit_ok, sum_ok = digit_pred == labels, sum_pred == sums
    return Evaluation(
        digit_loss=float(losses[0]), sum_loss=float(losses[1]), digit_correct=int(digit_ok.sum()),
        sum_correct=int(sum_ok.sum()), both_correct=int((digit_ok & sum_ok).sum()),
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
        with exact_fp32(digit_logits.device):
            right = (head(digit_logits, one_hot).argmax(1) == labels + number).float()
        correct.append(right @ digits)  # [10 digits]
    correct, counts = to_host(torch.stack(correct, 1), digits.sum(0))  # [digit, number], [digit]
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



if __name__ == "__main__":  # the command line was here before release 6: say where it went
    raise SystemExit(" ".join(["error: the command line is cli.py now: python cli.py", *sys.argv[1:]]))
