"""`trace leases`: the singletons' leader leases (who holds which, its fencing token and when
it expires), from Postgres state (`trace_resources/leases.py`)."""

from __future__ import annotations

import argparse
import json
import sys

from trace_assets.cli.console import table
from trace_resources.settings import Settings


def cmd_leases(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.leases import lease_rows
    from trace_resources.storage.state import engine_for

    rows = lease_rows(engine_for(settings.state_dsn))
    if args.json:
        payload = [
            {
                "name": r.name,
                "holder": r.holder,
                "token": r.token,
                "acquired_at": r.acquired_at.isoformat(),
                "renewed_at": r.renewed_at.isoformat(),
                "expires_at": r.expires_at.isoformat(),
                "expires_in_s": round(r.expires_in_s, 3),
                "live": r.live,
            }
            for r in rows
        ]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    if not rows:
        sys.stderr.write("no leader lease taken yet (no singleton has run)\n")
        return 0
    table(
        ["lease", "holder", "token", "state", "expires", "acquired"],
        [
            [
                r.name,
                r.holder,
                r.token,
                f"held, {r.expires_in_s:.1f} s left" if r.live else "expired (free)",
                f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
                f"{r.acquired_at:%Y-%m-%d %H:%M:%S}",
            ]
            for r in rows
        ],
        right=["token"],
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    leases = commands.add_parser(
        "leases",
        help="leader leases of the singletons: holder, fencing token, expiry",
        description="Which copy of each singleton (the head follower of a chain, ...) holds its "
        "leader lease, the lease's fencing token (it grows by one at each takeover) and when "
        "it expires by the database clock. An expired lease is taken by the next standby.",
    )
    leases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    leases.set_defaults(func=cmd_leases)
