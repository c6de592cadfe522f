"""Untrusted SQL runs here: a pool of worker processes, each locked in by the operating system
(network namespace, chroot, unprivileged user, address-space, CPU-time and file-size limits)
and by DuckDB's own locked configuration. See `pool.py` (the parent's side) and `worker.py`.

Used by the query service (queries and exports) and by alert evaluation (custom SQL rules).
"""

from trace_resources.sandbox.pool import (
    FileSource,
    InlineSource,
    SandboxBusy,
    SandboxError,
    SandboxPage,
    SandboxPool,
    SandboxWorker,
)

__all__ = [
    "FileSource",
    "InlineSource",
    "SandboxBusy",
    "SandboxError",
    "SandboxPage",
    "SandboxPool",
    "SandboxWorker",
]
