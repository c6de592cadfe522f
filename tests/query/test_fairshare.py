"""FairShare in process: real threads holding real slots."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from trace_query_api.errors import RateLimitedError
from trace_query_api.fairshare import FairShare


@contextmanager
def holding(share: FairShare, org: str, count: int) -> Iterator[None]:
    """`count` threads of `org` hold a slot each until the block ends."""
    release = threading.Event()
    held = threading.Barrier(count + 1)

    def hold() -> None:
        with share.acquire(org, wait_s=1):
            held.wait()
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(count)]
    for thread in threads:
        thread.start()
    held.wait(5)
    try:
        yield
    finally:
        release.set()
        for thread in threads:
            thread.join(5)


def test_an_org_at_its_share_is_refused_while_another_org_runs() -> None:
    share = FairShare(total=4, per_org=2)
    with holding(share, "a", 2):
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as refused:
            with share.acquire("a", wait_s=0.3):
                pass
        assert time.monotonic() - started >= 0.3  # it waited its queue time first
        assert refused.value.code == "org_concurrency_limited"
        assert refused.value.status == 429
        assert refused.value.headers["Retry-After"] == "1"
        assert "TRACE_QUERY_ORG_MAX_CONCURRENT" in refused.value.message
        with share.acquire("b", wait_s=0):
            assert share.running("b") == 1 and share.running() == 3


def test_a_full_server_is_refused_as_busy_not_as_the_orgs_share() -> None:
    share = FairShare(total=2, per_org=1)
    with holding(share, "a", 1), holding(share, "b", 1):
        with pytest.raises(RateLimitedError) as refused:
            with share.acquire("c", wait_s=0.1):
                pass
        assert refused.value.code == "too_many_concurrent_queries"
        assert "all 2 query slots" in refused.value.message


def test_a_waiting_org_at_its_share_does_not_block_another_org_queued_behind_it() -> None:
    share = FairShare(total=2, per_org=1)
    order: list[str] = []

    def wait_for(org: str) -> None:
        try:
            with share.acquire(org, wait_s=3):
                order.append(org)
                time.sleep(0.3)
        except RateLimitedError:
            order.append(f"{org} refused")

    a = threading.Thread(target=wait_for, args=("a",))
    b = threading.Thread(target=wait_for, args=("b",))
    with holding(share, "a", 1):
        with holding(share, "c", 1):
            # both slots taken; "a" queues first (and stays at its share), then "b"
            a.start()
            time.sleep(0.1)
            b.start()
            time.sleep(0.1)
        # "c" released its slot: only "b" may take it, although "a" waited longer ("a" still
        # holds its share); "a" goes on waiting while its own slot is held
        deadline = time.monotonic() + 2
        while not order and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order == ["b"], order
    # then "a" gets its own slot back
    a.join(5)
    b.join(5)
    assert order == ["b", "a"], order
    assert share.running() == 0


def test_default_share_is_half_the_slots() -> None:
    assert FairShare(total=4).per_org == 2
    assert FairShare(total=1).per_org == 1
    assert FairShare(total=3).per_org == 1
