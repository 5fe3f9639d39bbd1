"""Training: augmentation, outlier exposure, seeds, the recipe, and evaluation."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
import pictures
from conftest import ROOT


def distorted(images, seed, strength=1.0):
    return helpers.augment(images, helpers.draw_distortions(len(images), torch.Generator().manual_seed(seed), strength))


def test_augment_distorts_every_image_and_zero_strength_is_the_identity(test_split):
    images = test_split.images[:64]
    same = distorted(images, 0, strength=0.0)
    assert same.shape == images.shape and torch.allclose(same, images, atol=1e-5)
    first, other = distorted(images, 1), distorted(images, 2)
    assert first.shape == images.shape and not torch.allclose(first, other)
    moved = (first - images).abs().flatten(1).amax(1)
    assert (moved > 0.5).float().mean() > 0.9  # nearly every image changes visibly
    paper = helpers.normalize(torch.tensor(0.0))
    assert torch.allclose(first[:, :, 0, 0], paper.expand(64, 1), atol=1e-4)  # corners stay paper
    assert first.min() >= paper - 1e-4 and first.max() <= images.max() + 1e-4  # no new extremes


def test_a_quarter_turn_distortion_turns_the_image(test_split):
    """One row of `draw_distortions`, written by hand: 90 degrees, no scaling, no shift, no
    stroke change, no softening. The warp must turn the digit exactly (the grid lines up, pixel
    for pixel)."""
    image = test_split.images[:1]
    quarter = torch.tensor([[np.pi / 2, 1.0, 0.0, 0.0, 0.99, 0.0, 0.0]])
    turned = helpers.augment(image, quarter)
    assert any(torch.allclose(turned, image.rot90(k, (2, 3)), atol=1e-4) for k in (1, -1))


def test_distortions_come_from_the_generator_alone(test_split):
    """The same seed gives the same distortions whatever the global random state, and drawing
    them leaves the global state alone."""
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = helpers.draw_distortions(64, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    assert torch.equal(first, helpers.draw_distortions(64, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, helpers.draw_distortions(64, torch.Generator().manual_seed(6)))


def test_max3x3_is_max_pool():
    images = torch.randn(5, 1, 28, 28)
    assert torch.equal(helpers._max3x3(images), torch.nn.functional.max_pool2d(images, 3, 1, 1))


def augment_as_written(images, distortions):
    """What `augment` does, written plainly, one image at a time: the warp, then the stroke
    change (thicker: towards the 3 x 3 max; thinner: the min; by `weight`), then, if chosen,
    the softening (a 3 x 3 mean of the intensities, its strongest back to full)."""
    paper, out = float(helpers.normalize(torch.tensor(0.0))), []
    for image, (angle, scale, dx, dy, pick, weight, soft) in zip(images, distortions.tolist()):
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        theta = torch.tensor([[[cos, -sin, dx / 14], [sin, cos, dy / 14]]], dtype=torch.float32)
        grid = torch.nn.functional.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
        warped = torch.nn.functional.grid_sample(image[None] - paper, grid, align_corners=False) + paper
        pool = torch.nn.functional.max_pool2d
        target = pool(warped, 3, 1, 1) if pick < 1 / 4 else -pool(-warped, 3, 1, 1) if pick < 7 / 12 else warped
        changed = warped + weight * (target - warped)
        if soft:
            ink = torch.nn.functional.avg_pool2d(helpers.denormalize(changed), 3, 1, 1, count_include_pad=False)
            changed = helpers.normalize(ink / ink.max())
        out.append(changed[0])
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(3))
def test_augment_does_what_it_says_to_every_image(test_split, seed):
    """The batched, lean `augment` against the plain one-image-at-a-time version above: every
    kind of stroke change and the softening, on 64 test images."""
    images = test_split.images[:64]
    distortions = helpers.draw_distortions(64, torch.Generator().manual_seed(seed))
    assert 0 < distortions[:, 6].sum() < 64  # some softened, some not
    assert torch.allclose(helpers.augment(images, distortions), augment_as_written(images, distortions), atol=1e-4)


def test_each_random_choice_has_a_stream_of_its_own_for_every_seed():
    """The weights' start, the pictures of no digit, the order, the numbers, the augmentation and
    the outliers of seeds 0 to 4 are 30 different streams: with generators seeded seed, seed + 1
    and seed + 2, seed 1's order would repeat seed 0's augmentation."""
    firsts = {(seed, name): tuple(torch.rand(4, generator=generator).tolist())
              for seed in range(5) for name, generator in helpers.random_streams(seed).items()}
    assert len(set(firsts.values())) == len(firsts) == 5 * len(helpers.STREAMS) == 30
    with torch.random.fork_rng():  # the weights' start is not the global generator seeded with the seed
        torch.manual_seed(0)
        assert not torch.equal(helpers.Net().digit_reader.conv1.weight, helpers.new_model(0).digit_reader.conv1.weight)
    again = helpers.random_streams(3)["augment"]
    assert tuple(torch.rand(4, generator=again).tolist()) == firsts[(3, "augment")]


def test_training_needs_neither_opencv_nor_pictures(tmp_path, data_dir):
    """helpers.py imports neither, and `train` with its defaults runs where OpenCV is missing
    (the import of cv2 fails in this run), without outlier exposure, saying so."""
    for name in ("helpers",):
        source = (ROOT / f"{name}.py").read_text()
        assert "import cv2" not in source and "import pictures" not in source and "from pictures" not in source
    script = (f"import sys; sys.modules['cv2'] = None; sys.path.insert(0, {str(ROOT)!r})\n"
              "import helpers as h\n"
              f"train, test = h.load_split(True, root={str(data_dir)!r}, limit=256), "
              f"h.load_split(False, root={str(data_dir)!r}, limit=100)\n"
              "history = h.train(h.new_model(0), train, test, h.Recipe(epochs=1, batch_size=64))\n"
              "assert 'cv2' not in sys.modules or sys.modules['cv2'] is None and 'pictures' not in sys.modules\n"
              "print('epochs', len(history))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "training without outlier exposure" in done.stdout and "epochs 1" in done.stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_is_repeated_by_its_seed_alone(train_slice, test_split, precision):
    """Two runs from the same weights and recipe seed, under different global random states,
    give the same metrics, in fp32 and in bf16 (emulated where the CPU lacks it); a different
    recipe seed does not. Anything drawn from the global generator would tell the first two
    apart. The weights stay fp32 whatever the precision."""
    start = helpers.new_model(3).state_dict()
    runs = []
    for global_seed, recipe_seed in ((10, 3), (11, 3), (10, 4)):
        model = helpers.Net()
        model.load_state_dict(start)
        torch.manual_seed(global_seed)
        recipe = helpers.Recipe(epochs=1, batch_size=64, seed=recipe_seed, precision=precision)
        history = helpers.train(model, train_slice.first(320), test_split.first(200), recipe,
                                log=None)
        runs.append({key: value for key, value in history[0].items() if key != "train_seconds"})
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert runs[0] == runs[1] and runs[0]["train_loss"] != runs[2]["train_loss"]
    assert runs[0]["precision"] == precision


@pytest.mark.parametrize("seed", range(8))
def test_outliers_are_seeded_framed_pictures_with_ink(train_slice, seed):
    digits = helpers.denormalize(train_slice.images[:500, 0]).clamp(0, 1)
    first = pictures.draw_outliers(300, torch.Generator().manual_seed(seed), digits)
    again = pictures.draw_outliers(300, torch.Generator().manual_seed(seed), digits)
    assert first.shape == (300, 28, 28) and torch.equal(first, again)
    intensities = first
    assert intensities.min() >= -1e-6 and intensities.max() <= 1 + 1e-6
    strongest = intensities.flatten(1).amax(1)
    assert (strongest > 0.25).all(), strongest.min()  # none blank, whatever the seed
    assert (strongest > 0.5).float().mean() > 0.9
    assert (intensities[:, :3].amax((1, 2)) == 0).float().mean() > 0.5  # framed: margins empty
    rows, cols, grid = intensities.sum(2), intensities.sum(1), torch.arange(28.0)
    centre = torch.stack([(rows * grid).sum(1) / rows.sum(1), (cols * grid).sum(1) / cols.sum(1)], 1)
    assert (centre.mean(0) - 14).abs().max() < 0.1  # centred by mass as MNIST's digits: at 14.0


def test_outliers_and_pictures_share_one_framing(raw_test):
    """An MNIST digit put through the outliers' framing (which softens it first, as a photo's
    edges are soft) comes back framed as the preparation frames it: the same box, the same
    centre, nearly the same picture."""
    digit = raw_test[0].float() / 255
    outlier = pictures._frame_outliers(torch.nn.functional.pad(digit, (2, 2, 2, 2))[None])[0]
    prepared = pictures.preparation_steps(raw_test[0])["framed"]
    for framed in (outlier, prepared):
        rows, cols = (framed > 0.05).nonzero(as_tuple=True)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (20, 21, 22)
        mass = [float((framed.sum(axis) * torch.arange(28.0)).sum() / framed.sum()) for axis in (1, 0)]
        assert all(abs(m - 14) <= 0.6 for m in mass), mass
    assert torch.nn.functional.cosine_similarity(outlier.flatten(), prepared.flatten(), dim=0) > 0.8


def test_outliers_ride_along_without_reaching_the_sum_head(train_slice, outliers):
    recipe = helpers.Recipe(batch_size=32, outliers=4)
    batch = next(helpers.TrainingData(train_slice.first(64), recipe, outliers).epoch())
    assert batch.images.shape == (32, 1, 28, 28) and batch.outliers.shape == (4, 1, 28, 28)
    for plain in (helpers.TrainingData(train_slice.first(64), helpers.Recipe(batch_size=32, outliers=0), outliers),
                  helpers.TrainingData(train_slice.first(64), recipe)):  # none asked for, or none given
        first = next(plain.epoch())
        assert first.outliers is None and torch.equal(first.labels, batch.labels)  # the same order
    assert float(helpers.outlier_loss(torch.zeros(3, 10))) == pytest.approx(np.log(10))  # no preference
    assert float(helpers.outlier_loss(torch.eye(3, 10) * 10)) > 5
    model = helpers.new_model(0)
    optimizer = helpers.OneCycleAdam(model.parameter_groups(0.01), 10, helpers.Precision("fp32", "cpu"))
    seen, sum_loss = [], model.sum_head.training_loss
    model.sum_head.training_loss = lambda logits, *rest: seen.append(len(logits)) or sum_loss(logits, *rest)
    helpers.train_step(model, optimizer, batch, outlier_weight=0.25)
    assert seen == [32]  # the digits only


def test_each_epoch_draws_its_outliers_from_one_bank_made_before_the_first(train_slice, outliers):
    """The bank is made once, before training (`pictures.draw_outliers`); each epoch draws from
    it afresh, turned or flipped by one of the square's 8 symmetries."""
    data = helpers.TrainingData(train_slice.first(320), helpers.Recipe(batch_size=32, outliers=8), outliers[:80])
    bank = data.outliers
    assert bank.shape == (80, 1, 28, 28) and torch.equal(bank, helpers.normalize(outliers[:80])[:, None])
    symmetries = torch.stack([moved for flipped in (bank, bank.flip(-1)) for upright in (flipped, flipped.flip(-2))
                              for moved in (upright, upright.transpose(-1, -2))])  # [8, 80, 1, 28, 28]
    epochs = [torch.cat([batch.outliers for batch in data.epoch()]) for _ in range(2)]
    for drawn in epochs:
        assert drawn.shape == (80, 1, 28, 28)
        found = (drawn[None, None] == symmetries[:, :, None]).flatten(3).all(3)  # [8, 80 bank, 80 drawn]
        assert found.any(1).any(0).all()  # every outlier drawn is a bank picture, maybe moved
        assert found.any(1).sum(1).gt(0).sum() >= 4  # and the moves vary
    assert not torch.equal(epochs[0], epochs[1])


