"""`trace`: the operator's command line (chain head, partitions, committed datasets)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from trace_resources.errors import TraceError
from trace_resources.settings import Settings, get_settings

__all__ = ["main"]


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


def cmd_datasets(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.catalog import summarise_datasets
    from trace_resources.storage.state import engine_for

    rows = summarise_datasets(engine_for(settings.state_dsn))
    if args.json:
        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"{'dataset':<14}{'partitions':>11}{'rows':>12}{'bytes':>14}{'versions':>10}\n"
    )
    for r in rows:
        sys.stdout.write(
            f"{r.dataset:<14}{r.partitions:>11}{r.rows:>12,}{r.bytes:>14,}{r.versions:>10}\n"
        )
    return 0


def cmd_versions(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.catalog import version_history
    from trace_resources.storage.state import engine_for

    for v in version_history(engine_for(settings.state_dsn), args.dataset, args.partition):
        mark = "*" if v["current"] else " "
        sys.stdout.write(
            f"{mark} {v['partition_key']} v{v['version']:<4} {v['commit_mode']:<8} "
            f"{v['row_count']:>10,} rows {v['byte_count']:>12,} bytes  "
            f"{v['created_at']:%Y-%m-%d %H:%M:%S}\n"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("head", help="chain id, latest and finalized block").set_defaults(
        func=cmd_head
    )
    partitions = commands.add_parser("partitions", help="block-range partitions").add_subparsers(
        dest="action", required=True
    )
    partitions.add_parser(
        "sync", help="add every complete finalized range to the Dagster instance ($DAGSTER_HOME)"
    ).set_defaults(func=cmd_partitions_sync)
    datasets = commands.add_parser("datasets", help="committed datasets: partitions, rows, bytes")
    datasets.add_argument("--json", action="store_true", help="print JSON")
    datasets.set_defaults(func=cmd_datasets)
    versions = commands.add_parser("versions", help="version history of a dataset ('*': current)")
    versions.add_argument("dataset")
    versions.add_argument("--partition", help="one partition key")
    versions.set_defaults(func=cmd_versions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(get_settings(), args))
    except TraceError as exc:
        sys.stderr.write(f"trace: {type(exc).__name__}: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
