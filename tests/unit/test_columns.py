"""columns.assemble of small batches whose rows come from several units (the merge a
fleet's reads take: single-row puts leave consecutive rows on alternating units)."""

from __future__ import annotations

import math

import pytest
import torch

from transferqueue.client.columns import assemble
from transferqueue.client.routing import group_by_unit


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.bfloat16, torch.bool, torch.int8, torch.complex64]
)
@pytest.mark.parametrize("row_shape", [(), (3,), (2, 5)])
def test_small_batch_from_several_units_merges_in_batch_order(
    dtype: torch.dtype, row_shape: tuple[int, ...]
) -> None:
    n = 13
    whole = (torch.arange(n * math.prod(row_shape)) % 7).reshape(n, *row_shape).to(dtype)
    units = [i % 3 for i in range(n)]  # rows alternate between 3 units
    groups = group_by_unit(list(range(n)), units)
    parts = [(pos, {"x": whole[pos]}) for pos, _ in groups.values()]
    got = assemble(n, ["x"], parts)["x"]
    assert got.dtype == dtype and torch.equal(got, whole)
    # the result has memory of its own: no piece (a reply buffer) is kept alive by it
    mine = got.untyped_storage().data_ptr()
    assert all(cols["x"].untyped_storage().data_ptr() != mine for _, cols in parts)


def test_mixed_pieces_take_the_general_path() -> None:
    # a value column and a dense one from two units: only the dense one is merged here
    parts = [
        (torch.tensor([0, 2]), {"x": torch.tensor([0, 2]), "s": ["a", "c"]}),
        (torch.tensor([1]), {"x": torch.tensor([1]), "s": ["b"]}),
    ]
    got = assemble(3, ["x", "s"], parts)
    assert got["x"].tolist() == [0, 1, 2] and list(got["s"]) == ["a", "b", "c"]
