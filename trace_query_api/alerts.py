"""Alert rules and alerts of the caller's organisation, in Postgres data.

Rules are the versioned declarations of `trace_resources.alert_pipeline.rules` (the same store the
`trace alerts rule` commands write): every create, update or disable writes a new version, and
the highest version is in force. Alerts are the rows the sink upserted into `trace_alerts`,
each with its per-channel delivery state from `trace_alert_deliveries`.

Everything is scoped to the token's organisation: another organisation's rule reads as not
found, and its alerts are never listed. Secrets stay in the store: responses carry the
declaration through its pydantic model, which writes a secret as `**********`.

A custom SQL condition may read only what the token may read in the query service: the one rule
of `trace_resources.storage.access.readable_datasets`, which the alert evaluation and the CLI
apply too. As everywhere in the service, a dataset the organisation may not read is reported
exactly like one that does not exist.

Every channel's receiver must pass the delivery's outbound policy (public addresses, or the
operator's TRACE_ALERT_OUTBOUND_ALLOW): a refused one answers 400 `channel_refused`, naming the
channel and why. Secrets are stored sealed; a value shaped like a sealed secret is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import SecretStr, ValidationError

from trace_query_api.catalog import Catalog
from trace_query_api.errors import (
    BadPaginationError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    UnavailableError,
)
from trace_query_api.models import SECRET_MASK, AlertRuleCreate, AlertRuleUpdate
from trace_resources.alert_pipeline.history import AlertPosition, StoredAlert, list_alerts
from trace_resources.alert_pipeline.rules import (
    AlertRule,
    ChannelRefused,
    CustomSql,
    RuleError,
    RuleHistoryEntry,
    RuleStore,
    RuleVersion,
)
from trace_resources.sealed import SEALED_PREFIX
from trace_resources.tokens import Principal

__all__ = ["AlertService", "RuleVersion", "AlertsPage", "public_rule"]

T = TypeVar("T")


@dataclass(frozen=True)
class AlertsPage:
    rows: list[dict[str, Any]]
    next_cursor: str | None


def _encode_cursor(created_at: datetime, dedupe_key: str) -> str:
    raw = json.dumps({"t": created_at.isoformat(), "k": dedupe_key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def _decode_cursor(text: str) -> AlertPosition:
    try:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        at = datetime.fromisoformat(data["t"])
        key = data["k"]
        if at.tzinfo is None or not isinstance(key, str):
            raise ValueError("not a cursor")
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise BadPaginationError(
            "the cursor is not one this service returned; pass `next_cursor` unchanged"
        ) from None
    return at, key


class AlertService:
    def __init__(self, engine_factory: Callable[[], sa.Engine], catalog: Catalog) -> None:
        self._engine_factory = engine_factory
        self.catalog = catalog
        self._engine: sa.Engine | None = None

    @property
    def engine(self) -> sa.Engine:
        # connected on first use, so the service starts (and serves queries) while the data
        # database is down
        if self._engine is None:
            self._engine = self._engine_factory()
        return self._engine

    @contextmanager
    def _available(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.OperationalError as exc:
            raise UnavailableError(
                "the alerts database is unavailable right now; retry shortly",
                code="alerts_unavailable",
            ) from exc

    def _run(self, work: Callable[[], T]) -> T:
        with self._available():
            return work()

    # -- rules -------------------------------------------------------------------------------

    def _declaration(
        self, principal: Principal, body: AlertRuleCreate | AlertRuleUpdate, rule_id: str | None
    ) -> AlertRule:
        if body.org is not None and body.org != principal.org:
            raise ForbiddenError(
                f"`org` is {body.org!r} but this token belongs to {principal.org!r}: leave "
                "`org` out, or use a token of that organisation",
                code="wrong_org",
            )
        if rule_id is not None and body.id is not None and body.id != rule_id:
            raise BadRequestError(
                f"`id` is {body.id!r} but the path names rule {rule_id!r}: leave `id` out or "
                "make them equal",
                code="invalid_rule",
                details=[{"loc": ["body", "id"], "msg": "must equal the rule id in the path"}],
            )
        masked = [
            ["body", "channels", str(i), channel.kind, field]
            for i, channel in enumerate(body.channels)
            for field in ("secret", "password")
            if isinstance(getattr(channel, field, None), SecretStr)
            and (
                getattr(channel, field).get_secret_value() == SECRET_MASK
                or getattr(channel, field).get_secret_value().startswith(SEALED_PREFIX)
            )
        ]
        if masked:
            raise BadRequestError(
                f"{'.'.join(masked[0][1:])}: the service never returns secrets, so "
                f"{SECRET_MASK!r} (or a stored {SEALED_PREFIX}… value) is not one; send the "
                "secret itself",
                code="invalid_rule",
                details=[{"loc": loc, "msg": "send the secret itself"} for loc in masked],
            )
        data = body.model_dump()
        data["org"] = principal.org
        if rule_id is not None:
            data["id"] = rule_id
        try:
            return AlertRule.model_validate(data)
        except ValidationError as exc:  # the body validated, so only org/id filled in could
            problems = [
                {"loc": ["body", *(str(p) for p in e["loc"])], "msg": e["msg"]}
                for e in exc.errors()
            ]
            where = ".".join(problems[0]["loc"])
            raise BadRequestError(
                f"{where}: {problems[0]['msg']}", code="invalid_rule", details=problems
            ) from None

    def _check_scope(self, principal: Principal, rule: AlertRule) -> None:
        """Refuse an enabled custom SQL condition that reads a dataset this token may not."""
        cond = rule.condition
        if not isinstance(cond, CustomSql) or not rule.enabled:
            return
        tables = cond.tables()
        readable = self.catalog.readable(principal, tables)
        refused = [name for name in tables if name not in readable]
        if refused:
            names = ", ".join(repr(n if len(n) <= 80 else n[:77] + "...") for n in refused)
            raise BadRequestError(
                f"condition.custom_sql.sql: reads {names}: no dataset of that name is available "
                "to this token; GET /v1/datasets lists the datasets it may read",
                code="invalid_rule",
                details=[
                    {
                        "loc": ["body", "condition", "custom_sql", "sql"],
                        "msg": f"reads {name!r}, which is not available to this token",
                    }
                    for name in refused
                ],
            )

    def _rules(self) -> RuleStore:
        return RuleStore(self.engine)

    @staticmethod
    @contextmanager
    def _channels_checked() -> Iterator[None]:
        """A channel the outbound policy refuses answers 400, naming the channel and why."""
        try:
            yield
        except ChannelRefused as exc:
            raise BadRequestError(
                str(exc),
                code="channel_refused",
                details=[{"loc": ["body", "channels"], "msg": str(exc)}],
            ) from None

    def _get(self, org: str, rule_id: str, version: int | None = None) -> RuleVersion:
        found = self._rules().get_version(org, rule_id, version)
        if found is None:
            other_versions = version is not None and bool(self._rules().history(org, rule_id))
            at = f" at version {version}" if other_versions else ""
            raise NotFoundError(
                f"your organisation has no alert rule {rule_id!r}{at}; GET /v1/alerts/rules "
                "lists them",
                code="unknown_rule",
            )
        return found

    def get_rule(
        self, principal: Principal, rule_id: str, version: int | None = None
    ) -> tuple[RuleVersion, list[RuleHistoryEntry]]:
        def work() -> tuple[RuleVersion, list[RuleHistoryEntry]]:
            found = self._get(principal.org, rule_id, version)
            return found, self._rules().history(principal.org, rule_id)

        return self._run(work)

    def list_rules(self, principal: Principal, enabled: bool | None = None) -> list[RuleVersion]:
        return self._run(lambda: self._rules().in_force(principal.org, enabled=enabled))

    def create_rule(self, principal: Principal, body: AlertRuleCreate) -> RuleVersion:
        rule = self._declaration(principal, body, None)

        def work() -> RuleVersion:
            self._check_scope(principal, rule)
            try:
                with self._channels_checked():
                    stored = self._rules().create(rule)
            except RuleError:
                raise ConflictError(
                    f"your organisation already has an alert rule {rule.id!r}: PUT "
                    f"/v1/alerts/rules/{rule.id} writes its next version",
                    code="rule_exists",
                ) from None
            return self._get(principal.org, rule.id, stored.version)

        return self._run(work)

    def update_rule(self, principal: Principal, rule_id: str, body: AlertRuleUpdate) -> RuleVersion:
        rule = self._declaration(principal, body, rule_id)

        def work() -> RuleVersion:
            self._get(principal.org, rule_id)  # 404 before anything is written
            self._check_scope(principal, rule)
            with self._channels_checked():
                stored = self._rules().update(rule)
            return self._get(principal.org, rule_id, stored.version)

        return self._run(work)

    def disable_rule(self, principal: Principal, rule_id: str) -> RuleVersion:
        """A new version with `enabled: false`; a rule already disabled stays as it is."""

        def work() -> RuleVersion:
            current = self._get(principal.org, rule_id)
            if not current.stored.rule.enabled:
                return current
            rule = current.stored.rule.model_copy(update={"enabled": False})
            stored = self._rules().update(rule)
            return self._get(principal.org, rule_id, stored.version)

        return self._run(work)

    # -- alerts ------------------------------------------------------------------------------

    def alerts(
        self,
        principal: Principal,
        *,
        rule_id: str | None,
        kind: str | None,
        partition_key: str | None,
        limit: int,
        cursor: str | None,
    ) -> AlertsPage:
        after = None if cursor is None else _decode_cursor(cursor)

        def work() -> AlertsPage:
            page = list_alerts(
                self.engine,
                principal.org,
                rule_id=rule_id,
                kind=kind,
                partition_key=partition_key,
                after=after,
                limit=limit,
            )
            last = page.alerts[-1] if page.alerts else None
            next_cursor = _encode_cursor(*last.position) if page.more and last else None
            return AlertsPage([_public_alert(a) for a in page.alerts], next_cursor)

        return self._run(work)


def _public_alert(alert: StoredAlert) -> dict[str, Any]:
    payload, destination = alert.payload, alert.destination
    version = destination.get("rule_version")
    return {
        "dedupe_key": alert.dedupe_key,
        "kind": alert.kind,
        "rule_id": destination.get("rule_id"),
        "rule_version": version if isinstance(version, int) else None,
        "partition_key": payload.get("partition_key"),
        "text": payload.get("text"),
        "created_at": alert.created_at,
        "correlation_id": destination.get("correlation_id"),
        "payload": payload,
        "deliveries": [
            {
                "channel": d.channel.split("/", 1)[-1],
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": d.next_attempt_at if d.state == "pending" else None,
                "delivered_at": d.delivered_at,
                "dead_at": d.dead_at,
                "replays": d.replays,
            }
            for d in alert.deliveries
        ],
    }


def public_rule(found: RuleVersion) -> dict[str, Any]:
    rule = found.stored.rule
    return {
        "org": rule.org,
        "id": rule.id,
        "version": found.stored.version,
        "enabled": rule.enabled,
        "kind": rule.condition.kind,
        "created_at": found.created_at,
        "rule": rule,
    }
