"""`make bench-query`: queries through the query service against the same SQL in DuckDB
directly on the same files, in one run.

Data: the cached devnet of infra/bench/ingest.py (>= 3,000 blocks, ~30 transactions and ~35
logs per block) materialised through Dagster into the local object store (the local default),
so both contenders read the very same committed Parquet files.

- API: a real uvicorn (`--workers`, default 1) on loopback; each request carries a capability
  token and goes through verification, revocation and rate limits in Postgres, manifest
  resolution, the locked DuckDB sandbox and JSON encoding.
- direct: one DuckDB connection (same thread count as a sandbox) with a view per dataset over
  `read_parquet` of the files the manifests list; the SQL runs as is and rows are fetched.

Latency: one client, the query mix alternated between the contenders, p50/p99 over all
requests. Throughput: `--clients` concurrent clients (asyncio) on the small query for
`--seconds`. Last line: `query: api_p50_ms=<> api_p99_ms=<> direct_p50_ms=<> rps=<>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import duckdb
import httpx

from infra.bench.ingest import CHAIN_ID, dagster_instance, devnet_state, range_tags
from infra.local.query_service import QueryServer, settings_env
from infra.local.services import AnvilNode, PostgresServer, free_port
from trace_assets.definitions import build_resources
from trace_assets.partitions import add_finalized_partitions
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.settings import QuerySettings
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.object_store import local_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, generate_key, issue_token

SMALL = "SELECT block_number, transaction_count, gas_used FROM blocks WHERE block_number = 1234"
QUERIES = {
    "point lookup": SMALL,
    "count": "SELECT count(*) FROM transactions",
    "range aggregate": (
        "SELECT block_number, count(*) AS txs, sum(gas_used) AS gas FROM transactions "
        "WHERE block_number BETWEEN 1000 AND 1100 GROUP BY 1 ORDER BY 1"
    ),
    "top senders": (
        "SELECT from_address, count(*) AS n FROM transactions GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
    ),
    "ERC-20 transfers per token": (
        "SELECT address, count(*) AS transfers FROM logs WHERE topic0 = "
        "unhex('ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef') "
        "GROUP BY 1 ORDER BY 2 DESC"
    ),
}


def _say(message: str) -> None:
    print(f"[bench-query] {message}", flush=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def materialise(settings: QuerySettings, instance: dg.DagsterInstance, finalized: int) -> int:
    keys = add_finalized_partitions(instance, finalized, settings.range_size)
    result = dg.materialize(
        [raw_chain],
        instance=instance,
        resources=build_resources(settings),
        tags=range_tags(keys),
    )
    assert result.success
    return len(keys)


def direct_connection(settings: QuerySettings) -> duckdb.DuckDBPyConnection:
    """DuckDB on the committed files of the current versions, as a user would open them."""
    store = local_store(settings.local_store_root, settings.bucket_datasets)
    reader = DatasetReader(store, VersionStore(engine_for(settings.state_dsn)))
    conn = duckdb.connect(":memory:", config={"threads": settings.query_threads})
    for name in RAW_DATASETS:
        records = sorted(reader.resolve(name).values(), key=lambda r: r.partition_key)
        paths = [store.path(f.key) for r in records for f in r.manifest.files]
        conn.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({paths!r})")
    return conn


def latency_rounds(
    client: httpx.Client, conn: duckdb.DuckDBPyConnection, rounds: int
) -> dict[str, dict[str, list[float]]]:
    timings: dict[str, dict[str, list[float]]] = {
        "api": {n: [] for n in QUERIES},
        "direct": {n: [] for n in QUERIES},
        "floor": {"GET /healthz": []},
    }
    for round_number in range(rounds):
        started = time.perf_counter()
        client.get("/healthz").raise_for_status()
        timings["floor"]["GET /healthz"].append((time.perf_counter() - started) * 1000)
        for name, sql in QUERIES.items():
            order = ("api", "direct") if round_number % 2 == 0 else ("direct", "api")
            for contender in order:
                started = time.perf_counter()
                if contender == "api":
                    response = client.post("/v1/query", json={"sql": sql})
                    response.raise_for_status()
                    rows = len(response.json()["rows"])
                else:
                    rows = len(conn.execute(sql).fetchall())
                timings[contender][name].append((time.perf_counter() - started) * 1000)
                assert rows > 0, (contender, name)
    return timings


async def throughput(url: str, token: str, clients: int, seconds: float) -> tuple[int, int]:
    """Requests completed (and refused) by `clients` concurrent clients in `seconds`."""
    done = refused = 0
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30
    ) as client:

        async def worker() -> None:
            nonlocal done, refused
            while time.perf_counter() < deadline:
                response = await client.post("/v1/query", json={"sql": SMALL})
                if response.status_code == 200:
                    done += 1
                else:
                    refused += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return done, refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=3000, help="devnet traffic blocks (>= 3000)")
    parser.add_argument("--range-size", type=int, default=250, help="blocks per partition")
    parser.add_argument("--rounds", type=int, default=40, help="latency rounds of the query mix")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (throughput)")
    parser.add_argument("--seconds", type=float, default=8.0, help="throughput duration")
    args = parser.parse_args()

    state_file = devnet_state(args.blocks)
    work = Path(tempfile.mkdtemp(prefix="trace-bench-query-"))
    pg = PostgresServer(work / "pg", free_port())
    node = AnvilNode(
        work / "anvil",
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--load-state", str(state_file)],
    )
    server: QueryServer | None = None
    try:
        pg.start()
        pg.ensure_databases(("dagster", "trace_state"))
        pg.migrate({"trace_state": "state"})
        node.start()
        key, _ = generate_key("bench", "HS256")
        settings = QuerySettings(
            environment="test",
            rpc_url=node.url,
            chain_id=CHAIN_ID,
            range_size=args.range_size,
            state_dsn=pg.dsn("trace_state"),
            object_store="local",
            local_store_root=work / "objectstore",
            query_token_keys=key,
            # the benchmark measures the service, not its rate limits
            query_rate_org_per_s=1e6,
            query_rate_org_burst=1_000_000,
            query_rate_user_per_s=1e6,
            query_rate_user_burst=1_000_000,
        )
        finalized = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        instance = dagster_instance(work / "dagster_home", pg)
        ranges = materialise(settings, instance, finalized)
        instance.dispose()
        node.stop()
        _say(f"materialised {ranges} ranges of {args.range_size} blocks into the local store")

        token, _ = issue_token(
            Keyring.from_settings(settings), settings, org="bench", subject="bench", ttl_s=3600
        )
        server = QueryServer(
            settings_env(settings), workers=args.workers, log_file=work / "query.log"
        ).start()
        conn = direct_connection(settings)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            latency_rounds(client, conn, 3)  # warm up both: caches, connections, pools
            timings = latency_rounds(client, conn, args.rounds)
        for name in QUERIES:
            api, direct = timings["api"][name], timings["direct"][name]
            _say(
                f"{name:<28} api p50 {statistics.median(api):6.2f} ms  p99 {_pct(api, 0.99):6.2f}"
                f"   direct p50 {statistics.median(direct):6.2f} ms  p99 {_pct(direct, 0.99):6.2f}"
            )
        floor = timings["floor"]["GET /healthz"]
        _say(f"HTTP floor (GET /healthz, no token, no query) p50 {statistics.median(floor):.2f} ms")
        api_all = [t for ts in timings["api"].values() for t in ts]
        direct_all = [t for ts in timings["direct"].values() for t in ts]
        api_p50, api_p99 = statistics.median(api_all), _pct(api_all, 0.99)
        direct_p50 = statistics.median(direct_all)
        _say(
            f"all {len(api_all)} requests each: api p50 {api_p50:.2f} ms, direct p50 "
            f"{direct_p50:.2f} ms; target api p50 <= 1.5 x direct + 5 ms = "
            f"{1.5 * direct_p50 + 5:.2f} ms"
        )

        done, refused = asyncio.run(throughput(server.url, token, args.clients, args.seconds))
        rps = done / args.seconds
        _say(
            f"throughput of the point lookup: {done} answers in {args.seconds:.0f} s from "
            f"{args.clients} clients and {args.workers} worker(s) ({refused} refused): "
            f"{rps:.0f} requests/s"
        )
        print(
            f"query: api_p50_ms={api_p50:.2f} api_p99_ms={api_p99:.2f} "
            f"direct_p50_ms={direct_p50:.2f} rps={rps:.0f}"
        )
        conn.close()
    finally:
        if server is not None:
            server.stop()
        node.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[2])
    raise SystemExit(main())
