"""The query service against the real services: uvicorn in a child process on loopback,
PostgreSQL, the S3 API (moto server) and datasets committed through the commit protocol.

Built once for the whole `tests/query` package:

- world **S3**: the raw datasets of four devnet ranges materialised through Dagster, and small
  org datasets written with the DatasetWriter (`org_acme__labels`, `org_acme__pinned`,
  `org_globex__secret`, and the internal `platform_stats`); served by `server` with generous
  rate limits;
- world **local**: the local object store with `org_acme__numbers` and `org_globex__secret`;
  served by `local_server` (one query slot, no queueing, no memory cache) and by
  `throttled_server` (tight rate limits).

Tokens are signed with a keyring of two keys, an old HS256 one and a new EdDSA one that signs
(rotation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pyarrow as pa
import pytest

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import MotoS3Server, PostgresServer
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet, NewDatabase
from tests.utils.dagster_runs import materialize_keys
from trace_resources.chain.ranges import complete_ranges
from trace_resources.settings import QuerySettings
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.migrations import Database
from trace_resources.storage.object_store import ObjectStore, local_store, s3_store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, generate_key, issue_token

RANGES = 4
SECRET = "globex-secret-value-7f3a"
QUERY_TIMEOUT_S = 2.0


@dataclass
class World:
    settings: QuerySettings
    store: ObjectStore
    keys: list[str]  # partition keys of the raw datasets

    def writer(self) -> DatasetWriter:
        return DatasetWriter(self.store, VersionStore(engine_for(self.settings.state_dsn)))

    def versions(self) -> VersionStore:
        return VersionStore(engine_for(self.settings.state_dsn))


class Tokens:
    """Mints tokens the way `trace token issue` does, with the test keyring."""

    def __init__(self, settings: QuerySettings) -> None:
        self.settings = settings
        self.keyring = Keyring.from_settings(settings)

    def org(
        self, org: str = "acme", subject: str = "alice", datasets: list[str] | None = None
    ) -> str:
        return issue_token(
            self.keyring, self.settings, org=org, subject=subject, datasets=datasets
        )[0]

    def task(
        self,
        datasets: list[str],
        partitions: dict[str, list[str]] | None = None,
        org: str = "acme",
        subject: str = "task-runner",
        task: str = "rollup",
    ) -> str:
        return issue_token(
            self.keyring,
            self.settings,
            org=org,
            subject=subject,
            datasets=datasets,
            task=task,
            partitions=partitions,
        )[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def keyring_spec() -> str:
    old, _ = generate_key("k-old", "HS256")
    new, _ = generate_key("k-new", "EdDSA")
    return f"{old},{new}"


@pytest.fixture(scope="package")
def aws_env(s3_server: MotoS3Server) -> Iterator[dict[str, str]]:
    env = s3_server.env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def _new_database(
    postgres: PostgresServer, new_database: NewDatabase, name: str, database: Database
) -> str:
    postgres.psql(f'DROP DATABASE IF EXISTS "{name}"')
    return new_database(name, database)


def labels_table(addresses: list[bytes]) -> pa.Table:
    return pa.table(
        {
            "address": pa.array(addresses, pa.binary()),
            "label": pa.array([f"acme-label-{i}" for i in range(len(addresses))]),
        }
    )


@pytest.fixture(scope="package")
def world(
    postgres: PostgresServer,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    devnet: Devnet,
    aws_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    tag = f"q{os.getpid()}"
    s3_server.create_buckets([f"{tag}-datasets", f"{tag}-results"])
    settings = QuerySettings(
        environment="test",
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=_new_database(postgres, new_database, f"{tag}_state_s3", "state"),
        data_dsn=_new_database(
            postgres, new_database, f"{tag}_data", "data"
        ),  # alert rules and alerts
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=f"{tag}-datasets",
        bucket_results=f"{tag}-results",
        rpc_retry_budget_s=20,
        rpc_max_attempts=5,
        query_token_keys=keyring_spec(),
        query_token_signing_kid="k-new",
        query_timeout_s=QUERY_TIMEOUT_S,
        query_memory_limit="256MB",
        query_max_concurrent=4,
        query_page_rows_max=500,
        query_row_cap=1500,
        query_export_timeout_s=30,
        query_rate_org_per_s=1000,
        query_rate_org_burst=5000,
        query_rate_user_per_s=1000,
        query_rate_user_burst=5000,
        query_cache_dir=tmp_path_factory.mktemp("query-cache"),
        # small enough that transactions and logs are scanned lazily from the disk cache of
        # downloaded (checksummed) files, while blocks and the org datasets are held in memory
        query_cache_memory_bytes=1_000_000,
    )
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)][:RANGES]
    result, instance = materialize_keys(settings, keys, dg.DagsterInstance.ephemeral())
    assert result.success
    instance.dispose()

    store = s3_store(settings.bucket_datasets, endpoint_url=s3_server.endpoint_url)
    built = World(settings, store, keys)
    reader_tx = built.writer()
    senders = (
        store.read_parquet(
            [
                f.key
                for r in built.versions().read.current_versions("transactions").values()
                for f in r.manifest.files
            ]
        )["from_address"]
        .unique()
        .to_pylist()[:20]
    )
    reader_tx.write("org_acme__labels", UNPARTITIONED, PartitionData(labels_table(senders)))
    reader_tx.write(
        "org_acme__pinned", UNPARTITIONED, PartitionData(pa.table({"n": pa.array([1, 2, 3])}))
    )
    reader_tx.write(
        "org_globex__secret",
        UNPARTITIONED,
        PartitionData(pa.table({"secret": [SECRET], "n": [42]})),
    )
    reader_tx.write(
        "platform_stats", UNPARTITIONED, PartitionData(pa.table({"metric": ["m"], "value": [1]}))
    )
    return built


@pytest.fixture(scope="package")
def tokens(world: World) -> Tokens:
    return Tokens(world.settings)


def _serve(settings: QuerySettings, log: Path, extra: dict[str, str]) -> Iterator[QueryServer]:
    server = QueryServer({**settings_env(settings), **extra}, log_file=log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def server(
    world: World, aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    yield from _serve(world.settings, tmp_path_factory.mktemp("uvicorn") / "s3.log", aws_env)


@pytest.fixture
def client(server: QueryServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


# -- the local object store ---------------------------------------------------------------------


@pytest.fixture(scope="package")
def local_world(
    postgres: PostgresServer,
    new_database: NewDatabase,
    world: World,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    root = tmp_path_factory.mktemp("objectstore")
    settings = world.settings.model_copy(
        update={
            "state_dsn": _new_database(
                postgres, new_database, f"q{os.getpid()}_state_local", "state"
            ),
            "object_store": "local",
            "local_store_root": root,
            "bucket_datasets": "trace-datasets",
            "bucket_results": "trace-results",
            "query_max_concurrent": 1,
            "query_queue_timeout_s": 0.0,
            # nothing held in memory: every query scans the files, pinned against GC
            "query_cache_memory_bytes": 0,
        }
    )
    store = local_store(root, settings.bucket_datasets)
    built = World(settings, store, [])
    writer = built.writer()
    writer.write(
        "org_acme__numbers",
        UNPARTITIONED,
        PartitionData(pa.table({"n": pa.array(range(10_000), pa.int64())})),
    )
    writer.write(
        "org_globex__secret",
        UNPARTITIONED,
        PartitionData(pa.table({"secret": [SECRET], "n": [42]})),
    )
    return built


@pytest.fixture(scope="package")
def local_server(
    local_world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    yield from _serve(local_world.settings, tmp_path_factory.mktemp("uvicorn") / "local.log", {})


THROTTLE: dict[str, Any] = {
    "query_rate_org_per_s": 0.2,
    "query_rate_org_burst": 8,
    "query_rate_user_per_s": 0.2,
    "query_rate_user_burst": 5,
}


@pytest.fixture(scope="package")
def throttled_server(
    local_world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    settings = local_world.settings.model_copy(update=THROTTLE)
    yield from _serve(settings, tmp_path_factory.mktemp("uvicorn") / "throttled.log", {})
