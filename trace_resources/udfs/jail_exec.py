"""The jail's wrapper process: runs one Python UDF command as an unprivileged user under limits,
relays its output, and says why it stopped it.

Started as `python -I -S .../jail_exec.py --spec JSON -- ARGV...` (built by
`trace_resources.udfs.jail.jail_argv`), so it imports the standard library only and starts in a
few milliseconds. It stays alive as the parent of the command:

- as root it takes a free slot (a lock file) and runs the command as that slot's own user id
  (`uid_base + slot`, no account needed, no supplementary groups, no new privileges), so one
  run's processes can neither read another's files, /proc/<pid>/environ or the platform's, nor
  share its process limit; at the end every process of that uid is killed (`kill(-1)` as the
  uid), which also reaches processes that left the process group with setsid();
- not as root it runs the command as the current user (a warning on stderr), in its own session,
  and kills that session's process group at the end;
- OS limits in the command's process: CPU seconds, address space, open files, processes (per
  uid), file size, no core dumps; the wrapper watches the wall time, the uid's process count
  and the bytes printed on stdout/stderr (relayed to its own), and kills everything at a limit;
- the environment is exactly the variables named in the spec (their values taken from the
  wrapper's own environment, where the caller put them) plus the Dagster Pipes bootstrap
  variables, with HOME and TMPDIR set to a fresh private directory that is the command's cwd
  and is removed afterwards;
- it writes what happened to the spec's status file as JSON (`reason`, `message`, `returncode`)
  and prints `trace-udf-jail: <message>` on stderr; it exits with the command's code, or with
  STOPPED_EXIT when it stopped the command at a limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STOPPED_EXIT = 113
REASONS = (
    "timeout",
    "cpu",
    "memory",
    "output",
    "processes",
    "open_files",
    "file_size",
    "terminated",
)
PIPES_VARIABLES = ("DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES")
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
TAIL_BYTES = 16_384
WATCH_INTERVAL_S = 0.1

# what a limit looks like from inside, when the OS refuses rather than kills
MARKERS = {
    "memory": (b"MemoryError", b"bad_alloc", b"Cannot allocate memory", b"out of memory"),
    "open_files": (b"Too many open files",),
    "file_size": (b"File too large",),
    "processes": (b"can't start new thread", b"Resource temporarily unavailable"),
}


def human_bytes(count: int) -> str:
    """`16 MB`, `1 GiB`: the unit the size was most likely written in."""
    units = (("GiB", 2**30), ("GB", 10**9), ("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10))
    for unit, size in units + (("KB", 10**3),):
        if count >= size and count % size == 0:
            return f"{count // size} {unit}"
    for unit, size in units:
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def messages(spec: dict[str, Any]) -> dict[str, str]:
    """What each reason says, naming the setting that holds the limit."""
    return {
        "timeout": f"ran longer than {spec['timeout_s']:g} s (TRACE_UDF_PY_TIMEOUT_S)",
        "cpu": f"used more than {spec['cpu_s']} s of CPU (TRACE_UDF_PY_CPU_S)",
        "memory": f"needed more than {human_bytes(spec['memory'])} of memory (TRACE_UDF_PY_MEMORY)",
        "output": f"printed more than {human_bytes(spec['output'])} on stdout/stderr "
        "(TRACE_UDF_PY_OUTPUT)",
        "processes": f"started too many processes or threads (more than {spec['nproc']}, "
        "TRACE_UDF_PY_NPROC)",
        "open_files": f"opened too many files (more than {spec['nofile']}, TRACE_UDF_PY_NOFILE)",
        "file_size": f"wrote a file larger than {human_bytes(spec['file_size'])} "
        "(TRACE_UDF_PY_FILE_SIZE)",
        "terminated": "was terminated (the run was cancelled)",
    }


class Slot:
    """A run's own uid: `uid_base + k` for the first lock file k nobody holds (waiting for one
    while every slot is taken, at most the run's wall time)."""

    def __init__(self, jail_dir: Path, uid_base: int, slots: int, wait_s: float) -> None:
        locks = jail_dir / "locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            for k in range(slots):
                fd = os.open(locks / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.fd, self.uid = fd, uid_base + k
                return
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"trace-udf-jail: all {slots} slots stayed busy for {wait_s:g} s "
                    "(TRACE_UDF_PY_SLOTS)"
                )
            time.sleep(0.2)

    def release(self) -> None:
        os.close(self.fd)


