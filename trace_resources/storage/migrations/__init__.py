"""Alembic migrations of Trace's two Postgres databases, run from code (no alembic.ini).

    state/  revisions of Postgres state: the version store and the query service's tables
    data/   revisions of Postgres data: alert rules, alerts, deliveries, channels, the ledger

`upgrade(dsn, database)` brings a database to the head revision (what `trace db upgrade` and
`make services-up` run); `current(dsn)` says which revision a database is at;
`require_current(engine, database)` is the one-query check that `open_engine`, and so every
engine of Trace, makes when it is created: code never runs on a schema it does not know.

A new revision is a file in state/ or data/ with `revision`, `down_revision` (the previous
head) and an `upgrade()` written in explicit `op.*` DDL: revisions are frozen history and never
import the live Table objects. tests/storage/test_migrations.py checks that the head schema
and the Table objects agree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import ScriptDirectory

from trace_resources.errors import SchemaNotCurrentError
from trace_resources.storage.pool_ping import ping_when_idle

__all__ = [
    "Database",
    "VERSION_TABLE",
    "upgrade",
    "current",
    "head",
    "require_current",
    "is_newer",
    "open_engine",
]

Database = Literal["state", "data"]

# not Alembic's default name: Dagster keeps its own `alembic_version` when its storage shares
# a database with Trace's
VERSION_TABLE = "trace_alembic_version"

_UNDEFINED_TABLE = "42P01"

# serialises upgrades of one database between processes that start together
_UPGRADE_LOCKS: dict[str, int] = {"state": 7260110001, "data": 7260110006}


@functools.cache
def _scripts(database: Database) -> ScriptDirectory:
    if database not in get_args(Database):
        raise ValueError(f"unknown database {database!r}: one of {get_args(Database)}")
    location = str(Path(__file__).parent / database)
    return ScriptDirectory(location, version_locations=[location])


def head(database: Database) -> str:
    """The revision this code needs the database to be at."""
    revision = _scripts(database).get_current_head()
    assert revision is not None, f"no revisions for {database}"
    return revision


def _context(conn: sa.Connection, **opts: object) -> MigrationContext:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, **opts})


def upgrade(dsn: str, database: Database = "state", revision: str = "head") -> str:
    """Bring the database at `dsn` to `revision` (default: the head), in one transaction; safe
    to repeat and to run from several processes at once. Returns the revision."""
    scripts = _scripts(database)

    def steps(current: object, _context: MigrationContext) -> Iterable[RevisionStep]:
        return scripts._upgrade_revs(revision, current)  # type: ignore[arg-type]

    engine = sa.create_engine(dsn, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCKS[database]}
            )
            context = _context(conn, script=scripts, fn=steps)
            with Operations.context(context):
                context.run_migrations()
    finally:
        engine.dispose()
    return head(database) if revision == "head" else revision


def current(dsn: str) -> str | None:
    """The revision the database at `dsn` is at (None: never migrated)."""
    engine = sa.create_engine(dsn, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return _context(conn).get_current_revision()
    finally:
        engine.dispose()


def require_current(engine: sa.Engine, database: Database) -> None:
    """Raise `SchemaNotCurrentError` unless the engine's database is at the head revision (or
    at a newer one, from a newer release). One query: engines call it once, when created."""
    needed = head(database)
    with engine.connect() as conn:
        try:
            found = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        except sa.exc.ProgrammingError as exc:
            if getattr(exc.orig, "pgcode", None) != _UNDEFINED_TABLE:
                raise
            found = None  # no version table: never migrated
    if found == needed or is_newer(database, found):
        return
    where = engine.url.render_as_string(hide_password=True)
    state = "has no Trace schema version" if found is None else f"is at revision {found}"
    raise SchemaNotCurrentError(
        f"Postgres {database} at {where} {state}; this code needs revision {needed}. "
        f"Run `trace db upgrade --database {database}` (locally `make services-up` "
        "upgrades both databases)."
    )


def is_newer(database: Database, revision: str | None) -> bool:
    """Was `revision` written by a newer release of this database's migrations? Revisions are
    numbered `<database>_NNNN` and only add (expand now, contract in a later release), so the
    code of the release before keeps running during a rolling deploy. A database behind the
    code, another database's revision or anything else is not newer."""
    match = re.fullmatch(rf"{database}_(\d{{4}})", revision or "")
    number = re.fullmatch(rf"{database}_(\d{{4}})", head(database))
    assert number is not None, f"head revision {head(database)} is not named {database}_NNNN"
    return match is not None and int(match.group(1)) > int(number.group(1))


def open_engine(dsn: str, database: Database) -> sa.Engine:
    """A pooled engine on a database that is at the head revision (else `SchemaNotCurrentError`).
    Connections idle for a second or more are checked before use (`ping_when_idle`)."""
    engine = ping_when_idle(sa.create_engine(dsn, future=True))
    try:
        require_current(engine, database)
    except BaseException:
        engine.dispose()
        raise
    return engine
