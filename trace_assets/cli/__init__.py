"""`trace`: the operator's command line (chain head, partitions, committed datasets, GC,
schema migrations)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from trace_resources.errors import TraceError
from trace_resources.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from trace_resources.storage.gc import GarbageCollector

__all__ = ["main"]


def _chain(settings: Settings):  # type: ignore[no-untyped-def]
    from trace_resources.chain.extract import ChainClient
    from trace_resources.chain.rpc import RetryPolicy

    return ChainClient(
        settings.rpc_url,
        settings.chain_id,
        timeout_s=settings.rpc_timeout_s,
        retry=RetryPolicy(
            max_attempts=settings.rpc_max_attempts, budget_s=settings.rpc_retry_budget_s
        ),
    )


def cmd_head(settings: Settings, args: argparse.Namespace) -> int:
    client = _chain(settings)
    try:
        head = client.head()
    finally:
        client.close()
    sys.stdout.write(
        f"chain {head.chain_id}: latest {head.latest}, finalized {head.finalized}, "
        f"range size {settings.range_size}\n"
    )
    return 0


def cmd_partitions_sync(settings: Settings, args: argparse.Namespace) -> int:
    import dagster as dg

    from trace_assets.partitions import add_finalized_partitions

    client = _chain(settings)
    try:
        head = client.head()
    finally:
        client.close()
    with dg.DagsterInstance.get() as instance:
        added = add_finalized_partitions(instance, head.finalized, settings.range_size)
    sys.stdout.write(
        f"added {len(added)} block range(s) up to finalized block {head.finalized}"
        + (f": {added[0]} .. {added[-1]}\n" if added else "\n")
    )
    return 0


def cmd_datasets(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.read_model import ReadModel
    from trace_resources.storage.state import engine_for

    rows = ReadModel(engine_for(settings.state_dsn)).dataset_summaries()
    if args.json:
        sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"{'dataset':<14}{'partitions':>11}{'rows':>12}{'bytes':>14}{'versions':>10}\n"
    )
    for r in rows:
        sys.stdout.write(
            f"{r.dataset:<14}{r.partitions:>11}{r.rows:>12,}{r.bytes:>14,}{r.versions:>10}\n"
        )
    return 0


def cmd_versions(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.read_model import ReadModel
    from trace_resources.storage.state import engine_for

    for v in ReadModel(engine_for(settings.state_dsn)).version_history(
        args.dataset, args.partition
    ):
        mark = "*" if v["current"] else " "
        sys.stdout.write(
            f"{mark} {v['partition_key']} v{v['version']:<4} {v['commit_mode']:<8} "
            f"{v['row_count']:>10,} rows {v['byte_count']:>12,} bytes  "
            f"{v['created_at']:%Y-%m-%d %H:%M:%S}\n"
        )
    return 0


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


def _garbage_collector(settings: Settings) -> GarbageCollector:
    from trace_resources.storage.gc import GarbageCollector
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
    return GarbageCollector(store, VersionStore(engine_for(settings.state_dsn)))


def cmd_gc(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.gc import GcPolicy

    policy = GcPolicy(keep_last=args.keep_last, older_than=args.older_than)
    report = _garbage_collector(settings).collect(
        policy, apply=args.apply, datasets=args.dataset or None
    )
    for line in report.lines():
        sys.stdout.write(line + "\n")
    return 0


def cmd_staging_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    report = _garbage_collector(settings).cleanup_staging(
        grace=args.grace, apply=args.apply, datasets=args.dataset or None
    )
    for line in report.lines():
        sys.stdout.write(line + "\n")
    return 0


def _add_storage_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        type=int,
        default=2,
        metavar="N",
        help="versions kept per partition, the current one included (default 2)",
    )
    gc.add_argument(
        "--older-than",
        type=_duration,
        default=timedelta(days=1),
        metavar="AGE",
        help="remove only versions superseded more than AGE ago, e.g. 12h, 7d (default 1d)",
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
            sys.stderr.write(f"trace db: Postgres {database} at {where}: {exc.orig}".rstrip())
            sys.stderr.write(f"\n(is it running? is --{database}-dsn right?)\n")
            return 2
        head = migrations.head(database)
        status = "head" if revision == head else f"head is {head}: run `trace db upgrade`"
        behind += revision != head
        sys.stdout.write(f"{database} {where}: {revision or 'not migrated'} ({status})\n")
    return 1 if behind else 0


def _add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser(
        "db", help="schema migrations of Postgres state and data"
    ).add_subparsers(dest="action", required=True)
    upgrade = db.add_parser(
        "upgrade",
        help="bring the databases to the schema this code needs (safe to repeat)",
        description="Run the Alembic migrations of Postgres state and data up to the head "
        "revision, each database in one transaction. Keeps every row; safe to repeat and to "
        "run while another upgrade runs. Trace's processes refuse a database that is not at "
        "the head revision.",
    )
    current = db.add_parser(
        "current", help="the schema revision of each database (exit 1 if not at head)"
    )
    for sub in (upgrade, current):
        sub.add_argument(
            "--database", choices=["state", "data", "all"], default="all", help="default: all"
        )
        sub.add_argument("--state-dsn", help="Postgres state URL (default: TRACE_STATE_DSN)")
        sub.add_argument("--data-dsn", help="Postgres data URL (default: TRACE_DATA_DSN)")
        sub.set_defaults(func=cmd_db)


def _token_partitions(values: list[str], datasets: list[str]) -> dict[str, list[str]]:
    """`--partition KEY` (every listed dataset) or `--partition DATASET:KEY` (one dataset)."""
    partitions: dict[str, list[str]] = {}
    for value in values:
        dataset, _, key = value.rpartition(":")
        for name in [dataset] if dataset else datasets:
            partitions.setdefault(name, []).append(key)
    return partitions


def cmd_token_issue(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.settings import get_query_settings
    from trace_resources.tokens import Keyring, issue_token

    query_settings = get_query_settings()
    token, claims = issue_token(
        Keyring.from_settings(query_settings),
        query_settings,
        org=args.org,
        subject=args.subject,
        datasets=args.dataset or None,
        ttl_s=args.ttl,
        task=args.task,
        partitions=_token_partitions(args.partition or [], args.dataset or []) or None,
        capabilities=args.capability or None,
    )
    sys.stdout.write(token + "\n")
    sys.stderr.write(
        f"token {claims['jti']} for {claims['sub']} of {claims['org']} "
        f"({claims['scope']['kind']}), expires in {claims['exp'] - claims['iat']} s; "
        f"revoke with `trace token revoke {claims['jti']}`\n"
    )
    return 0


def cmd_token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage.access import revoke_token
    from trace_resources.storage.state import engine_for

    fresh = revoke_token(engine_for(settings.state_dsn), args.jti, args.reason)
    sys.stdout.write(f"token {args.jti} {'revoked' if fresh else 'was already revoked'}\n")
    return 0


def cmd_token_keygen(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.tokens import generate_key

    entry, public = generate_key(args.kid, args.alg)
    sys.stdout.write(entry + "\n")
    if public:
        sys.stderr.write(f"verify-only entry for services that do not issue tokens: {public}\n")
    sys.stderr.write(
        "add it to TRACE_QUERY_TOKEN_KEYS (comma-separated, keep the old key while its tokens "
        f"live) and set TRACE_QUERY_TOKEN_SIGNING_KID={args.kid} to sign with it\n"
    )
    return 0


def cmd_public(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.storage import access
    from trace_resources.storage.state import engine_for

    with engine_for(settings.state_dsn).begin() as conn:
        if args.action == "add":
            access.publish(conn, args.dataset, args.description)
            sys.stdout.write(f"{args.dataset} is readable by every organisation\n")
        elif args.action == "remove":
            access.unpublish(conn, args.dataset)
            sys.stdout.write(f"{args.dataset} is no longer public\n")
        else:
            for name, description in access.published(conn).items():
                sys.stdout.write(f"{name}\t{description or ''}\n")
    return 0


def _add_query_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token", help="capability tokens of the query service"
    ).add_subparsers(dest="action", required=True)
    issue = token.add_parser(
        "issue",
        help="print a JWT for `Authorization: Bearer`",
        description="Sign a capability token with the keyring of TRACE_QUERY_TOKEN_KEYS. An "
        "org token reads the public datasets and the org's own (org_<org>__*), narrowed to "
        "--dataset if given; with --task it is a task token that reads only its --dataset "
        "list, and with --partition only those partitions.",
    )
    issue.add_argument("--org", required=True, help="organisation id, e.g. acme")
    issue.add_argument("--subject", required=True, help="user or task identity (`sub`)")
    issue.add_argument("--dataset", action="append", help="read only this dataset (repeatable)")
    issue.add_argument("--ttl", type=int, help="lifetime in seconds (default: settings)")
    issue.add_argument("--task", help="make a task token for this task")
    issue.add_argument(
        "--partition",
        action="append",
        metavar="[DATASET:]KEY",
        help="task tokens: read only this partition (of DATASET, or of every --dataset)",
    )
    issue.add_argument(
        "--capability",
        action="append",
        choices=["alerts:manage"],
        help="org tokens: also create, update and disable the org's alert rules",
    )
    issue.set_defaults(func=cmd_token_issue)
    revoke = token.add_parser("revoke", help="refuse a token id (jti) from now on")
    revoke.add_argument("jti")
    revoke.add_argument("--reason", help="why, for the record")
    revoke.set_defaults(func=cmd_token_revoke)
    keygen = token.add_parser("keygen", help="print a new keyring entry for rotation")
    keygen.add_argument("--kid", required=True, help="key id written into token headers")
    keygen.add_argument("--alg", choices=["HS256", "EdDSA"], default="HS256")
    keygen.set_defaults(func=cmd_token_keygen)

    public = commands.add_parser(
        "public", help="datasets the query service serves to every organisation"
    ).add_subparsers(dest="action", required=True)
    add = public.add_parser("add", help="publish a dataset to every organisation")
    add.add_argument("dataset")
    add.add_argument("--description", help="what the dataset holds")
    add.set_defaults(func=cmd_public)
    remove = public.add_parser("remove", help="stop publishing a dataset")
    remove.add_argument("dataset")
    remove.set_defaults(func=cmd_public)
    public.add_parser("list", help="published datasets").set_defaults(func=cmd_public)


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


def cmd_lineage_impacted(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.registry import impacted_datasets

    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    impacted = impacted_datasets(args.dataset, columns)
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

    with dg.DagsterInstance.get() as instance:
        results = launch_impacted(
            list(impacted), args.partition, build_resources(settings), instance
        )
    for result in results:
        sys.stdout.write(f"run {result.run_id}: {'success' if result.success else 'FAILED'}\n")
    return 0 if all(r.success for r in results) else 1


def _add_dataset_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    docs = commands.add_parser(
        "docs", help="write the dataset catalogue (Markdown) from the declarations"
    )
    docs.add_argument("--output", default="-", help="file to write (default: stdout)")
    docs.set_defaults(func=cmd_docs)
    lineage = commands.add_parser("lineage", help="column lineage").add_subparsers(
        dest="action", required=True
    )
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


def _alerts_engine(settings: Settings) -> Engine:
    from trace_resources.alert_pipeline.tables import data_engine

    return data_engine(settings.data_dsn)


def cmd_alert_rule(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.alerts.scope import scope_check
    from trace_resources.alert_pipeline.rules import RuleStore, describe, load_rule_file

    # a custom SQL condition may read only datasets its organisation may read
    store = RuleStore(_alerts_engine(settings), check=scope_check(settings.state_dsn))
    if args.action == "list":
        rows = describe(store.latest(args.org))
        if args.json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return 0
        for r in rows:
            state = "enabled" if r["enabled"] else "disabled"
            sys.stdout.write(
                f"{r['org']}/{r['id']} v{r['version']} {state} {r['kind']} "
                f"-> {', '.join(r['channels'])}\n"
            )
        return 0
    if args.action == "disable":
        stored = store.disable(args.org, args.rule_id)
    else:
        rule = load_rule_file(args.file)
        stored = store.create(rule) if args.action == "create" else store.update(rule)
    sys.stdout.write(
        f"{args.action}d rule {stored.rule.org}/{stored.rule.id}: version {stored.version}"
        f"{'' if stored.rule.enabled else ' (disabled)'}\n"
    )
    return 0


def cmd_alert_backtest(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.alerts.backtest import backtest, committed_ranges, parse_partition_span
    from trace_assets.alerts.scope import AlertScope
    from trace_resources.alert_pipeline.rules import load_rule_file
    from trace_resources.storage.commit import DatasetReader

    if args.partitions and args.to_block is not None:
        sys.stderr.write("trace alerts backtest: give --partitions or --from/--to-block\n")
        return 2
    rule = load_rule_file(args.rule)
    span = parse_partition_span(args.partitions) if args.partitions else None
    gc = _garbage_collector(settings)  # the object store and version store of the settings
    reader = DatasetReader(gc.store, gc.versions)
    keys = committed_ranges(
        reader, rule, from_block=args.from_block, to_block=args.to_block, span=span
    )
    report = backtest(
        rule,
        reader,
        AlertScope(settings.state_dsn),
        keys,
        default_rate_per_s=settings.alert_channel_rate_per_s,
        examples=args.examples,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.alert_pipeline import dlq

    engine = _alerts_engine(settings)
    if args.action == "list":
        dead = dlq.list_dead(engine, org=args.org, channel=args.channel, limit=args.limit)
        if args.json:
            rows = [{**d.__dict__, "dead_at": str(d.dead_at)} for d in dead]
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return 0
        for d in dead:
            sys.stdout.write(
                f"{d.dedupe_key} {d.channel} attempts={d.attempts} replays={d.replays} "
                f"dead_at={d.dead_at:%Y-%m-%dT%H:%M:%S} error={d.last_error}\n"
            )
        sys.stdout.write(f"{len(dead)} dead letter(s)\n")
        return 0
    if not (args.all or args.key or args.org or args.channel):
        sys.stderr.write("trace dlq replay: give --key, --org, --channel or --all\n")
        return 2
    count = dlq.replay(engine, keys=args.key or None, org=args.org, channel=args.channel)
    sys.stdout.write(f"replayed {count} dead letter(s): pending again\n")
    return 0


def _add_alert_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alerts = commands.add_parser("alerts", help="alert rules").add_subparsers(
        dest="group", required=True
    )
    rule = alerts.add_parser("rule", help="create, list, update, disable rules").add_subparsers(
        dest="action", required=True
    )
    for action, text in (("create", "a new rule"), ("update", "a new version of a rule")):
        sub = rule.add_parser(action, help=f"{text} from a YAML or JSON file")
        sub.add_argument("file", help="rule file (.yaml/.yml/.json)")
        sub.set_defaults(func=cmd_alert_rule)
    listing = rule.add_parser("list", help="the version in force of every rule")
    listing.add_argument("--org", help="one organisation")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_alert_rule)
    disable = rule.add_parser("disable", help="a new, disabled version of a rule")
    disable.add_argument("org")
    disable.add_argument("rule_id")
    disable.set_defaults(func=cmd_alert_rule)

    test = alerts.add_parser(
        "backtest",
        help="how often a rule would have fired over committed history (sends nothing)",
        description="Evaluate a rule file over the current committed version of each block "
        "range in the window, dedupe as the sink does and replay the channels' rate limits "
        "over the block timestamps. Publishes, stores and delivers nothing.",
    )
    test.add_argument("--rule", required=True, help="rule file (.yaml/.yml/.json)")
    window = test.add_mutually_exclusive_group()
    window.add_argument(
        "--partitions", metavar="FIRST..LAST", help="block-range keys, both inclusive"
    )
    window.add_argument("--from-block", type=int, help="first block (ranges overlapping)")
    test.add_argument("--to-block", type=int, help="last block (ranges overlapping)")
    test.add_argument("--examples", type=int, default=5, help="example alerts to show")
    test.add_argument("--json", action="store_true", help="print JSON")
    test.set_defaults(func=cmd_alert_backtest)

    dlq = commands.add_parser("dlq", help="dead-lettered alert deliveries").add_subparsers(
        dest="action", required=True
    )
    listing = dlq.add_parser("list", help="deliveries that failed their last attempt")
    replay = dlq.add_parser("replay", help="return dead deliveries to pending")
    for sub in (listing, replay):
        sub.add_argument("--org", help="one organisation")
        sub.add_argument("--channel", help="one channel, '<org>/<name>'")
        sub.set_defaults(func=cmd_dlq)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print JSON")
    replay.add_argument("--key", action="append", help="dedupe key (repeatable)")
    replay.add_argument("--all", action="store_true", help="every dead delivery")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("head", help="chain id, latest and finalized block").set_defaults(
        func=cmd_head
    )
    partitions = commands.add_parser("partitions", help="block-range partitions").add_subparsers(
        dest="action", required=True
    )
    partitions.add_parser(
        "sync", help="add every complete finalized range to the Dagster instance ($DAGSTER_HOME)"
    ).set_defaults(func=cmd_partitions_sync)
    datasets = commands.add_parser("datasets", help="committed datasets: partitions, rows, bytes")
    datasets.add_argument("--json", action="store_true", help="print JSON")
    datasets.set_defaults(func=cmd_datasets)
    versions = commands.add_parser("versions", help="version history of a dataset ('*': current)")
    versions.add_argument("dataset")
    versions.add_argument("--partition", help="one partition key")
    versions.set_defaults(func=cmd_versions)
    _add_storage_commands(commands)
    _add_db_commands(commands)
    _add_query_commands(commands)
    _add_dataset_commands(commands)
    _add_alert_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(get_settings(), args))
    except TraceError as exc:
        sys.stderr.write(f"trace: {type(exc).__name__}: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
