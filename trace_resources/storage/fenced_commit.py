"""The fenced commit: one Postgres transaction that checks the attempt still holds its fence,
registers the schema, checks chain continuity, records the version and its manifest, moves the
current-version pointer and writes the outbox event; appends and commit keys make retries
no-ops. `commit_many` does the same for a batch of attempts in one transaction.

A replace whose staged files hold what the partition's current sealed version holds (the same
files' sha256 checksums, rows and sizes, schema and source blocks) is a recorded no-op: the
attempt ends 'unchanged' pointing at the version it kept, and no version, pointer move or
outbox event is written (downstream datasets and alert evaluations are not re-triggered by
data that did not change). Its staged files are never referenced; staging cleanup removes
them. Only an attempt that may commit (fence, lease) gets this far.

The protocol's order of steps (stage, verify, commit) lives in `commit.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.chain.ranges import parse_partition_key
from trace_resources.errors import (
    AttemptFencedError,
    ChainContinuityError,
    CommitError,
    LeaseExpiredError,
    PartitionSealedError,
    SegmentConflictError,
    VersionRemovedError,
)
from trace_resources.storage import state as t
from trace_resources.storage.history import record_hops
from trace_resources.storage.pointer_events import announce
from trace_resources.storage.read_model import current_query, expand, find_version
from trace_resources.storage.records import (
    COMMITTED_EVENT,
    Attempt,
    BatchItem,
    BatchNotCommitted,
    CommitHook,
    CommitMode,
    CommitResult,
    CompactionPlan,
    FileEntry,
    Manifest,
    VersionRecord,
    window,
)
from trace_resources.storage.schemas import register_schema, schema_fingerprint

__all__ = ["FencedCommits", "UNCHANGED"]

# the state of an attempt whose replace was identical to the current version (a no-op)
UNCHANGED = "unchanged"
_ENDED_WITH_A_VERSION = ("committed", UNCHANGED)


# the outbox events of the commit under way (this thread's), offered to the wire taps once its
# transaction has committed (a rolled-back one's are never offered)
_committed_events: ContextVar[list[dict[str, Any]] | None] = ContextVar(
    "trace_committed_events", default=None
)


def _tap_committed() -> None:
    """Offer the committed transaction's outbox events to the `commits` taps (non-blocking)."""
    events = _committed_events.get() or []
    if not events:
        return
    from trace_resources import taps  # not at import: taps imports this package's tables

    for event in events:
        taps.offer("commits", event, selector=event["dataset"])


