"""Row routing: rows placed on storage units by the controller, split by unit, reassembled."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from transferqueue.client import routing
from transferqueue.client.routing import (
    PIECE_BYTES,
    SMALL,
    STRIPE_ROWS,
    assemble,
    group_by_unit,
    runs,
    take,
)
from transferqueue.controller.placement import Placement
from transferqueue.errors import ActorDiedError, SchemaError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _split(
    pid: str, rows: list[int] | torch.Tensor, num_units: int, stripe: int = STRIPE_ROWS
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Place a put's rows as the controller does, then group them by unit as the client does."""
    placement = Placement(num_units, stripe)
    units, _ = placement.assign(placement.first_unit(pid), len(rows))
    return group_by_unit(rows, units.tolist())


def test_placement_goes_round_the_units_in_blocks_and_moves_on() -> None:
    placement = Placement(4, STRIPE_ROWS)
    first = placement.first_unit("train@0")
    assert first == zlib.crc32(b"train@0") % 4
    units, cursor = placement.assign(first, 8 * STRIPE_ROWS)
    assert units.tolist() == [(first + r // STRIPE_ROWS) % 4 for r in range(8 * STRIPE_ROWS)]
    # small puts, one after the other, visit the units in turn (not all on one)
    seen = []
    for _ in range(8):
        one, cursor = placement.assign(cursor, 1)
        seen.append(int(one[0]))
    assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3]
    # a dead unit gets no rows; with none left, a typed error
    placement.dead.add(seen[0])
    units, _ = placement.assign(0, 1000)
    assert seen[0] not in set(units.tolist())
    placement.dead.update(range(4))
    with pytest.raises(ActorDiedError, match="every storage unit"):
        placement.assign(0, 1)
    with pytest.raises(ValueError):
        Placement(2, 0)


def test_a_unit_share_of_consecutive_rows_is_a_few_runs() -> None:
    parts = _split("p", list(range(100, 100 + 8 * STRIPE_ROWS)), 2)
    assert len(parts) == 2
    for pos, _ in parts.values():
        found = runs(pos)
        assert len(found) == 4  # 8 blocks alternate between 2 units
        assert sum(k for _, k in found) == pos.numel()
    # a micro-batch of one block is served by one unit
    assert len(_split("p", list(range(STRIPE_ROWS, 2 * STRIPE_ROWS)), 4)) == 1


def test_partitions_start_on_different_units() -> None:
    firsts = {Placement(4).first_unit(f"step_{i}") for i in range(32)}
    assert len(firsts) > 1


@pytest.mark.parametrize("num_units", [1, 2, 3, 8])
def test_placement_is_balanced_and_grouping_keeps_batch_order(num_units: int) -> None:
    rows = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:4096]
    placement = Placement(num_units, 1)
    units, _ = placement.assign(0, len(rows))
    parts = group_by_unit(rows, units.tolist())
    sizes = [p[0].numel() for p in parts.values()]
    assert sum(sizes) == 4096 and max(sizes) - min(sizes) <= 1
    seen = torch.zeros(4096, dtype=torch.bool)
    for unit, (pos, unit_rows) in parts.items():
        assert torch.equal(unit_rows, rows[pos])
        assert bool((pos.diff() > 0).all())  # ascending: batch order kept
        assert set(units[pos.numpy()].tolist()) == {unit}
        seen[pos] = True
    assert bool(seen.all())


def test_group_by_unit_edge_cases() -> None:
    assert group_by_unit([], []) == {}
    parts = group_by_unit([7], [3])
    assert list(parts) == [3] and parts[3][1].tolist() == [7]
    with pytest.raises(SchemaError):
        group_by_unit([1, 2], [0])
    with pytest.raises(SchemaError):
        group_by_unit([-1], [0])
    with pytest.raises(SchemaError):
        group_by_unit(list(range(300)), [-1] * 300)


@pytest.mark.parametrize("num_units", [1, 2, 3, 8])
def test_grouping_a_short_list_matches_the_tensor_path(num_units: int) -> None:
    rows = torch.randperm(1000)[:100].tolist()
    units = np.random.default_rng(0).integers(0, num_units, len(rows)).tolist()
    short = group_by_unit(rows, units)  # a list of < 256 ints: plain Python
    big = group_by_unit(torch.tensor(rows), units)
    assert sorted(short) == sorted(big)
    for unit, (pos, unit_rows) in short.items():
        assert pos.dtype == unit_rows.dtype == torch.int64
        assert torch.equal(pos, big[unit][0]) and torch.equal(unit_rows, big[unit][1])


