"""Real services for the whole test session: PostgreSQL, the S3 API (moto server) and an anvil
devnet with deterministic traffic. Each test gets its own state database and bucket, so tests
never see each other's versions or objects.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from infra.devnet.generate import GENESIS_TIMESTAMP, GenerationSummary, generate
from infra.local.services import (
    TRACE_SCHEMAS,
    AnvilNode,
    MotoS3Server,
    PostgresServer,
    free_port,
)
from trace_resources.resources import ChainResource, ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage import migrations
from trace_resources.storage.state import dispose_engine

CHAIN_ID = 10143
RANGE_SIZE = 50
TRAFFIC_BLOCKS = 300  # + 64 empty blocks mined so all traffic is finalized
_counter = itertools.count()


@dataclass
class Devnet:
    url: str
    summary: GenerationSummary
    record_path: Path
    finalized: int
    node: AnvilNode


@pytest.fixture(scope="session")
def services_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def postgres(services_root: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(services_root / "pg", free_port())
    server.start()
    server.ensure_databases(("dagster", "trace_state", "trace_data"))
    server.migrate(TRACE_SCHEMAS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def devnet(services_root: Path) -> Iterator[Devnet]:
    """A devnet with a few hundred blocks of ERC-20, native and deployment traffic."""
    node = AnvilNode(
        services_root / "anvil",
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--timestamp", str(GENESIS_TIMESTAMP)],
    )
    node.start()
    try:
        record = services_root / "traffic.jsonl"
        summary = generate(
            node.url,
            blocks=TRAFFIC_BLOCKS,
            txs_per_block=30,
            accounts=200,
            tokens=4,
            seed=7,
            record_path=record,
            finalize=True,
        )
        finalized = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        yield Devnet(node.url, summary, record, finalized, node)
    finally:
        node.stop()


NewDatabase = Callable[[str, migrations.Database], str]


@pytest.fixture(scope="session")
def new_database(postgres: PostgresServer) -> NewDatabase:
    """`new_database(name, "state" | "data")`: a fresh database at the head revision, its DSN.

    Each kind is migrated once per session into a template that every test database copies
    (`CREATE DATABASE ... TEMPLATE`), which is faster than migrating each one."""

    @functools.cache
    def template(database: migrations.Database) -> str:
        name = f"template_{database}_{os.getpid()}"
        postgres.psql(f'CREATE DATABASE "{name}" OWNER trace')
        migrations.upgrade(postgres.dsn(name), database)
        return name

    def create(name: str, database: migrations.Database) -> str:
        postgres.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template(database)}" OWNER trace')
        return postgres.dsn(name)

    return create


@pytest.fixture
def state_dsn(postgres: PostgresServer, new_database: NewDatabase) -> Iterator[str]:
    """A fresh Trace state database for one test, at the head revision and without rows."""
    name = f"state_{os.getpid()}_{next(_counter)}"
    yield new_database(name, "state")
    # close this test's pooled connections, or a long session runs out of connection slots
    dispose_engine(postgres.dsn(name))


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server) -> str:
    """A fresh bucket on the S3 API for one test."""
    name = f"trace-test-{os.getpid()}-{next(_counter)}"
    s3_server.s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_server: MotoS3Server) -> boto3.client:
    return s3_server.s3_client()


@pytest.fixture
def objects(s3_server: MotoS3Server, s3_bucket: str) -> ObjectStoreResource:
    return ObjectStoreResource(
        kind="s3",
        endpoint_url=s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        bucket_datasets=s3_bucket,
    )


@pytest.fixture
def state(state_dsn: str) -> StateStoreResource:
    return StateStoreResource(dsn=state_dsn)


@pytest.fixture
def chain(devnet: Devnet) -> ChainResource:
    return ChainResource(
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        retry_budget_s=20,
        max_attempts=5,
    )


@pytest.fixture
def test_settings(
    devnet: Devnet, state_dsn: str, s3_server: MotoS3Server, s3_bucket: str
) -> Settings:
    return Settings(
        environment="test",
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=state_dsn,
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=s3_bucket,
        rpc_retry_budget_s=20,
        rpc_max_attempts=5,
    )


# the tests' receivers (webhooks, SMTP servers) listen on loopback, which the alert outbound
# policy refuses unless the operator allows it
OUTBOUND_ALLOW_LOOPBACK = "127.0.0.1/32"


@pytest.fixture(scope="session", autouse=True)
def _outbound_allows_loopback() -> Iterator[None]:
    """Session-wide (before every session fixture), so services started for the whole session
    inherit it too; tests of the policy itself pass their own `OutboundPolicy`."""
    before = os.environ.get("TRACE_ALERT_OUTBOUND_ALLOW")
    os.environ["TRACE_ALERT_OUTBOUND_ALLOW"] = OUTBOUND_ALLOW_LOOPBACK
    yield
    if before is None:
        os.environ.pop("TRACE_ALERT_OUTBOUND_ALLOW", None)
    else:
        os.environ["TRACE_ALERT_OUTBOUND_ALLOW"] = before


@pytest.fixture(autouse=True)
def _aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
