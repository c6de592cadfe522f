"""Commits whose outcome is unknown (the connection dies around COMMIT, on the real wire) and
storage errors on upload (S3 error responses from a proxy in front of the S3 API)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from infra.local.services import MotoS3Server, PostgresServer
from tests.utils.invariants import InvariantReport, check_invariants, table_of
from tests.utils.pg_fault_proxy import PgFaultProxy
from tests.utils.s3_fault_proxy import S3FaultProxy
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import StagingError
from trace_resources.storage import state as t
from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.gc import GarbageCollector
from trace_resources.storage.object_store import ObjectStore, s3_store
from trace_resources.storage.version_store import VersionStore

KEY = "000000000000-000000000049"


@pytest.fixture
def proxy(postgres: PostgresServer) -> Iterator[PgFaultProxy]:
    with PgFaultProxy("127.0.0.1", postgres.port) as proxy:
        yield proxy


@pytest.fixture
def proxied(proxy: PgFaultProxy, state_dsn: str, versions: VersionStore) -> Iterator[VersionStore]:
    """The version store, reached through the proxy (tables already created directly)."""
    engine = sa.create_engine(proxy.dsn(state_dsn), pool_pre_ping=True)
    yield VersionStore(engine)
    engine.dispose()


def counts(versions: VersionStore) -> tuple[int, int]:
    with versions.engine.connect() as conn:
        return (
            conn.execute(sa.select(sa.func.count()).select_from(t.versions)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).select_from(t.outbox)).scalar_one(),
        )


def test_a_commit_that_landed_while_its_connection_died_is_not_committed_twice(
    proxy: PgFaultProxy,
    proxied: VersionStore,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with DatasetWriter(store, proxied) as writer:
        staged = stage_one(writer, "blocks", KEY, PartitionData(table_of(list(range(7)))))
        proxy.arm("drop_after_commit")
        with caplog.at_level(logging.WARNING):
            result = commit_one(writer, staged)
    assert (proxy.fired, proxy.landed) == (1, 1)
    assert "had an unknown outcome" in caplog.text  # the writer saw its connection die
    assert result.already_committed and result.version.version == 1  # found what landed
    assert result.version.attempt_id == staged.attempt.attempt_id
    assert counts(versions) == (1, 1)  # one version, one outbox event
    assert versions.attempts.state(staged.attempt.attempt_id) == "committed"
    invariants()


def test_a_commit_cut_before_it_landed_is_retried_and_lands_once(
    proxy: PgFaultProxy,
    proxied: VersionStore,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    with DatasetWriter(store, proxied) as writer:
        staged = stage_one(writer, "blocks", KEY, PartitionData(table_of(list(range(7)))))
        proxy.arm("drop_before_commit")
        result = commit_one(writer, staged)
    assert (proxy.fired, proxy.landed) == (1, 0)
    assert not result.already_committed and result.version.version == 1  # the retry landed it
    assert counts(versions) == (1, 1)
    invariants()


def test_a_backend_terminated_during_commit_is_retried_by_attempt_id(
    state_dsn: str, versions: VersionStore, store: ObjectStore
) -> None:
    """pg_terminate_backend from another connection as the writer sends COMMIT."""
    engine = sa.create_engine(state_dsn, pool_pre_ping=True)
    killer = sa.create_engine(state_dsn, isolation_level="AUTOCOMMIT")
    armed = {"shots": 0, "killed": 0}

    @sa.event.listens_for(engine, "commit")
    def terminate(conn: sa.Connection) -> None:
        if armed["shots"] <= 0:
            return
        armed["shots"] -= 1
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        with killer.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            while other.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar():
                time.sleep(0.01)
        armed["killed"] += 1

    try:
        with DatasetWriter(store, VersionStore(engine)) as writer:
            staged = stage_one(writer, "blocks", KEY, PartitionData(table_of([1, 2, 3])))
            armed["shots"] = 1
            result = commit_one(writer, staged)
    finally:
        engine.dispose()
        killer.dispose()
    assert armed["killed"] == 1
    assert result.version.version == 1 and not result.already_committed
    assert counts(versions) == (1, 1)
    check_invariants(versions, store)


def test_an_unknown_outcome_outlasting_the_retries_is_settled_by_the_next_attempt(
    proxy: PgFaultProxy,
    proxied: VersionStore,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    """The database stays unreachable after the COMMIT landed, longer than the writer retries:
    the step fails, yet nothing that landed is undone, and the step's retry (same commit key,
    a new attempt) commits nothing new."""
    commit_key = "dagster:run-7:raw_chain"
    with DatasetWriter(store, proxied, commit_retries=3) as writer:
        staged = stage_one(writer, "blocks", KEY, PartitionData(table_of(list(range(5)))))
        proxy.arm("drop_after_commit", blackout_s=3.0)
        with pytest.raises(sa.exc.OperationalError):
            commit_one(writer, staged, commit_key=commit_key)
    assert proxy.landed == 1 and proxy.refused >= 2
    assert versions.attempts.state(staged.attempt.attempt_id) == "committed"  # not "failed"
    time.sleep(max(0.0, 3.2 - 0.6))
    with DatasetWriter(store, versions) as retry:
        again = retry.write(
            "blocks", KEY, PartitionData(table_of(list(range(5)))), commit_key=commit_key
        )
    assert again.already_committed and again.version.attempt_id == staged.attempt.attempt_id
    assert counts(versions) == (1, 1)
    retry_files = [k for k in store.list_keys("blocks/") if staged.attempt.attempt_id not in k]
    assert len(retry_files) == 1  # the retry staged a file that no version references
    cleaned = GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    assert {i.key for i in cleaned.removed} == set(retry_files)
    assert store.list_keys("blocks/") == [f.key for f in staged.files]  # what landed stays
    invariants()


@pytest.fixture
def s3_proxy(s3_server: MotoS3Server) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3_server.endpoint_url) as proxy:
        yield proxy


def test_transient_s3_errors_on_upload_are_absorbed_by_the_client_retries(
    s3_proxy: S3FaultProxy,
    s3_bucket: str,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    proxied = s3_store(s3_bucket, endpoint_url=s3_proxy.url, access_key="t", secret_key="t")
    with DatasetWriter(proxied, versions, max_rows_per_file=4) as writer:
        s3_proxy.fail_puts(2, status=503)
        result = writer.write("blocks", KEY, PartitionData(table_of(list(range(10)))))
    assert s3_proxy.injected == 2 and s3_proxy.requests["PUT"] >= 5  # 3 files + 2 retries
    assert result.version.version == 1
    invariants()
    assert DatasetReader(store, versions).read("blocks", [KEY]).num_rows == 10


@pytest.mark.parametrize("status", [500, 503])
def test_s3_errors_outlasting_the_retries_fail_the_attempt_and_a_retry_commits(
    status: int,
    s3_proxy: S3FaultProxy,
    s3_bucket: str,
    versions: VersionStore,
    store: ObjectStore,
    invariants: Callable[[], InvariantReport],
) -> None:
    proxied = s3_store(s3_bucket, endpoint_url=s3_proxy.url, access_key="t", secret_key="t")
    with DatasetWriter(proxied, versions, max_rows_per_file=4) as writer:
        s3_proxy.fail_puts(1000, status=status)
        with pytest.raises(StagingError, match="Nothing was committed") as failure:
            writer.write("blocks", KEY, PartitionData(table_of(list(range(10)))))
        assert failure.value.permanent is False  # Dagster's retry policy may retry it
        assert s3_proxy.injected >= 1
        injected = s3_proxy.injected
        with versions.engine.connect() as conn:
            states = conn.execute(sa.select(t.attempts.c.state)).scalars().all()
        assert states == ["failed"] and versions.read.current_versions("blocks") == {}
        invariants()

        s3_proxy.fail_puts(0)
        result = writer.write("blocks", KEY, PartitionData(table_of(list(range(10)))))
    assert result.version.version == 1 and s3_proxy.injected == injected
    invariants()
    GarbageCollector(store, versions).cleanup_staging(grace=timedelta(0), apply=True)
    invariants()
    assert DatasetReader(store, versions).read("blocks", [KEY]).num_rows == 10
