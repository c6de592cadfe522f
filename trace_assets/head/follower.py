"""The head follower: each newly finalized block, committed and alerted within seconds.

A block range is sealed (committed whole, verified, compacted, checked) by its Dagster run
once the finalized head passes its end: with 10,000-block ranges on Monad, ~50 minutes after
its first block. The follower makes the open range fresh meanwhile. Each cycle it reads the
chain's `finalized` (and `safe`) head; extracts the next finalized block, or a small batch of
them when it is behind, with cryo; verifies them as a range is verified (completeness, logs
bloom, parent hashes) plus parent-hash continuity with the block it committed before; derives
the block-range datasets (decoded transfers, deployments) from them; evaluates the alert
rules on them and publishes the alerts; and appends the segment to the open range's partition
of every head dataset in ONE transaction (append mode, one segment key per block: a retry is
a no-op, a block is never appended twice). Readers see the open range as its current version.

The follower is an accelerator, never the source of truth: it keeps no state of its own (it
resumes after the newest block committed), a sealed range refuses its appends
(`PartitionSealedError`: it moves on to the next range), and the sealing run alone produces
a correct range whether or not the follower ran.

Alerts are evaluated before the commit (so a crash between the two never loses them) with
the same deterministic dedupe keys as the sealed range's evaluation: the evaluation ledger
records them, and re-evaluating a block (a retried cycle, the sealing run) re-sends nothing
that is standing. Rules with `confirmation: safe` are also evaluated on blocks between
`finalized` and `safe`, which are never committed; when such a block is finalized its
evaluation retracts any alert it no longer raises (an orphaned block).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from trace_assets.alerts.evaluate import RangeData, evaluate_rules, reconcile
from trace_assets.alerts.scope import AlertScope
from trace_assets.derived.assets import PARTITIONED_TRANSFORMS
from trace_assets.head.metrics import HeadMetrics
from trace_resources.alert_pipeline.queue import BufferMessage, SqsBuffer
from trace_resources.alert_pipeline.resource import evaluation_lock, load_ledger, save_ledger
from trace_resources.alert_pipeline.rules import RuleStore, StoredRule
from trace_resources.chain.extract import BlockRef, ChainClient, ChainHead
from trace_resources.chain.extract import RangeData as ChainData
from trace_resources.chain.ranges import BlockRange, range_containing
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.errors import ChainContinuityError, LeaseLostError, PartitionSealedError
from trace_resources.event_history import (
    CORRELATION_ID,
    new_correlation_id,
    process_name,
    record_hops,
)
from trace_resources.leases import LeaderLease
from trace_resources.registry import arrow_schema, declarations
from trace_resources.storage.commit import DatasetWriter, PartitionData, StagedPartition
from trace_resources.storage.compaction import Compactor
from trace_resources.storage.crash import crash_point
from trace_resources.storage.outbox import correlate
from trace_resources.storage.records import BatchNotCommitted, CommitResult, VersionRecord
from trace_resources.storage.version_store import VersionStore
from trace_resources.telemetry import TRACEPARENT, Tracing

__all__ = ["HEAD_DATASETS", "HeadFollower", "CycleOutcome", "derived_head_datasets"]

log = logging.getLogger(__name__)


def derived_head_datasets() -> dict[str, tuple[list[str], pa.Schema]]:
    """Derived block-range datasets computed from the raw datasets alone (row by row), which
    the follower derives per appended segment: name -> (upstream, schema)."""
    out = {}
    for name, decl in sorted(declarations().items()):
        if (
            decl.kind == "derived"
            and decl.partitioning == "block_range"
            and name in PARTITIONED_TRANSFORMS
            and set(decl.upstream) <= set(RAW_DATASETS)
        ):
            out[name] = (list(decl.upstream), arrow_schema(decl))
    return out


HEAD_DATASETS: tuple[str, ...] = (*RAW_DATASETS, *derived_head_datasets())


def block_key(number: int) -> str:
    """The segment key of one block: appending a block twice is a no-op."""
    return f"block:{number}"


@dataclass
class CycleOutcome:
    """What one cycle did (for logs, metrics and tests)."""

    finalized: int
    committed: tuple[int, int] | None = None  # first and last block appended
    sealed_skip: str | None = None  # a sealed range the follower moved past
    alerts: int = 0
    safe_alerts: int = 0
    idle: bool = False
    correlation_id: str | None = None  # of the finalized blocks this cycle appended


@dataclass
class _Segment:
    """One extracted, verified and derived batch of finalized blocks of one range."""

    block_range: BlockRange  # the partition
    blocks: BlockRange  # the blocks of the segment
    data: ChainData
    tables: dict[str, pa.Table]


@dataclass
class _FinalizedSeen:
    """When each finalized head number was first seen (wall clock): a dataset's lag in seconds
    is how long the oldest block it lacks has been finalized."""

    seen: deque[tuple[int, float]] = field(default_factory=deque)

    def observe(self, finalized: int, now: float) -> None:
        if not self.seen or finalized > self.seen[-1][0]:
            self.seen.append((finalized, now))
        while len(self.seen) > 10_000:
            self.seen.popleft()

    def finalized_at(self, block: int) -> float | None:
        """When `block` was first seen finalized (the first head at or above it)."""
        for number, at in self.seen:
            if number >= block:
                return at
        return None

    def block_time_s(self) -> float | None:
        """Seconds per block over the heads seen in the last minute (None: too few)."""
        if len(self.seen) < 2:
            return None
        last_n, last_t = self.seen[-1]
        for number, at in self.seen:
            if last_t - at <= 60 and number < last_n:
                return (last_t - at) / (last_n - number)
        return None


class HeadFollower:
    """Follows the finalized head; see the module docstring. `run` loops until stopped;
    `cycle` does one step (tests drive it directly)."""

    def __init__(
        self,
        client: ChainClient,
        versions: VersionStore,
        writer: DatasetWriter,
        range_size: int,
        *,
        rules: RuleStore | None = None,
        buffer: SqsBuffer | None = None,
        data_engine: sa.Engine | None = None,
        scope: AlertScope | None = None,
        max_batch_blocks: int = 100,
        metrics: HeadMetrics | None = None,
        on_append: Callable[[CycleOutcome], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.client = client
        self.versions = versions
        self.writer = writer
        self.range_size = range_size
        self.rules = rules
        self.buffer = buffer
        self.data_engine = data_engine
        self.scope = scope
        self.max_batch_blocks = max(1, max_batch_blocks)
        self.metrics = metrics or HeadMetrics(None)
        self.on_append = on_append
        self.tracing = tracing or Tracing("trace-head-follower")
        self.derived = derived_head_datasets()
        self.finalized_seen = _FinalizedSeen()
        # the newest committed block and the first block of its partition (None: reload)
        self._last: BlockRef | None = None
        self._partition_first: BlockRef | None = None
        self._resumed = False
        self._resume_at: int | None = None
        # safe blocks evaluated for `confirmation: safe` rules: number -> hash
        self._safe_done: dict[int, str] = {}
        self._rules_cache: tuple[float, list[StoredRule]] | None = None
        self.leader: LeaderLease | None = None  # set by `run`: appends check its token

    def close(self) -> None:
        self.client.close()
        self.writer.close()

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        poll_s: float | None = None,
        *,
        compactor: Compactor | None = None,
        compact_every_s: float = 5.0,
        compact_min_segments: int = 64,
        leader: LeaderLease | None = None,
    ) -> None:
        """Cycle until `stop` is set: immediately again while behind, else after `poll_s`
        (default: a third of the chain's observed block time, between 50 ms and 1 s). An
        error is logged and retried with backoff after reloading what is committed. With a
        `compactor`, a background thread compacts the open range's segments of every head
        dataset every `compact_every_s` once `compact_min_segments` have accumulated, so a
        query of the open range reads a few files however many blocks it holds. With a
        `leader` lease, it appends only while it holds the lease, and every append checks the
        lease's token in its own transaction: a copy that lost the lease (paused beyond it)
        has its late append refused, steps down and stands by until it wins the lease again."""
        backoff = 0.5
        self.client.check_chain_id()
        compacting = None
        if compactor is not None:
            compacting = threading.Thread(
                target=self._compact_loop,
                args=(compactor, stop, compact_every_s, compact_min_segments),
                name="head-compaction",
                daemon=True,
            )
            compacting.start()
        try:
            self._cycle_until(stop, poll_s, backoff, leader)
        finally:
            if compacting is not None:
                compacting.join()

    def _compact_loop(
        self, compactor: Compactor, stop: threading.Event, every_s: float, min_segments: int
    ) -> None:
        while not stop.wait(every_s):
            last = self._last
            if last is None:
                continue
            key = range_containing(last.number, self.range_size).key
            for name in HEAD_DATASETS:
                if stop.is_set():
                    return
                try:
                    report = compactor.compact_open(name, key, min_segments=min_segments)
                except Exception as exc:  # the next round retries; appends go on meanwhile
                    self.metrics.error(f"compaction:{type(exc).__name__}")
                    log.warning("compaction of %s %s failed: %s", name, key, exc)
                    continue
                if report.compacted:
                    log.info("%s", report.line())

    def _cycle_until(
        self,
        stop: threading.Event,
        poll_s: float | None,
        backoff: float,
        leader: LeaderLease | None,
    ) -> None:
        self.leader = leader
        while not stop.is_set():
            if leader is not None and not leader.held():
                log.warning(
                    "lost the leader lease %s; standing by until it is won again",
                    leader.name,
                )
                self._step_down(leader)
                if not leader.acquire(stop):
                    return
                log.info("leader lease won again; resuming after the newest committed block")
            try:
                outcome = self.cycle()
                backoff = 0.5
            except LeaseLostError as exc:  # a late append of a copy that was paused: refused
                assert leader is not None
                self.metrics.error(type(exc).__name__)
                log.error("fenced: %s", exc)
                self._step_down(leader)
                continue
            except Exception as exc:  # any fault: reload the committed state and retry
                self.metrics.error(type(exc).__name__)
                log.error("head follower cycle failed (retrying in %.1f s): %s", backoff, exc)
                self._reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if outcome.idle:
                stop.wait(poll_s if poll_s is not None else self._poll_s())

    def _step_down(self, leader: LeaderLease) -> None:
        """Forget the lost lease and everything read while leading (the new leader moved on)."""
        leader.step_down()
        self._reset()
        self._safe_done.clear()

    def _poll_s(self) -> float:
        block_time = self.finalized_seen.block_time_s()
        if block_time is None:
            return 0.2
        return min(1.0, max(0.05, block_time / 3))

    def cycle(self) -> CycleOutcome:
        """One step: append the next finalized block(s) if any, else evaluate `safe` blocks."""
        head = self.client.heads()
        now = time.time()
        self.finalized_seen.observe(head.finalized, now)
        self.metrics.chain(head, self.finalized_seen.block_time_s())
        if not self._resumed:
            self._resume(head)
        start = self._next_block(head)
        outcome = CycleOutcome(head.finalized)
        if start > head.finalized:
            outcome.safe_alerts = self._evaluate_safe(head)
            outcome.idle = True
            self._report_lag(head, now)
            return outcome
        self._report_lag(head, now)  # the blocks this cycle is about to append are lag too
        partition = range_containing(start, self.range_size)
        last = min(head.finalized, partition.last, start + self.max_batch_blocks - 1)
        # the trace of these finalized blocks: the run that appends them, its commit, the
        # alerts it publishes (and, in the sink and deliverer, their delivery)
        attributes = {
            "chain.block.first": start,
            "chain.block.last": last,
            "partition": partition.key,
        }
        # the same blocks' correlation id: their history (`trace history`) from the commit
        # to the alerts' deliveries
        outcome.correlation_id = new_correlation_id()
        with self.tracing.span("finalized_blocks", attributes):
            return self._append(head, now, partition, start, last, outcome)

    def _append(
        self,
        head: ChainHead,
        now: float,
        partition: BlockRange,
        start: int,
        last: int,
        outcome: CycleOutcome,
    ) -> CycleOutcome:
        segment = self._extract(partition, BlockRange(start, last))
        staged: list[StagedPartition] = []
        try:
            source = self._source(segment)
            with ThreadPoolExecutor(1, thread_name_prefix="head-alerts") as pool:
                context = contextvars.copy_context()  # the alerts' spans join this trace
                alerting = pool.submit(
                    context.run, self._evaluate, segment, "finalized", outcome.correlation_id
                )
                staged = self._stage(segment, source)
                outcome.alerts = alerting.result()
            crash_point("head.before_commit")
            started = time.perf_counter()
            self._commit(staged, self._finalized_hop(segment, head, now, outcome))
            self.metrics.appended(segment.blocks.size, time.perf_counter() - started)
            seen = self.finalized_seen.finalized_at(segment.blocks.start)
            if seen is not None:  # the oldest block of the segment: the longest wait
                self.metrics.committed_after(time.time() - seen)
        except PartitionSealedError as exc:
            self.writer.abort(staged)
            log.info("%s", exc)
            outcome.sealed_skip = partition.key
            self._last = None  # reload: the sealed range's last block is the new resume point
            self._resumed = False
            return outcome
        except BaseException:
            self.writer.abort(staged)
            raise
        self._last = segment.data.last
        self._partition_first = _ref(source["first"])
        outcome.committed = (segment.blocks.start, segment.blocks.last)
        self._report_lag(head, time.time())
        if self.on_append is not None:
            self.on_append(outcome)
        return outcome

    # -- where to resume -------------------------------------------------------------------

    def _reset(self) -> None:
        self._last = None
        self._partition_first = None
        self._resumed = False

    def _resume(self, head: ChainHead) -> None:
        """Resume after the newest block committed in the open range (or the range before
        it); on a fresh start, at the first block of the range the finalized head is in:
        ranges before it are the sealing runs' work, not the follower's."""
        open_range = range_containing(head.finalized, self.range_size)
        keys = [open_range.key]
        if open_range.start > 0:
            keys.append(BlockRange(open_range.start - self.range_size, open_range.start - 1).key)
        current = self.versions.read.current_versions("blocks", keys)
        self._last, self._partition_first = None, None
        for key in keys:  # the open range first
            record = current.get(key)
            if record is None or record.manifest.source is None:
                continue
            source = record.manifest.source
            self._last = _ref(source["last"])
            if record.commit_mode == "append":
                self._partition_first = _ref(source["first"])
            break
        if self._last is None and open_range.start > 0:
            # the range before is not committed yet (its sealing run is to come): continuity
            # with it is checked against the chain itself
            found = self.client.block_ref(open_range.start - 1)
            self._last = found[0] if found else None
            self._resume_at = open_range.start
        else:
            self._resume_at = None if self._last is not None else open_range.start
        self._resumed = True

    def _next_block(self, head: ChainHead) -> int:
        if self._resume_at is not None:
            return self._resume_at
        assert self._last is not None
        return self._last.number + 1

    # -- one segment -----------------------------------------------------------------------

    def _extract(self, partition: BlockRange, blocks: BlockRange) -> _Segment:
        data = self.client.extract_verified(blocks)
        previous = self._last
        if previous is not None and previous.number == blocks.start - 1:
            if data.first.parent_hash != previous.hash:
                raise ChainContinuityError(
                    f"block {blocks.start} names parent {data.first.parent_hash}, but the block "
                    f"{previous.number} before it is {previous.hash} (committed or read before):"
                    " the chain forked below the finalized head, which a finalized head never "
                    "does. Nothing was appended; check the node (TRACE_RPC_URL), then restart "
                    "the follower"
                )
        self._resume_at = None
        return _Segment(partition, blocks, data, self._derive(data))

    def _derive(self, data: ChainData) -> dict[str, pa.Table]:
        """The raw tables of a segment and the derived datasets computed from them."""
        raw: dict[str, pa.Table] = {str(name): table for name, table in data.tables.items()}
        tables = dict(raw)
        for name, (upstream, schema) in self.derived.items():
            transform = PARTITIONED_TRANSFORMS[name]
            tables[name] = transform(**{up: raw[up] for up in upstream}).cast(schema)
        return tables

    def _source(self, segment: _Segment) -> dict[str, Any]:
        first = (
            segment.data.first
            if segment.blocks.start == segment.block_range.start or self._partition_first is None
            else self._partition_first
        )
        return {
            "range": segment.block_range.key,
            "first": first.as_dict(),
            "last": segment.data.last.as_dict(),
        }

    def _stage(self, segment: _Segment, source: dict[str, Any]) -> list[StagedPartition]:
        keys = [block_key(n) for n in segment.blocks.blocks()]
        staged: list[StagedPartition] = []
        try:
            with ThreadPoolExecutor(len(HEAD_DATASETS), thread_name_prefix="head-stage") as pool:
                futures = [
                    pool.submit(
                        self.writer.stage,
                        name,
                        {
                            segment.block_range.key: PartitionData(
                                segment.tables[name], source=source, segment_keys=keys
                            )
                        },
                        mode="append",
                    )
                    for name in HEAD_DATASETS
                ]
                for future in futures:
                    with contextlib.suppress(Exception):
                        staged.extend(future.result())
                for future in futures:
                    future.result()  # the first upload error, once every attempt is known
        except BaseException:
            self.writer.abort(staged)
            raise
        return staged

    def _finalized_hop(
        self, segment: _Segment, head: ChainHead, now: float, outcome: CycleOutcome
    ) -> dict[str, Any]:
        """The `block.finalized` hop: when the follower saw the finalized head."""
        return {
            "correlation_id": outcome.correlation_id,
            "hop": "block.finalized",
            "at": datetime.fromtimestamp(now, UTC),
            "process": process_name(self.tracing.service),
            "details": {
                "first": segment.blocks.start,
                "last": segment.blocks.last,
                "partition": segment.block_range.key,
                "finalized_head": head.finalized,
            },
        }

    def _commit(
        self, staged: Sequence[StagedPartition], finalized: Mapping[str, Any] | None = None
    ) -> dict[str, VersionRecord]:
        """Every head dataset's segment in one transaction: all or nothing; with the blocks'
        `block.finalized` hop and the `commit` hop (the versions) in that transaction."""

        def history(conn: sa.Connection, results: Sequence[CommitResult]) -> None:
            if finalized is None:
                return
            versions = {r.version.dataset: r.version.version for r in results}
            commit = {
                "correlation_id": finalized["correlation_id"],
                "hop": "commit",
                "process": finalized["process"],
                "details": {"partition": finalized["details"]["partition"], "versions": versions},
            }
            record_hops(conn, [finalized, commit])
            correlate(
                conn,
                finalized["correlation_id"],
                [(r.version.dataset, r.version.partition_key, r.version.version) for r in results],
            )

        # the lease's fence first in the transaction: a late append of a copy that lost the
        # lease is refused as such, before the segments are even looked at
        guard = self.leader.check if self.leader is not None else None
        try:
            with self.tracing.span(
                "head.commit", {"datasets": [s.attempt.dataset for s in staged]}
            ):
                results = self.writer.commit_together(staged, guard=guard, within=history)
        except BatchNotCommitted as exc:
            if isinstance(exc.__cause__, PartitionSealedError):
                raise exc.__cause__ from None
            raise
        return {r.version.dataset: r.version for r in results}

    # -- alerts ----------------------------------------------------------------------------

    def _stored_rules(self) -> list[StoredRule]:
        """Enabled rules, re-read at most once a second (a new rule applies within a second)."""
        if self.rules is None:
            return []
        now = time.monotonic()
        if self._rules_cache is None or now - self._rules_cache[0] > 1.0:
            self._rules_cache = (now, self.rules.latest(enabled_only=True))
        return self._rules_cache[1]

    def _evaluate(
        self, segment: _Segment, confirmation: str, correlation_id: str | None = None
    ) -> int:
        """Evaluate the rules on one segment, publish, record; the number of alerts sent.

        At `finalized` every rule is evaluated (a `safe` rule's alerts of a block seen at
        `safe` are standing and not re-sent; those the finalized block no longer raises are
        retracted). At `safe` only the rules that ask for it."""
        if self.buffer is None or self.data_engine is None:
            return 0
        rules = self._stored_rules()
        if confirmation == "safe":
            rules = [r for r in rules if r.rule.confirmation == "safe"]
        if not rules:
            return 0
        key = segment.block_range.key
        data = RangeData(
            key,
            {name: (0, table) for name, table in segment.tables.items()},
            missing=frozenset(_unavailable(rules, set(segment.tables))),
        )
        evaluation = evaluate_rules(rules, data, self.scope.refusals if self.scope else None)
        for rule_key, error in sorted(evaluation.errors.items()):
            log.debug("rule %s not evaluated at the head: %s", rule_key, error)
        in_force = {(r.rule.org, r.rule.id): r.version for r in rules}
        blocks = (segment.blocks.start, segment.blocks.last)
        with evaluation_lock(self.data_engine, key):
            previous = load_ledger(self.data_engine, key, in_force, blocks=blocks)
            plan = reconcile(previous, evaluation.messages, data, evaluation.skipped)
            with self.tracing.span("alert.publish", {"alert.messages": len(plan.messages)}):
                self.buffer.send(self._traced(plan.messages, correlation_id))
            save_ledger(self.data_engine, key, plan.ledger)
        self.metrics.alerts(confirmation, len(plan.messages))
        return len(plan.messages)

    def _traced(
        self, messages: Sequence[BufferMessage], correlation_id: str | None = None
    ) -> Sequence[BufferMessage]:
        """The messages carrying the publishing span's traceparent and the blocks'
        correlation id to the sink (and through the alert's row to the deliverer)."""
        carried: dict[str, str] = {}
        parent = self.tracing.traceparent()
        if parent is not None:
            carried[TRACEPARENT] = parent
        if correlation_id is not None:
            carried[CORRELATION_ID] = correlation_id
        if not carried:
            return messages
        return [dataclasses.replace(m, destination={**m.destination, **carried}) for m in messages]

    def _evaluate_safe(self, head: ChainHead) -> int:
        """Rules with `confirmation: safe`: evaluate the blocks above `finalized` up to `safe`
        (never committed). A block is evaluated once per hash it is seen with."""
        if head.safe is None or head.safe <= head.finalized or self.buffer is None:
            return 0
        if not any(r.rule.confirmation == "safe" for r in self._stored_rules()):
            return 0
        for number in [n for n in self._safe_done if n <= head.finalized]:
            del self._safe_done[number]
        start = max([head.finalized, *self._safe_done]) + 1
        if start > head.safe:
            return 0
        sent = 0
        while start <= head.safe:
            partition = range_containing(start, self.range_size)
            last = min(head.safe, partition.last, start + self.max_batch_blocks - 1)
            blocks = BlockRange(start, last)
            data = self.client.extract_verified(blocks)
            sent += self._evaluate(_Segment(partition, blocks, data, self._derive(data)), "safe")
            numbers = data.tables["blocks"]["block_number"].to_pylist()
            hashes = data.tables["blocks"]["block_hash"].to_pylist()
            for number, block_hash in zip(numbers, hashes, strict=True):
                self._safe_done[int(number)] = "0x" + bytes(block_hash).hex()
            start = last + 1
        return sent

    # -- freshness -------------------------------------------------------------------------

    def _report_lag(self, head: ChainHead, now: float) -> None:
        committed = self._last.number if self._last is not None else None
        if committed is None:
            return
        lag_blocks = max(0, head.finalized - committed)
        lag_s = 0.0
        if lag_blocks:
            since = self.finalized_seen.finalized_at(committed + 1)
            lag_s = max(0.0, now - since) if since is not None else 0.0
        self.metrics.lag(HEAD_DATASETS, committed, lag_blocks, lag_s)


def _ref(data: Mapping[str, Any]) -> BlockRef:
    return BlockRef(int(data["number"]), str(data["hash"]), str(data["parent_hash"]))


def _unavailable(rules: Sequence[StoredRule], available: set[str]) -> set[str]:
    """Datasets custom SQL conditions read that the head does not have (their rules wait for
    the sealed range)."""
    from trace_assets.alerts.scope import referenced

    return {name for r in rules for name in referenced(r.rule)} - available
