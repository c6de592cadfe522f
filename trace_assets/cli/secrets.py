"""`trace secrets rotate`: re-wrap every stored channel secret under the current key of
TRACE_SECRETS_KEYS (and seal any still stored in clear)."""

from __future__ import annotations

import argparse
import sys

from trace_resources.settings import Settings


def cmd_rotate(settings: Settings, args: argparse.Namespace) -> int:
    from trace_resources.alert_pipeline import tables as t
    from trace_resources.alert_pipeline.rules import RuleStore
    from trace_resources.sealed import Keyring

    keyring = Keyring.parse(settings.secrets_keys.get_secret_value())
    store = RuleStore(t.data_engine(settings.data_dsn), keyring=keyring)
    changed, total = store.reseal_secrets(keyring)
    sys.stdout.write(
        f"secrets: {changed} of {total} rule versions rewritten; every channel secret is now "
        f"sealed under key {keyring.current_kid!r} (older keys may leave TRACE_SECRETS_KEYS)\n"
    )
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    secrets = commands.add_parser(
        "secrets", help="channel secrets sealed at rest (TRACE_SECRETS_KEYS)"
    ).add_subparsers(dest="action", required=True)
    rotate = secrets.add_parser(
        "rotate",
        help="re-wrap every stored channel secret under the keyring's first key",
        description="Seal every alert channel secret (every version of every rule) under the "
        "first key of TRACE_SECRETS_KEYS: secrets sealed with an older key are re-wrapped, "
        "any stored in clear are sealed. Safe to repeat. Put the new key first, run this, then "
        "remove the old key. Fails, changing nothing more, on a secret no key opens.",
    )
    rotate.set_defaults(func=cmd_rotate)
