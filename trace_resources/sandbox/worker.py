"""A sandbox worker: one process that runs untrusted SELECTs, one at a time, for its parent.

    python -m trace_resources.sandbox.worker <socket fd> <config json>     (the pool starts it)

It imports and warms everything it will need, then locks itself in before it reads a request:

- a network namespace of its own (no interface but a loopback that is down),
- `chroot` into an empty, already deleted directory (no file to open; it reads only the
  committed files its parent hands it as open descriptors),
- the unprivileged user `nobody` (when started as root), no new privileges,
- OS limits: address space (`RLIMIT_AS`: DuckDB's allocations and those outside its
  `memory_limit` alike), no file writes (`RLIMIT_FSIZE` 0), no core dumps, few descriptors;
  the parent adds a CPU-time limit per request and kills the process at the wall-time limit,
- a DuckDB database with no file or network access and its configuration locked.

What it could not apply (not root: no chroot, no other user) it reports in its hello, and the
pool logs it. A request's answer is JSON plus Arrow IPC; the worker bounds the bytes of what it
sends (a page ends early at its byte budget; a stream splits batches at it).
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from trace_resources.sandbox import wire

_FORMAT = pads.ParquetFileFormat()
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_NOBODY = "nobody"


def duckdb_config(memory_limit: str, threads: int) -> dict[str, Any]:
    """The locked DuckDB configuration of a sandbox (also what the parent's parser uses)."""
    return {
        # paths first: once external access is off they can no longer be set
        "home_directory": "/",
        "extension_directory": "/",
        "temp_directory": "",
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "python_enable_replacements": False,
        "memory_limit": memory_limit,
        "threads": threads,
        "lock_configuration": True,
    }


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _Watchdog:
    """One thread for the worker's life that interrupts the running statement at its time
    limit (a timer thread per request cost a thread start on every request)."""

    def __init__(self, on_fire: Callable[[], None]) -> None:
        self._on_fire = on_fire
        self._changed = threading.Condition()
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._due = 0.0
        self._thread = threading.Thread(target=self._run, name="deadline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def arm(self, conn: duckdb.DuckDBPyConnection, timeout_s: float) -> None:
        with self._changed:
            self._conn, self._due = conn, time.monotonic() + timeout_s
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._conn = None

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._conn is None:
                    self._changed.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                conn, self._conn = self._conn, None
                self._on_fire()
                conn.interrupt()


class Worker:
    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        self.sock = sock
        self.memory_limit = str(config["memory_limit"])
        self.threads = int(config["threads"])
        self.cache_bytes = int(config["cache_bytes"])
        self.db = duckdb.connect(":memory:", config=duckdb_config(self.memory_limit, self.threads))
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()
        self._table_bytes = 0
        self._schemas: dict[str, pa.Schema] = {}
        self._qualified: set[str] = set()  # this request's `<chain>.<dataset>` views
        # whole datasets as registered last (concatenated decoded files; no copies)
        self._wholes: dict[tuple[tuple[str, ...], pa.Schema], pa.Table] = {}
        self._open_fds: set[int] = set()  # received for the request running now
        self._interrupted = False
        self._watchdog = _Watchdog(self._fired)

    def _fired(self) -> None:
        self._interrupted = True

    # -- start ---------------------------------------------------------------------------

    def warm(self) -> None:
        """Run every code path once, so nothing is imported after the chroot, and start the
        threads a scan uses now, so their stacks are inside the size the address-space limit
        starts from."""
        self._watchdog.start()
        pa.set_cpu_count(self.threads)
        pa.set_io_thread_count(2)
        table = pa.table({"a": pa.array([1, 2], pa.int64()), "b": ["x", None]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        buf = sink.getvalue()
        fragment = _FORMAT.make_fragment(pa.BufferReader(buf))
        dataset = pads.FileSystemDataset([fragment], table.schema, _FORMAT)
        conn = self.db.cursor()
        try:
            conn.register("t", pq.read_table(pa.BufferReader(buf)))
            conn.register("d", dataset)
            reader = conn.sql("SELECT a, b, (SELECT count(*) FROM d) AS n FROM t").to_arrow_reader(
                1024
            )
            for batch in reader:
                _cost(batch)
                _ipc([batch], batch.schema)
        finally:
            conn.close()
        self._conform(table, pa.schema([("a", pa.int64()), ("c", pa.string())]))
        schema_bytes = table.schema.serialize()
        paipc.read_schema(pa.BufferReader(schema_bytes))
        with paipc.open_stream(pa.BufferReader(_ipc(table.to_batches(), table.schema))) as r:
            r.read_all()

    def isolate(self, address_space: int | None) -> dict[str, Any]:
        applied: dict[str, Any] = {"uid": os.geteuid()}
        libc = ctypes.CDLL(None, use_errno=True)
        if os.geteuid() == 0:
            import grp
            import pwd

            nobody = pwd.getpwnam(_NOBODY)
            group = grp.getgrgid(nobody.pw_gid)
            applied["network_namespace"] = libc.unshare(_CLONE_NEWNET) == 0
            # an empty directory, deleted before we enter it: nothing can ever be created there
            path = tempfile.mkdtemp(prefix="trace-sandbox-")
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            os.rmdir(path)
            os.fchdir(dfd)
            os.chroot(".")
            os.chdir("/")
            os.close(dfd)
            applied["chroot"] = True
            os.setgroups([])
            os.setgid(group.gr_gid)
            os.setuid(nobody.pw_uid)
            applied["user"] = _NOBODY
        else:
            # an unprivileged user namespace gives a network namespace without root
            applied["network_namespace"] = libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0
            applied["chroot"] = False
            applied["user"] = str(os.geteuid())
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # descriptors: one per file of a request (an open range may have many segments)
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        files = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
            applied["address_space"] = address_space
        for name in ("HOME", "PWD", "OLDPWD", "USER", "LOGNAME", "PYTHONPATH"):
            os.environ.pop(name, None)
        return applied

    # -- requests ------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            try:
                header, payload = wire.recv(self.sock, max_payload=None)
            except wire.WireError:
                return  # the parent is gone
            if header.get("op") == "exit":
                return
            try:
                self.run(header, payload)
            except _Failure as failure:
                self._send_failure(failure.kind, failure.message)
            except MemoryError:
                self._send_failure("memory", "the query needed more memory than a sandbox has")

    def _send_failure(self, kind: str, message: str) -> None:
        wire.send(self.sock, {"ok": False, "kind": kind, "message": message[:2000]})

    def run(self, header: dict[str, Any], payload: bytearray) -> None:
        started = time.perf_counter()
        timeout_s = float(header["timeout_s"])
        # CPU time: the kernel ends this process (SIGXCPU) past the request's budget
        cpu_budget = float(header.get("cpu_s") or timeout_s * self.threads + 2)
        limit = int(_cpu() + cpu_budget) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (limit, resource.RLIM_INFINITY))
        conn = self.db.cursor()
        keep: list[Any] = []  # descriptors' files stay open until the query is done
        answer: tuple[dict[str, Any], bytes]
        try:
            self._register(conn, header["sources"], payload, keep)
            with self._deadline(conn, timeout_s):
                if header["mode"] == "page":
                    answer = self._page(conn, header, started)
                else:
                    answer = self._stream(conn, header, started)
        except duckdb.InterruptException:
            if self._interrupted:
                raise _Failure(
                    "timeout", f"the query ran longer than its {timeout_s:g} s limit"
                ) from None
            raise _Failure("internal", "the query was interrupted") from None
        except duckdb.OutOfMemoryException as exc:
            raise _Failure("memory", _first_line(exc)) from None
        except duckdb.CatalogException as exc:
            message = _first_line(exc)
            if message.startswith("Catalog Error: Table with name "):
                name = message.removeprefix("Catalog Error: Table with name ").split(" ")[0]
                raise _Failure("unknown_table", name) from None
            raise _Failure("invalid_sql", message) from None
        except duckdb.PermissionException as exc:
            raise _Failure("not_allowed", _first_line(exc)) from None
        except (duckdb.InternalException, duckdb.FatalException) as exc:
            raise _Failure("internal", _first_line(exc)) from None
        except duckdb.Error as exc:
            message = _first_line(exc)
            if "Out of Memory" in message or "bad_alloc" in message or "allocate" in message:
                raise _Failure("memory", message) from None
            raise _Failure("invalid_sql", message) from None
        except (pa.ArrowInvalid, OSError) as exc:
            if self._interrupted:  # DuckDB's interrupt, met while it fills Arrow batches
                raise _Failure(
                    "timeout", f"the query ran longer than its {timeout_s:g} s limit"
                ) from None
            if "Out of Memory" in str(exc):  # DuckDB's limit, met while it fills Arrow batches
                raise _Failure("memory", _first_line(exc)) from None
            raise _Failure("read_failed", f"reading the data failed: {exc}") from None
        finally:
            if self._qualified:
                self._unqualify(conn)
            conn.close()
            for item in keep:
                try:
                    item.close()
                except Exception:
                    pass
            for fd in list(self._open_fds):  # received but never used (the request failed)
                self._open_fds.discard(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
        # the answer goes out once the request's descriptors are closed
        wire.send(self.sock, *answer)

    @contextmanager
    def _deadline(self, conn: duckdb.DuckDBPyConnection, timeout_s: float) -> Iterator[None]:
        """Interrupt the statement at the time limit (the watchdog thread of `warm`)."""
        self._interrupted = False
        self._watchdog.arm(conn, timeout_s)
        try:
            yield
        finally:
            self._watchdog.disarm()

    def _register(
        self,
        conn: duckdb.DuckDBPyConnection,
        sources: list[dict[str, Any]],
        payload: bytearray,
        keep: list[Any],
    ) -> None:
        view = memoryview(payload)
        at = 0
        need: list[tuple[int, int]] = []
        # the decoded tables this request uses, taken now: decoding the others may evict them
        held: dict[tuple[int, int], pa.Table] = {}
        for i, source in enumerate(sources):
            if source["kind"] != "files":
                continue
            lazy = self._is_lazy(source)
            for j, (file_id, _size) in enumerate(source["files"]):
                table = None if lazy else self._tables.get(file_id)
                if table is None:
                    need.append((i, j))
                else:
                    held[(i, j)] = table
        fds: dict[tuple[int, int], int] = {}
        if need:
            wire.send(self.sock, {"need": [list(p) for p in need]})
            received = wire.recv_fds(self.sock, len(need))
            self._open_fds.update(received)  # closed at the end of the request if unused
            fds = dict(zip(need, received, strict=True))
        for i, source in enumerate(sources):
            schema = self._schema(source["schema"])
            name = source["name"]
            if source["kind"] == "inline":
                size = int(source["bytes"])
                with paipc.open_stream(pa.py_buffer(view[at : at + size])) as reader:
                    table = reader.read_all()
                at += size
                conn.register(name, self._conform(table, schema))
                continue
            mine = {j: fd for (si, j), fd in fds.items() if si == i}
            tables = {j: t for (si, j), t in held.items() if si == i}
            conn.register(name, self._files(source, schema, mine, tables, keep))
        for source in sources:
            if "." in source["name"]:
                self._qualify(conn, source["name"])

    def _qualify(self, conn: duckdb.DuckDBPyConnection, name: str) -> None:
        """Make a chain's dataset `<chain>.<dataset>` readable by that name in SQL: a view in
        the schema `<chain>` over the request's registration (the temp catalog holds no
        schemas but `main`). The view is the database's, so it is dropped when the request
        ends (`_unqualify`); another request's cursor could only reach its own registrations
        through it anyway."""
        schema, table = (_quoted(part) for part in name.split(".", 1))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        conn.execute(
            f"CREATE OR REPLACE VIEW {schema}.{table} AS SELECT * FROM temp.main.{_quoted(name)}"
        )
        self._qualified.add(f"{schema}.{table}")

    def _unqualify(self, conn: duckdb.DuckDBPyConnection) -> None:
        while self._qualified:
            try:
                conn.execute(f"DROP VIEW IF EXISTS {self._qualified.pop()}")
            except duckdb.Error:  # left behind, it reaches only its own cursor's registrations
                pass

    def _schema(self, text: str) -> pa.Schema:
        schema = self._schemas.get(text)
        if schema is None:
            schema = paipc.read_schema(pa.py_buffer(bytes.fromhex(text)))
            if len(self._schemas) > 256:
                self._schemas.clear()
            self._schemas[text] = schema
        return schema

    def _is_lazy(self, source: dict[str, Any]) -> bool:
        # decoded Arrow is a few times the compressed Parquet
        return sum(size for _, size in source["files"]) * 4 > self.cache_bytes

    def _files(
        self,
        source: dict[str, Any],
        schema: pa.Schema,
        fds: dict[int, int],
        held: dict[int, pa.Table],
        keep: list[Any],
    ) -> pa.Table | pads.Dataset:
        files = source["files"]
        if not files:
            return schema.empty_table()
        if self._is_lazy(source):
            # a scan reads only the row groups and columns the query needs
            fragments = []
            for j in range(len(files)):
                raw = _PreadFile(fds[j], self._open_fds)
                handle = pa.PythonFile(raw, mode="r")
                keep += [handle, raw]
                fragments.append(_FORMAT.make_fragment(handle))
            return pads.FileSystemDataset(fragments, schema, _FORMAT)
        ids = tuple(file_id for file_id, _size in files)
        whole = self._wholes.get((ids, schema))
        if whole is not None and len(held) == len(files):
            for file_id in ids:
                self._tables.move_to_end(file_id)
            return whole
        tables = []
        for j, (file_id, _size) in enumerate(files):
            table = held.get(j)
            if table is None:
                table = self._decode(fds[j])
                self._remember(file_id, table)
            elif file_id in self._tables:
                self._tables.move_to_end(file_id)
            tables.append(self._conform(table, schema))
        whole = pa.concat_tables(tables)
        if len(self._wholes) >= 64:
            self._wholes.pop(next(iter(self._wholes)))
        self._wholes[(ids, schema)] = whole
        return whole

    def _decode(self, fd: int) -> pa.Table:
        with _PreadFile(fd, self._open_fds) as handle:
            data = handle.read()
        return pq.read_table(pa.BufferReader(pa.py_buffer(data)))

    def _remember(self, file_id: str, table: pa.Table) -> None:
        size = table.get_total_buffer_size()
        if size * 4 > self.cache_bytes:
            return
        self._tables[file_id] = table
        self._table_bytes += size
        while self._table_bytes > self.cache_bytes and self._tables:
            _, evicted = self._tables.popitem(last=False)
            self._table_bytes -= evicted.get_total_buffer_size()
            self._wholes.clear()  # they hold the evicted table's buffers

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

    def _page(
        self, conn: duckdb.DuckDBPyConnection, header: dict[str, Any], started: float
    ) -> tuple[dict[str, Any], bytes]:
        offset, limit = int(header["offset"]), int(header["limit"])
        budget = int(header["max_bytes"])
        relation = conn.sql(header["sql"])
        columns = [[n, str(t)] for n, t in zip(relation.columns, relation.types, strict=True)]
        reader = relation.to_arrow_reader(8192)
        schema = reader.schema
        kept: list[pa.RecordBatch] = []
        rows = used = skipped = 0
        has_more = byte_limited = False
        for batch in reader:
            if skipped < offset:
                drop = min(offset - skipped, batch.num_rows)
                skipped += drop
                batch = batch.slice(drop)
            if batch.num_rows == 0:
                continue
            if rows >= limit:
                has_more = True
                break
            room = limit - rows
            take = batch.slice(0, room)
            fitted = _fit(take, budget - used)
            if fitted.num_rows:
                kept.append(fitted)
                rows += fitted.num_rows
                used += _cost(fitted)
            if fitted.num_rows < take.num_rows:
                if rows == 0:
                    raise _Failure(
                        "too_large",
                        f"one row of the result is larger than the {budget}-byte page budget",
                    )
                has_more = byte_limited = True  # the rest comes with the next cursor
                break
            if batch.num_rows > room:
                has_more = True
                break
        reader.close()
        body = _ipc(kept, schema)
        return (
            {
                "ok": True,
                "columns": columns,
                "rows": rows,
                "has_more": has_more,
                "byte_limited": byte_limited,
                "elapsed_ms": (time.perf_counter() - started) * 1000,
                "cpu_s": _cpu(),
            },
            body,
        )

    def _stream(
        self, conn: duckdb.DuckDBPyConnection, header: dict[str, Any], started: float
    ) -> tuple[dict[str, Any], bytes]:
        budget = int(header["max_bytes"])
        relation = conn.sql(header["sql"])
        columns = [[n, str(t)] for n, t in zip(relation.columns, relation.types, strict=True)]
        reader = relation.to_arrow_reader(65536)
        schema = reader.schema
        rows = 0
        wire.send(self.sock, {"schema": schema.serialize().to_pybytes().hex()})
        for batch in reader:
            while batch.num_rows:
                part = _fit(batch, budget)
                if part.num_rows == 0:
                    raise _Failure(
                        "too_large", f"one row of the result is larger than {budget} bytes"
                    )
                wire.send(self.sock, {"batch": part.num_rows}, _ipc([part], schema))
                rows += part.num_rows
                batch = batch.slice(part.num_rows)
        reader.close()
        return (
            {
                "ok": True,
                "columns": columns,
                "rows": rows,
                "elapsed_ms": (time.perf_counter() - started) * 1000,
                "cpu_s": _cpu(),
            },
            b"",
        )


class _PreadFile(io.RawIOBase):
    """A read-only file over a descriptor that reads at its own position (`pread`): the
    descriptor is a duplicate whose shared offset other readers move at any time."""

    def __init__(self, fd: int, owned: set[int]) -> None:
        super().__init__()
        self.fd = fd
        self.owned = owned
        self.size = os.fstat(fd).st_size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self.fd, len(view), self.pos)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while self.pos < self.size:
            data = os.pread(self.fd, self.size - self.pos, self.pos)
            if not data:
                break
            chunks.append(data)
            self.pos += len(data)
        return b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self.owned.discard(self.fd)
            os.close(self.fd)
        super().close()


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _fit(batch: pa.RecordBatch, budget: int) -> pa.RecordBatch:
    """The longest head of `batch` whose cost (`_cost`) fits in `budget`."""
    if _cost(batch) <= budget:
        return batch
    n = batch.num_rows
    while n > 0:
        n = min(n - 1, max(0, int(n * budget / max(_cost(batch.slice(0, n)), 1))))
        if _cost(batch.slice(0, n)) <= budget:
            return batch.slice(0, n)
    return batch.slice(0, 0)


# characters JSON escapes (\u0001, \", \\), CSV doubles (") or JSON spells as \uXXXX (non-ASCII)
_ESCAPED = r'[\x00-\x1f"\\]|[^\x00-\x7f]'


def _cost(batch: pa.RecordBatch) -> int:
    """The bytes of a batch as the service renders it, within a factor of about 2: Arrow bytes
    alone undercount JSON and CSV without bound (a list of a million NULLs has no Arrow buffer
    at all, booleans are bits, struct keys repeat in every value, escapes grow 6x)."""
    return sum(_array_cost(column) for column in batch.columns)


def _array_cost(array: pa.Array) -> int:
    type_ = array.type
    cost = 8 * len(array)  # every value: a separator, null, a number, brackets
    if pa.types.is_dictionary(type_):
        return cost + _array_cost(array.dictionary_decode())
    if pa.types.is_struct(type_):
        cost += len(array) * sum(len(f.name.encode()) + 4 for f in type_)
        return cost + sum(_array_cost(child) for child in array.flatten())
    if pa.types.is_map(type_):  # the same layout as a list of [key, value] pairs
        pairs = pa.list_(pa.struct([type_.key_field, type_.item_field]))
        return cost + _array_cost(array.view(pairs))
    if (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
    ):
        return cost + _array_cost(array.flatten())
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        escaped = pc.sum(pc.count_substring_regex(array, _ESCAPED)).as_py() or 0
        return cost + array.nbytes + 5 * escaped
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return cost + 2 * array.nbytes  # hex
    return cost + array.nbytes


def _ipc(batches: list[pa.RecordBatch], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with paipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _address_space_now() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    config = json.loads(argv[1])
    worker = Worker(sock, config)
    worker.warm()
    headroom = int(config.get("address_space_headroom") or 0)
    address_space = _address_space_now() + headroom if headroom else None
    isolation = worker.isolate(address_space)
    wire.send(sock, {"ready": True, "pid": os.getpid(), "isolation": isolation})
    worker.serve()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown under DuckDB's and Arrow's threads


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
