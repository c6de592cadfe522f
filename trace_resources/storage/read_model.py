"""The read model: what is committed, as every reader sees it.

Current versions (the versions ⨝ pointers join is written once, here), the committed files of
a dataset, partition or pinned version, version history, per-dataset and per-partition
summaries, committed dataset names, registered columns and the newest committed manifest.
The writer, the query service, the alert evaluation, the checks, the CLI and the demo read
through it; none of them speaks SQL to the version store's tables.

Methods that discovery and resolution call together take an optional open connection, so a
request reads everything it needs in one checkout (as many round trips as before the split).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from trace_resources.storage import state as t
from trace_resources.storage.records import (
    CommittedVersion,
    DatasetSummary,
    FileEntry,
    PartitionSummary,
    SegmentInfo,
    VersionRecord,
    version_record,
    window,
)

__all__ = [
    "CommittedFiles",
    "ReadModel",
    "Window",
    "current_query",
    "expand",
    "find_version",
    "segment_files",
    "segments_in",
]

# (dataset, partition key, live_from_seq, through_seq): the live segments of an open version
Window = tuple[str, str, int, int]

# (dataset, partition key, version, files) of one committed version
CommittedFiles = tuple[str, str, int, list[FileEntry]]

_IS_CURRENT = (
    (t.pointers.c.dataset == t.versions.c.dataset)
    & (t.pointers.c.partition_key == t.versions.c.partition_key)
    & (t.pointers.c.current_version == t.versions.c.version)
)


def _select_current(*columns: Any) -> sa.Select[Any]:
    """SELECT columns of the current version of each committed partition."""
    return sa.select(*columns).join(t.pointers, _IS_CURRENT)


def current_query(dataset: str, partition_keys: Sequence[str] | None) -> sa.Select[Any]:
    """Full version rows of a dataset's current versions (all partitions if keys is None)."""
    query = _select_current(t.versions).where(t.versions.c.dataset == dataset)
    if partition_keys is not None:
        query = query.where(t.versions.c.partition_key.in_(list(partition_keys)))
    return query


def find_version(
    conn: sa.Connection, dataset: str, partition_key: str, version: int
) -> VersionRecord | None:
    """One committed version in the caller's transaction (the fenced commit and pins read it
    there), or None if it was never committed or GC removed it."""
    row = conn.execute(
        sa.select(t.versions)
        .where(t.versions.c.dataset == dataset)
        .where(t.versions.c.partition_key == partition_key)
        .where(t.versions.c.version == version)
    ).one_or_none()
    return None if row is None else expand(conn, [row])[0]


def segments_in(
    conn: sa.Connection, windows: Iterable[Window]
) -> dict[Window, list[tuple[int, list[FileEntry]]]]:
    """(seq, files) of the segments of each window, in seq order: ONE query for them all
    (a request's open partitions resolve together, not one by one)."""
    wanted = sorted({w for w in windows if w[3] > w[2]})
    found: dict[Window, list[tuple[int, list[FileEntry]]]] = {w: [] for w in wanted}
    if not wanted:
        return found
    w = sa.values(
        sa.column("d", sa.Text),
        sa.column("p", sa.Text),
        sa.column("lo", sa.BigInteger),
        sa.column("hi", sa.BigInteger),
        name="windows",
    ).data(wanted)
    s = t.segments.c
    query = (
        sa.select(w.c.d, w.c.p, w.c.lo, w.c.hi, s.seq, s.files)
        .select_from(w)
        .join(
            t.segments,
            (s.dataset == w.c.d)
            & (s.partition_key == w.c.p)
            & (s.seq > w.c.lo)
            & (s.seq <= w.c.hi),
        )
        .order_by(w.c.d, w.c.p, w.c.lo, w.c.hi, s.seq)
    )
    for r in conn.execute(query):
        found[(r.d, r.p, int(r.lo), int(r.hi))].append(
            (int(r.seq), [FileEntry(**f) for f in r.files])
        )
    for (dataset, key, lo, hi), segments in found.items():
        # seqs are contiguous (taken under the partition's fence row lock): a gap is a segment
        # removed since the version was read, never a version with fewer rows
        if len(segments) != hi - lo:
            raise FileNotFoundError(
                f"{dataset} partition {key}: the version read lists segments {lo + 1}..{hi} "
                f"but only {len(segments)} of them exist: GC removed that version (sealed "
                "and superseded) meanwhile. Resolve the current version again"
            )
    return found


