"""Everything the notebook and the command line run, on every device: the CPU always, a GPU
where there is one, and on any machine the meta device standing in for a GPU, which catches a
tensor left on the wrong device."""
import copy
from pathlib import Path

import pytest
import torch

import helpers


def on(device, split: helpers.Split) -> helpers.Split:
    return helpers.Split(*(None if t is None else t.to(device) for t in (split.images, split.labels, split.numbers)))


# ----------------------------------------------------------------------------- the policy

def fake_gpu(monkeypatch, capability, name="a fake GPU"):
    """Makes torch answer as a CUDA GPU of `capability` would, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("native_cpu, capability, cpu_auto, cuda_auto", [
    (True, (9, 0), "bf16", "bf16"),  # an AMX or AVX512-BF16 CPU; an H100 or H200
    (False, (8, 0), "fp32", "bf16"),  # a CPU without native bf16; an A100 (or an L4, 8.9)
    (False, (7, 5), "fp32", "fp16"),  # Colab's T4: bf16 only emulated, fast fp16
])
def test_auto_precision_follows_the_hardware(monkeypatch, native_cpu, capability, cpu_auto, cuda_auto):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native_cpu)
    fake_gpu(monkeypatch, capability)
    assert helpers.choose_precision("auto", cpu) == cpu_auto
    assert helpers.choose_precision("auto", cuda) == cuda_auto
    assert helpers.choose_precision("auto", mps) == "fp32"  # unmeasured there
    for device in (cpu, cuda, mps):
        assert helpers.choose_precision("fp32", device) == "fp32"
    assert helpers.choose_precision("bf16", cpu) == "bf16"  # emulated where not native: allowed
    assert helpers.choose_precision("fp16", cuda) == "fp16"
    if cuda_auto == "bf16":
        assert helpers.choose_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(ValueError, match="no native bf16.*use fp16 or fp32"):
            helpers.choose_precision("bf16", cuda)


@pytest.mark.parametrize("precision, device, message", [
    ("fp16", "cpu", "CUDA GPUs only.*use bf16 or fp32"),
    ("bf16", "mps", "not offered on MPS.*use fp32"),
    ("fp16", "mps", "not offered on MPS.*use fp32"),
    ("half", "cpu", "precision must be one of"),
])
def test_a_precision_the_device_cannot_run_gets_one_clear_line(precision, device, message):
    with pytest.raises(ValueError, match=message) as error:
        helpers.choose_precision(precision, torch.device(device))
    assert "\n" not in str(error.value)


def test_native_bf16_matches_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(cpuinfo.read_text().split())
    assert helpers._has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_full_precision_turns_autocast_off_on_each_device(device):
    layer = torch.nn.Linear(4, 4).to(device)
    inputs = torch.randn(2, 4, device=device)
    precision = helpers.choose_precision("auto", device)
    with helpers.autocast(precision, device):
        assert layer(inputs).dtype == (torch.float32 if precision == "fp32" else helpers._HALF_TYPES[precision])
        with helpers._full_precision(device):
            assert layer(inputs).dtype == torch.float32


def test_only_fp16_gets_a_gradient_scaler_and_train_step_uses_it():
    cpu = torch.device("cpu")
    assert helpers._gradient_scaler("fp32", cpu) is None and helpers._gradient_scaler("bf16", cpu) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # the fp16 path, on the CPU
    torch.manual_seed(0)
    model = helpers.Net()
    optimizer = torch.optim.Adam(model.parameter_groups(0.01))
    batch = helpers.Batch(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,)))
    before = [p.detach().clone() for p in model.parameters()]
    helpers.train_step(model, optimizer, batch, "fp32", scaler=scaler)
    assert scaler._scale is not None  # the scaler scaled this step's loss
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- meta: no GPU needed

@pytest.mark.parametrize("sum_head", list(helpers.SUM_HEADS))
def test_forward_loss_and_train_step_stay_on_the_device(meta, sum_head):
    model = helpers.Net(sum_head=sum_head).to(meta)
    images, outliers = torch.randn(16, 1, 28, 28, device=meta), torch.randn(4, 1, 28, 28, device=meta)
    labels, numbers = torch.randint(0, 10, (16,), device=meta), torch.randint(0, 10, (16,), device=meta)
    digits, sums = model(images, numbers)
    assert digits.device == sums.device == meta and sums.shape == (16, 19)
    optimizer = torch.optim.Adam(model.parameter_groups(0.01))
    loss = helpers.train_step(model, optimizer, helpers.Batch(images, labels, numbers, outliers), "fp32", 0.25)
    assert loss.device == meta and all(p.device == meta for p in model.parameters())


def test_training_and_evaluation_stay_on_the_device(meta, train_slice, test_split):
    """`train` with augmentation, outliers and a hold-out, then every evaluation the notebook
    shows, with the splits and the model on the stand-in GPU."""
    train, test = on(meta, train_slice.first(64)), on(meta, test_split.first(32))
    recipe = helpers.Recipe(epochs=1, batch_size=16, outliers=2, holdout=helpers.HOLDOUT_PAIRS, precision="auto")
    model = helpers.Net()
    history = helpers.train(model, train, test, recipe, progress=False, log=None)
    assert len(history) == 1 and history[0]["precision"] == "fp32"
    assert all(p.device == meta for p in model.parameters())
    assert helpers.evaluate(model, test).count == 32
    every = helpers.evaluate_all_numbers(model, test)
    assert every["pair_counts"].shape == (10, 10)
    assert helpers.digit_logits_of(model, test).device == meta


def test_training_refuses_a_test_split_on_another_device(meta, train_slice, test_split):
    with pytest.raises(ValueError, match="test split on meta"):
        helpers.train(helpers.Net(), train_slice.first(64), on(meta, test_split.first(32)), progress=False, log=None)


@pytest.mark.parametrize("kind", list(helpers.SUM_HEADS))
def test_sum_head_helpers_stay_on_the_device(meta, kind):
    """Section 8: heads trained alone on frozen logits, scored per pair and with scrambled labels."""
    logits, labels = torch.randn(64, 10, device=meta), torch.randint(0, 10, (64,), device=meta)
    scramble = torch.randperm(19, generator=torch.Generator().manual_seed(0))
    recipe = helpers.Recipe(epochs=1, batch_size=16, holdout=helpers.HOLDOUT_PAIRS)
    head = helpers.train_sum_head(kind, logits, labels, recipe, sum_classes=scramble)
    assert all(p.device == meta for p in head.parameters())
    numbers = torch.randint(0, 10, (64,), device=meta)
    assert isinstance(helpers.sum_accuracy(head, logits, labels, numbers, scramble), float)
    assert helpers.sum_accuracy_by_pair(head, logits, labels)["per_pair"].shape == (10, 10)


def test_predict_reads_a_picture_with_the_model_on_the_device(meta, raw_test):
    model = helpers.Net().to(meta)  # on meta, weights have no values: an untrained model will do
    digit_probs, sum_probs = helpers.predict_proba(model, raw_test[0], 3)
    assert digit_probs.shape == (10,) and sum_probs.shape == (19,) and digit_probs.device.type == "cpu"
    assert helpers.read_pictures(model, raw_test[:4], [1, 2, 3, 4])[0].shape == (4, 10)


def test_outliers_and_distortions_are_built_on_the_device(meta, train_slice):
    outliers = helpers.outlier_batch(12, torch.Generator().manual_seed(0), train_slice.images[:50].to(meta))
    assert outliers.device == meta and outliers.shape == (12, 1, 28, 28)
    distortions = helpers.draw_distortions(8, torch.Generator().manual_seed(0)).to(meta)
    assert helpers.augment(train_slice.images[:8].to(meta), distortions).device == meta


# ----------------------------------------------------------------------------- each real device

def test_an_epoch_is_drawn_the_same_on_every_device(device, train_slice):
    """The seed fixes the order, the numbers, the distortions and the outliers, wherever the
    split lives: they are drawn on the CPU and copied once an epoch."""
    recipe = helpers.Recipe(batch_size=32, outliers=4, holdout=helpers.HOLDOUT_PAIRS)
    split = train_slice.first(96)
    on_cpu = list(helpers._TrainingData(split, recipe).epoch())
    here = list(helpers._TrainingData(on(device, split), recipe).epoch())
    assert len(on_cpu) == len(here) == 3
    for a, b in zip(on_cpu, here):
        assert b.images.device.type == device.type and b.outliers.device.type == device.type
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.numbers, b.numbers.cpu())
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-4)
        assert torch.allclose(a.outliers, b.outliers.cpu(), atol=1e-4)


def test_training_learns_on_each_device(device, train_slice, test_split):
    torch.manual_seed(0)
    model = helpers.Net()
    recipe = helpers.Recipe(epochs=2, batch_size=64, seed=0)  # "auto": bf16 or fp16 where native
    history = helpers.train(model, on(device, train_slice.first(4000)), on(device, test_split.first(1000)),
                            recipe, progress=False, log=None)
    assert history[-1]["precision"] == helpers.choose_precision("auto", device)
    assert history[-1]["digit_acc"] >= 0.9, history[-1]  # the sum head's line needs longer:
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # see the test below
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in model.parameters())


def test_predict_takes_a_picture_and_a_model_on_each_device(device, trained, raw_test):
    model = copy.deepcopy(trained[0])
    expected = helpers.predict(model, raw_test[0], 4)
    model.to(device)
    assert helpers.predict(model, raw_test[0].to(device), 4) == expected
    digit_probs, _ = helpers.predict_proba(model, raw_test[0].to(device), 4)
    assert digit_probs.device.type == "cpu"  # answers come back to the CPU, as documented


def test_sum_head_trains_on_each_device(device, trained, train_slice, test_split):
    model = trained[0]
    logits = helpers.digit_logits_of(model, train_slice).to(device)
    test = test_split.first(1000)
    test_logits = helpers.digit_logits_of(model, test).to(device)
    head = helpers.train_sum_head("adder", logits, train_slice.labels.to(device), helpers.Recipe(epochs=3))
    accuracy = helpers.sum_accuracy(head, test_logits, test.labels.to(device), test.numbers.to(device))
    assert accuracy >= 0.85
