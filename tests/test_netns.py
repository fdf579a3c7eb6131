"""zmq across hosts, for real: two network namespaces joined by a veth pair.

Namespace A serves a system (``python -m transferqueue serve --host 0.0.0.0`` with CURVE
keys); A's only route off itself is the veth, so the address it advertises is its veth
address (the default-route rule). From namespace B, over the veth, a consumer and a
producer process run a small pipeline with allowed keys, while a third process checks that
a client with a key the server does not allow, with the wrong server key or with no key is
refused with AuthenticationError within 2 s -- and, B having no default route, that a
wildcard bind there is refused for want of an address to advertise. The producer starts
after the refusals, so the pipeline finishing shows the server served on.

Needs ``ip netns`` (root, or CAP_NET_ADMIN); skipped with the reason where the machine does
not allow it. The namespaces (and with them the veth pair) are deleted afterwards, whatever
happened. Only the namespaces' own veth addresses (10.213.0.0/16, random per run) are used.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transferqueue.runtime.transports.zmq_auth import write_key_pair

ROWS = 16

# the scripts import first, then read their config from stdin: their start-up overlaps the
# server's (an interpreter importing torch took 17 s on a loaded 2-core machine)
CONSUMER = """
import json, sys
import transferqueue as tq
tq.init(json.loads(sys.stdin.readline()))
client = tq.get_client()
client.create_partition("job", expected_size=int(sys.argv[1]))
print("READY", flush=True)
rows = []
while not (meta := client.get_meta(["x"], 4, "job", "train", timeout=60)).is_empty:
    rows += client.get_data(meta)["x"].tolist()
print("GOT " + json.dumps(sorted(rows)), flush=True)
tq.close()
"""

PRODUCER = """
import json, sys, torch
import transferqueue as tq
tq.init(json.loads(sys.stdin.readline()))
client = tq.get_client()
for start in range(0, int(sys.argv[1]), 4):
    client.put({"x": torch.arange(start, start + 4)}, partition_id="job")
print("DONE", flush=True)
tq.close()
"""

CHECKER = """
import json, sys, time
import transferqueue as tq
from transferqueue.config import ZmqConfig
from transferqueue.errors import AuthenticationError, ConfigError
from transferqueue.runtime.transports.zmq_auth import advertised_host
out = {}
for why, config in json.loads(sys.stdin.readline()).items():
    started = time.monotonic()
    try:
        tq.init(config)
        out[why] = "served"
    except AuthenticationError:
        out[why] = time.monotonic() - started
    except Exception as exc:
        out[why] = repr(exc)
try:
    out["wildcard without a route"] = advertised_host(ZmqConfig(host="0.0.0.0"))
except ConfigError as exc:
    out["wildcard without a route"] = str(exc)
print("CHECKED " + json.dumps(out), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Namespaces A and B joined by a veth pair: A at .1, B at .2 of a random /30 in
    10.213.0.0/16; A's default route goes through B."""
    tag = f"{os.getpid() % 1000:03d}{random.randrange(16**4):04x}"
    a, b = f"tqa{tag}", f"tqb{tag}"
    net = f"10.213.{random.randrange(256)}.{4 * random.randrange(64)}"
    base = net.rsplit(".", 1)
    ip_a, ip_b = f"{base[0]}.{int(base[1]) + 1}", f"{base[0]}.{int(base[1]) + 2}"
    try:
        _ip("netns", "add", a)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"network namespaces are not available here (`ip netns add` failed: {detail})")
    made = [a]
    try:
        _ip("netns", "add", b)
        made.append(b)
        _ip("link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b)
        for ns, dev, addr in ((a, a, ip_a), (b, b, ip_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", a, "route", "add", "default", "via", ip_b)
        yield {"a": a, "b": b, "ip_a": ip_a, "ip_b": ip_b}
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class Proc:
    """A process in a namespace; its output lines (stdout and stderr) arrive in a queue."""

    def __init__(self, ns: str, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:  # closed at its end (the process exited)
            for line in self.popen.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the first output line starting with ``prefix``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {timeout} s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"exited ({self.popen.poll()}) before {prefix!r}: {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def stop(self, how: str = "kill") -> None:
        if self.popen.poll() is None:
            self.popen.terminate() if how == "term" else self.popen.kill()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        self._reader.join(timeout=10)


@pytest.mark.timeout(240)  # < 30 s on an idle machine; minutes on a loaded one
def test_pipeline_across_namespaces_with_curve_keys(namespaces, tmp_path: Path) -> None:
    ns = namespaces
    keys = tmp_path / "keys"
    allowed = keys / "allowed"
    _, server_secret = write_key_pair(keys, "server")
    _, client_secret = write_key_pair(allowed, "client")
    _, stranger_secret = write_key_pair(keys, "stranger")
    other_public, _ = write_key_pair(keys, "other")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    serve_cmd = [sys.executable, "-m", "transferqueue", "serve", "--host", "0.0.0.0"]
    serve_cmd += ["--units", "1", "--server-key", str(server_secret)]
    serve_cmd += ["--allowed-clients", str(allowed)]
    procs: list[Proc] = []
    try:
        server = Proc(ns["a"], serve_cmd, env)
        procs.append(server)
        consumer, checker, producer = (
            Proc(ns["b"], [sys.executable, "-c", script, str(ROWS)], env)
            for script in (CONSUMER, CHECKER, PRODUCER)
        )
        procs += [consumer, checker, producer]
        started = time.monotonic()
        address = server.expect("transferqueue serving at", 120)
        served = time.monotonic() - started
        assert address.startswith(f"tcp://{ns['ip_a']}:"), address  # A's veth address

        def client(server_key: Path | None, client_key: Path | None) -> dict:
            curve = {"server_key_file": str(server_key), "client_key_file": str(client_key)}
            return {
                "transport": "zmq",
                "system": {"controller": address},
                "runtime": {"call_timeout": 30.0},
                "zmq": {"curve": curve} if server_key else {},
            }

        good = json.dumps(client(keys / "server.key", client_secret))
        refused = {
            "a key the server does not allow": client(keys / "server.key", stranger_secret),
            "the wrong server key": client(other_public, client_secret),
            "no key": client(None, None),
        }
        consumer.send(good)
        checker.send(json.dumps(refused))
        checked = json.loads(checker.expect("CHECKED", 120))
        print(f"\nserving after {served:.1f} s; across the veth: {checked}")
        for why in refused:  # at once: well before the 30 s call timeout (a loaded 2-core
            # host has taken 2-3 s for the attach, the handshake and its refusal together)
            assert isinstance(checked[why], float) and checked[why] < 10.0, (why, checked[why])
        assert "zmq.advertise_host" in checked["wildcard without a route"]
        consumer.expect("READY", 120)
        producer.send(good)  # after the refusals: the server served on
        producer.expect("DONE", 120)
        assert json.loads(consumer.expect("GOT", 60)) == list(range(ROWS))
        print(f"the pipeline ended after {time.monotonic() - started:.1f} s")
        assert consumer.popen.wait(timeout=30) == 0 and producer.popen.wait(timeout=30) == 0
    finally:
        for proc in reversed(procs):
            proc.stop("term" if proc is procs[0] else "kill")
