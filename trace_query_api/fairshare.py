"""Per-organisation fair share of the query slots of one process.

`FairShare(total, per_org)` admits at most `total` queries at once, and at most `per_org` of
one organisation, so a single organisation can not hold every slot. A query waits up to its
queue time for both a free slot and its organisation being under its share, then is refused
with a 429 naming the limit it met.

Waiting is one `Condition` over per-organisation counters, not a FIFO queue: a waiter of an
organisation at its share never blocks a waiter of another organisation queued behind it;
each waiter re-checks its own two conditions whenever a slot is released.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from trace_query_api.errors import RateLimitedError

__all__ = ["FairShare", "default_org_share"]


def default_org_share(total: int) -> int:
    """Half of the slots, at least one."""
    return max(1, total // 2)


class FairShare:
    def __init__(self, total: int, per_org: int | None = None) -> None:
        if total < 1:
            raise ValueError("FairShare needs at least one slot")
        self.total = total
        self.per_org = min(total, per_org or default_org_share(total))
        self._busy = 0
        self._by_org: dict[str, int] = {}
        self._changed = threading.Condition()

    def running(self, org: str | None = None) -> int:
        """Queries running now: all of them, or one organisation's."""
        with self._changed:
            return self._busy if org is None else self._by_org.get(org, 0)

    @contextmanager
    def acquire(self, org: str, wait_s: float) -> Iterator[None]:
        """Hold one of the org's slots for the block, waiting up to `wait_s` for it."""
        self._take(org, wait_s)
        try:
            yield
        finally:
            self._release(org)

    def _take(self, org: str, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        with self._changed:
            while not self._admits(org):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refusal(org, wait_s)
                self._changed.wait(left)
            self._busy += 1
            self._by_org[org] = self._by_org.get(org, 0) + 1

    def _release(self, org: str) -> None:
        with self._changed:
            self._busy -= 1
            left = self._by_org[org] - 1
            if left:
                self._by_org[org] = left
            else:
                del self._by_org[org]
            # every waiter re-checks: the one this release unblocks may be anywhere in line
            self._changed.notify_all()

    def _admits(self, org: str) -> bool:
        return self._busy < self.total and self._by_org.get(org, 0) < self.per_org

    def _refusal(self, org: str, wait_s: float) -> RateLimitedError:
        # a slot may free up at any moment (queries end within their time limit): retry soon
        if self.per_org < self.total and self._by_org.get(org, 0) >= self.per_org:
            return RateLimitedError(
                f"organisation {org!r} already runs {self.per_org} queries at once, its share "
                f"of this server's {self.total} query slots (TRACE_QUERY_ORG_MAX_CONCURRENT); "
                "wait for one of them to finish, then retry",
                retry_after_s=1,
                code="org_concurrency_limited",
            )
        return RateLimitedError(
            f"the server is busy: all {self.total} query slots are taken and none freed within "
            f"{wait_s:g} s; retry shortly",
            retry_after_s=1,
            code="too_many_concurrent_queries",
        )
