"""Where and how the network computes: the precision policy, each precision's path, and
everything the notebooks and the command line run on a GPU where there is one. Without one, the
meta device stands in: its tensors have shapes but no values, and an operation that mixes them
with CPU tensors raises, as it would with a GPU's."""
import copy
import warnings
from pathlib import Path

import pytest
import torch

import checkpoints
import helpers
import inference
from conftest import predict


def on(device, split: helpers.Split) -> helpers.Split:
    return helpers.Split(*(None if t is None else t.to(device) for t in (split.images, split.labels, split.numbers)))


def fake_gpu(monkeypatch, capability, name="a fake GPU"):
    """Makes torch answer as a CUDA GPU of `capability` would, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def fake_cpu(monkeypatch, native_bf16):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native_bf16)


CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


# ----------------------------------------------------------------------------- the policy

@pytest.mark.parametrize("native_cpu, capability, cpu_auto, cuda_auto", [
    (True, (9, 0), "bf16", "bf16"),  # an AMX or AVX512-BF16 CPU; an H100 or H200
    (False, (8, 0), "fp32", "bf16"),  # a CPU without native bf16; an A100 (or an L4, 8.9)
    (False, (7, 5), "fp32", "fp16"),  # Colab's T4: bf16 only emulated, fast fp16
    (False, (6, 1), "fp32", "fp32"),  # a Pascal card: no fast fp16 either
])
def test_auto_precision_follows_the_hardware(monkeypatch, native_cpu, capability, cpu_auto, cuda_auto):
    fake_cpu(monkeypatch, native_cpu)
    fake_gpu(monkeypatch, capability)
    assert helpers.choose_precision("auto", CPU) == cpu_auto
    assert helpers.choose_precision("auto", CUDA) == cuda_auto
    assert helpers.choose_precision("auto", MPS) == "fp32"  # unmeasured there
    for device in (CPU, CUDA, MPS):
        assert helpers.choose_precision("fp32", device) == "fp32"
    assert helpers.choose_precision("bf16", CPU) == "bf16"  # emulated where not native: allowed
    assert helpers.choose_precision("fp16", CPU) == "fp16"  # likewise: the T4's path, on the CPU
    assert offered("bf16", CUDA) == (capability >= (8, 0)) and offered("fp16", CUDA) == (capability >= (7, 0))


def offered(precision, device):
    try:
        return helpers.choose_precision(precision, device) == precision
    except ValueError:
        return False


def raises_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("precision, device, capability, message", [
    ("fp16", CUDA, (6, 1), "compute capability 7.0.*use fp32"),
    ("bf16", CUDA, (7, 5), "no native bf16.*use fp16 or fp32"),
    ("bf16", MPS, None, "not offered on mps.*use fp32"),
    ("fp16", MPS, None, "not offered on mps.*use fp32"),
    ("half", CPU, None, "precision must be one of"),
])
def test_a_precision_the_device_cannot_run_gets_one_clear_line(monkeypatch, precision, device, capability, message):
    if capability:
        fake_gpu(monkeypatch, capability)
    raises_one_line(lambda: helpers.choose_precision(precision, device), message)
    raises_one_line(lambda: helpers.Precision(precision, device), message)


def test_native_bf16_matches_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(cpuinfo.read_text().split())
    assert helpers.has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_choose_device_takes_the_best_device_here_or_a_named_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert helpers.choose_device() == CUDA and helpers.choose_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert helpers.choose_device("auto") == CPU
    raises_one_line(lambda: helpers.choose_device("cuda"), "'cuda' is not available on this machine")
    raises_one_line(lambda: helpers.choose_device("tpu"), "device must be auto, cpu, cuda or mps")


def test_fp16_always_comes_with_its_scaler_and_the_others_never(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with warnings.catch_warnings():  # a GradScaler for CUDA on a machine without one warns
        warnings.simplefilter("ignore")
        for name in ("fp16", "auto"):
            precision = helpers.Precision(name, "cuda")
            assert precision.name == "fp16" and isinstance(precision.scaler, torch.amp.GradScaler)
    for name in ("fp32", "bf16"):
        assert helpers.Precision(name, CPU).scaler is None
    assert isinstance(helpers.Precision("fp16", CPU).scaler, torch.amp.GradScaler)
    with pytest.raises(TypeError, match="Precision\\('auto', device\\)"):
        helpers.OneCycleAdam(helpers.Net().parameter_groups(0.01), 10, "fp16")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_autocast_computes_in_the_named_precision_and_exact_fp32_turns_it_off(device, name):
    try:
        precision = helpers.Precision(name, device)
    except ValueError as error:  # bf16 on a T4, 16 bits on MPS: the policy's own refusal
        pytest.skip(str(error))
    layer = torch.nn.Conv2d(1, 4, 3).to(device)
    images = torch.randn(2, 1, 8, 8, device=device)
    with precision.autocast():
        assert layer(images).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        with helpers.exact_fp32(device):
            assert layer(images).dtype == torch.float32
    with helpers.Precision("fp32", device).autocast():
        assert layer(images).dtype == torch.float32


def test_exact_fp32_turns_tf32_off_on_cuda_and_back_on_after():
    """TF32 rounds fp32 convolutions' inputs to 10 fraction bits on Ampere and later GPUs;
    PyTorch allows it for cuDNN by default. The flags are plain settings, so no GPU is needed."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with warnings.catch_warnings():  # autocast for CUDA on a machine without one warns
            warnings.simplefilter("ignore")
            with helpers.exact_fp32(CUDA):
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def small_batch(device=CPU, count=16, outliers=4):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count + outliers, 1, 28, 28, generator=generator).to(device)
    labels, numbers = torch.randint(0, 10, (2, count), generator=generator).to(device)
    return helpers.Batch(images[:count], labels, numbers, images[count:])


