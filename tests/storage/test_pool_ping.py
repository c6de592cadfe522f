"""Pooled connections are checked before use only after sitting idle (`ping_when_idle`): a
connection the server dropped while it was idle is replaced before the caller sees it, and a
busy pool pays no extra round trip per checkout."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from trace_resources.storage.pool_ping import ping_when_idle


def test_a_connection_dropped_while_idle_is_replaced_before_use(state_dsn: str) -> None:
    engine = ping_when_idle(sa.create_engine(state_dsn, pool_size=1, max_overflow=0), idle_s=0.2)
    admin = sa.create_engine(state_dsn, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as conn:  # the server ends the pooled connection (a restart, a proxy)
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        time.sleep(0.3)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()
        admin.dispose()


def test_a_connection_used_moments_ago_is_not_pinged(state_dsn: str) -> None:
    """The trade-off: a connection returned less than `idle_s` ago is trusted, so one the
    server dropped within that time fails its statement once (SQLAlchemy then replaces the
    pool's connections) instead of costing every checkout a round trip."""
    engine = ping_when_idle(sa.create_engine(state_dsn, pool_size=1, max_overflow=0), idle_s=30)
    admin = sa.create_engine(state_dsn, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        time.sleep(0.1)
        with pytest.raises(sa.exc.DBAPIError) as failed, engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert failed.value.connection_invalidated
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()
        admin.dispose()
