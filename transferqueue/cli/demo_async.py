"""``python -m transferqueue demo --async``: the async-RL pipeline (see :mod:`transferqueue.cli.demo`
for the flags): one staleness-bounded partition, producers that reserve before generating,
a trainer that leases, acks and advances the version, and one injected consumer crash that
is recovered.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from transferqueue.cli.demo import MEAN_GENERATION_S, SAMPLES_PER_PROMPT, _checksum, _sample

ASYNC_PARTITION = "async@run"
ASYNC_TASK = "train"
ASYNC_FIELDS = ["prompts", "responses"]


@dataclass
class AsyncPlan:
    steps: int
    batch: int
    producers: int
    seed: int
    max_staleness: int
    lease_s: float

    @property
    def groups(self) -> int:  # prompt groups to generate, SAMPLES_PER_PROMPT rows each
        return self.steps * self.batch // SAMPLES_PER_PROMPT

    @property
    def train_step_s(self) -> float:
        """The simulated step: as long as one batch's mean generation time, so overlapping
        rollout with training is what makes the run faster."""
        return self.batch * MEAN_GENERATION_S / self.producers

    @property
    def crash_batch(self) -> int:
        return max(1, self.batch // 4)


@dataclass
class AsyncLedger:
    """What the producers and the trainer did, recorded from several threads."""

    start: float = field(default_factory=time.monotonic)
    produced: dict[int, int] = field(default_factory=dict)  # row -> checksum
    acked: Counter[int] = field(default_factory=Counter)  # row -> times acked
    acked_calls: int = 0  # rows the controller said it acked
    bad_sums: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    crashed: list[int] = field(default_factory=list)
    redelivered: int = 0
    recovery_s: float = 0.0  # the last step's wait: until the crashed lease expired
    next_group: int = 0
    finished: float = 0.0
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, plan: AsyncPlan) -> int | None:
        with self.lock:
            if self.next_group >= plan.groups:
                return None
            self.next_group += 1
            return self.next_group - 1


def _async_produce(plan: AsyncPlan, ledger: AsyncLedger, bar: Any, producer: int) -> None:
    import transferqueue as tq

    client = tq.get_client()
    rng = random.Random(f"{plan.seed}-async-{producer}")
    while (group := ledger.claim(plan)) is not None:
        # reserve first: this waits while the rollout would run too far ahead
        reserved = client.reserve(ASYNC_PARTITION, SAMPLES_PER_PROMPT, timeout=120)
        samples = []
        for k in range(SAMPLES_PER_PROMPT):
            time.sleep(rng.expovariate(1 / MEAN_GENERATION_S))  # simulated generation time
            samples.append(_sample(plan.seed, 0, group, k))
        prompts = torch.stack([p for p, _ in samples])
        responses = [r for _, r in samples]
        client.put(
            {"prompts": prompts, "responses": responses},
            metadata=reserved,
            tags=[{"uid": group}] * len(samples),
        )
        with ledger.lock:
            for row, (p, r) in zip(reserved.rows, samples):
                ledger.produced[row] = _checksum(p, r)
        bar.update(len(samples))


def _crashing_consumer(plan: AsyncPlan, ledger: AsyncLedger) -> None:
    """A second trainer-side consumer, with a client of its own: it takes a leased batch
    and dies holding it (no ack; its client closed)."""
    from transferqueue.client import TransferQueueClient
    from transferqueue.system import current

    client = TransferQueueClient(current().new_async_client())
    try:
        meta = client.get_meta(
            ASYNC_FIELDS, plan.crash_batch, ASYNC_PARTITION, ASYNC_TASK,
            lease_s=plan.lease_s, timeout=120,
        )  # fmt: skip
        client.get_data(meta)
        ledger.crashed = list(meta.rows)
    finally:
        client.close()  # the "crash": the batch is never acked


def _async_train(plan: AsyncPlan, ledger: AsyncLedger, bar: Any) -> None:
    import transferqueue as tq

    client = tq.get_client()
    version = 0
    for step in range(plan.steps):
        last = step == plan.steps - 1
        if last:  # the injected crash, recovered by this step
            _crashing_consumer(plan, ledger)
        asked = time.monotonic()
        meta = client.get_meta(
            ASYNC_FIELDS, plan.batch, ASYNC_PARTITION, ASYNC_TASK,
            lease_s=plan.lease_s, timeout=120,
        )  # fmt: skip
        if len(meta) != plan.batch:
            raise RuntimeError(f"step {step}: got {len(meta)} rows, wanted {plan.batch}")
        if last:
            ledger.recovery_s = time.monotonic() - asked
        data = client.get_data(meta)
        sums = [_checksum(p, r) for p, r in zip(data["prompts"], data["responses"].unbind())]
        time.sleep(plan.train_step_s)  # the simulated forward/backward/optimizer step
        result = client.ack(meta)
        with ledger.lock:
            ledger.acked_calls += result["acked"]
            ledger.acked.update(meta.rows)
            ledger.bad_sums += sum(
                1 for row, s in zip(meta.rows, sums) if ledger.produced.get(row) != s
            )
            ledger.staleness.update(version - int(t["version"]) for t in meta.tags)
        bar.update(result["acked"])
        version = client.advance_version(ASYNC_PARTITION)
    ledger.finished = time.monotonic()


def _async_spawn(
    plan: AsyncPlan, ledger: AsyncLedger, fn: Callable[..., None], *args: Any
) -> threading.Thread:
    """Run ``fn(plan, ledger, *args)`` in a thread; on failure record the error and seal
    the partition (no one waits forever)."""

    def target() -> None:
        try:
            fn(plan, ledger, *args)
        except BaseException as exc:
            ledger.errors.append(exc)
            import transferqueue as tq

            try:
                tq.get_client().seal(ASYNC_PARTITION)
            except Exception as seal_error:
                ledger.errors.append(seal_error)

    thread = threading.Thread(target=target, name=getattr(fn, "__name__", "stage"))
    thread.start()
    return thread


def _async_verify(plan: AsyncPlan, ledger: AsyncLedger, info: Any) -> tuple[bool, str]:
    total = plan.steps * plan.batch
    problems = []
    if len(ledger.produced) != total:
        problems.append(f"{len(ledger.produced)} rows produced, {total} expected")
    if set(ledger.acked) != set(ledger.produced) or any(c != 1 for c in ledger.acked.values()):
        twice = sum(1 for c in ledger.acked.values() if c > 1)
        problems.append(f"{len(ledger.acked)} distinct rows acked ({twice} more than once)")
    if ledger.acked_calls != total:
        problems.append(f"the controller acked {ledger.acked_calls} rows, {total} expected")
    if ledger.bad_sums:
        problems.append(f"{ledger.bad_sums} checksum mismatches")
    if info.consumed.get(ASYNC_TASK) != total or info.leased:
        problems.append(f"partition_info: consumed {info.consumed}, leased {info.leased}")
    if not ledger.crashed or not set(ledger.crashed) <= set(ledger.acked):
        problems.append(f"the crashed consumer's rows {ledger.crashed} were not all acked")
    if ledger.redelivered < len(ledger.crashed) or not ledger.redelivered:
        problems.append(f"redelivered {ledger.redelivered} < {len(ledger.crashed)} crashed")
    if problems:
        return False, "verification: FAILED: " + "; ".join(problems)
    return True, (
        f"verification: OK: {total} rows, each acked exactly once by {ASYNC_TASK}, checksums "
        f"match; the {len(ledger.crashed)} rows of the crashed consumer were redelivered"
    )


def _async_summary(plan: AsyncPlan, ledger: AsyncLedger, transport: str) -> list[str]:
    n = sum(ledger.acked.values())
    elapsed = (ledger.finished or time.monotonic()) - ledger.start
    consumed = sum(ledger.staleness.values())
    over = sum(c for s, c in ledger.staleness.items() if s > plan.max_staleness)
    lines = [
        f"transferqueue demo --async: transport={transport} steps={plan.steps} "
        f"global_batch_size={plan.batch} producers={plan.producers} "
        f"max_staleness={plan.max_staleness} lease_s={plan.lease_s:g}",
        f"samples/s: {n / max(elapsed, 1e-9):.1f} ({n} samples acked in {elapsed:.2f} s; "
        f"{n / max(elapsed - ledger.recovery_s, 1e-9):.1f} without the "
        f"{ledger.recovery_s:.2f} s the trainer waited for the crashed consumer's lease)",
        "staleness (trainer version at consumption - row version): "
        + ", ".join(f"{s}: {c}" for s, c in sorted(ledger.staleness.items()))
        + f" (of {consumed} rows; max {max(ledger.staleness, default=0)}, "
        f"bound k={plan.max_staleness})",
        f"redelivered: {ledger.redelivered} rows (the crashed consumer held "
        f"{len(ledger.crashed)}, never acked)",
    ]
    if over:
        lines.append(
            f"note: {over} rows were older than k when consumed (their generation outlasted "
            f"k trainer steps); get_meta(max_version_lag=k) would skip them"
        )
    return lines


def _async_config(transport: str) -> dict[str, Any]:
    config: dict[str, Any] = {"transport": transport}
    # on Ray a namespace of its own: never attach to another job's system
    config["ray"] = {"namespace": f"transferqueue-demo-{time.time_ns()}"}
    return config


def run_async(args: argparse.Namespace) -> int:
    """``demo --async``: staleness-bounded rollout, leased training, one consumer crash."""
    import transferqueue as tq

    plan = AsyncPlan(
        args.steps, args.global_batch_size, args.producers, args.seed,
        args.max_staleness, args.lease_s,
    )  # fmt: skip
    tq.init(_async_config(args.transport))
    try:
        client = tq.get_client()
        client.create_partition(
            ASYNC_PARTITION, max_staleness=plan.max_staleness, global_batch_size=plan.batch
        )
        ledger = AsyncLedger()
        quiet = not sys.stderr.isatty()
        total = plan.steps * plan.batch
        bars = {
            name: tqdm(total=total, desc=f"{name:<8}", position=i, file=sys.stderr,
                       disable=quiet, unit="sample")
            for i, name in enumerate(("rollout", "train"))
        }  # fmt: skip
        threads = [
            _async_spawn(plan, ledger, _async_train, bars["train"]),
            *(
                _async_spawn(plan, ledger, _async_produce, bars["rollout"], p)
                for p in range(plan.producers)
            ),
        ]
        for t in threads:
            t.join()
        for bar in bars.values():
            bar.close()
        info = client.partition_info(ASYNC_PARTITION)
        ledger.redelivered = info.redelivered.get(ASYNC_TASK, 0)
        for line in _async_summary(plan, ledger, args.transport):
            print(line)
        if ledger.errors:
            print(f"verification: FAILED: a stage raised {ledger.errors[0]!r}")
            return 1
        ok, line = _async_verify(plan, ledger, info)
        print(line)
        return 0 if ok else 1
    finally:
        try:
            tq.get_client().clear_partition(ASYNC_PARTITION)
        finally:
            tq.close()
