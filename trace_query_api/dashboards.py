"""Dashboards: an organisation's saved queries arranged as panels with shared parameters,
kept in versions; drill-down; and read-only embed links of one version.

A dashboard's spec (`DashboardSpec`) declares typed parameters and panels. A panel's SQL (its
own, or a saved query's, copied into the version when it is written) names parameters as
`{{name}}`; before it runs, each is replaced by a typed SQL literal built from the value
after strict validation (`render_sql`), never by the caller's text:

    block, integer   a whole number              -> CAST(123 AS BIGINT)
    timestamp        ISO 8601 (naive means UTC)  -> CAST('2026-01-02 03:04:05+00:00' AS TIMESTAMPTZ)
    date             YYYY-MM-DD                  -> CAST('2026-01-02' AS DATE)
    address          0x and 40 hex digits        -> from_hex('...')   (a BLOB, as the datasets)
    no value         (no default, none given)    -> CAST(NULL AS <type>)

An embed token (`EmbedTokens`) is a JWT for the audience `<aud>:embed`, which no other route
accepts; it names a row of `trace_dashboard_embeds` that is checked on every use (revocation,
expiry by the database's clock, the dashboard still there). With it, only the panels of that
version run (`EmbedAccess`), with their stored SQL and pinned versions.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from trace_query_api.engine import MAX_SQL_CHARS, Parser
from trace_query_api.errors import ApiError, AuthError, BadRequestError, NotFoundError
from trace_resources.settings import QuerySettings
from trace_resources.storage import dashboards as store
from trace_resources.storage import saved_queries as saved_store
from trace_resources.tokens import Keyring, Principal

__all__ = [
    "ParameterType",
    "ParameterSpec",
    "ChartSpec",
    "DrillSpec",
    "PanelSpec",
    "DashboardSpec",
    "ParameterValue",
    "InvalidDashboardError",
    "Dashboards",
    "EmbedTokens",
    "EmbedAccess",
    "render_sql",
    "literal",
    "panel_sql",
    "shared_panels",
]

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
FieldName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Title = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]+$", max_length=200)]
ParameterType = Literal["block", "integer", "timestamp", "date", "address"]
ChartKind = Literal["line", "bar", "area", "scatter", "table", "number"]
ParameterValue = str | int | None
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_INTEGER = re.compile(r"^-?[0-9]{1,19}$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_SQL_TYPES = {
    "block": "BIGINT",
    "integer": "BIGINT",
    "timestamp": "TIMESTAMPTZ",
    "date": "DATE",
    "address": "BLOB",
}
_XY_KINDS = ("line", "bar", "area", "scatter")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParameterSpec(_Spec):
    name: Identifier = Field(description="Referenced in panel SQL as `{{name}}`.")
    type: ParameterType
    default: ParameterValue = Field(None, description="Used when a run gives no value.")
    label: Title | None = None


class ChartSpec(_Spec):
    kind: ChartKind
    x: FieldName | None = Field(None, description="Result column on the x axis.")
    y: FieldName | None = Field(None, description="Result column on the y axis / the number.")


class DrillSpec(_Spec):
    panel: Identifier = Field(description="The panel to re-run: a panel id, or `self`.")
    parameter: Identifier = Field(description="The dashboard parameter set to the value.")
    field: FieldName = Field(description="The clicked datum's field that gives the value.")


class PanelSpec(_Spec):
    id: Identifier
    title: Title
    query_id: uuid.UUID | None = Field(None, description="A saved query of the organisation.")
    sql: Annotated[str, StringConstraints(min_length=1, max_length=MAX_SQL_CHARS)] | None = None
    chart: ChartSpec
    drill: DrillSpec | None = None
    represent: bool = Field(
        False,
        description="Also materialise the panel as a Dagster asset (`represent_<org>__...`): "
        "its chart as SVG and PNG and its data snapshot, pinned to the dataset versions read, "
        "refreshed when they change. A line, bar, area, scatter or number panel without "
        "parameters (one fixed picture).",
    )


class DashboardSpec(_Spec):
    name: Title
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    parameters: list[ParameterSpec] = Field(default_factory=list, max_length=20)
    panels: list[PanelSpec] = Field(min_length=1, max_length=30)


class InvalidDashboardError(BadRequestError):
    """A dashboard spec or a parameter value is refused; the message says what and how."""

    code = "invalid_dashboard"


# -- parameters --------------------------------------------------------------------------------


def literal(kind: ParameterType, value: ParameterValue, name: str) -> str:
    """The typed SQL literal of a parameter value, built from the parsed value only."""
    sql_type = _SQL_TYPES[kind]
    if value is None or value == "":
        return f"CAST(NULL AS {sql_type})"
    if kind in ("block", "integer"):
        number = _integer(value, name)
        if kind == "block" and number < 0:
            raise InvalidDashboardError(f"parameter {name!r}: a block number is >= 0")
        return f"CAST({number} AS BIGINT)"
    if not isinstance(value, str):
        raise InvalidDashboardError(
            f"parameter {name!r} ({kind}) takes a string, e.g. {_EXAMPLES[kind]!r}"
        )
    if kind == "address":
        if not _ADDRESS.match(value):
            raise InvalidDashboardError(
                f"parameter {name!r} is not an address: give 0x and 40 hex digits, e.g. "
                f"{_EXAMPLES['address']!r}"
            )
        return f"from_hex('{value[2:].lower()}')"
    if kind == "date":
        if not _DATE.match(value):
            raise InvalidDashboardError(
                f"parameter {name!r} is not a date: give YYYY-MM-DD, e.g. {_EXAMPLES['date']!r}"
            )
        try:
            return f"CAST('{date.fromisoformat(value).isoformat()}' AS DATE)"
        except ValueError:
            raise InvalidDashboardError(
                f"parameter {name!r}: {value!r} is no calendar date"
            ) from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidDashboardError(
            f"parameter {name!r} is not an ISO 8601 timestamp, e.g. {_EXAMPLES['timestamp']!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        raise InvalidDashboardError(
            f"parameter {name!r}: {value!r} is out of the range of timestamps"
        ) from None
    return f"CAST('{utc.isoformat(sep=' ')}' AS TIMESTAMPTZ)"


_EXAMPLES = {
    "block": "12345",
    "integer": "42",
    "timestamp": "2026-01-02T03:04:05Z",
    "date": "2026-01-02",
    "address": "0x" + "ab" * 20,
}


def _integer(value: ParameterValue, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidDashboardError(f"parameter {name!r} takes a whole number")
    if isinstance(value, str) and not _INTEGER.match(value.strip()):
        raise InvalidDashboardError(
            f"parameter {name!r} takes a whole number, e.g. 12345; got {value[:40]!r}"
        )
    number = int(value)
    if not -(2**63) <= number < 2**63:
        raise InvalidDashboardError(f"parameter {name!r} is out of the 64-bit range")
    return number


def render_sql(
    sql: str, parameters: list[ParameterSpec], values: Mapping[str, ParameterValue]
) -> str:
    """The panel's SQL with every `{{name}}` replaced by its typed literal (the value given,
    else the parameter's default, else a typed NULL)."""
    declared = {p.name: p for p in parameters}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise InvalidDashboardError(
            f"unknown parameter {unknown[0]!r}; this dashboard declares "
            f"{', '.join(sorted(declared)) or 'no parameters'}"
        )
    rendered: dict[str, str] = {}
    for name, spec in declared.items():
        value = values[name] if name in values else spec.default
        rendered[name] = literal(spec.type, value, name)

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in rendered:
            raise InvalidDashboardError(
                f"the SQL uses {{{{{name}}}}} but the dashboard declares no parameter {name!r}: "
                "add it to `parameters`"
            )
        return rendered[name]

    return PLACEHOLDER.sub(substitute, sql)


