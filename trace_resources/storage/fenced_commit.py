"""The fenced commit: one Postgres transaction that checks the attempt still holds its fence,
registers the schema, checks chain continuity, records the version and its manifest, moves the
current-version pointer and writes the outbox event; appends and commit keys make retries
no-ops. `commit_many` does the same for a batch of attempts in one transaction.

The protocol's order of steps (stage, verify, commit) lives in `commit.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from trace_resources.storage.read_model import current_query, find_version
from trace_resources.storage.records import (
    COMMITTED_EVENT,
    Attempt,
    BatchItem,
    BatchNotCommitted,
    CommitMode,
    CommitResult,
    Manifest,
    VersionRecord,
)
from trace_resources.storage.schemas import register_schema, schema_fingerprint

__all__ = ["FencedCommits"]


class FencedCommits:
    """Commit staged attempts: fenced, idempotent by attempt id and by commit key."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

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
        version. In append mode, segments already in the current version make it a no-op.
        Refused, with the reason recorded on the attempt: a stale replace attempt (a newer
        one holds the fence), an attempt whose lease expired, an attempt no longer staging.
        """
        keys = list(segment_keys) if segment_keys is not None else None
        if keys is None and segment_key is not None:
            keys = [segment_key]
        with self.engine.begin() as conn:
            outcome = self._commit_one(conn, attempt, manifest, schema, mode, keys, commit_key, {})
        if isinstance(outcome, CommitError):
            raise outcome  # its refusal was recorded on the attempt by the transaction
        return outcome

    def commit_many(
        self,
        items: Sequence[BatchItem],
        *,
        mode: CommitMode = "replace",
        commit_key: str | None = None,
    ) -> list[CommitResult]:
        """Commit many staged attempts in ONE transaction, each exactly as `commit` would.

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
        try:
            with self.engine.begin() as conn:
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
        except (CommitError, ChainContinuityError) as exc:
            if isinstance(exc, BatchNotCommitted):
                raise
            raise BatchNotCommitted(str(exc)) from exc
        return [results[i.attempt.attempt_id] for i in items]

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
        if row.state == "committed":
            who = f"attempt {attempt.attempt_id}"
            record = self._landed(conn, attempt, row.committed_version, who)
            return CommitResult(record, True, record.schema_version, None)
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
    ) -> CommitResult:
        """The commit proper, once the attempt may commit (its row and the fence row locked).

        `registered` remembers, per dataset, the schema this transaction last checked against
        the registry (fingerprint, version): a batch of partitions with the same schema checks
        it once (holding the registry row lock until it commits); any other schema goes
        through the registry as it would alone."""
        fingerprint = schema_fingerprint(schema)
        known = registered.get(attempt.dataset)
        if known is not None and known[0] == fingerprint:  # the registry's current schema
            schema_version, drift = int(known[1]), None
        else:
            schema_version, drift = register_schema(conn, attempt.dataset, schema, mode)
            registered[attempt.dataset] = (fingerprint, schema_version)
        current = self._current(conn, attempt.dataset, attempt.partition_key)
        if mode == "append":
            if current is not None and _sealed(current):
                raise PartitionSealedError(
                    f"append to {attempt.dataset}/{attempt.partition_key} by attempt "
                    f"{attempt.attempt_id} refused: its current version {current.version} is a "
                    "sealed (replace) version; nothing was appended"
                )
            manifest, duplicate = _appended(current, manifest, segment_keys, attempt)
            if duplicate and current is not None:
                self._set_state(conn, attempt, "committed", current.version)
                return CommitResult(current, True, current.schema_version, None)
        if manifest.source is not None:
            _check_continuity(conn, attempt.dataset, attempt.partition_key, manifest.source)
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
                manifest=manifest.as_dict(),
                row_count=manifest.rows,
                byte_count=manifest.bytes,
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
        self._set_state(conn, attempt, "committed", number)
        conn.execute(
            t.outbox.insert().values(
                event_type=COMMITTED_EVENT,
                dataset=attempt.dataset,
                partition_key=attempt.partition_key,
                version=number,
                payload={
                    "attempt_id": attempt.attempt_id,
                    "run_id": attempt.run_id,
                    "step_key": attempt.step_key,
                    "mode": mode,
                    "rows": manifest.rows,
                    "bytes": manifest.bytes,
                    "schema_version": schema_version,
                },
            )
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


def _sealed(current: VersionRecord) -> bool:
    """A replace version without segments (a sealed range): appends on top of it would
    duplicate its rows."""
    return current.commit_mode == "replace" and not current.manifest.segment_keys()


def _appended(
    current: VersionRecord | None,
    manifest: Manifest,
    segment_keys: list[str] | None,
    attempt: Attempt,
) -> tuple[Manifest, bool]:
    """The current manifest plus this attempt's segment, or (current, True) if a retry.

    A segment's keys are all new (appended), all present (a retried append: a no-op) or
    mixed: refused, because a file can not be half referenced; the writer recomputes the
    batch without the keys that landed.
    """
    keys = segment_keys or [attempt.attempt_id]
    label = keys[0] if len(keys) == 1 else f"{keys[0]} (+{len(keys) - 1})"
    segment = {
        "segment_key": label,
        "keys": keys,
        "attempt_id": attempt.attempt_id,
        "files": [f.key for f in manifest.files],
    }
    if current is None:
        return Manifest(manifest.files, manifest.schema_hash, manifest.source, [segment]), False
    present = current.manifest.segment_keys()
    landed = [k for k in keys if k in present]
    if len(landed) == len(keys):
        return current.manifest, True
    if landed:
        raise SegmentConflictError(
            f"append to {attempt.dataset}/{attempt.partition_key} by attempt "
            f"{attempt.attempt_id} carries {len(landed)} segment key(s) already appended "
            f"(e.g. {landed[:3]}) next to {len(keys) - len(landed)} new one(s); nothing was "
            "committed. Recompute the batch without the keys already in the dataset "
            "(a concurrent writer appended them) and retry"
        )
    merged = Manifest(
        files=[*current.manifest.files, *manifest.files],
        schema_hash=manifest.schema_hash,
        source=manifest.source or current.manifest.source,
        segments=[*current.manifest.segments, segment],
    )
    return merged, False


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
