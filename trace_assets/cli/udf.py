"""`trace udf validate|apply|list`: organisations' own transforms (SQL UDFs), declared in
YAML files, checked against what the organisation may read, stored as versions in Postgres
state; the Dagster code location builds an asset for each when it (re)loads (an apply reloads
the running deployment's when TRACE_DAGSTER_URL is set).

`trace enrich upload|list`: an organisation's enrichment datasets (CSV or Parquet rows as
`org_<org>__<name>`), the same path as `PUT /v1/enrichments/{name}`."""

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
    from trace_resources.udfs.reload import reload_code_location

    path = Path(args.file)
    stored = apply(
        engine_for(settings.state_dsn),
        path.read_text(),
        str(path),
        args.by or getpass.getuser(),
        base_dir=path.parent,
    )
    if stored.changed:
        outcome = reload_code_location(settings.dagster_url, settings.dagster_location)
        sys.stdout.write(f"applied {stored.name}: version {stored.version}; {outcome.message}\n")
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


def cmd_enrich_upload(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.cli.storage import _stores
    from trace_resources.udfs.enrichments import Limits, detect_format, parse_schema, upload

    path = Path(args.file)
    data = path.read_bytes()
    limits = Limits.from_settings(settings)
    store, versions = _stores(settings)
    done = upload(
        versions.engine,
        store,
        org=args.org,
        name=args.name,
        data=data,
        fmt=detect_format(data, args.format),
        schema=parse_schema(args.schema, limits) if args.schema else None,
        uploaded_by=args.by or getpass.getuser(),
        limits=limits,
        description=args.description,
    )
    what = "uploaded" if done.changed else "unchanged"
    sys.stdout.write(
        f"{what} {done.dataset}: version {done.version}, {done.rows} rows "
        f"({', '.join(f'{n} {t}' for n, t in done.columns)})\n"
    )
    return 0


def cmd_enrich_list(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage import enrichments
    from trace_resources.storage.state import engine_for

    found = enrichments.listed(engine_for(settings.state_dsn), args.org)
    table(
        ["enrichment", "org", "uploaded"],
        [[e.name, e.org, f"{e.updated_at:%Y-%m-%d %H:%M} by {e.uploaded_by}"] for e in found],
    )
    if not found:
        sys.stderr.write("no enrichment yet: `trace enrich upload FILE --org ORG --name NAME`\n")
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
    enrich = commands.add_parser(
        "enrich", help="organisations' enrichment datasets (uploaded CSV or Parquet)"
    ).add_subparsers(dest="action", required=True)
    up = enrich.add_parser(
        "upload",
        help="commit a CSV or Parquet file as the next version of org_<org>__<name>",
        description="Commit FILE's rows as the organisation's unpartitioned dataset "
        "org_<org>__<name> (replace mode: each upload is a new version), readable by that "
        "organisation only and joinable in its transforms.",
    )
    up.add_argument("file", help="the CSV or Parquet file")
    up.add_argument("--org", required=True, help="the organisation that owns it")
    up.add_argument("--name", required=True, help="the dataset's own name (e.g. labels)")
    up.add_argument(
        "--schema",
        help="name:type,... (e.g. address:binary,label:string); required for CSV (binary "
        "columns as 0x-hex), optional for Parquet",
    )
    up.add_argument("--format", choices=["csv", "parquet"], help="default: from the bytes")
    up.add_argument("--description", help="what the rows are")
    up.add_argument("--by", help="who uploads it (default: the current user)")
    up.set_defaults(func=cmd_enrich_upload)
    listing = enrich.add_parser("list", help="the enrichment datasets")
    listing.add_argument("--org", help="one organisation")
    listing.set_defaults(func=cmd_enrich_list)
