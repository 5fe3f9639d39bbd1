import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def data_dir():
    path = Path(helpers.default_data_dir())
    if not path.is_absolute():
        path = ROOT / path
    return path


@pytest.fixture(scope="session")
def test_split(data_dir):
    return helpers.load_split(False, root=data_dir)


@pytest.fixture(scope="session")
def train_slice(data_dir):
    return helpers.load_split(True, root=data_dir, limit=8000)


@pytest.fixture(scope="session")
def trained(train_slice, test_split):
    """A model trained briefly on a slice, shared by the tests that need one that works.

    In fp32: bf16 kernels differ between CPU models, and so would a model trained in bf16.
    """
    torch.manual_seed(0)
    model = helpers.Net()
    recipe = helpers.Recipe(epochs=3, batch_size=64, outliers=4, precision="fp32")  # 8 per 128, halved
    history = helpers.train(model, train_slice, test_split.first(1000), recipe, progress=False, log=None)
    return model, history

