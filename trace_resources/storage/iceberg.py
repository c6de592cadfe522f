"""Open tables: every committed version of a sealed range is also an Apache Iceberg snapshot of the
dataset's table in a SQL catalog (pyiceberg's `SqlCatalog`) on the state PostgreSQL, so Spark,
Trino, DuckDB, polars and pyiceberg read Trace's datasets as tables, with Trace's versions as
Iceberg time travel.

The publisher is driven by the outbox: it reads the committed-version events (only commits
write them: an uncommitted, fenced or unchanged attempt never does) that it has not published
yet, oldest first, and turns each into ONE snapshot that makes the partition's files in the
table exactly the version's files (the version's Parquet files are added as they are, never
rewritten): a version that only adds files (a first commit, an append) is an Iceberg append; one
that drops files (a replace of a range, a compaction) is an overwrite that deletes the range's
old data files and adds the new ones. Each snapshot carries `trace.outbox-id`, and what was
published is recorded in `trace_iceberg_published`; a publisher killed between the Iceberg
commit and its record finds its snapshot by that property on the next pass and only records
it, so no version is published twice. The versions of an open range (the head tier's appends,
a block at a time) are recorded as `open` and not published: the range's rows reach the table
with its sealed version, one snapshot per range rather than one per block and dataset. The
snapshots of up to `BATCH` versions of a dataset go in one Iceberg commit (one catalog update),
all or none. One publisher acts at a time: it holds the `iceberg-publisher` leader lease
(`trace_resources/leases.py`; snapshot expiry takes it too), and records what it published only
if its token still holds, in the same transaction. A publisher paused past its lease is taken
over; its late Iceberg commit is refused by the catalog's own compare-and-swap of the table's
metadata pointer if the new publisher committed to that table meanwhile (else it published
nothing the new one did), and its late record is refused by the lease.

Types: Iceberg has no unsigned integers. uint8/uint16 columns are `int`, uint32 columns `long`
(lossless widening on read); uint64 columns are `long` with a range check: a file whose uint64
column holds a value above 2**63-1 is refused with an error (EVM block numbers, gas, nonces and
timestamps are far below). 256-bit values are stored by Trace as decimal strings or binary
already and map as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.errors import CommitError
from trace_resources.leases import LeaderLease
from trace_resources.storage import state as t
from trace_resources.storage.crash import crash_point
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import parse_data_key
from trace_resources.storage.records import COMMITTED_EVENT, OutboxEvent, VersionRecord
from trace_resources.storage.version_store import VersionStore

__all__ = [
    "NAMESPACE",
    "IcebergPublisher",
    "PublishOutcome",
    "TableInfo",
    "UnsignedRangeError",
    "iceberg_arrow_schema",
    "open_catalog",
    "published",
    "table_identifier",
]

NAMESPACE = "trace"
OUTBOX_ID = "trace.outbox-id"
LONG_MAX = 2**63 - 1
LEASE_NAME = "iceberg-publisher"
BATCH = 100  # snapshots per Iceberg commit
MERGE_MANIFESTS_AT = 16

published = sa.Table(
    "trace_iceberg_published",
    t.metadata,
    sa.Column("outbox_id", sa.BigInteger, primary_key=True),
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("partition_key", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("snapshot_id", sa.BigInteger, nullable=True),
    sa.Column("operation", sa.Text, nullable=False),
    sa.Column(
        "published_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Index("trace_iceberg_published_dataset", "dataset", "outbox_id"),
)


def _column_max(parquet: pq.ParquetFile, name: str) -> int | None:
    metadata = parquet.metadata
    # the leaf column (a top-level uint64 column is one leaf, named by its path)
    index = next(i for i in range(metadata.num_columns) if metadata.schema.column(i).path == name)
    top: int | None = None
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(index).statistics
        if stats is None or not stats.has_min_max:
            values = parquet.read(columns=[name]).column(name)
            found = pc.max(values).as_py()
        else:
            found = stats.max
        if found is not None and (top is None or int(found) > top):
            top = int(found)
    return top


class UnsignedRangeError(CommitError):
    """A uint64 value does not fit Iceberg's `long`."""


