"""CURVE authentication of the zmq transport, and where a zmq server binds and advertises.

On loopback only (tests/test_netns.py runs the same across two network namespaces): a
system with CURVE keys serves a client holding an allowed key; a client with a key the
server does not allow, with the wrong server key or with no key at all gets
AuthenticationError within REFUSED_S (its call timeout is 30 s), and the server serves the
good client on. Plus the config checks, the bind rule, the advertise rule and the keygen
command.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from pathlib import Path

import pytest
import torch
import zmq.auth
from actors import Echo

from transferqueue.__main__ import main
from transferqueue.config import ZmqConfig, load_config
from transferqueue.errors import AuthenticationError, ConfigError
from transferqueue.runtime.loop import runtime_loop
from transferqueue.runtime.transports import zmq_auth
from transferqueue.runtime.transports.base import ActorRef
from transferqueue.runtime.transports.zmq import ZmqTransport
from transferqueue.system import attach_system, start_system

#: a refused client's call must fail within this (its timeout is 30 s)
REFUSED_S = 2.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key files: the server's, an allowed client's (in the allowed folder), a stranger's
    and another server's."""
    folder = tmp_path_factory.mktemp("keys")
    allowed = folder / "allowed"
    out: dict[str, Path] = {}
    for name, where in (("server", folder), ("client", allowed), ("stranger", folder)):
        out[f"{name}.key"], out[f"{name}.key_secret"] = zmq_auth.write_key_pair(where, name)
    out["other.key"], _ = zmq_auth.write_key_pair(folder, "other")
    out["allowed"] = allowed
    return out


def curve(**values: object) -> dict:
    return {"transport": "zmq", "zmq": {"curve": {k: str(v) for k, v in values.items()}}}


@pytest.fixture(scope="module")
def curve_system(keys):
    config = load_config(
        {
            "transport": "zmq",
            "storage": {"units": 1},
            "zmq": {
                "curve": {
                    "server_key_file": str(keys["server.key_secret"]),
                    "allowed_clients_dir": str(keys["allowed"]),
                }
            },
        }
    )
    system = runtime_loop().run(start_system(config))
    yield system
    runtime_loop().run(system.aclose())


def attach(system, config: dict):
    """A client process's view: its own config naming the controller only."""
    address = system.config.system["controller"]["endpoint"]
    return attach_system(load_config({**config, "system": {"controller": address}}))


@pytest.mark.timeout(90)
def test_allowed_client_runs_put_and_get_and_refused_ones_fail_fast(curve_system, keys) -> None:
    good = attach(
        curve_system,
        curve(server_key_file=keys["server.key"], client_key_file=keys["client.key_secret"]),
    )
    client = good.client
    client.put({"x": torch.arange(8).reshape(4, 2)}, partition_id="p")
    meta = client.get_meta(["x"], 4, "p", "train", timeout=30)
    assert client.get_data(meta)["x"].tolist() == torch.arange(8).reshape(4, 2).tolist()

    refused = {
        "a key the server does not allow": curve(
            server_key_file=keys["server.key"], client_key_file=keys["stranger.key_secret"]
        ),
        "the wrong server key": curve(
            server_key_file=keys["other.key"], client_key_file=keys["client.key_secret"]
        ),
        "no key": {"transport": "zmq"},
    }
    for why, config in refused.items():
        started = time.monotonic()
        with pytest.raises(AuthenticationError):
            attach(curve_system, {**config, "runtime": {"call_timeout": 30.0}})
        took = time.monotonic() - started
        print(f"\na client with {why} was refused after {took:.3f} s")
        assert took < REFUSED_S, (why, took)

    # the server serves on: the good client writes and reads again
    client.put({"x": torch.ones(2, 2, dtype=torch.int64)}, partition_id="p")
    meta = client.get_meta(["x"], 2, "p", "train", timeout=30)
    assert client.get_data(meta)["x"].sum().item() == 4
    runtime_loop().run(good.async_client.close())


