"""Admission of an authenticated request: is its token revoked, and may its organisation and
its subject make another request now? One Postgres round trip answers both.

Rate limits are GCRA token buckets (the generic cell rate algorithm: a bucket is one number,
the theoretical arrival time of the next request) kept in an UNLOGGED table, so that every
worker and every instance of the service shares them, and they cost no WAL. A bucket with rate
r and burst b admits a request at time `now` when `max(tat, now) + 1/r - now <= b/r`.

The concurrency cap is per process: it is the size of the sandbox pool (`engine.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sqlalchemy as sa

from trace_query_api.errors import AuthError, RateLimitedError
from trace_resources.storage.access import REVOKED_JTI_EXISTS
from trace_resources.tokens import Principal

__all__ = ["RateLimits", "Admission"]

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

_TAT = sa.text("SELECT tat FROM trace_query_rate_buckets WHERE key = :key")


@dataclass(frozen=True)
class Admission:
    revoked: bool
    org_ok: bool
    user_ok: bool
    now: float


@dataclass(frozen=True)
class RateLimits:
    org_per_s: float
    org_burst: int
    user_per_s: float
    user_burst: int

    def admit(self, conn: sa.Connection, principal: Principal) -> None:
        """Raise unless the token is live and both buckets admit one more request.

        Call it inside a transaction (`engine.begin()`): when it raises, the rollback returns
        what the request took from the other bucket, so a refused request costs nothing.
        """
        org_interval = 1.0 / self.org_per_s
        user_interval = 1.0 / self.user_per_s
        keys = {
            "org_key": f"org:{principal.org}",
            "user_key": f"user:{principal.org}:{principal.subject}",
        }
        row = conn.execute(
            _ADMIT,
            {
                **keys,
                "org_interval": org_interval,
                # a hair of slack so that float rounding never refuses the burst's last request
                "org_window": self.org_burst * org_interval + 1e-6,
                "user_interval": user_interval,
                "user_window": self.user_burst * user_interval + 1e-6,
                "jti": principal.jti,
            },
        ).one()
        admission = Admission(row.revoked, row.org_ok, row.user_ok, row.now)
        if admission.revoked:
            raise AuthError("this token was revoked; ask for a new one", code="token_revoked")
        if not admission.org_ok:
            wait = self._wait(conn, keys["org_key"], org_interval, self.org_burst, admission.now)
            raise RateLimitedError(
                f"organisation {principal.org!r} is over its {self.org_per_s:g} requests/s "
                f"(burst {self.org_burst}); retry after {wait} s",
                retry_after_s=wait,
                code="org_rate_limited",
            )
        if not admission.user_ok:
            wait = self._wait(conn, keys["user_key"], user_interval, self.user_burst, admission.now)
            raise RateLimitedError(
                f"subject {principal.subject!r} is over its {self.user_per_s:g} requests/s "
                f"(burst {self.user_burst}); retry after {wait} s",
                retry_after_s=wait,
                code="user_rate_limited",
            )

    @staticmethod
    def _wait(conn: sa.Connection, key: str, interval: float, burst: int, now: float) -> int:
        tat = conn.execute(_TAT, {"key": key}).scalar_one_or_none() or now
        return max(1, math.ceil(max(tat, now) + interval - burst * interval - now))
