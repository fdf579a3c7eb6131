"""The public TransferQueue's config shape is mapped onto ours (transferqueue.upstream_config)."""

from __future__ import annotations

import logging

import pytest

from transferqueue.config import load_config, read_config_file
from transferqueue.controller.samplers import BUILTIN_SAMPLERS
from transferqueue.errors import ConfigError
from transferqueue.upstream_config import _SAMPLER_NAMES, TABLE, from_upstream

#: upstream's default config.yaml, as its init merges it into every config
UPSTREAM_DEFAULT = {
    "controller": {"sampler": "SequentialSampler", "polling_mode": False, "zmq_info": None},
    "backend": {
        "storage_backend": "SimpleStorage",
        "SimpleStorage": {
            "total_storage_size": 100000,
            "num_data_storage_units": 2,
            "zmq_info": None,
        },
        "MooncakeStore": {"auto_init": True, "protocol": "tcp"},
        "RayStore": None,
        "Yuanrong": {"auto_init": True},
    },
    "metrics": {"enabled": False, "port": 0},
}


def test_upstream_default_config_maps_to_ours() -> None:
    cfg = load_config(UPSTREAM_DEFAULT)
    assert cfg.storage.units == 2
    assert cfg.controller.sampler == "sequential"
    assert cfg.metrics.port is None  # upstream's port 0 with enabled: False serves nothing


def test_units_map_and_mix_with_our_keys() -> None:
    cfg = load_config(
        {"transport": "zmq", "backend": {"SimpleStorage": {"num_data_storage_units": 5}}}
    )
    assert (cfg.transport, cfg.storage.units) == ("zmq", 5)
    same = {"backend": {"SimpleStorage": {"num_data_storage_units": 3}}, "storage": {"units": 3}}
    assert load_config(same).storage.units == 3
    with pytest.raises(ConfigError, match="say different things"):
        load_config({"backend": {"SimpleStorage": {"num_data_storage_units": 2}}, "storage": {"units": 3}})  # fmt: skip
    with pytest.raises(ConfigError, match="num_data_storage_units: bad value"):
        load_config({"backend": {"SimpleStorage": {"num_data_storage_units": "two"}}})


def test_polling_mode_is_a_noop_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transferqueue.config"):
        load_config({"controller": {"polling_mode": False}})
        assert not caplog.records  # False is what we do anyway: no note
        load_config({"controller": {"polling_mode": True}})
    assert len(caplog.records) == 1 and "polling_mode is ignored" in caplog.records[0].message
    _, notes = from_upstream({"backend": {"SimpleStorage": {"total_storage_size": 10}}})
    assert len(notes) == 1 and "capacity_bytes" in notes[0]


def test_upstream_keys_we_cannot_honour_raise() -> None:
    with pytest.raises(ConfigError, match="MooncakeStore"):
        load_config({"backend": {"storage_backend": "MooncakeStore"}})
    with pytest.raises(ConfigError, match=r"backend\.SimpleStorage\.payload_transport"):
        load_config({"backend": {"SimpleStorage": {"payload_transport": {"enabled": True}}}})
    with pytest.raises(ConfigError, match=r"controller\.zmq_info"):
        load_config({"controller": {"zmq_info": {"ip": "10.0.0.1"}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'controller\.foo'"):
        load_config({"controller": {"foo": 1}})


def test_metrics_enabled_maps_to_a_port() -> None:
    assert load_config({"metrics": {"enabled": True}}).metrics.port == 0
    assert load_config({"metrics": {"enabled": True, "port": 9100}}).metrics.port == 9100
    assert load_config({"metrics": {"port": 9100}}).metrics.port == 9100  # ours, untouched


def test_upstream_sampler_names_are_our_builtins() -> None:
    for upstream, ours in _SAMPLER_NAMES.items():
        assert BUILTIN_SAMPLERS[ours].__name__ == upstream
    sampler = load_config({"controller": {"sampler": "GRPOGroupNSampler"}}).controller.sampler
    assert sampler == "grpo"


def test_the_input_is_not_changed_and_the_table_names_upstream_keys() -> None:
    before = repr(UPSTREAM_DEFAULT)
    from_upstream(UPSTREAM_DEFAULT)
    assert repr(UPSTREAM_DEFAULT) == before
    assert ("controller", "polling_mode") in TABLE
    assert ("backend", "SimpleStorage", "num_data_storage_units") in TABLE


def test_upstream_shape_in_a_yaml_file(tmp_path) -> None:
    path = tmp_path / "tq.yaml"
    path.write_text(
        "controller:\n  polling_mode: false\n"
        "backend:\n  storage_backend: SimpleStorage\n  SimpleStorage:\n"
        "    num_data_storage_units: 4\n"
    )
    assert load_config(path).storage.units == 4
    read_config_file(path)  # checked, no error
    path.write_text("backend:\n  SimpleStorage:\n    bogus: 1\n")
    with pytest.raises(ConfigError, match=r"tq.yaml.*backend.SimpleStorage.bogus"):
        load_config(path)
