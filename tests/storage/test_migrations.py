"""The Alembic migrations of Postgres state and data: a database that `create_all` made before
migrations keeps every row through the upgrade, the head schema is what the Table objects
declare, and an un-migrated database is refused until `trace db upgrade` runs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from infra.local.services import PostgresServer
from tests.conftest import NewDatabase
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.errors import SchemaNotCurrentError
from trace_resources.storage import migrations
from trace_resources.storage import state as t
from trace_resources.storage.records import FileEntry, Manifest
from trace_resources.storage.state import dispose_engine, engine_for
from trace_resources.storage.version_store import VersionStore

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_CLI = Path(sys.executable).with_name("trace")
_counter = itertools.count()
BASELINES: dict[migrations.Database, str] = {"state": "state_0001", "data": "data_0001"}
# tables that revisions after the baselines add (a create_all database never had them)
ADDED_AFTER_BASELINE: dict[migrations.Database, set[str]] = {
    "state": {
        "trace_segments",
        "trace_segment_keys",
        "trace_udf_versions",
        "trace_enrichments",
        "trace_quarantine",
        "trace_iceberg_published",
        "trace_tap_producers",
        "trace_promotions",
        "trace_leases",
        "trace_trigger_calls",
        "trace_trigger_objects",
        "trace_event_history",
        "trace_dashboards",
        "trace_dashboard_versions",
        "trace_dashboard_embeds",
    },
    "data": {
        "trace_alert_delivery_attempts",
        "trace_event_history",
        "trace_alert_composite_events",
        "trace_alert_composite_ranges",
        "trace_alert_composite_firings",
    },
}


def state_metadata() -> sa.MetaData:
    """Every table of Postgres state, from the modules that own them (each defines its tables
    on `state.metadata`; a module left out here fails the comparison below)."""
    from trace_resources import event_history, leases  # noqa: F401  (history; leader leases)
    from trace_resources.storage import (  # noqa: F401
        access,
        dashboards,
        enrichments,
        exports,
        iceberg,
        promotions,
        quarantine,
        rate_limits,
        saved_queries,
        snapshots,
        state,
        taps,
        triggers,
        udfs,
    )

    return state.metadata


def data_metadata() -> sa.MetaData:
    """Every table of Postgres data, from the modules that own them."""
    from trace_resources import event_history  # noqa: F401  (the alerts' hops)
    from trace_resources.alert_pipeline import (  # noqa: F401
        composite,  # correlation state of composite rules
        resource,  # the evaluation ledger
    )

    return alert_tables.metadata


METADATA = {"state": state_metadata, "data": data_metadata}


@pytest.fixture
def empty_database(postgres: PostgresServer) -> Iterator[str]:
    """A database with no tables at all (what `ensure_databases` makes), and its DSN."""
    name = f"plain_{os.getpid()}_{next(_counter)}"
    postgres.psql(f'CREATE DATABASE "{name}" OWNER trace')
    yield postgres.dsn(name)
    dispose_engine(postgres.dsn(name))


def _rows(dsn: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every Trace table, in a comparable order."""
    engine = sa.create_engine(dsn, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            names = [
                n
                for n in sa.inspect(conn).get_table_names()
                if n.startswith("trace_") and n != migrations.VERSION_TABLE
            ]
            return {
                n: [
                    dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {n} ORDER BY 1"))
                ]
                for n in names
            }
    finally:
        engine.dispose()


_SAMPLE_VALUES = {
    "text": "'sample'",
    "integer": "7",
    "bigint": "7",
    "boolean": "true",
    "double precision": "0.5",
    "jsonb": """'{"k": 1}'""",
    "uuid": "'6f1c2d3e-0000-4000-8000-000000000001'",
    "timestamp with time zone": "'2026-12-01T00:00:00Z'",
}


def _insert_a_row_everywhere(dsn: str) -> None:
    """One row in every table, every column given a value of its type."""
    engine = sa.create_engine(dsn, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            columns = conn.execute(
                sa.text(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
                )
            ).all()
            for table, cols in itertools.groupby(columns, key=lambda c: c.table_name):
                cols = list(cols)
                names = ", ".join(c.column_name for c in cols)
                values = ", ".join(_SAMPLE_VALUES[c.data_type] for c in cols)
                conn.execute(sa.text(f"INSERT INTO {table} ({names}) VALUES ({values})"))
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["state", "data"])
def test_upgrade_of_the_create_all_schema_keeps_every_row(
    postgres: PostgresServer, empty_database: str, database: migrations.Database
) -> None:
    dbname = sa.make_url(empty_database).database
    assert dbname is not None
    ddl = (FIXTURES / f"schema_before_migrations_{database}.sql").read_text()
    postgres.psql("SET ROLE trace;\n" + ddl, dbname)  # owned by the application, as in use
    _insert_a_row_everywhere(empty_database)
    before = _rows(empty_database)
    assert set(before) == set(METADATA[database]().tables) - ADDED_AFTER_BASELINE[database]
    assert all(len(rows) == 1 for rows in before.values())
    assert migrations.current(empty_database) is None

    assert migrations.upgrade(empty_database, database) == migrations.head(database)

    after = _rows(empty_database)
    # every row kept, with every value it had (columns added since are new, at the end)
    kept = {
        name: [{k: row[k] for k in before[name][0]} for row in rows]
        for name, rows in after.items()
        if name in before
    }
    assert kept == before
    assert set(after) - set(before) == ADDED_AFTER_BASELINE[database]
    assert migrations.current(empty_database) == migrations.head(database)
    assert _schema_differences(empty_database, database) == []


def test_upgrade_creates_the_tables_a_create_all_database_lacks(
    postgres: PostgresServer, empty_database: str
) -> None:
    """A state database whose query service never ran has only the version store's tables."""
    dbname = sa.make_url(empty_database).database
    assert dbname is not None
    ddl = (FIXTURES / "schema_before_migrations_state.sql").read_text()
    postgres.psql("SET ROLE trace;\n" + ddl, dbname)
    postgres.psql(
        "DROP TABLE trace_query_revoked_tokens, trace_query_public_datasets,"
        " trace_query_snapshots, trace_query_saved_queries, trace_query_exports,"
        " trace_query_rate_buckets, trace_outbox",
        dbname,
    )

    migrations.upgrade(empty_database, "state")

    assert _schema_differences(empty_database, "state") == []


def _schema_differences(dsn: str, database: migrations.Database) -> list[Any]:
    engine = sa.create_engine(dsn, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": lambda obj, name, kind, *_: name != migrations.VERSION_TABLE,
                },
            )
            return list(compare_metadata(context, METADATA[database]()))
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["state", "data"])
def test_head_schema_is_what_the_table_definitions_declare(
    new_database: NewDatabase, database: migrations.Database
) -> None:
    dsn = new_database(f"head_{database}_{os.getpid()}_{next(_counter)}", database)
    assert _schema_differences(dsn, database) == []


