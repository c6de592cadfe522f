"""Dashboards: an organisation's panels of queries, kept in versions, and the embed links that
share one version read-only (tables `trace_dashboards`, `trace_dashboard_versions`,
`trace_dashboard_embeds`).

Every write of a dashboard adds a version (its whole spec, JSON); `current_version` names the
newest. Every read is scoped by organisation, so another organisation's dashboard is absent
here. An embed row is the server side of an embed token: the token names the row, and the row
(not revoked, not expired, its dashboard still there) is checked on every use. Deleting a
dashboard deletes its versions and embeds.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.state import metadata

__all__ = [
    "dashboards",
    "dashboard_versions",
    "dashboard_embeds",
    "Dashboard",
    "DashboardVersion",
    "Embed",
    "create_dashboard",
    "org_dashboards",
    "org_dashboard",
    "update_dashboard",
    "dashboard_version",
    "dashboard_versions_of",
    "delete_dashboard",
    "create_embed",
    "org_embeds",
    "revoke_embed",
    "live_embed",
    "current_specs",
]

_now = sa.func.now()

dashboards = sa.Table(
    "trace_dashboards",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("current_version", sa.Integer, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Index("trace_dashboards_by_org", "org"),
)

dashboard_versions = sa.Table(
    "trace_dashboard_versions",
    metadata,
    sa.Column(
        "dashboard_id",
        UUID(as_uuid=False),
        sa.ForeignKey("trace_dashboards.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("spec", JSONB, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

dashboard_embeds = sa.Table(
    "trace_dashboard_embeds",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column(
        "dashboard_id",
        UUID(as_uuid=False),
        sa.ForeignKey("trace_dashboards.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("panel", sa.Text, nullable=True),
    sa.Column("pins", JSONB, nullable=True),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("trace_dashboard_embeds_by_dashboard", "dashboard_id"),
)


class Dashboard(TypedDict):
    id: str
    org: str
    name: str
    current_version: int
    created_by: str
    created_at: datetime
    updated_at: datetime


class DashboardVersion(TypedDict):
    dashboard_id: str
    version: int
    spec: dict[str, Any]
    created_by: str
    created_at: datetime


class Embed(TypedDict):
    id: str
    dashboard_id: str
    org: str
    version: int
    panel: str | None
    pins: dict[str, dict[str, int]] | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


def create_dashboard(
    engine: sa.Engine, *, org: str, name: str, spec: dict[str, Any], created_by: str
) -> Dashboard:
    """A new dashboard at version 1."""
    dashboard_id = str(uuid.uuid4())
    with engine.begin() as conn:
        row = (
            conn.execute(
                dashboards.insert()
                .values(
                    id=dashboard_id, org=org, name=name, current_version=1, created_by=created_by
                )
                .returning(*dashboards.c)
            )
            .mappings()
            .one()
        )
        conn.execute(
            dashboard_versions.insert().values(
                dashboard_id=dashboard_id, version=1, spec=spec, created_by=created_by
            )
        )
    return cast(Dashboard, dict(row))


def org_dashboards(engine: sa.Engine, org: str) -> list[Dashboard]:
    """The organisation's dashboards by name."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(dashboards)
                .where(dashboards.c.org == org)
                .order_by(dashboards.c.name, dashboards.c.id)
            )
            .mappings()
            .all()
        )
    return [cast(Dashboard, dict(r)) for r in rows]


def org_dashboard(engine: sa.Engine, org: str, dashboard_id: str) -> Dashboard | None:
    """One dashboard of the organisation, or None (unknown or another organisation's)."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(dashboards)
                .where(dashboards.c.id == dashboard_id)
                .where(dashboards.c.org == org)
            )
            .mappings()
            .first()
        )
    return None if row is None else cast(Dashboard, dict(row))


def update_dashboard(
    engine: sa.Engine,
    *,
    org: str,
    dashboard_id: str,
    name: str,
    spec: dict[str, Any],
    created_by: str,
) -> Dashboard | None:
    """Add the next version (the dashboard row is locked meanwhile); None if absent."""
    with engine.begin() as conn:
        row = (
            conn.execute(
                dashboards.update()
                .where(dashboards.c.id == dashboard_id)
                .where(dashboards.c.org == org)
                .values(
                    name=name,
                    current_version=dashboards.c.current_version + 1,
                    updated_at=_now,
                )
                .returning(*dashboards.c)
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        conn.execute(
            dashboard_versions.insert().values(
                dashboard_id=dashboard_id,
                version=row["current_version"],
                spec=spec,
                created_by=created_by,
            )
        )
    return cast(Dashboard, dict(row))


def dashboard_version(
    engine: sa.Engine, org: str, dashboard_id: str, version: int
) -> DashboardVersion | None:
    """One version of one of the organisation's dashboards, or None."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(dashboard_versions)
                .join(dashboards, dashboards.c.id == dashboard_versions.c.dashboard_id)
                .where(dashboards.c.org == org)
                .where(dashboard_versions.c.dashboard_id == dashboard_id)
                .where(dashboard_versions.c.version == version)
            )
            .mappings()
            .first()
        )
    return None if row is None else cast(DashboardVersion, dict(row))


