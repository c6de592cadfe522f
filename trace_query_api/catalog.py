"""What the datasets a token may read hold, and which committed files a query sees.

Who may read a dataset is decided once, for every path and id, by
`trace_resources.storage.access.readable_datasets` (public datasets, the organisation's own
`org_<org>__<name>` ones, narrowed by the token to its datasets and a task token's partitions).
A dataset a token may not read is reported exactly like one that does not exist.

Files come only from committed manifests: the current version of each partition, or the
versions a request pins (directly or through a snapshot id returned by an earlier query).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from trace_query_api.current import CurrentFilesCache, Stamp
from trace_query_api.errors import (
    BadRequestError,
    GoneError,
    NotFoundError,
    UnknownDatasetError,
)
from trace_query_api.files import FileCache
from trace_resources.chain.schemas import RAW_SCHEMAS
from trace_resources.chains import chain_of, split_dataset_name
from trace_resources.registry import arrow_schema as declared_schema
from trace_resources.registry import declarations
from trace_resources.storage import access, snapshots
from trace_resources.storage.read_model import CommittedFiles, ReadModel
from trace_resources.storage.records import FileEntry
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Principal

__all__ = [
    "Catalog",
    "Resolution",
    "Pins",
    "DatasetInfo",
    "PartitionInfo",
]

Pins = dict[str, dict[str, int]]  # dataset -> partition key -> version
_SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class PartitionInfo:
    key: str
    version: int
    rows: int
    bytes: int
    committed_at: datetime


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str | None
    visibility: str  # "public" | "org"
    owner: str | None
    partitions: list[PartitionInfo]

    @property
    def chain(self) -> str | None:
        return chain_of(self.name)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)

    @property
    def last_commit_at(self) -> datetime | None:
        return max((p.committed_at for p in self.partitions), default=None)


@dataclass
class Resolution:
    """The exact files a query reads, and the versions they belong to."""

    versions: Pins = field(default_factory=dict)
    files: dict[str, list[FileEntry]] = field(default_factory=dict)
    schemas: dict[str, pa.Schema] = field(default_factory=dict)

    def snapshot_id(self, org: str) -> str:
        canonical = json.dumps([org, self.versions], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class Catalog:
    """Discovery and version resolution for a token: the access rule (`storage.access`), the
    read model and the query snapshots (`storage.snapshots`)."""

    def __init__(
        self, engine: sa.Engine, files: FileCache, current: CurrentFilesCache | None = None
    ) -> None:
        self.engine = engine
        self.files = files
        self.current = current  # current versions' files between commits (None: no cache)
        self.read = ReadModel(engine)
        self._stored_snapshots: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    # -- access and discovery ----------------------------------------------------------------

    def readable(
        self,
        principal: Principal,
        among: Iterable[str] | None = None,
        conn: sa.Connection | None = None,
    ) -> dict[str, access.ReadableDataset]:
        """The datasets this token may read (of `among`, if given), on the request's
        connection when it has one."""
        return access.readable_datasets(conn or self.engine, principal.org, principal, among=among)

    def require_readable(
        self, principal: Principal, names: Iterable[str], conn: sa.Connection | None = None
    ) -> None:
        names = sorted(set(names))
        readable = self.readable(principal, names, conn)
        for name in names:
            if name not in readable:
                raise UnknownDatasetError(name)

    def list_datasets(self, principal: Principal) -> list[DatasetInfo]:
        with self.engine.connect() as conn:
            readable = access.readable_datasets(conn, principal.org, principal)
            partitions = self._partitions(conn, readable)
        return [_info(r, partitions.get(name, [])) for name, r in readable.items()]

    def dataset(self, principal: Principal, name: str) -> DatasetInfo:
        with self.engine.connect() as conn:
            readable = access.readable_datasets(conn, principal.org, principal, among=[name])
            if name not in readable:
                raise UnknownDatasetError(name)
            partitions = self._partitions(conn, readable).get(name, [])
        return _info(readable[name], partitions)

    def columns(self, name: str) -> list[dict[str, Any]]:
        """Columns with type, nullability and documentation (from the schema registry, and
        the docs from the raw schemas or the newest committed file's footer)."""
        schema = self.arrow_schema(name)
        latest = self.read.registered_schema(name)
        docs = {
            f.name: (f.metadata or {}).get(b"doc", b"").decode() or None
            for f in (schema or pa.schema([]))
        }
        if latest is not None:
            registered = latest[1]
        else:
            registered = [
                {"name": f.name, "type": str(f.type), "nullable": f.nullable}
                for f in (schema or pa.schema([]))
            ]
        return [{**column, "doc": docs.get(column["name"])} for column in registered]

    def arrow_schema(self, name: str) -> pa.Schema | None:
        """The dataset's Arrow schema: raw schemas, the registry's declaration (with its column
        docs), else the newest committed file's footer."""
        base = _chain_dataset(name)
        if base in RAW_SCHEMAS:
            return RAW_SCHEMAS[base]
        declared = declarations().get(base)
        if declared is not None:
            return declared_schema(declared)
        files = self.read.newest_files(name)
        if not files:
            return None
        return self.files.schema(files[0])

    def _partitions(
        self, conn: sa.Connection, readable: Mapping[str, access.ReadableDataset]
    ) -> dict[str, list[PartitionInfo]]:
        found: dict[str, list[PartitionInfo]] = {}
        for r in self.read.partition_summaries(sorted(readable), conn):
            allowed = readable[r.dataset].partitions
            if allowed is not None and r.partition_key not in allowed:
                continue
            found.setdefault(r.dataset, []).append(
                PartitionInfo(r.partition_key, r.version, r.rows, r.bytes, r.committed_at)
            )
        return found

    # -- resolution --------------------------------------------------------------------------

    def resolve(self, principal: Principal, names: Iterable[str], pins: Pins) -> Resolution:
        """Committed files of `names` as this token may see them: pinned versions where the
        request pins a dataset (exactly those partitions), current versions elsewhere.

        Readability is decided on every call; the current versions' files come from the
        cache when it holds them (`current.py`: it sees every commit acknowledged before this
        call), else from the database in the same checkout as the access rule."""
        names = sorted(set(names))
        resolution = Resolution()
        pinned = {n: pins[n] for n in names if n in pins}
        selection = self._selection(principal, [n for n in names if n not in pins])
        for name, by_partition in pinned.items():
            allowed = principal.partitions_for(name)
            outside = sorted(set(by_partition) - allowed) if allowed is not None else []
            if outside:
                self.require_readable(principal, names)
                raise NotFoundError(
                    f"{name} has no committed partition {outside[0]!r} available to this token",
                    code="unknown_version",
                )
        cached = self.current.lookup(selection) if self.current is not None and selection else None
        if cached is not None and not pinned and len(cached[0]) == len(selection):
            # everything from the cache: no checkout unless the access rule needs SQL
            self.require_readable(principal, names)
            for found in cached[0].values():
                _add(resolution, found)
        else:
            with self.engine.connect() as conn:
                self.require_readable(principal, names, conn)
                if selection:
                    self._add_current(conn, selection, cached, resolution)
                if pinned:
                    self._add_pinned(conn, pinned, resolution)
        for name in names:
            resolution.versions.setdefault(name, {})
            resolution.files.setdefault(name, [])
            resolution.schemas[name] = _narrowed(
                principal, name, self._query_schema(name, resolution.files[name])
            )
        return resolution

    def pin(
        self,
        versions: VersionStore,
        reader_id: str,
        principal: Principal,
        name: str,
        requested: Mapping[str, int] | None,
        resolution: Resolution,
        ttl_s: float,
    ) -> None:
        """Pin the versions of `name` against GC until `unpin(reader_id)` or `ttl_s`.

        Current versions are resolved again and pinned in one step (atomic with respect to
        GC), and that answer replaces the earlier one; requested versions are pinned as they
        are. A version GC already removed is gone (410).
        """
        try:
            if requested is None:
                allowed = principal.partitions_for(name)
                records = versions.pins.pin_current(
                    reader_id, name, None if allowed is None else sorted(allowed), ttl_s
                )
                ordered = sorted(records.items())
                resolution.versions[name] = {key: r.version for key, r in ordered}
                resolution.files[name] = [f for _, r in ordered for f in r.manifest.files]
                resolution.schemas[name] = _narrowed(
                    principal, name, self._query_schema(name, resolution.files[name])
                )
            else:
                for key, version in sorted(requested.items()):
                    versions.pins.pin_version(reader_id, name, key, version, ttl_s)
        except FileNotFoundError:
            raise GoneError(
                f"a version of {name} this request reads was garbage-collected; query the "
                "current versions instead"
            ) from None

    @staticmethod
    def _selection(principal: Principal, names: list[str]) -> dict[str, list[str] | None]:
        """{dataset: the partitions this token may read (sorted), or None for all}."""
        selection: dict[str, list[str] | None] = {}
        for name in names:
            allowed = principal.partitions_for(name)
            selection[name] = None if allowed is None else sorted(allowed)
        return selection

    def _add_current(
        self,
        conn: sa.Connection,
        selection: dict[str, list[str] | None],
        cached: tuple[dict[str, list[CommittedFiles]], Stamp] | None,
        out: Resolution,
    ) -> None:
        found = cached[0] if cached is not None else {}
        for committed in found.values():
            _add(out, committed)
        missing = {name: keys for name, keys in selection.items() if name not in found}
        if not missing:
            return
        committed = self.read.current_files(missing, conn)
        if cached is not None and self.current is not None:
            self.current.store(cached[1], missing, committed)
        _add(out, committed)

    def _add_pinned(self, conn: sa.Connection, pinned: Pins, out: Resolution) -> None:
        wanted = [(n, k, v) for n, by_key in pinned.items() for k, v in by_key.items()]
        _add(out, self.read.pinned_files(wanted, conn))
        for name, key, version in wanted:
            if out.versions.get(name, {}).get(key) != version:
                raise NotFoundError(
                    f"{name} has no committed version {version} of partition {key!r} (it may "
                    "have been garbage-collected); query the current versions instead",
                    code="unknown_version",
                )

    def _query_schema(self, name: str, files: list[FileEntry]) -> pa.Schema:
        base = _chain_dataset(name)
        if base in RAW_SCHEMAS:
            return RAW_SCHEMAS[base]
        if files:
            return pa.unify_schemas([self.files.schema(f) for f in files])
        schema = self.arrow_schema(name)
        if schema is None:  # published but never committed
            return pa.schema([])
        return schema

    # -- snapshots ---------------------------------------------------------------------------

    def record_snapshot(self, principal: Principal, resolution: Resolution) -> str:
        """Store the versions a query read under a content-addressed id, once."""
        snapshot = resolution.snapshot_id(principal.org)
        with self._lock:
            if snapshot in self._stored_snapshots:
                self._stored_snapshots.move_to_end(snapshot)
                return snapshot
        snapshots.record_snapshot(self.engine, snapshot, principal.org, resolution.versions)
        with self._lock:
            self._stored_snapshots[snapshot] = None
            while len(self._stored_snapshots) > 10_000:
                self._stored_snapshots.popitem(last=False)
        return snapshot

    def snapshot(self, principal: Principal, snapshot_id: str) -> Pins:
        """The versions of a snapshot of the token's organisation (others: not found)."""
        return self.snapshot_record(principal, snapshot_id)[0]

    def snapshot_record(self, principal: Principal, snapshot_id: str) -> tuple[Pins, datetime]:
        found = None
        if _SNAPSHOT_ID.match(snapshot_id):
            found = snapshots.org_snapshot(self.engine, principal.org, snapshot_id)
        if found is None:
            raise NotFoundError(
                f"no snapshot {snapshot_id[:40]!r} for this organisation; a snapshot id comes "
                "from the `snapshot` field of a query result",
                code="unknown_snapshot",
            )
        return found.versions, found.created_at


def _chain_dataset(name: str) -> str:
    """The dataset a chain's dataset name stands for (`devnet2.blocks` -> `blocks`)."""
    return split_dataset_name(name)[1] if chain_of(name) is not None else name


def _info(readable: access.ReadableDataset, partitions: list[PartitionInfo]) -> DatasetInfo:
    visibility = "public" if readable.public else "org"
    return DatasetInfo(readable.name, readable.description, visibility, readable.owner, partitions)


def _narrowed(principal: Principal, name: str, schema: pa.Schema) -> pa.Schema:
    """The columns of `name` this token may read (a task token may list them): the sandbox
    exposes a dataset with exactly its schema's columns."""
    allowed = principal.columns_for(name)
    if allowed is None:
        return schema
    return pa.schema([f for f in schema if f.name in allowed])


def _add(out: Resolution, committed: list[CommittedFiles]) -> None:
    for dataset, key, version, files in committed:
        out.versions.setdefault(dataset, {})[key] = version
        out.files.setdefault(dataset, []).extend(files)


def pins_covering(pins: Pins, names: Iterable[str], snapshot_id: str) -> Pins:
    """Pins of a snapshot for the datasets a query reads; each must be in the snapshot."""
    missing = sorted(set(names) - set(pins))
    if missing:
        raise BadRequestError(
            f"snapshot {snapshot_id} does not cover dataset {missing[0]!r}: it holds "
            f"{', '.join(sorted(pins)) or 'no dataset'}; run without the snapshot or pin "
            "versions explicitly",
            code="snapshot_mismatch",
        )
    return {name: pins[name] for name in names}
