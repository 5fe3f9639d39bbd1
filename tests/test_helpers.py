"""Fast tests: small slices of MNIST on the CPU. The full-accuracy run is the notebook's."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from conftest import ROOT


# ----------------------------------------------------------------------------- data

def test_numbers_cover_0_to_9_about_equally():
    numbers = helpers.draw_numbers(60000, seed=1)
    counts = torch.bincount(numbers, minlength=11)
    assert counts[10] == 0 and (counts[:10] > 5600).all() and numbers.min() == 0 and numbers.max() == 9


def test_dataset_item_is_image_label_one_hot_sum(data_dir):
    dataset = helpers.DigitPlusNumber(helpers.load_mnist(False, data_dir), seed=3)
    for index in range(50):
        image, label, one_hot, total = dataset[index]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert one_hot.shape == (10,) and one_hot.sum() == 1
        assert one_hot.argmax() == dataset.numbers[index]
        assert total == label + dataset.numbers[index]
    assert -0.5 < image.min() < -0.4 and image.max() > 2.5  # normalized, not raw 0..1


def test_test_numbers_are_fixed_and_match_the_dataset(data_dir, test_split):
    again = helpers.load_split(False, "cpu", data_dir, limit=500)
    assert torch.equal(again.numbers, test_split.numbers[:500])
    dataset = helpers.DigitPlusNumber(helpers.load_mnist(False, data_dir))
    assert torch.equal(dataset.numbers, test_split.numbers)
    assert torch.equal(test_split.sums, test_split.labels + test_split.numbers)
    assert set(test_split.numbers.tolist()) == set(range(10))


def test_training_numbers_are_fresh_every_epoch(train_slice):
    generator = torch.Generator().manual_seed(0)
    first = helpers.draw_training_numbers(train_slice.labels, generator)
    second = helpers.draw_training_numbers(train_slice.labels, generator)
    assert not torch.equal(first, second)
    assert (first == second).float().mean() < 0.2  # independent draws agree ~10% of the time


def test_holdout_pairs_never_drawn_yet_every_digit_and_number_appears(train_slice):
    table = helpers.pairs_table(helpers.HOLDOUT_PAIRS)
    assert table.sum() == 10 and (table.sum(0) == 1).all() and (table.sum(1) == 1).all()
    generator = torch.Generator().manual_seed(0)
    labels = train_slice.labels
    for _ in range(3):
        numbers = helpers.draw_training_numbers(labels, generator, table)
        assert not table[labels, numbers].any()
        seen = torch.zeros(10, 10, dtype=torch.bool)
        seen[labels, numbers] = True
        assert torch.equal(seen, ~table)  # every other pair does occur


def test_holdout_rejects_pairs_that_remove_a_number():
    with pytest.raises(ValueError, match="remove a digit or a number"):
        helpers.pairs_table([(digit, 4) for digit in range(10)])
    with pytest.raises(ValueError, match="outside"):
        helpers.pairs_table([(3, 10)])


def test_missing_data_offline_names_folder_and_files(tmp_path, monkeypatch):
    # Port 9 on loopback refuses at once: the same path as a machine without internet.
    monkeypatch.setattr(helpers.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(helpers.MnistNotFoundError) as error:
        helpers.load_mnist(True, tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert all(name in message for name in helpers.MNIST_FILES)
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("batch_norm, sum_head", [(True, "logits"), (False, "logits"),
                                                   (True, "probs"), (True, "number_line")])
def test_net_shapes_and_19_sum_classes(batch_norm, sum_head):
    model = helpers.Net(batch_norm=batch_norm, sum_head=sum_head).eval()
    digits, sums = model(torch.randn(5, 1, 28, 28), torch.tensor([0, 9, 3, 9, 1]))
    assert digits.shape == (5, 10) and sums.shape == (5, 19)
    assert torch.allclose(sums.exp().sum(1), torch.ones(5))
    assert torch.allclose(digits.exp().sum(1), torch.ones(5))
    names = {name for name, _ in model.named_children()}
    assert {"conv1", "conv2", "pool1", "pintconv1", "conv3", "conv4", "pool2", "pintconv2",
            "conv5", "conv6", "conv7"} <= names
    assert ({"fc1", "fc2"} <= names) == (sum_head != "number_line")
    has_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_norm == batch_norm


def test_unknown_sum_head_is_refused():
    with pytest.raises(ValueError, match="sum_head must be one of"):
        helpers.Net(sum_head="lookup")


@pytest.mark.parametrize("sum_head, generalizes", [("logits", False), ("number_line", True)])
def test_sum_head_on_held_out_pairs(sum_head, generalizes):
    """The digit given exactly, only the sum head trains, on the 90 seen pairs; then the 10 held out.

    The reference head memorises the pairs; the number-line head adds (the notebook's finding).
    """
    torch.manual_seed(0)
    model = helpers.Net(sum_head=sum_head)
    grid = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    digits, numbers = (values.flatten() for values in grid)
    sums, logits = digits + numbers, 20.0 * torch.nn.functional.one_hot(digits, 10)
    one_hot = torch.nn.functional.one_hot(numbers, 10).float()
    seen = ~helpers.pairs_table(helpers.HOLDOUT_PAIRS)[digits, numbers]
    head = [p for name, p in model.named_parameters() if not name.startswith(("conv", "norm", "pint"))]
    optimizer = torch.optim.Adam(head, lr=0.01)
    for _ in range(1500):
        loss = torch.nn.functional.nll_loss(model.sum_log_probs(logits[seen], one_hot[seen]), sums[seen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        correct = model.sum_log_probs(logits, one_hot).argmax(1) == sums
    assert correct[seen].all()
    held_out = correct[~seen].float().mean()
    assert held_out == 1.0 if generalizes else held_out < 0.5


def test_one_hot_numbers_give_the_same_output():
    model = helpers.Net().eval()
    images, numbers = torch.randn(4, 1, 28, 28), torch.tensor([2, 9, 0, 5])
    by_index = model(images, numbers)
    by_one_hot = model(images, torch.nn.functional.one_hot(numbers, 10).float())
    assert all(torch.equal(a, b) for a, b in zip(by_index, by_one_hot))
    with pytest.raises(ValueError, match="numbers must be"):
        model(images, numbers.float())


def test_nine_plus_nine_is_a_class_and_trains():
    torch.manual_seed(0)
    model = helpers.Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, nines = torch.randn(8, 1, 28, 28), torch.full((8,), 9)
    for _ in range(30):
        digits, sums = model(images, nines)
        loss = helpers.loss_fn(digits, sums, nines, nines + nines)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model.eval()(images, nines)[1].argmax(1) == 18).all()


# ----------------------------------------------------------------------------- training

def test_short_training_beats_chance_by_far(trained):
    _, history = trained
    assert len(history) == 2
    assert history[-1]["digit_acc"] > 0.85 and history[-1]["sum_acc"] > 0.5  # chance: 0.1, ~0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"epoch", "train_seconds", "loss", "digit_acc", "sum_acc", "both_acc",
            "consistency"} <= history[0].keys()


def test_same_seed_same_metrics(train_slice, test_split):
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = helpers.Net()
        history = helpers.train(model, train_slice.first(640), test_split.first(300), epochs=1,
                                batch_size=64, seed=7, progress=False, log=None)
        runs.append({k: v for k, v in history[0].items() if k != "train_seconds"})
    assert runs[0] == runs[1]


def test_train_rejects_bad_settings_before_training(train_slice, test_split):
    with pytest.raises(ValueError, match="at least 1"):
        helpers.train(helpers.Net(), train_slice, test_split, epochs=0)
    with pytest.raises(ValueError, match="fixed numbers"):
        helpers.train(helpers.Net(), train_slice, train_slice, epochs=1, log=None, progress=False)


def test_evaluate_counts_and_average_loss(trained, test_split):
    model, _ = trained
    split = test_split.first(700)
    result = helpers.evaluate(model, split, batch_size=128)
    assert result.count == 700 and result.digit_confusion.sum() == 700
    assert result.sum_confusion.shape == (19, 19) and result.sum_confusion.sum() == 700
    assert result.digit_confusion.trace() == result.digit_correct
    assert result.sum_confusion.trace() == result.sum_correct
    assert result.both_correct <= min(result.digit_correct, result.sum_correct)
    with torch.no_grad():
        digits, sums = model(split.images, split.numbers)
        expected = helpers.loss_fn(digits, sums, split.labels, split.sums).item()
    assert result.loss == pytest.approx(expected, rel=1e-4)  # an average, not a sum
    line = result.test_line()
    assert line.startswith("Test set: Average loss: ") and f"/700 (" in line


def test_evaluate_all_numbers_matches_pairwise_and_splits_add_up(trained, test_split):
    model, _ = trained
    split = test_split.first(300)
    every = helpers.evaluate_all_numbers(model, split, batch_size=128)
    assert every["pair_counts"].sum() == 3000 and len(every["per_number"]) == 10
    for number in (0, 9):  # the head-only shortcut agrees with the full model
        fixed = helpers.Split(split.images, split.labels, torch.full_like(split.labels, number))
        assert every["per_number"][number] == pytest.approx(
            helpers.evaluate(model, fixed).sum_correct / 300)
    parts = helpers.split_by_pairs(every, helpers.HOLDOUT_PAIRS)
    assert parts["held_out_count"] + parts["seen_count"] == 3000
    weighted = (parts["held_out_acc"] * parts["held_out_count"]
                + parts["seen_acc"] * parts["seen_count"]) / 3000
    assert weighted == pytest.approx(every["sum_acc"])


# ----------------------------------------------------------------------------- predict

def test_predict_accepts_every_image_form(trained, test_split, data_dir):
    model, _ = trained
    raw = helpers.load_mnist(False, data_dir, transform=None).data[:8]  # uint8 [8, 28, 28]
    expected = helpers.predict_batch(model, raw, list(range(8)))
    assert expected[0].shape == expected[1].shape == (8,)
    for index in range(3):
        answer = (int(expected[0][index]), int(expected[1][index]))
        image = raw[index]
        for form in (image, image.float() / 255, image[None], image.numpy(),
                     image.numpy().astype(np.float64) / 255, Image.fromarray(image.numpy())):
            assert helpers.predict(model, form, index) == answer
        assert helpers.predict(model, image, np.int64(index)) == answer
        assert helpers.predict(model, image, torch.tensor(index)) == answer


BAD_INPUTS = [
    ("number 10", lambda img: (img, 10), ValueError, "0..9"),
    ("number -1", lambda img: (img, -1), ValueError, "0..9"),
    ("number 3.5", lambda img: (img, 3.5), TypeError, "integer"),
    ("number '7'", lambda img: (img, "7"), TypeError, "integer"),
    ("number None", lambda img: (img, None), TypeError, "integer"),
    ("number True", lambda img: (img, True), TypeError, "integer"),
    ("float tensor number", lambda img: (img, torch.tensor(3.0)), TypeError, "integer"),
    ("image 27x28", lambda img: (img[:27], 1), ValueError, "28x28"),
    ("three channels", lambda img: (img[None].expand(3, 28, 28), 1), ValueError, "1 channel"),
    ("RGB PIL image", lambda img: (Image.fromarray(img.numpy()).convert("RGB"), 1), ValueError, "mode"),
    ("NaN pixel", lambda img: (torch.full((28, 28), float("nan")), 1), ValueError, "NaN"),
    ("normalized float", lambda img: ((img.float() / 255 - 0.13) / 0.31, 1), ValueError, r"\[0, 1\]"),
    ("integer above 255", lambda img: (img.long() * 2, 1), ValueError, "0..255"),
    ("a list", lambda img: (img.tolist(), 1), TypeError, "tensor, NumPy array or PIL"),
    ("bool image", lambda img: (img > 0, 1), TypeError, "dtype"),
    ("string array", lambda img: (np.array([["a"] * 28] * 28), 1), TypeError, "dtype"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_predict_rejects_bad_input_clearly(trained, data_dir, case):
    model, _ = trained
    image = helpers.load_mnist(False, data_dir, transform=None).data[0]
    _, make, error, message = case
    with pytest.raises(error, match=message):
        helpers.predict(model, *make(image))


def test_predict_batch_rejects_empty_and_mismatched(trained):
    model, _ = trained
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="empty"):
        helpers.predict_batch(model, images[:0], [])
    with pytest.raises(ValueError, match="3 images but 2 numbers"):
        helpers.predict_batch(model, images, [1, 2])
    with pytest.raises(TypeError, match="sequence"):
        helpers.predict_batch(model, images, 5)
    with pytest.raises(TypeError, match="integer"):
        helpers.predict_batch(model, images, [1, 2.5, 3])
    digits, sums = helpers.predict_batch(model, images, torch.tensor([1, 2, 3]))
    assert digits.shape == sums.shape == (3,)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(trained, test_split, tmp_path):
    model, _ = trained
    path = tmp_path / "model.pt"
    helpers.save_checkpoint(model, path, note="test")
    loaded = helpers.load_checkpoint(path)
    images, numbers = test_split.images[:50], test_split.numbers[:50]
    model.eval()
    with torch.no_grad():  # training left `model` channels_last: same values, other rounding
        for original, reloaded in zip(model(images, numbers), loaded(images, numbers)):
            assert torch.allclose(original, reloaded, atol=1e-5)
            assert torch.equal(original.argmax(1), reloaded.argmax(1))
    assert loaded.config() == model.config() and not loaded.training
    assert torch.load(path, weights_only=True)["metadata"] == {"note": "test"}


@pytest.mark.parametrize("config", [{"batch_norm": False, "sum_head": "logits"},
                                    {"batch_norm": True, "sum_head": "number_line"}])
def test_every_variant_round_trips(tmp_path, config):
    path = tmp_path / "variant.pt"
    helpers.save_checkpoint(helpers.Net(**config), path)
    assert helpers.load_checkpoint(path).config() == config


def test_interrupted_save_keeps_the_old_checkpoint(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = tmp_path / "model.pt"
    helpers.save_checkpoint(model, path)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(helpers.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        helpers.save_checkpoint(helpers.Net(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_corrupt_foreign_and_missing_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(helpers.CheckpointError, match="not a readable checkpoint"):
        helpers.load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(helpers.CheckpointError, match="not a checkpoint of this project"):
        helpers.load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        helpers.load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "helpers.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_cli_train_evaluate_predict(tmp_path, data_dir):
    model_path = tmp_path / "cli.pt"
    trained = run_cli("train", "--epochs", "1", "--limit", "512", "--batch-size", "64",
                      "--device", "cpu", "--data", str(data_dir), "--out", str(model_path), "--json")
    assert trained.returncode == 0, trained.stderr
    record = json.loads(trained.stdout.strip().splitlines()[-1])
    assert record["epoch"] == 1 and 0 <= record["digit_acc"] <= 1 and record["train_seconds"] > 0
    assert {"loss", "sum_acc", "both_acc", "consistency"} <= record.keys()

    scored = run_cli("evaluate", "--model", str(model_path), "--data", str(data_dir), "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert len(report["per_number_sum_acc"]) == 10 and 0 <= report["all_numbers_sum_acc"] <= 1

    image = tmp_path / "digit.png"
    Image.fromarray(helpers.load_mnist(False, data_dir, transform=None).data[0].numpy()).save(image)
    answer = run_cli("predict", "--model", str(model_path), str(image), "4")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("digit ") and " + 4 = " in answer.stdout

    refused = run_cli("predict", "--model", str(model_path), str(image), "12")
    assert refused.returncode == 2 and "number must be in 0..9, got 12" in refused.stderr
