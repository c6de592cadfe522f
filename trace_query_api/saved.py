"""Saved queries: SQL shared by the subjects of one organisation.

Anyone in the organisation lists and runs them (each run is checked against the runner's own
token); user tokens create them; only the subject that created one deletes it. Another
organisation's saved query reads as not found.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from trace_query_api import db
from trace_query_api.errors import ConflictError, ForbiddenError, NotFoundError
from trace_resources.tokens import Principal

__all__ = ["SavedQueries"]


class SavedQueries:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(
        self, principal: Principal, name: str, sql: str, description: str | None
    ) -> dict[str, Any]:
        values = {
            "id": str(uuid.uuid4()),
            "org": principal.org,
            "name": name,
            "sql": sql,
            "description": description,
            "created_by": principal.subject,
        }
        try:
            with self.engine.begin() as conn:
                row = (
                    conn.execute(
                        db.saved_queries.insert().values(**values).returning(*db.saved_queries.c)
                    )
                    .mappings()
                    .one()
                )
        except sa.exc.IntegrityError:
            raise ConflictError(
                f"your organisation already has a saved query named {name!r}; pick another name "
                "or delete that one first",
                code="saved_query_exists",
            ) from None
        return dict(row)

    def of_org(self, principal: Principal) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    sa.select(db.saved_queries)
                    .where(db.saved_queries.c.org == principal.org)
                    .order_by(db.saved_queries.c.name)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def get(self, principal: Principal, query_id: uuid.UUID) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(db.saved_queries)
                    .where(db.saved_queries.c.id == str(query_id))
                    .where(db.saved_queries.c.org == principal.org)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFoundError(
                f"no saved query {str(query_id)!r} in your organisation", code="unknown_saved_query"
            )
        return dict(row)

    def delete(self, principal: Principal, query_id: uuid.UUID) -> None:
        row = self.get(principal, query_id)
        if row["created_by"] != principal.subject:
            raise ForbiddenError(
                f"saved query {row['name']!r} was created by {row['created_by']!r}; only its "
                "creator deletes it",
                code="not_owner",
            )
        with self.engine.begin() as conn:
            conn.execute(
                db.saved_queries.delete()
                .where(db.saved_queries.c.id == str(query_id))
                .where(db.saved_queries.c.org == principal.org)
            )


def public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "sql": row["sql"],
        "description": row["description"],
        "created_by": row["created_by"],
        "created_at": row["created_at"],
    }
