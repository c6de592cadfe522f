"""Seal the channel secrets of alert rules stored in clear (webhook `secret`, SMTP `password`
in `trace_alert_rules.spec`) under TRACE_SECRETS_KEYS: `enc:v1:<kid>:…` (see
`trace_resources.sealed`). Every version of every rule is rewritten; values already sealed are
kept. Downgrade opens them again (the keyring must still hold their keys).

Revision ID: data_0002
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from trace_resources.sealed import SECRET_FIELDS, Keyring, is_sealed, reseal_spec, secret_context
from trace_resources.settings import get_settings

revision = "data_0002"
down_revision = "data_0001"
branch_labels = None
depends_on = None

_ROWS = sa.text("SELECT org, rule_id, version, spec FROM trace_alert_rules FOR UPDATE")
_WRITE = sa.text(
    "UPDATE trace_alert_rules SET spec = CAST(:spec AS jsonb) "
    "WHERE org = :org AND rule_id = :rule_id AND version = :version"
)


def _keyring() -> Keyring:
    return Keyring.parse(get_settings().secrets_keys.get_secret_value())


def _rewrite(change: Any) -> None:
    conn = op.get_bind()
    for row in conn.execute(_ROWS).all():
        spec = change(row.spec)
        if spec is not None:
            conn.execute(
                _WRITE,
                {
                    "spec": json.dumps(spec),
                    "org": row.org,
                    "rule_id": row.rule_id,
                    "version": row.version,
                },
            )


def upgrade() -> None:
    keyring = _keyring()
    _rewrite(lambda spec: reseal_spec(spec, keyring))


def _opened(spec: dict[str, Any], keyring: Keyring) -> dict[str, Any] | None:
    changed = False
    channels = []
    for channel in spec.get("channels") or []:
        channel = dict(channel)
        for field in SECRET_FIELDS:
            value = channel.get(field)
            if isinstance(value, str) and is_sealed(value):
                context = secret_context(spec["org"], spec["id"], channel["name"], field)
                channel[field] = keyring.open(value, context)
                changed = True
        channels.append(channel)
    return {**spec, "channels": channels} if changed else None


def downgrade() -> None:
    keyring = _keyring()
    _rewrite(lambda spec: _opened(spec, keyring))
