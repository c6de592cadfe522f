"""Processes that do not outlive the process that started them, and stopping what a process
started (Linux: `prctl(2)` and `/proc`).

- `die_with_parent` / `dies_with_this_process`: `PR_SET_PDEATHSIG`, the kernel sends the child
  a signal when its parent exits (also when the parent was SIGKILLed). It is tied to the parent
  *thread* that forked the child, so start such children from a thread that lives as long as
  they should (the main thread, or a single-threaded server). Kept across `exec`.
- `exit_with_multiprocessing_parent`: in a `multiprocessing` child (Dagster's multiprocess
  executor runs each step in one), SIGTERM this process when the process that started it
  exits (Dagster turns the signal into an interrupt of the step) and SIGKILL it a few seconds
  later if the interrupt did not end it. It watches the parent's sentinel pipe, so it does
  not depend on which thread started the child; `watch_parent` does the same on any pipe.
- `become_subreaper`, `descendants`, `stop_processes`: a supervisor (`make dev`) keeps the
  processes its children leave behind as its own (instead of init's) and stops them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessId",
    "become_subreaper",
    "descendants",
    "die_with_parent",
    "dies_with_this_process",
    "exit_with_multiprocessing_parent",
    "stop_processes",
    "watch_parent",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# resolved now, so that a `preexec_fn` (between fork and exec) only calls it
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _call_prctl(option: int, value: int) -> None:
    if _prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """The kernel sends this process `sig` when the thread that started it exits.

    `parent` is the pid that started this process: if it has exited already (this process was
    re-parented before the call), `sig` is sent at once."""
    _call_prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def dies_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when the calling thread
    (call it from the main thread) exits, however it exits."""
    return functools.partial(die_with_parent, int(sig), os.getpid())


_watching = threading.Lock()
_watcher: threading.Thread | None = None


def exit_with_multiprocessing_parent(grace_s: float = 5.0) -> bool:
    """In a `multiprocessing` child: SIGTERM this process when its parent exits, SIGKILL it
    `grace_s` later if it is still running. False (and nothing done) in any other process."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return False
    watch_parent(parent.sentinel, grace_s, term=True)
    return True


def watch_parent(fd: int, grace_s: float, *, term: bool) -> None:
    """Once `fd` is readable (the read end of a pipe whose write ends only the parent holds:
    EOF when it exits), SIGTERM this process if `term`, and SIGKILL it `grace_s` later: an
    interrupt may not end it (threads it waits for, a handler that only notes the signal)."""
    global _watcher
    with _watching:
        if _watcher is None:
            _watcher = threading.Thread(
                target=_watch, args=(fd, grace_s, term), name="trace-parent-watch", daemon=True
            )
            _watcher.start()


def _watch(fd: int, grace_s: float, term: bool) -> None:
    multiprocessing.connection.wait([fd])
    if term:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def become_subreaper() -> None:
    """Descendants orphaned below this process are re-parented to it rather than to init, so
    `descendants(os.getpid())` still finds them. Reap them (`stop_processes` does)."""
    _call_prctl(_PR_SET_CHILD_SUBREAPER, 1)


@dataclass(frozen=True)
class ProcessId:
    """A pid and its start time (clock ticks after boot): never a later process that reused
    the pid."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """Running (a zombie has exited); a zombie child of ours is reaped here."""
        stat = _stat(self.pid)
        if stat is None or int(stat[19]) != self.started:
            return False
        if stat[0] == "Z":
            if int(stat[1]) == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, os.WNOHANG)
            return False
        return True

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/pid/stat (state, ppid, ...), or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[ProcessId]:
    """Every live process below `pid`, parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found: list[ProcessId] = []
    queue = list(children.get(pid, ()))
    while queue:
        child = queue.pop(0)
        ident = ProcessId.of(child)
        if ident is not None:
            found.append(ident)
        queue.extend(children.get(child, ()))
    return found


def stop_processes(processes: Iterable[ProcessId], timeout: float = 10.0) -> list[ProcessId]:
    """SIGTERM each process, wait up to `timeout` for all, SIGKILL the rest; returns those that
    needed SIGKILL. Zombies among our own children are reaped."""
    procs = [p for p in processes if p.alive()]
    for proc in procs:
        proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [p for p in procs if p.alive()]
    for proc in killed:
        proc.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(p.alive() for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed
