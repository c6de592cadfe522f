"""Committed files as Arrow data for the sandbox, with caches that are safe because committed
files never change: a file's key names the attempt that wrote it, and the manifest records its
size and SHA-256.

- In memory: decoded tables of small files (LRU, bounded in bytes), so hot partitions are not
  decoded again for every query.
- On disk (S3 only): downloaded files, stored under their SHA-256 after it was checked against
  the manifest (LRU by access time, bounded in bytes, shared by the workers of one host).

The sandbox never opens a file itself: it sees Arrow tables or pyarrow datasets made here from
the manifest's file list, so DuckDB can run with every file-system operation disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trace_query_api.errors import GoneError, UnavailableError
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.records import FileEntry

__all__ = ["FileCache"]

log = logging.getLogger(__name__)

_FORMAT = pads.ParquetFileFormat()


class FileCache:
    """Turns manifest file entries into Arrow data, through the caches."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        memory_bytes: int,
        disk_dir: Path | None = None,
        disk_bytes: int = 0,
    ) -> None:
        self.store = store
        self.local = isinstance(store.fs, pafs.LocalFileSystem)
        self.memory_bytes = memory_bytes
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()
        self._table_bytes = 0
        self._schemas: dict[str, pa.Schema] = {}
        self._lock = threading.Lock()
        self.disk_dir = None if self.local or disk_bytes <= 0 or disk_dir is None else disk_dir
        self.disk_bytes = disk_bytes
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)

    # -- what the sandbox registers ------------------------------------------------------

    def arrow_source(
        self, files: Sequence[FileEntry], schema: pa.Schema
    ) -> pa.Table | pads.Dataset:
        """All rows of `files` as one Arrow object with `schema` (columns a file lacks: null).

        Small sets are decoded into memory (and cached); larger ones are scanned lazily so
        that DuckDB reads only the row groups and columns a query needs.
        """
        if not files:
            return schema.empty_table()
        # decoded Arrow is several times the compressed Parquet: keep the whole set well
        # inside the memory budget, else scan lazily
        if sum(f.size for f in files) * 8 <= self.memory_bytes:
            tables = [self._conform(self.table(f), schema) for f in files]
            return pa.concat_tables(tables)
        if self.local:
            paths = [self.store.path(f.key) for f in files]
            fs: pafs.FileSystem = self.store.fs
        elif self.disk_dir is not None and sum(f.size for f in files) <= self.disk_bytes // 2:
            paths = [str(self._on_disk(f)) for f in files]
            fs = pafs.LocalFileSystem()
        else:
            paths = [self.store.path(f.key) for f in files]
            fs = self.store.fs
        self._check_exist(files)
        return pads.dataset(paths, schema=schema, format=_FORMAT, filesystem=fs)

    def cached_source(self, files: Sequence[FileEntry], schema: pa.Schema) -> pa.Table | None:
        """All rows of `files` if every one is decoded in memory already, else None.

        Holding the tables makes the answer independent of the files from here on, so a
        query that gets them needs no pin against garbage collection.
        """
        if not files:
            return schema.empty_table()
        with self._lock:
            tables = [self._tables.get(f.sha256 or f.key) for f in files]
            if any(t is None for t in tables):
                return None
            for f in files:
                self._tables.move_to_end(f.sha256 or f.key)
        return pa.concat_tables([self._conform(t, schema) for t in tables if t is not None])

    def table(self, entry: FileEntry) -> pa.Table:
        """One committed file, decoded (from the memory cache when it is there)."""
        cache_key = entry.sha256 or entry.key
        with self._lock:
            cached = self._tables.get(cache_key)
            if cached is not None:
                self._tables.move_to_end(cache_key)
                return cached
        table = self._read(entry)
        size = table.get_total_buffer_size()
        if size * 4 <= self.memory_bytes:
            with self._lock:
                if cache_key not in self._tables:
                    self._tables[cache_key] = table
                    self._table_bytes += size
                while self._table_bytes > self.memory_bytes and self._tables:
                    _, evicted = self._tables.popitem(last=False)
                    self._table_bytes -= evicted.get_total_buffer_size()
        return table

    def schema(self, entry: FileEntry) -> pa.Schema:
        """The Arrow schema stored in a file's footer (with its column docs)."""
        cache_key = entry.sha256 or entry.key
        schema = self._schemas.get(cache_key)
        if schema is None:
            try:
                schema = pq.read_schema(self.store.path(entry.key), filesystem=self.store.fs)
            except FileNotFoundError:
                raise _gone(entry) from None
            self._schemas[cache_key] = schema
        return schema

    # -- reading -----------------------------------------------------------------------------

    def _read(self, entry: FileEntry) -> pa.Table:
        if self.local:
            try:
                return pq.read_table(self.store.path(entry.key), filesystem=self.store.fs)
            except FileNotFoundError:
                raise _gone(entry) from None
        if self.disk_dir is not None:
            return pq.read_table(str(self._on_disk(entry)))
        return pq.read_table(pa.BufferReader(self._download(entry)))

    def _download(self, entry: FileEntry) -> bytes:
        try:
            data = self.store.get_bytes(entry.key)
        except FileNotFoundError:
            raise _gone(entry) from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise UnavailableError(
                f"committed file {self.store.uri(entry.key)} does not match its manifest "
                "(size or SHA-256); the platform operators have to look at it",
                code="corrupt_file",
            )
        return data

    def _on_disk(self, entry: FileEntry) -> Path:
        """The file in the disk cache, downloaded and checked first if it is not there."""
        assert self.disk_dir is not None
        path = self.disk_dir / entry.sha256[:2] / f"{entry.sha256}.parquet"
        if path.exists():
            with contextlib.suppress(OSError):
                os.utime(path)  # LRU by access time
            return path
        data = self._download(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        partial.write_bytes(data)
        os.replace(partial, path)  # atomic: other workers see the whole file or none
        self._evict_disk()
        return path

    def _evict_disk(self) -> None:
        assert self.disk_dir is not None
        files = [p for p in self.disk_dir.glob("*/*.parquet") if p.is_file()]
        stats = []
        for p in files:
            with contextlib.suppress(OSError):
                stats.append((p.stat().st_mtime, p.stat().st_size, p))
        total = sum(s for _, s, _ in stats)
        for _, size, path in sorted(stats):
            if total <= self.disk_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size

    def _check_exist(self, files: Sequence[FileEntry]) -> None:
        if not self.local:
            return
        for entry in files:
            if not os.path.exists(self.store.path(entry.key)):
                raise _gone(entry)

    @staticmethod
    def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
        """Cast a file's table to the dataset's schema (older files may lack new columns)."""
        if table.schema.equals(schema, check_metadata=False):
            return table
        columns = [
            table.column(f.name).cast(f.type)
            if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type)
            for f in schema
        ]
        return pa.Table.from_arrays(columns, schema=schema)


def _gone(entry: FileEntry) -> GoneError:
    return GoneError(
        f"a file of this dataset version ({entry.key.split('/', 1)[0]}) is no longer stored: "
        "the version was garbage-collected; query the current versions instead"
    )
