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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser(
        "head", help="chain id, latest and finalized block of the node at TRACE_RPC_URL"
    ).set_defaults(func=cmd_head)
    partitions = commands.add_parser(
        "partitions", help="block-range partitions of the Dagster instance"
    ).add_subparsers(dest="action", required=True)
    partitions.add_parser(
        "sync", help="add every complete finalized range to the Dagster instance ($DAGSTER_HOME)"
    ).set_defaults(func=cmd_partitions_sync)
