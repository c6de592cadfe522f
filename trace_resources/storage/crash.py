"""Named crash points: where the fault-injection tests SIGKILL a writer, a GC or a cleanup.

`TRACE_CRASH_POINT=name` (or `name@N`: on the N-th time the point is reached) makes the process
that reaches `crash_point("name")` kill itself with SIGKILL at once: no `finally`, no atexit, no
flushing, no rollback by the client, exactly as if the machine had lost power for that process.
`name@N:stop` sends SIGSTOP instead, once (the process is paused there until a SIGCONT: a
stalled leader that wakes up late, for the leader-lease tests). Unset (always, outside the
tests) a crash point costs one dictionary lookup.

The points, in the order a write reaches them:

- `upload.mid_object`      an object's bytes half written, its stream never closed
- `stage.during_upload`    one of an attempt's files uploaded, the next not yet
- `stage.after_upload`     every file staged and verified, the commit not started
- `commit.after_pg_commit` the Postgres transaction committed, the caller (Dagster) not told
- `gc.after_versions_deleted`  GC removed version rows and queued their files, none deleted
- `gc.during_file_delete`  GC deleted one queued file, the others not yet
- `cleanup.after_abandon`  staging cleanup marked expired attempts abandoned, files not deleted
- `promote.after_state_commit`  a promotion decided (state committed), its alert rules and
  declaration files not yet written

Points of other processes (not in `CRASH_POINTS`, which tests/storage/test_crash_points.py
exercises): `head.before_commit` (the head follower staged a segment of every head dataset and
has not committed it; the leader-lease test pauses it there), `iceberg.after_publish`,
`sink.after_upsert`, `deliver.after_send`.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["CRASH_POINTS", "CRASH_POINT_ENV", "crash_point"]

# Read from the environment on every call (never at import) so tests can set it per process.
# Documented with the other environment variables in `trace_resources.settings`.
CRASH_POINT_ENV = "TRACE_CRASH_POINT"

CRASH_POINTS = (
    "upload.mid_object",
    "stage.during_upload",
    "stage.after_upload",
    "commit.after_pg_commit",
    "gc.after_versions_deleted",
    "gc.during_file_delete",
    "cleanup.after_abandon",
    "promote.after_state_commit",
)

_hits: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL (or SIGSTOP) this process if `TRACE_CRASH_POINT` names this point (and its hit
    count)."""
    wanted = os.environ.get(CRASH_POINT_ENV)
    if not wanted:
        return
    wanted, _, action = wanted.partition(":")
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if action == "stop":
        if hit == int(nth or 1):
            os.kill(os.getpid(), signal.SIGSTOP)
    elif hit >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
