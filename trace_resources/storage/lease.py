"""The writer's heartbeat: extends the leases of its live attempts while it works.

A lease says "this attempt's writer is alive; its staged files are not garbage". A writer that
extracts for an hour between staging a range and committing it must keep its earlier ranges'
leases alive the whole time, not only when it reaches a checkpoint, so the heartbeat runs on a
background thread from the moment an attempt begins until it commits or gives up. A writer
that stops heartbeating (killed, paused with SIGSTOP, cut off from Postgres) lets its leases
expire; staging cleanup then marks those attempts abandoned (under a row lock, so their commit
can not land afterwards) and only then deletes their files.
"""

from __future__ import annotations

import logging
import threading

from trace_resources.storage.attempts import Attempts
from trace_resources.storage.records import Attempt

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Extends the leases of tracked attempts every `interval_s` from a daemon thread.

    The thread runs only while at least one attempt is tracked, and drops an attempt as soon as
    Postgres says it is no longer staging (it committed, or was fenced or abandoned).
    """

    def __init__(self, attempts: Attempts, interval_s: float | None = None) -> None:
        self.attempts = attempts
        self.interval_s = interval_s if interval_s is not None else max(attempts.lease_s / 3, 0.05)
        self.lost: set[str] = set()  # attempts whose lease could not be extended any more
        self.beats = 0
        self._attempts: dict[str, Attempt] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts[attempt.attempt_id] = attempt
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="trace-lease-heartbeat", daemon=True
                )
                self._thread.start()

    def release(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.pop(attempt.attempt_id, None)

    def tracked(self) -> list[Attempt]:
        with self._lock:
            return list(self._attempts.values())

    def beat(self) -> None:
        """Extend every tracked lease now; forget attempts that are no longer staging."""
        attempts = self.tracked()
        if not attempts:
            return
        live = self.attempts.extend_leases(attempts)
        self.beats += 1
        with self._lock:
            for attempt in attempts:
                if attempt.attempt_id not in live:
                    self._attempts.pop(attempt.attempt_id, None)
                    self.lost.add(attempt.attempt_id)

    def close(self) -> None:
        """Stop the heartbeat (the writer is done; live attempts' leases run out)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if not self._attempts:
                    self._thread = None  # the next `track` starts a new thread
                    return
            try:
                self.beat()
            except Exception as exc:  # Postgres unreachable: keep trying until the lease ends
                log.warning("lease heartbeat failed (%s); retrying in %.1f s", exc, self.interval_s)
        with self._lock:
            self._thread = None
