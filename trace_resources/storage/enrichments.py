"""The registry of organisations' enrichment datasets (table `trace_enrichments`).

An enrichment is an org-owned, unpartitioned dataset `org_<org>__<name>` whose rows an
organisation uploads (CSV or Parquet) instead of computing them. Its data and versions are the
commit protocol's like any dataset's (each upload is a new version, replace mode); this table
only says that the name is an upload's, so neither a transform nor anything else takes it,
and who uploaded it last.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.state import metadata

__all__ = ["Enrichment", "enrichments", "register", "listed", "is_enrichment"]

enrichments = sa.Table(
    "trace_enrichments",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("uploaded_by", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Index("trace_enrichments_org", "org", "name"),
)


@dataclass(frozen=True)
class Enrichment:
    name: str
    org: str
    description: str | None
    uploaded_by: str
    created_at: datetime
    updated_at: datetime


def _enrichment(row: Any) -> Enrichment:
    return Enrichment(
        row.name, row.org, row.description, row.uploaded_by, row.created_at, row.updated_at
    )


def register(
    conn: sa.Connection, name: str, org: str, uploaded_by: str, description: str | None
) -> None:
    """Record `name` as an enrichment of `org` (again: who uploaded it last, and when)."""
    t = enrichments
    update: dict[str, Any] = {"uploaded_by": uploaded_by, "updated_at": sa.func.now()}
    if description is not None:
        update["description"] = description
    conn.execute(
        pg_insert(t)
        .values(name=name, org=org, description=description, uploaded_by=uploaded_by)
        .on_conflict_do_update(index_elements=["name"], set_=update)
    )


def is_enrichment(db: sa.Engine | sa.Connection, name: str) -> bool:
    query = sa.select(sa.literal(1)).where(enrichments.c.name == name)
    if isinstance(db, sa.Connection):
        return db.execute(query).first() is not None
    with db.connect() as conn:
        return conn.execute(query).first() is not None


def listed(engine: sa.Engine, org: str | None = None) -> list[Enrichment]:
    """Every enrichment (of `org`), by name."""
    query = sa.select(enrichments).order_by(enrichments.c.name)
    if org is not None:
        query = query.where(enrichments.c.org == org)
    with engine.connect() as conn:
        return [_enrichment(r) for r in conn.execute(query)]