@pytest.mark.timeout(60)
async def test_refused_client_fails_its_waiting_and_later_calls(keys) -> None:
    server = load_config(curve(server_key_file=keys["server.key_secret"]))
    handle = await ZmqTransport(server).spawn(Echo)
    stranger = ActorRef(
        handle.ref.address,
        load_config(
            curve(server_key_file=keys["server.key"], client_key_file=keys["stranger.key_secret"])
        ),
    )
    try:
        started = time.monotonic()
        calls = [asyncio.ensure_future(stranger.call("echo", i, timeout=30)) for i in range(3)]
        for call in calls:
            with pytest.raises(AuthenticationError, match="not among the server's allowed clients"):
                await call
        with pytest.raises(AuthenticationError):
            await stranger.call("echo", "later", timeout=30)
        assert time.monotonic() - started < REFUSED_S
        assert await handle.ref.call("echo", "own") == "own"  # the system's own pair
        assert await handle.ref.call("count") == 1
    finally:
        await stranger.aclose()
        await handle.stop()


async def test_keys_as_values_and_allowed_client_keys(keys) -> None:
    server_public, server_secret = zmq.auth.load_certificate(keys["server.key_secret"])
    client_public, client_secret = zmq.auth.load_certificate(keys["stranger.key_secret"])
    assert server_secret is not None and client_secret is not None
    server = load_config(
        {
            "transport": "zmq",
            "zmq": {
                "curve": {
                    "server_secret": server_secret.decode(),  # its public key is derived
                    "allowed_clients": [client_public.decode()],
                }
            },
        }
    )
    handle = await ZmqTransport(server).spawn(Echo)
    config = curve(
        server_public=server_public.decode(),
        client_public=client_public.decode(),
        client_secret=client_secret.decode(),
    )
    ref = ActorRef(handle.ref.address, load_config(config))
    try:
        assert await ref.call("echo", [1, 2]) == [1, 2]
    finally:
        await ref.aclose()
        await handle.stop()


@pytest.mark.parametrize(
    ("zmq_section", "message"),
    [
        ({"curve": {"server_public": "short"}}, "Z85 text"),
        ({"curve": {"allowed_clients": "x" * 40}}, "must be a list"),
        ({"curve": {"client_public": "x" * 40}}, "go together"),
        ({"curve": {"server_key_file": "a", "server_public": "x" * 40}}, "not both"),
        ({"curve": {"client_key_file": "a", "client_secret": "x" * 40}}, "not both"),
        ({"insecure": "yes"}, "zmq.insecure"),
        ({"advertise_host": "0.0.0.0"}, "advertise_host"),
        ({"curve": {"bogus": 1}}, "zmq.curve.bogus"),
    ],
)
def test_bad_curve_config_is_a_clear_error(zmq_section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"transport": "zmq", "zmq": zmq_section})


