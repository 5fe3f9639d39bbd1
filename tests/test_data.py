"""The data: random numbers 0..9, the per-sample Dataset, the fixed test numbers, hold-outs."""
import pytest
import torch

import helpers


def test_numbers_are_torch_randint_over_0_to_9_both_included():
    numbers = helpers.draw_numbers(60000, seed=1)
    assert torch.equal(numbers, torch.randint(0, 10, (60000,), generator=torch.Generator().manual_seed(1)))
    counts = torch.bincount(numbers, minlength=11)
    assert counts[10] == 0 and ((5700 < counts[:10]) & (counts[:10] < 6300)).all(), counts  # 6,000 each
    assert torch.equal(numbers, helpers.draw_numbers(60000, seed=1))
    assert not torch.equal(numbers, helpers.draw_numbers(60000, seed=2))


def test_dataset_item_is_image_label_one_hot_sum(data_dir, raw_mnist):
    dataset = helpers.DigitPlusNumber(helpers.load_mnist(False, root=data_dir), seed=3)
    assert torch.equal(dataset.numbers, helpers.draw_numbers(10000, seed=3))
    for index in range(50):
        image, label, one_hot, total = dataset[index]
        number = int(dataset.numbers[index])
        assert torch.allclose(image[0], helpers.normalize(raw_mnist.data[index].float() / 255))
        assert label == raw_mnist.targets[index]
        assert torch.equal(one_hot, torch.nn.functional.one_hot(torch.tensor(number), 10).float())
        assert total == label + number


def test_test_numbers_are_fixed_and_match_the_dataset(data_dir, test_split):
    """The fixed draw itself, so that a changed seed or generator shows: its first numbers,
    their total and their counts, as drawn once and written down here."""
    numbers = test_split.numbers
    assert numbers[:12].tolist() == [2, 0, 4, 0, 3, 0, 0, 1, 3, 9, 7, 4]
    assert int(numbers.sum()) == 44688
    assert torch.bincount(numbers).tolist() == [1058, 989, 991, 1019, 967, 1003, 1019, 987, 949, 1018]
    assert torch.equal(helpers.load_split(False, root=data_dir, limit=500).numbers, numbers[:500])
    assert torch.equal(helpers.DigitPlusNumber(helpers.load_mnist(False, root=data_dir)).numbers, numbers)
    assert torch.equal(test_split.sums, test_split.labels + numbers)


def test_a_training_split_has_no_fixed_sums(train_slice):
    assert train_slice.numbers is None
    with pytest.raises(ValueError, match="no fixed sums"):
        _ = train_slice.sums


def test_training_numbers_are_fresh_every_epoch_and_uniform(train_slice):
    generator = torch.Generator().manual_seed(0)
    first = helpers.draw_training_numbers(train_slice.labels, generator)
    second = helpers.draw_training_numbers(train_slice.labels, generator)
    assert 0.07 < (first == second).float().mean() < 0.13  # independent draws agree 10 % of the time
    counts = torch.bincount(torch.cat([first, second]), minlength=10)
    assert len(counts) == 10 and (counts > 1450).all(), counts  # 1,600 each


def test_holdout_pairs_never_drawn_yet_every_other_pair_appears(train_slice):
    table = helpers._pairs_table(helpers.HOLDOUT_PAIRS)
    assert table.sum() == 10 and (table.sum(0) == 1).all() and (table.sum(1) == 1).all()
    generator = torch.Generator().manual_seed(0)
    labels = train_slice.labels
    for _ in range(3):
        numbers = helpers.draw_training_numbers(labels, generator, table)
        assert not table[labels, numbers].any()
        seen = torch.zeros(10, 10, dtype=torch.bool)
        seen[labels, numbers] = True
        assert torch.equal(seen, ~table)
        for digit in range(10):  # uniform over the 9 numbers each digit keeps
            counts = torch.bincount(numbers[labels == digit], minlength=10)[~table[digit]]
            assert counts.min() > 0.6 * counts.float().mean(), (digit, counts)


@pytest.mark.parametrize("count", [10, 30, 50, 70])
def test_chosen_holdout_pairs_keep_every_digit_and_number(count):
    pairs = helpers.choose_holdout_pairs(count, seed=3)
    assert len(set(pairs)) == count
    table = helpers._pairs_table(pairs)  # itself refuses a table that removes a digit or number
    assert table.sum() == count and (~table).any(0).all() and (~table).any(1).all()
    assert pairs == helpers.choose_holdout_pairs(count, seed=3)  # seeded
    assert pairs != helpers.choose_holdout_pairs(count, seed=4)


def test_line_evidence_counts_what_the_seen_pairs_fix():
    assert helpers.line_evidence([]) == {"equations": 36, "needed": 36, "unseen_sums": 0}
    assert helpers.line_evidence(helpers.HOLDOUT_PAIRS)["equations"] == 36  # 90 pairs fix all
    no_zero = helpers.line_evidence([(0, 0)])  # the only pair that sums to 0
    assert no_zero == {"equations": 35, "needed": 36, "unseen_sums": 1}
    diagonal = helpers.line_evidence([(digit, 9 - digit) for digit in range(9)])  # nine pairs of sum 9
    assert diagonal["unseen_sums"] == 0 and diagonal["equations"] == 36
    assert helpers.line_evidence(helpers.choose_holdout_pairs(70, seed=0))["equations"] < 36


def test_impossible_holdouts_are_refused():
    with pytest.raises(ValueError, match="0..90"):
        helpers.choose_holdout_pairs(91)
    with pytest.raises(ValueError, match="remove a digit or a number"):
        helpers._pairs_table([(digit, 4) for digit in range(10)])
    with pytest.raises(ValueError, match="outside"):
        helpers._pairs_table([(3, 10)])


def test_missing_data_offline_names_folder_and_files(tmp_path, monkeypatch):
    # Port 9 on loopback refuses at once: the same path as a machine without internet.
    monkeypatch.setattr(helpers.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(helpers.MnistNotFoundError) as error:
        helpers.load_mnist(True, root=tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert all(name in message for name in helpers._MNIST_FILES)
    assert "Traceback" not in message