# -- dashboards ------------------------------------------------------------------------------


def _not_found(dashboard_id: object) -> NotFoundError:
    return NotFoundError(
        f"no dashboard {str(dashboard_id)[:80]!r} in your organisation; GET /v1/dashboards "
        "lists them",
        code="unknown_dashboard",
    )


class Dashboards:
    """The organisation's dashboards: checked specs, versions, panel runs' SQL, embeds."""

    def __init__(self, engine: sa.Engine, parser: Parser) -> None:
        self.engine = engine
        self.parser = parser

    def check(self, principal: Principal, spec: DashboardSpec) -> dict[str, Any]:
        """The spec as stored: validated, each saved query's SQL copied into its panel."""
        names = [p.name for p in spec.parameters]
        _unique(names, "parameter name")
        _unique([p.id for p in spec.panels], "panel id")
        if "self" in {p.id for p in spec.panels}:
            raise InvalidDashboardError("`self` is reserved for drill-down: rename that panel")
        for parameter in spec.parameters:
            literal(parameter.type, parameter.default, parameter.name)
        panels = []
        for panel in spec.panels:
            panels.append(self._check_panel(principal, spec, panel))
        stored = spec.model_dump(mode="json")
        stored["panels"] = panels
        return stored

    def _check_panel(
        self, principal: Principal, spec: DashboardSpec, panel: PanelSpec
    ) -> dict[str, Any]:
        where = f"panel {panel.id!r}"
        if (panel.sql is None) == (panel.query_id is None):
            raise InvalidDashboardError(
                f"{where}: give exactly one of `sql` (a SELECT) or `query_id` (a saved query)"
            )
        sql = panel.sql
        if panel.query_id is not None:
            saved = saved_store.org_saved_query(self.engine, principal.org, panel.query_id)
            if saved is None:
                raise InvalidDashboardError(
                    f"{where}: no saved query {str(panel.query_id)!r} in your organisation; "
                    "GET /v1/saved-queries lists them"
                )
            sql = saved["sql"]
        assert sql is not None
        chart = panel.chart
        if chart.kind in _XY_KINDS and not (chart.x and chart.y):
            raise InvalidDashboardError(
                f"{where}: a {chart.kind} chart needs `chart.x` and `chart.y` (result columns)"
            )
        if chart.kind == "number" and not chart.y:
            raise InvalidDashboardError(f"{where}: a number chart needs `chart.y` (a column)")
        if panel.represent and chart.kind == "table":
            raise InvalidDashboardError(
                f"{where}: `represent` draws a chart: a table panel has none (use a saved "
                "query or an export for its rows)"
            )
        if panel.represent and PLACEHOLDER.search(sql):
            raise InvalidDashboardError(
                f"{where}: `represent` materialises one fixed picture: its SQL may use no "
                "{{parameters}} (write the values into this panel's SQL)"
            )
        if panel.drill is not None:
            target = panel.drill.panel
            if target != "self" and target not in {p.id for p in spec.panels}:
                raise InvalidDashboardError(
                    f"{where}: drill.panel {target!r} is neither `self` nor a panel id"
                )
            if panel.drill.parameter not in {p.name for p in spec.parameters}:
                raise InvalidDashboardError(
                    f"{where}: drill.parameter {panel.drill.parameter!r} is not a declared "
                    "parameter: add it to `parameters`"
                )
        try:
            self.parser.parse(render_sql(sql, spec.parameters, {}))
        except ApiError as exc:
            raise InvalidDashboardError(f"{where}: {exc.message}") from None
        out = panel.model_dump(mode="json")
        out["sql"] = sql
        return out

    def create(self, principal: Principal, spec: DashboardSpec) -> store.Dashboard:
        stored = self.check(principal, spec)
        return store.create_dashboard(
            self.engine,
            org=principal.org,
            name=spec.name,
            spec=stored,
            created_by=principal.subject,
        )

    def update(
        self, principal: Principal, dashboard_id: uuid.UUID, spec: DashboardSpec
    ) -> store.Dashboard:
        self.get(principal, dashboard_id)  # absent: 404 before the spec is judged
        stored = self.check(principal, spec)
        row = store.update_dashboard(
            self.engine,
            org=principal.org,
            dashboard_id=str(dashboard_id),
            name=spec.name,
            spec=stored,
            created_by=principal.subject,
        )
        if row is None:
            raise _not_found(dashboard_id)
        return row

    def of_org(self, principal: Principal) -> list[store.Dashboard]:
        return store.org_dashboards(self.engine, principal.org)

    def get(self, principal: Principal, dashboard_id: uuid.UUID) -> store.Dashboard:
        row = store.org_dashboard(self.engine, principal.org, str(dashboard_id))
        if row is None:
            raise _not_found(dashboard_id)
        return row

    def version(
        self, principal: Principal, dashboard_id: uuid.UUID, version: int | None
    ) -> store.DashboardVersion:
        if version is None:
            version = self.get(principal, dashboard_id)["current_version"]
        row = store.dashboard_version(self.engine, principal.org, str(dashboard_id), version)
        if row is None:
            if version is not None and store.org_dashboard(
                self.engine, principal.org, str(dashboard_id)
            ):
                raise NotFoundError(
                    f"dashboard {str(dashboard_id)!r} has no version {version}; GET "
                    f"/v1/dashboards/{dashboard_id}/versions lists them",
                    code="unknown_version",
                )
            raise _not_found(dashboard_id)
        return row

    def versions(self, principal: Principal, dashboard_id: uuid.UUID) -> list[Any]:
        rows = store.dashboard_versions_of(self.engine, principal.org, str(dashboard_id))
        if not rows:
            raise _not_found(dashboard_id)
        return rows

    def delete(self, principal: Principal, dashboard_id: uuid.UUID) -> None:
        if not store.delete_dashboard(self.engine, principal.org, str(dashboard_id)):
            raise _not_found(dashboard_id)


