"""DDL helpers the revisions share (frozen with them: change only by adding new helpers)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

__all__ = ["create_table_if_missing", "created_at"]


def create_table_if_missing(name: str, *elements: Any, **kw: Any) -> bool:
    """Create the table unless it exists; True if it was created (then create its indexes).

    The baselines also run on databases that `metadata.create_all` made before Trace had
    migrations: those already hold some or all of the tables, with their rows, and keep them.
    """
    if sa.inspect(op.get_bind()).has_table(name):
        return False
    op.create_table(name, *elements, **kw)
    return True


def created_at(name: str = "created_at") -> sa.Column[object]:
    """A `timestamptz NOT NULL DEFAULT now()` column, as every baseline table's `created_at`."""
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
