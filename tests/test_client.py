"""The data plane through the client, on every transport."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from transferqueue.errors import (
    PartitionNotFoundError,
    PartitionSealedError,
    SchemaError,
)
from transferqueue.metadata import BatchMeta


def batch(n: int, start: int = 0) -> TensorDict:
    ids = torch.arange(start, start + n)
    return TensorDict(
        {
            "input_ids": torch.stack([ids, ids * 2, ids * 3], dim=1),
            "bf16": (ids.float() / 7).to(torch.bfloat16).unsqueeze(1).repeat(1, 4),
            "mask": (ids % 2 == 0).unsqueeze(1),
            "responses": torch.nested.nested_tensor(
                [torch.arange(int(i) % 5 + 1, dtype=torch.int32) for i in ids], layout=torch.jagged
            ),
            "text": NonTensorStack(*[f"sample-{int(i)}" for i in ids]),
            "info": NonTensorStack(*[{"i": int(i), "tags": ["a", "b"]} for i in ids]),
        },
        batch_size=[n],
    )


def assert_batches_equal(got: TensorDict, want: TensorDict) -> None:
    assert got.batch_size == want.batch_size
    assert set(got.keys()) == set(want.keys())
    for key in want.keys():
        a, b = got.get(key), want.get(key)
        if isinstance(b, NonTensorStack):
            assert a.tolist() == b.tolist(), key
        elif b.is_nested:
            assert a.is_nested, key
            assert [x.tolist() for x in a.unbind()] == [y.tolist() for y in b.unbind()], key
            assert a.dtype == b.dtype
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key


def test_put_get_round_trip_exact(client, pid) -> None:
    data = batch(10)
    meta = client.put(data, partition_id=pid)
    assert meta.rows == list(range(10)) and sorted(meta.fields) == sorted(data.keys())
    assert_batches_equal(client.get_data(meta), data)
    got = client.get_meta(list(data.keys()), 10, pid, "train")
    assert got.rows == list(range(10))
    assert_batches_equal(client.get_data(got), data)


@pytest.mark.parametrize("rows", [4, 300])  # one unit answers / both units answer
def test_what_a_get_returns_is_the_callers_to_change(client, pid, rows) -> None:
    data = {
        "x": torch.arange(rows * 3).view(rows, 3),
        "r": [torch.arange(i % 4) for i in range(rows)],
    }
    meta = client.put(data, partition_id=pid)
    first = client.get_data(meta)
    first["x"].mul_(-1)  # a trainer normalising in place
    first["r"].values().fill_(-7)
    again = client.get_data(meta)
    assert torch.equal(again["x"], data["x"])
    assert [t.tolist() for t in again["r"].unbind()] == [t.tolist() for t in data["r"]]
    # and what was put may change afterwards without changing what is stored
    data["x"].fill_(0)
    assert torch.equal(client.get_data(meta)["x"], torch.arange(rows * 3).view(rows, 3))


def test_get_data_follows_meta_row_order_and_field_selection(client, pid) -> None:
    data = batch(8)
    meta = client.put(data, partition_id=pid)
    order = [5, 0, 7, 2]
    sub = BatchMeta(pid, order, ["input_ids", "text"])
    got = client.get_data(sub)
    assert torch.equal(got["input_ids"], data["input_ids"][order])
    assert got["text"] == [f"sample-{i}" for i in order]
    only = client.get_data(meta, fields=["mask"])
    assert list(only.keys()) == ["mask"]


def test_dict_input_and_dense_rows_of_different_shapes_come_back_jagged(client, pid) -> None:
    meta = client.put({"x": [torch.ones(2), torch.ones(3)], "y": ["a", "b"]}, partition_id=pid)
    got = client.get_data(meta)
    assert got["x"].is_nested and [t.shape[0] for t in got["x"].unbind()] == [2, 3]
    assert got["y"] == ["a", "b"]


async def test_row_gains_fields_in_three_stages_from_three_clients(system, pid) -> None:

    clients = [system.new_async_client() for _ in range(3)]
    try:
        await clients[0].put({"prompt": torch.arange(4).unsqueeze(1)}, partition_id=pid)
        m1 = await clients[1].get_meta(["prompt"], 4, pid, "rollout")
        await clients[1].put({"response": torch.arange(4) * 10}, metadata=m1)
        m2 = await clients[2].get_meta(["prompt", "response"], 4, pid, "logprob")
        await clients[2].put({"logp": torch.arange(4).float() / 2}, metadata=m2)
        m3 = await clients[0].get_meta(["prompt", "response", "logp"], 4, pid, "train")
        got = await clients[0].get_data(m3)
        assert torch.equal(got["response"], torch.arange(4) * 10)
        assert torch.equal(got["logp"], torch.arange(4).float() / 2)
    finally:
        for c in clients:
            await c.close()


async def test_consumer_waiting_before_any_producer_receives_rows(aclient, pid) -> None:
    waiting = asyncio.ensure_future(aclient.get_meta(["a"], 4, pid, "t", timeout=60))
    await asyncio.sleep(0)  # let the request leave (not a synchronisation: it may wait or not)
    await aclient.put({"a": torch.arange(4)}, partition_id=pid)
    meta = await waiting
    assert sorted(meta.rows) == [0, 1, 2, 3]


async def test_concurrent_producers_and_consumers_exactly_once(aclient, pid) -> None:
    n_prod, n_cons, per_put, puts = 16, 16, 25, 25  # 10k rows
    total = n_prod * per_put * puts
    await aclient.create_partition(pid, expected_size=total)

    async def produce(p: int) -> None:
        for k in range(puts):
            start = (p * puts + k) * per_put
            ids = torch.arange(start, start + per_put)
            await aclient.put(
                {"id": ids, "payload": ids.unsqueeze(1) * torch.arange(8)}, partition_id=pid
            )

    seen: list[tuple[int, int]] = []

    async def consume() -> None:
        while True:
            meta = await aclient.get_meta(["id", "payload"], 64, pid, "train", timeout=120)
            if not meta.rows:
                return
            data = await aclient.get_data(meta)
            assert torch.equal(data["payload"], data["id"].unsqueeze(1) * torch.arange(8))
            seen.extend(zip(meta.rows, data["id"].tolist()))

    await asyncio.gather(*(produce(p) for p in range(n_prod)), *(consume() for _ in range(n_cons)))
    rows = [r for r, _ in seen]
    ids = [i for _, i in seen]
    assert len(rows) == total and len(set(rows)) == total
    assert sorted(ids) == list(range(total))  # every sample once, contents intact


def test_two_tasks_each_receive_all_rows(client, pid) -> None:
    client.put({"a": torch.arange(6)}, partition_id=pid)
    client.seal(pid)
    for task in ("t1", "t2"):
        rows = []
        while (meta := client.get_meta(["a"], 4, pid, task)).rows:
            rows += meta.rows
        assert sorted(rows) == list(range(6))


def test_clear_partition_frees_and_is_idempotent(client, pid) -> None:
    meta = client.put(batch(4), partition_id=pid)
    client.clear_partition(pid)
    client.clear_partition(pid)
    assert pid not in client.list_partitions()
    with pytest.raises(PartitionNotFoundError):
        client.get_data(meta)


def test_clear_samples(client, pid) -> None:
    meta = client.put({"a": torch.arange(4)}, partition_id=pid)
    client.clear_samples(meta.split([2, 2])[0])
    client.clear_samples(meta.split([2, 2])[0])
    assert client.partition_info(pid).size == 2
    assert client.get_data(BatchMeta(pid, [2, 3], ["a"]))["a"].tolist() == [2, 3]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"a": torch.zeros(3), "b": torch.zeros(4)}, SchemaError),  # batch sizes differ
        ({"a": torch.zeros(0)}, SchemaError),  # empty batch
        ({"a": {1, 2}}, SchemaError),  # not a column
    ],
)
def test_bad_batches_raise_and_change_nothing(client, pid, bad, error) -> None:
    with pytest.raises(error):
        client.put(bad, partition_id=pid)
    assert pid not in client.list_partitions() or client.partition_info(pid).size == 0
    client.put({"a": torch.zeros(2)}, partition_id=pid)  # the system keeps serving


def test_wrong_tags_length_and_dtype_conflict(client, pid) -> None:
    with pytest.raises(SchemaError):
        client.put({"a": torch.zeros(2)}, partition_id=pid, tags=[{}])
    client.put({"a": torch.zeros(2)}, partition_id=pid)
    with pytest.raises(SchemaError, match="rank"):  # dtypes promote; ranks cannot mix
        client.put({"a": torch.zeros(2, 3)}, partition_id=pid)
    assert client.partition_info(pid).size == 2


def test_object_the_codec_cannot_carry(client, pid) -> None:
    with pytest.raises(TypeError, match="set"):
        client.put({"a": [{1}, {2}]}, partition_id=pid)
    assert client.partition_info(pid).size == 0  # nothing published, row given back
    client.put({"a": [1, 2]}, partition_id=pid)


def test_get_data_unknown_partition(client) -> None:
    with pytest.raises(PartitionNotFoundError):
        client.get_data(BatchMeta("never-created", [0], ["a"]))


def test_batch_size_must_be_positive(client, pid) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        client.get_meta(["a"], 0, pid, "t")


def test_insert_into_sealed_partition(client, pid) -> None:
    client.put({"a": torch.zeros(2)}, partition_id=pid)
    client.seal(pid)
    with pytest.raises(PartitionSealedError):
        client.put({"a": torch.zeros(2)}, partition_id=pid)


def test_sync_client_from_inside_a_running_event_loop(client, pid) -> None:
    async def inside() -> list[int]:
        meta = client.put({"a": torch.arange(3)}, partition_id=pid)
        return client.get_data(meta)["a"].tolist()

    assert asyncio.run(inside()) == [0, 1, 2]


def test_sync_client_from_many_threads(client, pid) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            meta = client.put({"a": torch.full((5,), i)}, partition_id=pid)
            assert client.get_data(meta)["a"].tolist() == [i] * 5
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert client.partition_info(pid).size == 40
