import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helpers  # noqa: E402
import inference  # noqa: E402
import pictures  # noqa: E402


def predict(model, picture, number):
    """(digit, sum): each head's answer for one picture of a digit and a number."""
    answer = inference.answer(model, picture, number)
    return answer.digit, answer.total


@pytest.fixture(scope="session")
def data_dir():
    path = Path(helpers._default_data_dir())
    if not path.is_absolute():
        path = ROOT / path
    return path


@pytest.fixture(scope="session")
def test_split(data_dir):
    return helpers.load_split(False, root=data_dir)


@pytest.fixture(scope="session")
def raw_mnist(data_dir):
    return helpers.load_mnist(False, root=data_dir, transform=None)


@pytest.fixture(scope="session")
def raw_test(raw_mnist):
    return raw_mnist.data  # uint8 [10000, 28, 28]


@pytest.fixture(scope="session")
def train_slice(data_dir):
    return helpers.load_split(True, root=data_dir, limit=8000)


@pytest.fixture(scope="session")
def outliers(train_slice):
    """Pictures of no digit for `train`, made once for the session, as the command line makes
    them for a split this size."""
    return pictures.draw_outliers(2048, 0, helpers.denormalize(train_slice.images))


@pytest.fixture(scope="session")
def trained(train_slice, test_split, outliers):
    """A model trained briefly on a slice, shared by the tests that need one that works.

    In fp32: bf16 kernels differ between CPU models, and so would a model trained in bf16.
    """
    model = helpers.new_model(0)
    recipe = helpers.Recipe(epochs=3, batch_size=64, outliers=4, precision="fp32")  # 8 per 128, halved
    history = helpers.train(model, train_slice, test_split.first(1000), recipe, outlier_bank=outliers, log=None)
    return model, history


def _available(name: str) -> bool:
    if name == "cuda":
        return torch.cuda.is_available()
    if name == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return True


@pytest.fixture(params=["cpu", "cuda", "mps"])
def device(request):
    """Each device this machine has: the CPU always, a CUDA or MPS GPU where there is one."""
    if not _available(request.param):
        pytest.skip(f"no {request.param} device here")
    return torch.device(request.param)


@pytest.fixture
def meta(monkeypatch):
    """A stand-in GPU for machines without one. Tensors on the meta device have shapes but no
    values, and an operation that mixes them with CPU tensors raises, as it would with a GPU.
    Results leave the device through `helpers.to_host`, which here hands back stand-ins of the
    right shape and type (random intensities for floats, zeros for integers), so the code after
    it runs on."""
    def stand_in(tensor):
        if tensor.is_floating_point():
            return torch.rand(tensor.shape, generator=torch.Generator().manual_seed(0))
        return torch.zeros(tensor.shape, dtype=tensor.dtype)

    def to_host(*tensors):
        return [stand_in(t) if t.is_meta else t.cpu() for t in tensors]
    monkeypatch.setattr(helpers, "to_host", to_host)
    return torch.device("meta")