def dashboard_versions_of(engine: sa.Engine, org: str, dashboard_id: str) -> list[DashboardVersion]:
    """Every version of the dashboard, oldest first (empty: absent or another org's)."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(dashboard_versions)
                .join(dashboards, dashboards.c.id == dashboard_versions.c.dashboard_id)
                .where(dashboards.c.org == org)
                .where(dashboard_versions.c.dashboard_id == dashboard_id)
                .order_by(dashboard_versions.c.version)
            )
            .mappings()
            .all()
        )
    return [cast(DashboardVersion, dict(r)) for r in rows]


def delete_dashboard(engine: sa.Engine, org: str, dashboard_id: str) -> bool:
    """Delete the dashboard, its versions and its embeds; False if it was absent."""
    with engine.begin() as conn:
        deleted = conn.execute(
            dashboards.delete()
            .where(dashboards.c.id == dashboard_id)
            .where(dashboards.c.org == org)
        )
    return deleted.rowcount > 0


def create_embed(
    engine: sa.Engine,
    *,
    org: str,
    dashboard_id: str,
    version: int,
    panel: str | None,
    pins: dict[str, dict[str, int]] | None,
    created_by: str,
    ttl_s: int,
) -> Embed:
    with engine.begin() as conn:
        row = (
            conn.execute(
                dashboard_embeds.insert()
                .values(
                    id=str(uuid.uuid4()),
                    dashboard_id=dashboard_id,
                    org=org,
                    version=version,
                    panel=panel,
                    pins=pins,
                    created_by=created_by,
                    expires_at=_now + sa.func.make_interval(0, 0, 0, 0, 0, 0, ttl_s),
                )
                .returning(*dashboard_embeds.c)
            )
            .mappings()
            .one()
        )
    return cast(Embed, dict(row))


def org_embeds(engine: sa.Engine, org: str, dashboard_id: str) -> list[Embed]:
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(dashboard_embeds)
                .where(dashboard_embeds.c.org == org)
                .where(dashboard_embeds.c.dashboard_id == dashboard_id)
                .order_by(dashboard_embeds.c.created_at)
            )
            .mappings()
            .all()
        )
    return [cast(Embed, dict(r)) for r in rows]


def revoke_embed(engine: sa.Engine, org: str, dashboard_id: str, embed_id: str) -> bool:
    """Revoke an embed from now on; False if the organisation's dashboard has no such embed."""
    with engine.begin() as conn:
        changed = conn.execute(
            dashboard_embeds.update()
            .where(dashboard_embeds.c.id == embed_id)
            .where(dashboard_embeds.c.org == org)
            .where(dashboard_embeds.c.dashboard_id == dashboard_id)
            .values(revoked_at=sa.func.coalesce(dashboard_embeds.c.revoked_at, _now))
        )
    return changed.rowcount > 0


def live_embed(engine: sa.Engine, embed_id: str) -> tuple[Embed, DashboardVersion] | None:
    """The embed and its dashboard version if it is neither revoked nor expired (by the
    database's clock), else None."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(dashboard_embeds, dashboard_versions.c.spec)
                .join(
                    dashboard_versions,
                    sa.and_(
                        dashboard_versions.c.dashboard_id == dashboard_embeds.c.dashboard_id,
                        dashboard_versions.c.version == dashboard_embeds.c.version,
                    ),
                )
                .where(dashboard_embeds.c.id == embed_id)
                .where(dashboard_embeds.c.revoked_at.is_(None))
                .where(dashboard_embeds.c.expires_at > _now)
            )
            .mappings()
            .first()
        )
    if row is None:
        return None
    values = dict(row)
    spec = values.pop("spec")
    embed = cast(Embed, values)
    version = DashboardVersion(
        dashboard_id=embed["dashboard_id"],
        version=embed["version"],
        spec=spec,
        created_by=embed["created_by"],
        created_at=embed["created_at"],
    )
    return embed, version


def current_specs(engine: sa.Engine) -> list[tuple[Dashboard, DashboardVersion]]:
    """Every dashboard of every organisation with its current version (the `Represent` assets
    are built from them when the code location loads), by org and id."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(
                    *dashboards.c,
                    dashboard_versions.c.spec,
                    dashboard_versions.c.created_by.label("version_created_by"),
                    dashboard_versions.c.created_at.label("version_created_at"),
                )
                .join(
                    dashboard_versions,
                    sa.and_(
                        dashboard_versions.c.dashboard_id == dashboards.c.id,
                        dashboard_versions.c.version == dashboards.c.current_version,
                    ),
                )
                .order_by(dashboards.c.org, dashboards.c.id)
            )
            .mappings()
            .all()
        )
    out = []
    for r in rows:
        board = cast(Dashboard, {c.name: r[c.name] for c in dashboards.c})
        version = DashboardVersion(
            dashboard_id=r["id"],
            version=r["current_version"],
            spec=r["spec"],
            created_by=r["version_created_by"],
            created_at=r["version_created_at"],
        )
        out.append((board, version))
    return out
