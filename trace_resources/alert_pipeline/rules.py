"""Alert rules: versioned declarations per organisation, validated with field-level errors.

A rule file (YAML or JSON) holds one rule:

    format_version: 1
    org: acme
    id: big-usdc-moves
    description: USDC transfers above 1,000,000 base units
    condition: {kind: erc20_transfer_above, token: "0x…", threshold: "1000000"}
    channels:
      - {kind: webhook, name: ops-hook, url: "https://…", secret: "…",
         retry_period_s: 21600}   # optional: retry for 6 h (default: the operator's, 24 h)
      - {kind: slack, name: ops-slack, url: "https://hooks.slack.com/…"}
      - {kind: email, name: ops-mail, to: [ops@acme.example], from_address: trace@acme.example,
         smtp_host: smtp.acme.example, smtp_port: 587, security: starttls,
         username: trace, password: "…"}

Every create, update or disable writes a new version row in `trace_alert_rules`; the highest
version of a rule is the one in force. Alerts carry the rule version they were computed with,
and the deliverer reads channel settings (secrets included) from that version, so secrets
never travel through the buffer.

Channel secrets are stored sealed (`trace_resources.sealed`: `enc:v1:…`, envelope encryption
under TRACE_SECRETS_KEYS); a rule read back holds them sealed, and only the deliverer opens
them, when it sends. Every channel's host must pass the outbound policy
(`outbound.OutboundPolicy`) when an enabled rule is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import httpx
import sqlalchemy as sa
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.outbound import ALLOW_SETTING, OutboundPolicy, OutboundRefused
from trace_resources.errors import TraceError
from trace_resources.sealed import Keyring, SealError, reseal_spec
from trace_resources.settings import get_settings

__all__ = [
    "ALERT_DATASETS",
    "referenced_tables",
    "AlertRule",
    "AnyChannel",
    "ChannelRefused",
    "Composite",
    "CompositeMember",
    "EmailChannel",
    "SlackChannel",
    "WebhookChannel",
    "RuleError",
    "RuleHistoryEntry",
    "RuleStore",
    "RuleVersion",
    "StoredRule",
    "check_retry_periods",
    "parse_rule",
    "load_rule_file",
    "rules_in_force",
    "undo_rule_versions_after",
]

# the datasets alert conditions read: the decoded transfers of each committed block range
ALERT_DATASETS = ("erc20_transfers", "native_transfers")
_ADDRESS = r"^0x[0-9a-fA-F]{40}$"
_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ORG = r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$"


class RuleError(TraceError):
    """A rule file that does not validate, or a rule operation that can not apply."""


class ChannelRefused(RuleError):
    """A channel whose receiver the outbound policy refuses (or whose secret is unusable, or
    whose retry period lies outside the operator's bounds)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _retry_period() -> Any:
    return Field(
        None,
        gt=0,
        description="How long a failing delivery on this channel is retried (from its first "
        "failure) before it is dead-lettered, seconds; default the operator's "
        "TRACE_ALERT_RETRY_PERIOD_S, within TRACE_ALERT_RETRY_PERIOD_MIN_S.._MAX_S.",
    )


class Erc20TransferAbove(_Strict):
    kind: Literal["erc20_transfer_above"]
    token: str = Field(pattern=_ADDRESS, description="ERC-20 contract address (0x + 40 hex).")
    threshold: str = Field(
        pattern=r"^(0|[1-9][0-9]{0,77})$",
        description="Alert on transfers strictly above this amount, in base units (decimal).",
    )


class WatchedAddresses(_Strict):
    kind: Literal["watched_addresses"]
    addresses: list[Annotated[str, Field(pattern=_ADDRESS)]] = Field(min_length=1, max_length=1000)
    datasets: list[Literal["erc20_transfers", "native_transfers"]] = Field(
        default=["erc20_transfers", "native_transfers"], min_length=1
    )


class CustomSql(_Strict):
    kind: Literal["custom_sql"]
    sql: str = Field(
        min_length=1,
        description="One DuckDB SELECT over tables named like the datasets the organisation may "
        "read (as the query service defines it: blocks, transactions, logs, datasets published "
        "with `trace public add`, its own `org_<org>__*` datasets; and the alert datasets "
        "erc20_transfers and native_transfers). A block-range dataset holds the rows of the "
        "range being evaluated, an unpartitioned one its current version. Each row it returns "
        "is one alert; a column `alert_key` (if returned) names the row's identity.",
    )

    @field_validator("sql")
    @classmethod
    def _one_select(cls, value: str) -> str:
        body = value.strip().rstrip(";").strip()
        if ";" in body:
            raise ValueError("must be one statement (no ';' inside)")
        if not re.match(r"(?is)^(select|with)\b", body):
            raise ValueError("must be a SELECT (or WITH … SELECT) statement")
        referenced_tables(body)  # must parse
        return body

    def tables(self) -> list[str]:
        """The tables (dataset names) the statement reads, CTE names excluded."""
        return referenced_tables(self.sql)


def referenced_tables(sql: str) -> list[str]:
    """Dataset names a statement reads, parsed by DuckDB in a sandbox (no file or network
    access, so a table function such as read_csv can not touch anything while parsing).
    Identifiers are case-insensitive in SQL, so `BLOCKS` names `blocks`, as in the query
    service."""
    import duckdb

    conn = duckdb.connect(config={"enable_external_access": False, "threads": 1})
    try:
        return sorted({name.lower() for name in conn.get_table_names(sql)})
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"does not parse as DuckDB SQL: {first}") from None
    finally:
        conn.close()


