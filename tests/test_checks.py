"""The helpers written once: integer validators, shape formatting, device resolution, the
model's action width and device, dataset coercion."""

import numpy as np
import pytest
import torch
from helpers import small_config

from lewm_fast import _checks
from lewm_fast.data import TrainingWindows, TwoRoomDataset, as_dataset, generate_dataset
from lewm_fast.reference.jepa import action_width_of, device_of

INTEGER_BAD = [  # (id, value, minimum, numpy, error match)
    ("below", 1, 2, False, r"n must be an integer >= 2, got 1"),
    ("bool", True, 0, True, "got True"),
    ("float", 3.0, 1, True, "got 3.0"),
    ("numpy-refused", np.int64(3), 1, False, "got np.int64"),
]


@pytest.mark.parametrize(
    "value,minimum,numpy,match", [c[1:] for c in INTEGER_BAD], ids=[c[0] for c in INTEGER_BAD]
)
def test_integer_refuses(value, minimum, numpy, match):
    with pytest.raises(ValueError, match=match):
        _checks.integer(value, "n", minimum, numpy=numpy)


def test_integer_and_positive_accept():
    assert _checks.integer(0, "n", 0) == 0
    out = _checks.integer(np.int64(7), "n", 2, numpy=True)
    assert out == 7 and type(out) is int
    assert _checks.positive(3, "n") == 3
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        _checks.positive(0, "n")
    with pytest.raises(ValueError, match="positive integer, got False"):
        _checks.positive(False, "n")


def test_shape():
    assert _checks.shape(torch.zeros(2, 3)) == "(2, 3)"
    assert _checks.shape(np.zeros((4,))) == "(4)"
    assert _checks.shape(("rows", 2)) == "(rows, 2)"
    assert _checks.shape([1, 2]) == "list"
    assert _checks.shape(None) == "NoneType"


def test_resolve_device():
    auto = _checks.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert _checks.resolve_device("cpu") == torch.device("cpu")
    assert _checks.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' requested but CUDA is not available"):
            _checks.resolve_device("cuda:1")


def test_model_action_width_and_device():
    model = small_config().build()
    width = model.action_encoder.patch_embed.in_channels
    assert model.action_width == width == action_width_of(model)
    assert model.device == torch.device("cpu") == device_of(model)
    assert action_width_of(torch.nn.Linear(2, 2)) is None
    assert device_of(torch.nn.ReLU()) is None and device_of(object()) is None
    assert device_of(torch.nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only


def test_as_dataset(tmp_path):
    data = generate_dataset(tmp_path / "d", episodes=2, max_steps=30, frames=False)
    assert isinstance(as_dataset(tmp_path / "d"), TwoRoomDataset)
    assert isinstance(as_dataset(str(tmp_path / "d")), TwoRoomDataset)
    assert as_dataset(data) is data
    windows = TrainingWindows(data, image_size=28)
    assert as_dataset(windows) is data
    with pytest.raises(
        ValueError, match="dataset must be a dataset folder, a TwoRoomDataset or TrainingWindows"
    ):
        as_dataset(3)