def _schema_dump(postgres: PostgresServer, dsn: str) -> list[str]:
    """The DDL of a database as pg_dump writes it, without comments and the version table."""
    dump = subprocess.run(
        [
            str(postgres.bin_dir / "pg_dump"),
            *("--schema-only", "--no-owner", "--no-privileges"),
            f"--exclude-table={migrations.VERSION_TABLE}",
            *("-h", str(postgres.socket_dir), "-p", str(postgres.port), "-U", "postgres"),
            str(sa.make_url(dsn).database),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        line
        for line in dump.splitlines()
        if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    ]


@pytest.mark.parametrize("database", ["state", "data"])
def test_baseline_makes_exactly_the_schema_create_all_made(
    postgres: PostgresServer, empty_database: str, database: migrations.Database
) -> None:
    """Down to what the Table comparison does not see: UNLOGGED, identity columns."""
    dsn = empty_database
    migrations.upgrade(dsn, database, BASELINES[database])
    fixture = (FIXTURES / f"schema_before_migrations_{database}.sql").read_text()
    expected = [line for line in fixture.splitlines() if line.strip() and not line.startswith("--")]
    assert _schema_dump(postgres, dsn) == expected


def _trace(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    return subprocess.run(
        [str(TRACE_CLI), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_unmigrated_database_is_refused_until_trace_db_upgrade(
    postgres: PostgresServer, empty_database: str
) -> None:
    data_dsn = empty_database.replace("/plain_", "/plaindata_")
    postgres.psql(f'CREATE DATABASE "{sa.make_url(data_dsn).database}" OWNER trace')
    opened = (lambda: engine_for(empty_database), lambda: alert_tables.data_engine(data_dsn))
    for open_engine in opened:
        with pytest.raises(SchemaNotCurrentError, match="has no Trace schema version") as refused:
            open_engine()
        assert "Run `trace db upgrade" in str(refused.value)
        assert "make services-up" in str(refused.value)
        assert f":{postgres.password}@" not in str(refused.value)

    dsns = ["--state-dsn", empty_database, "--data-dsn", data_dsn]
    behind = _trace("db", "current", *dsns)
    assert behind.returncode == 1, behind.stderr
    assert "state" in behind.stdout and "not migrated" in behind.stdout

    upgraded = _trace("db", "upgrade", *dsns)
    assert upgraded.returncode == 0, upgraded.stderr
    for database in ("state", "data"):
        assert f"{migrations.head(database)} (head)" in upgraded.stdout
    assert f":{postgres.password}@" not in upgraded.stdout

    current = _trace("db", "current", *dsns)
    assert current.returncode == 0, current.stderr
    assert current.stdout == upgraded.stdout
    with engine_for(empty_database).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trace_datasets")).scalar() == 0
    with alert_tables.data_engine(data_dsn).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trace_alert_rules")).scalar() == 0


def test_database_behind_is_refused_and_one_a_newer_release_migrated_is_accepted(
    empty_database: str,
) -> None:
    """A rolling deploy: the release before keeps running on a schema a newer release
    extended; code never runs on a schema older than it needs."""
    migrations.upgrade(empty_database, "state")
    with sa.create_engine(empty_database, poolclass=sa.NullPool).begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = 'state_9999'"))
    engine_for(empty_database)  # a revision this code does not know: a newer release's
    dispose_engine(empty_database)

    current = _trace("db", "current", "--database", "state", "--state-dsn", empty_database)
    assert current.returncode == 0, current.stderr
    assert "state_9999 (newer than this code's" in current.stdout

    # another database's revision, or one older than the code, is not a newer release's
    for revision in ("data_0001", "state_0000", "not_a_revision"):
        with sa.create_engine(empty_database, poolclass=sa.NullPool).begin() as conn:
            conn.execute(
                sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = :r"), {"r": revision}
            )
        with pytest.raises(SchemaNotCurrentError, match=f"is at revision {revision}"):
            engine_for(empty_database)
        behind = _trace("db", "current", "--database", "state", "--state-dsn", empty_database)
        assert behind.returncode == 1 and "run `trace db upgrade`" in behind.stdout

    with sa.create_engine(empty_database, poolclass=sa.NullPool).begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {migrations.VERSION_TABLE}"))
    with pytest.raises(SchemaNotCurrentError, match="has no Trace schema version"):
        engine_for(empty_database)


def test_state_0002_keeps_appends_of_the_old_manifest_format_idempotent(
    empty_database: str,
) -> None:
    """An append version written before segments were rows (its segments in the manifest):
    after the upgrade its keys still make a retried append a no-op, and appends go on."""
    migrations.upgrade(empty_database, "state", "state_0001")
    old = FileEntry("audit_log/__all__/a/part-00000.parquet", 10, "0" * 64, 2)
    engine = sa.create_engine(empty_database, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                t.versions.insert().values(
                    dataset="audit_log",
                    partition_key="__all__",
                    version=1,
                    attempt_id="6f1c2d3e-0000-4000-8000-000000000001",
                    commit_mode="append",
                    schema_version=1,
                    manifest={
                        "files": [old.as_dict()],
                        "schema_hash": "h",
                        "source": None,
                        "segments": [
                            {"segment_key": "a", "keys": ["a", "b"]},
                            {"segment_key": "c"},  # the oldest format: one key, no list
                        ],
                    },
                    row_count=2,
                    byte_count=10,
                )
            )
            conn.execute(
                t.pointers.insert().values(
                    dataset="audit_log", partition_key="__all__", current_version=1
                )
            )
    finally:
        engine.dispose()
    migrations.upgrade(empty_database, "state")

    versions = VersionStore(engine_for(empty_database))
    assert versions.read.appended_keys("audit_log", "__all__") == {"a", "b", "c"}
    schema = pa.schema([("id", pa.int64())])
    new = FileEntry("audit_log/__all__/b/part-00000.parquet", 12, "1" * 64, 3)
    for keys, already in ((["b", "c"], True), (["d"], False)):
        [attempt] = versions.attempts.begin_many("audit_log", ["__all__"], mode="append")
        result = versions.commits.commit(
            attempt, Manifest([new], "h"), schema, mode="append", segment_keys=keys
        )
        assert result.already_committed is already
    current = versions.read.current_versions("audit_log")["__all__"]
    assert current.version == 2 and current.manifest.files == [old, new]
    assert current.manifest.rows == 5
    assert versions.read.appended_keys("audit_log", "__all__") == {"a", "b", "c", "d"}
