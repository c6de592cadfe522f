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
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from infra.devnet.generate import generate
from infra.local.dagster_cli import materialize_command
from infra.local.services import DEFAULT_ROOT, REPO_ROOT, LocalServices

DEMO_BLOCKS = 3000


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


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


def sync_partitions(env: dict[str, str]) -> list[str]:
    """Add the finalized ranges as partitions (the chain-head sensor's job, here by the CLI)."""
    from trace_assets.partitions import block_ranges

    subprocess.run(
        [sys.executable, "-m", "trace_assets.cli", "partitions", "sync"], env=env, check=True
    )
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        return sorted(instance.get_dynamic_partitions(block_ranges.name or ""))


def materialise(env: dict[str, str], selection: str, keys: list[str]) -> float:
    """Backfill `selection` over every range in one run, with the dagster CLI; wall seconds."""
    command = materialize_command(selection, keys[0], keys[-1])
    _say("$ " + " ".join(command))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(
            f"the run of {selection} failed (exit {done.returncode}); its log is above"
        )
    return seconds


def materialise_all(env: dict[str, str]) -> tuple[list[str], float]:
    keys = sync_partitions(env)
    _say(f"materialising blocks, transactions, logs for {len(keys)} ranges {keys[0]} .. {keys[-1]}")
    return keys, materialise(env, "blocks,transactions,logs", keys)


def print_summary(env: dict[str, str], keys: list[str], seconds: float) -> None:
    from trace_resources.storage.read_model import ReadModel
    from trace_resources.storage.state import engine_for

    blocks = int(keys[-1][13:]) - int(keys[0][:12]) + 1
    rows = ReadModel(engine_for(env["TRACE_STATE_DSN"])).dataset_summaries()
    print()
    print(f"{'dataset':<20}{'partitions':>11}{'rows':>12}{'bytes':>14}{'versions':>10}")
    for r in rows:
        print(f"{r.dataset:<20}{r.partitions:>11}{r.rows:>12,}{r.bytes:>14,}{r.versions:>10}")
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


def _print_rows(title: str, body: dict[str, Any]) -> None:
    print()
    print(
        f"{title} ({body['elapsed_ms']:.1f} ms in the sandbox, snapshot {body['snapshot'][:12]}):"
    )
    print("  " + " | ".join(c["name"] for c in body["columns"]))
    for row in body["rows"]:
        print("  " + " | ".join(str(v) for v in row))


def sample_queries(client: httpx.Client) -> None:
    """The sample queries, as organisation 'demo', through the query service."""
    listed = client.get("/v1/datasets").raise_for_status().json()
    _say(
        "datasets this token may read: "
        + ", ".join(f"{d['name']} ({d['rows']:,} rows)" for d in listed["data"])
    )
    for title, sql in DEMO_QUERIES.items():
        _print_rows(title, client.post("/v1/query", json={"sql": sql}).raise_for_status().json())
    print()


def _large_transfer_rule(client: httpx.Client, hook_url: str, secret: str) -> dict[str, Any]:
    """A rule that fires on the ~25 largest transfers of the most traded token."""
    body = (
        client.post(
            "/v1/query",
            json={
                "sql": "WITH busiest AS (SELECT token FROM erc20_transfers GROUP BY token "
                "ORDER BY count(*) DESC, token LIMIT 1) SELECT '0x' || lower(hex(t.token)), "
                "t.value_string FROM erc20_transfers t JOIN busiest USING (token) "
                "ORDER BY length(t.value_string) DESC, t.value_string DESC LIMIT 1 OFFSET 25"
            },
        )
        .raise_for_status()
        .json()
    )
    token, threshold = body["rows"][0]
    return {
        "id": "large-transfers",
        "description": "The largest transfers of the most traded token (the demo's rule)",
        "condition": {"kind": "erc20_transfer_above", "token": token, "threshold": threshold},
        "channels": [{"kind": "webhook", "name": "demo-hook", "url": hook_url, "secret": secret}],
    }


