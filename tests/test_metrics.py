"""Prometheus metrics: one endpoint per system, in the process that owns it, scraped over
HTTP (loopback only) before and after some work."""

from __future__ import annotations

import urllib.request

import pytest
import torch
from tensordict import TensorDict

import transferqueue as tq
from transferqueue.config import load_config
from transferqueue.errors import ConfigError, PartitionNotFoundError
from transferqueue.ops import metrics
from transferqueue.system import current

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered():
    """The default system (inproc) with metrics on an OS-chosen loopback port."""
    tq.init({"transport": "inproc", "metrics": {"port": 0}})
    try:
        server = metrics.url_of(current())
        assert server is not None, "tq.init starts the endpoint when metrics.port is set"
        yield metrics.ensure_started(current())  # the one tq.init started
    finally:
        tq.close()  # stops the endpoint too


def test_a_scrape_before_and_after_work_shows_the_figures_move(metered) -> None:
    assert tq.status()["metrics_url"] == metered.url
    before = _scrape(metered.url)
    assert _value(before, "transferqueue_up") == 1.0
    client = tq.get_client()
    client.create_partition("m", expected_size=6)
    client.put(TensorDict({"a": torch.arange(4)}, batch_size=[4]), partition_id="m")
    client.get_data(client.get_meta(["a"], batch_size=2, partition_id="m", task_name="train"))
    with pytest.raises(PartitionNotFoundError):
        client.partition_info("no-such-partition")
    after = _scrape(metered.url)

    assert (
        _value(after, "transferqueue_puts_total") == _value(before, "transferqueue_puts_total") + 1
    )
    assert (
        _value(after, "transferqueue_gets_total") == _value(before, "transferqueue_gets_total") + 1
    )
    commit = {"actor": "controller", "unit": "", "method": "commit"}
    assert _value(after, "transferqueue_requests_total", **commit) == 1.0
    assert _value(after, "transferqueue_request_duration_seconds_count", **commit) == 1.0
    assert (
        _value(after, "transferqueue_request_duration_seconds_bucket", **commit, le="+Inf") == 1.0
    )
    assert _value(after, "transferqueue_request_duration_seconds_sum", **commit) > 0
    err = {"actor": "controller", "unit": "", "method": "partition_info"}
    assert (
        _value(after, "transferqueue_request_errors_total", **err, type="PartitionNotFoundError")
        == 1
    )
    unit_puts = sum(
        _value(after, "transferqueue_requests_total", actor="unit", unit=u, method="put")
        for u in ("0", "1")
    )
    assert unit_puts >= 1
    assert sum(_value(after, "transferqueue_unit_bytes", unit=u) for u in ("0", "1")) >= 4 * 8
    assert sum(_value(after, "transferqueue_unit_rows", unit=u) for u in ("0", "1")) == 4
    assert _value(after, "transferqueue_stored_bytes") >= 4 * 8
    rows = {
        s: _value(after, "transferqueue_partition_rows", partition="m", state=s)
        for s in ("size", "pending", "in_flight", "lost")
    }
    assert rows == {"size": 6, "pending": 2, "in_flight": 0, "lost": 0}
    assert _value(after, "transferqueue_partition_produced_rows", partition="m", field="a") == 4
    assert _value(after, "transferqueue_partition_consumed_rows", partition="m", task="train") == 2
    assert _value(after, "transferqueue_partition_expected_size", partition="m") == 6
    assert _value(after, "transferqueue_partition_sealed", partition="m") == 0
    assert ("transferqueue_partition_rows", (("partition", "m"), ("state", "size"))) not in before


def test_metrics_are_off_by_default_and_the_port_is_checked() -> None:
    assert load_config({}).metrics.port is None
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_config({"metrics": {"port": "9090"}})
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_config({"metrics": {"port": 70000}})
    tq.init({"transport": "inproc"})
    try:
        assert metrics.ensure_started(current()) is None
        assert tq.status()["metrics_url"] is None
    finally:
        tq.close()


def test_the_endpoint_stops_from_async_code_too() -> None:
    from transferqueue.runtime.loop import runtime_loop

    tq.init({"transport": "inproc", "metrics": {"port": 0}})
    try:
        system = current()
        server = metrics.ensure_started(system)
        assert server is not None and metrics.ensure_started(system) is server  # once
        assert _value(_scrape(server.url), "transferqueue_up") == 1.0
        runtime_loop().run(metrics.astop(system))
        assert metrics.url_of(system) is None
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url, timeout=5)
    finally:
        tq.close()


def test_a_scrape_of_a_stopped_system_says_it_is_down() -> None:
    assert [s.value for f in metrics.families(None) for s in f.samples] == [0.0]
