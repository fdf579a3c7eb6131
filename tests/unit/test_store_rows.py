"""Row ids on both sides of the small-batch branch (plain Python for up to 16 rows, numpy
beyond): the same checks and the same results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferqueue.errors import SchemaError
from transferqueue.storage._input import row_array
from transferqueue.storage.store import Store


@pytest.mark.parametrize("n", [3, 16, 17, 300])
def test_duplicates_and_bounds_are_refused_at_every_size(n: int) -> None:
    rows = list(range(n))
    assert row_array(rows, unique=True).tolist() == rows
    with pytest.raises(SchemaError, match="unique"):
        row_array([*rows[:-1], 0], unique=True)
    assert row_array([*rows[:-1], 0], unique=False).tolist() == [*rows[:-1], 0]
    with pytest.raises(SchemaError, match=r"\[0, "):
        row_array([*rows[:-1], -5], unique=False)
    with pytest.raises(SchemaError, match=r"\[0, "):
        row_array(torch.tensor([*rows[:-1], 2**31]), unique=False)


@pytest.mark.parametrize("n", [4, 40])
def test_writes_reads_and_clears_agree_at_every_size(n: int) -> None:
    store = Store()
    rows = np.random.default_rng(n).permutation(4 * n)[:n].tolist()
    data = torch.arange(n * 3).view(n, 3)
    store.write("p", rows, {"x": data, "v": [str(r) for r in rows]})
    got = store.read("p", rows[::-1], ["x", "v"])
    assert torch.equal(got["x"], data.flip(0)) and got["v"] == [str(r) for r in rows[::-1]]
    twice = rows[: n // 2] * 2  # duplicates are fine for a clear
    assert store.clear_rows("p", twice) == (n // 2) * 3 * 8 + sum(
        len(str(r)) for r in rows[: n // 2]
    )
    rest = rows[n // 2 :]
    assert store.read("p", rest, ["x"])["x"].tolist() == data[n // 2 :].tolist()
    store.write("p", rows[: n // 2], {"x": torch.zeros(n // 2, 3, dtype=torch.int64)})
    assert store.read("p", rows[: n // 2], ["x"])["x"].count_nonzero() == 0