class FencedCommits:
    """Commit staged attempts: fenced, idempotent by attempt id and by commit key."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        # (correlation id, process) of the unit of work committing: each version it commits
        # carries the id on its outbox event and records a `commit` hop (message history)
        self.correlation: tuple[str, str] | None = None

    def commit(
        self,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        *,
        mode: CommitMode = "replace",
        segment_key: str | None = None,
        segment_keys: Sequence[str] | None = None,
        commit_key: str | None = None,
    ) -> CommitResult:
        """Fenced commit in one transaction: version, manifest, pointer and outbox event.

        Idempotent by attempt id: calling it again after an unknown outcome returns the
        version that landed. Idempotent by `commit_key` (one logical writer, e.g. a Dagster
        step and its retries): a key that already committed this partition returns that
        version. In append mode, segments already in the current version make it a no-op; in
        replace mode, content identical to the current sealed version does (`unchanged`).
        Refused, with the reason recorded on the attempt: a stale replace attempt (a newer
        one holds the fence), an attempt whose lease expired, an attempt no longer staging.
        """
        keys = list(segment_keys) if segment_keys is not None else None
        if keys is None and segment_key is not None:
            keys = [segment_key]
        token = _committed_events.set([])
        try:
            with self.engine.begin() as conn:
                outcome = self._commit_one(
                    conn, attempt, manifest, schema, mode, keys, commit_key, {}
                )
            _tap_committed()
        finally:
            _committed_events.reset(token)
        if isinstance(outcome, CommitError):
            raise outcome  # its refusal was recorded on the attempt by the transaction
        return outcome

    def commit_many(
        self,
        items: Sequence[BatchItem],
        *,
        mode: CommitMode = "replace",
        commit_key: str | None = None,
        within: CommitHook | None = None,
        guard: Callable[[sa.Connection], None] | None = None,
    ) -> list[CommitResult]:
        """Commit many staged attempts in ONE transaction, each exactly as `commit` would.

        `within(conn, results)` (results in the order given) writes what must commit with them,
        in the same transaction (a quarantine record of the versions they replace).
        `guard(conn)` runs first in the transaction and may refuse the whole commit by raising
        (a singleton's leader-lease fence, `LeaderLease.check`): nothing is written then.

        Every attempt goes through the same steps as a single commit (its attempt row and fence
        row locked, commit key, fence, schema registry, continuity, version, pointer, its own
        outbox event), in (dataset, partition) order so that concurrent batches lock rows in
        the same order. All or nothing: if any attempt would be refused or fails, the whole
        transaction rolls back and `BatchNotCommitted` is raised, with nothing changed, so the
        caller can commit the attempts one by one to record each outcome.
        """
        ordered = sorted(items, key=lambda i: (i.attempt.dataset, i.attempt.partition_key))
        registered: dict[str, tuple[str, int]] = {}
        results: dict[str, CommitResult] = {}
        token = _committed_events.set([])
        try:
            with self.engine.begin() as conn:
                if guard is not None:
                    guard(conn)
                for item in ordered:
                    outcome = self._commit_one(
                        conn,
                        item.attempt,
                        item.manifest,
                        item.schema,
                        mode,
                        list(item.segment_keys) if item.segment_keys is not None else None,
                        commit_key,
                        registered,
                    )
                    if isinstance(outcome, CommitError):
                        raise BatchNotCommitted(str(outcome)) from outcome
                    results[item.attempt.attempt_id] = outcome
                if within is not None:
                    within(conn, [results[i.attempt.attempt_id] for i in items])
            _tap_committed()
        except (CommitError, ChainContinuityError) as exc:
            if isinstance(exc, BatchNotCommitted):
                raise
            raise BatchNotCommitted(str(exc)) from exc
        finally:
            _committed_events.reset(token)
        return [results[i.attempt.attempt_id] for i in items]

    def commit_compaction(
        self, attempt: Attempt, files: Sequence[FileEntry], plan: CompactionPlan
    ) -> CommitResult | str:
        """Commit a compaction of an open partition (its staged merged file), fenced like any
        commit: under the fence row lock, and only if the current version is still open with
        the window and base files the compaction read (`plan`). Appends that landed after the
        read stay live: the new version's window is (plan.through_seq, current through_seq].
        The result, or why it was refused (the attempt is then failed; nothing changed)."""
        dataset, partition_key = attempt.dataset, attempt.partition_key
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(
                    t.attempts.c.state,
                    t.attempts.c.committed_version,
                    (t.attempts.c.lease_expires_at < sa.func.now()).label("expired"),
                )
                .where(t.attempts.c.attempt_id == attempt.attempt_id)
                .with_for_update()
            ).one_or_none()
            if row is None:
                raise CommitError(f"attempt {attempt.attempt_id} is unknown to the version store")
            if row.state == "committed":  # a retry after an unknown outcome
                landed = find_version(conn, dataset, partition_key, row.committed_version)
                if landed is None:
                    return f"compaction v{row.committed_version} landed and was removed by GC since"
                return CommitResult(landed, True, landed.schema_version, None)
            if row.state != "staging" or row.expired:
                if row.state == "staging":
                    self._set_state(conn, attempt, "abandoned")
                return f"compaction attempt {attempt.attempt_id} is no longer live ({row.state})"
            conn.execute(
                sa.select(t.fences.c.fence)
                .where(t.fences.c.dataset == dataset)
                .where(t.fences.c.partition_key == partition_key)
                .with_for_update()
            ).scalar_one()
            current = self._current_row(conn, dataset, partition_key)
            live = None if current is None else window(current.manifest)
            reason = None
            if current is None or live is None:
                reason = "the partition was sealed (a replace version is current) meanwhile"
            elif live[0] != plan.live_from_seq or [
                f["key"] for f in current.manifest["files"]
            ] != list(plan.base_keys):
                reason = "another compaction of the partition committed meanwhile"
            elif live[1] < plan.through_seq:
                reason = f"the current window {live} ends before seq {plan.through_seq}"
            if reason is not None or current is None or live is None:
                self._set_state(conn, attempt, "failed")
                return f"compaction of {dataset}/{partition_key} refused, nothing changed: {reason}"
            base = [] if plan.merges_base else list(current.manifest["files"])
            base += [f.as_dict() for f in files]
            rows = int(current.row_count)
            nbytes = int(current.byte_count) - plan.replaced_bytes + sum(f.size for f in files)
            stored = {
                key: value for key, value in current.manifest.items() if key != "segments"
            } | {
                "files": base,
                "rows": rows,
                "bytes": nbytes,
                "live_from_seq": plan.through_seq,
                "through_seq": live[1],
            }
            number = self._record_version(
                conn,
                attempt,
                "append",
                current.schema_version,
                stored,
                rows,
                nbytes,
                {
                    "mode": "compact",
                    "rows": rows,
                    "bytes": nbytes,
                    "compacted_from_seq": plan.live_from_seq,
                    "compacted_through_seq": plan.through_seq,
                    "live_through_seq": live[1],
                },
            )
            record = find_version(conn, dataset, partition_key, number)
            assert record is not None
        return CommitResult(record, False, record.schema_version, None)

    def _commit_one(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        mode: CommitMode,
        keys: list[str] | None,
        commit_key: str | None,
        registered: dict[str, tuple[str, int]],
    ) -> CommitResult | CommitError:
        """One attempt's commit inside `conn`'s transaction: its result, or the refusal to raise
        once the transaction (which recorded the refusal on the attempt) has committed."""
        if mode != attempt.mode:
            raise CommitError(
                f"attempt {attempt.attempt_id} was begun for {attempt.mode!r} but is committed "
                f"as {mode!r}; stage it with mode={mode!r}"
            )
        row = conn.execute(
            sa.select(
                t.attempts.c.state,
                t.attempts.c.committed_version,
                t.attempts.c.lease_expires_at,
                (t.attempts.c.lease_expires_at < sa.func.now()).label("expired"),
            )
            .where(t.attempts.c.attempt_id == attempt.attempt_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise CommitError(f"attempt {attempt.attempt_id} is unknown to the version store")
        if row.state in _ENDED_WITH_A_VERSION:  # a retry after an unknown outcome
            who = f"attempt {attempt.attempt_id}"
            record = self._landed(conn, attempt, row.committed_version, who)
            unchanged = row.state == UNCHANGED
            return CommitResult(record, True, record.schema_version, None, unchanged=unchanged)
        if row.state != "staging":
            raise AttemptFencedError(
                f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
                f"is {row.state!r} and can no longer commit; its files are never "
                "referenced. Retry the run to write a new attempt"
            )
        if row.expired:
            # recorded (the transaction commits) before the refusal is raised
            self._set_state(conn, attempt, "abandoned")
            return LeaseExpiredError(
                f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
                f"let its lease expire at {row.lease_expires_at:%Y-%m-%d %H:%M:%S%z} (its "
                "writer stalled longer than the lease and stopped heartbeating), so a "
                "staging cleanup may have removed its files: the commit was refused and its "
                "files are never referenced. Retry the run; raise "
                "StateStoreResource.lease_s if writers legitimately stall this long"
            )
        # the fence row lock serialises every commit of this (dataset, partition)
        fence = conn.execute(
            sa.select(t.fences.c.fence)
            .where(t.fences.c.dataset == attempt.dataset)
            .where(t.fences.c.partition_key == attempt.partition_key)
            .with_for_update()
        ).scalar_one()
        landed = self._committed_by_key(conn, attempt, commit_key)
        if landed is not None:
            who = f"the writer with commit key {commit_key!r}"
            record = self._landed(conn, attempt, landed, who)
            self._set_state(conn, attempt, "committed", landed)
            return CommitResult(record, True, record.schema_version, None)
        if mode == "append" or fence == attempt.fence:
            result = self._commit_fenced(conn, attempt, manifest, schema, mode, keys, registered)
            if isinstance(result, CommitError):
                return result
            if commit_key is not None and not result.already_committed:
                self._record_commit_key(conn, attempt, commit_key, result.version.version)
            return result
        self._set_state(conn, attempt, "fenced")
        return AttemptFencedError(
            f"attempt {attempt.attempt_id} of {attempt.dataset}/{attempt.partition_key} "
            f"holds fence {attempt.fence} but a newer attempt holds fence {fence}; "
            "this stale write was refused and its files are never referenced"
        )

    def _commit_fenced(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        manifest: Manifest,
        schema: pa.Schema,
        mode: CommitMode,
        segment_keys: list[str] | None,
        registered: dict[str, tuple[str, int]],
    ) -> CommitResult | CommitError:
        """The commit proper, once the attempt may commit (its row and the fence row locked).

        `registered` remembers, per dataset, the schema this transaction last checked against
        the registry (fingerprint, version): a batch of partitions with the same schema checks
        it once (holding the registry row lock until it commits); any other schema goes
        through the registry as it would alone."""
        current = self._current_row(conn, attempt.dataset, attempt.partition_key)
        if mode == "replace" and current is not None and _same_content(current, manifest):
            return self._keep(conn, attempt, manifest, current)
        if mode == "append":
            if current is not None and _sealed(current):
                self._set_state(conn, attempt, "failed")
                return PartitionSealedError(
                    f"append to {attempt.dataset}/{attempt.partition_key} by attempt "
                    f"{attempt.attempt_id} refused: the range is sealed (its current version "
                    f"v{current.version} was committed in replace mode), so nothing was "
                    "appended. Appends go to the open range after it; to change a sealed "
                    "range, commit it again in replace mode"
                )
        fingerprint = schema_fingerprint(schema)
        known = registered.get(attempt.dataset)
        if known is not None and known[0] == fingerprint:  # the registry's current schema
            schema_version, drift = int(known[1]), None
        else:
            schema_version, drift = register_schema(conn, attempt.dataset, schema, mode)
            registered[attempt.dataset] = (fingerprint, schema_version)
        if mode == "append":
            return self._append(
                conn, attempt, manifest, schema_version, drift, segment_keys, current
            )
        if manifest.source is not None:
            _check_continuity(conn, attempt.dataset, attempt.partition_key, manifest.source)
        number = self._record_version(
            conn,
            attempt,
            "replace",
            schema_version,
            manifest.as_dict(),
            manifest.rows,
            manifest.bytes,
            {"mode": mode, "rows": manifest.rows, "bytes": manifest.bytes},
        )
        record = VersionRecord(
            attempt.dataset,
            attempt.partition_key,
            number,
            attempt.attempt_id,
            mode,
            schema_version,
            manifest,
        )
        return CommitResult(record, False, schema_version, drift)

    def _keep(
        self, conn: sa.Connection, attempt: Attempt, manifest: Manifest, current: sa.Row[Any]
    ) -> CommitResult:
        """The no-op commit of a replace identical to the current version: the attempt ends
        'unchanged' with the version it kept; nothing else is written. Its neighbours are
        checked as for a commit, so a range that no longer links to them is refused alike."""
        if manifest.source is not None:
            _check_continuity(conn, attempt.dataset, attempt.partition_key, manifest.source)
        self._set_state(conn, attempt, UNCHANGED, current.version)
        [record] = expand(conn, [current])
        return CommitResult(record, False, record.schema_version, None, unchanged=True)

    def _append(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        manifest: Manifest,
        schema_version: int,
        drift: dict[str, Any] | None,
        segment_keys: list[str] | None,
        current: sa.Row[Any] | None,
    ) -> CommitResult:
        """One segment row, its keys and a new version whose manifest holds the base files and
        the live window: a constant number of statements on index lookups, however many
        segments the partition holds (no segment is read, no manifest grows).

        The segment's keys are all new (appended), all present (a retried append: a no-op)
        or mixed: refused, because a file can not be half referenced; the writer recomputes
        the batch without the keys that landed.
        """
        dataset, partition_key = attempt.dataset, attempt.partition_key
        keys = list(dict.fromkeys(segment_keys or [attempt.attempt_id]))
        s = t.segments.c
        seq = (
            conn.execute(
                sa.select(sa.func.max(s.seq))
                .where(s.dataset == dataset)
                .where(s.partition_key == partition_key)
            ).scalar()
            or 0
        ) + 1
        inserted = conn.execute(
            pg_insert(t.segment_keys)
            .values(
                [
                    {"dataset": dataset, "partition_key": partition_key, "key": k, "seq": seq}
                    for k in keys
                ]
            )
            .on_conflict_do_nothing()
        ).rowcount
        if inserted == 0:  # a retry: every key landed already
            if current is None:
                raise CommitError(
                    f"append to {dataset}/{partition_key}: its segment keys are recorded but the "
                    "partition has no version (state edited by hand?); nothing was committed"
                )
            self._set_state(conn, attempt, "committed", current.version)
            [record] = expand(conn, [current])
            return CommitResult(record, True, record.schema_version, None)
        if inserted != len(keys):
            landed = conn.execute(
                sa.select(t.segment_keys.c.key)
                .where(t.segment_keys.c.dataset == dataset)
                .where(t.segment_keys.c.partition_key == partition_key)
                .where(t.segment_keys.c.key.in_(keys))
                .where(t.segment_keys.c.seq != seq)
                .limit(3)
            ).scalars()
            raise SegmentConflictError(
                f"append to {dataset}/{partition_key} by attempt {attempt.attempt_id} carries "
                f"{len(keys) - inserted} segment key(s) already appended (e.g. {list(landed)}) "
                f"next to {inserted} new one(s); nothing was committed. Recompute the batch "
                "without the keys already in the dataset (a concurrent writer appended them) "
                "and retry"
            )
        base: list[dict[str, Any]] = []
        live_from, rows, nbytes, previous_source = 0, 0, 0, None
        if current is not None:
            base = list(current.manifest["files"])
            live_from = (window(current.manifest) or (0, 0))[0]
            rows, nbytes = int(current.row_count), int(current.byte_count)
            previous_source = current.manifest.get("source")
        source = _merged_source(previous_source, manifest.source)
        if manifest.source is not None and source is not None:
            _check_continuity(conn, dataset, partition_key, source)
        first_block, last_block = _block(manifest.source, "first"), _block(manifest.source, "last")
        stored = {
            "files": base,
            "rows": rows + manifest.rows,
            "bytes": nbytes + manifest.bytes,
            "schema_hash": manifest.schema_hash,
            "source": source,
            "live_from_seq": live_from,
            "through_seq": seq,
        }
        number = self._record_version(
            conn,
            attempt,
            "append",
            schema_version,
            stored,
            rows + manifest.rows,
            nbytes + manifest.bytes,
            {
                "mode": "append",
                "rows": rows + manifest.rows,
                "bytes": nbytes + manifest.bytes,
                "segment_rows": manifest.rows,
                "segment_bytes": manifest.bytes,
                "seq": seq,
                "first_block": first_block,
                "last_block": last_block,
            },
        )
        conn.execute(
            t.segments.insert().values(
                dataset=dataset,
                partition_key=partition_key,
                seq=seq,
                attempt_id=attempt.attempt_id,
                version=number,
                files=[f.as_dict() for f in manifest.files],
                row_count=manifest.rows,
                byte_count=manifest.bytes,
                first_block=first_block,
                last_block=last_block,
                source=manifest.source,
            )
        )
        segment = Manifest(
            list(manifest.files),
            manifest.schema_hash,
            source,
            live_from_seq=seq - 1,
            through_seq=seq,
            base_files=0,
        )
        record = VersionRecord(
            dataset, partition_key, number, attempt.attempt_id, "append", schema_version, segment
        )
        return CommitResult(record, False, schema_version, drift, segment_seq=seq)

    def _record_version(
        self,
        conn: sa.Connection,
        attempt: Attempt,
        mode: str,
        schema_version: int,
        stored: dict[str, Any],
        rows: int,
        nbytes: int,
        payload: dict[str, Any],
    ) -> int:
        """Insert the next version of the partition, move its pointer (and announce it to the
        readers caching current versions: `pointer_events`), mark the attempt committed and
        write the outbox event; the new version number."""
        number = (
            conn.execute(
                sa.select(sa.func.max(t.versions.c.version))
                .where(t.versions.c.dataset == attempt.dataset)
                .where(t.versions.c.partition_key == attempt.partition_key)
            ).scalar()
            or 0
        ) + 1
        conn.execute(
            t.versions.insert().values(
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                version=number,
                attempt_id=attempt.attempt_id,
                commit_mode=mode,
                schema_version=schema_version,
                manifest=stored,
                row_count=rows,
                byte_count=nbytes,
            )
        )
        conn.execute(
            pg_insert(t.pointers)
            .values(
                dataset=attempt.dataset, partition_key=attempt.partition_key, current_version=number
            )
            .on_conflict_do_update(
                index_elements=["dataset", "partition_key"],
                set_={"current_version": number, "updated_at": sa.func.now()},
            )
        )
        announce(conn, attempt.dataset)  # delivered when the transaction commits
        self._set_state(conn, attempt, "committed", number)
        event_payload = {
            "attempt_id": attempt.attempt_id,
            "run_id": attempt.run_id,
            "step_key": attempt.step_key,
            "schema_version": schema_version,
            **payload,
        }
        correlation_id = self.correlation[0] if self.correlation is not None else None
        outbox_id, created_at = conn.execute(
            t.outbox.insert()
            .values(
                event_type=COMMITTED_EVENT,
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                version=number,
                payload=event_payload,
                correlation_id=correlation_id,
            )
            .returning(t.outbox.c.id, t.outbox.c.created_at)
        ).one()
        if self.correlation is not None:
            record_hops(
                conn,
                [
                    {
                        "correlation_id": correlation_id,
                        "hop": "commit",
                        "process": self.correlation[1],
                        "details": {
                            "dataset": attempt.dataset,
                            "partition": attempt.partition_key,
                            "version": number,
                            "run_id": attempt.run_id,
                            "step_key": attempt.step_key,
                        },
                    }
                ],
            )
        pending = _committed_events.get()
        if pending is not None:
            pending.append(
                {
                    "event_type": COMMITTED_EVENT,
                    "outbox_id": outbox_id,
                    "dataset": attempt.dataset,
                    "partition_key": attempt.partition_key,
                    "version": number,
                    "payload": event_payload,
                    "created_at": created_at.isoformat(),
                }
            )
        return number

    @staticmethod
    def _committed_by_key(
        conn: sa.Connection, attempt: Attempt, commit_key: str | None
    ) -> int | None:
        """The version this logical writer already committed here, if any."""
        if commit_key is None:
            return None
        return conn.execute(
            sa.select(t.commit_keys.c.version)
            .where(t.commit_keys.c.dataset == attempt.dataset)
            .where(t.commit_keys.c.partition_key == attempt.partition_key)
            .where(t.commit_keys.c.commit_key == commit_key)
        ).scalar_one_or_none()

    def _landed(
        self, conn: sa.Connection, attempt: Attempt, version: int, who: str
    ) -> VersionRecord:
        """The version an earlier commit landed as. If GC has removed it since: for an append,
        the current version (which carries its segments forward); for a replace, a refusal."""
        landed = find_version(conn, attempt.dataset, attempt.partition_key, version)
        if landed is not None:
            return landed
        if attempt.mode == "append":
            # later appends carried the segments forward: the current version holds them
            current_record = self._current(conn, attempt.dataset, attempt.partition_key)
            if current_record is not None:
                return current_record
        current = conn.execute(
            sa.select(t.pointers.c.current_version)
            .where(t.pointers.c.dataset == attempt.dataset)
            .where(t.pointers.c.partition_key == attempt.partition_key)
        ).scalar_one_or_none()
        raise VersionRemovedError(
            f"{who} already committed {attempt.dataset}/{attempt.partition_key} as version "
            f"{version}, which a newer version (now v{current}) has superseded and GC has "
            "removed since. Nothing was written again: the newer version stands"
        )

    @staticmethod
    def _record_commit_key(
        conn: sa.Connection, attempt: Attempt, commit_key: str, version: int
    ) -> None:
        conn.execute(
            pg_insert(t.commit_keys)
            .values(
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                commit_key=commit_key,
                version=version,
                attempt_id=attempt.attempt_id,
            )
            .on_conflict_do_update(  # the key's earlier version was removed by GC
                index_elements=["dataset", "partition_key", "commit_key"],
                set_={"version": version, "attempt_id": attempt.attempt_id},
            )
        )

    # -- reads ---------------------------------------------------------------------------

    @staticmethod
    def _current_row(conn: sa.Connection, dataset: str, partition_key: str) -> sa.Row[Any] | None:
        """The current version's row as stored (an open version's segments unresolved), its
        pointer row locked."""
        number = conn.execute(
            sa.select(t.pointers.c.current_version)
            .where(t.pointers.c.dataset == dataset)
            .where(t.pointers.c.partition_key == partition_key)
            .with_for_update()
        ).scalar_one_or_none()
        if number is None:
            return None
        return conn.execute(
            sa.select(t.versions)
            .where(t.versions.c.dataset == dataset)
            .where(t.versions.c.partition_key == partition_key)
            .where(t.versions.c.version == number)
        ).one_or_none()

    def _current(
        self, conn: sa.Connection, dataset: str, partition_key: str
    ) -> VersionRecord | None:
        number = conn.execute(
            sa.select(t.pointers.c.current_version)
            .where(t.pointers.c.dataset == dataset)
            .where(t.pointers.c.partition_key == partition_key)
            .with_for_update()
        ).scalar_one_or_none()
        return None if number is None else find_version(conn, dataset, partition_key, number)

    @staticmethod
    def _set_state(
        conn: sa.Connection, attempt: Attempt, state: str, version: int | None = None
    ) -> None:
        conn.execute(
            t.attempts.update()
            .where(t.attempts.c.attempt_id == attempt.attempt_id)
            .values(state=state, committed_version=version, updated_at=sa.func.now())
        )


def _same_content(current: sa.Row[Any], manifest: Manifest) -> bool:
    """The staged files hold exactly the current sealed version's data: the same files in the
    same order (sha256 of their bytes, rows, sizes; Parquet from the same table is the same
    bytes), the same schema and the same source blocks. An open version never is: a replace
    seals it, which is a change."""
    stored = current.manifest
    if current.commit_mode != "replace" or window(stored) is not None or stored.get("segments"):
        return False
    return (
        [(f["sha256"], int(f["rows"]), int(f["size"])) for f in stored["files"]]
        == [(f.sha256, f.rows, f.size) for f in manifest.files]
        and stored.get("schema_hash") == manifest.schema_hash
        and _without_endpoint(stored.get("source")) == _without_endpoint(manifest.source)
    )


def _without_endpoint(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """A source without the endpoint that served it: the same blocks from another endpoint
    are the same content."""
    return None if source is None else {k: v for k, v in source.items() if k != "endpoint"}


def _sealed(current: sa.Row[Any]) -> bool:
    """A partition whose current version is a replace version takes no appends. (An append
    version of the pre-segment-row format, without a window, is open: its files are its base.)"""
    return window(current.manifest) is None and current.commit_mode != "append"


def _block(source: dict[str, Any] | None, end: str) -> int | None:
    number = ((source or {}).get(end) or {}).get("number")
    return None if number is None else int(number)


def _merged_source(
    previous: dict[str, Any] | None, appended: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The open version's source: its first block from the partition's first data, the rest
    (last block, range) from the newest append."""
    if appended is None:
        return previous
    if previous is None or not previous.get("first"):
        return appended
    return {**appended, "first": previous["first"]}


