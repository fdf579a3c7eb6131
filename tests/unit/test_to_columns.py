"""columns.to_columns: a dict of plain dense tensors (a rollout's sample) takes a fast path
that must give what the general path gives, and the same errors."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from transferqueue.client.columns import to_columns
from transferqueue.errors import SchemaError


def test_a_dict_of_plain_tensors_gives_what_the_general_path_gives() -> None:
    data = {
        "prompts": torch.arange(8).reshape(2, 4),
        "reward": torch.ones(2),
        7: torch.zeros(2, 3, dtype=torch.bfloat16),
    }
    n, fast = to_columns(data)
    m, general = to_columns(TensorDict({str(k): v for k, v in data.items()}, batch_size=[2]))
    assert n == m == 2 and list(fast) == ["prompts", "reward", "7"] == list(general)
    for name, col in fast.items():
        assert col.dtype == general[name].dtype and torch.equal(col, general[name])
        assert col.data_ptr() == general[name].data_ptr()  # no copy on either path


def test_a_tensor_that_requires_grad_is_detached() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    _, cols = to_columns({"x": x, "y": torch.zeros(2)})
    assert not cols["x"].requires_grad and cols["x"].data_ptr() == x.data_ptr()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, "different batch sizes"),
        ({"a": torch.zeros(0, 3)}, "empty"),
        ({"a": torch.tensor(1.0)}, "0-d tensor"),
        ({}, "no fields"),
    ],
)
def test_malformed_dicts_are_refused_as_before(data: dict, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        to_columns(data)


def test_mixed_dicts_take_the_general_path() -> None:
    n, cols = to_columns({"x": torch.ones(2, 2), "s": ["a", "b"]})
    assert n == 2 and cols["s"] == ["a", "b"] and torch.equal(cols["x"], torch.ones(2, 2))