def _unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise InvalidDashboardError(f"{what} {value!r} is given twice; they are unique")
        seen.add(value)


def panel_sql(spec: Mapping[str, Any], panel_id: str, values: Mapping[str, ParameterValue]) -> str:
    """The SQL a panel of a stored version runs with these parameter values."""
    panel = next((p for p in spec["panels"] if p["id"] == panel_id), None)
    if panel is None:
        raise NotFoundError(
            f"this dashboard version has no panel {panel_id[:80]!r}", code="unknown_panel"
        )
    parameters = [ParameterSpec.model_validate(p) for p in spec.get("parameters", [])]
    return render_sql(str(panel["sql"]), parameters, values)


# -- embeds ----------------------------------------------------------------------------------


def shared_panels(spec: Mapping[str, Any], panel: str | None) -> set[str]:
    """The panels an embed runs: all (`panel` None), or that panel and its drill target."""
    if panel is None:
        return {str(p["id"]) for p in spec["panels"]}
    allowed = {panel}
    for candidate in spec["panels"]:
        drill = candidate.get("drill")
        if candidate["id"] == panel and drill and drill["panel"] != "self":
            allowed.add(str(drill["panel"]))
    return allowed


@dataclass(frozen=True)
class EmbedAccess:
    """A verified, live embed: what it may run."""

    embed: store.Embed
    spec: dict[str, Any]

    @property
    def panels(self) -> set[str]:
        return shared_panels(self.spec, self.embed["panel"])

    def principal(self, datasets: frozenset[str]) -> Principal:
        """The reader its queries run as: the organisation, narrowed to `datasets`."""
        return Principal(
            org=self.embed["org"],
            subject=f"embed:{self.embed['id']}",
            kind="org",
            jti=self.embed["id"],
            expires_at=int(self.embed["expires_at"].timestamp()),
            datasets=datasets,
        )


