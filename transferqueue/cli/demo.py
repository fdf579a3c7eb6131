"""``python -m transferqueue demo``: a small RL-style pipeline, streamed end to end.

* the driver creates one partition per step, ``train@step_<k>``, with
  ``expected_size = --global-batch-size`` (pre-allocated slots);
* ``--producers`` rollout threads put one sample at a time -- a prompt, a variable-length
  (jagged) response and a ``uid`` group tag (4 samples per prompt) -- after a random,
  simulated generation delay, in random order;
* ``compute_log_prob`` streams rows as soon as their responses are ready and writes
  ``old_log_probs`` back into the same rows;
* ``update_actor`` runs 2 data-parallel ranks (``RankAwareSampler``), each streaming
  micro-batches of rows that have ``old_log_probs`` through a ``StreamingDataLoader``; they
  start before any rollout exists.

At the end it prints samples/s per stage, put->consume latency (p50/p99) and a
verification line: every row consumed exactly once per task, with matching checksums.

``python -m transferqueue demo --async [--max-staleness K] [--lease-s S]``: asynchronous RL
(docs/async-rl.md) on one staleness partition for the whole run, ``async@run``
(``max_staleness=K``, default 1; ``global_batch_size = --global-batch-size``):

* ``--producers`` rollout threads each ``reserve`` a prompt group (4 slots) *before*
  generating it -- waiting while it would put the rollout more than K policy versions
  ahead of the trainer -- then, after the simulated generation time, fill the reserved
  slots with ``put(data, metadata=reserved)``; each row carries the ``version`` it was
  reserved under;
* the trainer takes ``--global-batch-size`` rows per step under a consumer lease
  (``get_meta(lease_s=S)``, default 2 s), acks them after its simulated step and calls
  ``advance_version``;
* one injected crash: at the last step a second trainer-side consumer (a client of its
  own) takes a leased micro-batch and dies -- it never acks, its client is closed -- so its
  rows come back when the lease expires and the trainer acks them.

It prints samples/s, the staleness histogram of the rows the trainer consumed (its version
when it consumed a row minus the row's ``version`` tag), the redelivered count
(``partition_info(...).redelivered``) and a verification line: every row acked exactly
once, checksums match, the crashed consumer's rows redelivered. Flags shared with the
synchronous demo: ``--transport``, ``--steps``, ``--global-batch-size``, ``--producers``,
``--seed``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

SAMPLES_PER_PROMPT = 4
PROMPT_LEN = 8
DP_RANKS = 2
LOGPROB_BATCH = 8
#: mean simulated generation time of one sample (seconds); the demo's only sleeps
MEAN_GENERATION_S = 0.002
STAGES = ("rollout", "compute_log_prob", "update_actor")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _batch_size(text: str) -> int:
    value = _positive(text)
    if value % (2 * DP_RANKS):
        raise argparse.ArgumentTypeError(f"must be a multiple of {2 * DP_RANKS}, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=["inproc", "zmq", "ray"], default="inproc")
    parser.add_argument("--steps", type=_positive, default=4, help="training steps (default 4)")
    parser.add_argument(
        "--global-batch-size", type=_batch_size, default=64, help="samples per step (default 64)"
    )
    parser.add_argument("--producers", type=_positive, default=4, help="rollout threads (4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--async",
        dest="async_rl",
        action="store_true",
        help="asynchronous RL: staleness-bounded rollout, leased training batches, one crash",
    )
    parser.add_argument(
        "--max-staleness",
        type=_non_negative,
        default=1,
        help="with --async: policy versions the rollout may run ahead (default 1)",
    )
    parser.add_argument(
        "--lease-s",
        type=_seconds,
        default=2.0,
        help="with --async: the trainer's consumer lease in seconds (default 2)",
    )


@dataclass
class Plan:
    steps: int
    batch: int
    producers: int
    seed: int

    def partition(self, step: int) -> str:
        return f"train@step_{step}"

    @property
    def rank_batch(self) -> int:  # per rank; two rounds of DP_RANKS batches per step
        return self.batch // (2 * DP_RANKS)

    @property
    def micro_batch(self) -> int:
        return max(1, self.rank_batch // 2)


@dataclass
class Ledger:
    """What every stage did, recorded from several threads."""

    start: float = field(default_factory=time.monotonic)
    produced: dict[tuple[str, int], int] = field(default_factory=dict)
    consumed: dict[str, list[tuple[tuple[str, int], int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    log_probs: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finished: dict[str, float] = field(default_factory=dict)
    rank_steps: Counter[tuple[int, int]] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, stage: str) -> None:
        with self.lock:
            self.finished[stage] = max(self.finished.get(stage, 0.0), time.monotonic())


def _checksum(*tensors: torch.Tensor) -> int:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.contiguous().numpy().tobytes(), crc)
    return crc


def _sample(seed: int, step: int, uid: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt of group ``uid`` and its ``k``-th response (deterministic)."""
    prompt = torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + uid)
    gen = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + uid * 31 + k)
    length = int(torch.randint(4, 33, (1,), generator=gen))
    return (
        torch.randint(0, 32_000, (PROMPT_LEN,), generator=prompt),
        torch.randint(0, 32_000, (length,), generator=gen),
    )


