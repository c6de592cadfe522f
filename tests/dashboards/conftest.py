"""The query service with dashboards against real services: uvicorn in a child process on
loopback, PostgreSQL, and small org datasets committed through the commit protocol to a local
object store (no devnet run).

`org_acme__transfers`: nine transfers over three days (blocks 100-108, two senders);
`org_acme__other`: a dataset no dashboard reads; `org_acme__pinned`: for the pinned-version
test only; `org_globex__secret`: another organisation's.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import PostgresServer
from tests.conftest import NewDatabase
from trace_resources.settings import QuerySettings
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.object_store import local_store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import dispose_engine, engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, generate_key, issue_token

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
# (day, block, amount, sender)
TRANSFERS = [
    (DAYS[0], 100, 10, ALICE),
    (DAYS[0], 101, 20, BOB),
    (DAYS[0], 102, 30, ALICE),
    (DAYS[1], 103, 5, BOB),
    (DAYS[1], 104, 7, BOB),
    (DAYS[2], 105, 1, ALICE),
    (DAYS[2], 106, 2, ALICE),
    (DAYS[2], 107, 3, BOB),
    (DAYS[2], 108, 4, ALICE),
]


def transfers_table() -> pa.Table:
    return pa.table(
        {
            "day": pa.array([dt.date.fromisoformat(t[0]) for t in TRANSFERS], pa.date32()),
            "block_number": pa.array([t[1] for t in TRANSFERS], pa.int64()),
            "amount": pa.array([t[2] for t in TRANSFERS], pa.int64()),
            "from_address": pa.array([bytes.fromhex(t[3][2:]) for t in TRANSFERS], pa.binary()),
        }
    )


DAILY_SQL = (
    "SELECT day, sum(amount) AS volume FROM org_acme__transfers "
    "WHERE block_number BETWEEN {{from_block}} AND {{to_block}} GROUP BY day ORDER BY day"
)
TRANSFERS_SQL = (
    "SELECT block_number, amount, from_address FROM org_acme__transfers "
    "WHERE ({{day}} IS NULL OR day = {{day}}) "
    "AND ({{address}} IS NULL OR from_address = {{address}}) ORDER BY block_number"
)
PARAMETERS: list[dict[str, Any]] = [
    {"name": "from_block", "type": "block", "default": 0},
    {"name": "to_block", "type": "block", "default": 1_000_000},
    {"name": "day", "type": "date"},
    {"name": "address", "type": "address"},
]


def spec(name: str = "Volume", **changes: Any) -> dict[str, Any]:
    """The daily volume -> transfers of that day dashboard."""
    body: dict[str, Any] = {
        "name": name,
        "parameters": PARAMETERS,
        "panels": [
            {
                "id": "daily",
                "title": "Daily volume",
                "sql": DAILY_SQL,
                "chart": {"kind": "bar", "x": "day", "y": "volume"},
                "drill": {"panel": "transfers", "parameter": "day", "field": "day"},
            },
            {
                "id": "transfers",
                "title": "Transfers",
                "sql": TRANSFERS_SQL,
                "chart": {"kind": "table"},
            },
        ],
    }
    body.update(changes)
    return body


@dataclass
class Service:
    url: str
    settings: QuerySettings
    writer: DatasetWriter
    keyring: Keyring

    def token(self, org: str = "acme", subject: str = "alice") -> str:
        return issue_token(self.keyring, self.settings, org=org, subject=subject)[0]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="package")
def service(
    postgres: PostgresServer, new_database: NewDatabase, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    tag = f"dash{os.getpid()}"
    root = tmp_path_factory.mktemp("objectstore")
    state_name = f"{tag}_state"
    postgres.psql(f'DROP DATABASE IF EXISTS "{state_name}"')
    key, _ = generate_key("k1", "HS256")
    settings = QuerySettings(
        environment="test",
        state_dsn=new_database(state_name, "state"),
        object_store="local",
        local_store_root=root,
        bucket_datasets="trace-datasets",
        bucket_results="trace-results",
        query_token_keys=key,
        query_max_concurrent=2,
        query_rate_org_per_s=1000,
        query_rate_org_burst=5000,
        query_rate_user_per_s=1000,
        query_rate_user_burst=5000,
        query_cache_dir=tmp_path_factory.mktemp("query-cache"),
    )
    writer = DatasetWriter(
        local_store(root, settings.bucket_datasets), VersionStore(engine_for(settings.state_dsn))
    )
    writer.write("org_acme__transfers", UNPARTITIONED, PartitionData(transfers_table()))
    writer.write("org_acme__other", UNPARTITIONED, PartitionData(pa.table({"n": [1, 2]})))
    writer.write("org_acme__pinned", UNPARTITIONED, PartitionData(pa.table({"n": [1]})))
    writer.write("org_globex__secret", UNPARTITIONED, PartitionData(pa.table({"s": ["x"]})))
    log: Path = tmp_path_factory.mktemp("uvicorn") / "dash.log"
    server = QueryServer(settings_env(settings), log_file=log)
    server.start()
    try:
        yield Service(server.url, settings, writer, Keyring.from_settings(settings))
    finally:
        server.stop()
        dispose_engine(settings.state_dsn)


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        yield http


@pytest.fixture
def acme(service: Service) -> dict[str, str]:
    return bearer(service.token("acme", "alice"))


@pytest.fixture
def globex(service: Service) -> dict[str, str]:
    return bearer(service.token("globex", "gina"))
