"""The main job (``python -m transferqueue demo``) and every tutorial run end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT
from doc_examples import run_here

from transferqueue.__main__ import main

TUTORIALS = {
    "01_quick_start.py": "quick start: OK",
    "02_key_value.py": "key-value: OK",
    "03_batchmeta_and_stages.py": "batchmeta and stages: OK",
    "04_partitions_slots_seal.py": "partitions, slots and seal: OK",
    "05_custom_sampler.py": "custom sampler: OK",
    "06_streaming_dataloader_dp.py": "streaming dataloader with DP ranks: OK",
    "07_choosing_a_transport.py": "choosing a transport (inproc): OK",
    "08_group_filters_and_token_budget.py": "group filters and token budget: OK",
    "10_consumer_leases.py": "consumer leases: OK",
    "11_staleness_bounded_rollouts.py": "staleness-bounded rollouts: OK",
    "12_tag_filtered_waits.py": "tag-filtered waits: OK",
}
SMALL = ["--steps", "2", "--global-batch-size", "16", "--producers", "3", "--seed", "7"]


def run_demo(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    assert main(["demo", *flags, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "verification: OK: 32 rows, each consumed exactly once" in out
    for stage in ("rollout", "compute_log_prob", "update_actor"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    return out


def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_demo(capsys)
    assert "transport=inproc" in out and "put->consume p50" in out


def test_demo_command_prints_only_our_output(python_env: dict[str, str]) -> None:
    """``python -m transferqueue demo`` as a user runs it: no torch log line on stderr (torch
    logs "is_fx_tracing will return true ..." the first time a jagged tensor is built)."""
    proc = subprocess.run(
        [sys.executable, "-m", "transferqueue", "demo", *SMALL],
        capture_output=True,
        text=True,
        env=python_env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verification: OK" in proc.stdout
    assert "is_fx_tracing" not in proc.stderr
    assert proc.stderr == "", proc.stderr[-3000:]


@pytest.mark.slow
def test_demo_on_the_transport_under_test(
    transport_name: str, base_config: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    if transport_name == "inproc":
        pytest.skip("test_demo_runs_end_to_end covers inproc")
    assert f"transport={transport_name}" in run_demo(capsys, "--transport", transport_name)


def test_async_demo_recovers_a_crashed_consumer(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --async``: staleness-bounded rollout, leased training, one injected consumer
    crash whose rows come back after the lease and are acked exactly once."""
    flags = ["demo", "--async", "--max-staleness", "1", "--lease-s", "0.5", *SMALL]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "transport=inproc" in out and "max_staleness=1" in out
    assert "verification: OK: 32 rows, each acked exactly once by train" in out
    line = next(x for x in out.splitlines() if x.startswith("redelivered: "))
    assert int(line.split()[1]) >= 1, line
    assert "samples/s: " in out
    hist = next(x for x in out.splitlines() if x.startswith("staleness "))
    counts = hist.split(": ", 1)[1].split(" (of ")[0]
    staleness = {int(a): int(b) for a, b in (kv.split(": ") for kv in counts.split(", "))}
    # 2 steps with k = 1: every row is at most 1 version old by construction
    assert sum(staleness.values()) == 32 and max(staleness) <= 1, hist


@pytest.mark.parametrize("flags", [["--transport", "carrier-pigeon"], ["--global-batch-size", "6"]])
def test_demo_bad_flag_gets_argparse_message(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *flags])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def run_script(name: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "tutorials" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_runs(name: str) -> None:
    """Each tutorial on the in-process transport, run as ``__main__`` in this interpreter
    (doc_examples.run_here); 07 and 09 also run as scripts of their own on zmq and ray."""
    path = ROOT / "tutorials" / name
    assert TUTORIALS[name] in run_here(path.read_text(), str(path))


@pytest.mark.slow
def test_tutorial_07_on_the_transport_under_test(
    transport_name: str, base_config: dict, python_env: dict[str, str]
) -> None:
    if transport_name == "inproc":
        pytest.skip("test_tutorial_runs covers inproc")
    out = run_script("07_choosing_a_transport.py", python_env, "--transport", transport_name)
    assert f"choosing a transport ({transport_name}): OK" in out
