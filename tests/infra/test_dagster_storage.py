"""Trace's pooled Dagster storage answers "does this table exist" from memory once it has
seen the table, but never remembers a missing one (a migration may create it meanwhile)."""

from __future__ import annotations

import sqlalchemy as sa

from trace_resources.dagster_storage import PooledPostgresEventLogStorage


def test_has_table_remembers_present_tables_only(state_dsn: str) -> None:
    url = state_dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    storage = PooledPostgresEventLogStorage(url, should_autocreate_tables=True)
    try:
        assert storage.has_table("event_logs")
        assert not storage.has_table("trace_later_table")
        engine = sa.create_engine(url)
        with engine.begin() as conn:  # what a migration does while the process runs
            conn.execute(sa.text("CREATE TABLE trace_later_table (id int)"))
        engine.dispose()
        assert storage.has_table("trace_later_table")
        assert "event_logs" in storage._tables_present
    finally:
        storage.dispose()
