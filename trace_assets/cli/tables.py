"""`trace tables`: the datasets as open (Apache Iceberg) tables, and `trace tables publish`.

Every committed version is published as a snapshot of its dataset's Iceberg table in the SQL
catalog on the state database (`trace_resources.storage.iceberg`), by the
`iceberg_publish_sensor` or by `trace tables publish`; `trace tables` lists each table's catalog
identifier and metadata location (what Spark, Trino, DuckDB or pyiceberg open) and the last
version published.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from trace_assets.cli.console import table
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from trace_resources.storage.iceberg import IcebergPublisher


def _publisher(settings: Settings) -> IcebergPublisher:
    """The publisher of the settings' state database and datasets bucket (no Dagster import:
    the command starts in a second rather than five)."""
    from trace_resources.storage.iceberg import IcebergPublisher, open_catalog
    from trace_resources.storage.object_store import local_store, s3_store
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore

    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if settings.object_store == "local":
        store = local_store(settings.local_store_root, settings.bucket_datasets)
    else:
        store = s3_store(
            settings.bucket_datasets,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key=key,
            secret_key=secret,
        )
    catalog = open_catalog(
        settings.state_dsn,
        f"{store.uri_prefix}/_iceberg",
        endpoint_url=settings.s3_endpoint_url if settings.object_store == "s3" else None,
        access_key=key,
        secret_key=secret,
        region=settings.s3_region,
    )
    return IcebergPublisher(VersionStore(engine_for(settings.state_dsn)), store, catalog)


def cmd_tables(settings: Settings, args: argparse.Namespace) -> int:
    publisher = _publisher(settings)
    infos = publisher.tables()
    pending = len(publisher.pending())
    if args.json:
        out = {"catalog": "sql", "pending": pending, "tables": [i.__dict__ for i in infos]}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    table(
        ["dataset", "table", "catalog URI (metadata)", "last published", "snapshot", "snapshots"],
        [
            [
                i.dataset,
                i.identifier,
                i.metadata_location or "-",
                f"{i.last_partition} v{i.last_version}",
                str(i.snapshot_id),
                str(i.published),
            ]
            for i in infos
        ],
        right=["snapshots"],
    )
    sys.stderr.write(
        f"{pending} committed version(s) not yet published"
        + (" (`trace tables publish`)\n" if pending else "\n")
    )
    return 0


def cmd_tables_publish(settings: Settings, args: argparse.Namespace) -> int:
    publisher = _publisher(settings)
    outcome = publisher.publish(limit=args.limit)
    sys.stdout.write(outcome.summary() + "\n")
    if outcome.busy:
        return 1
    for dataset, ids in publisher.expire_unservable().items():
        sys.stdout.write(f"{dataset}: expired {len(ids)} snapshot(s) of versions GC removed\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tables = commands.add_parser(
        "tables", help="the datasets as Apache Iceberg tables (SQL catalog on the state database)"
    )
    tables.add_argument("--json", action="store_true", help="print JSON")
    tables.set_defaults(func=cmd_tables)
    actions = tables.add_subparsers(dest="action")
    publish = actions.add_parser(
        "publish",
        help="publish committed versions not yet published as Iceberg snapshots, in commit "
        "order; expire the snapshots of versions GC removed",
    )
    publish.add_argument(
        "--limit", type=int, default=500, help="at most this many versions (default 500)"
    )
    publish.set_defaults(func=cmd_tables_publish)