def _fake_log_probs(response: torch.Tensor) -> torch.Tensor:
    return -torch.log1p((response % 97).float() / 10)


# ------------------------------------------------------------------------- stages


def _produce(plan: Plan, ledger: Ledger, bar: Any, step: int, items: list[tuple[int, int]]) -> None:
    import transferqueue as tq

    client, pid = tq.get_client(), plan.partition(step)
    rng = random.Random(f"{plan.seed}-{step}-{items[:1]}")
    for uid, k in items:
        time.sleep(rng.expovariate(1 / MEAN_GENERATION_S))  # simulated generation time
        prompt, response = _sample(plan.seed, step, uid, k)
        tags = [{"uid": f"{step}-{uid}", "t_put": time.monotonic()}]
        meta = client.put(
            {"prompts": prompt.unsqueeze(0), "responses": [response]}, partition_id=pid, tags=tags
        )
        with ledger.lock:
            ledger.produced[pid, meta.rows[0]] = _checksum(prompt, response)
        bar.update(1)


def _rollout(plan: Plan, ledger: Ledger, bar: Any) -> None:
    """The driver: a partition per step, filled by ``plan.producers`` threads."""
    import transferqueue as tq

    client = tq.get_client()
    for step in range(plan.steps):
        client.create_partition(plan.partition(step), expected_size=plan.batch)
        work = [
            (u, k)
            for u in range(plan.batch // SAMPLES_PER_PROMPT)
            for k in range(SAMPLES_PER_PROMPT)
        ]
        random.Random(plan.seed + step).shuffle(work)
        threads = [
            _spawn(plan, ledger, _produce, bar, step, work[p :: plan.producers])
            for p in range(plan.producers)
        ]
        for t in threads:
            t.join()
    ledger.done("rollout")


def _record(
    ledger: Ledger, task: str, pid: str, rows: list[int], sums: list[int], t_put: list[float]
) -> None:
    now = time.monotonic()
    with ledger.lock:
        ledger.consumed[task].extend(((pid, r), s) for r, s in zip(rows, sums))
        ledger.latency[task].extend(now - t for t in t_put)


def _compute_log_prob(plan: Plan, ledger: Ledger, bar: Any) -> None:
    import transferqueue as tq

    client = tq.get_client()
    cfg = {"dp_rank": 0, "num_groups": 1, "group_size": 1}  # one consumer: one group
    ds = tq.StreamingDataset(
        ["prompts", "responses"], LOGPROB_BATCH, plan.partition(0), "compute_log_prob",
        sampling_config=cfg, timeout=60,
    )  # fmt: skip
    for step in range(plan.steps):
        ds.step(plan.partition(step))
        for data, meta in ds:
            prompts, responses = data["prompts"], list(data["responses"].unbind())
            sums = [_checksum(p, r) for p, r in zip(prompts, responses)]
            _record(ledger, "compute_log_prob", meta.partition_id, meta.rows, sums,
                    [t["t_put"] for t in meta.tags])  # fmt: skip
            log_probs = [_fake_log_probs(r) for r in responses]
            with ledger.lock:
                for r, lp in zip(meta.rows, log_probs):
                    ledger.log_probs[meta.partition_id, r] = _checksum(lp)
            now = time.monotonic()
            client.put(
                {"old_log_probs": log_probs}, metadata=meta, tags=[{"t_put": now}] * len(meta)
            )
            bar.update(len(meta))
    ledger.done("compute_log_prob")


def _train(plan: Plan, ledger: Ledger, bar: Any, rank: int) -> None:
    import transferqueue as tq

    cfg = {"dp_rank": rank, "num_groups": DP_RANKS, "group_size": 1}
    fields = ["prompts", "responses", "old_log_probs"]
    ds = tq.StreamingDataset(
        fields, plan.rank_batch, plan.partition(0), "update_actor",
        micro_batch_size=plan.micro_batch, sampling_config=cfg, timeout=60,
    )  # fmt: skip
    loader = tq.StreamingDataLoader(ds)
    for step in range(plan.steps):
        ds.step(plan.partition(step))
        for data, meta in loader:  # one micro-batch: a forward/backward would go here
            rows = zip(data["prompts"], data["responses"].unbind(), data["old_log_probs"].unbind())
            sums = [_checksum(p, r) ^ _checksum(lp) for p, r, lp in rows]
            _record(ledger, "update_actor", meta.partition_id, meta.rows, sums,
                    [t["t_put"] for t in meta.tags])  # fmt: skip
            with ledger.lock:
                ledger.rank_steps[rank, step] += 1
            bar.update(len(meta))
    ledger.done("update_actor")


# ------------------------------------------------------------------- reporting


def _verify(plan: Plan, ledger: Ledger) -> tuple[bool, str]:
    expected = dict(ledger.produced)
    want_train = {k: s ^ ledger.log_probs.get(k, -1) for k, s in expected.items()}
    problems = []
    if len(expected) != plan.steps * plan.batch:
        problems.append(f"{len(expected)} rows produced, {plan.steps * plan.batch} expected")
    for task, want in (("compute_log_prob", expected), ("update_actor", want_train)):
        got = ledger.consumed.get(task, [])
        counts = Counter(k for k, _ in got)
        if set(counts) != set(want) or any(c != 1 for c in counts.values()):
            problems.append(f"{task}: {len(got)} deliveries of {len(counts)} distinct rows")
        bad = sum(1 for k, s in got if want.get(k) != s)
        if bad:
            problems.append(f"{task}: {bad} checksum mismatches")
    for step in range(plan.steps):
        if len({ledger.rank_steps[r, step] for r in range(DP_RANKS)}) != 1:
            problems.append(f"step {step}: DP ranks took different numbers of micro-batches")
    if problems:
        return False, "verification: FAILED: " + "; ".join(problems)
    return True, (
        f"verification: OK: {len(expected)} rows, each consumed exactly once by "
        f"compute_log_prob and update_actor, checksums match, {DP_RANKS} DP ranks in step"
    )


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else max(values)
    )


