"""Config files: ``tq.init(path)``, ``load_config(path)`` and ``serve --config`` read YAML and
TOML files that hold the keys of the dict form."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import transferqueue as tq
from transferqueue.__main__ import _parser
from transferqueue.cli.serve import _config
from transferqueue.config import config_file_path, load_config, read_config_file
from transferqueue.errors import ConfigError

YAML = """\
transport: inproc
storage:
  units: 3
  stripe_rows: 16
controller:
  pre_allocate: 5
runtime:
  call_timeout: 30.0
"""
TOML = """\
transport = "inproc"

[storage]
units = 3
stripe_rows = 16

[controller]
pre_allocate = 5

[runtime]
call_timeout = 30.0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check(cfg: tq.Config) -> None:
    assert cfg.transport == "inproc"
    assert (cfg.storage.units, cfg.storage.stripe_rows) == (3, 16)
    assert cfg.controller.pre_allocate == 5
    assert cfg.runtime.call_timeout == 30.0


@pytest.mark.parametrize(("name", "text"), [("c.yaml", YAML), ("c.yml", YAML), ("c.toml", TOML)])
def test_load_config_reads_yaml_and_toml_like_the_dict_form(
    tmp_path: Path, name: str, text: str
) -> None:
    path = write(tmp_path, name, text)
    check(load_config(path))  # a pathlib.Path
    check(load_config(str(path)))
    assert load_config(path) == load_config(read_config_file(path))


@pytest.mark.parametrize(("name", "text"), [("c.yaml", YAML), ("c.toml", TOML)])
def test_init_starts_the_system_a_config_file_describes(
    tmp_path: Path, name: str, text: str
) -> None:
    path = write(tmp_path, name, text)
    try:
        cfg = tq.init(str(path))
        check(cfg)
        assert cfg.system is not None
        client = tq.get_client()
        client.create_partition("p", expected_size=2)
        client.put({"x": torch.arange(4).reshape(2, 2)}, partition_id="p")
        meta = client.get_meta(["x"], batch_size=2, partition_id="p", task_name="t")
        assert client.get_data(meta)["x"].tolist() == [[0, 1], [2, 3]]
    finally:
        tq.close()


def test_init_takes_a_path_object(tmp_path: Path) -> None:
    try:
        check(tq.init(write(tmp_path, "c.toml", TOML)))
    finally:
        tq.close()


def test_a_file_without_a_config_suffix_is_read_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "tq-config", YAML)
    assert config_file_path(str(path)) == path
    check(load_config(str(path)))


def test_addresses_stay_addresses() -> None:
    for address in ("tcp://127.0.0.1:5555", "ipc:///tmp/tq.yaml", "no-such-thing"):
        assert config_file_path(address) is None
    assert config_file_path("missing.toml") == Path("missing.toml")


@pytest.mark.parametrize(
    ("name", "text"),
    [("c.yaml", "storage:\n  unitz: 3\n"), ("c.toml", "[storage]\nunitz = 3\n")],
)
def test_an_unknown_key_in_a_file_is_named_with_its_path(
    tmp_path: Path, name: str, text: str
) -> None:
    path = write(tmp_path, name, text)
    for attempt in (lambda: load_config(path), lambda: tq.init(str(path))):
        with pytest.raises(ConfigError, match=r"'storage\.unitz'") as exc:
            attempt()
        assert str(path) in str(exc.value)
        assert "units" in str(exc.value)  # the valid keys are listed


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "nope.yaml"), tmp_path / "nope.toml"):
        with pytest.raises(ConfigError, match="does not exist") as exc:
            tq.init(missing)
        assert str(missing) in str(exc.value)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("c.yaml", "storage: [1, 2\n", "not valid YAML"),
        ("c.toml", "storage = \n", "not valid TOML"),
        ("c.yaml", "- 1\n- 2\n", "mapping at the top level"),
        ("c.yaml", "storage:\n  units: 0\n", "storage.units must be >= 1"),
        ("c.yaml", "storage:\n  units: two\n", "bad value"),
    ],
)
def test_bad_files_are_config_errors_naming_the_file(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_an_empty_yaml_file_is_every_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "c.yaml", "")) == tq.Config()


def test_a_string_that_is_no_file_is_refused_by_load_config() -> None:
    with pytest.raises(ConfigError, match="must name a"):
        load_config("tcp://127.0.0.1:5555")


def test_the_readme_yaml_example_loads(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration files", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert blocks, "README's Configuration files section shows a YAML example"
    for block in blocks:
        load_config(write(tmp_path, "config.yaml", block))


def serve_args(*argv: str):
    return _parser().parse_args(["serve", *argv])


@pytest.mark.parametrize(("name", "text"), [("s.yaml", YAML), ("s.toml", TOML)])
def test_serve_config_reads_the_file_then_the_options(tmp_path: Path, name: str, text: str) -> None:
    body = text.replace("inproc", "zmq")
    config = _config(serve_args("--config", str(write(tmp_path, name, body)), "--units", "4"))
    assert config["transport"] == "zmq"
    assert config["storage"] == {"units": 4, "stripe_rows": 16}  # --units wins
    assert config["controller"] == {"pre_allocate": 5}
    assert load_config(config).storage.units == 4


def test_serve_config_without_a_file_is_zmq() -> None:
    assert load_config(_config(serve_args("--protocol", "ipc"))).zmq.protocol == "ipc"


def test_serve_refuses_a_bad_file_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "s.toml", "[storage]\nunitz = 3\n")
    with pytest.raises(ConfigError, match=r"'storage\.unitz'") as exc:
        _config(serve_args("--config", str(path)))
    assert str(path) in str(exc.value)
    inproc = write(tmp_path, "i.yaml", "transport: inproc\n")
    with pytest.raises(ConfigError, match="serve runs the zmq transport"):
        _config(serve_args("--config", str(inproc)))


def test_serve_with_a_bad_file_exits_2_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferqueue.__main__ import main

    path = write(tmp_path, "s.yaml", "storage:\n  unitz: 3\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'storage.unitz'" in err and str(path) in err


@pytest.mark.slow
def test_serve_command_starts_from_a_toml_file_and_stops_on_sigterm(
    tmp_path: Path, python_env: dict[str, str]
) -> None:
    path = write(tmp_path, "s.toml", '[storage]\nunits = 1\n\n[zmq]\nhost = "127.0.0.1"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferqueue", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("transferqueue serving at tcp://127.0.0.1:"), first
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "transferqueue stopped" in out
