"""`trace gaps`: the finalized block ranges a dataset or an alert evaluation lacks, and why.

Reads the finalized head from the RPC node, the committed versions from Postgres state and the
runs and materializations from the Dagster instance ($DAGSTER_HOME). Exit code 0 when nothing
is missing, 1 when something is (the gap-repair sensor re-requests those ranges)."""

from __future__ import annotations

import argparse
import json
import sys

from trace_assets.cli.errors import require_dagster_home
from trace_resources.settings import Settings


def cmd_gaps(settings: Settings, args: argparse.Namespace) -> int:
    import dagster as dg

    from trace_assets.cli.chain import _chain
    from trace_assets.gaps import GAP_SCOPE
    from trace_resources.gaps import finalized_keys, find_gaps
    from trace_resources.storage.state import engine_for

    require_dagster_home()
    client = _chain(settings)
    try:
        head = client.head()
    finally:
        client.close()
    keys = finalized_keys(head.finalized, settings.range_size)
    with dg.DagsterInstance.get() as instance:
        gaps = find_gaps(instance, engine_for(settings.state_dsn), GAP_SCOPE, keys)
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "finalized": head.finalized,
                    "range_size": settings.range_size,
                    "ranges": len(keys),
                    "missing": [g.as_json() for g in gaps],
                },
                indent=2,
            )
            + "\n"
        )
        return 1 if gaps else 0
    if not gaps:
        sys.stdout.write(
            f"no gaps: all {len(keys)} range(s) up to finalized block {head.finalized} "
            f"(range size {settings.range_size}) are sealed and evaluated\n"
        )
        return 0
    ranges = {g.partition_key for g in gaps}
    lines = [
        f"{len(ranges)} of {len(keys)} range(s) up to finalized block {head.finalized} "
        f"(range size {settings.range_size}) have gaps, {len(gaps)} in all:"
    ]
    for asset in GAP_SCOPE.assets:
        mine = [g for g in gaps if g.asset == asset]
        if mine:
            lines.append(f"{asset}: {len(mine)} missing")
            lines.extend(f"  {g.partition_key}  {g.reason()}" for g in mine)
    sys.stdout.write("\n".join(lines) + "\n")
    return 1


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "gaps",
        help="finalized block ranges a dataset (no sealed version) or the alert evaluation "
        "(no success) lacks, with the reason; exit 1 if any",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.set_defaults(func=cmd_gaps)
