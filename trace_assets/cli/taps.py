"""`trace taps`: the declared wire taps (TRACE_TAPS) with their counters (offered, written,
dropped, failed), and `trace taps replay`, which re-sends a tap's records to a consumer.
"""

from __future__ import annotations

import argparse
import json
import sys

from trace_assets.cli.console import table
from trace_assets.cli.errors import unknown
from trace_resources.settings import Settings, TapConfig


def _tap(settings: Settings, name: str) -> TapConfig:
    taps = settings.tap_configs()
    for tap in taps:
        if tap.name == name:
            return tap
    raise unknown("tap", name, [t.name for t in taps], hint="taps are declared in TRACE_TAPS")


def cmd_taps(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.taps import load_counters

    declared = settings.tap_configs()
    counters = load_counters(engine_for(settings.state_dsn))
    rows = []
    for tap in declared:
        mine = [c for c in counters if c.tap == tap.name]
        errors = [c.last_error for c in mine if c.last_error]
        rows.append(
            {
                "tap": tap.name,
                "source": tap.source,
                "to": tap.to,
                "select": list(tap.select),
                "producers": len(mine),
                "offered": sum(c.offered for c in mine),
                "written": sum(c.written for c in mine),
                "dropped": sum(c.dropped for c in mine),
                "failed": sum(c.failed for c in mine),
                "last_error": errors[-1] if errors else None,
                "updated_at": max((c.updated_at for c in mine if c.updated_at), default=None),
            }
        )
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return 0
    if not rows:
        sys.stderr.write("no taps declared (TRACE_TAPS)\n")
        return 0
    numbers = ["producers", "offered", "written", "dropped", "failed"]
    table(
        ["tap", "source", "to", *numbers, "last error"],
        [
            [r["tap"], r["source"], r["to"], *(str(r[n]) for n in numbers), r["last_error"] or "-"]
            for r in rows
        ],
        right=numbers,
    )
    return 0


def cmd_taps_replay(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.taps.replay import parse_since, replay

    tap = _tap(settings, args.tap)
    outcome = replay(settings, tap, args.to, since=parse_since(args.since))
    gaps = f"; {outcome.gaps} event(s) the tap had dropped are missing" if outcome.gaps else ""
    sys.stdout.write(
        f"replayed {outcome.sent} record(s) of tap {tap.name} from {outcome.producers} "
        f"producer(s) to {args.to}{gaps}\n"
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    taps = commands.add_parser(
        "taps", help="wire taps (TRACE_TAPS): their counters, and replay of their records"
    )
    taps.add_argument("--json", action="store_true", help="print JSON")
    taps.set_defaults(func=cmd_taps)
    actions = taps.add_subparsers(dest="action")
    replay = actions.add_parser(
        "replay", help="re-send an s3:// tap's records to a queue or a webhook consumer, in order"
    )
    replay.add_argument("tap", help="the tap's name")
    replay.add_argument(
        "--to", required=True, help="sqs://<queue name> or the consumer's http(s):// URL"
    )
    replay.add_argument(
        "--since", help="only records offered at or after this time (ISO-8601 or Unix seconds)"
    )
    replay.set_defaults(func=cmd_taps_replay)
