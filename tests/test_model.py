"""The model: the reference's layers, 19 sum classes, and sum heads that add or memorise."""
import pytest
import torch
import torch.nn.functional as F

import helpers

# The reference's image path: (name, in, out, kernel, padding).
REFERENCE_LAYERS = [("conv1", 1, 32, 3, 1), ("conv2", 32, 64, 3, 1), ("pintconv1", 64, 16, 1, 0),
                    ("conv3", 16, 32, 3, 1), ("conv4", 32, 64, 3, 1), ("pintconv2", 64, 16, 1, 0),
                    ("conv5", 16, 32, 3, 0), ("conv6", 32, 64, 3, 0), ("conv7", 64, 10, 3, 0)]


@pytest.mark.parametrize("batch_norm, sum_head", [(True, "adder"), (True, "logits"),
                                                   (False, "logits"), (True, "probs"),
                                                   (True, "number_line")])
def test_net_follows_the_reference_with_19_sum_classes(batch_norm, sum_head):
    model = helpers.Net(batch_norm=batch_norm, sum_head=sum_head).eval()
    digits, sums = model(torch.randn(5, 1, 28, 28), torch.tensor([0, 9, 3, 9, 1]))
    assert digits.shape == (5, 10) and sums.shape == (5, 19)
    assert torch.allclose(sums.exp().sum(1), torch.ones(5)) and torch.allclose(digits.exp().sum(1), torch.ones(5))
    reader = model.digit_reader
    for name, cin, cout, kernel, padding in REFERENCE_LAYERS:
        layer = getattr(reader, name)
        assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.padding) == \
            (cin, cout, (kernel, kernel), (padding, padding)), name
    assert isinstance(reader.pool1, torch.nn.MaxPool2d) and isinstance(reader.pool2, torch.nn.MaxPool2d)
    has_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_norm == batch_norm
    if sum_head in ("logits", "probs"):  # the reference's fc1 (20 -> 128) and fc2, with 19 outputs
        head = model.sum_head
        assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (20, 128, 19)


def test_unknown_sum_head_is_refused():
    with pytest.raises(ValueError, match="sum_head must be one of"):
        helpers.Net(sum_head="lookup")


def test_the_adder_mixes_the_sums_of_every_digit_it_may_see():
    """p(s | image, n) = sum over d of p(d | image) q(s | d, n), with q a softmax over the sums
    of -k (x_d + y_n - z_s)^2: written out here term by term."""
    torch.manual_seed(0)
    head = helpers.AdderHead()
    logits, numbers = torch.randn(4, 10), torch.tensor([0, 3, 9, 5])
    with torch.no_grad():
        got = head(logits, F.one_hot(numbers, 10).float()).exp()
        k = head.log_sharpness.exp()
        for row in range(4):
            expected = torch.zeros(19)
            for digit in range(10):
                total = head.digit_position[digit] + head.number_position[numbers[row]]
                expected += logits[row].softmax(0)[digit] * (-k * (total - head.sum_position) ** 2).softmax(0)
            assert torch.allclose(got[row], expected, atol=1e-6)


def test_the_adders_training_loss_bounds_the_mixtures_from_above():
    """Jensen: the average over digits of -log q(s | d, n) is at least -log of the mixture."""
    torch.manual_seed(1)
    head = helpers.AdderHead()
    logits, numbers, sums = torch.randn(64, 10), torch.randint(0, 10, (64,)), torch.randint(0, 19, (64,))
    one_hot = F.one_hot(numbers, 10).float()
    with torch.no_grad():
        bound = float(head.training_loss(logits, one_hot, sums))
        mixture = float(F.nll_loss(head(logits, one_hot), sums))
        assert bound > mixture
        certain = 50.0 * F.one_hot(logits.argmax(1), 10)  # one digit for sure: bound and mixture meet
        assert float(head.training_loss(certain, one_hot, sums)) == pytest.approx(
            float(F.nll_loss(head(certain, one_hot), sums)), rel=1e-4)


@pytest.mark.parametrize("sum_head, generalizes", [("logits", False), ("probs", False),
                                                    ("number_line", True), ("adder", True)])
