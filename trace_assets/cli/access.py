"""`trace token issue|revoke|keygen` and `trace public add|remove|list`: who may read what
through the query service (capability tokens, their keys, the public datasets)."""

from __future__ import annotations

import argparse
import sys

from trace_resources.settings import Settings


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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
