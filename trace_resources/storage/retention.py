"""Retention: which superseded versions GC may remove (policy, pins, the files only they
reference), the write-ahead queue of files to delete, and the consistent snapshot of a
dataset's attempts and referenced files that staging cleanup decides by.

The order of GC's steps (choose, remove, delete objects) lives in `gc.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage import state as t
from trace_resources.storage.pins import gc_lock
from trace_resources.storage.read_model import Window, segments_in
from trace_resources.storage.records import (
    AttemptRow,
    FileEntry,
    RemovedVersion,
    StorageSnapshot,
    interval,
    window,
)

__all__ = ["Retention"]


def _open(row: Any) -> bool:
    return window(row.manifest) is not None or row.commit_mode == "append"


def _merged(dataset: str, windows: Iterable[tuple[str, tuple[int, int] | None]]) -> list[Window]:
    """Per partition, the union of its versions' segment windows as disjoint windows."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for key, w in windows:
        if w is not None and w[1] > w[0]:
            spans.setdefault(key, []).append(w)
    merged: list[Window] = []
    for key, found in sorted(spans.items()):
        lo, hi = None, None
        for a, b in sorted(found):
            if hi is not None and a <= hi:
                hi = max(hi, b)
                continue
            if lo is not None and hi is not None:
                merged.append((dataset, key, lo, hi))
            lo, hi = a, b
        if lo is not None and hi is not None:
            merged.append((dataset, key, lo, hi))
    return merged


