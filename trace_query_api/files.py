"""Committed files for the sandbox workers, as open descriptors, with caches that are safe
because committed files never change: a file's key names the attempt that wrote it, and the
manifest records its size and SHA-256.

- Descriptors: an LRU of open descriptors (bounded in number, and in bytes for in-memory files),
  so a hot file is not opened again for every query and its data stays readable for as long as
  it is held, even after garbage collection deleted the file.
- On disk (S3 only): downloaded files, stored under their SHA-256 after it was checked against
  the manifest (LRU by access time, bounded in bytes, shared by the workers of one host).

A sandbox worker can open no file at all (it runs in an empty root): it reads only the
descriptors handed to it here, and decodes and caches the tables itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
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
        max_handles: int = 4096,
    ) -> None:
        self.store = store
        self.local = isinstance(store.fs, pafs.LocalFileSystem)
        self.memory_bytes = memory_bytes
        # descriptors kept: a quarter of what the process may open, at most `max_handles`
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_handles = max(16, min(max_handles, soft // 4))
        self._handles: OrderedDict[str, int] = OrderedDict()
        self._handle_bytes: dict[str, int] = {}
        self._memfd_bytes = 0
        self._schemas: dict[str, pa.Schema] = {}
        self._lock = threading.Lock()
        self.disk_dir = None if self.local or disk_bytes <= 0 or disk_dir is None else disk_dir
        self.disk_bytes = disk_bytes
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)

    # -- what the sandbox gets: open descriptors -------------------------------------------

    @property
    def in_memory(self) -> bool:
        """Whether files are held as in-memory copies (S3 without a disk cache)."""
        return not self.local and self.disk_dir is None

    def held(self, files: Sequence[FileEntry]) -> bool:
        """Whether this process holds an open descriptor of every file already.

        A descriptor keeps the file's data readable even if garbage collection deletes the
        file, so a query over held files needs no pin against GC.
        """
        with self._lock:
            return all((f.sha256 or f.key) in self._handles for f in files)

    def hold(self, files: Sequence[FileEntry]) -> None:
        """Open (and keep) a descriptor of every file; GoneError if one is no longer stored."""
        for entry in files:
            os.close(self.handle(entry))

    def handle(self, entry: FileEntry) -> int:
        """A new descriptor of the committed file (the caller closes it).

        Local store: the file itself. S3: the disk cache's copy (downloaded and checked
        against the manifest first), or, without a disk cache, an anonymous in-memory file
        holding the checked bytes.
        """
        cache_key = entry.sha256 or entry.key
        with self._lock:
            fd = self._handles.get(cache_key)
            if fd is not None:
                self._handles.move_to_end(cache_key)
                return os.dup(fd)  # under the lock: never a number closed and reused meanwhile
        fd, size = self._open(entry)
        with self._lock:
            if cache_key in self._handles:
                os.close(fd)
                return os.dup(self._handles[cache_key])
            if size > self.memory_bytes:  # alone over the budget: not kept
                return fd
            # duplicate before evicting: the eviction may close older descriptors
            out = os.dup(fd)
            self._handles[cache_key] = fd
            self._handle_bytes[cache_key] = size
            self._memfd_bytes += size
            self._evict_handles()
            return out

    def _open(self, entry: FileEntry) -> tuple[int, int]:
        """(descriptor, bytes it holds in memory) of one file."""
        if self.local:
            try:
                return os.open(self.store.path(entry.key), os.O_RDONLY | os.O_CLOEXEC), 0
            except FileNotFoundError:
                raise _gone(entry) from None
        if self.disk_dir is not None:
            return os.open(self._on_disk(entry), os.O_RDONLY | os.O_CLOEXEC), 0
        data = self._download(entry)
        fd = os.memfd_create(f"trace-{entry.sha256[:16]}", os.MFD_CLOEXEC)
        os.write(fd, data)
        return fd, len(data)

    def _evict_handles(self) -> None:
        while self._handles and (
            len(self._handles) > self.max_handles or self._memfd_bytes > self.memory_bytes
        ):
            key, fd = self._handles.popitem(last=False)
            self._memfd_bytes -= self._handle_bytes.pop(key, 0)
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()
            self._handle_bytes.clear()
            self._memfd_bytes = 0

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


def _gone(entry: FileEntry) -> GoneError:
    return GoneError(
        f"a file of this dataset version ({entry.key.split('/', 1)[0]}) is no longer stored: "
        "the version was garbage-collected; query the current versions instead"
    )
