"""Leader leases with fencing tokens: one acting copy of each singleton (the head follower, the
outbox relay, ...) however many copies run.

A lease is one row of `trace_leases` per singleton name: who holds it, a fencing token and when
it expires, by the clock of Postgres state (never the holders' clocks). A copy that finds the
lease expired takes it in one statement that also increments the token, so tokens only grow per
name and each holder has its own. The holder renews the lease from a background thread every
`renew_s`; a copy that stops renewing (paused with SIGSTOP, hung, cut off from Postgres) lets
it expire, and a standby copy takes over within about `lease_s`. A holder that renews from a
thread also keeps a session of its own open and records its backend pid: once that session
has ended (its process died: the kernel closed its socket), a standby takes over at once
instead of waiting out the lease. A paused process keeps its session, so only expiry frees it.

An expired lease alone does not stop a paused holder that wakes up: it still believes it leads.
So every write of a singleton checks its token IN THE SAME TRANSACTION as the write
(`LeaderLease.check`, first thing in the transaction, e.g. as the commit's `guard`): the lease
row is read `FOR SHARE`, which a takeover (an UPDATE of that row) waits for, and the write is
refused with `LeaseLostError`, rolling back everything the transaction did, unless the row
still carries this holder's token and has not expired. The same check bounds how long that
transaction may sit idle (`idle_in_transaction_session_timeout`, one lease): a holder paused
inside it has its session ended by Postgres, releasing its row locks, instead of blocking the
new holder for ever. `bounded_transactions(dsn, seconds)` applies the same bound to every
transaction of an engine (the follower's).

Anchors: Kleppmann's fencing tokens ("How to do distributed locking"), Chubby's sequencers, and
the attempt fences of the commit protocol (`storage/attempts.py`), whose style this follows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.errors import ConfigError, LeaseLostError
from trace_resources.storage import state as t
from trace_resources.storage.records import interval

__all__ = [
    "LeaderLease",
    "LeaseRow",
    "bounded_transactions",
    "default_holder",
    "lease_rows",
    "leases",
    "process_lease",
]

log = logging.getLogger(__name__)

leases = sa.Table(
    "trace_leases",
    t.metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    # the Postgres backend of the holder's own session (None: it keeps none, e.g. a sensor)
    sa.Column("holder_pid", sa.Integer, nullable=True),
)

# a standby's takeover waits at most this long for a holder's commit that has the row locked
_LOCK_TIMEOUT_MS = 1000


@dataclass(frozen=True)
class LeaseRow:
    """One lease as Postgres has it now (`trace leases`)."""

    name: str
    holder: str
    token: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    expires_in_s: float  # negative: expired (any standby may take it)

    @property
    def live(self) -> bool:
        return self.expires_in_s > 0


def _holder_session_ended() -> sa.TextClause:
    """The holder kept a session and it has ended (its process died or was cut off)."""
    return sa.text(
        "trace_leases.holder_pid IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM pg_stat_activity a WHERE a.pid = trace_leases.holder_pid)"
    )


def default_holder(role: str = "") -> str:
    """host:pid:random, so two copies on one host (or a restarted pid) never share an id."""
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return f"{role}@{name}" if role else name


def bounded_transactions(dsn: str, seconds: float) -> str:
    """`dsn` with Postgres' `idle_in_transaction_session_timeout` set to `seconds`: a process
    paused inside a transaction (SIGSTOP) has its session ended, and its row locks released,
    instead of holding them until it wakes up."""
    url = sa.engine.make_url(dsn)
    option = f"-c idle_in_transaction_session_timeout={max(1, int(seconds * 1000))}"
    existing = url.query.get("options")
    if isinstance(existing, tuple):
        existing = " ".join(existing)
    options = f"{existing} {option}" if existing else option
    return url.update_query_dict({"options": options}).render_as_string(hide_password=False)


class LeaderLease:
    """One copy's hold on the lease `name`; see the module docstring.

    `acquire(stop)` waits as a standby until it holds the lease; a thread then renews it every
    `renew_s` (with `background=False` the caller renews, e.g. a sensor at each tick).
    `held()` says whether it still does (as far as the last renewal knows); `check(conn)` is
    the authoritative test, in the caller's write transaction. `step_down()` forgets a lease
    lost to another copy; `release()` gives up a lease still held, so a standby
    takes over at once.
    """

    def __init__(
        self,
        engine: sa.Engine,
        name: str,
        *,
        lease_s: float = 15.0,
        renew_s: float | None = None,
        holder: str | None = None,
        background: bool = True,
    ) -> None:
        renew = renew_s if renew_s is not None else lease_s / 3
        if lease_s <= 0 or renew <= 0 or renew >= lease_s:
            raise ConfigError(
                f"leader lease {name!r}: renew interval {renew} s must be above 0 and below the "
                f"lease length {lease_s} s (e.g. TRACE_LEADER_LEASE_S=15 and "
                "TRACE_LEADER_RENEW_S=5)"
            )
        self.engine = engine
        self.name = name
        self.lease_s = lease_s
        self.renew_s = renew
        self.holder = holder or default_holder()
        self.background = background  # renew from a thread (else the caller calls `renew`)
        self.token: int | None = None
        self._lost = threading.Event()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
        self._conn: sa.Connection | None = None  # the holder's own session (background only)
        self._conn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LeaderLease({self.name!r}, holder={self.holder!r}, token={self.token})"

    # -- taking it ---------------------------------------------------------------------------

    def try_acquire(self) -> int | None:
        """Take the lease if it is free or expired (its token incremented); the new token, or
        None while another copy holds it."""
        new = pg_insert(leases).values(
            name=self.name,
            holder=self.holder,
            token=1,
            acquired_at=sa.func.now(),
            renewed_at=sa.func.now(),
            expires_at=sa.func.now() + interval(self.lease_s),
            holder_pid=sa.func.pg_backend_pid() if self.background else None,
        )
        statement = new.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "holder": new.excluded.holder,
                "token": leases.c.token + 1,
                "acquired_at": new.excluded.acquired_at,
                "renewed_at": new.excluded.renewed_at,
                "expires_at": new.excluded.expires_at,
                "holder_pid": new.excluded.holder_pid,
            },
            where=sa.or_(leases.c.expires_at <= sa.func.clock_timestamp(), _holder_session_ended()),
        ).returning(leases.c.token)
        try:
            with self._session() as conn:
                conn.execute(sa.text(f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}"))
                token = conn.execute(statement).scalar_one_or_none()
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) == "55P03":  # lock_not_available
                return None  # the holder is committing: it is alive
            raise
        if token is None:
            return None
        self.token = int(token)
        self._lost.clear()
        if self.background:
            self._start_renewing()
        return self.token

    def acquire(self, stop: threading.Event, poll_s: float | None = None) -> bool:
        """Wait as a standby until this copy holds the lease (True) or `stop` is set (False).
        Polls every `poll_s` (default: the renew interval)."""
        poll = poll_s if poll_s is not None else self.renew_s
        announced = False
        while not stop.is_set():
            try:
                if self.try_acquire() is not None:
                    log.info(
                        "leader lease %s taken by %s with token %d",
                        self.name,
                        self.holder,
                        self.token,
                    )
                    return True
                if not announced:
                    current = self.current()
                    log.info(
                        "leader lease %s held by %s (token %s); standing by",
                        self.name,
                        current.holder if current else "?",
                        current.token if current else "?",
                    )
                    announced = True
            except sa.exc.SQLAlchemyError as exc:
                log.warning("leader lease %s: Postgres unreachable (%s); retrying", self.name, exc)
            stop.wait(poll)
        return False

    # -- keeping it ---------------------------------------------------------------------------

    def renew(self) -> bool:
        """Extend the lease if this copy's token still holds it (even just expired: nobody took
        it meanwhile); False, and `held()` turns False, once another copy has taken it."""
        if self.token is None:
            return False
        with self._session() as conn:
            renewed = conn.execute(
                leases.update()
                .where(leases.c.name == self.name)
                .where(leases.c.token == self.token)
                .where(leases.c.holder == self.holder)
                .values(
                    renewed_at=sa.func.now(),
                    expires_at=sa.func.now() + interval(self.lease_s),
                    holder_pid=sa.func.pg_backend_pid() if self.background else None,
                )
                .returning(leases.c.token)
            ).scalar_one_or_none()
        if renewed is None:
            if not self._lost.is_set():
                current = self.current()
                log.warning(
                    "lost the leader lease %s (token %d): now held by %s with token %s",
                    self.name,
                    self.token,
                    current.holder if current else "nobody",
                    current.token if current else "-",
                )
            self._lost.set()
            return False
        return True

    def held(self) -> bool:
        return self.token is not None and not self._lost.is_set()

    def lead(self) -> str | None:
        """One step of a singleton that runs in ticks (a sensor): renew the lease, or take it
        if it is free. None while this copy leads, else why it stands by."""
        if self.held() and self.renew():
            return None
        self.step_down()
        if self.try_acquire() is not None:
            log.info("leader lease %s taken by %s, token %d", self.name, self.holder, self.token)
            return None
        current = self.current()
        holder = f"{current.holder} (token {current.token})" if current else "another copy"
        return f"standing by: the leader lease {self.name!r} is held by {holder}"

    def check(self, conn: sa.Connection) -> None:
        """The fence, inside the caller's write transaction: raise `LeaseLostError` (the caller's
        transaction then rolls back: nothing is written) unless this copy's token still holds an
        unexpired lease. The row stays share-locked until the transaction ends, so no takeover
        lands between this check and the write's COMMIT."""
        timeout_ms = str(max(1, int(self.lease_s * 1000)))
        row = conn.execute(
            sa.select(
                leases.c.holder,
                leases.c.token,
                (leases.c.expires_at > sa.func.clock_timestamp()).label("live"),
                sa.func.set_config("idle_in_transaction_session_timeout", timeout_ms, True),
            )
            .where(leases.c.name == self.name)
            .with_for_update(read=True)
        ).one_or_none()
        if row is not None and row.token == self.token and row.holder == self.holder and row.live:
            return
        self._lost.set()
        if row is None:
            now = "no copy holds it"
        elif row.token == self.token:
            now = f"it expired at token {row.token} (renewals stalled)"
        else:
            now = f"now held by {row.holder} with token {row.token}"
        raise LeaseLostError(
            f"write refused, nothing written: this copy ({self.holder}, token {self.token}) no "
            f"longer holds the leader lease {self.name!r}: {now}. It steps down and stands by; "
            "if it was paused or stalled for longer than the lease "
            f"({self.lease_s:g} s, TRACE_LEADER_LEASE_S), that is expected"
        )

    # -- giving it up -------------------------------------------------------------------------

    def step_down(self) -> None:
        """Forget a lease another copy has taken (nothing to write: it is theirs now)."""
        self._stop_renewer()
        self.token = None
        self._lost.clear()

    def release(self) -> None:
        """Give the lease up (expire it now) if this copy still holds it, so a standby takes
        over at its next poll instead of after the lease runs out."""
        self._stop_renewer()
        token, self.token = self.token, None
        if token is None:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    leases.update()
                    .where(leases.c.name == self.name)
                    .where(leases.c.token == token)
                    .where(leases.c.holder == self.holder)
                    .values(expires_at=sa.func.now())
                )
        except sa.exc.SQLAlchemyError as exc:  # it runs out by itself
            log.warning("leader lease %s not released (%s); it expires by itself", self.name, exc)
        with self._conn_lock:
            self._close_session()

    @contextmanager
    def _session(self) -> Iterator[sa.Connection]:
        """A transaction on the holder's own session: with `background`, one connection kept
        open while it leads, whose backend pid the lease records, so that a holder whose
        process died (its session ended) is taken over at once, not after the lease; a paused
        holder's session lives on, so it is taken over only once the lease expires."""
        if not self.background:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._conn_lock:
            if self._conn is None:
                self._conn = self.engine.connect()
            conn = self._conn
            try:
                with conn.begin():
                    yield conn
            except sa.exc.OperationalError:
                self._close_session()
                raise

    def _close_session(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def current(self) -> LeaseRow | None:
        rows = lease_rows(self.engine, [self.name])
        return rows[0] if rows else None

    # -- the renewer thread -------------------------------------------------------------------

    def _start_renewing(self) -> None:
        self._stop_renewer()
        self._stop_renewing = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop,
            args=(self._stop_renewing,),
            name=f"lease-renew-{self.name}",
            daemon=True,
        )
        self._renewer.start()

    def _stop_renewer(self) -> None:
        self._stop_renewing.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=10)

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.renew_s):
            try:
                if not self.renew():
                    return
            except sa.exc.SQLAlchemyError as exc:  # keep trying: the writes are fenced anyway
                log.warning("leader lease %s not renewed (%s); retrying", self.name, exc)


