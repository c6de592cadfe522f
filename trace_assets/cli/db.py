"""`trace db upgrade` and `trace db current`: the Alembic schema migrations of Postgres
state and data."""

from __future__ import annotations

import argparse
import sys

from trace_assets.cli.errors import SERVICES_UP, CliError
from trace_resources.settings import Settings


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import make_url
    from sqlalchemy.exc import OperationalError

    from trace_resources.storage import migrations

    dsns = {
        "state": args.state_dsn or settings.state_dsn,
        "data": args.data_dsn or settings.data_dsn,
    }
    databases: list[migrations.Database] = (
        ["state", "data"] if args.database == "all" else [args.database]
    )
    behind = 0
    for database in databases:
        where = make_url(dsns[database]).render_as_string(hide_password=True)
        try:
            if args.action == "upgrade":
                revision: str | None = migrations.upgrade(dsns[database], database)
            else:
                revision = migrations.current(dsns[database])
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc
            raise CliError(
                f"Postgres {database} at {where} does not answer ({reason}): {SERVICES_UP}, "
                f"or check --{database}-dsn / TRACE_{database.upper()}_DSN"
            ) from exc
        head = migrations.head(database)
        if revision == head:
            status = "head"
        elif migrations.is_newer(database, revision):
            status = f"newer than this code's {head}: a newer release migrated it; ok"
        else:
            status = f"head is {head}: run `trace db upgrade`"
            behind += 1
        sys.stdout.write(f"{database} {where}: {revision or 'not migrated'} ({status})\n")
    return 1 if behind else 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser(
        "db", help="schema migrations of Postgres state and data"
    ).add_subparsers(dest="action", required=True)
    upgrade = db.add_parser(
        "upgrade",
        help="bring the databases to the schema this code needs (safe to repeat)",
        description="Run the Alembic migrations of Postgres state and data up to the head "
        "revision, each database in one transaction. Keeps every row; safe to repeat and to "
        "run while another upgrade runs. Trace's processes refuse a database behind the head "
        "revision (one a newer release migrated further is accepted).",
    )
    current = db.add_parser(
        "current", help="the schema revision of each database (exit 1 if one is behind)"
    )
    for sub in (upgrade, current):
        sub.add_argument(
            "--database",
            choices=["state", "data", "all"],
            default="all",
            help="which database (default: all)",
        )
        sub.add_argument("--state-dsn", help="Postgres state URL (default: TRACE_STATE_DSN)")
        sub.add_argument("--data-dsn", help="Postgres data URL (default: TRACE_DATA_DSN)")
        sub.set_defaults(func=cmd_db)
