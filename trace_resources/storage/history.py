"""The table of the message history, `trace_event_history`, and the one way to write to it
(`record_hops`), for the writers below the alert pipeline: a commit records its `commit` hop,
a trigger call its origin hop, each in the transaction of the write it reports.

`trace_resources.event_history` owns the table (its docstring: the hops, the scoping, the
readers); it is defined here so that storage, which may not import the alert pipeline, can
write it. The same table exists in the data database, declared on that database's metadata
by `event_history`.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from trace_resources.storage import state

__all__ = [
    "CORRELATION_ID_PATTERN",
    "CORRELATION_TAG",
    "define_event_history",
    "event_history",
    "process_name",
    "record_hops",
    "run_correlation_id",
]

CORRELATION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# the Dagster run tag that names the unit of work a run belongs to (set by the trigger that
# requested it: a webhook call, a file arrival, a composite firing); without it a run is its
# own origin, `run:<run id>`
CORRELATION_TAG = "trace/correlation_id"


def define_event_history(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "trace_event_history",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("hop", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("process", sa.Text, nullable=False),
        sa.Column("org", sa.Text, nullable=True),  # NULL: a public (chain) hop
        sa.Column("details", JSONB, nullable=False),
        sa.Index("trace_event_history_by_id", "correlation_id", "at"),
    )


# statements built on it run on either database (the data database declares the same table)
event_history = define_event_history(state.metadata)


def process_name(service: str) -> str:
    """Where a hop happened: the service and its host:pid."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}"


def record_hops(conn: sa.Connection, hops: Iterable[Mapping[str, Any]]) -> None:
    """Insert hops (dicts of the table's columns; `at` defaults to now) in the caller's
    transaction: the transaction of the write each hop reports."""
    rows = [
        {"org": None, "details": {}, **h}
        for h in hops
        if h.get("correlation_id")  # work that carries no id leaves no history
    ]
    # one executemany per set of columns given (a hop without `at` takes the database's now)
    by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        by_columns.setdefault(frozenset(row), []).append(row)
    for group in by_columns.values():
        conn.execute(event_history.insert(), group)


def run_correlation_id(run_id: str, tags: Mapping[str, str]) -> str:
    """The correlation id of a Dagster run's work: its `trace/correlation_id` tag when that is
    a well-formed id, else `run:<run id>`."""
    tagged = tags.get(CORRELATION_TAG)
    if tagged is not None and CORRELATION_ID_PATTERN.fullmatch(tagged):
        return tagged
    return f"run:{run_id}"
