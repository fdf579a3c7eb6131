"""The public TransferQueue project's names work here (docs/migrating.md), and the public
API does not change by accident."""

from __future__ import annotations

import inspect

import pytest
import torch
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.metadata import BatchMeta


def batch(n: int, start: int = 0) -> TensorDict:
    ids = torch.arange(start, start + n)
    return TensorDict({"input_ids": ids.unsqueeze(1).repeat(1, 3)}, batch_size=[n])


# ------------------------------------------------------------------ the client
async def test_async_upstream_names(aclient, pid) -> None:
    meta = await aclient.async_put(batch(4), partition_id=pid)
    assert meta.global_indexes == [0, 1, 2, 3] and meta.partition_ids == [pid] * 4
    got = await aclient.async_get_meta(
        data_fields=["input_ids"], batch_size=4, partition_id=pid, mode="fetch", task_name="t"
    )
    assert got.global_indexes == meta.global_indexes and got.field_names == ["input_ids"]
    data = await aclient.async_get_data(got)
    assert data["input_ids"][:, 0].tolist() == [0, 1, 2, 3]
    out = TensorDict({"score": torch.ones(4, 1)}, batch_size=[4])
    await aclient.async_put(data=out, metadata=got)
    got.update_custom_meta([{"k": i} for i in range(4)])
    await aclient.async_set_custom_meta(got)
    assert (await aclient.kv_list(pid))[pid] == {}  # no keys: tags are on the rows
    again = await aclient.async_get_meta(["score"], 4, pid, task_name="u")
    assert again.get_all_custom_meta() == [{"k": i} for i in range(4)]
    await aclient.seal(pid)  # consumed *and* no more rows can come
    assert await aclient.async_check_consumption_status("t", pid)
    assert await aclient.async_check_production_status(["score"], pid)
    rows, status = await aclient.async_get_consumption_status("t", pid)
    assert rows.tolist() == [0, 1, 2, 3] and status.tolist() == [1, 1, 1, 1]
    await aclient.async_get_production_status(["score"], pid)
    await aclient.async_reset_consumption(pid, "t")
    assert not await aclient.async_check_consumption_status("t", pid)
    assert pid in await aclient.async_get_partition_list()
    assert pid in (await aclient.async_kv_list(pid))
    await aclient.async_clear_samples(metadata=again.select_samples([0]))
    assert (await aclient.partition_info(pid)).size == 3
    await aclient.async_clear_partition(pid)
    assert pid not in await aclient.async_get_partition_list()


async def test_async_get_meta_needs_a_task_and_only_fetch(aclient, pid) -> None:
    await aclient.put(batch(1), pid)
    with pytest.raises(ValueError, match="task_name"):
        await aclient.async_get_meta(["input_ids"], 1, pid)
    with pytest.raises(ValueError, match="force_fetch"):
        await aclient.async_get_meta(["input_ids"], 1, pid, "force_fetch", "t")


def test_sync_upstream_names(client, pid) -> None:
    meta = client.put(batch(3), partition_id=pid)
    got = client.get_meta(
        data_fields=["input_ids"], batch_size=3, partition_id=pid, mode="fetch", task_name="t"
    )
    assert client.get_data(metadata=got)["input_ids"].shape == (3, 3)
    # upstream's put(data, metadata): a BatchMeta passed second is the metadata
    client.put(TensorDict({"r": torch.zeros(3, 1)}, batch_size=[3]), got)
    assert client.check_production_status(["r"], pid)
    meta.update_custom_meta({1: {"score": 0.5}})
    client.set_custom_meta(meta)
    rows = client.get_meta(["r"], 3, pid, "u")
    assert rows.custom_meta == [{}, {"score": 0.5}, {}]
    assert pid in client.get_partition_list()
    client.clear_samples(metadata=rows.select_samples([2]))
    client.clear_partition(pid)
    assert pid not in client.get_partition_list()


def test_meta_and_metadata_are_one_argument(client, pid) -> None:
    meta = client.put(batch(1), pid)
    with pytest.raises(TypeError, match="both"):
        client.get_data(meta, metadata=meta)
    with pytest.raises(TypeError, match="missing"):
        client.get_data()