def test_training_stops_between_two_steps_when_asked(train_slice, test_split):
    """`stop_requested` is asked after every step: training returns the epochs it finished."""
    split, test = train_slice.first(256), test_split.first(100)
    recipe = helpers.Recipe(epochs=3, batch_size=64, outliers=0, precision="fp32")
    steps = []

    def after(count):
        return lambda: steps.append(1) or len(steps) >= count

    model = helpers.new_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    assert helpers.train(model, split, test, recipe, log=None, stop_requested=after(2)) == []
    assert len(steps) == 2 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    steps.clear()
    history = helpers.train(helpers.new_model(0), split, test, recipe, log=None,
                            stop_requested=after(6))  # 4 steps an epoch: stops in the second
    assert [record["epoch"] for record in history] == [1] and len(steps) == 6


def test_short_training_learns_both_heads(trained):
    """3 epochs on 8,000 images in fp32 (the shared fixture) read 98.6 % of digits and 96.1 %
    of sums on 1,000 test pairs when written (chance: 10 % and about 9 %)."""
    _, history = trained
    assert [record["epoch"] for record in history] == [1, 2, 3]
    final = history[-1]
    assert final["digit_acc"] >= 0.97 and final["sum_acc"] >= 0.92 and final["consistency"] >= 0.92, final
    assert final["train_loss"] < history[0]["train_loss"] and final["loss"] < history[0]["loss"]
    steps = torch.tensor(final["step_losses"])  # 125 full steps of 64 of the 8,000 images
    assert steps.shape == (125, 2) and (steps > 0).all()
    assert final["train_loss"] == pytest.approx(float(steps.mean()), rel=1e-5)
    assert steps[-25:].mean(0).lt(torch.tensor(history[0]["step_losses"][:25]).mean(0)).all()