def test_runs() -> None:
    assert runs([]) == []
    assert runs([3]) == [(3, 1)]
    assert runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
    big = torch.cat([torch.arange(0, 300), torch.arange(400, 700), torch.tensor([900])])
    assert runs(big) == [(0, 300), (400, 300), (900, 1)]


def _stored(col: object) -> object:
    """What a unit answers for a column it was sent: ``{"pieces": [...]}`` concatenated."""
    if not isinstance(col, dict):
        return col
    if "pieces" in col:
        return torch.cat(col["pieces"])
    values = torch.cat(col["values"])
    offsets = torch.zeros(len(col["lengths"]) + 1, dtype=torch.int64)
    offsets[1:] = col["lengths"].cumsum(0)
    return torch.nested.nested_tensor_from_jagged(values, offsets.to(values.device))


def _round_trip(column: object, rows: list[int], num_units: int) -> object:
    """Split a batch column by unit, then put the pieces back together."""
    parts = _split("p", rows, num_units)
    pieces = [(pos, _stored(take(column, pos))) for pos, _ in parts.values()]
    out = assemble(pieces, len(rows))
    # the runs of each piece's positions, found once by the caller, give the same result
    again = assemble(pieces, len(rows), found=[runs(pos) for pos, _ in pieces])
    if isinstance(out, torch.Tensor) and out.is_nested:
        assert all(torch.equal(a, b) for a, b in zip(out.unbind(), again.unbind(), strict=True))
    elif isinstance(out, torch.Tensor):
        assert torch.equal(out.view(torch.uint8), again.view(torch.uint8))
    else:
        assert out == again
    return out


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint16]
)
@pytest.mark.parametrize("n", [50, 600])  # short batches take plain-Python paths
def test_take_and_assemble_dense(dtype: torch.dtype, n: int) -> None:
    data = torch.randint(0, 100, (n, 3)).to(dtype)
    out = _round_trip(data, list(range(100, 100 + n)), 3)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype
    assert torch.equal(out.view(torch.uint8), data.view(torch.uint8))


def test_take_and_assemble_jagged_and_values() -> None:
    rows = [torch.arange(n * 2).view(n, 2) for n in (3, 0, 5, 1, 2, 4, 7)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    out = _round_trip(nested, list(range(7)), 3)
    assert isinstance(out, torch.Tensor) and out.is_nested
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))
    values = ["a", None, {"x": 1}, 2, "e", "f", "g"]
    assert _round_trip(values, list(range(7)), 2) == values