def test_sync_client_is_a_context_manager_that_can_be_used_again(client, pid) -> None:
    with client as c:
        c.put(batch(2), pid)
    # exit closed this client's connections only: the next call connects again
    assert client.partition_info(pid).size == 2


async def test_async_client_aclose(system, pid) -> None:
    c = system.new_async_client()
    async with c:
        await c.put(batch(1), pid)
    await c.aclose()  # idempotent, and the system keeps running
    assert (await c.partition_info(pid)).size == 1  # a later call connects again
    await c.aclose()


# ------------------------------------------------------------------ BatchMeta
def test_batch_meta_upstream_constructor_and_names() -> None:
    m = BatchMeta(
        global_indexes=[7, 3],
        partition_ids=["p", "p"],
        field_schema={"a": {}, "b": {}},
        custom_meta=[{"x": 1}, {}],
    )
    assert (m.partition_id, m.rows, m.fields, m.tags) == ("p", [7, 3], ["a", "b"], [{"x": 1}, {}])
    assert m.size == len(m) == 2 and m.field_names == ["a", "b"] and m.partition_ids == ["p", "p"]
    assert BatchMeta(partition_id="p", global_indexes=[1], field_names=["a"]).rows == [1]
    assert BatchMeta(global_indexes=[], partition_ids=[]).partition_id == ""
    assert BatchMeta.from_plain(m.to_plain()) == m
    assert set(m.to_plain()) == {
        "partition_id", "rows", "fields", "tags", "units", "task_name", "lease",
    }  # fmt: skip
    with pytest.raises(ValueError, match="one partition"):
        BatchMeta(global_indexes=[1, 2], partition_ids=["p", "q"])
    with pytest.raises(TypeError, match="both"):
        BatchMeta("p", [1], global_indexes=[1])
    with pytest.raises(TypeError, match="partition_id"):
        BatchMeta(global_indexes=[1])


def test_batch_meta_select_chunk_and_custom_meta() -> None:
    m = BatchMeta("p", [5, 6, 7], ["a", "b"], units=[0, 1, 0])
    s = m.select_samples([2, 0])
    assert (s.rows, s.units) == ([7, 5], [0, 0])
    assert m.select_fields("a").fields == ["a"] and m.select_fields(["b"]).fields == ["b"]
    assert [c.global_indexes for c in m.chunk(2)] == [[5, 6], [7]]
    assert m.chunk_by_partition() == [m]
    with pytest.raises(IndexError):
        m.select_samples([3])
    m.update_custom_meta([{"a": 1}, {}, {"c": 3}])
    m.update_custom_meta({6: {"b": 2}})
    got = m.get_all_custom_meta()
    assert got == [{"a": 1}, {"b": 2}, {"c": 3}]
    got[0]["a"] = 99  # a copy
    assert m.custom_meta[0] == {"a": 1}
    with pytest.raises(ValueError, match="one dict per row"):
        m.update_custom_meta([{}])
    with pytest.raises(ValueError, match="not in this batch"):
        m.update_custom_meta({9: {}})
    m.reorder([2, 0, 1])
    assert (m.rows, m.units, m.tags[0]) == ([7, 5, 6], [0, 0, 1], {"c": 3})
    with pytest.raises(ValueError, match="permutation"):
        m.reorder([0, 0, 1])
    assert BatchMeta.empty().size == 0
    m.global_indexes = [1, 2, 3]
    assert m.rows == [1, 2, 3]
    m.clear_custom_meta()
    assert m.tags == [{}, {}, {}]


def test_sampler_module_path() -> None:
    from transferqueue import sampler

    assert sampler.BaseSampler is tq.BaseSampler
    assert sampler.GRPOGroupNSampler is tq.GRPOGroupNSampler
    assert set(sampler.__all__) >= {"BaseSampler", "SequentialSampler", "GRPOGroupNSampler"}


