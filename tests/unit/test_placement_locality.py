"""Locality in placement, and the placement keys of the config (pure; no cluster)."""

from __future__ import annotations

import pytest

from transferqueue.config import load_config
from transferqueue.controller.placement import Placement
from transferqueue.errors import ConfigError


def test_a_put_from_a_node_goes_to_that_nodes_live_units_round_robin() -> None:
    placement = Placement(4, stripe_rows=2)
    placement.set_nodes(["a", "b", "a", "b"])
    units, cursor = placement.assign(0, 8, node="b")
    assert units.tolist() == [1, 1, 3, 3, 1, 1, 3, 3]
    units, _ = placement.assign(cursor, 2, node="a")
    assert set(units.tolist()) <= {0, 2}
    # a node without units (or unknown): every live unit
    units, _ = placement.assign(0, 8, node="c")
    assert units.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert placement.assign(0, 8, node=None)[0].tolist() == units.tolist()
    # the node's units died: the others take its rows
    placement.dead.update({1, 3})
    assert set(placement.assign(0, 8, node="b")[0].tolist()) == {0, 2}
    placement.dead.add(2)
    assert set(placement.assign(0, 4, node="a")[0].tolist()) == {0}


def test_set_nodes_needs_one_node_per_unit() -> None:
    placement = Placement(2)
    placement.set_nodes(None)  # a transport that does not tell nodes apart
    assert placement.nodes == [None, None]
    with pytest.raises(ValueError, match="one node per unit"):
        placement.set_nodes(["a"])


def test_placement_keys_need_the_ray_transport_and_good_values() -> None:
    config = load_config(
        {"transport": "ray", "storage": {"units_per_node": 2, "nodes": ["n1", "n2"]}}
    )
    assert config.storage.nodes == ("n1", "n2")
    assert load_config({"transport": "ray", "controller": {"node": "n1"}}).controller.node == "n1"
    for bad in (
        {"storage": {"units_per_node": 1}},
        {"storage": {"nodes": ["n1"]}},
        {"controller": {"node": "n1"}},
    ):
        with pytest.raises(ConfigError, match="need transport 'ray'"):
            load_config({"transport": "zmq", **bad})
    with pytest.raises(ConfigError, match="units_per_node"):
        load_config({"transport": "ray", "storage": {"units_per_node": 0}})
    with pytest.raises(ConfigError, match=r"storage\.nodes"):
        load_config({"transport": "ray", "storage": {"nodes": "n1"}})
    with pytest.raises(ConfigError, match="data_path"):
        load_config({"transport": "ray", "ray": {"data_path": "grpc"}})
