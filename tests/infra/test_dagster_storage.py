"""Trace's pooled Dagster storage: it answers "does this table exist" from memory once it has
seen the table, but never remembers a missing one (a migration may create it meanwhile), and it
stores a run's planned events as one batch that leaves Dagster's tables as dagster-postgres's
one-at-a-time path does."""

import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.errors import DagsterAssetBackfillDataLoadError
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._utils.error import SerializableErrorInfo, serializable_error_info_from_exc_info

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
POOLED = "trace_resources.instance.storage.PooledPostgresStorage"


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


# -- a backfill launched before the daemon re-read the definitions ----------------------------


def _definitions_changed_error() -> SerializableErrorInfo:
    """What the backfill daemon records when its copy of the definitions lacks the asset."""
    try:
        raise DagsterAssetBackfillDataLoadError(
            "Asset AssetKey(['ranged']) existed at storage-time, but no longer does. "
        )
    except DagsterAssetBackfillDataLoadError:
        return serializable_error_info_from_exc_info(sys.exc_info())


# raised inside dagster 1.13.27's own AssetBackfillData.from_asset_partitions
@pytest.mark.filterwarnings("ignore:Function `AssetSelection.sources` is deprecated")
def test_a_new_backfill_waits_for_the_daemon_to_see_a_reloaded_asset(
    state_dsn: str, tmp_path: Path
) -> None:
    """The daemon's "existed at storage-time, but no longer does" on a backfill launched moments
    after a reload leaves it requested, so its next tick runs it; an old backfill, one that has
    already requested runs, or any other error still fails as Dagster fails it."""
    url = state_dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    graph = dg.Definitions(assets=[ranged]).get_repository_def().asset_graph
    now = time.time()
    with _instance(tmp_path / "home", url, POOLED) as instance:
        instance.add_dynamic_partitions(PARTITIONS, KEYS)

        def launched(backfill_id: str, at: float) -> PartitionBackfill:
            backfill = PartitionBackfill.from_asset_partitions(
                backfill_id=backfill_id,
                asset_graph=graph,
                partition_names=KEYS[:1],
                asset_selection=[dg.AssetKey("ranged")],
                backfill_timestamp=at,
                tags={},
                dynamic_partitions_store=instance,
                all_partitions=False,
                title=None,
                description=None,
                run_config=None,
            )
            instance.add_backfill(backfill)
            return backfill

        def daemon_fails(backfill: PartitionBackfill, error: SerializableErrorInfo) -> str:
            instance.update_backfill(  # as dagster._daemon.backfill does on an iteration's error
                backfill.with_status(BulkActionStatus.FAILING)
                .with_error(error)
                .with_failure_count(backfill.failure_count + 1)
            )
            stored = instance.get_backfill(backfill.backfill_id)
            assert stored is not None
            return stored.status.value

        stale = _definitions_changed_error()
        young = launched("young", now)
        assert daemon_fails(young, stale) == "REQUESTED"
        kept = instance.get_backfill("young")
        assert kept is not None and kept.error is None and kept.failure_count == 0

        assert daemon_fails(launched("old", now - 600), stale) == "FAILING"
        other = _definitions_changed_error()._replace(cls_name="DagsterInvariantViolationError")
        assert daemon_fails(launched("other", now), other) == "FAILING"
        started = launched("started", now)
        data = started.asset_backfill_data
        assert data is not None
        started = started.with_asset_backfill_data(
            data._replace(requested_subset=data.target_subset),
            dynamic_partitions_store=instance,
            asset_graph=graph,
        )
        assert daemon_fails(started, stale) == "FAILING"