@pytest.mark.parametrize("num_units", [2, 3])
def test_big_columns_travel_as_views_of_runs(num_units: int) -> None:
    n = 8 * STRIPE_ROWS
    rows = list(range(5, 5 + n))
    dense = torch.randn(n, PIECE_BYTES // STRIPE_ROWS // 2)  # a run: 2x PIECE_BYTES
    lengths = torch.randint(0, 3 * PIECE_BYTES // 8 // STRIPE_ROWS, (n,))
    jag_rows = [torch.randint(0, 9, (int(k), 2)) for k in lengths]
    jagged = torch.nested.nested_tensor(jag_rows, layout=torch.jagged)
    for pos, _ in _split("p", rows, num_units).values():
        piece = take(dense, pos)
        assert isinstance(piece, dict) and len(piece["pieces"]) == len(runs(pos))
        given = take(dense, pos, runs(pos))  # runs found once for all columns: same pieces
        assert [(p.data_ptr(), p.shape) for p in given["pieces"]] == [
            (p.data_ptr(), p.shape) for p in piece["pieces"]
        ]
        assert all(p.data_ptr() >= dense.data_ptr() for p in piece["pieces"])  # views
        assert torch.equal(torch.cat(piece["pieces"]), dense[pos])
        packed = take(jagged, pos)
        assert len(packed["values"]) == len(runs(pos)) and packed["lengths"].numel() == pos.numel()
        assert torch.equal(torch.cat(packed["values"]), torch.cat([jag_rows[p] for p in pos]))
    out = _round_trip(dense, rows, num_units)
    assert torch.equal(out, dense)
    merged = _round_trip(jagged, rows, num_units)
    assert all(torch.equal(a, b) for a, b in zip(merged.unbind(), jag_rows, strict=True))


def test_a_share_of_many_runs_is_gathered_into_one_tensor() -> None:
    # more runs than MAX_PIECES: one copy, not dozens of zero-copy frames in one message
    dense = torch.randn(64, PIECE_BYTES // 4)
    pos = torch.arange(0, 64, 2)  # 32 runs of one big row
    taken = take(dense, pos)
    assert isinstance(taken, torch.Tensor) and torch.equal(taken, dense[pos])


def test_assemble_copy_gives_memory_of_its_own() -> None:
    col = torch.arange(12).view(6, 2)
    out = assemble([(torch.arange(6), col)], 6, copy=True)
    assert torch.equal(out, col) and out.data_ptr() != col.data_ptr()
    assert assemble([(torch.arange(6), col)], 6).data_ptr() == col.data_ptr()
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    cloned = assemble([(torch.arange(2), nested)], 2, copy=True)
    assert cloned.values().data_ptr() != nested.values().data_ptr()


def test_assemble_mixed_pieces() -> None:
    pos_a, pos_b = torch.tensor([0, 2]), torch.tensor([1])
    # dense pieces of different lengths -> jagged
    out = assemble([(pos_a, torch.zeros(2, 3)), (pos_b, torch.ones(1, 5))], 3)
    assert isinstance(out, torch.Tensor) and out.is_nested
    assert [t.shape[0] for t in out.unbind()] == [3, 5, 3]
    # rows of different ndim -> list
    out = assemble([(pos_a, [torch.zeros(2, 2), torch.zeros(2)]), (pos_b, torch.ones(1, 5))], 3)
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(2, 2), (5,), (2,)]
    assert assemble([], 0) == []


@cuda
def test_take_and_assemble_cuda_columns() -> None:
    rows = [torch.arange(n, device="cuda") for n in (3, 0, 5, 1, 2, 4, 7)]
    nested = torch.nested.nested_tensor(rows, layout=torch.jagged)
    dense = torch.arange(14, device="cuda").view(7, 2)
    pos = torch.tensor([5, 1, 6])
    taken = take(nested, pos)
    assert taken.is_cuda and [t.tolist() for t in taken.unbind()] == [
        rows[5].tolist(),
        [],
        rows[6].tolist(),
    ]
    assert torch.equal(take(dense, pos), dense[pos.cuda()])
    out = _round_trip(nested, list(range(7)), 3)
    assert all(torch.equal(a, b) for a, b in zip(out.unbind(), rows, strict=True))
    assert torch.equal(_round_trip(dense, list(range(7)), 2), dense)


def test_big_merge_results_reuse_dropped_buffers_only() -> None:
    routing._outputs.clear()  # buffers that earlier tests dropped
    n = 2 * SMALL
    col = torch.randn(n, 4096)  # 8 MiB: above memory.HUGE_MIN_BYTES
    half = [(torch.arange(0, n, 2), col[0::2].contiguous()), (torch.arange(1, n, 2), col[1::2])]
    first = assemble(half, n)
    assert torch.equal(first, col)
    second = assemble(half, n)  # first is alive: its memory is not handed out again
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, col)
    ptr = first.data_ptr()
    del first
    third = assemble(half, n)  # dropped: its pages serve the next result
    assert torch.equal(third, col) and third.data_ptr() == ptr


def _merge_in_child(conn) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP does not survive a fork
    n = 2 * SMALL
    col = torch.ones(n, 4096)
    out = assemble([(torch.arange(0, n, 2), col[0::2]), (torch.arange(1, n, 2), col[1::2])], n)
    conn.send(bool(torch.equal(out, col)))


def test_a_forked_child_merges_while_the_parent_holds_the_result_pool() -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    with routing._outputs_lock:  # as if the parent's loop thread were merging at the fork
        proc = ctx.Process(target=_merge_in_child, args=(child,))
        proc.start()
    try:
        assert parent.poll(60), "the child hung on the lock it inherited"
        assert parent.recv() is True
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_non_tensor_columns_come_back_as_one_stack_per_batch() -> None:
    from tensordict import NonTensorStack

    from transferqueue.client.columns import assemble as assemble_td

    for values in (["a", 1, {"k": 2}, None, 2.5, "f"], [[1, 2], [3], "x", (4,), [], {"k": 1}]):
        pos = [torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])]
        parts = [(p, {"v": [values[i] for i in p.tolist()]}) for p in pos]
        got = assemble_td(len(values), ["v"], parts).get("v")
        assert isinstance(got, NonTensorStack) and got.batch_size == (len(values),)
        assert got.tolist() == values