def _check_continuity(
    conn: sa.Connection, dataset: str, partition_key: str, source: dict[str, Any]
) -> None:
    """A range must link to its committed neighbours by parent hash; else a fork: refuse."""
    this = parse_partition_key(partition_key)
    neighbour_keys = [k for k in (this.previous_key(), this.next_key()) if k]
    rows = conn.execute(current_query(dataset, neighbour_keys)).all()
    for row in rows:
        key, other = row.partition_key, row.manifest.get("source") or {}
        if not other:
            continue
        if key == this.previous_key() and other["last"]["hash"] != source["first"]["parent_hash"]:
            raise ChainContinuityError(
                f"{dataset} range {partition_key} starts at block {source['first']['number']} "
                f"whose parent hash {source['first']['parent_hash']} is not the hash "
                f"{other['last']['hash']} of block {other['last']['number']} committed in "
                f"{key}: the chain forked between the two extractions. Nothing was "
                f"committed; re-materialise {key} and {partition_key} from a finalized head"
            )
        if key == this.next_key() and other["first"]["parent_hash"] != source["last"]["hash"]:
            raise ChainContinuityError(
                f"{dataset} range {partition_key} ends at block {source['last']['number']} "
                f"with hash {source['last']['hash']}, but the committed range {key} says its "
                f"parent is {other['first']['parent_hash']}: the chain forked between the "
                f"two extractions. Nothing was committed; re-materialise both ranges"
            )
