"""Dagster's PostgreSQL instance storage, keeping its connections open between statements.

dagster-postgres 0.29 opens a new PostgreSQL connection for every statement outside the
webserver (SQLAlchemy `NullPool`): a run stores each of its events over a fresh connection,
~120 connections for a three-range ingest run, which costs more than the statements
themselves. `PooledPostgresStorage` is the same storage (same tables, same config) with a
small connection pool per storage: one connection kept open, more opened while threads need
them and closed when returned, and recycled hourly. A connection that sat idle for a second or
more is checked before use (`ping_when_idle`), so that a restarted PostgreSQL costs a reconnect
rather than a failed statement; one returned moments ago is not (`pool_pre_ping` would cost a
round trip on each of the hundreds of statements a run makes: its events, partition lookups).
The webserver still installs its own pool over this one (`optimize_for_webserver`).

Its run storage also keeps a backfill launched moments after a reload from being failed by a
daemon that has not yet re-read the definitions (`waits_for_new_definitions`).

Configure it in dagster.yaml with the `postgres_db` block dagster-postgres takes:

    storage:
      custom:
        module: trace_resources.instance.storage
        class: PooledPostgresStorage
        config:
          postgres_db: {...}
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from dagster import DagsterEventType
from dagster._core.event_api import EventLogEntry
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.storage import DagsterPostgresStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

from trace_resources import taps
from trace_resources.storage.pool_ping import ping_when_idle

__all__ = ["PooledPostgresStorage", "POOL_OPTIONS"]

# One connection kept per storage; threads beyond it get overflow connections, closed on return.
# Checked before use only after a second idle (`ping_when_idle`, installed by `_use_pool`).
POOL_OPTIONS: dict[str, Any] = {
    "pool_size": 1,
    "max_overflow": 10,
    "pool_recycle": 3600,
}


class _PooledEngine:
    """Mixin for a dagster-postgres storage: swap its NullPool engine for a pooled one."""

    postgres_url: str
    _engine: sa.Engine
    _token_provider: Any

    def _use_pool(self) -> None:
        null_pool_engine = self._engine
        self._engine = ping_when_idle(
            create_pg_engine(
                self.postgres_url,
                self._token_provider,
                isolation_level="AUTOCOMMIT",
                **POOL_OPTIONS,
            )
        )
        null_pool_engine.dispose()

    def optimize_for_webserver(
        self, statement_timeout: int, pool_recycle: int, max_overflow: int
    ) -> None:
        self._engine.dispose()  # the webserver replaces the engine with its own pool
        super().optimize_for_webserver(  # type: ignore[misc]
            statement_timeout=statement_timeout,
            pool_recycle=pool_recycle,
            max_overflow=max_overflow,
        )

    def dispose(self) -> None:
        super().dispose()  # type: ignore[misc]
        self._engine.dispose()  # close the pooled connections with the instance


# How long a new backfill waits for the daemon to see definitions the webserver already has.
# The daemon re-reads a code location ~1 s after the code server changes (its watch thread),
# and every 60 s regardless (RELOAD_WORKSPACE_INTERVAL); past 90 s the asset really is gone.
NEW_DEFINITIONS_GRACE_S = 90.0
_DEFINITIONS_CHANGED = "DagsterAssetBackfillDataLoadError"


def waits_for_new_definitions(backfill: PartitionBackfill, now: float) -> bool:
    """A backfill the daemon is about to fail only because its own copy of the definitions is
    older than the webserver's: launched moments after a reload (`trace udf apply`, a
    deployment) for an asset the reload added, before the daemon re-read the code location.
    Dagster fails it for good ("Asset ... existed at storage-time, but no longer does",
    dagster-io/dagster#28204), so the user's first Materialize after adding a transform
    would fail. Such a backfill has requested nothing yet and is young; it stays requested and
    the daemon's next tick, with the new definitions, runs it."""
    data = backfill.asset_backfill_data
    return (
        backfill.status == BulkActionStatus.FAILING
        and backfill.error is not None
        and backfill.error.cls_name == _DEFINITIONS_CHANGED
        and data is not None
        and data.requested_subset.is_empty
        and now - backfill.backfill_timestamp < NEW_DEFINITIONS_GRACE_S
    )


class PooledPostgresRunStorage(_PooledEngine, PostgresRunStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()

    def update_backfill(self, partition_backfill: PartitionBackfill) -> None:
        if waits_for_new_definitions(partition_backfill, time.time()):
            partition_backfill = (  # as it was: requested, no error, no failure counted
                partition_backfill.with_status(BulkActionStatus.REQUESTED)
                .with_error(None)
                .with_failure_count(max(0, partition_backfill.failure_count - 1))
            )
        super().update_backfill(partition_backfill)


class PooledPostgresEventLogStorage(_PooledEngine, PostgresEventLogStorage):
    _tables_present: frozenset[str] = frozenset()  # until the first table is seen

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()

    def has_table(self, table_name: str) -> bool:
        # dagster asks before writing every batch of asset events (a catalog query each time:
        # 82 per 12-range derived run); a table that exists stays, so only a yes is kept (a
        # missing table may be created by `dagster instance migrate` while this process runs)
        if table_name in self._tables_present:
            return True
        present = super().has_table(table_name)
        if present:
            self._tables_present = self._tables_present | {table_name}
        return present

    def store_event(self, event: EventLogEntry) -> None:
        super().store_event(event)
        if not getattr(_batching, "active", False):
            _tap_run_events([event])

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        # a batch stored through `store_event` one at a time is offered to the taps once, here
        _batching.active = True
        try:
            self._store_event_batch(events)
        finally:
            _batching.active = False
        _tap_run_events(events)

    def _store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        # A run's planned events (one per asset partition and per check, written when the run
        # is created: 50 for a 12-range derived run) reach dagster-postgres as one batch, which
        # it stores one event at a time (insert, NOTIFY, index transaction each). Stored here
        # as its materialisation batches are: one insert, one index transaction.
        types = {event.get_dagster_event().event_type for event in events}
        if len(events) < 2 or not types <= _PLANNED:
            super().store_event_batch(events)
            return
        with self._connect() as conn:
            result = conn.execute(
                self.prepare_insert_event_batch(events).returning(SqlEventLogStorageTable.c.id)
            )
            ids = [int(row[0]) for row in result.fetchall()]
        asset_events = [
            (event, event_id)
            for event, event_id in zip(events, ids, strict=True)
            if event.dagster_event_type in ASSET_EVENTS and event.get_dagster_event().asset_key
        ]
        if asset_events:
            with self.index_transaction() as conn:
                self._store_asset_event_tags(
                    conn, [e for e, _ in asset_events], [i for _, i in asset_events]
                )
                # the asset row keeps the last event per asset, as dagster-postgres's
                # materialisation batches do
                last = {e.get_dagster_event().asset_key: (e, i) for e, i in asset_events}
                for event, event_id in last.values():
                    self._store_asset_event(conn, event, event_id)
        for event, event_id in zip(events, ids, strict=True):
            if event.dagster_event_type in ASSET_CHECK_EVENTS:
                self.store_asset_check_event(event, event_id)


_batching = threading.local()


def _tap_run_events(events: Sequence[EventLogEntry]) -> None:
    """Offer stored run events to the `runs` wire taps (non-blocking; selected by job)."""
    for entry in events:
        if not entry.run_id:
            continue
        dagster_event = entry.dagster_event
        taps.offer(
            "runs",
            {
                "run_id": entry.run_id,
                "job_name": entry.job_name,
                "timestamp": entry.timestamp,
                "level": entry.level,
                "event_type": dagster_event.event_type.name if dagster_event else None,
                "step_key": entry.step_key,
                "message": entry.user_message or (dagster_event.message if dagster_event else ""),
            },
            selector=entry.job_name,
        )


_PLANNED = {
    DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
    DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
}


class PooledPostgresScheduleStorage(_PooledEngine, PostgresScheduleStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()


class PooledPostgresStorage(DagsterPostgresStorage):
    """`DagsterPostgresStorage` whose run, event-log and schedule storages pool connections."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        # DagsterPostgresStorage.__init__ with the pooled storages in place of its own
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        self._run_storage = PooledPostgresRunStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._event_log_storage = PooledPostgresEventLogStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._schedule_storage = PooledPostgresScheduleStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        super(DagsterPostgresStorage, self).__init__()

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
