"""`trace token issue|revoke|keygen` and `trace public add|remove|list`: who may read what
through the query service (capability tokens, their keys, the public datasets)."""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import TYPE_CHECKING

from trace_assets.cli.console import table
from trace_assets.cli.errors import CliError, unknown
from trace_assets.cli.storage import check_datasets, check_partitions, known_datasets
from trace_resources.settings import Settings

if TYPE_CHECKING:
    from trace_resources.storage.version_store import VersionStore


def _token_partitions(values: list[str], datasets: list[str]) -> dict[str, list[str]]:
    """`--partition KEY` (every listed dataset) or `--partition DATASET:KEY` (one dataset)."""
    partitions: dict[str, list[str]] = {}
    for value in values:
        dataset, _, key = value.rpartition(":")
        for name in [dataset] if dataset else datasets:
            partitions.setdefault(name, []).append(key)
    return partitions


def _check_token_names(settings: Settings, args: argparse.Namespace) -> None:
    """The org is an org id, and the datasets and partitions a token names exist."""
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore
    from trace_resources.tokens import ORG_PATTERN

    if not ORG_PATTERN.match(args.org):
        raise CliError(
            f"--org {args.org!r} is not an org id: lowercase letters and digits in words joined "
            "by single underscores, starting with a letter, e.g. acme or acme_labs"
        )
    configured = [c.name for c in settings.chain_configs()]
    for chain in args.chain or ():
        if chain not in configured:
            raise unknown("chain", chain, configured, hint="`trace chains` lists them")
    hooks = [t.name for t in settings.trigger_configs() if t.kind == "webhook"]
    for trigger in getattr(args, "trigger", None) or ():
        if trigger not in hooks:
            raise unknown("webhook trigger", trigger, hooks, hint="declare it in TRACE_TRIGGERS")
    if not args.dataset:
        return
    versions = VersionStore(engine_for(settings.state_dsn))
    check_datasets(args.dataset, versions)
    for dataset, keys in _token_partitions(args.partition or [], args.dataset).items():
        check_partitions(dataset, keys, versions)