def table_identifier(dataset: str) -> tuple[str, str]:
    """The Iceberg table of a dataset: namespace `trace`, its name with `.` as `__`."""
    return NAMESPACE, dataset.replace(".", "__")


def open_catalog(
    dsn: str,
    warehouse: str,
    *,
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> Any:
    """The SQL catalog on the state database; its tables' metadata under `warehouse`."""
    from pyiceberg.catalog.sql import SqlCatalog

    properties = {"uri": dsn, "warehouse": warehouse, "s3.region": region}
    if endpoint_url:
        properties["s3.endpoint"] = endpoint_url
    if access_key and secret_key:
        properties["s3.access-key-id"] = access_key
        properties["s3.secret-access-key"] = secret_key
    return SqlCatalog("trace", **properties)


def _iceberg_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_unsigned_integer(kind):
        return pa.int32() if kind.bit_width <= 16 else pa.int64()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(_iceberg_type(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_iceberg_type(f.type)) for f in kind])
    return kind


def iceberg_arrow_schema(schema: pa.Schema) -> pa.Schema:
    """The table schema of Trace's Parquet schema: unsigned integers as signed (see above)."""
    return pa.schema([f.with_type(_iceberg_type(f.type)) for f in schema])


@dataclass(frozen=True)
class Published:
    outbox_id: int
    dataset: str
    partition_key: str
    version: int
    snapshot_id: int | None
    operation: str  # append | overwrite | recovered | skipped | open (left for the sealed version)


@dataclass
class PublishOutcome:
    published: list[Published] = field(default_factory=list)
    busy: bool = False  # another publisher holds the lease
    standby: str = ""  # who holds it

    def summary(self) -> str:
        if self.busy:
            return f"another publisher leads; nothing published ({self.standby})"
        counts: dict[str, int] = {}
        for p in self.published:
            counts[p.operation] = counts.get(p.operation, 0) + 1
        detail = ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "nothing new"
        return f"published {len(self.published)} committed version(s) to Iceberg: {detail}"


@dataclass(frozen=True)
class TableInfo:
    dataset: str
    identifier: str
    metadata_location: str | None
    last_partition: str | None
    last_version: int | None
    snapshot_id: int | None
    published: int


