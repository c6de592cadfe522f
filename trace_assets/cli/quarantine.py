"""`trace quarantine list`: committed versions judged wrong and replaced.

A committed range whose boundary hash its neighbour and the chain contradict is extracted
again and replaced (`trace_assets.raw.boundary_repair`); the wrong version is recorded with
the check that caught it, the block, the endpoint that served it and when. Its files stay
until `trace gc` removes them like any superseded version's.
"""

from __future__ import annotations

import argparse
import json
import sys

from trace_assets.cli.console import table
from trace_assets.cli.storage import check_datasets
from trace_resources.settings import Settings


def cmd_quarantine_list(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore

    versions = VersionStore(engine_for(settings.state_dsn))
    check_datasets(args.dataset, versions)
    records = versions.quarantine.listed(args.dataset)
    if args.json:
        out = [{**r.__dict__, "created_at": r.created_at} for r in records]
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    table(
        ["dataset", "partition", "version", "replaced by", "check", "block", "endpoint", "when"],
        [
            [
                r.dataset,
                r.partition_key,
                f"v{r.version}",
                f"v{r.replaced_by}",
                r.check,
                str(r.block),
                r.endpoint or "-",
                f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else "-",
            ]
            for r in records
        ],
        right=["block"],
    )
    if not records:
        sys.stderr.write("no version is quarantined\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quarantine = commands.add_parser(
        "quarantine", help="committed versions judged wrong and replaced"
    )
    actions = quarantine.add_subparsers(dest="action", required=True)
    listed = actions.add_parser(
        "list",
        help="quarantined versions, newest first: the check that caught each, the block, the "
        "endpoint that served it, its replacement",
    )
    listed.add_argument(
        "--dataset", action="append", help="only this dataset (repeatable; `trace datasets`)"
    )
    listed.add_argument("--json", action="store_true", help="print JSON (with each detail)")
    listed.set_defaults(func=cmd_quarantine_list)
