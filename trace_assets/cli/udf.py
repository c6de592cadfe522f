"""`trace udf validate|apply|list`: organisations' own transforms (SQL UDFs), declared in
YAML files, checked against what the organisation may read, stored as versions in Postgres
state; the Dagster code location builds an asset for each when it (re)loads."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from trace_assets.cli.console import table
from trace_assets.cli.errors import unknown
from trace_resources.settings import Settings

__all__ = ["add_commands"]

RELOAD_HINT = (
    "reload the code location to materialise it (Dagster UI: Deployment > Reload; a new "
    "`dagster` command loads it at start)"
)


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.state import engine_for
    from trace_resources.udfs.registry import validate

    path = Path(args.file)
    decl = validate(
        engine_for(settings.state_dsn), path.read_text(), str(path), base_dir=path.parent
    )
    sys.stdout.write(
        f"{path}: {decl.name} is valid ({decl.partitioning}, {decl.mode}; reads "
        f"{', '.join(i.dataset for i in decl.inputs)}; {len(decl.columns)} columns, "
        f"{len(decl.quality)} quality rule(s))\n"
    )
    return 0


def cmd_apply(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.state import engine_for
    from trace_resources.udfs.registry import apply

    path = Path(args.file)
    stored = apply(
        engine_for(settings.state_dsn),
        path.read_text(),
        str(path),
        args.by or getpass.getuser(),
        base_dir=path.parent,
    )
    if stored.changed:
        sys.stdout.write(f"applied {stored.name}: version {stored.version}; {RELOAD_HINT}\n")
    else:
        sys.stdout.write(f"unchanged {stored.name}: version {stored.version} is this file\n")
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage import udfs as udf_store
    from trace_resources.storage.state import engine_for

    engine = engine_for(settings.state_dsn)
    if args.org is not None:
        orgs = {s.org for s in udf_store.latest(engine)}
        if args.org not in orgs:
            raise unknown("organisation", args.org, orgs, where="with transforms")
    stored = udf_store.latest(engine, args.org)
    if args.json:
        rows = [
            {
                "name": s.name,
                "version": s.version,
                "org": s.org,
                "applied_by": s.applied_by,
                "applied_at": s.created_at.isoformat(),
                "declaration": s.declaration,
            }
            for s in stored
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table(
        ["transform", "version", "partitioning", "mode", "inputs", "applied"],
        [
            [
                s.name,
                f"v{s.version}",
                s.declaration["partitioning"],
                s.declaration["mode"],
                ", ".join(i["dataset"] for i in s.declaration["inputs"]),
                f"{s.created_at:%Y-%m-%d %H:%M} by {s.applied_by}",
            ]
            for s in stored
        ],
    )
    if not stored:
        sys.stderr.write("no transform yet: `trace udf apply FILE`\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    udf = commands.add_parser(
        "udf", help="organisations' own transforms (SQL UDFs)"
    ).add_subparsers(dest="action", required=True)
    check = udf.add_parser("validate", help="check a transform's YAML file (nothing is stored)")
    check.add_argument("file", help="the declaration (.yaml)")
    check.set_defaults(func=cmd_validate)
    put = udf.add_parser("apply", help="validate and store a transform's next version")
    put.add_argument("file", help="the declaration (.yaml)")
    put.add_argument("--by", help="who applies it (default: the current user)")
    put.set_defaults(func=cmd_apply)
    listing = udf.add_parser("list", help="the newest version of every transform")
    listing.add_argument("--org", help="one organisation")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)
