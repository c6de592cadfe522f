"""Garbage collection of superseded versions (`trace gc`) and of staging leftovers
(`trace staging-cleanup`). Both are dry runs unless asked to apply, and both are safe while
writers and readers work:

- `collect` removes superseded versions under a keep-last-N and an older-than policy. It never
  removes a current version or one a reader has pinned: the versions are chosen and their rows
  deleted in one transaction holding the dataset's GC lock, which readers take (shared) while
  they pin. The files only those versions referenced are queued in the same transaction and
  deleted afterwards, so a GC killed half way finishes on its next run; files shared with kept
  versions (append mode) stay.
- `cleanup_staging` first marks attempts whose lease ran out 'abandoned' (a transaction under
  their row locks: their commit can no longer land), then deletes files of attempts that can
  never be committed (failed, fenced, abandoned, or unchanged: a replace identical to the
  current version, which kept it), files of committed attempts that no kept version
  references (a deduplicated retry, the tail of an interrupted GC), and orphans: data files of
  attempts no attempt row knows, once older than a grace period. Files of live attempts and
  every file a version references are never touched.

Iceberg's `expire_snapshots` + `remove_orphan_files` and Delta's `VACUUM` (with its retention
period) are the models; the logic is here, the SQL in `retention.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from trace_resources.storage.crash import crash_point
from trace_resources.storage.object_store import ObjectInfo, ObjectStore
from trace_resources.storage.paths import dataset_prefix, parse_data_key
from trace_resources.storage.records import AttemptRow, RemovedVersion
from trace_resources.storage.version_store import VersionStore

__all__ = [
    "CleanupItem",
    "CleanupReport",
    "GarbageCollector",
    "GcPolicy",
    "GcReport",
]


@dataclass(frozen=True)
class GcPolicy:
    """Which superseded versions to remove: beyond the newest `keep_last` of a partition (the
    current one included) AND superseded more than `older_than` ago."""

    keep_last: int = 2
    older_than: timedelta = timedelta(days=1)


@dataclass
class GcReport:
    applied: bool
    versions: list[RemovedVersion]
    files: list[str]  # deleted (applied) or to delete (dry run)
    pending: list[str] = field(default_factory=list)  # queued by an earlier, interrupted GC
    pins_dropped: int = 0

    @property
    def bytes(self) -> int:
        return sum(v.bytes for v in self.versions)

    @property
    def planned(self) -> list[tuple[str, str, int]]:
        """(dataset, partition, version) of the versions removed (or to remove)."""
        return [(v.dataset, v.partition_key, v.version) for v in self.versions]

    def lines(self) -> Iterator[str]:
        verb = "removed" if self.applied else "would remove"
        for v in self.versions:
            yield (
                f"{verb} {v.dataset} {v.partition_key} v{v.version} "
                f"(committed {v.created_at:%Y-%m-%d %H:%M:%S}, {len(v.files)} file(s) only it "
                f"referenced, {v.bytes:,} bytes)"
            )
        for key in self.files if self.applied else self.pending:
            yield f"{'deleted' if self.applied else 'would finish deleting'} {key}"
        yield (
            f"gc: {len(self.versions)} version(s), {len(self.files)} file(s), {self.bytes:,} "
            f"bytes {verb}"
            + (f", {self.pins_dropped} expired pin(s) dropped" if self.pins_dropped else "")
            + ("" if self.applied else " (dry run: --apply to remove)")
        )


@dataclass(frozen=True)
class CleanupItem:
    key: str
    size: int
    reason: str


@dataclass
class CleanupReport:
    applied: bool
    abandoned: list[AttemptRow] = field(default_factory=list)
    removed: list[CleanupItem] = field(default_factory=list)
    kept_live: int = 0
    kept_young_orphans: int = 0
    unrecognised: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        verb = "removed" if self.applied else "would remove"
        for a in self.abandoned:
            yield (
                f"{'abandoned' if self.applied else 'would abandon'} attempt {a.attempt_id} "
                f"of {a.dataset} {a.partition_key} (lease expired)"
            )
        for item in self.removed:
            yield f"{verb} {item.key} ({item.size:,} bytes): {item.reason}"
        for key in self.unrecognised:
            yield f"left alone {key}: not a data file of the layout (not Trace's)"
        yield (
            f"staging-cleanup: {len(self.removed)} file(s), "
            f"{sum(i.size for i in self.removed):,} bytes {verb}; "
            f"{len(self.abandoned)} expired attempt(s) "
            f"{'abandoned' if self.applied else 'to abandon'}; kept {self.kept_live} file(s) of "
            f"live attempts and {self.kept_young_orphans} orphan(s) younger than the grace period"
            + ("" if self.applied else " (dry run: --apply to remove)")
        )


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class GarbageCollector:
    """`trace gc` and `trace staging-cleanup` over one bucket and its version store."""

    def __init__(
        self,
        store: ObjectStore,
        versions: VersionStore,
        guard: Callable[[sa.Connection], None] | None = None,
    ) -> None:
        """`guard(conn)` runs first in each transaction that removes versions and may refuse
        it (a GC run's leader lease: a run that lost it removes nothing more)."""
        self.store = store
        self.versions = versions
        self.guard = guard

    # -- superseded versions ---------------------------------------------------------------

    def datasets(self, datasets: Sequence[str] | None = None) -> list[str]:
        """The datasets `collect` and `cleanup_staging` go through (all known, or these)."""
        return list(datasets) if datasets is not None else self.versions.retention.known_datasets()

    def collect(
        self,
        policy: GcPolicy,
        *,
        apply: bool = False,
        datasets: Sequence[str] | None = None,
        progress: Callable[[str], None] | None = None,
        only: Collection[tuple[str, str, int]] | None = None,
    ) -> GcReport:
        """`progress(dataset)` is called after each dataset (the CLI's progress bar). `only`
        ((dataset, partition, version) triples, e.g. a dry run's `GcReport.planned`) limits
        the removal to those versions: what was reviewed is an upper bound of what goes."""
        names = self.datasets(datasets)
        removed: list[RemovedVersion] = []
        for name in names:
            removed += self.versions.retention.remove_versions(
                name,
                keep_last=policy.keep_last,
                older_than_s=policy.older_than.total_seconds(),
                apply=apply,
                only=None if only is None else [(p, v) for d, p, v in only if d == name],
                guard=self.guard,
            )
            if progress is not None:
                progress(name)
        if not apply:
            pending = [key for key, _ in self.versions.retention.queued_files(names)]
            files = [f.key for v in removed for f in v.files]
            return GcReport(False, removed, files, pending)
        crash_point("gc.after_versions_deleted")
        deleted = self._drain_queue(names)
        return GcReport(True, removed, deleted, pins_dropped=self.versions.pins.drop_expired())

    def _drain_queue(self, datasets: Sequence[str]) -> list[str]:
        """Delete queued files (this run's and any an interrupted run left), then unqueue."""
        deleted: list[str] = []
        while batch := self.versions.retention.queued_files(datasets, limit=1_000):
            keys = [key for key, _ in batch]
            for key in keys:
                self.store.delete([key])
                crash_point("gc.during_file_delete")
            self.versions.retention.dequeue_files(keys)
            deleted += keys
        return deleted

    # -- staging leftovers -----------------------------------------------------------------

    def cleanup_staging(
        self,
        *,
        grace: timedelta = timedelta(hours=1),
        apply: bool = False,
        datasets: Sequence[str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> CleanupReport:
        """`progress(dataset)` is called after each dataset (the CLI's progress bar)."""
        names = self.datasets(datasets)
        report = CleanupReport(applied=apply)
        report.abandoned = self.versions.attempts.expire_leases(apply=apply, datasets=names)
        if apply:
            crash_point("cleanup.after_abandon")
        expiring = {a.attempt_id for a in report.abandoned}
        for name in names:
            # list first, read attempt states after: an attempt that began after the
            # snapshot's listing is not listed, one that began before has its row visible
            objects = self.store.list_objects(dataset_prefix(name))
            doomed = self._classify(name, objects, report, expiring, grace)
            if apply and doomed:
                self.store.delete([item.key for item in doomed])
            report.removed += doomed
            if progress is not None:
                progress(name)
        return report

    def _classify(
        self,
        dataset: str,
        objects: list[ObjectInfo],
        report: CleanupReport,
        expiring: set[str],
        grace: timedelta,
    ) -> list[CleanupItem]:
        parsed = {o.key: parse_data_key(o.key) for o in objects}
        ids = {p[2] for p in parsed.values() if p is not None and _is_uuid(p[2])}
        snapshot = self.versions.retention.storage_snapshot(dataset, ids)
        cutoff = datetime.now(UTC) - grace
        doomed: list[CleanupItem] = []
        for obj in objects:
            key_parts = parsed[obj.key]
            if key_parts is None:
                report.unrecognised.append(obj.key)
                continue
            if obj.key in snapshot.referenced:
                continue
            attempt = snapshot.attempts.get(key_parts[2])
            if attempt is None:
                if obj.modified is not None and _utc(obj.modified) < cutoff:
                    doomed.append(CleanupItem(obj.key, obj.size, "orphan: no attempt row knows it"))
                else:
                    report.kept_young_orphans += 1
            elif attempt.state == "staging":
                if not attempt.lease_live and attempt.attempt_id in expiring:
                    doomed.append(CleanupItem(obj.key, obj.size, "attempt's lease expired"))
                else:  # live, or expired after this run marked the expired ones
                    report.kept_live += 1
            elif attempt.state == "committed":
                doomed.append(
                    CleanupItem(
                        obj.key,
                        obj.size,
                        "committed attempt's file that no kept version references "
                        "(a deduplicated retry, or an interrupted GC)",
                    )
                )
            elif attempt.state == "unchanged":
                doomed.append(
                    CleanupItem(
                        obj.key,
                        obj.size,
                        "attempt unchanged: identical to the version it kept, never referenced",
                    )
                )
            else:
                doomed.append(
                    CleanupItem(obj.key, obj.size, f"attempt {attempt.state}: never committed")
                )
        return doomed


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
