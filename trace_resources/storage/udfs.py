"""The registry of organisations' own transforms (table `trace_udf_versions`).

Every `trace udf apply` (or `POST /v1/transforms`) of a declaration that differs from the
transform's newest version stores a new version: the YAML as written and the validated
declaration (JSON). The Dagster code location builds one asset per transform from the newest
versions (`latest`); nothing is ever updated, and versions are deleted only by a promotion's
rollback (`undo_versions_after`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage.state import metadata

__all__ = [
    "StoredUdf",
    "udf_versions",
    "apply_version",
    "undo_versions_after",
    "latest",
    "history",
    "version_count",
]

udf_versions = sa.Table(
    "trace_udf_versions",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("declaration", JSONB, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("applied_by", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    ),
    sa.Index("trace_udf_versions_org", "org", "name"),
)

# serialises applies of one transform (an advisory lock on its name, seeded with this)
_LOCK = 7260110020


@dataclass(frozen=True)
class StoredUdf:
    name: str
    version: int
    org: str
    source_file: str
    source: str
    declaration: dict[str, Any]
    applied_by: str
    created_at: datetime
    changed: bool = True  # False: the apply found this very declaration as the newest version


def _stored(row: Any, changed: bool = True) -> StoredUdf:
    return StoredUdf(
        row.name,
        row.version,
        row.org,
        row.source_file,
        row.source,
        row.declaration,
        row.applied_by,
        row.created_at,
        changed,
    )


def apply_version(
    engine: sa.Engine | sa.Connection,
    *,
    name: str,
    org: str,
    source_file: str,
    source: str,
    declaration: dict[str, Any],
    applied_by: str,
) -> StoredUdf:
    """Store `declaration` as the transform's next version, unless its newest version holds
    the same declaration (then that version is returned with `changed=False`). Given a
    connection, inside its transaction (a promotion applies many items at once)."""
    values: dict[str, Any] = {
        "name": name,
        "org": org,
        "source_file": source_file,
        "source": source,
        "declaration": declaration,
        "applied_by": applied_by,
    }
    if isinstance(engine, sa.Connection):
        return _apply(engine, **values)
    with engine.begin() as conn:
        return _apply(conn, **values)


def _apply(
    conn: sa.Connection, *, name: str, declaration: dict[str, Any], **values: Any
) -> StoredUdf:
    t = udf_versions
    digest = hashlib.sha256(json.dumps(declaration, sort_keys=True).encode()).hexdigest()
    conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:n, :k))"),
        {"k": _LOCK, "n": name},
    )
    newest = conn.execute(
        sa.select(t).where(t.c.name == name).order_by(t.c.version.desc()).limit(1)
    ).first()
    if newest is not None and newest.sha256 == digest:
        return _stored(newest, changed=False)
    row = conn.execute(
        t.insert()
        .values(
            name=name,
            version=(newest.version + 1) if newest is not None else 1,
            declaration=sa.cast(declaration, JSONB),
            sha256=digest,
            **values,
        )
        .returning(*t.c)
    ).one()
    return _stored(row)


def undo_versions_after(conn: sa.Connection, name: str, version: int) -> int:
    """Remove the transform's versions newer than `version` (0: every version): the one
    exception to "versions are only added", for `trace promote rollback`, which restores an
    environment exactly as it was before a promotion. Returns how many were removed."""
    t = udf_versions
    done = conn.execute(t.delete().where(t.c.name == name, t.c.version > version))
    return int(done.rowcount)


def latest(engine: sa.Engine | sa.Connection, org: str | None = None) -> list[StoredUdf]:
    """The newest version of every transform (of `org`), by name."""
    t = udf_versions
    newest = sa.select(t.c.name, sa.func.max(t.c.version).label("version")).group_by(t.c.name)
    if org is not None:
        newest = newest.where(t.c.org == org)
    top = newest.subquery()
    query = (
        sa.select(t)
        .join(top, sa.and_(t.c.name == top.c.name, t.c.version == top.c.version))
        .order_by(t.c.name)
    )
    if isinstance(engine, sa.Connection):
        return [_stored(r) for r in engine.execute(query)]
    with engine.connect() as conn:
        return [_stored(r) for r in conn.execute(query)]


def history(engine: sa.Engine, name: str) -> list[StoredUdf]:
    """Every version of one transform, oldest first."""
    t = udf_versions
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.name == name).order_by(t.c.version)).all()
    return [_stored(r) for r in rows]


def version_count(engine: sa.Engine) -> int:
    """How many versions were ever applied (rows are only added: a new apply changes it)."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(udf_versions)).scalar_one())