def alerts_end_to_end(
    env: dict[str, str], root: Path, keys: list[str], client: httpx.Client
) -> None:
    """Committed transfers -> a rule made through the query service -> evaluation in Dagster ->
    SQS buffer -> sink -> Postgres -> signed webhook; then the alerts listed by the service."""
    from infra.local.alert_workers import AlertWorkers
    from infra.local.webhook_receiver import WebhookReceiver

    secret = secrets.token_hex(24)
    with WebhookReceiver(secret) as hook, AlertWorkers(env, root, with_follower=True):
        _say(f"alert sink, deliverer and head follower running; webhook receiver on {hook.url}")
        rule = _large_transfer_rule(client, f"{hook.url}/demo", secret)
        created = client.post("/v1/alerts/rules", json=rule)
        if created.status_code == 409:  # a re-run: the rule's next version
            created = client.put(f"/v1/alerts/rules/{rule['id']}", json=rule)
        stored = created.raise_for_status().json()
        _say(
            f"rule demo/{stored['id']} v{stored['version']} via the query service: "
            f"{rule['condition']['kind']} {rule['condition']['threshold']} of "
            f"{rule['condition']['token']}"
        )
        seconds = materialise(env, "alert_evaluations", keys)
        _say(f"alert evaluation over {len(keys)} ranges: {seconds:.1f} s")
        version = stored["version"]
        deadline = time.monotonic() + 120
        while True:
            page = client.get(
                "/v1/alerts", params={"rule_id": rule["id"], "kind": "alert", "limit": 500}
            )
            alerts = [
                a for a in page.raise_for_status().json()["data"] if a["rule_version"] == version
            ]
            delivered = [
                a for a in alerts if all(d["state"] == "delivered" for d in a["deliveries"])
            ]
            if alerts and len(delivered) == len(alerts):
                break
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"{len(delivered)} of {len(alerts)} alerts delivered after 120 s: see "
                    f"{root / 'alerts'} for the sink and deliverer logs"
                )
            time.sleep(0.5)
        head_tier(env, client, hook, secret)
    received = {
        d.dedupe_key
        for d in hook.snapshot()
        if d.alert.get("rule_id") == rule["id"] and d.alert.get("rule_version") == version
    }
    _say(
        f"{len(alerts)} alerts upserted once each and delivered: the webhook receiver got "
        f"{len(received)} distinct alerts, every signature valid ({hook.rejected} rejected); "
        "sink and deliverer stopped (drained)"
    )
    print()
    print("alerts listed by the query service (GET /v1/alerts), newest 5:")
    for a in alerts[:5]:
        states = ", ".join(f"{d['channel']}: {d['state']}" for d in a["deliveries"])
        row = a["payload"]["row"]
        print(
            f"  block {row['block_number']}: {row['value_string']} from "
            f"{row['from_address'][:10]}… to {row['to_address'][:10]}… [{states}]"
        )
    print()


