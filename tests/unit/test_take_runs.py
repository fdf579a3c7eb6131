"""routing.take of a unit's share with more runs than MAX_PIECES: one packed copy of the
runs (into pooled memory), equal to an indexed gather, for every dtype."""

from __future__ import annotations

import pytest
import torch

from transferqueue.client import routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_a_share_of_many_runs_is_one_packed_copy(dtype: torch.dtype) -> None:
    rows, width = 4096, 4096  # 4096 rows of 4-16 KiB: a share of 8-32 MiB
    column = torch.arange(rows * width, dtype=torch.int64).view(rows, width).to(dtype)
    stripe = routing.STRIPE_ROWS
    positions = torch.cat([torch.arange(a, a + stripe) for a in range(0, rows, 2 * stripe)])
    assert len(routing.runs(positions)) > routing.MAX_PIECES
    share = routing.take(column, positions)
    assert isinstance(share, torch.Tensor)
    assert share.untyped_storage().data_ptr() != column.untyped_storage().data_ptr()
    assert torch.equal(share.view(torch.uint8), column[positions].view(torch.uint8))
    # scattered positions (no long runs) still gather
    scattered = torch.randperm(rows)[:1000]
    assert torch.equal(
        routing.take(column, scattered).view(torch.uint8), column[scattered].view(torch.uint8)
    )
