"""`trace alerts rule|backtest` and `trace dlq list|replay`: alert rules, their backtest over
committed history, and the dead-lettered deliveries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from trace_assets.cli.storage import garbage_collector
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


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
    gc = garbage_collector(settings)  # the object store and version store of the settings
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
                f"dead_at={d.dead_at:%Y-%m-%dT%H:%M:%S} error={d.last_error} "
                f"reason={d.dead_reason}\n"
            )
        sys.stdout.write(f"{len(dead)} dead letter(s)\n")
        return 0
    if not (args.all or args.key or args.org or args.channel):
        sys.stderr.write("trace dlq replay: give --key, --org, --channel or --all\n")
        return 2
    count = dlq.replay(engine, keys=args.key or None, org=args.org, channel=args.channel)
    sys.stdout.write(f"replayed {count} dead letter(s): pending again\n")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
