"""Pointer moves as PostgreSQL notifications, for readers that cache current versions.

Every transaction that moves a current-version pointer (`fenced_commit._record_version`: commits,
appends, compactions) also runs `announce(conn, dataset)`: `NOTIFY trace_pointers, '<dataset>'`,
delivered by PostgreSQL to every listening session when, and only if, that transaction commits.

`PointerListener` holds one listening connection in a thread of its own and hands each moved
dataset to `on_change`. Its guarantee is `sync()`: when it returns True, every pointer move
whose transaction committed before `sync()` was called has been handed to `on_change` (one
round trip on the listening connection, started after the call, shared by the callers waiting
at the same time). The reason it holds: a committing transaction signals the listening
backends before its client hears of the commit, and a backend sends the notifications it was
signalled for before it answers the next statement it reads.

When the listening connection is lost (the backend was terminated, the network failed, the
server restarted), `on_reset` is called and `sync()` answers False until the listener has
connected and listens again; it then calls `on_reset` once more (moves in between were not
heard) and `sync()` works again. A caller that gets False reads the database instead of its
cache. A ping that hangs is given up after `sync`'s timeout (False) and the connection's TCP
keepalives end it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

__all__ = ["CHANNEL", "PointerListener", "announce"]

CHANNEL = "trace_pointers"

log = logging.getLogger(__name__)

# the listening connection: found dead within seconds, not the OS's default two hours
_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 5,
    "application_name": "trace-pointer-listener",
}


def announce(conn: sa.Connection, dataset: str) -> None:
    """Tell the listeners that `dataset` has a new current version, when (and if) the
    caller's transaction commits."""
    conn.execute(sa.select(sa.func.pg_notify(CHANNEL, dataset)))


class PointerListener:
    """LISTEN on the pointer channel in a daemon thread (see the module docstring)."""

    def __init__(
        self,
        engine: sa.Engine,
        on_change: Callable[[str], None],
        on_reset: Callable[[], None],
        *,
        heartbeat_s: float = 1.0,
        retry_s: float = 0.5,
        name: str = "pointer-listener",
    ) -> None:
        self._engine = engine
        self._on_change = on_change
        self._on_reset = on_reset
        self._heartbeat_s = heartbeat_s
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._live = False  # connected and listening
        self._started = 0  # rounds (pings) begun
        self._done = 0  # the newest round completed, its notifications handed over
        self._wanted = 0  # the newest round a caller waits for
        self._stopping = False
        self._pid: int | None = None  # the listening backend's process id
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> PointerListener:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def backend_pid(self) -> int | None:
        """The listening backend's process id while connected (for operators and tests)."""
        with self._cond:
            return self._pid if self._live else None

    def sync(self, timeout_s: float) -> bool:
        """True once every pointer move committed before this call was handed to `on_change`;
        False if the listener is not listening or its round trip took over `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._live:
                return False
            target = self._started + 1  # a round that begins after this call
            if self._wanted < target:
                self._wanted = target
                self._wake()
            while self._done < target:
                remaining = deadline - time.monotonic()
                if not self._live or self._stopping or remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- the listener thread -----------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the pipe is full (a wake-up is pending anyway) or closed
            pass

    def _connect(self) -> Any:
        args, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
        conn = self._engine.dialect.loaded_dbapi.connect(*args, **{**kwargs, **_KEEPALIVE})
        conn.autocommit = True
        conn.notifies = deque()
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
            cur.execute("SELECT pg_backend_pid()")
            (pid,) = cur.fetchone()
        return conn, int(pid)

    def _run(self) -> None:
        retry_s = self._retry_s
        while not self._stopping:
            try:
                conn, pid = self._connect()
            except Exception as exc:
                log.warning("pointer listener: cannot connect (%s); retry in %.1f s", exc, retry_s)
                with self._cond:
                    self._cond.wait(retry_s)
                retry_s = min(2 * retry_s, 5.0)
                continue
            retry_s = self._retry_s
            # pointer moves while not listening were not heard: forget what was cached
            self._on_reset()
            with self._cond:
                self._pid, self._live = pid, True
                self._cond.notify_all()
            try:
                self._listen(conn)
            except Exception as exc:
                if not self._stopping:
                    log.warning("pointer listener: connection lost (%s); reconnecting", exc)
            finally:
                with self._cond:
                    self._live, self._pid = False, None
                    self._cond.notify_all()
                self._on_reset()
                try:
                    conn.close()
                except Exception:
                    pass

    def _listen(self, conn: Any) -> None:
        last_ping = time.monotonic()
        while not self._stopping:
            with self._cond:
                round_wanted = self._wanted > self._done
            if round_wanted or time.monotonic() - last_ping >= self._heartbeat_s:
                self._round(conn)
                last_ping = time.monotonic()
                continue
            ready, _, _ = select.select([conn, self._wake_r], [], [], self._heartbeat_s)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if conn in ready:
                conn.poll()  # raises when the connection is gone
                self._hand_over(conn)

    def _round(self, conn: Any) -> None:
        """One round trip; the notifications that arrived before its answer handed over."""
        with self._cond:
            self._started += 1
            number = self._started
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        self._hand_over(conn)
        with self._cond:
            self._done = number
            self._cond.notify_all()

    def _hand_over(self, conn: Any) -> None:
        notifies: deque[Any] = conn.notifies
        while notifies:
            self._on_change(notifies.popleft().payload)