def segment_files(conn: sa.Connection, windows: Iterable[Window]) -> dict[Window, list[FileEntry]]:
    """The files of the live segments of each window, in seq order (one query)."""
    return {
        w: [f for _, files in found for f in files]
        for w, found in segments_in(conn, windows).items()
    }


def expand(conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[VersionRecord]:
    """Full version rows as records, the files of open versions' live segments resolved."""
    windows = {(r.dataset, r.partition_key, *w): None for r in rows if (w := window(r.manifest))}
    files = segment_files(conn, windows)
    records = []
    for r in rows:
        w = window(r.manifest)
        live = files.get((r.dataset, r.partition_key, *w), []) if w else []
        records.append(version_record(r, live))
    return records


def _files(conn: sa.Connection, rows: Any) -> list[CommittedFiles]:
    """(dataset, partition, version, files) of rows with `files`, `live_from`, `through`."""
    rows = list(rows)
    windows: dict[tuple[str, str, int], Window] = {}
    for r in rows:
        if r.through is not None:
            lo = int(r.live_from or 0)
            windows[(r.dataset, r.partition_key, r.version)] = (
                r.dataset,
                r.partition_key,
                lo,
                int(r.through),
            )
    live = segment_files(conn, windows.values())
    out = []
    for r in rows:
        files = [FileEntry(**f) for f in r.files]
        w = windows.get((r.dataset, r.partition_key, r.version))
        if w is not None:
            files += live.get(w, [])
        out.append((r.dataset, r.partition_key, r.version, files))
    return out


def _is_open(conn: sa.Connection, dataset: str, partition_key: str) -> bool:
    """Whether the partition's current version is open: it has a live window, or it is an
    append version of the manifest format from before segments were rows."""
    row = conn.execute(
        _select_current(t.versions.c.commit_mode, t.versions.c.manifest)
        .where(t.versions.c.dataset == dataset)
        .where(t.versions.c.partition_key == partition_key)
    ).one_or_none()
    return row is not None and (window(row.manifest) is not None or row.commit_mode == "append")


def _file_columns() -> list[Any]:
    m = t.versions.c.manifest
    return [
        m["files"].label("files"),
        m["live_from_seq"].label("live_from"),
        m["through_seq"].label("through"),
    ]


class ReadModel:
    """Read-only queries over committed versions, pointers and the schema registry."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @contextmanager
    def _reading(self, conn: sa.Connection | None) -> Iterator[sa.Connection]:
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as own:
            yield own

    # -- current versions ------------------------------------------------------------------

    def current_versions(
        self, dataset: str, partition_keys: Sequence[str] | None = None
    ) -> dict[str, VersionRecord]:
        """Current version of each committed partition (all partitions if keys is None)."""
        with self.engine.connect() as conn:
            rows = conn.execute(current_query(dataset, partition_keys)).all()
            return {r.partition_key: r for r in expand(conn, rows)}

    def current_version_numbers(
        self, dataset: str, partition_keys: Sequence[str] | None = None
    ) -> dict[str, int]:
        query = sa.select(t.pointers.c.partition_key, t.pointers.c.current_version).where(
            t.pointers.c.dataset == dataset
        )
        if partition_keys is not None:
            query = query.where(t.pointers.c.partition_key.in_(list(partition_keys)))
        with self.engine.connect() as conn:
            return {r.partition_key: r.current_version for r in conn.execute(query)}

    def current_commit_modes(
        self, datasets: Sequence[str], partition_keys: Sequence[str] | None = None
    ) -> dict[tuple[str, str], str]:
        """{(dataset, partition key): commit mode of its current version} ('replace': sealed,
        'append': a head follower's open version), without manifests: the gap report."""
        if not datasets:
            return {}
        v = t.versions.c
        query = _select_current(v.dataset, v.partition_key, v.commit_mode).where(
            v.dataset.in_(list(datasets))
        )
        if partition_keys is not None:
            query = query.where(v.partition_key.in_(list(partition_keys)))
        with self.engine.connect() as conn:
            return {(r.dataset, r.partition_key): r.commit_mode for r in conn.execute(query)}

    def version(self, dataset: str, partition_key: str, version: int) -> VersionRecord:
        with self.engine.connect() as conn:
            record = find_version(conn, dataset, partition_key, version)
        if record is None:
            raise LookupError(f"{dataset} partition {partition_key} has no version {version}")
        return record

    def committed_by_key(
        self, datasets: Sequence[str], partition_keys: Sequence[str], commit_key: str
    ) -> dict[tuple[str, str], VersionRecord]:
        """The versions the logical writer `commit_key` committed, by (dataset, partition):
        what an earlier try of a step landed, so a retry resumes after it. A version GC has
        removed since is left out (the partition is then written again)."""
        if not datasets or not partition_keys:
            return {}
        k, v = t.commit_keys.c, t.versions.c
        query = (
            sa.select(t.versions)
            .join(
                t.commit_keys,
                (k.dataset == v.dataset)
                & (k.partition_key == v.partition_key)
                & (k.version == v.version),
            )
            .where(k.commit_key == commit_key)
            .where(k.dataset.in_(list(datasets)))
            .where(k.partition_key.in_(list(partition_keys)))
        )
        with self._reading(None) as conn:
            rows = conn.execute(query).all()
            records = expand(conn, rows)
        return {(r.dataset, r.partition_key): r for r in records}

    def appended_keys(self, dataset: str, partition_key: str) -> set[str]:
        """Segment keys in the current version of an append-mode partition (none if the
        partition is not open: never appended to, or sealed by a replace)."""
        with self.engine.connect() as conn:
            if not _is_open(conn, dataset, partition_key):
                return set()
            k = t.segment_keys.c
            return set(
                conn.execute(
                    sa.select(k.key)
                    .where(k.dataset == dataset)
                    .where(k.partition_key == partition_key)
                ).scalars()
            )

    # -- open partitions -------------------------------------------------------------------

    def heads(self, datasets: Sequence[str]) -> dict[str, tuple[int, datetime]]:
        """Per dataset, the newest committed block of its current versions (open or sealed:
        the manifest's `source.last.number`) and when the version holding it was committed.
        Datasets with no version recording a source are absent."""
        if not datasets:
            return {}
        v = t.versions.c
        last = v.manifest["source"]["last"]["number"].astext.cast(sa.BigInteger)
        ranked = (
            _select_current(
                v.dataset,
                last.label("last_block"),
                v.created_at,
                sa.func.row_number()
                .over(partition_by=v.dataset, order_by=last.desc())
                .label("rank"),
            )
            .where(v.dataset.in_(list(datasets)))
            .where(last.is_not(None))
            .subquery()
        )
        query = sa.select(ranked).where(ranked.c.rank == 1)
        with self.engine.connect() as conn:
            return {r.dataset: (int(r.last_block), r.created_at) for r in conn.execute(query)}

    def open_partitions(self, dataset: str) -> list[str]:
        """Partitions of the dataset whose current version is open (appends land)."""
        v = t.versions.c
        query = (
            _select_current(v.partition_key)
            .where(v.dataset == dataset)
            .where(v.manifest["through_seq"].is_not(None) | (v.commit_mode == "append"))
            .order_by(v.partition_key)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def is_open(self, dataset: str, partition_key: str) -> bool:
        """Whether the partition's current version is open (appends land; not sealed)."""
        with self.engine.connect() as conn:
            return _is_open(conn, dataset, partition_key)

    def open_segments(self, dataset: str, partition_key: str) -> list[SegmentInfo]:
        """Every append the partition holds (compacted ones too), in seq order: what a
        sealing run compares with what it seals. Kept until GC removes the partition's last
        open version; empty for a partition never appended to."""
        s = t.segments.c
        query = (
            sa.select(t.segments)
            .where(s.dataset == dataset)
            .where(s.partition_key == partition_key)
            .order_by(s.seq)
        )
        with self.engine.connect() as conn:
            return [
                SegmentInfo(
                    int(r.seq),
                    r.version,
                    r.first_block,
                    r.last_block,
                    int(r.row_count),
                    int(r.byte_count),
                    r.source,
                    [FileEntry(**f) for f in r.files],
                    r.created_at,
                )
                for r in conn.execute(query)
            ]

    # -- committed files -------------------------------------------------------------------

    def current_files(
        self,
        selection: Mapping[str, Sequence[str] | None],
        conn: sa.Connection | None = None,
    ) -> list[CommittedFiles]:
        """Files of the current versions of {dataset: partition keys, or None for all}."""
        if not selection:
            return []
        conditions = []
        for dataset, keys in selection.items():
            condition = t.versions.c.dataset == dataset
            if keys is not None:
                condition &= t.versions.c.partition_key.in_(list(keys))
            conditions.append(condition)
        query = (
            _select_current(
                t.versions.c.dataset,
                t.versions.c.partition_key,
                t.versions.c.version,
                *_file_columns(),
            )
            .where(sa.or_(*conditions))
            .order_by(t.versions.c.dataset, t.versions.c.partition_key)
        )
        with self._reading(conn) as reading:
            return _files(reading, reading.execute(query))

    def pinned_files(
        self, wanted: Sequence[tuple[str, str, int]], conn: sa.Connection | None = None
    ) -> list[CommittedFiles]:
        """Files of exact (dataset, partition key, version)s; a removed version is absent."""
        if not wanted:
            return []
        v = t.versions.c
        query = (
            sa.select(v.dataset, v.partition_key, v.version, *_file_columns())
            .where(sa.tuple_(v.dataset, v.partition_key, v.version).in_(list(wanted)))
            .order_by(v.dataset, v.partition_key)
        )
        with self._reading(conn) as reading:
            return _files(reading, reading.execute(query))

    def newest_files(self, dataset: str) -> list[FileEntry]:
        """The files of the dataset's most recently committed manifest (any partition)."""
        v = t.versions.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(v.dataset, v.partition_key, v.version, *_file_columns())
                .where(v.dataset == dataset)
                .order_by(v.created_at.desc())
                .limit(1)
            )
            found = _files(conn, rows)
        return found[0][3] if found else []

    # -- datasets and summaries ------------------------------------------------------------

    def partition_summaries(
        self, datasets: Sequence[str], conn: sa.Connection | None = None
    ) -> list[PartitionSummary]:
        """The current partitions of these datasets with rows, bytes and commit time."""
        if not datasets:
            return []
        v = t.versions.c
        query = (
            _select_current(
                v.dataset, v.partition_key, v.version, v.row_count, v.byte_count, v.created_at
            )
            .where(v.dataset.in_(list(datasets)))
            .order_by(v.dataset, v.partition_key)
        )
        with self._reading(conn) as reading:
            return [
                PartitionSummary(
                    r.dataset, r.partition_key, r.version, r.row_count, r.byte_count, r.created_at
                )
                for r in reading.execute(query)
            ]

    def dataset_summaries(self) -> list[DatasetSummary]:
        """Per dataset: current partitions, their rows and bytes, and all committed versions."""
        v = t.versions.c
        current = (
            _select_current(
                v.dataset,
                sa.func.count().label("partitions"),
                sa.func.coalesce(sa.func.sum(v.row_count), 0).label("rows"),
                sa.func.coalesce(sa.func.sum(v.byte_count), 0).label("bytes"),
            )
            .group_by(v.dataset)
            .subquery()
        )
        totals = (
            sa.select(
                v.dataset,
                sa.func.count().label("versions"),
                sa.func.max(v.created_at).label("latest"),
            )
            .group_by(v.dataset)
            .subquery()
        )
        query = (
            sa.select(current, totals.c.versions, totals.c.latest)
            .join(totals, totals.c.dataset == current.c.dataset)
            .order_by(current.c.dataset)
        )
        with self.engine.connect() as conn:
            return [
                DatasetSummary(
                    r.dataset,
                    r.partitions,
                    int(r.rows),
                    int(r.bytes),
                    r.versions,
                    r.latest.isoformat() if r.latest else None,
                )
                for r in conn.execute(query)
            ]

    # -- history ---------------------------------------------------------------------------

    def version_history(
        self, dataset: str, partition_key: str | None = None
    ) -> list[dict[str, object]]:
        """Every committed version of a dataset (optionally one partition), newest first."""
        v = t.versions.c
        query = (
            sa.select(
                v.partition_key,
                v.version,
                v.commit_mode,
                v.row_count,
                v.byte_count,
                v.created_at,
                v.attempt_id,
                (t.pointers.c.current_version == v.version).label("current"),
            )
            .join(
                t.pointers,
                (t.pointers.c.dataset == v.dataset)
                & (t.pointers.c.partition_key == v.partition_key),
            )
            .where(v.dataset == dataset)
            .order_by(v.partition_key, v.version.desc())
        )
        if partition_key is not None:
            query = query.where(v.partition_key == partition_key)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def committed_versions(self, datasets: Sequence[str]) -> list[CommittedVersion]:
        """Every committed version of these datasets, superseded ones included, oldest first."""
        v, a = t.versions, t.attempts
        query = (
            sa.select(
                v.c.dataset,
                v.c.partition_key,
                v.c.version,
                v.c.attempt_id,
                a.c.run_id,
                v.c.row_count,
                v.c.byte_count,
                v.c.manifest["source"].label("source"),
                v.c.created_at,
            )
            .join(a, a.c.attempt_id == v.c.attempt_id, isouter=True)
            .where(v.c.dataset.in_(list(datasets)))
            .order_by(v.c.created_at, v.c.dataset, v.c.partition_key, v.c.version)
        )
        with self.engine.connect() as conn:
            return [
                CommittedVersion(
                    r.dataset,
                    r.partition_key,
                    r.version,
                    str(r.attempt_id),
                    r.run_id,
                    r.row_count,
                    r.byte_count,
                    r.source,
                    r.created_at,
                )
                for r in conn.execute(query)
            ]

    # -- registered schemas ----------------------------------------------------------------

    def registered_schema(self, dataset: str) -> tuple[int, list[dict[str, Any]]] | None:
        """The newest registered schema version and its columns (name, type, nullable)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.dataset_schemas.c.schema_version, t.dataset_schemas.c.schema_json)
                .where(t.dataset_schemas.c.dataset == dataset)
                .order_by(t.dataset_schemas.c.schema_version.desc())
                .limit(1)
            ).one_or_none()
        return None if row is None else (row.schema_version, row.schema_json)

    def schema_history(self, dataset: str) -> list[tuple[int, str, dict[str, Any] | None]]:
        """Every registered schema version of a dataset: (version, hash, drift from previous)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    t.dataset_schemas.c.schema_version,
                    t.dataset_schemas.c.schema_hash,
                    t.dataset_schemas.c.drift,
                )
                .where(t.dataset_schemas.c.dataset == dataset)
                .order_by(t.dataset_schemas.c.schema_version)
            ).all()
        return [(r.schema_version, r.schema_hash, r.drift) for r in rows]
