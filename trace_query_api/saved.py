"""Saved queries: SQL shared by the subjects of one organisation.

Anyone in the organisation lists and runs them (each run is checked against the runner's own
token); user tokens create them; only the subject that created one deletes it. Another
organisation's saved query reads as not found. The table and its SQL:
`trace_resources.storage.saved_queries`.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from trace_query_api.errors import ConflictError, ForbiddenError, NotFoundError
from trace_resources.storage import saved_queries as store
from trace_resources.storage.saved_queries import SavedQuery
from trace_resources.tokens import Principal

__all__ = ["SavedQueries"]


class SavedQueries:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(
        self, principal: Principal, name: str, sql: str, description: str | None
    ) -> SavedQuery:
        try:
            return store.create_saved_query(
                self.engine,
                org=principal.org,
                name=name,
                sql=sql,
                description=description,
                created_by=principal.subject,
            )
        except store.SavedQueryNameTakenError:
            raise ConflictError(
                f"your organisation already has a saved query named {name!r}; pick another name "
                "or delete that one first",
                code="saved_query_exists",
            ) from None

    def of_org(self, principal: Principal) -> list[SavedQuery]:
        return store.org_saved_queries(self.engine, principal.org)

    def get(self, principal: Principal, query_id: uuid.UUID) -> SavedQuery:
        row = store.org_saved_query(self.engine, principal.org, query_id)
        if row is None:
            raise NotFoundError(
                f"no saved query {str(query_id)!r} in your organisation", code="unknown_saved_query"
            )
        return row

    def delete(self, principal: Principal, query_id: uuid.UUID) -> None:
        row = self.get(principal, query_id)
        if row["created_by"] != principal.subject:
            raise ForbiddenError(
                f"saved query {row['name']!r} was created by {row['created_by']!r}; only its "
                "creator deletes it",
                code="not_owner",
            )
        store.delete_saved_query(self.engine, principal.org, query_id)


def public(row: SavedQuery) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "sql": row["sql"],
        "description": row["description"],
        "created_by": row["created_by"],
        "created_at": row["created_at"],
    }
