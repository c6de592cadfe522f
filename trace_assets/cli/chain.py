"""`trace head` and `trace partitions sync`: the chain head from the RPC node, and the
block-range partitions of the Dagster instance up to the finalized block; `trace chains`: the
deployment's chains; `trace rpc probe`: what each endpoint serves."""

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
        for config in settings.chain_configs()[1:]:
            _sync_chain(instance, settings, config)
    return 0


def _sync_chain(instance, settings: Settings, config) -> None:  # type: ignore[no-untyped-def]
    """The block ranges of another chain of TRACE_CHAINS (`block_ranges__<chain>`)."""
    from trace_assets.partitions import add_finalized_partitions
    from trace_resources.resources import ChainResource

    client = ChainResource.from_settings(settings, config).client()
    try:
        head = client.head()
    finally:
        client.close()
    added = add_finalized_partitions(
        instance, head.finalized, config.range_size, f"block_ranges__{config.name}"
    )
    sys.stdout.write(
        f"{config.name}: added {len(added)} block range(s) up to finalized block "
        f"{head.finalized}" + (f": {added[0]} .. {added[-1]}\n" if added else "\n")
    )


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


def cmd_chains(settings: Settings, args: argparse.Namespace) -> int:
    """The configured chains (TRACE_CHAINS, else the single chain of the RPC settings)."""
    import json

    from trace_assets.cli.console import table

    chains = settings.chain_configs()
    if args.json:
        rows = [c.model_dump(mode="json", exclude={"endpoints"}) for c in chains]
        for row, chain in zip(rows, chains, strict=True):
            row["endpoints"] = [e.label for e in chain.endpoints]
            row["primary"] = chain is chains[0]
            row["datasets"] = "plain names" if chain is chains[0] else f"{chain.name}.<dataset>"
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table(
        ["chain", "chain id", "endpoints", "range size", "finality", "datasets"],
        [
            [
                c.name + (" (primary)" if i == 0 else ""),
                c.chain_id,
                ", ".join(e.label for e in c.endpoints),
                f"{c.range_size:,}",
                f"{c.finality} blocks deep" if isinstance(c.finality, int) else c.finality,
                "blocks, transactions, ..." if i == 0 else f"{c.name}.blocks, ...",
            ]
            for i, c in enumerate(chains)
        ],
        right=["chain id", "range size"],
    )
    return 0


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
    chains = commands.add_parser(
        "chains",
        help="the deployment's chains: name, chain id, endpoints, range size, finality",
        description="The chains of TRACE_CHAINS (the first is the primary, whose datasets keep "
        "their plain names; another chain's are <chain>.<dataset>), or the one chain of "
        "TRACE_CHAIN_NAME and the RPC settings when TRACE_CHAINS is unset.",
    )
    chains.add_argument("--json", action="store_true", help="print JSON")
    chains.set_defaults(func=cmd_chains)
    commands.add_parser(
        "head", help="chain id, latest and finalized block of the node at TRACE_RPC_URL"
    ).set_defaults(func=cmd_head)
    partitions = commands.add_parser(
        "partitions", help="block-range partitions of the Dagster instance"
    ).add_subparsers(dest="action", required=True)
    partitions.add_parser(
        "sync", help="add every complete finalized range to the Dagster instance ($DAGSTER_HOME)"
    ).set_defaults(func=cmd_partitions_sync)