MemberCondition = Annotated[Erc20TransferAbove | WatchedAddresses, Field(discriminator="kind")]


KeyColumn = Literal["from_address", "to_address", "transaction_hash", "token"]


class CompositeMember(_Strict):
    name: str = Field(pattern=_NAME, description="Member name, used in texts and `sequence` order.")
    condition: MemberCondition = Field(description="A simple condition (its rows are the events).")
    key: KeyColumn | list[KeyColumn] | None = Field(
        None,
        description="The event column (or columns) that correlate this member (default: the "
        "rule's `key`).",
    )


class Composite(_Strict):
    """A composite trigger over member conditions, correlated by a key and bounded by a window
    (evaluated over committed ranges in block order: `trace_assets.alerts.composite`)."""

    kind: Literal["composite"]
    op: Literal["all_of", "n_of_m", "sequence"] = Field(
        description="`all_of`: every member within the window; `n_of_m`: at least `n` distinct "
        "members; `sequence`: the members in the order given."
    )
    members: list[CompositeMember] = Field(min_length=2, max_length=10)
    key: KeyColumn | list[KeyColumn] = Field(
        description="The event column whose equal values correlate events (e.g. the same "
        "sender), or a list of columns whose values together do (e.g. [token, from_address]: "
        "the same sender of the same token); a member may name its own with `members[].key`, "
        "with as many columns."
    )
    window_blocks: int = Field(gt=0, le=1_000_000, description="Window length in blocks.")
    window_s: int | None = Field(
        None, gt=0, description="Optionally also a window in seconds (block timestamps)."
    )
    n: int | None = Field(None, ge=1, description="For `n_of_m`: how many distinct members.")
    timeout: bool = Field(
        False,
        description="Raise a timeout event when a window closes incomplete (e.g. B did not "
        "follow A within `window_blocks`).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Composite:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if self.op == "n_of_m":
            if self.n is None or not 1 <= self.n <= len(self.members):
                raise ValueError(
                    f"`n_of_m` needs `n` between 1 and the number of members "
                    f"({len(self.members)}), e.g. n: 2"
                )
        elif self.n is not None:
            raise ValueError(f"`n` applies to op `n_of_m` only (op is {self.op!r}): remove it")
        width = len(key_columns(self.key))
        for member in self.members:
            columns = key_columns(member.key or self.key)
            if len(set(columns)) != len(columns) or not 1 <= len(columns) <= 4:
                raise ValueError(
                    f"member {member.name}: a key is 1 to 4 different columns, got {columns}"
                )
            if len(columns) != width:
                raise ValueError(
                    f"member {member.name}: its key {columns} has {len(columns)} column(s) and "
                    f"the rule's {width}: keys of different widths never correlate"
                )
            if "token" in columns and not _only_erc20(member.condition):
                raise ValueError(
                    f"member {member.name}: key `token` exists only on erc20_transfers; "
                    "correlate on from_address, to_address or transaction_hash"
                )
        return self


def key_columns(key: str | Sequence[str]) -> list[str]:
    """A composite key's columns: one (`from_address`) or several (`[token, from_address]`)."""
    return [key] if isinstance(key, str) else list(key)


def describe_key(key: str | Sequence[str]) -> str:
    """`from_address`, or `token+from_address` for a compound key (in alert texts)."""
    return "+".join(key_columns(key))


def _only_erc20(cond: Erc20TransferAbove | WatchedAddresses) -> bool:
    return isinstance(cond, Erc20TransferAbove) or cond.datasets == ["erc20_transfers"]


Condition = Annotated[
    Erc20TransferAbove | WatchedAddresses | CustomSql | Composite, Field(discriminator="kind")
]


class WebhookChannel(_Strict):
    kind: Literal["webhook"]
    name: str = Field(pattern=_NAME)
    url: str = Field(pattern=r"^https?://", description="Receiver URL (POST, JSON body).")
    secret: SecretStr = Field(
        description="HMAC-SHA256 key: X-Trace-Signature = hex(HMAC(secret, timestamp + '.' + "
        "body)), X-Trace-Timestamp = unix seconds."
    )
    rate_per_s: float | None = Field(None, gt=0, description="Deliveries/s on this channel.")
    retry_period_s: float | None = _retry_period()

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class SlackChannel(_Strict):
    kind: Literal["slack"]
    name: str = Field(pattern=_NAME)
    url: str = Field(pattern=r"^https?://", description="Slack incoming-webhook URL.")
    rate_per_s: float | None = Field(None, gt=0, description="Deliveries/s on this channel.")
    retry_period_s: float | None = _retry_period()


# one bare address (no display name): no whitespace or control characters (so no header
# injection), one '@', a domain of DNS labels
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = rf"^[^@\s\x00-\x1f<>,;\"]{{1,64}}@{_LABEL}(?:\.{_LABEL})*$"
EmailAddress = Annotated[str, Field(pattern=_EMAIL, max_length=254)]


class EmailChannel(_Strict):
    kind: Literal["email"]
    name: str = Field(pattern=_NAME)
    to: list[EmailAddress] = Field(
        min_length=1, max_length=50, description="Recipients (one message to all of them)."
    )
    from_address: EmailAddress = Field(description="Envelope and header sender.")
    smtp_host: str = Field(
        pattern=r"^[A-Za-z0-9.:_-]{1,253}$", description="SMTP server host name or IP address."
    )
    smtp_port: int = Field(587, gt=0, lt=65536, description="SMTP server port.")
    security: Literal["starttls", "ssl", "none"] = Field(
        "starttls",
        description="`starttls` (upgrade after connecting, usually port 587), `ssl` (TLS from "
        "the start, usually 465) or `none` (plain text: a relay on a trusted network only). "
        "Certificates are verified against the system's trust store.",
    )
    username: str | None = Field(None, min_length=1, description="SMTP AUTH user.")
    password: SecretStr | None = Field(None, description="SMTP AUTH password.")
    rate_per_s: float | None = Field(None, gt=0, description="Deliveries/s on this channel.")
    retry_period_s: float | None = _retry_period()

    @model_validator(mode="after")
    def _credentials(self) -> EmailChannel:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both `username` and `password` for SMTP AUTH, or neither")
        if self.password is not None and self.security == "none":
            raise ValueError(
                "a password would cross the network in clear text: set `security` to "
                "`starttls` or `ssl`"
            )
        return self


AnyChannel = WebhookChannel | SlackChannel | EmailChannel
Channel = Annotated[AnyChannel, Field(discriminator="kind")]


class AlertRule(_Strict):
    format_version: Literal[1] = 1
    org: str = Field(pattern=_ORG, description="Owning organisation id.")
    id: str = Field(pattern=_NAME, description="Rule id, unique within the organisation.")
    description: str = ""
    condition: Condition
    channels: list[Channel] = Field(min_length=1)
    enabled: bool = True
    confirmation: Literal["finalized", "safe"] = Field(
        "finalized",
        description="When the rule alerts: `finalized` (default) once a block is finalized, or "
        "`safe` as soon as it reaches the chain's `safe` head (earlier; an alert whose block "
        "is orphaned before it is finalized is retracted).",
    )

    @field_validator("channels")
    @classmethod
    def _unique_names(cls, value: list[Any]) -> list[Any]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be unique, got {names}")
        return value

    def channel(self, name: str) -> AnyChannel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(name)

    def declaration_json(self) -> dict[str, Any]:
        """The rule as a rule file holds it (secrets as given: clear, or sealed if read back
        from the store)."""
        data = self.model_dump(mode="json")
        for stored, channel in zip(data["channels"], self.channels, strict=True):
            if isinstance(channel, WebhookChannel):
                stored["secret"] = channel.secret.get_secret_value()
            elif isinstance(channel, EmailChannel) and channel.password is not None:
                stored["password"] = channel.password.get_secret_value()
        return data

    def stored_json(self, keyring: Keyring) -> dict[str, Any]:
        """The spec as stored: every secret sealed under the keyring's current key (a secret
        read back sealed stays sealed, re-wrapped if an older key sealed it)."""
        data = self.declaration_json()
        return reseal_spec(data, keyring) or data


def channel_target(channel: AnyChannel) -> tuple[str, int]:
    """The host and port a channel's deliveries connect to (ValueError for a URL that does
    not parse)."""
    if isinstance(channel, EmailChannel):
        return channel.smtp_host, channel.smtp_port
    try:
        url = httpx.URL(channel.url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"url does not parse: {exc}") from None
    if not url.host:
        raise ValueError("url has no host")
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def check_channels(rule: AlertRule, policy: OutboundPolicy) -> None:
    """ChannelRefused naming the first channel whose receiver the outbound policy refuses."""
    for channel in rule.channels:
        try:
            policy.addresses(*channel_target(channel))
        except (OutboundRefused, ValueError) as exc:
            raise ChannelRefused(
                f"channel {channel.name}: {exc}; receivers must be public (operators can allow "
                f"internal receivers with {ALLOW_SETTING})"
            ) from None


def check_retry_periods(rule: AlertRule, low: float, high: float) -> None:
    """ChannelRefused naming the first channel whose retry period lies outside the operator's
    bounds."""
    for channel in rule.channels:
        period = channel.retry_period_s
        if period is not None and not low <= period <= high:
            raise ChannelRefused(
                f"channel {channel.name}: retry_period_s {period:g} is outside the operator's "
                f"bounds {low:g}..{high:g} s (TRACE_ALERT_RETRY_PERIOD_MIN_S, "
                "TRACE_ALERT_RETRY_PERIOD_MAX_S): choose a period within them"
            )


@dataclass(frozen=True)
class StoredRule:
    rule: AlertRule
    version: int

    @property
    def key(self) -> str:
        return f"{self.rule.org}/{self.rule.id}@v{self.version}"


@dataclass(frozen=True)
class RuleVersion:
    """One stored version of a rule and when it was written."""

    stored: StoredRule
    created_at: datetime


@dataclass(frozen=True)
class RuleHistoryEntry:
    """One version of a rule, without its declaration (a rule's history lists many)."""

    version: int
    enabled: bool
    created_at: datetime


def _rule_version(row: sa.Row[Any]) -> RuleVersion:
    return RuleVersion(StoredRule(AlertRule.model_validate(row.spec), row.version), row.created_at)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(rule)"
        lines.append(f"  {where}: {item['msg']}")
    return f"{source}: invalid alert rule\n" + "\n".join(lines)


def parse_rule(data: Any, source: str = "rule") -> AlertRule:
    """Validate a rule; RuleError lists every bad field as `path.to.field: message`."""
    try:
        return AlertRule.model_validate(data)
    except ValidationError as exc:
        raise RuleError(_format_errors(exc, source)) from None


def load_rule_file(path: str) -> AlertRule:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise RuleError(f"{path}: not valid {kind}: {exc}") from None
    return parse_rule(data, path)


class RuleStore:
    """Versioned rules in Postgres data."""

    def __init__(
        self,
        engine: sa.Engine,
        check: Callable[[AlertRule], None] | None = None,
        *,
        outbound: OutboundPolicy | None = None,
        keyring: Keyring | None = None,
        retry_bounds: tuple[float, float] | None = None,
    ) -> None:
        self.engine = engine
        # (shortest, longest) retry period a channel may set; from the settings if not given
        self._retry_bounds = retry_bounds
        # raises RuleError for a rule that may not be stored (e.g. a custom SQL condition
        # over a dataset its organisation may not read: trace_assets.alerts.scope)
        self.check = check
        # both from the settings when first written with (reading rules needs neither)
        self._outbound = outbound
        self._keyring = keyring

    def _policies(self) -> tuple[OutboundPolicy, Keyring]:
        if self._outbound is None or self._keyring is None:
            settings = get_settings()
            self._outbound = self._outbound or OutboundPolicy.from_settings(settings)
            self._keyring = self._keyring or Keyring.parse(settings.secrets_keys.get_secret_value())
        return self._outbound, self._keyring

    def _periods(self) -> tuple[float, float]:
        if self._retry_bounds is None:
            settings = get_settings()
            self._retry_bounds = (
                settings.alert_retry_period_min_s,
                settings.alert_retry_period_max_s,
            )
        return self._retry_bounds

    def _latest(self, conn: sa.Connection, org: str, rule_id: str) -> sa.Row[Any] | None:
        return conn.execute(
            sa.select(t.rules)
            .where(t.rules.c.org == org, t.rules.c.rule_id == rule_id)
            .order_by(t.rules.c.version.desc())
            .limit(1)
            .with_for_update()
        ).one_or_none()

    def _write(
        self, rule: AlertRule, *, must_exist: bool | None, conn: sa.Connection | None = None
    ) -> StoredRule:
        """Check and store the rule's next version (must_exist None: create or update);
        inside `conn`'s transaction when given."""
        self.validate(rule)
        _, keyring = self._policies()
        try:
            spec = rule.stored_json(keyring)
        except SealError as exc:
            raise ChannelRefused(f"a channel secret is not usable: {exc}") from None
        if conn is not None:
            return self._insert(conn, rule, spec, must_exist)
        with self.engine.begin() as conn:
            return self._insert(conn, rule, spec, must_exist)

    def _insert(
        self, conn: sa.Connection, rule: AlertRule, spec: dict[str, Any], must_exist: bool | None
    ) -> StoredRule:
        # serialise writers of one rule so versions never collide
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
            {"k": f"rule:{rule.org}/{rule.id}"},
        )
        latest = self._latest(conn, rule.org, rule.id)
        if must_exist and latest is None:
            raise RuleError(
                f"no rule {rule.org}/{rule.id}: create it first (`trace alerts rule create`)"
            )
        if must_exist is False and latest is not None:
            raise RuleError(
                f"rule {rule.org}/{rule.id} exists (version {latest.version}): use "
                "`trace alerts rule update`"
            )
        version = 1 if latest is None else latest.version + 1
        conn.execute(
            t.rules.insert().values(
                org=rule.org,
                rule_id=rule.id,
                version=version,
                spec=spec,
                enabled=rule.enabled,
            )
        )
        return StoredRule(rule, version)

    def validate(self, rule: AlertRule) -> None:
        """Every check a write makes of an enabled rule (its scope, its channels' receivers
        and retry periods), without writing: RuleError says what is refused."""
        outbound, _ = self._policies()
        if self.check is not None and rule.enabled:
            self.check(rule)
        if rule.enabled:
            check_channels(rule, outbound)
            check_retry_periods(rule, *self._periods())

    def put_in(self, conn: sa.Connection, rule: AlertRule) -> StoredRule:
        """Create or update the rule inside `conn`'s transaction, with every check of
        `create`/`update` (environment promotion applies many rules at once)."""
        return self._write(rule, must_exist=None, conn=conn)

    def reseal_secrets(self, keyring: Keyring) -> tuple[int, int]:
        """Seal every stored secret (every version of every rule: alerts are delivered with
        the version they were raised by) under the keyring's current key: clear ones sealed,
        older keys' re-wrapped. Returns (versions rewritten, versions read); SealError if a
        secret does not open (its key is missing from the keyring)."""
        return reseal_rule_specs(self.engine, keyring)

    def create(self, rule: AlertRule) -> StoredRule:
        return self._write(rule, must_exist=False)

    def update(self, rule: AlertRule) -> StoredRule:
        return self._write(rule, must_exist=True)

    def disable(self, org: str, rule_id: str) -> StoredRule:
        current = self.get(org, rule_id)
        if current is None:
            raise RuleError(f"no rule {org}/{rule_id}")
        return self.update(current.rule.model_copy(update={"enabled": False}))

    def get(self, org: str, rule_id: str, version: int | None = None) -> StoredRule | None:
        found = self.get_version(org, rule_id, version)
        return None if found is None else found.stored

    def get_version(self, org: str, rule_id: str, version: int | None = None) -> RuleVersion | None:
        """The given version of a rule (default: the one in force), or None."""
        query = sa.select(t.rules).where(t.rules.c.org == org, t.rules.c.rule_id == rule_id)
        if version is not None:
            query = query.where(t.rules.c.version == version)
        query = query.order_by(t.rules.c.version.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _rule_version(row)

    def history(self, org: str, rule_id: str) -> list[RuleHistoryEntry]:
        """Every version of a rule, oldest first (empty for a rule the org does not have)."""
        r = t.rules
        query = (
            sa.select(r.c.version, r.c.enabled, r.c.created_at)
            .where(r.c.org == org, r.c.rule_id == rule_id)
            .order_by(r.c.version)
        )
        with self.engine.connect() as conn:
            return [RuleHistoryEntry(*row) for row in conn.execute(query)]

    def latest(self, org: str | None = None, *, enabled_only: bool = False) -> list[StoredRule]:
        """The version in force of every rule (of one org), ordered by org and id."""
        return [v.stored for v in self.in_force(org, enabled=True if enabled_only else None)]

    def in_force(self, org: str | None = None, *, enabled: bool | None = None) -> list[RuleVersion]:
        """The version in force of every rule (of one org; only enabled or only disabled
        ones), ordered by org and id."""
        r = t.rules
        newest = (
            sa.select(r.c.org, r.c.rule_id, sa.func.max(r.c.version).label("version"))
            .group_by(r.c.org, r.c.rule_id)
            .subquery()
        )
        query = sa.select(r).join(
            newest,
            (newest.c.org == r.c.org)
            & (newest.c.rule_id == r.c.rule_id)
            & (newest.c.version == r.c.version),
        )
        if org is not None:
            query = query.where(r.c.org == org)
        if enabled is not None:
            query = query.where(r.c.enabled == enabled)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(r.c.org, r.c.rule_id)).all()
        return [_rule_version(row) for row in rows]


