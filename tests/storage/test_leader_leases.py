"""Leader leases on real PostgreSQL: one holder at a time, a token that grows at each takeover,
expiry by the database clock, and a fenced write that refuses, in its own transaction, a copy
that lost the lease (it writes nothing). `trace leases` shows who holds what.

(The same against real processes paused with SIGSTOP: tests/head/test_leader_lease.py.)
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from trace_assets.cli import main as trace_cli
from trace_resources.errors import ConfigError, LeaseLostError
from trace_resources.leases import LeaderLease, bounded_transactions, lease_rows
from trace_resources.settings import Settings
from trace_resources.storage.state import engine_for

NAME = "test-singleton"


def wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s  # against hangs only: nothing asserts a duration
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def append(engine: sa.Engine, lease: LeaderLease, n: int) -> None:
    """A singleton's write: one row, committed only if `lease` still holds (checked in the
    same transaction)."""
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO appended (n) VALUES (:n)"), {"n": n})
        lease.check(conn)


def appended(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r.n for r in conn.execute(sa.text("SELECT n FROM appended ORDER BY n"))]


def test_a_copy_that_lost_its_lease_writes_nothing_and_the_token_only_grows(
    state_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = engine_for(state_dsn)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE appended (n int PRIMARY KEY)"))
    first = LeaderLease(engine, NAME, lease_s=1.0, renew_s=0.2, holder="copy-a")
    second = LeaderLease(engine, NAME, lease_s=1.0, renew_s=0.2, holder="copy-b")
    stop = threading.Event()
    try:
        assert first.acquire(stop)
        assert first.token == 1
        assert second.try_acquire() is None  # held, and renewed past its first second
        time.sleep(1.5)
        assert second.try_acquire() is None
        append(engine, first, 1)

        first._stop_renewer()  # the leader stalls: nobody renews its lease any more
        assert second.acquire(stop)  # the standby takes over once it expires
        assert second.token == 2
        with pytest.raises(LeaseLostError, match=r"held by copy-b with token 2") as refused:
            append(engine, first, 2)  # the old leader's late write
        assert "nothing written" in str(refused.value)
        assert not first.held()
        assert not first.renew()  # the old leader's renewal can not take it back either
        append(engine, second, 3)
        assert appended(engine) == [1, 3]

        monkeypatch.setenv("TRACE_STATE_DSN", state_dsn)
        capsys.readouterr()
        assert trace_cli(["leases", "--json"]) == 0
        [shown] = json.loads(capsys.readouterr().out)
        assert (shown["name"], shown["holder"], shown["token"], shown["live"]) == (
            NAME,
            "copy-b",
            2,
            True,
        )
        assert trace_cli(["leases"]) == 0
        line = capsys.readouterr().out.splitlines()[1].split()
        assert line[:3] == [NAME, "copy-b", "2"]

        second.release()  # given up: the next copy takes it at once, with a new token
        first.step_down()
        assert first.try_acquire() == 3
        [row] = lease_rows(engine)
        assert (row.holder, row.token, row.live) == ("copy-a", 3, True)
    finally:
        stop.set()
        first.release()
        second.release()


def test_a_holder_paused_inside_its_write_transaction_does_not_block_the_next_one(
    state_dsn: str,
) -> None:
    """A holder that stops between its check and its COMMIT: Postgres ends its session after a
    lease of idleness (its share lock goes), so the standby takes over; the write never lands."""
    bounded = bounded_transactions(state_dsn, 1.0)
    engine = sa.create_engine(bounded, poolclass=sa.NullPool)
    other = engine_for(state_dsn)
    with other.begin() as conn:
        conn.execute(sa.text("CREATE TABLE appended (n int PRIMARY KEY)"))
    first = LeaderLease(engine, NAME, lease_s=1.0, renew_s=0.2, holder="copy-a")
    second = LeaderLease(other, NAME, lease_s=1.0, renew_s=0.2, holder="copy-b")
    stop = threading.Event()
    conn = engine.connect()
    try:
        assert first.try_acquire() == 1
        first._stop_renewer()
        conn.execute(sa.text("INSERT INTO appended (n) VALUES (1)"))
        first.check(conn)  # ... and the holder pauses here, its transaction open
        assert second.acquire(stop)
        assert second.token == 2
        with pytest.raises(sa.exc.OperationalError):
            conn.commit()
        assert appended(other) == []
    finally:
        stop.set()
        conn.close()
        engine.dispose()
        second.release()


def test_a_holder_whose_process_died_is_taken_over_at_once(state_dsn: str) -> None:
    """Its session ended (as when the kernel closes a killed process's socket): no need to wait
    for the lease (a minute here) to expire."""
    engine = engine_for(state_dsn)
    first = LeaderLease(engine, NAME, lease_s=60, renew_s=20, holder="copy-a")
    second = LeaderLease(engine, NAME, lease_s=60, renew_s=20, holder="copy-b")
    try:
        assert first.try_acquire() == 1
        assert second.try_acquire() is None
        first._stop_renewer()
        assert first._conn is not None
        first._conn.invalidate()  # its connection closed: the backend ends
        wait_for(lambda: second.try_acquire() is not None, "the takeover")
        [row] = lease_rows(engine)
        assert (row.holder, row.token, row.live) == ("copy-b", 2, True)
    finally:
        second.release()


def test_a_renew_interval_not_below_the_lease_is_refused() -> None:
    engine = sa.create_engine("postgresql+psycopg2://trace@127.0.0.1/unused")  # never connects
    with pytest.raises(ConfigError, match="must be above 0 and below the lease length"):
        LeaderLease(engine, NAME, lease_s=2.0, renew_s=2.0)
    with pytest.raises(
        ValueError, match="TRACE_LEADER_RENEW_S=20 must be below TRACE_LEADER_LEASE"
    ):
        Settings(leader_lease_s=15, leader_renew_s=20)
