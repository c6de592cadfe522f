"""The parent's side of the sandbox: a pool of worker processes (`worker.py`) and the calls that
run one statement in one of them.

    pool = SandboxPool(size=4, memory_bytes=1 << 30, threads=1)
    with pool.lease(wait_s=2) as worker:
        page = worker.page(sql, [FileSource(...), InlineSource(...)], offset=0, limit=1000,
                           max_bytes=8 << 20, timeout_s=10)

Limits, and who enforces them:
- memory: the worker's address space (`RLIMIT_AS`, set by the worker before its first request:
  its size when ready plus the budget); DuckDB's own `memory_limit` sits below it, so most
  queries fail with DuckDB's message and allocations outside DuckDB's accounting fail at the
  OS limit;
- CPU time: `RLIMIT_CPU`, set by the worker before each request (its CPU time so far plus the
  request's budget; SQL has no way to change it); the kernel ends the worker past it;
- wall time: the worker interrupts its own query at the limit; the parent kills the process one
  second later if no answer came;
- bytes: the worker fits its answer into the request's byte budget; the parent refuses (and
  kills) any message larger than the budget plus a margin.

A worker that died or was killed is replaced in the background; only its own request fails, with
a `SandboxError` that names the limit. Workers exit when the pool closes or their socket closes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.ipc as paipc

from trace_resources.sandbox import wire

__all__ = [
    "SandboxError",
    "SandboxBusy",
    "FileSource",
    "InlineSource",
    "SandboxPage",
    "SandboxPool",
    "SandboxWorker",
]

log = logging.getLogger(__name__)

_HEADER_CAP = 1 << 20
_READY_TIMEOUT_S = 60.0
_KILL_GRACE_S = 1.0
_LONG_S = 0.25  # a statement running longer yields the CPU to short ones
_WATCH_TICK_S = 0.05


class SandboxError(Exception):
    """A statement failed in its sandbox. `kind` says why:

    timeout, cpu, memory, too_large  a limit (the message names it)
    invalid_sql, unknown_table, not_allowed, read_failed  the statement or its data
    crashed, internal  the worker died or DuckDB failed inside
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _CallerError(Exception):
    """An error of the caller's (opening a file it hands over), carried past the socket
    error handling."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


class SandboxBusy(SandboxError):
    def __init__(self, message: str) -> None:
        super().__init__("busy", message)


@dataclass(frozen=True)
class FileSource:
    """A dataset as committed Parquet files. `open(i)` returns a new descriptor of file i,
    which the pool sends to the worker and then closes."""

    name: str
    schema: pa.Schema
    files: Sequence[tuple[str, int]]  # (stable id, e.g. the file's SHA-256; size in bytes)
    open: Callable[[int], int]


@dataclass(frozen=True)
class InlineSource:
    """A dataset handed over as an Arrow table (alert evaluation's in-memory ranges)."""

    name: str
    table: pa.Table


@dataclass
class SandboxPage:
    table: pa.Table
    columns: list[tuple[str, str]]
    has_more: bool
    byte_limited: bool
    elapsed_ms: float


@dataclass(eq=False)
class SandboxWorker:
    """One worker process and its end of the socket pair."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    isolation: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = 0.0
    dead: bool = False
    cpu_budget_s: float = 0.0
    in_request: bool = False
    _started: float = 0.0
    _lowered: bool = False
    _priority_lock: threading.Lock = field(default_factory=threading.Lock)
    _kill_reason: str | None = None
    _pending: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- requests ------------------------------------------------------------------------

    def page(
        self,
        sql: str,
        sources: Sequence[FileSource | InlineSource],
        *,
        offset: int,
        limit: int,
        max_bytes: int,
        timeout_s: float,
    ) -> SandboxPage:
        deadline = self._start(
            {
                "op": "run",
                "mode": "page",
                "sql": sql,
                "offset": offset,
                "limit": limit,
                "max_bytes": max_bytes,
                "timeout_s": timeout_s,
            },
            sources,
            timeout_s,
        )
        header, payload = self._answer(deadline, max_bytes * 2 + (1 << 20), timeout_s)
        try:
            table = _read_ipc(payload, 4 * max_bytes + (1 << 20))
        except SandboxError:
            self.kill("too_large")
            raise
        return SandboxPage(
            table,
            [(str(n), str(t)) for n, t in header["columns"]],
            bool(header["has_more"]),
            bool(header.get("byte_limited")),
            float(header["elapsed_ms"]),
        )

    def stream(
        self,
        sql: str,
        sources: Sequence[FileSource | InlineSource],
        *,
        max_batch_bytes: int,
        timeout_s: float,
    ) -> Iterator[pa.RecordBatch]:
        """The whole result in batches of at most `max_batch_bytes` each (exports)."""
        deadline = self._start(
            {
                "op": "run",
                "mode": "stream",
                "sql": sql,
                "max_bytes": max_batch_bytes,
                "timeout_s": timeout_s,
            },
            sources,
            timeout_s,
        )
        header, _ = self._answer(deadline, 0, timeout_s)
        schema = paipc.read_schema(pa.py_buffer(bytes.fromhex(str(header["schema"]))))
        sent = False
        while True:
            header, payload = self._answer(deadline, max_batch_bytes * 2 + (1 << 20), timeout_s)
            if "batch" not in header:
                break
            try:
                decoded = _read_ipc(payload, 4 * max_batch_bytes + (1 << 20))
            except SandboxError:
                self.kill("too_large")
                raise
            for batch in decoded.to_batches():
                sent = True
                yield batch
        if not sent:
            yield pa.RecordBatch.from_pylist([], schema=schema)

    def kill(self, reason: str) -> None:
        """Stop the worker now (its request fails with `reason`)."""
        self._kill_reason = self._kill_reason or reason
        self.dead = True
        try:
            self.process.send_signal(signal.SIGKILL)  # a no-op once reaped: never a reused pid
        except ProcessLookupError:
            pass

    # -- the conversation --------------------------------------------------------------------

    def _start(
        self,
        header: dict[str, Any],
        sources: Sequence[FileSource | InlineSource],
        timeout_s: float,
    ) -> float:
        if self.dead:
            raise SandboxError("crashed", "the sandbox worker is gone")
        self._kill_reason = None
        self._pending = None
        specs: list[dict[str, Any]] = []
        inline: list[bytes] = []
        for source in sources:
            if isinstance(source, InlineSource):
                body = _ipc_table(source.table)
                inline.append(body)
                specs.append(
                    {
                        "name": source.name,
                        "kind": "inline",
                        "bytes": len(body),
                        "schema": _schema_hex(source.table.schema),
                    }
                )
            else:
                specs.append(
                    {
                        "name": source.name,
                        "kind": "files",
                        "files": [[fid, size] for fid, size in source.files],
                        "schema": _schema_hex(source.schema),
                    }
                )
        deadline = time.monotonic() + timeout_s + _KILL_GRACE_S
        self.in_request = True
        self._yield_later()
        with self._talking(deadline, timeout_s):
            request = {**header, "cpu_s": self._cpu_budget(timeout_s), "sources": specs}
            wire.send(self.sock, request, b"".join(inline))
            if any(isinstance(s, FileSource) and s.files for s in sources):
                self._hand_files(sources)
        return deadline

    @contextmanager
    def _talking(self, deadline: float, timeout_s: float) -> Iterator[None]:
        """Socket I/O until `deadline`; a timeout kills the worker, a broken socket says why
        the worker ended."""
        try:
            self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            yield
        except _CallerError as failed:
            raise failed.original from None  # the caller's own error (a file it could not open)
        except TimeoutError:
            self.kill("timeout")
            raise SandboxError(
                "timeout",
                f"the query ran longer than its {timeout_s:g} s limit and its sandbox was stopped",
            ) from None
        except wire.PayloadTooLarge:
            self.kill("too_large")
            raise SandboxError(
                "too_large", "the sandbox's answer is over its byte budget"
            ) from None
        except (OSError, wire.WireError):
            self._died(timeout_s)

    def _hand_files(self, sources: Sequence[FileSource | InlineSource]) -> None:
        """Answer the worker's `need` (the files it has not decoded already) with descriptors.
        When every file is decoded in the worker already, its first message is the answer."""
        header = wire.recv_header(self.sock, max_header=_HEADER_CAP)
        if "need" not in header:
            self._pending = header
            return
        fds: list[int] = []
        try:
            for pair in header["need"]:
                i, j = int(pair[0]), int(pair[1])
                source = sources[i]
                if not isinstance(source, FileSource) or not 0 <= j < len(source.files):
                    raise SandboxError("crashed", "the sandbox worker asked for an unknown file")
                fds.append(source.open(j))
        except Exception as exc:
            _close_all(fds)
            self.kill("aborted")  # the worker waits for descriptors it will never get
            raise _CallerError(exc) from exc
        try:
            wire.send_fds(self.sock, fds)
        finally:
            _close_all(fds)

    def _answer(
        self, deadline: float, max_payload: int, timeout_s: float
    ) -> tuple[dict[str, Any], bytearray]:
        with self._talking(deadline, timeout_s):
            header = self._pending or wire.recv_header(self.sock, max_header=_HEADER_CAP)
            self._pending = None
            length = wire.payload_size(header, max_payload)
            payload = wire.recv_exact(self.sock, length) if length else bytearray()
        if header.get("ok") is not None:
            with self._priority_lock:
                self.in_request = False  # the last message of the request
            self._restore_priority()
        if "cpu_s" in header:
            try:
                self.cpu_s = float(header["cpu_s"])
            except (TypeError, ValueError):
                pass
        if header.get("ok") is False:
            kind = str(header.get("kind", "internal"))
            if kind in ("memory", "internal"):
                # after a failed allocation (or an engine error) the process may keep address
                # space or state it should not: replace it rather than serve the next request
                self.kill(kind)
            raise SandboxError(kind, str(header.get("message", ""))[:2000])
        return header, payload

    def _died(self, timeout_s: float) -> NoReturn:
        """The worker's socket failed: say why the process ended."""
        self.dead = True
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill("unresponsive")
            code = self.process.wait()
        if self._kill_reason == "timeout":
            raise SandboxError("timeout", f"the query ran longer than its {timeout_s:g} s limit")
        if code == -signal.SIGXCPU:
            raise SandboxError(
                "cpu", f"the query used more than its {self.cpu_budget_s:g} s of CPU time"
            )
        if code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS, 134):
            # an allocation failing at the address-space limit most often ends in an abort
            raise SandboxError(
                "memory",
                "the query's sandbox died, most likely at its memory limit, and was replaced",
            )
        raise SandboxError("crashed", f"the query's sandbox died (exit {code}) and was replaced")

    # -- long statements yield the CPU to short ones ---------------------------------------

    def _yield_later(self) -> None:
        """A statement still running after `_LONG_S` gets the lowest CPU priority (nice 19),
        so that one organisation's long statements do not slow everyone's short ones; the
        worker gets its priority back after the answer. Root only: an unprivileged service
        could not raise it again."""
        if os.geteuid() != 0:
            return
        self._started = time.monotonic()
        _LONG_STATEMENTS.watch(self)

    def _lower_if_long(self, now: float) -> None:
        with self._priority_lock:
            if (
                self.in_request
                and not self.dead
                and not self._lowered
                and now - self._started >= _LONG_S
            ):
                self._lowered = True
                self._nice(19)

    def _restore_priority(self) -> None:
        _LONG_STATEMENTS.forget(self)
        with self._priority_lock:
            if self._lowered:
                self._lowered = False
                self._nice(0)

    def _nice(self, value: int) -> None:
        """Every thread of the worker (Linux keeps a nice value per thread)."""
        try:
            threads = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), value)
            except OSError:
                pass

    def _cpu_budget(self, timeout_s: float) -> float:
        threads = max(1, int(self.isolation.get("threads", 1)))
        self.cpu_budget_s = timeout_s * threads + 2.0
        return self.cpu_budget_s