# ------------------------------------------------------------ the API snapshot
PUBLIC_NAMES = [
    "ActorClosedError", "ActorDiedError", "ActorError", "AsyncTransferQueueClient", "AuthenticationError",
    "BaseSampler", "BatchMeta", "CheckpointError", "Config", "ConfigError", "GRPOGroupNSampler",
    "NotInitializedError", "PartitionInfo", "PartitionNotFoundError", "PartitionSealedError",
    "ProtocolError", "PutLeaseExpiredError", "RankAwareSampler", "RemoteError",
    "RowsBusyError", "RowsLostError", "SamplerError", "SchemaError", "SeqlenBalancedSampler",
    "SequentialSampler", "StorageFullError", "StreamingDataLoader", "StreamingDataset",
    "SystemNotEmptyError", "TokenBudgetSampler", "TransferQueueClient", "TransferQueueError",
    "TransportUnavailableError", "async_kv_batch_get", "async_kv_batch_put", "async_kv_clear",
    "async_kv_list", "async_kv_put", "async_load_checkpoint", "async_save_checkpoint", "close",
    "connect", "get_async_client", "get_client", "init", "kv_batch_get", "kv_batch_put",
    "kv_clear", "kv_list", "kv_put", "load_checkpoint", "load_config", "save_checkpoint", "status",
]  # fmt: skip

SYNC_METHODS = [
    "ack", "advance_version", "check_consumption_status", "check_production_status",
    "clear_partition", "clear_samples", "close", "create_partition", "get_consumption_status",
    "get_data", "get_meta", "get_partition_list", "get_production_status", "kv_clear",
    "kv_get", "kv_list", "kv_put", "list_partitions", "load_checkpoint", "nack",
    "partition_info", "put", "reserve", "reset_consumption", "save_checkpoint", "seal",
    "set_custom_meta", "set_tags",
]  # fmt: skip

#: parameters of the methods upstream callers use, in order (a reorder breaks them)
SIGNATURES = {
    "put": ["data", "partition_id", "metadata", "tags"],
    "get_meta": [
        "data_fields", "batch_size", "partition_id", "task_name", "sampling_config", "wait",
        "timeout", "drop_last", "where", "max_version_lag", "evict", "lease_s", "lease_group",
        "mode",
    ],
    "get_data": ["meta", "fields", "device", "metadata"],
    "clear_partition": ["partition_id"],
    "clear_samples": ["meta", "metadata"],
    "check_consumption_status": ["task_name", "partition_id"],
    "check_production_status": ["data_fields", "partition_id"],
    "get_consumption_status": ["task_name", "partition_id"],
    "get_production_status": ["data_fields", "partition_id"],
    "reset_consumption": ["partition_id", "task_name"],
    "set_custom_meta": ["metadata"],
    "kv_put": ["keys", "partition_id", "fields", "tags"],
    "kv_get": ["keys", "partition_id", "select_fields"],
    "kv_clear": ["keys", "partition_id"],
    "save_checkpoint": ["path", "metadata", "progress"],
    "load_checkpoint": ["path", "overwrite", "progress"],
}  # fmt: skip


def params(fn: object) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]  # type: ignore[arg-type]


def test_public_names_do_not_change_by_accident() -> None:
    assert sorted(tq.__all__) == sorted(PUBLIC_NAMES)
    for name in tq.__all__:
        assert hasattr(tq, name), name


#: the sync facade's own methods: the one sync bridge (streaming drives the async client with it)
BRIDGE = ["finish", "iterate", "run"]


def test_sync_client_methods_mirror_the_async_client() -> None:
    sync_cls, async_cls = tq.TransferQueueClient, tq.AsyncTransferQueueClient
    public = sorted(
        n
        for n in dir(sync_cls)
        if not n.startswith("_") and not isinstance(inspect.getattr_static(sync_cls, n), property)
    )
    assert public == sorted([*SYNC_METHODS, *BRIDGE])
    for name in SYNC_METHODS:
        assert inspect.signature(getattr(sync_cls, name)) == inspect.signature(
            getattr(async_cls, name)
        ), name
    for name, want in SIGNATURES.items():
        assert params(getattr(sync_cls, name)) == want, name


