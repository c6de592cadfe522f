"""`trace promote --from dev --to staging [--apply]`: copy dataset declarations, UDF
declarations, alert rules and saved queries from one environment to another (the environments
file: TRACE_ENVIRONMENTS_FILE). Without `--apply` it prints the diff and writes nothing.

`trace promote log --env staging` lists the promotions into an environment;
`trace promote rollback ID --env staging` restores what promotion ID changed."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import TYPE_CHECKING

from trace_assets.cli.console import table
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from trace_resources.environments import Environment

__all__ = ["add_commands"]


def _env(settings: Settings, name: str) -> Environment:
    from trace_resources.environments import environment

    return environment(settings.environments_file, name)


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    from trace_assets.alerts.scope import scope_check
    from trace_resources import promotion

    if not args.source or not args.target:
        raise promotion.PromotionError(
            "say which environments: trace promote --from dev --to staging [--apply]"
        )
    source, target = _env(settings, args.source), _env(settings, args.target)
    # a custom SQL rule may read only datasets its organisation may read in the target
    check = scope_check(target.state_dsn)
    if not args.apply:
        found = promotion.plan(source, target, rule_check=check)
        if args.json:
            sys.stdout.write(json.dumps(promotion.as_json(found), indent=2) + "\n")
            return 1 if found.problems else 0
        sys.stdout.write(found.report() + "\n")
        if found.problems:
            return 1
        if found.changes:
            sys.stdout.write("dry run: nothing written; add --apply to apply it\n")
        return 0
    actor = args.actor or getpass.getuser()
    done, entry = promotion.apply(source, target, actor, rule_check=check)
    sys.stdout.write(done.report() + "\n")
    if entry is None:
        sys.stdout.write("nothing applied\n")
        return 0
    sys.stdout.write(
        f"applied as promotion {entry.id} by {entry.actor} "
        f"(undo: trace promote rollback {entry.id} --env {target.name})\n"
    )
    _reload(target, [c.kind for c in done.changes])
    return 0


def _reload(target: Environment, kinds: list[str]) -> None:
    """The code location builds assets from transforms and declarations: reload it."""
    from trace_resources.udfs.reload import reload_code_location

    if "udfs" not in kinds and "datasets" not in kinds:
        return
    if not target.dagster_url:
        sys.stdout.write(
            f"{target.name}: reload its code location to build the changed transforms and "
            "declarations (or give it a dagster_url in the environments file)\n"
        )
        return
    outcome = reload_code_location(target.dagster_url, target.dagster_location)
    sys.stdout.write(f"{target.name}: {outcome.message}\n")


def _required_env(args: argparse.Namespace) -> str:
    from trace_resources.promotion import PromotionError

    if not args.env:
        raise PromotionError(f"say which environment: trace promote {args.action} … --env staging")
    return str(args.env)


def cmd_log(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources import promotion

    target = _env(settings, _required_env(args))
    found = promotion.promotion_log(target)
    if args.json:
        rows = [
            {
                "id": p.id,
                "from": p.source_env,
                "to": p.target_env,
                "actor": p.actor,
                "at": p.created_at.isoformat(),
                "changes": [{k: e[k] for k in ("kind", "key", "action")} for e in p.changes],
                "rolled_back_by": p.rolled_back_by,
                "rolled_back_at": p.rolled_back_at.isoformat() if p.rolled_back_at else None,
                "completed": p.completed,
            }
            for p in found
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table(
        ["id", "from", "to", "by", "at", "changes", "rolled back"],
        [
            [
                str(p.id),
                p.source_env,
                p.target_env,
                p.actor,
                f"{p.created_at:%Y-%m-%d %H:%M:%S}",
                promotion.summary(p),
                (
                    f"{p.rolled_back_at:%Y-%m-%d %H:%M:%S} by {p.rolled_back_by}"
                    if p.rolled_back_at
                    else "—"
                )
                + ("" if p.completed else " (unfinished: the next promote finishes it)"),
            ]
            for p in found
        ],
    )
    if not found:
        sys.stderr.write(f"no promotion into {target.name} yet\n")
    return 0


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources import promotion

    target = _env(settings, _required_env(args))
    done = promotion.rollback(target, args.id, args.actor or getpass.getuser())
    sys.stdout.write(
        f"rolled back promotion {done.id} ({done.source_env} -> {done.target_env}, "
        f"{promotion.summary(done)}): {target.name} is as it was before it\n"
    )
    _reload(target, [e["kind"] for e in done.changes])
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    promote = commands.add_parser(
        "promote",
        help="promote configuration between environments (dev -> staging -> prod)",
        description="Copy dataset declarations, UDF declarations, alert rules and saved queries "
        "from --from to --to. A dry run (the diff) unless --apply; applied all or nothing, "
        "logged with who and when, undone by `trace promote rollback ID`.",
    )
    promote.add_argument("--from", dest="source", help="the environment to copy from, e.g. dev")
    promote.add_argument("--to", dest="target", help="the environment to copy to, e.g. staging")
    promote.add_argument("--apply", action="store_true", help="apply (default: only the diff)")
    promote.add_argument("--actor", help="who applies it (default: the current OS user)")
    promote.add_argument("--json", action="store_true", help="print the diff as JSON")
    promote.set_defaults(func=cmd_promote, action=None)
    actions = promote.add_subparsers(dest="action")
    listing = actions.add_parser("log", help="the promotions into an environment, newest first")
    listing.add_argument("--env", help="the environment, e.g. staging")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_log)
    undo = actions.add_parser(
        "rollback", help="restore what one promotion changed, exactly as it was before"
    )
    undo.add_argument("id", type=int, help="the promotion's id (`trace promote log`)")
    undo.add_argument("--env", help="the environment it was applied to, e.g. staging")
    undo.add_argument("--actor", help="who rolls it back (default: the current OS user)")
    undo.set_defaults(func=cmd_rollback)
