"""Check a pooled connection before use only when it sat idle: `pool_pre_ping` costs a round
trip on every checkout, which the query service pays several times per request. A connection
returned to the pool less than `idle_s` ago was working then; one idle longer (a restarted or
failed-over PostgreSQL, a connection cut by a proxy) is pinged, and a dead one is replaced
before the caller sees it (SQLAlchemy's `DisconnectionError` from a checkout event makes the
pool open a new connection)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

__all__ = ["ping_when_idle"]

_RETURNED = "trace_returned_at"


def ping_when_idle(engine: sa.Engine, idle_s: float = 1.0) -> sa.Engine:
    """Install the check on `engine`'s pool (created without `pool_pre_ping`)."""

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get(_RETURNED, 0.0) < idle_s:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            if not getattr(dbapi_connection, "autocommit", True):
                dbapi_connection.rollback()  # the ping opened a transaction: leave none behind
        except Exception as error:
            raise exc.DisconnectionError(f"a pooled connection is gone: {error}") from error

    return engine
