"""Trace's pooled Dagster storage: it answers "does this table exist" from memory once it has
seen the table, but never remembers a missing one (a migration may create it meanwhile), and it
stores a run's planned events as one batch that leaves Dagster's tables as dagster-postgres's
one-at-a-time path does."""

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from infra.local.services import PostgresServer
from trace_resources.instance.storage import PooledPostgresEventLogStorage


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


# -- planned events stored as one batch ------------------------------------------------------

PARTITIONS = "storage_test_ranges"
PARTS = dg.DynamicPartitionsDefinition(name=PARTITIONS)
KEYS = ["r1", "r2", "r3"]


@dg.asset(
    partitions_def=PARTS,
    check_specs=[dg.AssetCheckSpec("rows_present", asset="ranged")],
)
def ranged(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    if context.run.tags.get("fail") == "yes":
        raise RuntimeError("failing on purpose")
    return dg.MaterializeResult(
        check_results=[dg.AssetCheckResult(check_name="rows_present", passed=True)]
    )


def _instance(home: Path, url: str, storage_class: str) -> dg.DagsterInstance:
    home.mkdir()
    module, cls = storage_class.rsplit(".", 1)
    parsed = sa.make_url(url)
    postgres_db = {
        "username": parsed.username,
        "password": parsed.password,
        "hostname": parsed.host,
        "port": parsed.port,
        "db_name": parsed.database,
        "scheme": "postgresql+psycopg2",
    }
    (home / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "custom": {
                        "module": module,
                        "class": cls,
                        "config": {"postgres_db": postgres_db},
                    }
                },
                "telemetry": {"enabled": False},
            }
        )
    )
    return dg.DagsterInstance.from_config(str(home))


def _index_state(url: str, last_run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """What Dagster's readers use, without ids, run ids and timestamps."""
    queries = {
        "event_logs": "SELECT dagster_event_type, asset_key, partition, step_key FROM event_logs",
        "asset_keys": "SELECT asset_key, last_run_id = :last_run_id FROM asset_keys",
        "asset_event_tags": (  # a data version hashes the run id
            "SELECT key, CASE WHEN key = 'dagster/data_version' THEN 'hash' ELSE value END, "
            "asset_key FROM asset_event_tags"
        ),
        "asset_check_executions": (
            "SELECT asset_key, check_name, partition, execution_status, "
            "evaluation_event_storage_id IS NOT NULL FROM asset_check_executions"
        ),
    }
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table: sorted(
                    (
                        tuple(row)
                        for row in conn.execute(sa.text(sql), {"last_run_id": last_run_id})
                    ),
                    key=repr,
                )
                for table, sql in queries.items()
            }
    finally:
        engine.dispose()


def test_planned_events_batch_leaves_what_dagster_postgres_leaves(
    state_dsn: str, postgres: PostgresServer, tmp_path: Path
) -> None:
    """A ranged run's planned events (one per partition and per check) are stored as one batch
    by the pooled storage; Dagster's tables must end up as dagster-postgres leaves them, for a
    run that succeeds and one that fails after planning."""
    other = f"{sa.make_url(state_dsn).database}_plain"
    postgres.psql(f'CREATE DATABASE "{other}" OWNER trace')
    plain_dsn = str(sa.make_url(state_dsn).set(database=other).render_as_string(False))
    urls = {"pooled": state_dsn, "plain": plain_dsn}
    classes = {
        "pooled": "trace_resources.instance.storage.PooledPostgresStorage",
        "plain": "dagster_postgres.DagsterPostgresStorage",
    }
    stored: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
    batches: list[int] = []
    real_batch = PooledPostgresEventLogStorage.store_event_batch

    def counting(self: PooledPostgresEventLogStorage, events: Any) -> None:
        batches.append(len(events))
        real_batch(self, events)

    for name in ("pooled", "plain"):
        url = urls[name].replace("postgresql://", "postgresql+psycopg2://", 1)
        with (
            _instance(tmp_path / name, url, classes[name]) as instance,
            pytest.MonkeyPatch.context() as mp,
        ):
            mp.setattr(PooledPostgresEventLogStorage, "store_event_batch", counting)
            mp.setenv("DAGSTER_EVENT_BATCH_SIZE", "1000")  # as trace_assets.definitions sets it
            instance.add_dynamic_partitions(PARTITIONS, KEYS)
            ranged_tags = {
                ASSET_PARTITION_RANGE_START_TAG: KEYS[0],
                ASSET_PARTITION_RANGE_END_TAG: KEYS[-1],
            }
            assert dg.materialize([ranged], instance=instance, tags=ranged_tags).success
            failed = dg.materialize(
                [ranged],
                instance=instance,
                tags={**ranged_tags, "fail": "yes"},
                raise_on_error=False,
            )
            assert not failed.success
        stored[name] = _index_state(url, failed.run_id)
        planned = [
            row[2]
            for row in stored[name]["event_logs"]
            if row[0] == "ASSET_MATERIALIZATION_PLANNED"
        ]
        assert sorted(planned) == sorted(KEYS * 2)  # one per partition, for both runs
        if name == "pooled":
            assert 4 in batches  # 3 partitions + 1 check planned in one batch, per run
    assert stored["pooled"] == stored["plain"]