DEMO_DASHBOARD: dict[str, Any] = {
    "name": "Devnet overview",
    "description": "Made by `make demo`: click a day's bar to see that day's transfers.",
    "parameters": [{"name": "day", "type": "date", "label": "Day (click a bar)"}],
    "panels": [
        {
            "id": "daily",
            "title": "Daily ERC-20 transfer volume",
            "chart": {"kind": "bar", "x": "day", "y": "transfers"},
            "sql": "SELECT CAST(to_timestamp(block_timestamp) AS DATE) AS day, "
            "count(*) AS transfers FROM erc20_transfers GROUP BY 1 ORDER BY 1",
            "drill": {"panel": "transfers", "parameter": "day", "field": "day"},
        },
        {
            "id": "transfers",
            "title": "Transfers of the day (newest 50)",
            "chart": {"kind": "table"},
            "sql": "SELECT block_number, '0x' || lower(hex(token)) AS token, "
            "'0x' || lower(hex(from_address)) AS sender, '0x' || lower(hex(to_address)) AS "
            "receiver, value_string AS amount FROM erc20_transfers WHERE {{day}} IS NULL OR "
            "CAST(to_timestamp(block_timestamp) AS DATE) = {{day}} "
            "ORDER BY block_number DESC, log_index DESC LIMIT 50",
        },
        {
            "id": "contracts",
            "title": "Busiest contracts (ERC-20 Transfer events)",
            "chart": {"kind": "bar", "x": "contract", "y": "transfers"},
            "sql": "SELECT '0x' || lower(hex(token)) AS contract, count(*) AS transfers "
            "FROM erc20_transfers GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
            "represent": True,  # also an asset in `make dev`'s Dagster: its chart as SVG/PNG
        },
        {
            "id": "gas",
            "title": "Gas per block (last 1,000 blocks)",
            "chart": {"kind": "line", "x": "block_number", "y": "gas_used"},
            "sql": "SELECT block_number, gas_used FROM blocks "
            "ORDER BY block_number DESC LIMIT 1000",
        },
    ],
}
EMBED_TTL_S = 30 * 24 * 3600  # the demo link works for 30 days (revoke it in the page)
DEV_QUERY_URL = "http://127.0.0.1:8700"  # `make dev`'s query service (infra/dev.py --query-port)


def demo_dashboard(client: httpx.Client, dev_url: str) -> str:
    """The demo dashboard of organisation 'demo' (a new version if an earlier demo made it),
    each panel run once through the service, and an embed link to it; the link's URL as
    `make dev`'s query service serves it."""
    listed = client.get("/v1/dashboards").raise_for_status().json()["data"]
    same = [d for d in listed if d["name"] == DEMO_DASHBOARD["name"]]
    if same:
        made = client.put(f"/v1/dashboards/{same[0]['id']}", json=DEMO_DASHBOARD)
    else:
        made = client.post("/v1/dashboards", json=DEMO_DASHBOARD)
    dashboard = made.raise_for_status().json()
    for panel in DEMO_DASHBOARD["panels"]:
        ran = client.post(
            f"/v1/dashboards/{dashboard['id']}/panels/{panel['id']}/run", json={"parameters": {}}
        ).raise_for_status()
        _say(f"dashboard panel {panel['title']!r}: {len(ran.json()['rows'])} row(s)")
    embed = client.post(
        f"/v1/dashboards/{dashboard['id']}/embeds",
        json={"ttl_s": EMBED_TTL_S, "pin_versions": False},
    ).raise_for_status()
    return f"{dev_url}{embed.json()['url']}"


HEAD_WATCHED = "0x" + "d3" * 20