def prepare_jail_dir(path: Path) -> None:
    """The jail's own directory: ours, not writable by others, searchable (the runs' private
    directories are inside it)."""
    path.mkdir(mode=0o711, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise SystemExit(
            f"trace-udf-jail: {path} is not a directory of ours (TRACE_UDF_PY_JAIL_DIR)"
        )
    if info.st_mode & 0o022:
        path.chmod(0o711)


def sweep(uid: int | None, pgid: int) -> None:
    """Kill every process of the run: all of its uid's (as that uid: `kill(-1)` reaches exactly
    them, and a process with SIGKILL pending can not fork) or, without a uid of its own, its
    process group."""
    if uid is None:
        for _ in range(2):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
            os._exit(0)
        except BaseException:
            os._exit(2)
    os.waitpid(pid, 0)


def live_processes_of(uid: int) -> list[int]:
    """The processes of uid that have not yet exited (zombies excluded)."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            alive.append(int(name))
    return alive


def tasks_of(uid: int) -> int:
    """Threads (what RLIMIT_NPROC counts) of the processes owned by uid."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"Threads:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def processes_of(uid: int) -> int:
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                count += os.stat(f"/proc/{name}").st_uid == uid
    return count


def grant_pipes_paths(env: dict[str, str], uid: int) -> None:
    """Let the run's uid use the files through which Dagster Pipes talks to it: the temp
    directories that PipesSubprocessClient made (ours, private, under the temp dir) are handed
    to the uid; they hold only this run's context and messages."""
    temp = Path(tempfile.gettempdir()).resolve()
    for name in PIPES_VARIABLES:
        if name not in env:
            continue
        try:
            params = json.loads(zlib_b64_decode(env[name]))
        except ValueError:
            continue
        path = params.get("path") if isinstance(params, dict) else None
        if not isinstance(path, str):
            continue
        parent = Path(path).resolve().parent
        info = parent.lstat()
        if parent.parent == temp and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            # the files are the run's; the directory stays ours (searchable, not writable), so
            # the UDF can not swap a file for a link to another run's
            parent.chmod(0o711)
            for child in parent.iterdir():
                if not child.is_symlink():
                    os.chown(child, uid, uid)


def zlib_b64_decode(value: str) -> bytes:
    """dagster_pipes' encoding of its bootstrap parameters (`encode_param`)."""
    import base64
    import zlib

    try:
        return zlib.decompress(base64.b64decode(value))
    except (ValueError, zlib.error) as exc:
        raise ValueError(str(exc)) from exc


def child_setup(spec: dict[str, Any], uid: int | None, nproc: int) -> Any:
    """The limits and the identity, applied in the forked child before exec."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        limits = {
            resource.RLIMIT_CPU: (spec["cpu_s"], spec["cpu_s"] + 1),
            resource.RLIMIT_AS: (spec["memory"], spec["memory"]),
            resource.RLIMIT_NOFILE: (spec["nofile"], spec["nofile"]),
            resource.RLIMIT_NPROC: (nproc, nproc),
            resource.RLIMIT_FSIZE: (spec["file_size"], spec["file_size"]),
            resource.RLIMIT_CORE: (0, 0),
        }
        for kind, value in limits.items():
            resource.setrlimit(kind, value)
        # Python ignores SIGXFSZ; the command should see the default (death by signal or EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        # set after setuid, which clears it: the command dies with the wrapper
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


def child_env(spec: dict[str, Any], home: Path) -> dict[str, str]:
    env = {name: os.environ[name] for name in spec["env_keys"] if name in os.environ}
    env |= {name: os.environ[name] for name in PIPES_VARIABLES if name in os.environ}
    env |= {"HOME": str(home), "TMPDIR": str(home)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("USER", "trace-udf")
    env.setdefault("LOGNAME", "trace-udf")
    return env


class Run:
    """One command under the jail, watched until it and everything it started are gone."""

    def __init__(self, spec: dict[str, Any], argv: list[str]) -> None:
        self.spec, self.argv = spec, argv
        self.reason: str | None = None
        self.printed = 0
        self.tail = b""
        self.slot: Slot | None = None
        self.uid: int | None = None
        self.exit: tuple[int, resource.struct_rusage] | None = None

    def start(self) -> None:
        spec = self.spec
        jail_dir = Path(spec["jail_dir"])
        prepare_jail_dir(jail_dir)
        if os.geteuid() == 0:
            self.slot = Slot(jail_dir, spec["uid_base"], spec["slots"], spec["timeout_s"])
            self.uid = self.slot.uid
            sweep(self.uid, 0)  # whatever a crashed earlier run of this slot left
            nproc = spec["nproc"]
        else:
            sys.stderr.write(
                "trace-udf-jail: warning: not root, so the UDF runs as the current user "
                f"(uid {os.getuid()}) without a user of its own: it can read what this user "
                "can, and its process limit counts this user's processes\n"
            )
            nproc = processes_of(os.getuid()) + spec["nproc"]
        self.home = Path(tempfile.mkdtemp(prefix="run-", dir=jail_dir))
        if self.uid is not None:
            os.chown(self.home, self.uid, self.uid)
        env = child_env(spec, self.home)
        if self.uid is not None:
            grant_pipes_paths(env, self.uid)
        # orphans of the command become our children, so we reap them and no zombie stays
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.started = time.monotonic()
        try:
            self.process = self.popen(env, nproc)
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(self.home, ignore_errors=True)
            raise SystemExit(f"trace-udf-jail: could not start {self.argv[0]}: {exc}") from None

    def popen(self, env: dict[str, str], nproc: int) -> subprocess.Popen[bytes]:
        spec = self.spec
        return subprocess.Popen(
            self.argv,
            env=env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=child_setup(spec, self.uid, nproc),
        )

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            sweep(self.uid, self.process.pid)

    def relay(self, fd: int, out: int) -> bool:
        """Copy what the command printed; False at end of stream."""
        data = os.read(fd, 65_536)
        if not data:
            return False
        self.printed += len(data)
        if out == 2:
            self.tail = (self.tail + data)[-TAIL_BYTES:]
        if self.printed > self.spec["output"]:
            self.stop("output")
            return True
        with contextlib.suppress(OSError):
            os.write(out, data)
        return True

    def watch(self) -> None:
        """Relay and watch until the command has exited and its output streams are closed (a
        command that closes them early is still watched)."""
        assert self.process.stdout is not None and self.process.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout.fileno(), selectors.EVENT_READ, 1)
        selector.register(self.process.stderr.fileno(), selectors.EVENT_READ, 2)
        deadline = self.started + self.spec["timeout_s"]
        swept = False
        while True:
            if selector.get_map():
                for key, _ in selector.select(WATCH_INTERVAL_S):
                    if not self.relay(key.fd, key.data):
                        selector.unregister(key.fd)
            else:
                time.sleep(WATCH_INTERVAL_S)
            if self.reaped():
                if not swept:
                    # the command is done: nothing it started may outlive it
                    self.clear()
                    swept = True
                if not selector.get_map():
                    break
            elif time.monotonic() > deadline:
                self.stop("timeout")
            elif self.uid is not None and tasks_of(self.uid) >= self.spec["nproc"]:
                self.stop("processes")
        selector.close()

    def reaped(self) -> bool:
        """Whether the command has exited (its status and resource usage kept); reaps the
        orphans it left as well."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.process.pid:
                self.exit = (status, usage)
        return self.exit is not None

    def clear(self) -> None:
        """Kill whatever is left of the run and wait until it is gone."""
        for _ in range(100):
            sweep(self.uid, self.process.pid)
            self.reaped()
            if self.uid is None or not live_processes_of(self.uid):
                break
            time.sleep(0.05)
        self.reaped()

    def finish(self) -> int:
        assert self.exit is not None
        status, usage = self.exit
        returncode = os.waitstatus_to_exitcode(status)
        self.clear()
        reason = self.reason or self.classify(returncode, usage)
        text = messages(self.spec).get(reason or "", "")
        write_status(self.spec["status"], reason, text, returncode)
        if reason is not None:
            sys.stderr.write(f"trace-udf-jail: stopped: the UDF {text}\n")
        shutil.rmtree(self.home, ignore_errors=True)
        if self.slot is not None:
            self.slot.release()
        return STOPPED_EXIT if reason is not None else returncode

    def classify(self, returncode: int, usage: resource.struct_rusage) -> str | None:
        """Which limit the command met, from how it ended and what it said last."""
        if returncode == 0:
            return None
        if returncode == -signal.SIGXCPU or usage.ru_utime + usage.ru_stime >= self.spec["cpu_s"]:
            return "cpu"
        if returncode == -signal.SIGXFSZ:
            return "file_size"
        for reason, markers in MARKERS.items():
            if any(marker in self.tail for marker in markers):
                return reason
        # a SIGKILL the jail did not send (the UDF's own, another process's, or the kernel's
        # OOM killer): passed on as a death by that signal, which the platform retries
        return None


def write_status(path: str | None, reason: str | None, message: str, returncode: int) -> None:
    if not path:
        return
    record = {"reason": reason, "message": message, "returncode": returncode}
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle)
    os.replace(temporary, path)


def main(args: list[str]) -> int:
    if len(args) < 4 or args[0] != "--spec" or args[2] != "--":
        sys.stderr.write("usage: jail_exec.py --spec JSON -- ARGV...\n")
        return 2
    spec, argv = json.loads(args[1]), args[3:]
    run = Run(spec, argv)
    run.start()

    def cancelled(signum: int, frame: object) -> None:
        run.stop("terminated")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, cancelled)
    try:
        run.watch()
    except OSError as exc:
        if exc.errno != errno.EINTR:
            run.stop("terminated")
            raise
    return run.finish()


def _exit_as(returncode: int) -> None:
    """Exit as the command did: a death by a signal is passed on as the same signal (an exit
    code would hide it from the caller, which retries a killed UDF but not a failed one)."""
    if returncode < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode)


if __name__ == "__main__":
    _exit_as(main(sys.argv[1:]))
