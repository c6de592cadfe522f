"""The `trace` command (entry point `trace_assets.cli:main`): `build_parser` and `main`, with
one module per command group: `chain` (head, partitions sync), `gaps` (missing ranges),
`storage` (datasets, versions, gc, staging-cleanup), `db` (db upgrade/current), `access`
(token, public), `catalog` (docs, lineage), `alerts` (alerts rule/backtest, dlq) and
`secrets` (secrets rotate).

The package may import trace_resources (and the rest of trace_assets), never trace_query_api
or trace_sensors (the contracts in pyproject.toml). The command modules import their heavy
dependencies inside the commands, so `trace --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trace_assets.cli import access, alerts, catalog, chain, db, gaps, secrets, storage
from trace_resources.errors import TraceError
from trace_resources.settings import get_settings

__all__ = ["build_parser", "main"]

# the description of `trace --help` (argparse folds the lines)
DESCRIPTION = """`trace`: the operator's command line (chain head, partitions, committed datasets,
GC, schema migrations)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (chain, gaps, storage, db, access, catalog, alerts, secrets):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(get_settings(), args))
    except TraceError as exc:
        sys.stderr.write(f"trace: {type(exc).__name__}: {exc}\n")
        return 2
