"""`trace alerts rule|backtest` and `trace dlq list|replay`: alert rules, their backtest over
committed history, and the dead-lettered deliveries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from trace_assets.cli.console import progress, table
from trace_assets.cli.errors import CliError, unknown
from trace_assets.cli.storage import garbage_collector
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from trace_resources.alert_pipeline.rules import RuleStore


def _alerts_engine(settings: Settings) -> Engine:
    from trace_resources.alert_pipeline.tables import data_engine

    return data_engine(settings.data_dsn)


def _check_org(store: RuleStore, org: str | None) -> None:
    """An org filter must name an organisation that has rules."""
    if org is None:
        return
    orgs = {stored.rule.org for stored in store.latest()}
    if org not in orgs:
        raise unknown("organisation", org, orgs, where="with alert rules")


def _check_channel(store: RuleStore, channel: str | None) -> None:
    """A channel filter must name a channel (`<org>/<name>`) of a rule."""
    if channel is None:
        return
    channels = {f"{s.rule.org}/{c.name}" for s in store.latest() for c in s.rule.channels}
    if channel not in channels:
        raise unknown(
            "channel", channel, channels, where="of the alert rules", hint="named '<org>/<name>'"
        )


def cmd_alert_rule(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.alerts.scope import scope_check
    from trace_resources.alert_pipeline.rules import RuleStore, describe, load_rule_file

    # the file first: a missing or invalid file is the likelier mistake
    rule = load_rule_file(args.file) if args.action in ("create", "update") else None
    # a custom SQL condition may read only datasets its organisation may read
    store = RuleStore(_alerts_engine(settings), check=scope_check(settings.state_dsn))
    if args.action == "list":
        _check_org(store, args.org)
        rows = describe(store.latest(args.org))
        if args.json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return 0
        table(
            ["rule", "version", "state", "kind", "channels"],
            [
                [
                    f"{r['org']}/{r['id']}",
                    f"v{r['version']}",
                    "enabled" if r["enabled"] else "disabled",
                    r["kind"],
                    ", ".join(r["channels"]),
                ]
                for r in rows
            ],
        )
        if not rows:
            sys.stderr.write("no alert rule yet: `trace alerts rule create FILE`\n")
        return 0
    if args.action == "disable":
        _check_org(store, args.org)
        rule_ids = {s.rule.id for s in store.latest(args.org)}
        if args.rule_id not in rule_ids:
            raise unknown("rule", args.rule_id, rule_ids, where=f"of {args.org}")
        stored = store.disable(args.org, args.rule_id)
    else:
        assert rule is not None
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
        raise CliError("trace alerts backtest: give --partitions or --from/--to-block, not both")
    rule = load_rule_file(args.rule)
    span = parse_partition_span(args.partitions) if args.partitions else None
    gc = garbage_collector(settings)  # the object store and version store of the settings
    reader = DatasetReader(gc.store, gc.versions)
    keys = committed_ranges(
        reader, rule, from_block=args.from_block, to_block=args.to_block, span=span
    )
    if not keys:
        every = committed_ranges(reader, rule)
        extent = f"{every[0]} .. {every[-1]} ({len(every)} range(s))" if every else "none yet"
        raise CliError(
            "no committed block range in the window of --partitions/--from-block/--to-block; "
            f"committed ranges the rule reads: {extent}"
        )
    with progress("backtest", len(keys)) as bar:
        report = backtest(
            rule,
            reader,
            AlertScope(settings.state_dsn),
            keys,
            default_rate_per_s=settings.alert_channel_rate_per_s,
            examples=args.examples,
            progress=bar.advance,
        )
    if args.json:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.alert_pipeline import dlq
    from trace_resources.alert_pipeline.rules import RuleStore

    engine = _alerts_engine(settings)
    store = RuleStore(engine)
    _check_org(store, args.org)
    _check_channel(store, args.channel)
    if args.action == "list":
        dead = dlq.list_dead(engine, org=args.org, channel=args.channel, limit=args.limit)
        if args.json:
            rows = [{**d.__dict__, "dead_at": str(d.dead_at)} for d in dead]
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return 0
        table(
            ["dedupe key", "channel", "attempts", "replays", "dead at", "last error", "reason"],
            [
                [
                    d.dedupe_key,
                    d.channel,
                    d.attempts,
                    d.replays,
                    f"{d.dead_at:%Y-%m-%dT%H:%M:%S}" if d.dead_at else None,
                    d.last_error,
                    d.dead_reason,
                ]
                for d in dead
            ],
            right=["attempts", "replays"],
        )
        sys.stdout.write(f"{len(dead)} dead letter(s)\n")
        return 0
    if not (args.all or args.key or args.org or args.channel):
        raise CliError("trace dlq replay: give --key, --org, --channel or --all")
    if args.key:
        dead_keys = {d.dedupe_key for d in dlq.list_dead(engine, limit=2**31 - 1)}
        for key in args.key:
            if key not in dead_keys:
                raise unknown("dead letter", key, dead_keys, hint="`trace dlq list` lists them")
    count = dlq.replay(engine, keys=args.key or None, org=args.org, channel=args.channel)
    sys.stdout.write(f"replayed {count} dead letter(s): pending again\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alerts = commands.add_parser("alerts", help="alert rules and their backtest").add_subparsers(
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
    disable.add_argument("org", help="the rule's organisation")
    disable.add_argument("rule_id", help="the rule's id (`trace alerts rule list`)")
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
    listing.add_argument(
        "--limit", type=int, default=100, help="list at most this many (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    replay.add_argument("--key", action="append", help="dedupe key (repeatable)")
    replay.add_argument("--all", action="store_true", help="every dead delivery")