class IcebergPublisher:
    """Publishes committed versions (outbox events) as snapshots of the datasets' tables."""

    def __init__(
        self,
        versions: VersionStore,
        store: ObjectStore,
        catalog: Any,
        *,
        lease: LeaderLease | None = None,
        lease_s: float = 90.0,
    ) -> None:
        """`lease`: the leader lease, kept by the caller across passes (a sensor's ticks);
        without one, each pass takes the lease (`lease_s` long, renewed meanwhile) and gives
        it up at its end."""
        self.versions = versions
        self.store = store
        self.catalog = catalog
        self.lease = lease
        self.lease_s = lease_s
        self._leading: LeaderLease | None = None

    # -- what is left to publish ----------------------------------------------------------

    def pending(self, limit: int = 500) -> list[OutboxEvent]:
        """Committed-version events not published yet, oldest first (an anti-join, not a
        cursor: outbox ids become visible out of order)."""
        o = t.outbox
        query = (
            sa.select(o)
            .where(o.c.event_type == COMMITTED_EVENT)
            .where(~sa.exists().where(published.c.outbox_id == o.c.id))
            .order_by(o.c.id)
            .limit(limit)
        )
        with self.versions.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            OutboxEvent(
                r.id, r.event_type, r.dataset, r.partition_key, r.version, r.payload, r.created_at
            )
            for r in rows
        ]

    # -- publishing -----------------------------------------------------------------------

    @contextmanager
    def _led(self) -> Iterator[str | None]:
        """Lead for one pass: yields None while this publisher holds the lease, else why not."""
        if self.lease is not None:
            standby = self.lease.lead()
            self._leading = self.lease if standby is None else None
            try:
                yield standby
            finally:
                self._leading = None
            return
        lease = LeaderLease(self.versions.engine, LEASE_NAME, lease_s=self.lease_s)
        if lease.try_acquire() is None:
            current = lease.current()
            lease.release()  # closes the session it opened to try
            yield f"held by {current.holder if current else 'another publisher'}"
            return
        self._leading = lease
        try:
            yield None
        finally:
            self._leading = None
            lease.release()

    def publish(
        self, limit: int = 500, *, record: bool = True, batch: int = BATCH
    ) -> PublishOutcome:
        """One pass: publish the pending events in commit order, each as one snapshot. The
        snapshots of up to `batch` events of a dataset are committed in ONE Iceberg commit
        (one catalog update, one metadata file), then recorded. `record=False` publishes
        without recording (what a publisher killed before its record leaves; tests)."""
        outcome = PublishOutcome()
        with self._led() as standby:
            if standby is not None:
                outcome.busy, outcome.standby = True, standby
                return outcome
            events = self.pending(limit)
            if events:
                self.catalog.create_namespace_if_not_exists(NAMESPACE)
            by_dataset: dict[str, list[OutboxEvent]] = {}
            for event in events:
                by_dataset.setdefault(event.dataset, []).append(event)
            for dataset, of_dataset in by_dataset.items():
                for start in range(0, len(of_dataset), batch):
                    done = self._publish_batch(dataset, of_dataset[start : start + batch])
                    if record:
                        self._record(done)
                    outcome.published += done
        return outcome

    def _landed(self, table: Any) -> dict[int, int]:
        """{outbox id: snapshot id} of the snapshots in the table."""
        found = {}
        for snapshot in table.snapshots() if table is not None else ():
            value = snapshot.summary[OUTBOX_ID] if snapshot.summary is not None else None
            if value is not None:
                found[int(value)] = snapshot.snapshot_id
        return found

    def _load(self, dataset: str) -> Any:
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table(table_identifier(dataset))
        except NoSuchTableError:
            return None

    def _publish_batch(self, dataset: str, events: Sequence[OutboxEvent]) -> list[Published]:
        def done(event: OutboxEvent, snapshot_id: int | None, operation: str) -> Published:
            return Published(
                event.id, dataset, event.partition_key, event.version, snapshot_id, operation
            )

        results: dict[int, Published] = {}
        sealed: list[tuple[OutboxEvent, VersionRecord]] = []
        for event in events:
            try:
                version = self.versions.read.version(dataset, event.partition_key, event.version)
            except LookupError:  # GC removed the version before it was published
                results[event.id] = done(event, None, "skipped")
                continue
            if version.manifest.is_open:
                # an open range's append (the head tier, a block at a time): its rows reach
                # the table with the range's sealed version, one snapshot per range, not per
                # block (23 versions a second at Monad's pace would outrun any catalog)
                results[event.id] = done(event, None, "open")
                continue
            sealed.append((event, version))
        if not sealed:
            return [results[e.id] for e in events]
        table = self._load(dataset)
        landed = self._landed(table)
        plans: list[tuple[OutboxEvent, list[str], pa.Schema]] = []
        for event, version in sealed:
            if event.id in landed:  # published by a pass killed before it recorded it
                results[event.id] = done(event, landed[event.id], "recovered")
                continue
            keys = [f.key for f in version.manifest.files]
            if not keys:
                results[event.id] = done(event, None, "skipped")
                continue
            plans.append((event, keys, self._inspect(keys)))
        if plans:
            if table is None:
                table = self._create(dataset, plans[0][2])
            files = self._files_by_partition(table)
            operations: dict[int, str] = {}
            with table.transaction() as tx:
                for event, keys, schema in plans:
                    operations[event.id] = self._stage(tx, files, event, keys, schema)
            crash_point("iceberg.after_publish")
            landed = self._landed(table)
            for event, _, _ in plans:
                results[event.id] = done(event, landed[event.id], operations[event.id])
        return [results[e.id] for e in events]

    def _files_by_partition(self, table: Any) -> dict[str, dict[str, Any]]:
        """The current snapshot's data files by Trace partition (their keys name it)."""
        found: dict[str, dict[str, Any]] = {}
        snapshot = table.current_snapshot()
        if snapshot is None:
            return found
        prefix = self.store.uri_prefix + "/"
        for manifest in snapshot.manifests(table.io):
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                path = entry.data_file.file_path
                parsed = parse_data_key(path[len(prefix) :]) if path.startswith(prefix) else None
                if parsed is not None:
                    found.setdefault(parsed[1], {})[path] = entry.data_file
        return found

    def _stage(
        self,
        tx: Any,
        files: dict[str, dict[str, Any]],
        event: OutboxEvent,
        keys: Sequence[str],
        schema: pa.Schema,
    ) -> str:
        """One event's snapshot in the batch's transaction: the range's files in the table
        become exactly the version's files. `files` follows the transaction."""
        from pyiceberg.table import TableProperties, _parquet_files_to_data_files

        if {f.name for f in schema} - set(tx.table_metadata.schema().column_names):
            with tx.update_schema() as update:  # a column the dataset gained
                update.union_by_name(iceberg_arrow_schema(schema))
            mapping = tx.table_metadata.schema().name_mapping.model_dump_json()
            tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING: mapping})
        of_range = files.setdefault(event.partition_key, {})
        target = [self.store.uri(k) for k in keys]
        removed = [f for path, f in of_range.items() if path not in set(target)]
        added = [path for path in target if path not in of_range]
        data_files = list(_parquet_files_to_data_files(tx.table_metadata, added, tx._table.io))
        properties = {
            OUTBOX_ID: str(event.id),
            "trace.dataset": event.dataset,
            "trace.partition": event.partition_key,
            "trace.version": str(event.version),
            "trace.mode": str(event.payload.get("mode") or ""),
        }
        snapshot = tx.update_snapshot(snapshot_properties=properties)
        if removed:
            with snapshot.overwrite() as overwrite:
                for data_file in removed:
                    overwrite.delete_data_file(data_file)
                for data_file in data_files:
                    overwrite.append_data_file(data_file)
            operation = "overwrite"
        else:
            with snapshot.merge_append() as append:
                for data_file in data_files:
                    append.append_data_file(data_file)
            operation = "append"
        for data_file in removed:
            del of_range[data_file.file_path]
        of_range.update({f.file_path: f for f in data_files})
        return operation

    def _inspect(self, keys: Sequence[str]) -> pa.Schema:
        """The version's Parquet schema (its first file's), after checking that every uint64
        value of its files fits a long (from the column statistics in their footers)."""
        schema: pa.Schema | None = None
        for key in keys:
            with self.store.fs.open_input_file(self.store.path(key)) as f:
                parquet = pq.ParquetFile(f)
                if schema is None:
                    schema = parquet.schema_arrow
                for name in [n.name for n in schema if pa.types.is_uint64(n.type)]:
                    top = _column_max(parquet, name)
                    if top is not None and top > LONG_MAX:
                        raise UnsignedRangeError(
                            f"{key}: uint64 column {name!r} holds {top}, above 2**63-1, which "
                            "Iceberg's long (the column's open-table type) can not hold; "
                            "nothing was published. Store the column as a decimal string to "
                            "publish it"
                        )
        assert schema is not None
        return schema

    def _create(self, dataset: str, schema: pa.Schema) -> Any:
        from pyiceberg.table import TableProperties

        merging = {
            # appends merge small manifests, so a scan or an overwrite reads a few manifests
            # rather than one per version published
            TableProperties.MANIFEST_MERGE_ENABLED: "true",
            TableProperties.MANIFEST_MIN_MERGE_COUNT: str(MERGE_MANIFESTS_AT),
        }
        table = self.catalog.create_table_if_not_exists(
            table_identifier(dataset),
            schema=iceberg_arrow_schema(schema),
            properties=merging,
        )
        mapping = table.schema().name_mapping.model_dump_json()
        with table.transaction() as tx:  # Trace's files carry no Iceberg field ids
            tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING: mapping})
        return table

    def _record(self, done: Sequence[Published]) -> None:
        if not done:
            return
        with self.versions.engine.begin() as conn:
            if self._leading is not None:  # a late publisher records nothing
                self._leading.check(conn)
            conn.execute(
                pg_insert(published)
                .values(
                    [
                        {
                            "outbox_id": d.outbox_id,
                            "dataset": d.dataset,
                            "partition_key": d.partition_key,
                            "version": d.version,
                            "snapshot_id": d.snapshot_id,
                            "operation": d.operation,
                        }
                        for d in done
                    ]
                )
                .on_conflict_do_nothing()
            )

    # -- expiring what Trace no longer serves ---------------------------------------------

    def expire_unservable(self) -> dict[str, list[int]]:
        """Expire the snapshots that show a version GC has removed, per dataset.

        A snapshot holds, for each range, the version published last before it; once GC
        removed one of those versions (its row first, then the files only it had), the
        snapshot would show data Trace no longer serves, or fail to read, so it goes. The
        current snapshot is never expired (it holds current versions, which GC keeps). What
        is published stays recorded, so nothing is published again."""
        with self._led() as standby:
            return self._expire_unservable() if standby is None else {}

    def _expire_unservable(self) -> dict[str, list[int]]:
        p, v = published.c, t.versions.c
        with self.versions.engine.connect() as conn:
            rows = conn.execute(
                sa.select(p.dataset, p.partition_key, p.version, p.snapshot_id)
                .where(p.snapshot_id.is_not(None))
                .order_by(p.dataset, p.outbox_id)
            ).all()
            datasets = sorted({r.dataset for r in rows})
            live = {
                (r.dataset, r.partition_key, r.version)
                for r in conn.execute(
                    sa.select(v.dataset, v.partition_key, v.version).where(v.dataset.in_(datasets))
                )
            }
        expired: dict[str, list[int]] = {}
        for dataset in datasets:
            dead: set[str] = set()  # ranges whose version, as the snapshot shows it, is gone
            doomed: list[int] = []
            for row in (r for r in rows if r.dataset == dataset):
                if (dataset, row.partition_key, row.version) in live:
                    dead.discard(row.partition_key)
                else:
                    dead.add(row.partition_key)
                if dead:
                    doomed.append(row.snapshot_id)
            if not doomed:
                continue
            table = self.catalog.load_table(table_identifier(dataset))
            current = table.current_snapshot()
            existing = {s.snapshot_id for s in table.snapshots()}
            if current is not None:
                existing.discard(current.snapshot_id)
            ids = [i for i in dict.fromkeys(doomed) if i in existing]
            if ids:
                table.maintenance.expire_snapshots().by_ids(ids).commit()
                expired[dataset] = ids
        return expired

    # -- listing --------------------------------------------------------------------------

    def snapshot_of(self, dataset: str, partition_key: str, version: int) -> int | None:
        """The snapshot that published this version (Iceberg time travel to it)."""
        p = published.c
        with self.versions.engine.connect() as conn:
            return conn.execute(
                sa.select(p.snapshot_id)
                .where(p.dataset == dataset, p.partition_key == partition_key, p.version == version)
                .order_by(p.outbox_id.desc())
                .limit(1)
            ).scalar_one_or_none()

    def tables(self) -> list[TableInfo]:
        """Each published dataset's table, its catalog location and last published version."""
        from pyiceberg.exceptions import NoSuchTableError

        p = published.c
        last = (
            sa.select(p.dataset, sa.func.max(p.outbox_id).label("last"), sa.func.count().label("n"))
            .where(p.snapshot_id.is_not(None))
            .group_by(p.dataset)
            .subquery()
        )
        query = (
            sa.select(published, last.c.n)
            .join(last, published.c.outbox_id == last.c.last)
            .order_by(published.c.dataset)
        )
        with self.versions.engine.connect() as conn:
            rows = conn.execute(query).all()
        infos = []
        for row in rows:
            identifier = table_identifier(row.dataset)
            try:
                location = self.catalog.load_table(identifier).metadata_location
            except NoSuchTableError:
                location = None
            infos.append(
                TableInfo(
                    row.dataset,
                    ".".join(identifier),
                    location,
                    row.partition_key,
                    row.version,
                    row.snapshot_id,
                    int(row.n),
                )
            )
        return infos
