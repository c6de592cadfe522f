"""Message history: each hop a unit of work made, under the `correlation_id` it carries from
its origin (a finalized block range) through its commit, the alerts it raised and their
deliveries (Enterprise Integration Patterns' Correlation Identifier and Message History).

`trace_event_history` is the one table this module owns. It exists in the state database
(revision state_0010: the chain's hops, `block.finalized` and `commit`, written in the commit's
own transaction) and in the data database (revision data_0004: `alert.raised`, written by the
sink's insert of the alert, and `alert.delivered` / `alert.retry` / `alert.dead`, written with
the deliverer's record of the attempt). Each hop is written in the transaction of the write it
reports, so the history never claims a hop that did not happen; a reader merges both databases.

The id travels like the W3C traceparent of `telemetry`: in the alert buffer message's
`destination` (key `correlation_id`), from there in the alert's row to the deliverer.

Scoping: a hop of an organisation's alert carries its `org`; the chain's hops are public
(`org` NULL). An org sees the public hops and its own; an id none of whose hops are public or
its own is unknown to it (`visible_to` returns None, exactly as for an id that does not exist).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.storage.history import (
    CORRELATION_ID_PATTERN,
    define_event_history,
    event_history,
    process_name,
    record_hops,
)

__all__ = [
    "CORRELATION_ID",
    "Hop",
    "check_correlation_id",
    "event_history",
    "new_correlation_id",
    "process_name",
    "read_hops",
    "record_hops",
    "visible_to",
]

CORRELATION_ID = "correlation_id"  # the key in a buffer message's destination
_ID = CORRELATION_ID_PATTERN


# the same table in both databases (each database's metadata declares it); statements built
# on one run on either. Defined in storage (`storage.history`), which writes commit hops.
define_event_history(alert_tables.metadata)


@dataclass(frozen=True)
class Hop:
    correlation_id: str
    hop: str  # block.finalized | commit | alert.raised | alert.delivered | alert.retry | ...
    at: datetime
    process: str  # the service and host:pid that made the hop
    org: str | None
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "correlation_id": self.correlation_id,
            "hop": self.hop,
            "at": self.at.isoformat(),
            "process": self.process,
            "org": self.org,
            "details": self.details,
        }


def new_correlation_id() -> str:
    """A fresh id for a unit of work at its origin."""
    return uuid.uuid4().hex


def check_correlation_id(value: str) -> str:
    """`value` if it is a well-formed correlation id, else ValueError saying what one is."""
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} is not a correlation id: use the id shown on the alert (its "
            "destination's correlation_id), 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def read_hops(engines: Iterable[sa.Engine], correlation_id: str) -> list[Hop]:
    """Every hop of the id in the given databases (state and data), in time order."""
    e = event_history
    query = sa.select(e).where(e.c.correlation_id == check_correlation_id(correlation_id))
    found: list[tuple[datetime, int, Hop]] = []
    for engine in engines:
        with engine.connect() as conn:
            for r in conn.execute(query):
                hop = Hop(r.correlation_id, r.hop, r.at, r.process, r.org, dict(r.details))
                found.append((r.at, r.id, hop))
    found.sort(key=lambda f: (f[0], f[1]))
    return [f[2] for f in found]


def visible_to(hops: list[Hop], org: str | None) -> list[Hop] | None:
    """The hops `org` may see (public ones and its own; org None: an operator, all of them);
    None when the id is not the org's (or unknown): answered exactly like an unknown id."""
    if org is None:
        return hops or None
    shown = [h for h in hops if h.org is None or h.org == org]
    foreign = any(h.org not in (None, org) for h in hops)
    if not shown or (foreign and not any(h.org == org for h in shown)):
        return None
    return shown
