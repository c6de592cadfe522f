"""Saved queries: SQL shared within one organisation (table `trace_query_saved_queries`).

Every read and delete is scoped by organisation, so another organisation's saved query is
absent here; who may create or delete one is the query service's rule.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TypedDict, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage.state import metadata

__all__ = [
    "saved_queries",
    "SavedQuery",
    "SavedQueryNameTakenError",
    "create_saved_query",
    "org_saved_queries",
    "org_saved_query",
    "delete_saved_query",
    "every_saved_query",
    "put_saved_query",
    "restore_saved_query",
]

saved_queries = sa.Table(
    "trace_query_saved_queries",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.UniqueConstraint("org", "name", name="trace_query_saved_queries_org_name"),
)


class SavedQuery(TypedDict):
    id: str
    org: str
    name: str
    sql: str
    description: str | None
    created_by: str
    created_at: datetime


class SavedQueryNameTakenError(Exception):
    """The organisation already has a saved query of that name."""


def create_saved_query(
    engine: sa.Engine, *, org: str, name: str, sql: str, description: str | None, created_by: str
) -> SavedQuery:
    """Store a new saved query under a fresh id; names are unique within an organisation."""
    values = {
        "id": str(uuid.uuid4()),
        "org": org,
        "name": name,
        "sql": sql,
        "description": description,
        "created_by": created_by,
    }
    try:
        with engine.begin() as conn:
            row = (
                conn.execute(saved_queries.insert().values(**values).returning(*saved_queries.c))
                .mappings()
                .one()
            )
    except sa.exc.IntegrityError:
        raise SavedQueryNameTakenError(name) from None
    return cast(SavedQuery, dict(row))


def org_saved_queries(engine: sa.Engine, org: str) -> list[SavedQuery]:
    """The organisation's saved queries by name."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(saved_queries)
                .where(saved_queries.c.org == org)
                .order_by(saved_queries.c.name)
            )
            .mappings()
            .all()
        )
    return [cast(SavedQuery, dict(r)) for r in rows]


def org_saved_query(engine: sa.Engine, org: str, query_id: uuid.UUID) -> SavedQuery | None:
    """One saved query of the organisation, or None (unknown or another organisation's)."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(saved_queries)
                .where(saved_queries.c.id == str(query_id))
                .where(saved_queries.c.org == org)
            )
            .mappings()
            .first()
        )
    return None if row is None else cast(SavedQuery, dict(row))


def delete_saved_query(engine: sa.Engine, org: str, query_id: uuid.UUID) -> None:
    with engine.begin() as conn:
        conn.execute(
            saved_queries.delete()
            .where(saved_queries.c.id == str(query_id))
            .where(saved_queries.c.org == org)
        )


# Environment promotion (`trace_resources.promotion`) copies every organisation's saved
# queries between environments inside one transaction of the target; by (org, name), since ids
# are per environment.


def every_saved_query(conn: sa.Connection) -> list[SavedQuery]:
    """Every organisation's saved queries, by org and name."""
    rows = (
        conn.execute(sa.select(saved_queries).order_by(saved_queries.c.org, saved_queries.c.name))
        .mappings()
        .all()
    )
    return [cast(SavedQuery, dict(r)) for r in rows]


def put_saved_query(
    conn: sa.Connection, *, org: str, name: str, sql: str, description: str | None, created_by: str
) -> None:
    """Create the organisation's saved query `name`, or change its SQL and description (its
    id, author and creation time stay)."""
    conn.execute(
        pg_insert(saved_queries)
        .values(
            id=str(uuid.uuid4()),
            org=org,
            name=name,
            sql=sql,
            description=description,
            created_by=created_by,
        )
        .on_conflict_do_update(
            constraint="trace_query_saved_queries_org_name",
            set_={"sql": sql, "description": description},
        )
    )


def restore_saved_query(conn: sa.Connection, org: str, name: str, row: SavedQuery | None) -> None:
    """Make (org, name) exactly `row` again (None: absent), id and creation time included."""
    conn.execute(
        saved_queries.delete().where(saved_queries.c.org == org, saved_queries.c.name == name)
    )
    if row is not None:
        conn.execute(saved_queries.insert().values(**row))
