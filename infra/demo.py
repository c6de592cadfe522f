"""`make demo`: start the local services, make a devnet with realistic traffic, materialise
every complete block range of the raw datasets through Dagster (the dagster CLI, as an
operator's backfill would), print what was committed, run sample queries through the query
service (uvicorn on a free loopback port, a capability token from the keyring), and stop what
was started.

Run again, it reuses the chain and the committed data (the services keep them) and commits a
new version of every range, which the summary shows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from infra.devnet.generate import generate
from infra.local.services import DEFAULT_ROOT, REPO_ROOT, LocalServices

DEMO_BLOCKS = 3000


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _dagster_bin() -> str:
    return str(Path(sys.executable).with_name("dagster"))


def ensure_traffic(services: LocalServices, blocks: int) -> None:
    head = int(services.anvil.rpc("eth_blockNumber"), 16)
    if head >= blocks + 64:
        _say(f"devnet already has {head} blocks (kept in {services.anvil.state_file})")
        return
    if head > 0:
        raise SystemExit(
            f"the devnet has {head} blocks, fewer than the demo's {blocks}: run "
            "`make clean-local` to start from a fresh chain"
        )
    _say(f"generating {blocks} blocks of ERC-20, native and deployment traffic ...")
    summary = generate(services.anvil.url, blocks=blocks, finalize=True)
    _say(summary.one_line())


def materialise_all(env: dict[str, str]) -> tuple[list[str], float]:
    """Add the finalized ranges as partitions and backfill them in one run via the CLI."""
    from trace_assets.partitions import block_ranges

    subprocess.run(
        [sys.executable, "-m", "trace_assets.cli", "partitions", "sync"], env=env, check=True
    )
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        keys = sorted(instance.get_dynamic_partitions(block_ranges.name or ""))
    _say(f"materialising blocks, transactions, logs for {len(keys)} ranges {keys[0]} .. {keys[-1]}")
    command = [
        _dagster_bin(),
        "asset",
        "materialize",
        "-m",
        "trace_assets.definitions",
        "--select",
        "blocks,transactions,logs",
        "--partition-range",
        f"{keys[0]}...{keys[-1]}",
    ]
    _say("$ " + " ".join(command))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the backfill run failed (exit {done.returncode}); its log is above")
    return keys, seconds


def print_summary(env: dict[str, str], keys: list[str], seconds: float) -> None:
    from trace_resources.storage.catalog import summarise_datasets
    from trace_resources.storage.state import engine_for

    blocks = int(keys[-1][13:]) - int(keys[0][:12]) + 1
    rows = summarise_datasets(engine_for(env["TRACE_STATE_DSN"]))
    print()
    print(f"{'dataset':<14}{'partitions':>11}{'rows':>12}{'bytes':>14}{'versions':>10}")
    for r in rows:
        print(f"{r.dataset:<14}{r.partitions:>11}{r.rows:>12,}{r.bytes:>14,}{r.versions:>10}")
    print()
    print(
        f"backfill of {len(keys)} ranges ({blocks} blocks) through Dagster: "
        f"{seconds:.1f} s wall, {blocks / seconds:,.0f} blocks/s (incl. process start)"
    )
    print(
        f"committed Parquet under {env['TRACE_LOCAL_STORE_ROOT']}; "
        f"registry in {env['TRACE_STATE_DSN']}"
    )
    print("see it in the Dagster UI with `make dev` (http://127.0.0.1:3000)")


DEMO_QUERIES = {
    "transactions and gas per 500 blocks": (
        "SELECT block_number // 500 * 500 AS from_block, count(*) AS transactions, "
        "sum(gas_used) AS gas FROM transactions GROUP BY 1 ORDER BY 1 LIMIT 6"
    ),
    "contracts emitting the most ERC-20 Transfer events": (
        "SELECT '0x' || lower(hex(address)) AS contract, count(*) AS transfers FROM logs "
        "WHERE topic0 = unhex('ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef')"
        " GROUP BY 1 ORDER BY 2 DESC LIMIT 5"
    ),
    "busiest blocks": (
        "SELECT block_number, transaction_count, gas_used FROM blocks "
        "ORDER BY transaction_count DESC, block_number LIMIT 5"
    ),
}


def query_through_the_service(root: Path) -> None:
    """Serve the committed datasets over HTTP and run the sample queries as organisation 'demo'."""
    import httpx

    from infra.local.query_service import QueryServer
    from trace_query_api.tokens import Keyring, issue_token
    from trace_resources.settings import get_query_settings

    settings = get_query_settings()
    token, _ = issue_token(
        Keyring.from_settings(settings), settings, org="demo", subject="demo-user", ttl_s=600
    )
    headers = {"Authorization": f"Bearer {token}"}
    with QueryServer({}, log_file=root / "query-service.log") as server:
        _say(f"query service on {server.url} (docs: {server.url}/docs)")
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            listed = client.get("/v1/datasets").raise_for_status().json()
            _say(
                "datasets this token may read: "
                + ", ".join(f"{d['name']} ({d['rows']:,} rows)" for d in listed["data"])
            )
            for title, sql in DEMO_QUERIES.items():
                response = client.post("/v1/query", json={"sql": sql})
                body = response.raise_for_status().json()
                print()
                print(
                    f"{title} ({body['elapsed_ms']:.1f} ms in the sandbox, snapshot "
                    f"{body['snapshot'][:12]}):"
                )
                names = [c["name"] for c in body["columns"]]
                print("  " + " | ".join(names))
                for row in body["rows"]:
                    print("  " + " | ".join(str(v) for v in row))
    print()
    _say("stopped the query service")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=DEMO_BLOCKS, help="devnet traffic blocks")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="local services folder")
    parser.add_argument("--keep-running", action="store_true", help="leave the services up")
    args = parser.parse_args()
    services = LocalServices(args.root)
    _say(f"starting PostgreSQL, anvil (chain 10143) and the local object store under {args.root}")
    services.up()
    try:
        env = {**os.environ, **services.env()}
        os.environ.update(services.env())
        ensure_traffic(services, args.blocks)
        keys, seconds = materialise_all(env)
        print_summary(env, keys, seconds)
        query_through_the_service(args.root)
    finally:
        if not args.keep_running:
            services.down()
            _say("stopped the local services")
    return 0


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    raise SystemExit(main())