def _summary(plan: Plan, ledger: Ledger, transport: str) -> list[str]:
    lines = [
        f"transferqueue demo: transport={transport} steps={plan.steps} "
        f"global_batch_size={plan.batch} producers={plan.producers} dp_ranks={DP_RANKS}",
        f"{'stage':<18}{'samples':>8}{'samples/s':>11}{'put->consume p50':>18}{'p99':>10}",
    ]
    for stage in STAGES:
        n = len(ledger.produced) if stage == "rollout" else len(ledger.consumed.get(stage, []))
        elapsed = ledger.finished.get(stage, time.monotonic()) - ledger.start
        lat = [x * 1e3 for x in ledger.latency.get(stage, [])]
        p50 = f"{_percentile(lat, 50):.2f} ms" if lat else "-"
        p99 = f"{_percentile(lat, 99):.2f} ms" if lat else "-"
        lines.append(f"{stage:<18}{n:>8}{n / max(elapsed, 1e-9):>11.1f}{p50:>18}{p99:>10}")
    lines.append(
        "(put->consume: from a sample's put to its consumer holding it, batch fill included)"
    )
    return lines


# ------------------------------------------------------------------------ main


def _spawn(plan: Plan, ledger: Ledger, fn: Callable[..., None], *args: Any) -> threading.Thread:
    """Run ``fn(plan, ledger, *args)`` in a thread; on failure record the error and seal
    every step's partition, so that the other stages end instead of waiting."""

    def target() -> None:
        try:
            fn(plan, ledger, *args)
        except BaseException as exc:
            ledger.errors.append(exc)
            import transferqueue as tq

            for step in range(plan.steps):
                try:
                    tq.get_client().seal(plan.partition(step))
                except Exception as seal_error:  # keep sealing the rest
                    ledger.errors.append(seal_error)

    thread = threading.Thread(target=target, name=getattr(fn, "__name__", "stage"))
    thread.start()
    return thread


def _config(transport: str) -> dict[str, Any]:
    config: dict[str, Any] = {"transport": transport, "controller": {"sampler": "rank_aware"}}
    # on Ray a namespace of its own: never attach to another job's system
    config["ray"] = {"namespace": f"transferqueue-demo-{time.time_ns()}"}
    return config


def run(args: argparse.Namespace) -> int:
    import transferqueue as tq

    if getattr(args, "async_rl", False):
        from transferqueue.cli.demo_async import run_async

        return run_async(args)
    plan = Plan(args.steps, args.global_batch_size, args.producers, args.seed)
    tq.init(_config(args.transport))
    try:
        ledger = Ledger()
        quiet = not sys.stderr.isatty()
        bars = {
            stage: tqdm(total=plan.steps * plan.batch, desc=f"{stage:<17}", position=i,
                        file=sys.stderr, disable=quiet, unit="sample")
            for i, stage in enumerate(STAGES)
        }  # fmt: skip
        threads = [  # the trainer first: it waits for rows that do not exist yet
            *(_spawn(plan, ledger, _train, bars["update_actor"], r) for r in range(DP_RANKS)),
            _spawn(plan, ledger, _compute_log_prob, bars["compute_log_prob"]),
            _spawn(plan, ledger, _rollout, bars["rollout"]),
        ]
        for t in threads:
            t.join()
        for bar in bars.values():
            bar.close()
        for line in _summary(plan, ledger, args.transport):
            print(line)
        if ledger.errors:
            print(f"verification: FAILED: a stage raised {ledger.errors[0]!r}")
            return 1
        ok, line = _verify(plan, ledger)
        print(line)
        return 0 if ok else 1
    finally:
        try:
            for step in range(plan.steps):
                tq.get_client().clear_partition(plan.partition(step))
        finally:
            tq.close()


# ------------------------------------------------------------------ --async
