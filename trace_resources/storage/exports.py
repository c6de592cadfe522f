"""Export jobs: a query's whole result written to the results bucket in the background, and
where it lies (table `trace_query_exports`).

A job moves queued -> running -> succeeded | failed, or to cancelled by its owner while queued
or running; a cancelled job never moves again (each move is guarded by the state it leaves).
Jobs are read back by their owner (the organisation and the subject that asked) only; the
signed download link reads a finished job by id alone, since the link itself is the capability.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from trace_resources.storage.state import metadata

__all__ = [
    "exports",
    "ExportJob",
    "ExportStatus",
    "queue_export",
    "start_export",
    "finish_export",
    "fail_export",
    "cancel_export",
    "owned_export",
    "latest_exports",
    "finished_export_object",
]

_now = sa.func.now()

exports = sa.Table(
    "trace_query_exports",
    metadata,
    sa.Column("id", UUID(as_uuid=False), primary_key=True),
    sa.Column("org", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("sql", sa.Text, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    # queued -> running -> succeeded | failed; queued | running -> cancelled
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("snapshot_id", sa.Text, nullable=False),
    sa.Column("object_key", sa.Text, nullable=True),
    sa.Column("rows", sa.BigInteger, nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("error", JSONB, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("trace_query_exports_by_owner", "org", "subject", "created_at"),
)

ExportStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
_UNFINISHED = ("queued", "running")


class ExportJob(TypedDict):
    id: str
    org: str
    subject: str
    sql: str
    format: str
    status: ExportStatus
    snapshot_id: str
    object_key: str | None
    rows: int | None
    bytes: int | None
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def queue_export(
    engine: sa.Engine,
    *,
    export_id: str,
    org: str,
    subject: str,
    sql: str,
    fmt: str,
    snapshot_id: str,
) -> ExportJob:
    """Record a new job as `queued`."""
    with engine.begin() as conn:
        row = (
            conn.execute(
                exports.insert()
                .values(
                    id=export_id,
                    org=org,
                    subject=subject,
                    sql=sql,
                    format=fmt,
                    status="queued",
                    snapshot_id=snapshot_id,
                )
                .returning(*exports.c)
            )
            .mappings()
            .one()
        )
    return cast(ExportJob, dict(row))


def start_export(engine: sa.Engine, export_id: str) -> bool:
    """Mark a queued job `running`; False if it is no longer queued (cancelled)."""
    return _move(engine, export_id, ("queued",), status="running", started_at=sa.func.now())


def finish_export(engine: sa.Engine, export_id: str, object_key: str, rows: int, size: int) -> bool:
    """Mark the job `succeeded` with where its result lies and how large it is; False if it
    was cancelled meanwhile (its result is then not the owner's any more)."""
    return _move(
        engine,
        export_id,
        ("running",),
        status="succeeded",
        object_key=object_key,
        rows=rows,
        bytes=size,
        finished_at=sa.func.now(),
    )


def fail_export(engine: sa.Engine, export_id: str, error: dict[str, Any]) -> bool:
    """Mark an unfinished job `failed` with the error its owner reads
    (`{"code": .., "message": ..}`)."""
    return _move(
        engine, export_id, _UNFINISHED, status="failed", error=error, finished_at=sa.func.now()
    )


def cancel_export(engine: sa.Engine, export_id: str) -> bool:
    """Mark a queued or running job `cancelled`; False if it had already finished."""
    error = {"code": "cancelled", "message": "the export was cancelled by its owner"}
    return _move(
        engine, export_id, _UNFINISHED, status="cancelled", error=error, finished_at=sa.func.now()
    )


def _move(engine: sa.Engine, export_id: str, leaving: tuple[str, ...], **values: Any) -> bool:
    with engine.begin() as conn:
        moved = conn.execute(
            exports.update()
            .where(exports.c.id == export_id)
            .where(exports.c.status.in_(leaving))
            .values(**values)
        ).rowcount
    return bool(moved)


def owned_export(engine: sa.Engine, org: str, subject: str, export_id: str) -> ExportJob | None:
    """The job if this organisation's subject asked for it, else None (`export_id`: a UUID)."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.select(exports)
                .where(exports.c.id == export_id)
                .where(exports.c.org == org)
                .where(exports.c.subject == subject)
            )
            .mappings()
            .first()
        )
    return None if row is None else cast(ExportJob, dict(row))


def latest_exports(engine: sa.Engine, org: str, subject: str, limit: int) -> list[ExportJob]:
    """The subject's newest jobs first."""
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.select(exports)
                .where(exports.c.org == org)
                .where(exports.c.subject == subject)
                .order_by(exports.c.created_at.desc())
                .limit(limit)
            )
            .mappings()
            .all()
        )
    return [cast(ExportJob, dict(r)) for r in rows]


def finished_export_object(engine: sa.Engine, export_id: str) -> tuple[str, str] | None:
    """(object key, format) of a succeeded job with a result, else None."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(exports.c.object_key, exports.c.format)
            .where(exports.c.id == export_id)
            .where(exports.c.status == "succeeded")
        ).first()
    if row is None or not row.object_key:
        return None
    return row.object_key, row.format