def test_async_upstream_aliases_have_upstream_argument_order() -> None:
    c = tq.AsyncTransferQueueClient
    assert params(c.async_put)[:3] == ["data", "metadata", "partition_id"]
    assert params(c.async_get_meta)[:6] == [
        "data_fields", "batch_size", "partition_id", "mode", "task_name", "sampling_config",
    ]  # fmt: skip
    for name in (
        "get_data", "clear_partition", "clear_samples", "reset_consumption",
        "check_consumption_status", "check_production_status", "get_consumption_status",
        "get_production_status", "get_partition_list", "set_custom_meta", "kv_list",
    ):  # fmt: skip
        assert inspect.iscoroutinefunction(getattr(c, f"async_{name}")), name
        assert params(getattr(c, f"async_{name}")) == params(getattr(c, name)), name


# ------------------------------------------------ the API checklist
def test_kv_put_returns_the_keys_metadata(client, pid) -> None:
    first = client.kv_put(["a", "b"], pid, {"x": torch.ones(2, 1)}, [{"n": 1}, {"n": 2}])
    assert (first.fields, first.tags) == (["x"], [{"n": 1}, {"n": 2}])
    more = client.kv_put(["a", "b"], pid, {"y": torch.zeros(2)})
    assert more.rows == first.rows and more.fields == ["x", "y"]  # every field the keys have
    tagged = client.kv_put(["a"], pid, tags=[{"done": True}])
    assert tagged.fields == ["x", "y"] and tagged.tags == [{"n": 1, "done": True}]
    assert sorted(client.get_data(tagged).keys()) == ["x", "y"]
    # a key that has fewer fields: only the fields every key has
    assert client.kv_put(["a", "c"], pid, {"y": torch.ones(2)}).fields == ["y"]


def test_put_takes_upstream_keywords(client, pid) -> None:
    meta = client.put(data={"x": torch.ones(2, 1)}, metadata=None, partition_id=pid)
    again = client.put(data={"z": torch.ones(2)}, metadata=meta, partition_id=None)
    assert again.rows == meta.rows


KEYWORD_ONLY = {
    "put": ["tags"],
    "get_meta": ["wait", "timeout", "drop_last", "where", "max_version_lag", "evict", "lease_s"],
    "get_data": ["fields", "device", "metadata"],
    "reserve": ["timeout", "wait"],
    "kv_list": ["where", "min_count", "timeout"],
    "create_partition": ["max_staleness", "global_batch_size"],
    "clear_samples": ["metadata"],
}


def test_parameters_after_the_first_few_are_keyword_only() -> None:
    for cls in (tq.AsyncTransferQueueClient, tq.TransferQueueClient):
        for name, names in KEYWORD_ONLY.items():
            sig = inspect.signature(getattr(cls, name)).parameters
            kinds = {n: sig[n].kind for n in names}
            assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}, (cls, name, kinds)
    assert inspect.signature(tq.AsyncTransferQueueClient.async_put).parameters["tags"].kind == (
        inspect.Parameter.KEYWORD_ONLY
    )


#: methods that return what the caller stored: the metadata given to save_checkpoint
RETURNS_ANY = {"load_checkpoint"}


def test_the_sync_facade_is_the_async_client_typed() -> None:
    import typing

    for name in SYNC_METHODS:
        method = getattr(tq.TransferQueueClient, name)
        target = getattr(tq.AsyncTransferQueueClient, name)
        assert method.__wrapped__ is target, name  # generated from it: mypy sees its types
        hints = typing.get_type_hints(target)
        if name in RETURNS_ANY:
            continue
        assert hints.get("return", typing.Any) is not typing.Any, name


async def test_every_client_closes_both_ways(system, pid) -> None:
    c = system.new_async_client()
    await c.put(batch(1), pid)
    await c.close()
    await c.aclose()
    assert (await c.partition_info(pid)).size == 1  # a later call connects again
    await c.aclose()
    assert callable(tq.TransferQueueClient.close)
    assert hasattr(tq.TransferQueueClient, "__enter__") and hasattr(c, "__aenter__")