def test_key_files_that_do_not_hold_what_they_must(keys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read a CURVE key"):
        zmq_auth.load_keys(load_config(curve(server_key_file=tmp_path / "none.key")).zmq.curve)
    with pytest.raises(ConfigError, match="holds no secret key"):
        zmq_auth.load_keys(
            load_config(
                curve(server_key_file=keys["server.key"], client_key_file=keys["client.key"])
            ).zmq.curve
        )
    public_only = load_config(curve(server_key_file=keys["server.key"])).zmq
    with pytest.raises(ConfigError, match="no client key pair"):
        zmq_auth.client_keys(public_only)
    with pytest.raises(ConfigError, match="need its secret"):
        zmq_auth.server_plan(public_only)
    with pytest.raises(ConfigError, match="is not a folder"):
        zmq_auth.load_keys(
            load_config(
                curve(server_key_file=keys["server.key_secret"], allowed_clients_dir=tmp_path / "x")
            ).zmq.curve
        )


async def test_binding_beyond_loopback_needs_keys_or_insecure(keys, caplog) -> None:
    # 192.0.2.7 (TEST-NET-1) is never bound nor addressed: the rule refuses before a bind
    exposed = load_config({"transport": "zmq", "zmq": {"host": "192.0.2.7"}})
    with pytest.raises(ConfigError, match="keygen"):
        await ZmqTransport(exposed).spawn(Echo)  # refused before any process starts
    assert zmq_auth.server_plan(ZmqConfig()).keys is None  # loopback: no keys needed
    assert zmq_auth.server_plan(ZmqConfig(host="192.0.2.7", protocol="ipc")).advertise is None
    with caplog.at_level(logging.WARNING, logger="transferqueue.zmq"):
        plan = zmq_auth.server_plan(ZmqConfig(host="192.0.2.7", insecure=True))
    assert plan.keys is None and "without authentication" in caplog.text
    secured = load_config(
        {"zmq": {"host": "192.0.2.7", "curve": {"server_key_file": str(keys["server.key_secret"])}}}
    )
    assert zmq_auth.server_plan(secured.zmq).keys is not None


def test_serve_refuses_to_expose_a_system_without_keys(capsys) -> None:
    assert main(["serve", "--host", "192.0.2.7", "--units", "1"]) == 2
    err = capsys.readouterr().err
    assert "zmq.insecure" in err and "keygen" in err


async def test_wildcard_host_binds_everywhere_and_advertises_a_concrete_address(keys) -> None:
    config = load_config(
        {
            "transport": "zmq",
            "zmq": {
                "host": "0.0.0.0",
                "advertise_host": "127.0.0.1",
                "curve": {"server_key_file": str(keys["server.key_secret"])},
            },
        }
    )
    handle = await ZmqTransport(config).spawn(Echo)
    try:
        assert handle.ref.address.endpoint.startswith("tcp://127.0.0.1:")
        assert await handle.ref.call("echo", "x") == "x"
    finally:
        await handle.stop()


def test_the_advertise_rule() -> None:
    assert zmq_auth.advertised_host(ZmqConfig(host="10.1.2.3")) is None  # the bound one
    assert zmq_auth.advertised_host(ZmqConfig(host="0.0.0.0", advertise_host="h1")) == "h1"
    route = zmq_auth.default_route_address()
    if route is None:
        with pytest.raises(ConfigError, match="advertise_host"):
            zmq_auth.advertised_host(ZmqConfig(host="0.0.0.0"))
    else:  # the default route's interface: never a wildcard or loopback address
        assert not zmq_auth.is_loopback(route) and route != "0.0.0.0"
        assert zmq_auth.advertised_host(ZmqConfig(host="*")) == route
    assert zmq_auth.advertise("tcp://0.0.0.0:5555", "10.0.0.1") == "tcp://10.0.0.1:5555"
    assert zmq_auth.advertise("ipc:///tmp/x.sock", "10.0.0.1") == "ipc:///tmp/x.sock"
    assert zmq_auth.is_loopback("localhost") and zmq_auth.is_loopback("127.0.0.2")
    assert not zmq_auth.is_loopback("0.0.0.0") and not zmq_auth.is_loopback("example.org")


def test_keygen_writes_a_pair_and_never_overwrites(tmp_path: Path, capsys) -> None:
    assert main(["keygen", str(tmp_path / "k"), "--name", "alice"]) == 0
    out = capsys.readouterr().out
    public, secret = tmp_path / "k" / "alice.key", tmp_path / "k" / "alice.key_secret"
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and sec is not None and pub.decode() in out
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert main(["keygen", str(tmp_path / "k"), "--name", "alice"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert zmq.auth.load_certificate(secret) == (pub2, sec)  # untouched


def test_serve_takes_the_same_options_as_flags(tmp_path: Path) -> None:
    from transferqueue.__main__ import _parser
    from transferqueue.cli.serve import _config

    key = "k" * 40
    file = tmp_path / "s.yaml"
    file.write_text(f"zmq:\n  curve:\n    allowed_clients: ['{'a' * 40}']\n")
    argv = ["serve", "--config", str(file), "--host", "0.0.0.0", "--advertise-host", "10.0.0.5"]
    argv += ["--server-key", "s.key_secret", "--allowed-clients", "clients"]
    argv += ["--allow-client", key, "--insecure"]
    zmq_section = load_config(_config(_parser().parse_args(argv))).zmq
    assert (zmq_section.host, zmq_section.advertise_host) == ("0.0.0.0", "10.0.0.5")
    assert zmq_section.insecure
    assert zmq_section.curve.server_key_file == "s.key_secret"
    assert zmq_section.curve.allowed_clients_dir == "clients"
    assert zmq_section.curve.allowed_clients == ("a" * 40, key)  # the file's, then the flag's
    plain = _config(_parser().parse_args(["serve"]))
    assert "curve" not in plain["zmq"] and not load_config(plain).zmq.curve.enabled


def test_the_readme_across_hosts_example_is_a_valid_config(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Across hosts (zmq)", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    (tmp_path / "client.yaml").write_text(block)
    config = load_config(tmp_path / "client.yaml")
    assert config.zmq.curve.enabled and config.system == {"controller": "tcp://10.0.0.5:41234"}
    assert "serve --host 0.0.0.0" in section and "--server-key" in section