def rules_in_force(conn: sa.Connection) -> dict[tuple[str, str], tuple[int, dict[str, Any]]]:
    """Every rule's version in force and its stored spec, by (org, rule id)."""
    r = t.rules
    newest = (
        sa.select(r.c.org, r.c.rule_id, sa.func.max(r.c.version).label("version"))
        .group_by(r.c.org, r.c.rule_id)
        .subquery()
    )
    rows = conn.execute(
        sa.select(r.c.org, r.c.rule_id, r.c.version, r.c.spec).join(
            newest,
            (newest.c.org == r.c.org)
            & (newest.c.rule_id == r.c.rule_id)
            & (newest.c.version == r.c.version),
        )
    ).all()
    return {(row.org, row.rule_id): (row.version, row.spec) for row in rows}


def undo_rule_versions_after(conn: sa.Connection, org: str, rule_id: str, version: int) -> int:
    """Remove a rule's versions newer than `version` (0: all), for `trace promote rollback`,
    which restores an environment exactly as it was before a promotion. Alerts raised under a
    removed version keep their rows, but the deliverer no longer finds their channel settings.
    Returns how many versions were removed."""
    r = t.rules
    done = conn.execute(
        r.delete().where(r.c.org == org, r.c.rule_id == rule_id, r.c.version > version)
    )
    return int(done.rowcount)


def reseal_rule_specs(engine: sa.Engine, keyring: Keyring) -> tuple[int, int]:
    """`RuleStore.reseal_secrets` (each row in its own short transaction)."""
    r = t.rules
    with engine.connect() as conn:
        keys = conn.execute(sa.select(r.c.org, r.c.rule_id, r.c.version)).all()
    changed = 0
    for org, rule_id, version in keys:
        with engine.begin() as conn:
            where = (r.c.org == org) & (r.c.rule_id == rule_id) & (r.c.version == version)
            spec = conn.execute(sa.select(r.c.spec).where(where).with_for_update()).scalar_one()
            sealed = reseal_spec(spec, keyring)
            if sealed is not None:
                conn.execute(r.update().where(where).values(spec=sealed))
                changed += 1
    return changed, len(keys)


def describe(rules: Sequence[StoredRule]) -> list[dict[str, Any]]:
    return [
        {
            "org": s.rule.org,
            "id": s.rule.id,
            "version": s.version,
            "enabled": s.rule.enabled,
            "kind": s.rule.condition.kind,
            "channels": [c.name for c in s.rule.channels],
        }
        for s in rules
    ]