def cmd_token_issue(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.settings import get_query_settings
    from trace_resources.tokens import Keyring, issue_token

    query_settings = get_query_settings()
    _check_token_names(settings, args)
    token, claims = issue_token(
        Keyring.from_settings(query_settings),
        query_settings,
        org=args.org,
        subject=args.subject,
        datasets=args.dataset or None,
        chains=args.chain or None,
        ttl_s=args.ttl,
        task=args.task,
        partitions=_token_partitions(args.partition or [], args.dataset or []) or None,
        capabilities=args.capability or None,
        triggers=args.trigger or None,
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

    try:
        uuid.UUID(args.jti)
    except ValueError:
        raise CliError(
            f"{args.jti!r} is not a token id: ids are UUIDs, printed by `trace token issue` "
            "(`token <id> for ...`) and found in the token's `jti` claim"
        ) from None
    fresh = revoke_token(engine_for(settings.state_dsn), args.jti, args.reason)
    sys.stdout.write(f"token {args.jti} {'revoked' if fresh else 'was already revoked'}\n")
    return 0


def cmd_token_keygen(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.errors import ConfigError
    from trace_resources.tokens import Keyring, generate_key

    entry, public = generate_key(args.kid, args.alg)
    try:
        Keyring.parse(entry)  # as the services will parse it
    except ConfigError:
        raise CliError(
            f"--kid {args.kid!r} is not a key id: letters, digits, '.', '_' or '-', at most 64"
        ) from None
    sys.stdout.write(entry + "\n")
    if public:
        sys.stderr.write(f"verify-only entry for services that do not issue tokens: {public}\n")
    sys.stderr.write(
        "add it to TRACE_QUERY_TOKEN_KEYS (comma-separated, keep the old key while its tokens "
        f"live) and set TRACE_QUERY_TOKEN_SIGNING_KID={args.kid} to sign with it\n"
    )
    return 0


def cmd_public(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.registry import public_declared
    from trace_resources.storage import access
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.version_store import VersionStore

    engine = engine_for(settings.state_dsn)
    declared = public_declared()
    with engine.begin() as conn:
        added = access.published(conn)
        if args.action == "add":
            check_datasets([args.dataset], VersionStore(engine))
            access.publish(conn, args.dataset, args.description)
            sys.stdout.write(f"{args.dataset} is readable by every organisation\n")
        elif args.action == "remove":
            if args.dataset not in added:
                raise _not_removable(args.dataset, declared, added, VersionStore(engine))
            access.unpublish(conn, args.dataset)
            still = (
                " (it stays public: its declaration says so)" if args.dataset in declared else ""
            )
            sys.stdout.write(f"{args.dataset} is no longer published{still}\n")
        else:
            names = sorted(set(declared) | set(added))
            table(
                ["dataset", "public by", "description"],
                [
                    [
                        name,
                        "declaration" if name in declared else "trace public add",
                        _first_line(added.get(name) or declared.get(name)),
                    ]
                    for name in names
                ],
            )
    return 0


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _not_removable(
    dataset: str, declared: dict[str, str], added: dict[str, str | None], versions: VersionStore
) -> CliError:
    if dataset in declared:
        return CliError(
            f"{dataset} is public by its declaration (trace_assets/datasets/*.yaml, `public` "
            "defaults to true), not by `trace public add`; set `public: false` there to "
            "withdraw it"
        )
    known = known_datasets(versions)
    if dataset not in known:
        return unknown("dataset", dataset, known)
    return unknown(
        "published dataset", dataset, added, hint="only those added with `trace public add`"
    )


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
    issue.add_argument(
        "--chain",
        action="append",
        metavar="NAME",
        help="org tokens: read only this chain's datasets (repeatable; `trace chains` lists "
        "them); the org's own datasets stay readable",
    )
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
        choices=["alerts:manage", "transforms:manage"],
        help="org tokens: also change the org's alert rules (alerts:manage) or apply its "
        "transforms and upload its enrichment datasets (transforms:manage)",
    )
    issue.add_argument(
        "--trigger",
        action="append",
        metavar="NAME",
        help="a trigger token: fires only this webhook trigger of TRACE_TRIGGERS "
        "(`POST /v1/triggers/NAME`) and reads nothing",
    )
    issue.set_defaults(func=cmd_token_issue)
    revoke = token.add_parser("revoke", help="refuse a token id (jti) from now on")
    revoke.add_argument("jti", help="the token's id (its `jti` claim, a UUID)")
    revoke.add_argument("--reason", help="why, for the record")
    revoke.set_defaults(func=cmd_token_revoke)
    keygen = token.add_parser("keygen", help="print a new keyring entry for rotation")
    keygen.add_argument("--kid", required=True, help="key id written into token headers")
    keygen.add_argument(
        "--alg",
        choices=["HS256", "EdDSA"],
        default="HS256",
        help="HS256: a shared secret; EdDSA: a key pair whose public half verifies (default HS256)",
    )
    keygen.set_defaults(func=cmd_token_keygen)

    public = commands.add_parser(
        "public", help="datasets the query service serves to every organisation"
    ).add_subparsers(dest="action", required=True)
    add = public.add_parser("add", help="publish a dataset to every organisation")
    add.add_argument("dataset", help="an existing dataset (`trace datasets` lists them)")
    add.add_argument("--description", help="what the dataset holds")
    add.set_defaults(func=cmd_public)
    remove = public.add_parser("remove", help="stop publishing a dataset")
    remove.add_argument("dataset", help="a dataset added with `trace public add`")
    remove.set_defaults(func=cmd_public)
    public.add_parser(
        "list", help="public datasets: declared public, and added with `trace public add`"
    ).set_defaults(func=cmd_public)
