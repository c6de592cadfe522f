"""`trace history <correlation id>`: the path of one unit of work, hop by hop with timestamps,
from its finalized blocks through their commit to the alerts raised and their deliveries
(`trace_resources/event_history.py`), read from the state and the data database."""

from __future__ import annotations

import argparse
import json
import sys

from trace_assets.cli.console import table
from trace_resources.settings import Settings


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.cli.errors import CliError
    from trace_resources import event_history
    from trace_resources.alert_pipeline import tables as alert_tables
    from trace_resources.storage.state import engine_for

    try:
        correlation_id = event_history.check_correlation_id(args.correlation_id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    engines = [engine_for(settings.state_dsn), alert_tables.data_engine(settings.data_dsn)]
    hops = event_history.visible_to(event_history.read_hops(engines, correlation_id), args.org)
    if hops is None:
        scope = f" for org {args.org!r}" if args.org else ""
        sys.stderr.write(
            f"trace: no history for correlation id {correlation_id!r}{scope}: take the id "
            "from an alert (`correlation_id` in GET /v1/alerts or the alert's row)\n"
        )
        return 1
    if args.json:
        payload = {"correlation_id": correlation_id, "hops": [h.as_dict() for h in hops]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    start = hops[0].at
    table(
        ["at", "+s", "hop", "org", "process", "details"],
        [
            [
                f"{h.at:%Y-%m-%d %H:%M:%S.%f}"[:-3],
                f"{(h.at - start).total_seconds():.3f}",
                h.hop,
                h.org or "-",
                h.process,
                json.dumps(h.details, sort_keys=True, separators=(",", ":")),
            ]
            for h in hops
        ],
        right=["+s"],
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    history = commands.add_parser(
        "history",
        help="the path of one unit of work (correlation id), hop by hop with timestamps",
        description="Each hop one unit of work made under its correlation id: its finalized "
        "blocks, their commit, the alerts raised and each delivery attempt, in time order, "
        "with where (process) and when. Every hop was recorded in the transaction of the write "
        "it reports.",
    )
    history.add_argument("correlation_id", help="the id (an alert's correlation_id)")
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.add_argument(
        "--org", help="only what this organisation may see (its hops and the public ones)"
    )
    history.set_defaults(func=cmd_history)
