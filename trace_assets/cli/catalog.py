"""`trace docs` and `trace lineage impacted`: the dataset catalogue written from the
declarations, and the downstream datasets a column change reaches (and their re-runs),
organisations' applied transforms and uploaded enrichments included."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from trace_assets.cli.errors import CliError, require_dagster_home, unknown
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from trace_resources.registry import DatasetDeclaration


def cmd_docs(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.registry import catalogue_markdown

    text = catalogue_markdown()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as out:
            out.write(text)
        sys.stdout.write(f"wrote the dataset catalogue to {args.output}\n")
    return 0


def _with_transforms(settings: Settings) -> tuple[dict[str, DatasetDeclaration], str | None]:
    """The platform's declarations and the organisations' applied transforms; without them
    when Postgres state does not answer, and then why (for a warning)."""
    import sqlalchemy as sa

    from trace_resources.errors import SchemaNotCurrentError
    from trace_resources.registry import declarations
    from trace_resources.storage.state import engine_for
    from trace_resources.udfs import as_dataset_declaration
    from trace_resources.udfs.catalogue import registered_udfs
    from trace_resources.udfs.enrichments import enrichment_declarations

    decls = dict(declarations())
    try:
        udfs = registered_udfs(engine_for(settings.state_dsn))
        # the enrichments they read: lineage starts at an upload
        decls.update(enrichment_declarations(engine_for(settings.state_dsn)))
    except (sa.exc.SQLAlchemyError, SchemaNotCurrentError) as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return decls, f"organisations' transforms left out (Postgres state: {reason})"
    decls.update((name, as_dataset_declaration(udf)) for name, udf in udfs.items())
    return decls, None


def cmd_lineage_impacted(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.registry import impacted_datasets

    if args.partition and not args.launch:
        raise CliError("--partition chooses the ranges --launch redoes: give --launch too")
    if args.launch:
        require_dagster_home()
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    decls, left_out = _with_transforms(settings)
    impacted = impacted_datasets(args.dataset, columns, decls)
    if left_out is not None:  # after the answer's own errors, which stay one line
        sys.stderr.write(f"trace: warning: {left_out}\n")
    if not impacted:
        sys.stdout.write(f"no downstream dataset reads {args.dataset}.{{{','.join(columns)}}}\n")
        return 0
    for dataset, hit in impacted.items():
        sys.stdout.write(f"{dataset}\t{','.join(hit)}\n")
    if not args.launch:
        return 0
    import dagster as dg

    from trace_assets.definitions import build_resources
    from trace_assets.lineage import launch_impacted
    from trace_assets.partitions import block_ranges
    from trace_assets.udfs import load_udf_assets

    with dg.DagsterInstance.get() as instance:
        assert block_ranges.name is not None  # a dynamic partitions definition's name
        known = instance.get_dynamic_partitions(block_ranges.name)
        for key in args.partition or ():
            if key not in known:
                raise unknown("block range", key, known, where="of the Dagster instance")
        partitioned = [d for d in impacted if decls[d].partitioning == "block_range"]
        if partitioned and not known:
            raise CliError(
                f"{', '.join(partitioned)} are partitioned by block range, and the Dagster "
                "instance has no block ranges yet: run `trace partitions sync`"
            )
        results = launch_impacted(
            list(impacted),
            args.partition,
            build_resources(settings),
            instance,
            decls=decls,
            extra_assets=load_udf_assets(settings.state_dsn),
        )
    for result in results:
        sys.stdout.write(f"run {result.run_id}: {'success' if result.success else 'FAILED'}\n")
    return 0 if all(r.success for r in results) else 1


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    docs = commands.add_parser(
        "docs", help="write the dataset catalogue (Markdown) from the declarations"
    )
    docs.add_argument(
        "--output", default="-", metavar="FILE", help="file to write (default -: stdout)"
    )
    docs.set_defaults(func=cmd_docs)
    lineage = commands.add_parser(
        "lineage", help="column lineage between the declared datasets"
    ).add_subparsers(dest="action", required=True)
    impacted = lineage.add_parser(
        "impacted",
        help="downstream datasets that read the given columns (and --launch them)",
        description="Follow the declared column lineage from DATASET's COLUMNS, transitively, "
        "and list only the datasets with a column computed from them. With --launch, "
        "materialise exactly those (for --partition ranges, default every range) on the "
        "instance of $DAGSTER_HOME.",
    )
    impacted.add_argument("--dataset", required=True, help="the upstream dataset that changed")
    impacted.add_argument("--columns", required=True, help="changed columns, comma-separated")
    impacted.add_argument("--launch", action="store_true", help="materialise them")
    impacted.add_argument(
        "--partition", action="append", metavar="KEY", help="block range to redo (repeatable)"
    )
    impacted.set_defaults(func=cmd_lineage_impacted)