@pytest.mark.parametrize("setting, message", [
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"outliers": -1}, "outliers must be at least 0, got -1"),
    ({"lr": 0.0}, "lr must be above 0 and finite, got 0.0"),
    ({"lr": float("nan")}, "lr must be above 0 and finite, got nan"),
    ({"lr": float("inf")}, "lr must be above 0 and finite, got inf"),
    ({"augment": -1.0}, "augment must be at least 0 and finite, got -1.0"),
    ({"outlier_weight": float("nan")}, "outlier_weight must be at least 0 and finite, got nan"),
    ({"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
    ({"batch_size": True}, "batch_size must be a whole number, got True"),
    ({"outliers": 2.5}, "outliers must be a whole number, got 2.5"),
], ids=lambda value: str(value) if isinstance(value, dict) else "")
def test_recipe_names_the_setting_it_rejects(setting, message):
    with pytest.raises(ValueError) as error:
        helpers.Recipe(**setting)
    assert str(error.value) == message


def test_train_rejects_a_test_split_without_numbers_before_training(train_slice):
    with pytest.raises(ValueError, match="fixed numbers"):
        helpers.train(helpers.Net(), train_slice, train_slice, log=None)


def test_evaluate_counts_and_average_loss(trained, test_split):
    model, _ = trained
    split = test_split.first(700)
    result = helpers.evaluate(model, split, batch_size=128)
    with torch.no_grad():  # batches of 128 too: a convolution's last bits depend on the batch
        parts = [model.eval()(split.images[i:i + 128], split.numbers[i:i + 128]) for i in range(0, 700, 128)]
    digits, sums = (torch.cat(part) for part in zip(*parts))
    digit_pred, sum_pred = digits.argmax(1), sums.argmax(1)
    assert result.digit_correct == int((digit_pred == split.labels).sum())
    assert result.sum_correct == int((sum_pred == split.sums).sum())
    assert result.both_correct == int(((digit_pred == split.labels) & (sum_pred == split.sums)).sum())
    assert result.consistent == int((sum_pred == digit_pred + split.numbers).sum())
    assert torch.equal(result.digit_confusion, torch.bincount(split.labels * 10 + digit_pred, minlength=100).view(10, 10))
    assert result.sum_confusion.shape == (19, 19) and result.sum_confusion.trace() == result.sum_correct
    digit_loss = float(torch.nn.functional.nll_loss(digits, split.labels))  # averages, not sums
    sum_loss = float(torch.nn.functional.nll_loss(sums, split.sums))
    expected = (digit_loss + sum_loss) / 2
    assert (result.digit_loss, result.sum_loss, result.loss) == pytest.approx((digit_loss, sum_loss, expected), rel=1e-4)
    assert result.test_line() == (f"Test set: Average loss: {expected:.4f}, Digit accuracy: "
                                  f"{result.digit_correct}/700 ({result.digit_correct / 7:.2f}%), Sum accuracy: "
                                  f"{result.sum_correct}/700 ({result.sum_correct / 7:.2f}%)")