def _striped_parts(n: int, fields: dict[str, torch.Tensor], units: int = 2) -> list:
    """Two units' answers for a batch placed in stripe blocks (as a real get returns them)."""
    unit_of = (torch.arange(n) // STRIPE_ROWS) % units
    parts = []
    for u in range(units):
        pos = torch.nonzero(unit_of == u).flatten()
        share = {}
        for k, col in fields.items():
            if col.is_nested:
                rows = col.unbind()
                share[k] = torch.nested.nested_tensor(
                    [rows[p] for p in pos.tolist()], layout=torch.jagged
                )
            else:
                share[k] = col[pos]
        parts.append((pos, share))
    return parts


@pytest.mark.parametrize("copy", [False, True])
def test_a_many_field_merge_writes_all_fields_into_one_pooled_buffer(copy: bool) -> None:
    from transferqueue.client.columns import assemble as assemble_td

    routing._outputs.clear()
    n = 4 * STRIPE_ROWS
    dtypes = [torch.int64, torch.float32, torch.bfloat16, torch.bool, torch.int8]
    fields = {
        f"f{i}": (torch.randn(n, 64 + i) * 100).to(dtypes[i % len(dtypes)]) for i in range(12)
    }
    fields["jagged"] = torch.nested.nested_tensor(
        [torch.full((1 + r % 3,), r) for r in range(n)], layout=torch.jagged
    )
    fields["many"] = torch.randn(n, 2048)  # 4 MiB: the fields together pass HUGE_MIN_BYTES
    got = assemble_td(n, list(fields), _striped_parts(n, fields), copy=copy)
    dense = [k for k in fields if k != "jagged"]
    for k in dense:
        assert torch.equal(got[k], fields[k]), k
        assert got[k].data_ptr() % 64 == 0
    assert all(torch.equal(a, b) for a, b in zip(got["jagged"].unbind(), fields["jagged"].unbind()))
    storages = {got[k].untyped_storage().data_ptr() for k in dense}
    assert len(storages) == 1  # one buffer for every dense field
    ptr = storages.pop()
    keep = got["f3"]  # one field kept alive keeps the shared buffer out of the pool
    del got
    again = assemble_td(n, list(fields), _striped_parts(n, fields), copy=copy)
    assert again["f0"].untyped_storage().data_ptr() != ptr
    assert torch.equal(keep, fields["f3"])
    del again, keep
    third = assemble_td(n, list(fields), _striped_parts(n, fields), copy=copy)
    assert {third[k].untyped_storage().data_ptr() for k in dense} == {ptr}


def test_small_many_field_merges_keep_a_buffer_per_field() -> None:
    from transferqueue.client.columns import assemble as assemble_td

    n = 2 * STRIPE_ROWS
    fields = {f"f{i}": torch.randn(n, 4) for i in range(8)}  # 8 KiB each: below the bound
    got = assemble_td(n, list(fields), _striped_parts(n, fields))
    assert len({got[k].untyped_storage().data_ptr() for k in fields}) == len(fields)
    assert all(torch.equal(got[k], fields[k]) for k in fields)


def test_the_parallel_merge_returns_every_field_and_raises_what_a_field_raised() -> None:
    names = [f"f{i}" for i in range(9)]
    assert routing.in_parallel(lambda name: name * 2, names) == {k: k * 2 for k in names}

    def fail(name: str) -> str:
        if name == "f5":
            raise SchemaError("bad field f5")
        return name

    with pytest.raises(SchemaError, match="f5"):
        routing.in_parallel(fail, names)
