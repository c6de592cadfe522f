"""The `trace` command (entry point `trace_assets.cli:main`): `build_parser` and `main`, with
one module per command group: `chain` (head, partitions sync), `backfill` (a backfill on
the running deployment), `gaps` (missing ranges),
`storage` (datasets, versions, gc, staging-cleanup), `quarantine` (versions judged wrong),
`db` (db upgrade/current), `access`
(token, public), `catalog` (docs, lineage), `alerts` (alerts rule/backtest, dlq),
`secrets` (secrets rotate), `taps` (wire taps, replay), `udf` (organisations' transforms),
`promote` (environment promotion), `leases` (the singletons' leader leases) and `history`
(a correlation id's message history); `errors` says how a command fails and `console`
prints its tables and progress.

The package may import trace_resources (and the rest of trace_assets), never trace_query_api
or trace_sensors (the contracts in pyproject.toml). The command modules import their heavy
dependencies inside the commands, so `trace --help` stays fast.

Every failure an operator can fix ends in one line on stderr and exit code 2 (`errors.explain`:
unknown names, missing services, bad settings, missing files); anything else is a bug in Trace,
reported in one line with exit code 70, and with its traceback under `--debug` or
`TRACE_DEBUG=1`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from trace_assets.cli import (
    access,
    alerts,
    backfill,
    catalog,
    chain,
    db,
    gaps,
    history,
    leases,
    promote,
    quarantine,
    secrets,
    storage,
    tables,
    taps,
    udf,
)
from trace_assets.cli.errors import explain

__all__ = ["build_parser", "main"]

# the description of `trace --help` (argparse folds the lines)
DESCRIPTION = """`trace`: the operator's command line (chain head, partitions, committed datasets,
GC, schema migrations)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description=DESCRIPTION)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of any failure (also TRACE_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (
        chain,
        backfill,
        gaps,
        storage,
        tables,
        taps,
        quarantine,
        db,
        access,
        catalog,
        alerts,
        secrets,
        udf,
        promote,
        leases,
        history,
    ):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TRACE_DEBUG", "") not in ("", "0", "false")
    try:
        from trace_resources.settings import get_settings

        return int(args.func(get_settings(), args))
    except KeyboardInterrupt:
        sys.stderr.write("trace: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        message = explain(exc)
        if message is not None:
            sys.stderr.write(f"trace: {message}\n")
            return 2
        sys.stderr.write(
            f"trace: unexpected {type(exc).__name__}: {exc} -- a bug in Trace; run again with "
            "--debug (or TRACE_DEBUG=1) for the traceback and report it\n"
        )
        return 70
