"""Rate-limit buckets shared by every worker and instance of the query service (table
`trace_query_rate_buckets`, UNLOGGED: losing it in a crash only resets the limits, and it
costs no WAL).

A bucket is GCRA's one number (the generic cell rate algorithm): the theoretical arrival time
(`tat`) of the next request, in seconds since the epoch. A bucket that refills one request
every `interval_s` and holds `burst` admits a request at time `now` when
`max(tat, now) + interval_s - now <= burst * interval_s`, and moves `tat` on by `interval_s`.

`admit` takes from an organisation's and a subject's bucket and checks the token's revocation
(table `trace_query_revoked_tokens`) in one round trip, since every request pays for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sqlalchemy as sa

from trace_resources.storage.access import REVOKED_JTI_EXISTS
from trace_resources.storage.state import metadata

__all__ = ["rate_buckets", "Bucket", "Admission", "admit", "give_back", "retry_after_s"]

rate_buckets = sa.Table(
    "trace_query_rate_buckets",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    # theoretical arrival time of the next request (GCRA), seconds since the epoch
    sa.Column("tat", sa.Float(precision=53), nullable=False),
    prefixes=["UNLOGGED"],
)

_ADMIT = sa.text(
    f"""
WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now),
org AS (
    INSERT INTO trace_query_rate_buckets AS b (key, tat)
    SELECT :org_key, clock.now + :org_interval FROM clock
    ON CONFLICT (key) DO UPDATE
        SET tat = greatest(b.tat + :org_interval, excluded.tat)
        WHERE greatest(b.tat + :org_interval, excluded.tat) - excluded.tat + :org_interval
              <= :org_window
    RETURNING 1
),
usr AS (
    INSERT INTO trace_query_rate_buckets AS b (key, tat)
    SELECT :user_key, clock.now + :user_interval FROM clock
    ON CONFLICT (key) DO UPDATE
        SET tat = greatest(b.tat + :user_interval, excluded.tat)
        WHERE greatest(b.tat + :user_interval, excluded.tat) - excluded.tat + :user_interval
              <= :user_window
    RETURNING 1
)
SELECT
    {REVOKED_JTI_EXISTS} AS revoked,
    EXISTS (SELECT 1 FROM org) AS org_ok,
    EXISTS (SELECT 1 FROM usr) AS user_ok,
    (SELECT now FROM clock) AS now
"""
)

_GIVE_BACK = sa.text("UPDATE trace_query_rate_buckets SET tat = tat - :interval WHERE key = :key")
_TAT = sa.text("SELECT tat FROM trace_query_rate_buckets WHERE key = :key")


@dataclass(frozen=True)
class Bucket:
    key: str
    interval_s: float  # one request refills every interval_s
    burst: int

    @property
    def window_s(self) -> float:
        # a hair of slack so that float rounding never refuses the burst's last request
        return self.burst * self.interval_s + 1e-6


@dataclass(frozen=True)
class Admission:
    revoked: bool
    org_ok: bool
    user_ok: bool
    now: float


def admit(conn: sa.Connection, org: Bucket, user: Bucket, jti: str) -> Admission:
    """Take one request from both buckets where each admits it, and say whether `jti` is
    revoked, in one statement. A refused request returns what it took with `give_back`."""
    row = conn.execute(
        _ADMIT,
        {
            "org_key": org.key,
            "org_interval": org.interval_s,
            "org_window": org.window_s,
            "user_key": user.key,
            "user_interval": user.interval_s,
            "user_window": user.window_s,
            "jti": jti,
        },
    ).one()
    return Admission(row.revoked, row.org_ok, row.user_ok, row.now)


def give_back(conn: sa.Connection, buckets: list[Bucket]) -> None:
    """Return the request `admit` took from each of `buckets` (the request was refused)."""
    for bucket in buckets:
        conn.execute(_GIVE_BACK, {"key": bucket.key, "interval": bucket.interval_s})


def retry_after_s(conn: sa.Connection, bucket: Bucket, now: float) -> int:
    """Whole seconds until `bucket` admits a request again (at least 1)."""
    tat = conn.execute(_TAT, {"key": bucket.key}).scalar_one_or_none() or now
    return max(
        1, math.ceil(max(tat, now) + bucket.interval_s - bucket.burst * bucket.interval_s - now)
    )