class Retention:
    """GC's view of the version store: datasets, removable versions, queued files."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def known_datasets(self) -> list[str]:
        """Datasets with a registry entry or with attempts (maybe never committed)."""
        with self.engine.connect() as conn:
            names = conn.execute(
                sa.union(
                    sa.select(t.datasets.c.name.label("name")),
                    sa.select(t.attempts.c.dataset.label("name")).distinct(),
                )
            ).scalars()
            return sorted(names)

    def remove_versions(
        self,
        dataset: str,
        *,
        keep_last: int,
        older_than_s: float,
        apply: bool,
        only: Collection[tuple[str, int]] | None = None,
        guard: Callable[[sa.Connection], None] | None = None,
    ) -> list[RemovedVersion]:
        """Superseded versions to remove under the policy, and the files only they reference.

        A version is removed when it is not current, not among the `keep_last` newest of its
        partition, was superseded more than `older_than_s` ago and has no unexpired reader pin.
        With `apply`, one transaction holding the dataset's GC lock (so no reader pins a
        version while it is chosen) deletes the version rows and their commit keys and queues
        the files for deletion (`trace_gc_queue`); the caller deletes the objects afterwards.
        Without `apply` nothing changes. `only` ((partition, version) pairs, e.g. a dry run's
        plan) narrows the choice further: nothing outside it is removed. `guard(conn)` runs
        first in an applying transaction and may refuse it by raising (the GC's leader lease).
        """
        keep_last = max(keep_last, 1)
        with self.engine.begin() as conn:
            if apply and guard is not None:
                guard(conn)
            if apply:
                gc_lock(conn, dataset, shared=False)
            chosen = conn.execute(self._removable_query(dataset, keep_last, older_than_s)).all()
            if only is not None:
                allowed = set(only)
                chosen = [r for r in chosen if (r.partition_key, r.version) in allowed]
            if not chosen:
                return []
            partitions = sorted({r.partition_key for r in chosen})
            doomed = [(r.partition_key, r.version) for r in chosen]
            kept = conn.execute(
                sa.select(
                    t.versions.c.partition_key, t.versions.c.commit_mode, t.versions.c.manifest
                )
                .where(t.versions.c.dataset == dataset)
                .where(t.versions.c.partition_key.in_(partitions))
                .where(sa.tuple_(t.versions.c.partition_key, t.versions.c.version).notin_(doomed))
            ).all()
            # versions share files with their successors (append mode: base files, and live
            # segment windows that overlap): delete only what no kept version references (its
            # base files and its window's segments), and each file once
            kept_windows = _merged(dataset, [(r.partition_key, window(r.manifest)) for r in kept])
            claimed = {f["key"] for r in kept for f in r.manifest["files"]}
            for found in segments_in(conn, kept_windows).values():
                claimed.update(f.key for _, files in found for f in files)
            doomed_windows = _merged(
                dataset, [(r.partition_key, window(r.manifest)) for r in chosen]
            )
            by_seq: dict[str, dict[int, list[FileEntry]]] = {}
            for (_, key, _, _), found in segments_in(conn, doomed_windows).items():
                by_seq.setdefault(key, {}).update(found)
            assigned: dict[str, int] = {}  # per partition: segments already given a version
            removed = []
            for r in chosen:  # in (partition, version) order; windows only move forward
                files = [FileEntry(**f) for f in r.manifest["files"]]
                w = window(r.manifest)
                if w is not None:
                    done = assigned.get(r.partition_key, 0)
                    segs = by_seq.get(r.partition_key, {})
                    for seq in range(max(w[0], done) + 1, w[1] + 1):
                        files += segs.get(seq, [])
                    assigned[r.partition_key] = max(done, w[1])
                files = [f for f in files if f.key not in claimed]
                claimed.update(f.key for f in files)
                removed.append(
                    RemovedVersion(dataset, r.partition_key, r.version, r.created_at, files)
                )
            # a partition left without an open version (sealed, its open versions removed):
            # its segment rows and keys go too (their files are queued above or were before)
            still_open = {r.partition_key for r in kept if _open(r)}
            closed = sorted({r.partition_key for r in chosen if _open(r)} - still_open)
            if apply:
                # commit keys stay (tombstones): a late retry of the writer that committed a
                # removed version must not commit its superseded data again
                conn.execute(
                    t.versions.delete()
                    .where(t.versions.c.dataset == dataset)
                    .where(sa.tuple_(t.versions.c.partition_key, t.versions.c.version).in_(doomed))
                )
                queued = [
                    {"key": f.key, "dataset": dataset, "reason": f"{r.partition_key} v{r.version}"}
                    for r in removed
                    for f in r.files
                ]
                if queued:
                    conn.execute(pg_insert(t.gc_queue).on_conflict_do_nothing(), queued)
                for table in (t.segments, t.segment_keys):
                    if closed:
                        conn.execute(
                            table.delete()
                            .where(table.c.dataset == dataset)
                            .where(table.c.partition_key.in_(closed))
                        )
        return removed

    def _removable_query(self, dataset: str, keep_last: int, older_than_s: float) -> sa.Select[Any]:
        v = t.versions
        partition = (v.c.dataset, v.c.partition_key)
        ranked = (
            sa.select(
                v.c.dataset,
                v.c.partition_key,
                v.c.version,
                v.c.commit_mode,
                v.c.manifest,
                v.c.created_at,
                sa.func.row_number()
                .over(partition_by=partition, order_by=v.c.version.desc())
                .label("rank"),
                # when the next kept version landed: the moment this one stopped being current
                sa.func.lead(v.c.created_at)
                .over(partition_by=partition, order_by=v.c.version)
                .label("superseded_at"),
            )
            .where(v.c.dataset == dataset)
            .subquery()
        )
        pinned = (
            sa.select(t.pins.c.version)
            .where(t.pins.c.dataset == ranked.c.dataset)
            .where(t.pins.c.partition_key == ranked.c.partition_key)
            .where(t.pins.c.version == ranked.c.version)
            .where(t.pins.c.expires_at > sa.func.now())
        )
        return (
            sa.select(ranked)
            .join(
                t.pointers,
                (t.pointers.c.dataset == ranked.c.dataset)
                & (t.pointers.c.partition_key == ranked.c.partition_key),
            )
            .where(ranked.c.version < t.pointers.c.current_version)
            .where(ranked.c.rank > keep_last)
            .where(ranked.c.superseded_at < sa.func.now() - interval(older_than_s))
            .where(~sa.exists(pinned))
            .order_by(ranked.c.partition_key, ranked.c.version)
        )

    def queued_files(
        self, datasets: Sequence[str] | None = None, limit: int = 10_000
    ) -> list[tuple[str, str]]:
        """(key, dataset) of files of removed versions still to delete."""
        query = sa.select(t.gc_queue.c.key, t.gc_queue.c.dataset)
        if datasets is not None:
            query = query.where(t.gc_queue.c.dataset.in_(list(datasets)))
        with self.engine.connect() as conn:
            rows = conn.execute(
                query.order_by(t.gc_queue.c.queued_at, t.gc_queue.c.key).limit(limit)
            ).all()
        return [(r.key, r.dataset) for r in rows]

    def dequeue_files(self, keys: Sequence[str]) -> None:
        if keys:
            with self.engine.begin() as conn:
                conn.execute(t.gc_queue.delete().where(t.gc_queue.c.key.in_(list(keys))))

    def storage_snapshot(self, dataset: str, attempt_ids: Iterable[str]) -> StorageSnapshot:
        """The given attempts' states and every file the dataset's versions reference, read in
        one REPEATABLE READ transaction so the two agree (an attempt seen committed has its
        version seen too)."""
        ids = sorted(set(attempt_ids))
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                found: dict[str, AttemptRow] = {}
                for offset in range(0, len(ids), 5_000):
                    rows = conn.execute(
                        sa.select(
                            t.attempts.c.attempt_id,
                            t.attempts.c.dataset,
                            t.attempts.c.partition_key,
                            t.attempts.c.state,
                            (t.attempts.c.lease_expires_at > sa.func.now()).label("live"),
                        ).where(t.attempts.c.attempt_id.in_(ids[offset : offset + 5_000]))
                    )
                    for r in rows:
                        found[str(r.attempt_id)] = AttemptRow(
                            str(r.attempt_id),
                            r.dataset,
                            r.partition_key,
                            r.state,
                            r.state == "staging" and bool(r.live),
                        )
                files = sa.func.jsonb_array_elements(t.versions.c.manifest["files"]).table_valued(
                    sa.column("value", JSONB)
                )
                referenced = set(
                    conn.execute(
                        sa.select(files.c.value["key"].astext)
                        .select_from(t.versions)
                        .join(files, sa.true())
                        .where(t.versions.c.dataset == dataset)
                        .distinct()
                    ).scalars()
                )
                # every segment's files, live or compacted: a segment row is deleted only
                # after GC queued its files (the versions that listed them are gone)
                segment_files = sa.func.jsonb_array_elements(t.segments.c.files).table_valued(
                    sa.column("value", JSONB)
                )
                referenced.update(
                    conn.execute(
                        sa.select(segment_files.c.value["key"].astext)
                        .select_from(t.segments)
                        .join(segment_files, sa.true())
                        .where(t.segments.c.dataset == dataset)
                    ).scalars()
                )
        return StorageSnapshot(found, referenced)