class HostReads:
    """Counts every read of a tensor's value on the host (`.item()`, `bool()`, `float()`,
    `.tolist()`): each one makes the CPU wait for a GPU."""

    NAMES = ("item", "__bool__", "__float__", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))

    def _counted(self, original):
        def read(tensor, *args):
            self.count += 1
            return original(tensor, *args)
        return read


# ----------------------------------------------------------------------------- the T4's path, on the CPU
# fp16 autocast, its gradient scaler and fused Adam, as a T4 trains. The CPU runs fp16 slowly
# (emulated where it has no fp16 units), but through the same code: this proves our code on the
# T4's path, not the T4's own kernels, which only .ci/gpu-check runs.

def fp16_optimizer(model, steps=10):
    return helpers.OneCycleAdam(model.parameter_groups(0.01), steps, helpers.Precision("fp16", CPU))


def test_an_fp16_step_with_its_scaler_reads_nothing_back_on_the_host(monkeypatch):
    """GradScaler.step reads the overflow flag on the host unless the optimizer takes it on the
    device, as fused Adam does."""
    model = helpers.new_model(0)
    optimizer = fp16_optimizer(model)
    assert optimizer.precision.name == "fp16" and optimizer.adam.defaults["fused"]
    batch, before = small_batch(count=8, outliers=2), copy.deepcopy(model.state_dict())  # fp16 is slow here
    reads = HostReads(monkeypatch)
    for _ in range(2):
        losses = helpers.train_step(model, optimizer, batch, outlier_weight=0.1)
    assert reads.count == 0
    monkeypatch.undo()
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert 0 < optimizer.precision.scaler.get_scale() < float("inf")
    assert any(not torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def adam_steps(optimizer):
    return [float(state["step"]) for state in optimizer.adam.state.values()]


def test_an_fp16_step_whose_gradients_overflow_changes_no_weight():
    """With a scale so large that the fp16 gradients overflow, the scaler finds it, fused Adam
    skips the step (the weights and its step count stay), and the scale is halved."""
    model = helpers.new_model(0)
    optimizer = fp16_optimizer(model)
    helpers.train_step(model, optimizer, small_batch(count=8, outliers=2), 0.1)  # a normal step: Adam has state
    weights, steps = [p.detach().clone() for p in model.parameters()], adam_steps(optimizer)
    assert steps and set(steps) == {1.0}
    optimizer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    helpers.train_step(model, optimizer, small_batch(count=8, outliers=2), 0.1)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert adam_steps(optimizer) == steps
    assert optimizer.precision.scaler.get_scale() == 2.0 ** 39


def test_fp16_trains_end_to_end_and_its_checkpoint_reloads(train_slice, test_split, outliers, tmp_path):
    """A short `train` in fp16 (4 steps of 16: the CPU's fp16 backward is very slow), its
    history, and its checkpoint, which gives the same answers once reloaded."""
    model = helpers.new_model(0)
    recipe = helpers.Recipe(epochs=2, batch_size=16, outliers=2, precision="fp16")
    history = helpers.train(model, train_slice.first(32), test_split.first(200), recipe, outlier_bank=outliers, log=None)
    assert [record["precision"] for record in history] == ["fp16", "fp16"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = torch.tensor([record["step_losses"] for record in history])
    assert losses.shape == (2, 2, 2) and torch.isfinite(losses).all()
    checkpoints.save(model, tmp_path / "fp16.pt", history=history)
    again = checkpoints.load(tmp_path / "fp16.pt")
    assert torch.equal(helpers.evaluate(again, test_split.first(200)).digit_pred,
                       helpers.evaluate(model, test_split.first(200)).digit_pred)


@pytest.mark.parametrize("native_cpu, capability, cpu, cuda", [
    (True, (9, 0), ["bf16", "fp16"], ["bf16", "fp16"]),  # an AMX CPU; an H100
    (False, (8, 0), ["bf16", "fp16"], ["bf16", "fp16"]),  # Colab's CPU; an A100
    (False, (7, 5), ["bf16", "fp16"], ["fp16"]),  # a T4
    (False, (6, 0), ["bf16", "fp16"], []),  # Kaggle's P100
])
def test_the_16_bit_precisions_a_device_offers_follow_the_policy(monkeypatch, native_cpu, capability, cpu, cuda):
    """The one helper the notebooks' 16-bit cells call: never a precision the device refuses."""
    fake_cpu(monkeypatch, native_cpu)
    fake_gpu(monkeypatch, capability)
    assert helpers.half_precisions(CPU) == cpu and helpers.half_precisions(CUDA) == cuda
    assert helpers.half_precisions(MPS) == []
    for device in (CPU, CUDA):
        assert all(helpers.Precision(name, device).name == name for name in helpers.half_precisions(device))


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(trained, tmp_path, monkeypatch):
    """A file whose tensors say they were saved on a GPU, as torch.save writes them there: it
    loads on the CPU, with the same weights."""
    checkpoints.save(trained[0], tmp_path / "cpu.pt")
    checkpoint, path = torch.load(tmp_path / "cpu.pt", weights_only=True), tmp_path / "gpu.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, path)
    if not torch.cuda.is_available():  # the fake is real: without map_location it would not load
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded = checkpoints.load(path, "cpu")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(loaded.state_dict().values(), trained[0].state_dict().values()))


def test_the_line_heads_learn_ten_times_faster_than_the_digit_reader():
    for kind in helpers.SUM_HEADS:
        model = helpers.Net(sum_head=kind)
        groups = model.parameter_groups(0.02)
        assert [group["lr"] for group in groups] == pytest.approx(
            [0.02, 0.2 if isinstance(model.sum_head, helpers.LineHead) else 0.02]), kind
        assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    optimizer = helpers.OneCycleAdam(helpers.Net().parameter_groups(0.02), 100, helpers.Precision("fp32", CPU))
    for _ in range(30):  # the peak, where the one-cycle schedule has warmed up
        optimizer.adam.step()
        optimizer.schedule.step()
    assert [group["lr"] for group in optimizer.adam.param_groups] == pytest.approx([0.02, 0.2], rel=0.01)


def test_channels_last_gives_the_same_answers(trained, test_split):
    """`train` turns the weights channels_last on the CPU: a layout, not other values."""
    model = copy.deepcopy(trained[0]).eval()
    images, numbers = test_split.images[:200], test_split.numbers[:200]
    with torch.no_grad():
        answers = [model.to(memory_format=layout)(images.contiguous(memory_format=layout), numbers)
                   for layout in (torch.channels_last, torch.contiguous_format)]
    for last, plain in zip(*answers):
        assert torch.allclose(last, plain, atol=1e-4) and torch.equal(last.argmax(1), plain.argmax(1))


# ----------------------------------------------------------------------------- meta: no GPU needed
# torch runs no autocast and no scaler on meta, so these run in fp32; the 16-bit paths run for
# real on the CPU above and in tests/test_training.py, and on CUDA in .ci/gpu-check.

@pytest.mark.parametrize("sum_head", list(helpers.SUM_HEADS))
def test_forward_loss_and_train_step_stay_on_the_device(meta, sum_head):
    model = helpers.Net(sum_head=sum_head).to(meta)
    batch = small_batch(meta)
    digits, sums = model(batch.images, batch.numbers)
    assert digits.device == sums.device == meta and sums.shape == (16, 19)
    optimizer = helpers.OneCycleAdam(model.parameter_groups(0.01), 10, helpers.Precision("fp32", meta))
    loss = helpers.train_step(model, optimizer, batch, 0.25)
    assert loss.device == meta and all(p.device == meta for p in model.parameters())


def test_training_and_evaluation_stay_on_the_device(meta, train_slice, test_split, outliers):
    """`train` with augmentation, outliers and a hold-out, in fp32, then every evaluation the
    notebooks show, with the splits and the model on the stand-in GPU."""
    train, test = on(meta, train_slice.first(64)), on(meta, test_split.first(32))
    recipe = helpers.Recipe(epochs=1, batch_size=16, outliers=2, holdout=helpers.HOLDOUT_PAIRS, precision="fp32")
    model = helpers.new_model(0, meta)
    history = helpers.train(model, train, test, recipe, outlier_bank=outliers[:32], log=None)
    assert len(history) == 1 and history[0]["precision"] == "fp32"
    assert all(p.device == meta for p in model.parameters())
    assert helpers.evaluate(model, test).count == 32
    every = helpers.evaluate_all_numbers(model, test)
    assert every["pair_counts"].shape == (10, 10)
    assert helpers.digit_logits_of(model, test).device == meta


def test_training_refuses_a_model_or_a_test_split_on_another_device(meta, train_slice, test_split):
    train, test = train_slice.first(64), test_split.first(32)
    with pytest.raises(ValueError, match="test split on meta"):
        helpers.train(helpers.Net(), train, on(meta, test), log=None)
    with pytest.raises(ValueError, match="the model is on meta but the splits on cpu.*model.to"):
        helpers.train(helpers.Net().to(meta), train, test, log=None)


@pytest.mark.parametrize("kind", list(helpers.SUM_HEADS))
def test_sum_head_helpers_stay_on_the_device(meta, kind):
    """Heads trained alone on frozen logits, scored per pair and with scrambled labels."""
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
    answer = inference.answer(model, raw_test[0], 3)
    assert answer.digit_probs.shape == (10,) and answer.sum_probs.shape == (19,)
    assert answer.digit_probs.device.type == "cpu"
    assert inference.read_pictures(model, raw_test[:4], [1, 2, 3, 4])[0].shape == (4, 10)


def test_the_outlier_bank_and_the_distortions_live_on_the_device(meta, train_slice, outliers):
    data = helpers.TrainingData(on(meta, train_slice.first(256)), helpers.Recipe(batch_size=32, outliers=4), outliers[:32])
    assert data.outliers.device == meta and data.outliers.shape == (32, 1, 28, 28)
    batch = next(data.epoch())
    assert batch.outliers.device == meta and batch.outliers.shape == (4, 1, 28, 28)
    assert batch.images.device == meta


# ----------------------------------------------------------------------------- each GPU here

@pytest.fixture(params=["cuda", "mps"])
def gpu(request):
    """Each GPU this machine has (the CPU's own tests are the rest of the suite)."""
    if not _gpu_available(request.param):
        pytest.skip(f"no {request.param} device here")
    return torch.device(request.param)


def _gpu_available(name):
    if name == "cuda":
        return torch.cuda.is_available()
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def test_an_epoch_is_drawn_the_same_on_the_gpu_as_on_the_cpu(gpu, train_slice, outliers):
    """The seed fixes the order, the numbers, the distortions and the outliers, wherever the
    split lives: they are drawn on the CPU and copied once an epoch."""
    recipe = helpers.Recipe(batch_size=32, outliers=4, holdout=helpers.HOLDOUT_PAIRS)
    split = train_slice.first(96)
    on_cpu = list(helpers.TrainingData(split, recipe, outliers[:64]).epoch())
    here = list(helpers.TrainingData(on(gpu, split), recipe, outliers[:64]).epoch())
    assert len(on_cpu) == len(here) == 3
    for a, b in zip(on_cpu, here):
        assert b.images.device.type == gpu.type and b.outliers.device.type == gpu.type
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.numbers, b.numbers.cpu())
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-4)
        assert torch.allclose(a.outliers, b.outliers.cpu(), atol=1e-4)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_training_learns_on_the_gpu_in_each_precision(gpu, name, train_slice, test_split):
    try:
        helpers.Precision(name, gpu)
    except ValueError as error:
        pytest.skip(str(error))
    model = helpers.new_model(0, gpu)
    recipe = helpers.Recipe(epochs=2, batch_size=64, precision=name)
    history = helpers.train(model, on(gpu, train_slice.first(4000)), on(gpu, test_split.first(1000)),
                            recipe, log=None)
    assert history[-1]["precision"] == name
    assert history[-1]["digit_acc"] >= 0.9, history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(p.dtype == torch.float32 and p.device.type == gpu.type for p in model.parameters())