_process_leases: dict[tuple[str, str], LeaderLease] = {}
_process_leases_lock = threading.Lock()


def process_lease(engine: sa.Engine, name: str, lease_s: float) -> LeaderLease:
    """This process's copy of the lease `name` on `engine`'s database, kept across calls (a
    sensor's ticks: each one `lead()`s, so no renewal thread)."""
    key = (engine.url.render_as_string(hide_password=True), name)
    with _process_leases_lock:
        lease = _process_leases.get(key)
        if lease is None or lease.lease_s != lease_s:
            lease = LeaderLease(
                engine, name, lease_s=lease_s, holder=default_holder(name), background=False
            )
            _process_leases[key] = lease
        return lease


def lease_rows(engine: sa.Engine, names: list[str] | None = None) -> list[LeaseRow]:
    """Every lease (or those named), by name, with seconds to expiry by the database clock."""
    query = sa.select(
        leases,
        sa.extract("epoch", leases.c.expires_at - sa.func.clock_timestamp()).label("left"),
    ).order_by(leases.c.name)
    if names is not None:
        query = query.where(leases.c.name.in_(names))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        LeaseRow(
            r.name,
            r.holder,
            int(r.token),
            r.acquired_at,
            r.renewed_at,
            r.expires_at,
            float(r.left),
        )
        for r in rows
    ]
