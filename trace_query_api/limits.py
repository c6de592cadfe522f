"""Admission of an authenticated request: is its token revoked, and may its organisation and
its subject make another request now? One Postgres round trip answers both.

Rate limits are GCRA token buckets, one per organisation and one per subject, shared by every
worker and every instance of the service (`trace_resources.storage.rate_limits` keeps them
and holds the algorithm).

The concurrency cap is per process: it is the size of the sandbox pool (`engine.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from trace_query_api.errors import AuthError, RateLimitedError
from trace_resources.storage.rate_limits import Bucket, admit, give_back, retry_after_s
from trace_resources.tokens import Principal

__all__ = ["RateLimits"]


@dataclass(frozen=True)
class RateLimits:
    org_per_s: float
    org_burst: int
    user_per_s: float
    user_burst: int

    def admit(self, conn: sa.Connection, principal: Principal) -> None:
        """Raise unless the token is live and both buckets admit one more request.

        One statement, so `conn` may be in autocommit (one round trip, no BEGIN or COMMIT):
        a refused request gives back what it took from the other bucket before raising, so
        it costs nothing.
        """
        org = Bucket(f"org:{principal.org}", 1.0 / self.org_per_s, self.org_burst)
        user = Bucket(
            f"user:{principal.org}:{principal.subject}", 1.0 / self.user_per_s, self.user_burst
        )
        admission = admit(conn, org, user, principal.jti)
        if admission.revoked or not (admission.org_ok and admission.user_ok):
            give_back(
                conn, [b for b, ok in ((org, admission.org_ok), (user, admission.user_ok)) if ok]
            )
        if admission.revoked:
            raise AuthError("this token was revoked; ask for a new one", code="token_revoked")
        if not admission.org_ok:
            wait = retry_after_s(conn, org, admission.now)
            raise RateLimitedError(
                f"organisation {principal.org!r} is over its {self.org_per_s:g} requests/s "
                f"(burst {self.org_burst}); retry after {wait} s",
                retry_after_s=wait,
                code="org_rate_limited",
            )
        if not admission.user_ok:
            wait = retry_after_s(conn, user, admission.now)
            raise RateLimitedError(
                f"subject {principal.subject!r} is over its {self.user_per_s:g} requests/s "
                f"(burst {self.user_burst}); retry after {wait} s",
                retry_after_s=wait,
                code="user_rate_limited",
            )