def syncs_in_an_epoch(batches, name, train_slice, test_split, outliers):
    """How often one epoch of `train`, whole (its batches drawn and distorted, its steps, its
    test line), makes the host wait for the GPU, counted by CUDA's sync debug mode."""
    recipe = helpers.Recipe(epochs=1, batch_size=64, precision=name)
    train, test = on(CUDA, train_slice.first(64 * batches)), on(CUDA, test_split.first(500))
    helpers.train(helpers.new_model(0, CUDA), train, test, recipe, outlier_bank=outliers, log=None)  # warm-up
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            helpers.train(helpers.new_model(0, CUDA), train, test, recipe, outlier_bank=outliers, log=None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_no_training_step_waits_for_the_gpu(name, train_slice, test_split, outliers):
    """An epoch of 16 batches and one of 80 (two chunks of distorted images) wait as often: only
    at the epoch's end, for its losses and its test line, never once per step or per chunk."""
    if not torch.cuda.is_available():
        pytest.skip("no cuda device here")
    try:
        helpers.Precision(name, CUDA)
    except ValueError as error:
        pytest.skip(str(error))
    counts = [syncs_in_an_epoch(batches, name, train_slice, test_split, outliers) for batches in (16, 80)]
    assert counts[0] == counts[1], counts


def test_predict_takes_a_picture_and_a_model_on_the_gpu(gpu, trained, raw_test):
    model = copy.deepcopy(trained[0])
    expected = predict(model, raw_test[0], 4)
    model.to(gpu)
    assert predict(model, raw_test[0].to(gpu), 4) == expected
    answer = inference.answer(model, raw_test[0].to(gpu), 4)
    assert answer.digit_probs.device.type == "cpu"  # answers come back to the CPU, as documented


def test_a_checkpoint_saved_from_the_gpu_loads_on_the_cpu(gpu, trained, tmp_path):
    model = copy.deepcopy(trained[0]).to(gpu)
    checkpoints.save(model, tmp_path / "gpu.pt")
    loaded = checkpoints.load(tmp_path / "gpu.pt", "cpu")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_sum_head_trains_on_the_gpu(gpu, trained, train_slice, test_split):
    model = copy.deepcopy(trained[0]).to(gpu)
    logits = helpers.digit_logits_of(model, on(gpu, train_slice))
    test = on(gpu, test_split.first(1000))
    head = helpers.train_sum_head("adder", logits, train_slice.labels.to(gpu), helpers.Recipe(epochs=3))
    assert helpers.sum_accuracy(head, helpers.digit_logits_of(model, test), test.labels, test.numbers) >= 0.85