def test_sum_head_on_held_out_pairs(sum_head, generalizes):
    """The digit given exactly, only the sum head trains, on the 90 seen pairs; then the 10 held out.

    The fc heads memorise the pairs; the line heads add (the notebook's finding).
    """
    torch.manual_seed(0)
    head = helpers._make_sum_head(sum_head)
    grid = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    digits, numbers = (values.flatten() for values in grid)
    sums, logits = digits + numbers, 20.0 * F.one_hot(digits, 10)
    one_hot = F.one_hot(numbers, 10).float()
    seen = ~helpers._pairs_table(helpers.HOLDOUT_PAIRS)[digits, numbers]
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(1500):
        loss = head.training_loss(logits[seen], one_hot[seen], sums[seen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        correct = head(logits, one_hot).argmax(1) == sums
    assert correct[seen].all()
    held_out = correct[~seen].float().mean()
    assert held_out == 1.0 if generalizes else held_out < 0.5


class DigitPlusNumberHead(helpers.SumHead):
    """A head that hard-codes the sum as digit + number: what the scramble test must catch."""

    def log_probs(self, digit_logits, one_hot):
        total = digit_logits.argmax(1) + one_hot.argmax(1)
        return torch.log(F.one_hot(total, 19).float().clamp(min=1e-9))


def test_nothing_hard_codes_the_sum(trained, train_slice, test_split):
    """Scramble the 19 sum classes: the adder, trained alone on frozen digit logits, reads the
    scrambled labels as well as the true ones, since its positions are free. A head that
    computes digit + number cannot."""
    model, _ = trained
    recipe = helpers.Recipe(epochs=10, seed=0)  # 630 steps on 8,000 images: about a second
    train_logits = helpers.digit_logits_of(model, train_slice)
    test = test_split.first(1000)
    test_logits = helpers.digit_logits_of(model, test)
    scramble = torch.randperm(19, generator=torch.Generator().manual_seed(5))
    assert (scramble != torch.arange(19)).sum() >= 17

    def accuracy(head, classes):
        return helpers.sum_accuracy(head, test_logits, test.labels, test.numbers, classes)

    identity = torch.arange(19)
    true = helpers.train_sum_head("adder", train_logits, train_slice.labels, recipe)
    scrambled = helpers.train_sum_head("adder", train_logits, train_slice.labels, recipe, scramble)
    assert accuracy(true, identity) > 0.9
    assert abs(accuracy(scrambled, scramble) - accuracy(true, identity)) <= 0.01
    assert accuracy(true, scramble) < 0.2 and accuracy(scrambled, identity) < 0.2
    cheat = DigitPlusNumberHead()
    assert accuracy(cheat, identity) > 0.9 and accuracy(cheat, scramble) < 0.2


class ProbsTableHead(helpers.SumHead):
    """A head a student might write (exercise 2): fc layers on the digit's probabilities and
    the one-hot number."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 19))

    def log_probs(self, digit_logits, one_hot):
        return F.log_softmax(self.table(torch.cat([digit_logits.softmax(1), one_hot], 1)), 1)


def test_train_sum_head_trains_a_head_of_your_own(trained, train_slice, test_split):
    model, _ = trained
    head = ProbsTableHead()
    untrained = [p.detach().clone() for p in head.parameters()]
    test = test_split.first(1000)
    trained_head = helpers.train_sum_head(head, helpers.digit_logits_of(model, train_slice),
                                          train_slice.labels, helpers.Recipe(epochs=3, seed=0))
    assert trained_head is head
    assert not all(torch.equal(a, b) for a, b in zip(untrained, head.parameters()))
    test_logits = helpers.digit_logits_of(model, test)
    assert helpers.sum_accuracy(head, test_logits, test.labels, test.numbers) > 0.8


def test_one_hot_numbers_give_the_same_output():
    model = helpers.Net().eval()
    images, numbers = torch.randn(4, 1, 28, 28), torch.tensor([2, 9, 0, 5])
    by_index = model(images, numbers)
    by_one_hot = model(images, F.one_hot(numbers, 10).float())
    assert all(torch.equal(a, b) for a, b in zip(by_index, by_one_hot))
    with pytest.raises(ValueError, match="numbers must be"):
        model(images, numbers.float())


@pytest.mark.parametrize("sum_head", ["adder", "logits"])
def test_every_sum_from_0_to_18_is_a_class_and_trains(sum_head):
    """9 + 9 = 18 needs the 19th class, the reference's missing one. Four pairs with four
    different sums, 0 and 18 among them, so that a head answering one sum always fails."""
    model = helpers.new_model(0, sum_head=sum_head)
    optimizer = helpers.OneCycleAdam(model.parameter_groups(1e-2), 60, helpers.Precision("fp32", "cpu"))
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([9, 0, 4, 8]).repeat_interleave(4)
    numbers = torch.tensor([9, 0, 3, 9]).repeat_interleave(4)
    for _ in range(60):
        helpers.train_step(model, optimizer, helpers.Batch(images, labels, numbers))
    sums = model.eval()(images, numbers)[1].argmax(1)
    assert sums.tolist() == (labels + numbers).tolist() and set(sums.tolist()) == {18, 0, 7, 17}


def test_layer_shapes_count_every_parameter(test_split):
    for sum_head in helpers.SUM_HEADS:
        model = helpers.Net(sum_head=sum_head)
        rows = helpers.layer_shapes(model, test_split.images[:2], test_split.numbers[:2])
        assert sum(params for _, _, params in rows) == sum(p.numel() for p in model.parameters())
        assert rows[0] == ("conv1", (2, 32, 28, 28), 288)
        assert rows[-1][:2] == ("sum_head", (2, 19))