def head_tier(env: dict[str, str], client: httpx.Client, hook: Any, secret: str) -> None:
    """The head tier: the devnet mines a block every 0.3 s; a native transfer to a watched
    address is alerted at the webhook and queryable within seconds of its block becoming
    finalized, while its block range is still open (not sealed)."""
    from infra.local.services import Miner

    rule = {
        "id": "head-watch",
        "description": "Native transfers to a watched address, alerted from the head tier",
        "condition": {
            "kind": "watched_addresses",
            "addresses": [HEAD_WATCHED],
            "datasets": ["native_transfers"],
        },
        "channels": [
            {"kind": "webhook", "name": "head-hook", "url": f"{hook.url}/head", "secret": secret}
        ],
    }
    created = client.post("/v1/alerts/rules", json=rule)
    if created.status_code == 409:
        created = client.put(f"/v1/alerts/rules/{rule['id']}", json=rule)
    created.raise_for_status()
    rpc = httpx.Client(base_url=env["TRACE_RPC_URL"], timeout=30)

    def call(method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
        return rpc.post("", json=body).raise_for_status().json()["result"]

    miner = Miner(env["TRACE_RPC_URL"], 0.3)
    miner.start()
    try:
        sender = call("eth_accounts")[0]
        tx = call("eth_sendTransaction", {"from": sender, "to": HEAD_WATCHED, "value": hex(10**18)})
        receipt = None
        while receipt is None:
            time.sleep(0.1)
            receipt = call("eth_getTransactionReceipt", tx)
        block = int(receipt["blockNumber"], 16)
        _say(
            f"head tier: a transfer to {HEAD_WATCHED[:10]}… landed in block {block}; waiting "
            "for it to be finalized (64 blocks of 0.3 s on anvil)"
        )
        deadline = time.monotonic() + 120
        finalized_at = alerted_at = visible_at = None
        sql = (
            "SELECT block_number FROM native_transfers "
            f"WHERE transaction_hash = from_hex('{tx[2:]}')"
        )
        while finalized_at is None or alerted_at is None or visible_at is None:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"head tier: block {block} not alerted and queryable within 120 s "
                    f"(finalized: {finalized_at is not None}, alerted: {alerted_at is not None}, "
                    f"queryable: {visible_at is not None}); see the follower's log"
                )
            now = time.monotonic()
            if finalized_at is None:
                finalized = int(call("eth_getBlockByNumber", "finalized", False)["number"], 16)
                if finalized >= block:
                    finalized_at = now
            if alerted_at is None and any(
                (d.alert.get("row") or {}).get("transaction_hash") == tx for d in hook.snapshot()
            ):
                alerted_at = now
            if visible_at is None and client.post("/v1/query", json={"sql": sql}).json().get(
                "rows"
            ):
                visible_at = now
            time.sleep(0.05)
    finally:
        miner.stop()
        rpc.close()
    size = int(env.get("TRACE_RANGE_SIZE", "10000"))
    start = block // size * size
    _say(
        f"head tier: block {block} finalized; its alert reached the webhook "
        f"{max(0.0, alerted_at - finalized_at):.1f} s and its row was queryable "
        f"{max(0.0, visible_at - finalized_at):.1f} s after (read every 50 ms), while its range "
        f"{start:012d}-{start + size - 1:012d} is still open: the sealing run commits it whole "
        "once the finalized head passes its end"
    )


@contextlib.contextmanager
def query_client(root: Path) -> Iterator[httpx.Client]:
    """The query service (uvicorn on a free loopback port) and a client with a token of
    organisation 'demo' that may also manage the org's alert rules."""
    from infra.local.query_service import QueryServer
    from trace_resources.settings import get_query_settings
    from trace_resources.tokens import Keyring, issue_token

    settings = get_query_settings()
    token, _ = issue_token(
        Keyring.from_settings(settings),
        settings,
        org="demo",
        subject="demo-user",
        ttl_s=900,
        capabilities=["alerts:manage"],
    )
    with QueryServer({}, log_file=root / "query-service.log") as server:
        _say(f"query service on {server.url} (docs: {server.url}/docs)")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            yield client


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
        _say("materialising the derived datasets (decoded transfers, deployments) in one run")
        derived_s = materialise(env, "erc20_transfers,native_transfers,contracts", keys)
        print_summary(env, keys, seconds)
        print(f"derived datasets for the same ranges: {derived_s:.1f} s wall (one run)")
        with query_client(args.root) as client:
            sample_queries(client)
            alerts_end_to_end(env, args.root, keys, client)
            dashboard_url = demo_dashboard(client, DEV_QUERY_URL)
        _say("stopped the query service")
    finally:
        if not args.keep_running:
            services.down()
            _say("stopped the local services")
    print()
    print("the demo dashboard (daily transfer volume, busiest contracts, gas per block), served")
    print(f"by `make dev`; the link is read-only and works for 30 days:\n  {dashboard_url}")
    print(f"or sign in at {DEV_QUERY_URL}/ui/ with the token that")
    print("  .venv/bin/trace token issue --org demo --subject you   prints")
    return 0


if __name__ == "__main__":
    os.chdir(REPO_ROOT)
    raise SystemExit(main())
