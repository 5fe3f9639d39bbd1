"""Checkpoints: what is saved comes back, weights and metadata; what cannot, says why."""
import numpy as np
import pytest
import torch

import helpers
import checkpoints


def test_checkpoint_round_trip(trained, test_split, tmp_path):
    model, _ = trained
    path = tmp_path / "model.pt"
    checkpoints.save(model, path, note="test")
    loaded = checkpoints.load(path)
    images, numbers = test_split.images[:50], test_split.numbers[:50]
    model.eval()
    with torch.no_grad():  # training left `model` channels_last: same values, other rounding
        for original, reloaded in zip(model(images, numbers), loaded(images, numbers)):
            assert torch.allclose(original, reloaded, atol=1e-5)
            assert torch.equal(original.argmax(1), reloaded.argmax(1))
    assert loaded.config() == model.config() and not loaded.training
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in saved.values())  # fp32 after bf16
    assert torch.load(path, weights_only=True)["metadata"] == {"note": "test"}


@pytest.mark.parametrize("config", [{"batch_norm": False, "sum_head": "logits"},
                                    {"batch_norm": True, "sum_head": "number_line"},
                                    {"batch_norm": True, "sum_head": "probs"}])
def test_every_variant_round_trips_with_its_weights(tmp_path, config, test_split):
    torch.manual_seed(1)
    model = helpers.Net(**config).eval()
    path = tmp_path / "variant.pt"
    checkpoints.save(model, path)
    loaded = checkpoints.load(path)
    assert loaded.config() == config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    images, numbers = test_split.images[:20], test_split.numbers[:20]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images, numbers), loaded(images, numbers)))


def test_metadata_round_trips_and_what_cannot_is_refused_when_saving(tmp_path):
    path = tmp_path / "model.pt"
    checkpoints.save(helpers.Net(), path, best=np.float64(0.99), epochs=np.int64(3),
                            history=[{"digit_acc": np.float32(0.5), "note": "first"}], holdout=((0, 3),))
    metadata = torch.load(path, weights_only=True)["metadata"]
    assert metadata == {"best": 0.99, "epochs": 3, "history": [{"digit_acc": 0.5, "note": "first"}],
                        "holdout": ((0, 3),)}
    assert type(metadata["best"]) is float and type(metadata["epochs"]) is int
    checkpoints.load(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metadata note has type object"):
        checkpoints.save(helpers.Net(), path, note=object())
    assert path.read_bytes() == before  # refused before anything was written


def edited_checkpoint(model, path, **changes):
    """A checkpoint of `model` saved at `path`, then rewritten with `changes`."""
    checkpoints.save(model, path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, path)
    return path


def test_a_version_1_checkpoint_loads_under_the_new_names(trained, test_split, tmp_path):
    """Version 1 named the layers without the digit_reader. and sum_head. submodules."""
    model, _ = trained
    old_names = {name.split(".", 1)[1]: value.cpu() for name, value in model.state_dict().items()}
    assert {"conv1.weight", "digit_position", "log_sharpness"} <= old_names.keys()
    loaded = checkpoints.load(edited_checkpoint(model, tmp_path / "v1.pt", version=1,
                                                       state_dict=old_names))
    images, numbers = test_split.images[:50], test_split.numbers[:50]
    with torch.no_grad():
        for original, reloaded in zip(model.eval()(images, numbers), loaded(images, numbers)):
            assert torch.allclose(original, reloaded, atol=1e-5)


def test_a_checkpoint_from_a_newer_version_is_refused_in_one_line(tmp_path):
    path = edited_checkpoint(helpers.Net(), tmp_path / "v9.pt", version=9)
    with pytest.raises(checkpoints.CheckpointError, match="version 9.*update the project's files") as error:
        checkpoints.load(path)
    assert "\n" not in str(error.value)


def test_interrupted_save_keeps_the_old_checkpoint(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = tmp_path / "model.pt"
    checkpoints.save(model, path)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(helpers.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(helpers.Net(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_corrupt_foreign_and_missing_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="not a readable checkpoint") as error:
        checkpoints.load(corrupt)
    assert "\n" not in str(error.value)  # one line, for the command line's one error line
    assert "UnpicklingError: it is damaged" in str(error.value) and "weights_only=False" not in str(error.value)
    numpy_inside = tmp_path / "numpy.pt"  # saved by hand, not by save_checkpoint: the cause is named
    torch.save({"format": checkpoints._FORMAT, "best": np.float64(0.99)}, numpy_inside)
    with pytest.raises(checkpoints.CheckpointError, match="it holds numpy.*never does") as error:
        checkpoints.load(numpy_inside)
    assert "\n" not in str(error.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint of this project"):
        checkpoints.load(foreign)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.load(tmp_path / "missing.pt")
