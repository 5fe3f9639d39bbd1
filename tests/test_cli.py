"""The command line: train, evaluate, predict and score, and one error line per mistake."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import cli
import helpers
import inference
import pictures
import synthetic
from conftest import ROOT
from test_pictures import as_photo


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, check=False)


def test_the_old_command_line_names_the_new_one():
    """`python helpers.py train`, as the README said before release 6, does nothing but say where
    the command line went."""
    done = subprocess.run([sys.executable, str(ROOT / "helpers.py"), "train", "--epochs", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == "error: the command line is cli.py now: python cli.py train --epochs 3"


def test_cli_train_evaluate_predict(tmp_path, data_dir):
    """train, evaluate and predict agree with each other and with the Python functions."""
    model_path = tmp_path / "cli.pt"
    trained = run_cli("train", "--epochs", "1", "--limit", "512", "--batch-size", "64",
                      "--device", "cpu", "--data", str(data_dir), "--out", str(model_path), "--json")
    assert trained.returncode == 0, trained.stderr
    record = json.loads(trained.stdout.strip().splitlines()[-1])
    assert record["epoch"] == 1 and record["train_seconds"] > 0
    model = checkpoints.load(model_path)
    summary = helpers.evaluate(model, helpers.load_split(False, root=data_dir)).summary()
    assert {key: record[key] for key in summary} == pytest.approx(summary, abs=1e-6)

    scored = run_cli("evaluate", "--model", str(model_path), "--data", str(data_dir), "--json")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert {key: report[key] for key in summary} == pytest.approx(summary, abs=1e-6)
    every = helpers.evaluate_all_numbers(model, helpers.load_split(False, root=data_dir))
    assert report["all_numbers_sum_acc"] == pytest.approx(every["sum_acc"])
    assert report["per_number_sum_acc"] == pytest.approx(every["per_number"])

    image = tmp_path / "digit.png"
    Image.fromarray(helpers.load_mnist(False, root=data_dir, transform=None).data[0].numpy()).save(image)
    answer = run_cli("predict", "--model", str(model_path), str(image), "4")
    assert answer.returncode == 0, answer.stderr
    expected = inference.answer(model, pictures.read_image(image), 4)
    assert answer.stdout.strip() == str(expected)

    refused = run_cli("predict", "--model", str(model_path), str(image), "12")
    assert refused.returncode == 2 and "number must be in 0..9, got 12" in refused.stderr


@pytest.fixture
def model_file(trained, tmp_path):
    path = tmp_path / "model.pt"
    checkpoints.save(trained[0], path)
    return path


def test_cli_predicts_a_large_off_centre_dark_on_light_png(trained, model_file, raw_test, tmp_path):
    photo = as_photo(raw_test[0], size=(600, 450), at=(300, 40), scale=10)  # a 7, bottom left
    path = tmp_path / "photo.png"
    Image.fromarray(photo.numpy()).save(path)
    digit_probs = inference.answer(trained[0], raw_test[0], 7).digit_probs
    assert int(digit_probs.argmax()) == 7 and digit_probs.max() >= inference.MIN_CONFIDENCE
    answer = run_cli("predict", "--model", str(model_file), str(path), "7")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == f"digit 7 ({100 * float(digit_probs.max()):.0f} % sure), 7 + 7 = 14"


def test_cli_says_not_sure_on_a_picture_of_no_digit(trained, model_file, tmp_path):
    """A crop of a photo that the preparation does not refuse, but that shows no digit."""
    nondigits = synthetic.nondigit_photos(40, seed=11)
    digit_probs, sum_probs = inference.read_pictures(trained[0], nondigits, [2] * 40)
    unsure = (~inference.is_sure(digit_probs, sum_probs, 2) & ~digit_probs.isnan().any(1)).nonzero().flatten()
    assert len(unsure), "every picture of no digit was refused or read with confidence"
    path = tmp_path / "no-digit.png"  # lossless: the command reads the very picture chosen
    nondigits[int(unsure[0])].convert("RGB").save(path)
    answer = run_cli("predict", "--model", str(model_file), str(path), "2")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith("not sure: "), answer.stdout


CLI_MISTAKES = {  # what a user types -> what the one error line must say
    "not an image": (["predict", "--model", "{model}", "{notes}", "3"], "cannot read"),
    "missing image": (["predict", "--model", "{model}", "{tmp}/nope.png", "3"], "no image at"),
    "a folder as image": (["predict", "--model", "{model}", "{tmp}", "3"], "is a folder"),
    "blank page": (["predict", "--model", "{model}", "{blank}", "3"], "no ink"),
    "missing model": (["predict", "--model", "{tmp}/nope.pt", "{blank}", "3"], "no checkpoint"),
    "not a model": (["evaluate", "--model", "{notes}"], "not a readable checkpoint"),
    "number 12": (["predict", "--model", "{model}", "{blank}", "12"], "number must be in 0..9"),
    "number seven": (["predict", "--model", "{model}", "{blank}", "seven"], "invalid int value"),
    "epochs 0": (["train", "--epochs", "0"], "must be above 0"),
    "out under a file": (["train", "--out", "{notes}/model.pt"], "cannot write"),
    "out is a folder": (["train", "--out", "{tmp}"], "is a folder"),
}


@pytest.mark.parametrize("mistake", CLI_MISTAKES, ids=list(CLI_MISTAKES))
def test_cli_answers_each_mistake_with_one_error_line(mistake, model_file, tmp_path, data_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping: milk, eggs\n")
    blank = tmp_path / "blank.png"
    Image.new("L", (300, 200), 240).save(blank)
    words, message = CLI_MISTAKES[mistake]
    args = [word.format(model=model_file, notes=notes, tmp=tmp_path, blank=blank) for word in words]
    if args[0] == "train":
        args += ["--data", str(data_dir), "--device", "cpu", "--limit", "64"]
    before = sorted(tmp_path.iterdir())
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "error:" in lines[-1] and message in lines[-1]
    assert result.stdout == "" and sorted(tmp_path.iterdir()) == before  # nothing trained or left


def test_cli_ctrl_c_keeps_the_last_finished_epoch(tmp_path, data_dir):
    out = tmp_path / "model.pt"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "train", "--epochs", "100", "--limit", "256",
         "--batch-size", "64", "--device", "cpu", "--data", str(data_dir), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # wait for the first epoch's test line
        if line.startswith("Test set"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: saved the model of epoch ") and last.endswith(str(out))
    metadata = torch.load(out, weights_only=True)["metadata"]
    assert metadata["epochs"] == 100 and 1 <= len(metadata["history"]) < 100
    checkpoints.load(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_ctrl_c_before_the_first_epoch_saves_nothing(tmp_path, monkeypatch, capsys, data_dir):
    def interrupted(*args, stop_requested, **kwargs):  # Ctrl-C during the first epoch
        return []
    monkeypatch.setattr(helpers, "train", interrupted)
    code = cli.main(["train", "--limit", "64", "--device", "cpu", "--data", str(data_dir),
                         "--out", str(tmp_path / "model.pt")])
    assert code == 130 and "nothing saved" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_failed_save_after_training_keeps_the_model(tmp_path, monkeypatch, capsys, data_dir):
    out = tmp_path / "models" / "model.pt"
    real_save = checkpoints.save

    def disk_full_at_out(model, path, **metadata):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        real_save(model, path, **metadata)

    monkeypatch.setattr(checkpoints, "save", disk_full_at_out)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--epochs", "1", "--limit", "128", "--batch-size", "64",
                         "--device", "cpu", "--data", str(data_dir), "--out", str(out), "--json"])
    errors = capsys.readouterr().err
    rescued = list(tmp_path.glob("model-rescued-*.pt"))
    assert code == 1 and "No space left" in errors and len(rescued) == 1
    assert f"saved the model to '{rescued[0]}' instead" in errors
    checkpoints.load(rescued[0])


def score_folder_of(tmp_path, raw_mnist):
    """A small class's folder: two writers' sub-folders, labelled by name or by folder, a
    picture labelled wrong on purpose, a blank page, a file that is no picture, and notes."""
    folder = tmp_path / "class"
    pictures = {"alice/3_first.png": 3, "alice/0_second.png": 0, "alice/8_mislabelled.png": 1,
                "bob/7/scan.png": 7, "bob/2/photo.png": 2}
    for name, digit in pictures.items():
        index = int((raw_mnist.targets == digit).nonzero()[0])
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(as_photo(raw_mnist.data[index]).numpy()).save(folder / name)
    Image.new("L", (80, 60), 235).save(folder / "bob" / "5_blank.png")
    (folder / "alice" / "4_broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("labels are the first character\n")
    return folder


def test_score_counts_a_folder_by_sub_folder_and_lists_the_worst_mistakes(trained, model_file, tmp_path, raw_mnist):
    folder = score_folder_of(tmp_path, raw_mnist)
    result = inference.score_folder(trained[0], folder)
    assert result["all"]["pictures"] == 6 and set(result["groups"]) == {"alice", "bob"}
    assert result["groups"]["alice"]["pictures"] == 3 and result["groups"]["bob"]["pictures"] == 3
    assert result["all"]["refused"] == 1 and result["groups"]["bob"]["refused"] == 1
    assert [p.name for p in result["unreadable"]] == ["4_broken.png"]
    assert [p.name for p in result["unlabelled"]] == ["notes.txt"]
    assert result["all"]["right"] == 4 and result["all"]["confidently_wrong"] == 1  # the 1 labelled 8
    shown = run_cli("score", "--model", str(model_file), str(folder))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["pictures", "right", "flagged", "refused", "confidently", "wrong", "folder"]
    assert [line.split()[-1] for line in lines[1:4]] == ["alice", "bob", "all"]
    assert lines[3].split()[:2] == ["6", "66.7%"]
    assert any("skipped 1 file(s) that are not pictures" in line and "4_broken.png" in line for line in lines)
    worst = lines[lines.index("worst mistakes:") + 1:]
    assert "8_mislabelled.png: an 8 with" in worst[0] and "sure)" in worst[0]  # shows a 1: wrong and sure, first
    assert "5_blank.png: a 5 with" in worst[1] and "refused" in worst[1]
    counted = json.loads(run_cli("score", "--model", str(model_file), str(folder), "--json").stdout)
    assert counted["all"] == result["all"] and counted["groups"] == result["groups"]


@pytest.mark.parametrize("make, message", [
    (lambda folder: None, "no labelled pictures"),
    (lambda folder: (folder / "notes.txt").write_text("x"), "no labelled pictures"),
    (lambda folder: (folder / "3_broken.png").write_bytes(b"x"), "none of the 1 labelled files"),
], ids=["empty folder", "no digit labels", "nothing readable"])
def test_score_answers_a_folder_it_cannot_score_in_one_line(model_file, tmp_path, make, message):
    folder = tmp_path / "pictures"
    folder.mkdir()
    make(folder)
    result = run_cli("score", "--model", str(model_file), str(folder))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
