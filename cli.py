"""The command line: train, evaluate, predict and score, each one clear line on a mistake.

    python cli.py train --epochs 3 --out model.pt
    python cli.py evaluate --model model.pt
    python cli.py predict --model model.pt photo.jpg 7
    python cli.py score --model model.pt FOLDER

``python cli.py COMMAND --help`` lists every option.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import checkpoints
import helpers as h
import inference
import pictures

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit


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
    command.add_argument("--data", default=None, help=f"MNIST folder (default: ${h.DATA_DIR_ENV} or ./data)")
    command.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    if precision:
        command.add_argument("--precision", default="auto", choices=h.PRECISIONS,
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
    recipe.add_argument("--epochs", type=positive(int), default=h.Recipe.epochs)
    recipe.add_argument("--batch-size", type=positive(int), default=h.Recipe.batch_size)
    recipe.add_argument("--lr", type=positive(float), default=h.Recipe.lr)
    recipe.add_argument("--seed", type=positive(int, zero_allowed=True), default=h.Recipe.seed)
    recipe.add_argument("--limit", type=positive(int), default=None, help="train on the first N images")
    recipe.add_argument("--no-augment", action="store_true",
                        help="train on the images as they are, without distortions")
    recipe.add_argument("--outliers", type=positive(int, zero_allowed=True), default=h.Recipe.outliers,
                        help="pictures of no digit with each batch, so that the model learns to be "
                             "unsure of them (0: none; with --no-augment, the plain recipe)")
    recipe.add_argument("--no-batch-norm", action="store_true", help="the reference-faithful model")
    recipe.add_argument("--sum-head", choices=list(h.SUM_HEADS), default="adder")
    recipe.add_argument("--holdout", action="store_true",
                        help=f"never train on the pairs {h.HOLDOUT_PAIRS}, then score them apart")
    recipe.add_argument("--out", default="model.pt", help="checkpoint file (checked before training)")
    recipe.add_argument("--json", action="store_true",
                        help="one JSON object per epoch as it ends (then one for --holdout's scores)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=h.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    check = _add_common(commands.add_parser("evaluate", help="score a saved model (in fp32)"), precision=False)
    check.add_argument("--model", required=True)
    check.add_argument("--json", action="store_true")
    ask = commands.add_parser(
        "predict", help="digit and sum for one image file, and how sure",
        description=f"Reads the digit in one picture and adds the number. Below "
                    f"{inference.MIN_CONFIDENCE:.0%} confidence it answers 'not sure' and names the two "
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


def _save_or_fall_back(model: h.Net, path: Path, log=print, **metadata) -> Path:
    """Saves to `path`; if that fails, to a fresh file in the current or temporary folder."""
    try:
        checkpoints.save(model, path, **metadata)
        return path
    except OSError as error:
        log(f"error: could not save '{path}' ({error})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        fallback = folder / f"model-rescued-{stamp}.pt"
        try:
            checkpoints.save(model, fallback, **metadata)
            return fallback
        except OSError:
            continue
    raise OSError("could not save the model anywhere: check disk space and permissions")


class _EpochSaver:
    """Saves the model after every finished epoch, so Ctrl-C or a crash keeps the last one.

    It saves to `path`; if that ever fails, to a rescue file (`_save_or_fall_back`), and from
    then on there.
    """

    def __init__(self, model: h.Net, path: Path, **metadata):
        self.model, self.path, self.metadata, self.epochs_saved = model, path, metadata, 0

    def save(self, history: list[dict]):
        self.path = _save_or_fall_back(self.model, self.path, log=_to_stderr, history=history,
                                      **self.metadata)
        self.epochs_saved = len(history)


@contextmanager
def _ctrl_c_sets_flag():
    """Inside, a first Ctrl-C only sets a flag, which the yielded function reads, so that it never
    lands inside a half-copied tensor or a half-built progress bar; a second one stops at once."""
    flag = threading.Event()

    def interrupted(*_):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        _to_stderr("stopping after this step (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _train_command(args):
    out = _check_writable(args.out)
    device = h.choose_device(args.device)
    recipe = h.Recipe(args.epochs, args.batch_size, args.lr, args.seed,
                    augment=0.0 if args.no_augment else h.Recipe.augment, outliers=args.outliers,
                    holdout=h.HOLDOUT_PAIRS if args.holdout else None, precision=args.precision)
    train_split = h.load_split(True, root=args.data, device=device, limit=args.limit)
    test_split = h.load_split(False, root=args.data, device=device)
    model = h.new_model(recipe.seed, device, batch_norm=not args.no_batch_norm, sum_head=args.sum_head)
    bank = pictures.draw_outliers(min(pictures.OUTLIER_BANK, len(train_split)), h.random_streams(recipe.seed)["bank"],
                                  h.denormalize(train_split.images)) if recipe.outliers else None
    say = None if args.json else print
    saver = _EpochSaver(model, out, seed=recipe.seed, epochs=recipe.epochs, holdout=recipe.holdout)

    def finished(history):  # saved first, then reported: an epoch printed is an epoch kept
        saver.save(history)
        if args.json:
            print(json.dumps({k: v for k, v in history[-1].items() if k != "step_losses"}), flush=True)

    with _ctrl_c_sets_flag() as stop_requested:
        history = h.train(model, train_split, test_split, recipe, outlier_bank=bank, log=say,
                          on_epoch=finished, stop_requested=stop_requested)
    if len(history) < recipe.epochs:
        _to_stderr(f"interrupted: saved the model of epoch {saver.epochs_saved}/{recipe.epochs} "
                   f"to {saver.path}" if saver.epochs_saved else
                   "interrupted before the first epoch finished; nothing saved")
        return 130
    if recipe.holdout is not None:
        parts = h.held_out_accuracy(h.evaluate_all_numbers(model, test_split), recipe.holdout)
        history[-1].update(parts)
        saver.save(history)
        print(json.dumps(parts) if args.json else
              f"All {parts['held_out_count'] + parts['seen_count']:,} test pairs: held-out pairs "
              f"{100 * parts['held_out_acc']:.2f}%, seen pairs {100 * parts['seen_acc']:.2f}%")
    if saver.path != out:
        _to_stderr(f"saved the model to '{saver.path}' instead")
        return 1
    if not args.json:
        print(f"saved {out}")
    return 0


def _evaluate_command(args):
    device = h.choose_device(args.device)
    model = checkpoints.load(args.model, device)
    test_split = h.load_split(False, root=args.data, device=device)
    logits = h.digit_logits_of(model, test_split)  # the reader once, for both reports
    result = h.evaluate(model, test_split, logits=logits)
    every = h.sum_accuracy_by_pair(model.sum_head, logits, test_split.labels)
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
    model = checkpoints.load(args.model)
    print(inference.answer(model, pictures.read_image(args.image), args.number))
    return 0


def _score_command(args):
    result = inference.score_folder(checkpoints.load(args.model), args.folder, args.seed)
    if args.json:
        print(json.dumps({"all": result["all"], "groups": result["groups"]}))
        return 0
    for line in inference.score_report(result, args.worst):
        print(line)
    return 0


_COMMANDS = {"train": _train_command, "evaluate": _evaluate_command, "predict": _predict_command,
             "score": _score_command}

if __name__ == "__main__":
    sys.exit(main())
