"""The key-value API on every transport (through the client the kv functions wrap)."""

from __future__ import annotations

import pytest
import torch

import transferqueue as tq


def test_kv_put_get_in_key_order(client, pid) -> None:
    client.kv_put(["a", "b", "c"], pid, {"x": torch.tensor([1, 2, 3]), "s": ["A", "B", "C"]})
    got = client.kv_get(["c", "a"], pid)
    assert got["x"].tolist() == [3, 1] and got["s"] == ["C", "A"]
    assert client.kv_get(["b"], pid, select_fields=["s"])["s"] == ["B"]


def test_tag_only_put_merges_tags_and_kv_list(client, pid) -> None:
    client.kv_put(["k1", "k2"], pid, tags=[{"status": "pending"}, {"status": "pending"}])
    client.kv_put(["k1"], pid, tags=[{"status": "running", "worker": 3}])
    listing = client.kv_list(pid)
    assert listing == {pid: {"k1": {"status": "running", "worker": 3}, "k2": {"status": "pending"}}}
    assert client.kv_list("no-such-partition") == {}


def test_fields_added_later_to_existing_keys(client, pid) -> None:
    client.kv_put(["a", "b"], pid, {"prompt": torch.tensor([[1], [2]])})
    client.kv_put(["b", "a"], pid, {"response": torch.tensor([20, 10])})
    got = client.kv_get(["a", "b"], pid)
    assert got["prompt"].tolist() == [[1], [2]] and got["response"].tolist() == [10, 20]


def test_missing_keys_and_fields_raise_naming_them(client, pid) -> None:
    client.kv_put(["a", "b"], pid, {"x": torch.tensor([1, 2])})
    client.kv_put(["c"], pid, {"y": torch.tensor([3])})
    with pytest.raises(KeyError, match="zz"):
        client.kv_get(["a", "zz"], pid)
    with pytest.raises(KeyError, match="y"):
        client.kv_get(["a", "c"], pid, select_fields=["y"])
    assert list(client.kv_get(["a", "c"], pid).keys()) == []  # no field all keys have


def test_bad_keys(client, pid) -> None:
    with pytest.raises(ValueError, match="repeated"):
        client.kv_put(["a", "a"], pid, {"x": torch.tensor([1, 2])})
    with pytest.raises(TypeError):
        client.kv_put([1, 2], pid, {"x": torch.tensor([1, 2])})
    assert client.kv_list(pid) in ({}, {pid: {}})


def test_kv_clear(client, pid) -> None:
    client.kv_put(["a", "b"], pid, {"x": torch.tensor([1, 2])})
    client.kv_clear(["a"], pid)
    assert list(client.kv_list(pid)[pid]) == ["b"]
    with pytest.raises(KeyError):
        client.kv_get(["a"], pid)


def test_kv_clear_of_keys_already_gone_is_a_no_op(client, pid) -> None:
    client.kv_put(["a", "b"], pid, {"x": torch.tensor([1, 2])})
    client.kv_clear(["a"], pid)
    client.kv_clear(["a", "zz"], pid)  # again, and a key never put: nothing happens
    client.kv_clear("b", pid)  # one key as a string
    client.kv_clear(["a"], "no-such-partition")
    assert client.kv_list(pid) == {pid: {}}


def test_a_single_key_string_is_one_key(client, pid) -> None:
    client.kv_put(["k1", "k2"], pid, {"x": torch.tensor([1, 2]), "s": ["A", "B"]})
    got = client.kv_get("k1", pid)  # not the keys "k" and "1"
    assert got.batch_size == torch.Size([1]) and got["x"].tolist() == [1]
    assert client.kv_get("k2", pid, select_fields="s")["s"] == ["B"]


def test_put_clear_churn_reuses_rows(system, client, pid) -> None:
    keys = [f"k{i}" for i in range(64)]
    rows_seen: set[int] = set()
    for cycle in range(300):
        meta = client.kv_put(keys, pid, {"x": torch.full((64, 2), float(cycle))})
        rows_seen.update(meta.rows)
        assert client.kv_get(keys[:2], pid)["x"][:, 0].tolist() == [float(cycle)] * 2
        client.kv_clear(keys, pid)
    assert max(rows_seen) < 64  # the same row ids, cycle after cycle: memory stays flat
    stats = [system.client._loop.run(u.call("stats")) for u in system.async_client._units]
    assert all(pid not in s["partitions"] for s in stats)  # and the units hold nothing


def test_module_level_kv_functions_use_the_default_client() -> None:
    tq.init()
    try:
        tq.kv_put("one", "kv", {"x": torch.tensor([1.5]), "s": "hello"}, tag={"n": 1})
        tq.kv_batch_put(
            ["two", "three"], "kv", {"x": torch.tensor([[2.5], [3.5]]), "s": ["a", "b"]}
        )
        got = tq.kv_batch_get(["three", "one"], "kv")
        assert got["x"].tolist() == [[3.5], [1.5]] and got["s"] == ["b", "hello"]
        assert tq.kv_batch_get("two", "kv")["s"] == ["a"]
        assert tq.kv_list("kv")["kv"]["one"] == {"n": 1}
        tq.kv_clear(["one"], "kv")
        assert sorted(tq.kv_list("kv")["kv"]) == ["three", "two"]
    finally:
        tq.close()


async def test_async_kv_functions() -> None:
    tq.init()
    try:
        await tq.async_kv_batch_put(["a"], "akv", {"x": torch.tensor([7])})
        assert (await tq.async_kv_batch_get(["a"], "akv"))["x"].tolist() == [7]
        await tq.async_kv_put("b", "akv", tag={"done": True})
        assert (await tq.async_kv_list("akv"))["akv"]["b"] == {"done": True}
        await tq.async_kv_clear(["a", "b"], "akv")
        assert (await tq.async_kv_list("akv"))["akv"] == {}
    finally:
        tq.close()
