"""Checkpoints: a trained network saved to a file with what is needed to use it, and loaded back.

    checkpoints.save(model, "model.pt", seed=0)   # atomic: a failed save keeps the old file
    model = checkpoints.load("model.pt", device)  # any version so far, in eval mode

A checkpoint holds plain values and tensors only, so it is loaded with ``weights_only=True``:
a file can never run code on the machine that loads it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import helpers as h

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit

_FORMAT = "mnist-digit-plus-number"
_VERSION = 2  # 2: the digit reader and the sum head are submodules of Net
_V1_SUM_HEAD_NAMES = ("digit_position", "number_position", "sum_position", "log_sharpness",
                      "fc1.", "fc2.")


class CheckpointError(ValueError):
    """The file is not a checkpoint written by `save`."""


def _plain(value, name: str):
    """`value` as what `load` can read back safely: None, bools, numbers, strings, tensors, and
    lists, tuples and dicts (with string keys) of them. NumPy numbers become Python's; anything
    else raises ValueError now, not when the file is loaded."""
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


def save(model: h.Net, path, **metadata) -> None:
    """Weights (on the CPU, whatever device the model is on) and what is needed to use them,
    with `metadata` (see `_plain` for what it may hold); atomic, so a failed save keeps the old
    file."""
    path = Path(path)
    checkpoint = {"format": _FORMAT, "version": _VERSION,
                  "config": model.config(), "digit_classes": h.NUM_DIGITS, "sum_classes": h.NUM_SUMS,
                  "normalization": {"mean": h.MNIST_MEAN, "std": h.MNIST_STD},
                  "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                  "metadata": {key: _plain(value, key) for key, value in metadata.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # as a plain file would be, not mkstemp's private 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _current_state_dict(checkpoint: dict, path: Path) -> dict:
    """The checkpoint's weights under today's names; version 1 named them without submodules."""
    version = checkpoint.get("version")
    if version == _VERSION:
        return checkpoint["state_dict"]
    if version == 1:
        return {(f"sum_head.{name}" if name.startswith(_V1_SUM_HEAD_NAMES) else
                 f"digit_reader.{name}"): value for name, value in checkpoint["state_dict"].items()}
    raise CheckpointError(f"'{path}' is a checkpoint of version {version!r}, and this checkpoints.py "
                          f"reads versions 1 to {_VERSION}: update the project's files, or retrain "
                          f"with `python cli.py train`")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """Why torch.load refused the file, in one line. torch's own message runs to many lines and
    suggests weights_only=False, which would run any code the file holds: not advice to pass on."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not even a PyTorch file
        unsafe = []
    cause = (f"it holds {', '.join(unsafe)}, which a checkpoint of this project never does" if unsafe
             else f"{type(error).__name__}: it is damaged, or not a PyTorch file")
    return CheckpointError(f"'{path}' is not a readable checkpoint ({cause}); give a file saved by "
                           f"`python cli.py train` or checkpoints.save")


def load(path, device="cpu") -> h.Net:
    """The model saved by `save` (any version so far), in eval mode on `device`, wherever it was
    saved (a checkpoint from a GPU loads on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:  # onto the CPU first: a file saved on a GPU loads anywhere, and the device is checked below
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise _unreadable(path, error) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (expected format {_FORMAT!r})")
    state_dict = _current_state_dict(checkpoint, path)
    if (checkpoint["digit_classes"], checkpoint["sum_classes"]) != (h.NUM_DIGITS, h.NUM_SUMS) \
            or checkpoint["normalization"] != {"mean": h.MNIST_MEAN, "std": h.MNIST_STD}:
        raise CheckpointError(f"'{path}' was saved for other classes or normalization")
    model = h.Net(**checkpoint["config"])
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"'{path}' has weights that do not fit the model: {error}") from None
    return model.to(device).eval()
