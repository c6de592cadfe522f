"""The current versions cached between commits (`trace_query_api/current.py`): a query sees
every commit acknowledged before it, also right after the listener lost its connection, and
GC never removes what a query reads.

Served by `local_server` (local object store, no memory cache: every query pins its files).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pyarrow as pa
import pytest

from infra.local.query_service import QueryServer
from infra.local.services import PostgresServer
from tests.query.conftest import Tokens, World, bearer
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.paths import UNPARTITIONED

DATASET = "org_acme__fresh"
SQL = f"SELECT sum(n) AS total FROM {DATASET}"


@pytest.fixture
def http(local_server: QueryServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        yield client


def commit(world: World, total: int) -> int:
    """Commit a new version of DATASET whose rows sum to `total`; its version number."""
    world.writer().write(DATASET, UNPARTITIONED, PartitionData(pa.table({"n": [total - 1, 1]})))
    return world.versions().read.current_version_numbers(DATASET)[UNPARTITIONED]


def read(http: httpx.Client, tokens: Tokens) -> tuple[int, int]:
    """(sum of the rows, version read) as the service answers now."""
    response = http.post("/v1/query", json={"sql": SQL}, headers=bearer(tokens.org()))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body["rows"][0][0], body["versions"][DATASET][UNPARTITIONED]


def from_cache(http: httpx.Client) -> int:
    """Datasets the service has taken from its cache so far."""
    found = re.search(
        r'^trace_query_current_versions_total\{source="cache"\} (\S+)$',
        http.get("/metrics").text,
        re.M,
    )
    return int(float(found.group(1))) if found else 0


def listeners(postgres: PostgresServer, world: World) -> list[int]:
    """The pointer listeners' backends on the world's state database (every service's)."""
    database = world.settings.state_dsn.rsplit("/", 1)[1]
    out = postgres.psql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'trace-pointer-listener' "
        f"AND datname = '{database}'"
    )
    return sorted(int(line) for line in out.split() if line.strip().isdigit())


def read_cached(http: httpx.Client, tokens: Tokens) -> tuple[int, int]:
    """`read` once the service answers from its cache again (its listener listens)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = from_cache(http)
        answer = read(http, tokens)
        if from_cache(http) > before:
            return answer
        time.sleep(0.05)
    raise AssertionError("the service never answered from its cache (is its listener back?)")


def test_a_query_sees_each_commit_as_soon_as_it_returns(
    http: httpx.Client, tokens: Tokens, local_world: World
) -> None:
    commit(local_world, 10)
    read(http, tokens)  # cached now
    for total in range(11, 17):
        version = commit(local_world, total)
        assert read(http, tokens) == (total, version)
    before = from_cache(http)
    assert read(http, tokens) == (16, version)
    assert read(http, tokens) == (16, version)
    assert from_cache(http) >= before + 2, "the versions were read in PostgreSQL each time"


def test_the_cache_is_dropped_when_the_listener_loses_its_connection(
    http: httpx.Client, tokens: Tokens, local_world: World, postgres: PostgresServer
) -> None:
    database = local_world.settings.state_dsn.rsplit("/", 1)[1]
    version = commit(local_world, 20)
    for round_number in range(3):
        assert read_cached(http, tokens) == (20 + round_number, version)
        killed = listeners(postgres, local_world)
        assert killed, "no pointer listener is connected"
        # the listener can not come back (connections already open go on) until the commit
        # landed: its notification reaches no listener, and the cache must not answer
        postgres.psql(f'ALTER DATABASE "{database}" CONNECTION LIMIT 0')
        try:
            postgres.psql(f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY{killed}) pid")
            while listeners(postgres, local_world):
                time.sleep(0.02)
            version = commit(local_world, 21 + round_number)
            assert read(http, tokens) == (21 + round_number, version)
        finally:
            postgres.psql(f'ALTER DATABASE "{database}" CONNECTION LIMIT -1')
        # nor once the listener is back
        assert read_cached(http, tokens) == (21 + round_number, version)
        assert not set(killed) & set(listeners(postgres, local_world))


def test_gc_never_removes_the_versions_a_query_reads(
    http: httpx.Client, tokens: Tokens, local_world: World
) -> None:
    gc = GarbageCollector(local_world.store, local_world.versions())
    policy = GcPolicy(keep_last=1, older_than=timedelta(0))
    for total in range(30, 34):
        previous = commit(local_world, total - 1)
        assert read(http, tokens) == (total - 1, previous)  # cached now
        version = commit(local_world, total)
        removed = gc.collect(policy, apply=True, datasets=[DATASET])
        assert (UNPARTITIONED, previous) in [(v.partition_key, v.version) for v in removed.versions]
        assert removed.files, "GC deleted no file: the test proves nothing"
        assert read(http, tokens) == (total, version)
