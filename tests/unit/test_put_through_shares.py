"""The pure parts of a small put through the controller: each unit's share, the cast."""

from __future__ import annotations

import torch

from transferqueue.controller.put_through import _cast, _shares


def test_one_unit_gets_the_batch_as_is() -> None:
    cols = {"x": torch.arange(6).view(3, 2), "s": ["a", "b", "c"]}
    shares = _shares([4, 5, 6], [1, 1, 1], cols)
    assert list(shares) == [1]
    rows, share = shares[1]
    assert rows == [4, 5, 6] and share["x"] is cols["x"] and share["s"] is cols["s"]


def test_rows_on_two_units_are_split_in_batch_order() -> None:
    cols = {"x": torch.arange(8).view(4, 2), "s": ["a", "b", "c", "d"]}
    shares = _shares([10, 11, 12, 13], [0, 1, 0, 1], cols)
    assert shares[0][0] == [10, 12] and shares[1][0] == [11, 13]
    assert shares[0][1]["x"].tolist() == [[0, 1], [4, 5]] and shares[0][1]["s"] == ["a", "c"]
    assert shares[1][1]["x"].tolist() == [[2, 3], [6, 7]] and shares[1][1]["s"] == ["b", "d"]


def test_fields_held_wider_are_cast_and_others_left_alone() -> None:
    cols = {"x": torch.tensor([[1, 2]]), "r": [torch.tensor([1, 2])], "s": ["a"]}
    out = _cast(cols, {"x": "torch.float32", "r": "torch.float64", "s": "torch.float32"})
    assert out["x"].dtype == torch.float32 and out["x"].tolist() == [[1.0, 2.0]]
    assert out["r"][0].dtype == torch.float64
    assert out["s"] == ["a"] and cols["x"].dtype == torch.int64  # the caller's batch stays
    assert _cast(cols, {}) is cols