def test_evaluate_uses_the_logits_it_is_given(trained, test_split):
    model, _ = trained
    split = test_split.first(300)
    logits = helpers.digit_logits_of(model, split)
    given, computed = helpers.evaluate(model, split, logits=logits), helpers.evaluate(model, split)
    assert given.summary() == computed.summary() and torch.equal(given.sum_pred, computed.sum_pred)
    wrong = logits.roll(1, dims=1)  # every digit moved on by one: the counts must follow the logits given
    assert helpers.evaluate(model, split, logits=wrong).digit_correct != helpers.evaluate(model, split).digit_correct


def test_evaluate_all_numbers_matches_pairwise_and_held_out_parts_add_up(trained, test_split):
    model, _ = trained
    split = test_split.first(300)
    every = helpers.evaluate_all_numbers(model, split)
    assert every["pair_counts"].sum() == 3000 and len(every["per_number"]) == 10
    for number in range(10):  # the head-only shortcut agrees with the whole model
        fixed = helpers.Split(split.images, split.labels, torch.full_like(split.labels, number))
        assert every["per_number"][number] == pytest.approx(helpers.evaluate(model, fixed).sum_correct / 300)
    parts = helpers.held_out_accuracy(every, helpers.HOLDOUT_PAIRS)
    assert parts["held_out_count"] + parts["seen_count"] == 3000
    table = helpers._pairs_table(helpers.HOLDOUT_PAIRS)
    assert parts["held_out_count"] == int(every["pair_counts"][table].sum())
    weighted = (parts["held_out_acc"] * parts["held_out_count"] + parts["seen_acc"] * parts["seen_count"]) / 3000
    assert weighted == pytest.approx(every["sum_acc"])