class _LongStatementWatch:
    """One thread for every worker of the process lowers the priority of statements running
    longer than `_LONG_S`: it looks at the workers in a request every `_WATCH_TICK_S` and
    sleeps while there are none (a timer thread per request cost more than the rest of the
    sandbox's bookkeeping under load)."""

    def __init__(self) -> None:
        self._running: set[SandboxWorker] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, worker: SandboxWorker) -> None:
        with self._changed:
            self._running.add(worker)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sandbox-long-statements", daemon=True
                )
                self._thread.start()
            if len(self._running) == 1:
                self._changed.notify()

    def forget(self, worker: SandboxWorker) -> None:
        with self._changed:
            self._running.discard(worker)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._running:
                    self._changed.wait()
                running = list(self._running)
            now = time.monotonic()
            for worker in running:
                worker._lower_if_long(now)
            time.sleep(_WATCH_TICK_S)


_LONG_STATEMENTS = _LongStatementWatch()


class SandboxPool:
    """`size` workers; `lease` hands one out for one statement."""

    def __init__(
        self,
        size: int,
        *,
        memory_bytes: int,
        threads: int = 1,
        cache_bytes: int = 64 << 20,
        name: str = "sandbox",
    ) -> None:
        self.size = size
        self.memory_bytes = memory_bytes
        self.threads = threads
        self.cache_bytes = cache_bytes
        self.name = name
        self._idle: queue.LifoQueue[SandboxWorker] = queue.LifoQueue()
        self._workers: set[SandboxWorker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._busy = 0
        self.replaced = 0
        self.isolation: dict[str, Any] = {}
        for _ in range(size):
            self._spawn_later()

    # -- workers -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        # DuckDB's own limit at 3/4 of the budget, so that most queries fail with its message
        duck_mb = max(64, self.memory_bytes * 3 // 4 // (1 << 20))
        return {
            "memory_limit": f"{duck_mb}MB",
            "threads": self.threads,
            "cache_bytes": self.cache_bytes,
            # + room for thread stacks and the allocators' own reservations
            "address_space_headroom": self.memory_bytes + self.cache_bytes + (256 << 20),
        }

    def _spawn(self) -> SandboxWorker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": project}
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trace_resources.sandbox.worker",
                    str(child.fileno()),
                    json.dumps(self._config()),
                ],
                pass_fds=[child.fileno()],
                cwd="/",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # a pipe, not a file: the worker may write no file (RLIMIT_FSIZE 0)
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker = SandboxWorker(process, parent)
        threading.Thread(
            target=_log_stderr, args=(process, self.name), name=f"{self.name}-stderr", daemon=True
        ).start()
        try:
            parent.settimeout(_READY_TIMEOUT_S)
            hello, _ = wire.recv(parent, max_header=_HEADER_CAP, max_payload=0)
        except (OSError, wire.WireError) as exc:
            worker.kill("start")
            process.wait()
            parent.close()
            raise RuntimeError(f"a sandbox worker did not start: {exc}") from None
        worker.isolation = {**dict(hello.get("isolation") or {}), "threads": self.threads}
        if not self.isolation:
            self.isolation = worker.isolation
            missing = [
                what
                for what, ok in (
                    ("a network namespace", worker.isolation.get("network_namespace")),
                    ("chroot", worker.isolation.get("chroot")),
                    ("the user nobody", worker.isolation.get("user") == "nobody"),
                )
                if not ok
            ]
            if missing:
                log.warning(
                    "sandbox workers run without %s (the service is not root, or lacks "
                    "CAP_SYS_ADMIN for namespaces): %s",
                    ", ".join(missing),
                    worker.isolation,
                )
        return worker

    def _spawn_later(self) -> None:
        def start() -> None:
            delay = 0.5
            while not self._closed:
                try:
                    worker = self._spawn()
                    break
                except Exception:
                    log.exception(
                        "starting a %s worker failed; retrying in %.1f s", self.name, delay
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
            else:
                return
            with self._lock:
                if self._closed:
                    self._stop(worker)
                    return
                self._workers.add(worker)
                self._idle.put(worker)  # under the lock: `close` sees it on the queue

        threading.Thread(target=start, name=f"{self.name}-spawn", daemon=True).start()

    @staticmethod
    def _stop(worker: SandboxWorker) -> None:
        try:
            wire.send(worker.sock, {"op": "exit"})
        except OSError:
            pass
        try:
            worker.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            worker.kill("close")
            worker.process.wait()
        worker.sock.close()

    # -- leases --------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        return self._busy

    @contextmanager
    def lease(self, wait_s: float) -> Iterator[SandboxWorker]:
        if self._closed:
            raise SandboxBusy("the sandbox pool is closed")
        try:
            worker = self._idle.get(timeout=wait_s) if wait_s > 0 else self._idle.get_nowait()
        except queue.Empty:
            raise SandboxBusy(f"all {self.size} sandboxes are busy") from None
        with self._lock:
            self._busy += 1
        try:
            yield worker
        finally:
            with self._lock:
                self._busy -= 1
            _LONG_STATEMENTS.forget(worker)
            if worker.in_request and not worker.dead:
                worker.kill("abandoned")  # its caller stopped reading mid-answer
            if worker.dead or worker.process.poll() is not None:
                self._retire(worker)
            elif self._closed:
                self._stop(worker)
            else:
                self._idle.put(worker)

    def _retire(self, worker: SandboxWorker) -> None:
        worker.dead = True
        worker.kill("retired")
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        worker.sock.close()
        with self._lock:
            self._workers.discard(worker)
            self.replaced += 1
        if not self._closed:
            self._spawn_later()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers if not w.dead]

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until every worker is up (tests, benchmarks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._idle.qsize() >= self.size:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            self._stop(worker)
        with self._lock:
            rest = [w for w in self._workers if w.process.poll() is None]
        for worker in rest:  # leased right now: their requests fail
            worker.kill("close")


def _log_stderr(process: subprocess.Popen[bytes], name: str) -> None:
    """What a worker writes to stderr (a crash's last words), in the service's log."""
    assert process.stderr is not None
    with process.stderr:
        while line := process.stderr.readline(4096):
            text = line.decode(errors="replace").rstrip()
            if text:
                log.warning("%s worker %s: %s", name, process.pid, text[:1000])


@functools.lru_cache(maxsize=1024)
def _schema_hex(schema: pa.Schema) -> str:
    return schema.serialize().to_pybytes().hex()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _ipc_table(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with paipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _read_ipc(payload: bytearray, cap: int) -> pa.Table:
    """The Arrow IPC stream a worker sent, refused past `cap` decoded bytes (a worker sends
    uncompressed data within its byte budget; anything else is not the worker's code)."""
    batches = []
    size = 0
    try:
        with paipc.open_stream(pa.py_buffer(payload)) as reader:
            for batch in reader:
                size += batch.get_total_buffer_size()
                if size > cap:
                    raise SandboxError("too_large", "the sandbox's answer is over its byte budget")
                batches.append(batch)
            return pa.Table.from_batches(batches, schema=reader.schema)
    except pa.ArrowInvalid as exc:
        raise SandboxError("crashed", f"the sandbox sent a broken result: {exc}") from None
