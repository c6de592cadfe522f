"""`trace datasets`, `trace versions`, `trace gc`, `trace staging-cleanup` and `trace compact`:
the committed datasets and their versions, the removal of superseded versions and of staged
files, and the compaction of open (append-mode) partitions."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from trace_assets.cli.console import progress, table
from trace_assets.cli.errors import CliError, unknown
from trace_resources.errors import TraceError
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from trace_resources.freshness import DatasetLag
    from trace_resources.storage.gc import GarbageCollector
    from trace_resources.storage.object_store import ObjectStore
    from trace_resources.storage.read_model import DatasetSummary
    from trace_resources.storage.version_store import VersionStore


def cmd_datasets(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.chain.extract import ChainClient
    from trace_resources.chain.rpc import RetryPolicy
    from trace_resources.freshness import dataset_lags
    from trace_resources.registry import declarations
    from trace_resources.storage.read_model import ReadModel
    from trace_resources.storage.state import engine_for

    read = ReadModel(engine_for(settings.state_dsn))
    rows = read.dataset_summaries()
    block_range = [
        r.dataset
        for r in rows
        if (d := declarations().get(r.dataset)) is not None and d.partitioning == "block_range"
    ]
    lags: dict[str, DatasetLag] = {}
    unreachable = None
    if block_range:
        # a short budget: the table is still useful without the chain
        client = ChainClient(
            settings.rpc_url,
            settings.chain_id,
            timeout_s=min(settings.rpc_timeout_s, 5.0),
            retry=RetryPolicy(max_attempts=2, budget_s=5.0),
            endpoints=settings.endpoints(),
        )
        try:
            lags = {lag.dataset: lag for lag in dataset_lags(read, client, block_range)}
        except TraceError as exc:  # the table is still useful without the chain
            unreachable = str(exc)
        finally:
            client.close()
    if args.json:
        out = [
            {**r.__dict__, "freshness": lags[r.dataset].as_dict() if r.dataset in lags else None}
            for r in rows
        ]
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    table(
        ["dataset", "partitions", "rows", "bytes", "versions", "head block", "lag blocks", "lag s"],
        [_dataset_row(r, lags.get(r.dataset)) for r in rows],
        right=["partitions", "rows", "bytes", "versions", "head block", "lag blocks", "lag s"],
    )
    if not rows:
        sys.stderr.write("no dataset is committed yet\n")
    if lags:
        finalized = next(iter(lags.values())).finalized
        sys.stdout.write(
            f"lag: blocks and seconds of chain time behind the finalized head {finalized} "
            "(the head follower keeps the block-range datasets within seconds of it)\n"
        )
    if unreachable:
        sys.stderr.write(f"lag unknown: the chain did not answer ({unreachable})\n")
    return 0


def _dataset_row(r: DatasetSummary, lag: DatasetLag | None) -> list[object]:
    return [
        r.dataset,
        r.partitions,
        f"{r.rows:,}",
        f"{r.bytes:,}",
        r.versions,
        lag.head_block if lag else None,
        lag.lag_blocks if lag else None,
        f"{lag.lag_seconds:.0f}" if lag and lag.lag_seconds is not None else None,
    ]


def known_datasets(versions: VersionStore) -> list[str]:
    """Every dataset that exists: declared, or committed (or written to) under this state."""
    from trace_resources.registry import declarations

    return sorted(set(declarations()) | set(versions.retention.known_datasets()))


def check_datasets(names: list[str] | None, versions: VersionStore) -> None:
    """Refuse a dataset name that does not exist, listing those that do."""
    if not names:
        return
    known = known_datasets(versions)
    for name in names:
        if name not in known:
            raise unknown("dataset", name, known)


def check_partitions(dataset: str, keys: list[str] | None, versions: VersionStore) -> None:
    """Refuse a partition the dataset has never committed, naming the closest ones."""
    if not keys:
        return
    existing = [p.partition_key for p in versions.read.partition_summaries([dataset])]
    for key in keys:
        if key not in existing:
            raise unknown("partition", key, existing, where=f"of {dataset}")


def cmd_versions(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore

    versions = VersionStore(engine_for(settings.state_dsn))
    check_datasets([args.dataset], versions)
    check_partitions(args.dataset, [args.partition] if args.partition else None, versions)
    history = versions.read.version_history(args.dataset, args.partition)
    if not history:
        sys.stderr.write(f"{args.dataset} has no committed version yet\n")
        return 0
    table(
        ["", "partition", "version", "mode", "rows", "bytes", "committed"],
        [
            [
                "*" if v["current"] else "",
                v["partition_key"],
                f"v{v['version']}",
                v["commit_mode"],
                f"{v['row_count']:,}",
                f"{v['byte_count']:,}",
                f"{v['created_at']:%Y-%m-%d %H:%M:%S}",
            ]
            for v in history
        ],
        right=["rows", "bytes"],
    )
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `7d` (or plain seconds) as a timedelta."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use e.g. 90s, 30m, 12h or 7d"
        ) from None


def _stores(settings: Settings) -> tuple[ObjectStore, VersionStore]:
    from trace_resources.storage.object_store import local_store, s3_store
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore

    if settings.object_store == "local":
        store = local_store(settings.local_store_root, settings.bucket_datasets)
    else:  # credentials from the AWS chain (AWS_ACCESS_KEY_ID, ... or an instance role)
        store = s3_store(
            settings.bucket_datasets,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
        )
    return store, VersionStore(engine_for(settings.state_dsn))


def garbage_collector(settings: Settings) -> GarbageCollector:
    from trace_resources.storage.gc import GarbageCollector

    return GarbageCollector(*_stores(settings))


def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.compaction import Compactor

    store, versions = _stores(settings)
    check_datasets([args.dataset], versions)
    check_partitions(args.dataset, args.partition, versions)
    open_keys = versions.read.open_partitions(args.dataset)
    sealed = [key for key in args.partition or () if key not in open_keys]
    if sealed:
        raise CliError(
            f"partition {sealed[0]} of {args.dataset} is sealed (replace mode): only open "
            f"(append) partitions are compacted; open ones: {', '.join(open_keys) or 'none'}"
        )
    keys = args.partition or open_keys
    if not keys:
        sys.stdout.write(f"compact: {args.dataset} has no open partition\n")
    with Compactor(store, versions) as compactor, progress("compact", len(keys)) as bar:
        for key in keys:
            report = compactor.compact_open(args.dataset, key, min_segments=args.min_segments)
            sys.stdout.write(report.line() + "\n")
            bar.advance(key)
    return 0


def cmd_gc(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.gc import GcPolicy

    if args.policy:
        return _gc_by_policy(settings, args)
    policy = GcPolicy(
        keep_last=2 if args.keep_last is None else args.keep_last,
        older_than=timedelta(days=1) if args.older_than is None else args.older_than,
    )
    collector = garbage_collector(settings)
    check_datasets(args.dataset, collector.versions)
    names = collector.datasets(args.dataset or None)
    with progress("gc", len(names)) as bar:
        report = collector.collect(policy, apply=args.apply, datasets=names, progress=bar.advance)
    for line in report.lines():
        sys.stdout.write(line + "\n")
    return 0


def _gc_by_policy(settings: Settings, args: argparse.Namespace) -> int:
    """`trace gc --policy`: each dataset under its declared retention policy, as the
    `retention_gc_schedule` applies it (the same plan, then the same removal)."""
    from trace_resources import auto_gc
    from trace_resources.registry import load_declarations

    if args.keep_last is not None or args.older_than is not None:
        raise CliError(
            "--policy applies each dataset's declared `retention:`; drop --keep-last and "
            "--older-than (or drop --policy to give one policy for all datasets)"
        )
    collector = garbage_collector(settings)
    check_datasets(args.dataset, collector.versions)
    decls = load_declarations(args.declarations) if args.declarations else None
    plans = auto_gc.plan(collector, decls, datasets=args.dataset or None)
    if args.apply:
        plans = auto_gc.apply_plan(collector, plans)
    for line in auto_gc.lines(plans):
        sys.stdout.write(line + "\n")
    return 0


def cmd_staging_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    collector = garbage_collector(settings)
    check_datasets(args.dataset, collector.versions)
    names = collector.datasets(args.dataset or None)
    with progress("staging-cleanup", len(names)) as bar:
        report = collector.cleanup_staging(
            grace=args.grace, apply=args.apply, datasets=names, progress=bar.advance
        )
    for line in report.lines():
        sys.stdout.write(line + "\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    datasets = commands.add_parser(
        "datasets",
        help="committed datasets: partitions, rows, bytes, versions, lag behind the chain",
    )
    datasets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    datasets.set_defaults(func=cmd_datasets)
    versions = commands.add_parser("versions", help="version history of a dataset ('*': current)")
    versions.add_argument("dataset", help="a dataset name, e.g. logs (`trace datasets` lists them)")
    versions.add_argument(
        "--partition", metavar="KEY", help="only this partition, e.g. 000000000000-000000000249"
    )
    versions.set_defaults(func=cmd_versions)
    gc = commands.add_parser(
        "gc",
        help="remove superseded dataset versions (dry run unless --apply)",
        description="Remove superseded versions beyond the newest --keep-last of each partition "
        "and superseded more than --older-than ago, and the files only they reference. Never "
        "touches a current version, a version a reader has pinned, or a live attempt; safe "
        "while writers work. Without --apply, prints what it would remove.",
    )
    gc.add_argument("--apply", action="store_true", help="remove (default: dry run)")
    gc.add_argument(
        "--keep-last",
        type=_positive,
        default=None,
        metavar="N",
        help="versions kept per partition, the current one included (default 2)",
    )
    gc.add_argument(
        "--older-than",
        type=_duration,
        default=None,
        metavar="AGE",
        help="remove only versions superseded more than AGE ago, e.g. 12h, 7d (default 1d)",
    )
    gc.add_argument(
        "--policy",
        action="store_true",
        help="use each dataset's declared `retention:` policy instead (what the daily "
        "retention_gc_schedule applies); datasets without one are kept whole",
    )
    gc.add_argument(
        "--declarations",
        metavar="DIR",
        help="with --policy: read the policies from the declarations (*.yaml) in DIR, e.g. to "
        "see what a policy change would remove before shipping it (default: the shipped ones)",
    )
    gc.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    gc.set_defaults(func=cmd_gc)

    cleanup = commands.add_parser(
        "staging-cleanup",
        help="remove files of failed, fenced and expired attempts and orphans (dry run unless "
        "--apply)",
        description="Mark attempts whose lease expired abandoned, then remove the files of "
        "attempts that can never commit, files no kept version references, and orphan files "
        "no attempt knows that are older than --grace. Never touches a live attempt's files or "
        "a committed file; safe while writers work.",
    )
    cleanup.add_argument("--apply", action="store_true", help="remove (default: dry run)")
    cleanup.add_argument(
        "--grace",
        type=_duration,
        default=timedelta(hours=1),
        metavar="AGE",
        help="leave orphan files younger than AGE (default 1h)",
    )
    cleanup.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    cleanup.set_defaults(func=cmd_staging_cleanup)

    compact = commands.add_parser(
        "compact",
        help="merge the live append segments of open partitions into one file each",
        description="For each open (append-mode) partition of DATASET (or the given ones) "
        "with at least --min-segments live segments, merge them into one Parquet file and "
        "commit it as a new version; the rows are unchanged. Safe while appends land; a "
        "partition sealed meanwhile is left alone.",
    )
    compact.add_argument("dataset", help="the append-mode dataset to compact")
    compact.add_argument(
        "--partition", action="append", metavar="KEY", help="only this open partition (repeatable)"
    )
    compact.add_argument(
        "--min-segments",
        type=_positive,
        default=1,
        metavar="N",
        help="compact only partitions with at least N live segments (default 1)",
    )
    compact.set_defaults(func=cmd_compact)