class EmbedTokens:
    """Signs embed tokens with the service's keyring, for the audience `<aud>:embed`."""

    def __init__(self, keyring: Keyring, settings: QuerySettings, engine: sa.Engine) -> None:
        self.keyring = keyring
        self.issuer = settings.query_token_issuer
        self.audience = f"{settings.query_token_audience}:embed"
        self.leeway = settings.query_token_leeway_s
        self.engine = engine

    def issue(self, embed: store.Embed) -> str:
        import jwt

        key = self.keyring.signer()
        assert key.signing_key is not None
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": f"embed:{embed['id']}",
            "org": embed["org"],
            "iat": int(time.time()),
            "exp": int(embed["expires_at"].timestamp()),
            "jti": embed["id"],
            "embed": {
                "dashboard": embed["dashboard_id"],
                "version": embed["version"],
                "panel": embed["panel"],
            },
        }
        return jwt.encode(
            claims, key.signing_key, algorithm=key.algorithm, headers={"kid": key.kid}
        )

    def verify(self, token: str) -> EmbedAccess:
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keyring.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthError("the embed token's key id (kid) is not one this service knows")
            claims = jwt.decode(
                token,
                key.verifying_key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(
                "this embed link has expired; ask for a new one", code="embed_expired"
            ) from None
        except jwt.PyJWTError:
            raise AuthError(
                "send an embed token (from a dashboard's share link) as `Authorization: "
                "Bearer <token>`",
                code="invalid_embed_token",
            ) from None
        live = store.live_embed(self.engine, str(claims["jti"]))
        if live is None or live[0]["org"] != claims.get("org"):
            raise AuthError(
                "this embed link was revoked or has expired, or its dashboard was deleted",
                code="embed_revoked",
            )
        return EmbedAccess(live[0], live[1]["spec"])
