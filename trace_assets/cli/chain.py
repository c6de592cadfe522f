"""`trace head` and `trace partitions sync`: the chain head from the RPC node, and the
block-range partitions of the Dagster instance up to the finalized block."""

from __future__ import annotations

import argparse
import sys

from trace_assets.cli.errors import require_dagster_home
from trace_resources.settings import Settings


def _chain(settings: Settings):  # type: ignore[no-untyped-def]
    from trace_resources.chain.extract import ChainClient
    from trace_resources.chain.rpc import RetryPolicy

    return ChainClient(
        settings.rpc_url,
        settings.chain_id,
        timeout_s=settings.rpc_timeout_s,
        retry=RetryPolicy(
            max_attempts=settings.rpc_max_attempts, budget_s=settings.rpc_retry_budget_s
        ),
        endpoints=settings.endpoints(),
    )


def cmd_head(settings: Settings, args: argparse.Namespace) -> int:
    client = _chain(settings)
    try:
        head = client.head()
    finally:
        client.close()
    sys.stdout.write(
        f"chain {head.chain_id}: latest {head.latest}, finalized {head.finalized}, "
        f"range size {settings.range_size}\n"
    )
    return 0


def cmd_partitions_sync(settings: Settings, args: argparse.Namespace) -> int:
    import dagster as dg

    from trace_assets.partitions import add_finalized_partitions

    require_dagster_home()
    client = _chain(settings)
    try:
        head = client.head()
    finally:
        client.close()
    with dg.DagsterInstance.get() as instance:
        added = add_finalized_partitions(instance, head.finalized, settings.range_size)
    sys.stdout.write(
        f"added {len(added)} block range(s) up to finalized block {head.finalized}"
        + (f": {added[0]} .. {added[-1]}\n" if added else "\n")
    )
    return 0


def cmd_rpc_probe(settings: Settings, args: argparse.Namespace) -> int:
    """What each configured endpoint serves and how fast it answers; exit 2 if one of them
    does not answer or serves another chain."""
    import json

    from trace_resources.chain.probe import probe_endpoint

    endpoints = settings.endpoints()
    results = [probe_endpoint(e, timeout_s=settings.rpc_timeout_s) for e in endpoints]
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    else:
        for endpoint, result in zip(endpoints, results, strict=True):
            sys.stdout.write(_probe_text(endpoint, result))
    failed = [r for r in results if r.error is not None]
    wrong = [r for r in results if r.error is None and r.chain_id != settings.chain_id]
    for r in failed:
        sys.stderr.write(f"trace: endpoint {r.endpoint} did not answer: {r.error}\n")
    for r in wrong:
        sys.stderr.write(
            f"trace: endpoint {r.endpoint} serves chain {r.chain_id}, not TRACE_CHAIN_ID "
            f"{settings.chain_id}: remove it from TRACE_RPC_ENDPOINTS or fix TRACE_CHAIN_ID\n"
        )
    return 2 if failed or wrong else 0


def _probe_text(endpoint, result) -> str:  # type: ignore[no-untyped-def]
    if result.error is not None:
        return f"endpoint {result.endpoint}: unreachable\n"
    limits = [
        f"{endpoint.requests_per_second} rps" if endpoint.requests_per_second else "no rps limit",
        f"batch {endpoint.max_batch}",
        f"logs range {endpoint.max_logs_range}" if endpoint.max_logs_range else "no logs limit",
    ]
    if endpoint.unsupported:
        limits.append("unsupported " + ", ".join(endpoint.unsupported))
    lines = [
        f"endpoint {result.endpoint}: chain {result.chain_id}, latest {result.latest}, "
        f"finalized {result.finalized}",
        f"  latency          {result.latency_ms:.1f} ms (median of 5 calls)",
        "  batches          "
        + (f"up to {result.max_batch} calls" if result.max_batch > 1 else "no (single calls)"),
        "  eth_getLogs      "
        + (
            f"up to {result.max_logs_range} blocks per call"
            if result.max_logs_range
            else "refused even for 1 block"
        ),
        *(f"  {m:<26} {answer}" for m, answer in result.methods.items()),
        f"  configured       {', '.join(limits)}",
    ]
    return "\n".join(lines) + "\n"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rpc = commands.add_parser(
        "rpc", help="the JSON-RPC endpoints (TRACE_RPC_ENDPOINTS or TRACE_RPC_URL)"
    ).add_subparsers(dest="action", required=True)
    probe = rpc.add_parser(
        "probe",
        help="chain id, head, latency, batch and eth_getLogs limits and the methods each "
        "configured endpoint serves",
    )
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.set_defaults(func=cmd_rpc_probe)
    commands.add_parser(
        "head", help="chain id, latest and finalized block of the node at TRACE_RPC_URL"
    ).set_defaults(func=cmd_head)
    partitions = commands.add_parser(
        "partitions", help="block-range partitions of the Dagster instance"
    ).add_subparsers(dest="action", required=True)
    partitions.add_parser(
        "sync", help="add every complete finalized range to the Dagster instance ($DAGSTER_HOME)"
    ).set_defaults(func=cmd_partitions_sync)
