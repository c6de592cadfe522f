"""A TCP proxy in front of PostgreSQL that cuts a client's connection around a COMMIT.

It reads the frontend/backend protocol (v3) as it relays it, so it can act on one exact
statement: the COMMIT of a transaction that ran a statement matching `when` (by default the
version insert of the commit protocol). Modes:

- `drop_after_commit`: relay the COMMIT, wait for the server's ReadyForQuery (the transaction
  has landed), then close the client's socket without relaying the answer. The client sees
  its connection die during COMMIT: the outcome is unknown to it, and the commit landed.
- `drop_before_commit`: close both sockets instead of relaying the COMMIT. The server rolls the
  transaction back; the client sees the same error, and the commit did not land.

After firing, `blackout_s` makes it refuse new connections for a while (a database that stays
unreachable, so the client's own retries run out). Use `sslmode=disable` (see `dsn`): the
proxy reads plaintext only. Runs in background threads; `close()` stops everything.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["PgFaultProxy"]

Mode = Literal["drop_after_commit", "drop_before_commit"]
_PROTOCOL_V3 = 196608


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


class _Link:
    """One client connection and its server connection."""

    def __init__(self, proxy: PgFaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = socket.create_connection(proxy.upstream, timeout=None)
        self.matched = False  # the open transaction ran a statement matching `when`
        self.swallow = False  # after a relayed COMMIT: drop the answer, then cut
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def client_to_server(self) -> None:
        try:
            self._client_to_server()
        except OSError:  # either side closed: the link is over
            pass
        finally:
            if not self.swallow:
                self.close()

    def _client_to_server(self) -> None:
        while True:  # startup: untyped messages until the v3 StartupMessage
            head = _read_exact(self.client, 4)
            if head is None:
                return
            (length,) = struct.unpack("!i", head)
            body = _read_exact(self.client, length - 4) or b""
            self.server.sendall(head + body)
            if struct.unpack("!i", body[:4])[0] == _PROTOCOL_V3:
                break
        while True:
            head = _read_exact(self.client, 5)
            if head is None:
                return
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = _read_exact(self.client, length - 4) or b""
            if kind == b"Q" and self._on_query(body.rstrip(b"\0")):
                continue
            self.server.sendall(head + body)

    def _on_query(self, sql: bytes) -> bool:
        """True if the message was consumed (not relayed)."""
        text = sql.decode(errors="replace").strip()
        upper = text.upper()
        if self.proxy.when.upper() in upper:
            self.matched = True
        if upper not in ("COMMIT", "ROLLBACK", "END"):
            return False
        fire = upper == "COMMIT" and self.matched and self.proxy.take_shot()
        self.matched = False
        if not fire:
            return False
        if self.proxy.mode == "drop_before_commit":
            self.close()
            return True
        self.swallow = True
        return False

    def server_to_client(self) -> None:
        try:
            self._server_to_client()
        except OSError:
            pass
        finally:
            self.close()

    def _server_to_client(self) -> None:
        while True:
            head = _read_exact(self.server, 5)
            if head is None:
                return
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            body = _read_exact(self.server, length - 4) or b""
            if self.swallow:
                if kind == b"Z":  # the COMMIT is done on the server: cut the client off
                    self.proxy.landed += 1
                    return
                continue
            self.client.sendall(head + body)


class PgFaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)  # so `close` is noticed promptly
        self.port = self.listener.getsockname()[1]
        self.mode: Mode = "drop_after_commit"
        self.when = "INSERT INTO trace_versions"
        self.shots = 0
        self.fired = 0
        self.landed = 0  # drop_after_commit shots whose COMMIT the server completed
        self.refused = 0
        self.blackout_s = 0.0
        self._blackout_until = 0.0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def dsn(self, dsn: str) -> str:
        """The same database through the proxy (plaintext, which the proxy can read)."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rsplit("@", 1)[0]
        query = "sslmode=disable&gssencmode=disable"
        return urlunsplit(
            (parts.scheme, f"{userinfo}@127.0.0.1:{self.port}", parts.path, query, "")
        )

    def arm(self, mode: Mode, *, count: int = 1, blackout_s: float = 0.0) -> None:
        with self._lock:
            self.mode, self.shots, self.blackout_s = mode, count, blackout_s

    def take_shot(self) -> bool:
        with self._lock:
            if self.shots <= 0:
                return False
            self.shots -= 1
            self.fired += 1
            self._blackout_until = time.monotonic() + self.blackout_s
            return True

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if time.monotonic() < self._blackout_until:
                self.refused += 1
                client.close()
                continue
            try:
                link = _Link(self, client)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._links.append(link)
            threading.Thread(target=link.client_to_server, daemon=True).start()
            threading.Thread(target=link.server_to_client, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def __enter__(self) -> PgFaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
