"""Start and stop Trace's local services: PostgreSQL, an anvil devnet node and an object store.

Everything listens on 127.0.0.1 only and lives in one project folder (``.local/`` by default):

    <root>/postgres/data            PostgreSQL data directory (kept across restarts)
    <root>/postgres/postgres.log    server log
    <root>/postgres/postgres.pid    postmaster PID (pg_ctl also keeps data/postmaster.pid)
    <root>/anvil/state.json         the anvil chain, dumped on exit and every few seconds
    <root>/anvil/anvil.log, anvil.pid
    <root>/moto/moto.log, moto.pid  only when a MotoS3Server is given a root
    <root>/objectstore/<bucket>/    the local object store (plain directories)
    <root>/services.json            the ports chosen by the last ``up``

Every process we spawn records its PID in a file under the root, so ``down`` in a later
command stops what an earlier ``up`` started. Anvil and moto run in their own process group and
are stopped with a group kill, so no child is left behind.

The classes work both for the CLI (``python -m infra.local.services up|down|status|env``) and
for pytest fixtures (``with LocalServices(tmp) as services: ...``).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from trace_resources.storage import migrations

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / ".local"
DAGSTER_HOME = REPO_ROOT / "dagster_home"

LOOPBACK = "127.0.0.1"
MAX_CONNECTIONS = 300  # the local server's connection slots (PostgreSQL's default: 100)
PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
DEFAULT_PG_PORT = 54329
DEFAULT_ANVIL_PORT = 18545
# below the ephemeral port range (32768-60999), so no outgoing connection can hold it
DEFAULT_SQS_PORT = 18546  # moto's SQS API: the alert buffer
GENESIS_TIMESTAMP = 1_735_689_600  # as infra.devnet.generate expects (2025-01-01T00:00:00Z)
# Monad uses 10,000-block ranges; the devnet's few thousand blocks use smaller ones.
DEVNET_RANGE_SIZE = 250
MONAD_TESTNET_CHAIN_ID = 10143

TRACE_DATABASES: tuple[str, ...] = ("dagster", "trace_state", "trace_data")
# which of them hold Postgres state and Postgres data (every `up` migrates them to head)
TRACE_SCHEMAS: dict[str, migrations.Database] = {"trace_state": "state", "trace_data": "data"}
TRACE_BUCKETS: tuple[str, ...] = ("trace-datasets", "trace-results", "trace-scratch")
DB_USER = "trace"
DB_PASSWORD = "trace"
PG_SUPERUSER = "postgres"
MOTO_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
MOTO_REGION = "us-east-1"

# Linux limits a unix socket path to 107 bytes; deep pytest tmp dirs can exceed it.
_MAX_SOCKET_PATH = 100
_ANVIL_PACKAGES = {"x86_64": "anvil-linux-amd64", "aarch64": "anvil-linux-arm64"}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ServiceError(RuntimeError):
    """A local service is missing, failed to start or failed to stop."""


# --------------------------------------------------------------------------------------------
# Small process helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The OS picks it; another process could still take it before we bind, which is an accepted
    race for tests and benchmarks.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _cmdline(pid: int) -> list[str]:
    """The argv of a live process, or [] if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_alive(pid: int) -> bool:
    """True if pid is a running (not zombie) process.

    A zombie child of this process is reaped here, because kill(pid, 0) keeps succeeding on
    zombies and a stop loop would otherwise wait for its full timeout.
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until pid has exited; True if it did within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return True
        time.sleep(0.1)
    return not _is_alive(pid)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send sig to a whole process group, ignoring a group that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_process_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group led by pid, wait, then SIGKILL whatever is left.

    Our processes are started with start_new_session=True, so their PID is also their process
    group id and killing the group takes their children with them. SIGTERM first so that anvil
    gets the chance to dump its state.
    """
    if not _is_alive(pid):
        return
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    if group != pid:
        # Not a group leader (should not happen for our processes): never kill a foreign group.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        return
    _signal_group(group, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        log.warning("pid %d did not exit %.0fs after SIGTERM; sending SIGKILL", pid, timeout)
        _signal_group(group, signal.SIGKILL)
        _wait_gone(pid, 5)
    # The leader is gone; kill any child still in its group (a group id is not reused while a
    # member lives, so this cannot hit an unrelated process).
    _signal_group(group, signal.SIGKILL)


class PidFile:
    """A PID recorded on disk, trusted only if the live process still looks like ours.

    ``marker`` must be one argv element of the process (for example the anvil binary path or
    ``moto.server``), which guards against the PID having been reused by something else.
    """

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.marker = marker

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid}\n")

    def read(self) -> int | None:
        """The recorded PID if that process is alive and ours; a stale file is removed."""
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        if _is_alive(pid) and self.marker in _cmdline(pid):
            return pid
        log.debug("removing stale pid file %s", self.path)
        self.remove()
        return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _log_tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a log file, to put the real cause into an error message."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- last lines of {path} ---\n{tail}" if tail else ""


def _http_answers(url: str, body: bytes | None = None, timeout: float = 2.0) -> bytes | None:
    """The response body if an HTTP server answers at url (any status), else None."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as error:
        return error.read() or b""
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Background processes (anvil, moto)
# --------------------------------------------------------------------------------------------


class _BackgroundProcess(abc.ABC):
    """A server we spawn ourselves in its own session, with a pid file and a log file.

    Subclasses provide the argv, the readiness probe and a marker for the pid file.
    """

    name = "process"
    start_timeout = 60.0
    stop_timeout = 30.0

    def __init__(self, port: int, pid_file: PidFile | None, log_file: Path | None) -> None:
        self.port = port
        self.pid_file = pid_file
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to override ------------------------------------------------------------------------
    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The command line that starts the server."""

    def _check_installed(self) -> None:  # noqa: B027 - an optional hook, no-op by default
        """Raise ServiceError with an actionable message if the program is missing."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True if the server answers its protocol (not just an open port)."""

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The PID of our live process: the one we spawned, or the one in the pid file."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return self.pid_file.read() if self.pid_file else None

    def is_running(self) -> bool:
        """True if our process is alive and listening on our port."""
        pid = self.pid
        return pid is not None and str(self.port) in _cmdline(pid) and self.ready()

    def start(self) -> None:
        """Spawn the server and wait until it answers; a no-op if ours is already running."""
        if self.is_running():
            log.info("%s already running (pid %s) on port %d", self.name, self.pid, self.port)
            return
        stale = self.pid
        if stale is not None:
            # Our process from an earlier `up`, but on another port or not answering: replace it.
            log.warning("stopping unresponsive or reconfigured %s (pid %d)", self.name, stale)
            stop_process_group(stale, self.stop_timeout)
        self._check_installed()
        if port_in_use(self.port):
            raise ServiceError(
                f"{self.name}: port {self.port} on {LOOPBACK} is already in use by another "
                "process; stop it or choose another port"
            )
        self._spawn()
        self._wait_ready()

    def _spawn(self) -> None:
        argv = self._argv()
        log.info("starting %s: %s", self.name, shlex.join(argv))
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output: Any = self.log_file.open("ab")
        else:
            output = subprocess.DEVNULL
        try:
            # A new session makes the process a group leader (for the group kill) and detaches
            # it from our terminal, so Ctrl-C in the shell that ran `up` does not reach it.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log_file.parent if self.log_file else None,
            )
        finally:
            if output is not subprocess.DEVNULL:
                output.close()
        if self.pid_file is not None:
            self.pid_file.write(self._proc.pid)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                raise ServiceError(
                    f"{self.name} exited with code {code} during start{_log_tail(self.log_file)}"
                )
            if self.ready():
                log.info("%s ready on port %d (pid %d)", self.name, self.port, self._proc.pid)
                return
            time.sleep(0.2)
        self.stop()
        raise ServiceError(
            f"{self.name} did not answer on port {self.port} within {self.start_timeout:.0f}s"
            f"{_log_tail(self.log_file)}"
        )

    def stop(self) -> None:
        """SIGTERM the process group, wait, SIGKILL after stop_timeout; a no-op if not running."""
        pid = self.pid
        if pid is None:
            log.info("%s not running", self.name)
        else:
            log.info("stopping %s (pid %d)", self.name, pid)
            stop_process_group(pid, self.stop_timeout)
        self._forget()

    def _forget(self) -> None:
        """Reap our child (if any) and drop the pid file."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None
        if self.pid_file is not None:
            self.pid_file.remove()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def default_anvil_binary() -> Path:
    """The native anvil binary installed by ``npm install`` (@foundry-rs/anvil).

    We run the platform binary directly rather than the npm wrapper script so that the PID we
    record is anvil itself. TRACE_ANVIL_BIN overrides the location.
    """
    override = os.environ.get("TRACE_ANVIL_BIN")
    if override:
        return Path(override)
    package = _ANVIL_PACKAGES.get(platform.machine(), "anvil-linux-amd64")
    return REPO_ROOT / "node_modules" / "@foundry-rs" / package / "bin" / "anvil"


class Miner:
    """Mines a devnet block every `block_time_s` seconds (sub-second too, which anvil's own
    interval mining does not take) from a thread: `start`, `stop`."""

    def __init__(self, url: str, block_time_s: float) -> None:
        self.url = url
        self.block_time_s = block_time_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mined = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="devnet-miner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        payload = {"jsonrpc": "2.0", "id": 1, "method": "evm_mine", "params": []}
        next_at = time.monotonic()
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    client.post(self.url, json=payload).raise_for_status()
                    self.mined += 1
                except httpx.HTTPError as exc:  # anvil restarting: keep the rhythm
                    log.warning("devnet miner: evm_mine failed: %s", exc)
                next_at += self.block_time_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


class AnvilNode(_BackgroundProcess):
    """An anvil devnet node on 127.0.0.1 whose chain survives restarts.

    With ``persist=True`` (the default) the chain is kept in ``state_file`` (default
    ``<root>/anvil/state.json``): anvil loads it on start, dumps it every ``state_interval``
    seconds and on SIGTERM. ``extra_args`` are appended to the anvil command line (for example
    ``["--block-time", "1"]``).

    Past a few hundred blocks anvil moves the states of old blocks to disk. By default it puts
    them under ``~/.foundry/anvil/tmp/`` and leaves them there when it is stopped: about 1 GB
    per 1,000 generated blocks. Here they go to ``<root>/anvil/state-cache/``, which `stop`
    removes. Those states are only valid while that process runs; the chain itself is in the
    state file.
    """

    name = "anvil"

    def __init__(
        self,
        root: Path,
        port: int = DEFAULT_ANVIL_PORT,
        chain_id: int = MONAD_TESTNET_CHAIN_ID,
        state_file: Path | None = None,
        extra_args: Sequence[str] = (),
        *,
        persist: bool = True,
        state_interval: int = 10,
        silent: bool = True,
        binary: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.dir = self.root / "anvil"
        self.binary = binary or default_anvil_binary()
        super().__init__(
            port,
            PidFile(self.dir / "anvil.pid", marker=str(self.binary)),
            self.dir / "anvil.log",
        )
        self.chain_id = chain_id
        self.state_file = (state_file or self.dir / "state.json") if persist else None
        self.state_interval = state_interval
        self.silent = silent
        self.extra_args = tuple(extra_args)
        self.cache_dir = self.dir / "state-cache"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _check_installed(self) -> None:  # noqa: B027 - an optional hook, no-op by default
        if not os.access(self.binary, os.X_OK):
            raise ServiceError(f"anvil not found at {self.binary}: run `npm install`")

    def _argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--cache-path",
            str(self.cache_dir),
        ]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            argv += ["--state", str(self.state_file)]
            argv += ["--state-interval", str(self.state_interval)]
        if self.silent:
            # Without --silent anvil logs every RPC call, which grows the log fast under ingest.
            argv.append("--silent")
        return argv + list(self.extra_args)

    def rpc(self, method: str, params: Sequence[Any] = (), timeout: float = 10.0) -> Any:
        """Call one JSON-RPC method and return its result; raises ServiceError on failure."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        raw = _http_answers(self.url, body.encode(), timeout=timeout)
        if raw is None:
            raise ServiceError(f"anvil at {self.url} does not answer")
        reply = json.loads(raw)
        if "error" in reply:
            raise ServiceError(f"anvil {method} failed: {reply['error']}")
        return reply.get("result")

    def ready(self) -> bool:
        try:
            return bool(self.rpc("eth_chainId", timeout=2.0) == hex(self.chain_id))
        except (ServiceError, ValueError):
            return False


class MotoS3Server(_BackgroundProcess):
    """moto's S3 server on 127.0.0.1, for tests and benchmarks (objects live only in memory).

    Give it a ``root`` to get a pid file and a log under ``<root>/moto/`` (so that
    ``LocalServices.down`` can find it); without one its output is discarded.
    """

    name = "moto-s3"

    def __init__(self, port: int, root: Path | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        moto_dir = self.root / "moto" if self.root is not None else None
        super().__init__(
            port,
            PidFile(moto_dir / "moto.pid", marker="moto.server") if moto_dir else None,
            moto_dir / "moto.log" if moto_dir else None,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _check_installed(self) -> None:  # noqa: B027 - an optional hook, no-op by default
        try:
            import moto.server  # noqa: F401
        except ImportError as error:
            raise ServiceError(
                f"moto[server] is not installed ({error}): run `make install`"
            ) from error

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def ready(self) -> bool:
        return _http_answers(f"{self.endpoint_url}/moto-api/") is not None

    def env(self) -> dict[str, str]:
        """Variables pointing Trace's S3 object store (and any boto3 client) at this server."""
        return {
            "TRACE_OBJECT_STORE": "s3",
            "TRACE_S3_ENDPOINT_URL": self.endpoint_url,
            "TRACE_S3_REGION": MOTO_REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": MOTO_CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": MOTO_CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": MOTO_REGION,
        }

    def s3_client(self) -> Any:
        """A boto3 S3 client for this server (boto3 is imported lazily: only tests need it)."""
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=MOTO_REGION, **MOTO_CREDENTIALS
        )

    def create_buckets(self, names: Iterable[str] = TRACE_BUCKETS) -> None:
        """Create the buckets; ones that already exist are left alone."""
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]

        client = self.s3_client()
        for name in names:
            try:
                client.create_bucket(Bucket=name)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class PostgresServer:
    """A private PostgreSQL 15 cluster in ``<root>/postgres``, listening on 127.0.0.1 only.

    The cluster is created once with trust authentication (it is reachable only over loopback
    and through a socket inside root) and reused afterwards, so data survives restarts. PostgreSQL
    refuses to run as root, so when we are root every pg tool runs as the ``postgres`` user and
    the directory is handed to that user.
    """

    name = "postgres"

    def __init__(
        self,
        root: Path,
        port: int = DEFAULT_PG_PORT,
        *,
        bin_dir: Path | None = None,
        user: str = DB_USER,
        password: str = DB_PASSWORD,
    ) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.bin_dir = bin_dir or Path(os.environ.get("TRACE_PG_BIN_DIR", PG_BIN_DIR))
        self.user = user
        self.password = password
        self.dir = self.root / "postgres"
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "postgres.log"
        self.pid_file = PidFile(self.dir / "postgres.pid", marker=str(self.data_dir))

    # -- paths and commands -------------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        """Where the server puts its unix socket: inside root unless that path is too long."""
        inside = self.dir / "run"
        if len(str(inside / f".s.PGSQL.{self.port}")) <= _MAX_SOCKET_PATH:
            return inside
        digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"trace-pg-{digest}"

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    @staticmethod
    def _as_root() -> bool:
        return os.geteuid() == 0

    def _pg_argv(self, argv: Sequence[str]) -> list[str]:
        """Wrap a server-side tool (initdb, pg_ctl) to run as ``postgres`` when we are root."""
        if self._as_root():
            return ["runuser", "-u", PG_SUPERUSER, "--", *argv]
        return list(argv)

    def _run(
        self, argv: Sequence[str], *, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a pg tool from inside our directory (the postgres user can't cd into /root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "5"
        return subprocess.run(
            argv,
            cwd=self.dir if self.dir.is_dir() else None,
            env=env,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _check_installed(self) -> None:  # noqa: B027 - an optional hook, no-op by default
        for tool in ("initdb", "pg_ctl", "postgres", "psql"):
            if not os.access(self.bin_dir / tool, os.X_OK):
                raise ServiceError(
                    f"PostgreSQL 15 server not found at {self.bin_dir}: run `make install` "
                    "(apt-get install postgresql-15)"
                )
        if self._as_root():
            try:
                pwd.getpwnam(PG_SUPERUSER)
            except KeyError:
                raise ServiceError(
                    "running as root needs the `postgres` system user (created by the "
                    "postgresql-15 package): run `make install`"
                ) from None

    # -- lifecycle ----------------------------------------------------------------------------
    def is_running(self) -> bool:
        """True if a server is running on our data directory (on whatever port)."""
        if not (self.data_dir / "PG_VERSION").exists() or not self.bin_dir.is_dir():
            return False
        status = self._run(
            self._pg_argv([self._tool("pg_ctl"), "status", "-D", str(self.data_dir)])
        )
        return status.returncode == 0

    def running_port(self) -> int | None:
        """The port of the running server, read from postmaster.pid (line 4)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        """The postmaster PID, if the server is running."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None
        return pid if _is_alive(pid) else None

    def start(self, timeout: float = 60) -> None:
        """Create the cluster if needed, start it and wait until it accepts connections.

        A no-op if the server is already running on this root with the same port.
        """
        self._check_installed()
        if self.is_running():
            running = self.running_port()
            if running != self.port:
                raise ServiceError(
                    f"postgres in {self.data_dir} is already running on port {running}, not "
                    f"{self.port}: run `python -m infra.local.services down` first"
                )
            log.info("postgres already running on port %d", self.port)
            self._record_pid()
            return
        if port_in_use(self.port):
            raise ServiceError(
                f"postgres: port {self.port} on {LOOPBACK} is already in use by another process; "
                "stop it or set TRACE_PG_PORT"
            )
        self._prepare_dirs()
        self._initdb_if_needed()
        self._pg_ctl_start(timeout)
        self._wait_accepting(timeout)
        self._record_pid()
        log.info("postgres ready on port %d", self.port)

    def _prepare_dirs(self) -> None:
        """Create our directories and, as root, hand them to the postgres user."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        # the socket trusts its users (pg_hba `local all all trust`): only the server's user
        # (and root) may reach it, never a UDF's uid (the fallback dir is under /tmp)
        self.socket_dir.chmod(0o700)
        if not self._as_root():
            return
        account = pwd.getpwnam(PG_SUPERUSER)
        for path in (self.dir, self.socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
        if self.log_file.exists():
            os.chown(self.log_file, account.pw_uid, account.pw_gid)
        if not self._postgres_can_write():
            self._grant_traverse()
        if not self._postgres_can_write():
            raise ServiceError(
                f"the postgres user cannot write to {self.dir}: every parent directory must be "
                "searchable by others (chmod o+x), so choose a --root outside /root"
            )

    def _postgres_can_write(self) -> bool:
        probe = self._run(self._pg_argv(["test", "-w", str(self.dir)]))
        return probe.returncode == 0

    def _grant_traverse(self) -> None:
        """Add o+x to our own private parent dirs inside the temp dir or the repository.

        pytest's base temp dir (/tmp/pytest-of-root) and mkdtemp() dirs are mode 0700, which
        hides a root inside them from the postgres user. o+x only allows passing through a
        directory (not listing it), and we limit it to trees that are ours for tests and dev.
        """
        allowed = [Path(tempfile.gettempdir()).resolve(), REPO_ROOT]
        group = pwd.getpwnam(PG_SUPERUSER).pw_gid
        for parent in self.dir.parents:
            if not any(parent.is_relative_to(base) and parent != base for base in allowed):
                continue
            if parent.stat().st_gid == group:
                continue  # the services' root (`protect`): postgres passes as its group
            info = parent.stat()
            if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IXOTH:
                log.info("allowing the postgres user through %s (chmod o+x)", parent)
                parent.chmod(info.st_mode | stat.S_IXOTH)

    def _initdb_if_needed(self) -> None:
        """Run initdb once; an existing data directory is reused so data survives restarts."""
        if (self.data_dir / "PG_VERSION").exists():
            log.info("reusing postgres data directory %s", self.data_dir)
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise ServiceError(
                f"{self.data_dir} exists but is not a PostgreSQL data directory: remove it"
            )
        log.info("initialising postgres data directory %s", self.data_dir)
        result = self._run(
            self._pg_argv(
                [
                    self._tool("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    PG_SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed:\n{result.stdout}{result.stderr}")

    @property
    def hba_file(self) -> Path:
        return self.dir / "pg_hba.conf"

    def _write_hba(self) -> None:
        """Who may connect: the unix socket (inside root, reachable by its owners only) trusts
        its users; TCP on loopback takes a role's password (SCRAM), so a process that finds
        the port but holds no credentials is refused (a Python transform's, for one)."""
        self.hba_file.write_text(
            "# written by infra.local.services at every start\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        self.hba_file.chmod(0o644)

    def _pg_ctl_start(self, timeout: float) -> None:
        # Settings go on the command line, not into postgresql.conf, so a port change takes
        # effect without editing the data directory. pg_ctl passes -o through /bin/sh.
        self._write_hba()
        options = shlex.join(
            [
                "-c",
                f"hba_file={self.hba_file}",
                "-c",
                f"listen_addresses={LOOPBACK}",
                # every process keeps a pool per database it uses (the test session: hundreds of
                # short-lived databases, `dagster dev`'s daemon, webserver and run workers); the
                # default 100 slots ran out under a loaded test run
                "-c",
                f"max_connections={MAX_CONNECTIONS}",
                "-p",
                str(self.port),
                "-k",
                str(self.socket_dir),
            ]
        )
        argv = [
            self._tool("pg_ctl"),
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "-s",
        ]
        result = self._run(self._pg_argv(argv), timeout=timeout + 30)
        if result.returncode != 0:
            raise ServiceError(
                f"pg_ctl start failed:\n{result.stdout}{result.stderr}{_log_tail(self.log_file)}"
            )

    def _wait_accepting(self, timeout: float) -> None:
        """pg_ctl -w waits for the socket; also check that it answers a query."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            result = self._psql("SELECT 1;")
            if result.returncode == 0:
                return
            last_error = result.stderr
            time.sleep(0.3)
        raise ServiceError(f"postgres does not accept TCP connections: {last_error}")

    def _record_pid(self) -> None:
        pid = self.pid
        if pid is not None:
            self.pid_file.write(pid)

    def stop(self, timeout: float = 60) -> None:
        """Stop with ``pg_ctl stop -m fast`` and wait; ``-m immediate`` if that times out."""
        if not self.is_running():
            log.info("postgres not running")
            self.pid_file.remove()
            return
        log.info("stopping postgres (pid %s)", self.pid)
        for mode in ("fast", "immediate"):
            argv = [self._tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"]
            result = self._run(
                self._pg_argv([*argv, "-t", str(int(timeout))]), timeout=timeout + 30
            )
            if result.returncode == 0:
                break
            log.warning("pg_ctl stop -m %s failed: %s", mode, result.stderr.strip())
        else:
            raise ServiceError(f"could not stop postgres in {self.data_dir}")
        self.pid_file.remove()
        if not self.socket_dir.is_relative_to(self.dir):
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()  # the short fallback dir in /tmp, now empty

    # -- databases ----------------------------------------------------------------------------
    def _psql(
        self, script: str, dbname: str = "postgres", variables: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a SQL script through psql on the unix socket as the superuser (psql is happy
        as root; TCP takes a password, the socket trusts its users)."""
        argv = [
            self._tool("psql"),
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            PG_SUPERUSER,
            "-d",
            dbname,
        ]
        for key, value in (variables or {}).items():
            argv += ["-v", f"{key}={value}"]
        # The script goes in on stdin: psql only interpolates :'variables' in scripts, not -c.
        return self._run([*argv, "-f", "-"], input_text=script, timeout=60)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser and return psql's unaligned output."""
        result = self._psql(sql, dbname)
        if result.returncode != 0:
            raise ServiceError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def ensure_databases(
        self,
        names: Iterable[str] = TRACE_DATABASES,
        owner: str = DB_USER,
        password: str | None = None,
    ) -> None:
        """Create the login role ``owner`` (password: ours) and its databases; safe to repeat."""
        names = list(names)
        for identifier in [owner, *names]:
            if not _IDENTIFIER.match(identifier):
                raise ValueError(f"not a plain SQL identifier: {identifier!r}")
        password = self.password if password is None else password
        # \gexec runs each generated statement; CREATE DATABASE cannot run inside a DO block.
        script = """
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'owner', :'password')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'owner') \\gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'owner', :'password') \\gexec
SELECT format('CREATE DATABASE %I OWNER %I', name, :'owner')
  FROM unnest(string_to_array(:'names', ',')) AS name
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = name) \\gexec
"""
        variables = {"owner": owner, "password": password, "names": ",".join(names)}
        result = self._psql(script, variables=variables)
        if result.returncode != 0:
            raise ServiceError(f"creating role/databases failed: {result.stderr.strip()}")
        log.info("postgres databases ready: %s (owner %s)", ", ".join(names), owner)

    def migrate(self, schemas: Mapping[str, migrations.Database]) -> None:
        """Bring databases (name -> "state" | "data") to the head revision, as `trace db
        upgrade` does; safe to repeat."""
        for name, database in schemas.items():
            revision = migrations.upgrade(self.dsn(name), database)
            log.info("postgres %s: %s schema at %s", name, database, revision)

    def dsn(self, dbname: str, driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy-style URL for the application role, e.g. for TRACE_STATE_DSN."""
        return f"{driver}://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{dbname}"

    def dagster_env(self, dbname: str = "dagster") -> dict[str, str]:
        """The variables dagster_home/dagster.yaml reads to find Dagster's own database."""
        return {
            "TRACE_DAGSTER_PG_HOST": LOOPBACK,
            "TRACE_DAGSTER_PG_PORT": str(self.port),
            "TRACE_DAGSTER_PG_USER": self.user,
            "TRACE_DAGSTER_PG_PASSWORD": self.password,
            "TRACE_DAGSTER_PG_DB": dbname,
        }

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Local object store
# --------------------------------------------------------------------------------------------


class LocalObjectStore:
    """The default local object store: one directory per bucket under ``<root>/objectstore``.

    moto keeps objects only in memory, so the local default uses plain directories, which
    survive a restart; the platform reads them with TRACE_OBJECT_STORE=local.
    """

    def __init__(self, root: Path, buckets: Sequence[str] = TRACE_BUCKETS) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / "objectstore"
        self.buckets = tuple(buckets)

    def bucket_path(self, bucket: str) -> Path:
        return self.path / bucket

    def ensure(self) -> None:
        """Create the bucket directories (idempotent)."""
        for bucket in self.buckets:
            self.bucket_path(bucket).mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return all(self.bucket_path(bucket).is_dir() for bucket in self.buckets)


# --------------------------------------------------------------------------------------------
# Facade
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceStatus:
    """One line of ``status``."""

    name: str
    running: bool
    pid: int | None
    address: str


def _port_setting(explicit: int | None, env_var: str, recorded: Any, default: int) -> int:
    """Pick a port: explicit argument, then environment, then the last `up`, then default."""
    if explicit is not None:
        return explicit
    if os.environ.get(env_var):
        return int(os.environ[env_var])
    if isinstance(recorded, int):
        return recorded
    return default


def protect(root: Path, dagster_home: Path) -> None:
    """Keep other users (Python UDFs run as uids of their own, trace_resources/udfs/jail.py) out
    of the services' root, which holds every organisation's datasets, the query cache and the
    logs, and out of Dagster's home (runs' logs and artifacts): root 0750 with the postgres
    user's group when we are root (PostgreSQL runs as that user and must pass), else 0700;
    dagster_home 0700."""
    if os.geteuid() == 0:
        try:
            group = pwd.getpwnam(PG_SUPERUSER).pw_gid
        except KeyError:
            root.chmod(0o700)
        else:
            os.chown(root, 0, group)
            root.chmod(0o750)
    else:
        root.chmod(0o700)
    if dagster_home.is_dir():
        dagster_home.chmod(0o700)


class LocalServices:
    """All local services of a Trace checkout: ``up()``, ``down()``, ``status()``, ``env()``.

    Ports come from the arguments, else TRACE_PG_PORT / TRACE_ANVIL_PORT, else the ports the
    last ``up`` on this root used (``services.json``), else 54329 and 18545. Usable as a context
    manager in tests: ``with LocalServices(tmp_root, pg_port=free_port(), ...) as services``.
    """

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        pg_port: int | None = None,
        anvil_port: int | None = None,
        sqs_port: int | None = None,
        chain_id: int = MONAD_TESTNET_CHAIN_ID,
        anvil_args: Sequence[str] = (),
        databases: Sequence[str] = TRACE_DATABASES,
    ) -> None:
        self.root = Path(root).resolve()
        self.settings_file = self.root / "services.json"
        recorded = self._recorded_settings()
        self.postgres = PostgresServer(
            self.root,
            _port_setting(pg_port, "TRACE_PG_PORT", recorded.get("pg_port"), DEFAULT_PG_PORT),
        )
        self.anvil = AnvilNode(
            self.root,
            _port_setting(
                anvil_port, "TRACE_ANVIL_PORT", recorded.get("anvil_port"), DEFAULT_ANVIL_PORT
            ),
            chain_id=chain_id,
            # a fixed genesis timestamp makes the generated devnet reproducible block for block
            extra_args=anvil_args or ("--timestamp", str(GENESIS_TIMESTAMP)),
        )
        self.object_store = LocalObjectStore(self.root)
        # the alert buffer: moto's SQS API (queues live in memory: stop the sink with SIGTERM
        # first, and it drains the buffer into Postgres before the services stop)
        self.sqs = MotoS3Server(
            _port_setting(sqs_port, "TRACE_SQS_PORT", recorded.get("sqs_port"), DEFAULT_SQS_PORT),
            root=self.root,
        )
        self.databases = tuple(databases)

    def _recorded_settings(self) -> dict[str, Any]:
        try:
            data = json.loads(self.settings_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def up(self) -> None:
        """Start everything (idempotent). On failure, stop what this call started, then raise."""
        self.root.mkdir(parents=True, exist_ok=True)
        protect(self.root, DAGSTER_HOME)
        self.object_store.ensure()
        started: list[PostgresServer | AnvilNode | MotoS3Server] = []
        try:
            if not self.postgres.is_running():
                started.append(self.postgres)
            self.postgres.start()
            self.postgres.ensure_databases(self.databases)
            self.postgres.migrate(
                {name: kind for name, kind in TRACE_SCHEMAS.items() if name in self.databases}
            )
            if not self.anvil.is_running():
                started.append(self.anvil)
            self.anvil.start()
            if not self.sqs.is_running():
                started.append(self.sqs)
            self.sqs.start()
        except BaseException:
            for service in reversed(started):
                with contextlib.suppress(Exception):
                    service.stop()
            raise
        settings = {
            "pg_port": self.postgres.port,
            "anvil_port": self.anvil.port,
            "sqs_port": self.sqs.port,
            "chain_id": self.anvil.chain_id,
        }
        self.settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    def down(self) -> None:
        """Stop every service of this root, including ones an earlier process started.

        Each stop is attempted even if another one fails; the first error is raised at the end.
        """
        errors: list[BaseException] = []
        stoppers = [self.anvil.stop, self.sqs.stop, self.postgres.stop]
        for stop in stoppers:
            try:
                stop()
            except Exception as error:  # keep stopping the others
                log.error("%s", error)
                errors.append(error)
        if errors:
            raise errors[0]
        self.settings_file.unlink(missing_ok=True)

    def status(self) -> list[ServiceStatus]:
        statuses = [
            ServiceStatus(
                "postgres",
                self.postgres.is_running(),
                self.postgres.pid,
                f"{LOOPBACK}:{self.postgres.running_port() or self.postgres.port}",
            ),
            ServiceStatus("anvil", self.anvil.is_running(), self.anvil.pid, self.anvil.url),
            ServiceStatus(
                "objectstore", self.object_store.exists(), None, str(self.object_store.path)
            ),
        ]
        statuses.append(
            ServiceStatus("sqs", self.sqs.is_running(), self.sqs.pid, self.sqs.endpoint_url)
        )
        return statuses

    def env(self) -> dict[str, str]:
        """The environment variables the platform (and dagster.yaml) read to find the services."""
        pg = self.postgres
        return {
            "TRACE_RPC_URL": self.anvil.url,
            "TRACE_CHAIN_ID": str(self.anvil.chain_id),
            "TRACE_RANGE_SIZE": str(DEVNET_RANGE_SIZE),
            "TRACE_STATE_DSN": pg.dsn("trace_state"),
            "TRACE_DATA_DSN": pg.dsn("trace_data"),
            **pg.dagster_env(),
            "TRACE_OBJECT_STORE": "local",
            "TRACE_LOCAL_STORE_ROOT": str(self.object_store.path),
            "TRACE_SQS_ENDPOINT_URL": self.sqs.endpoint_url,
            # the local webhook receiver listens on loopback, which alert delivery refuses
            # unless allowed (an operator's own setting wins)
            "TRACE_ALERT_OUTBOUND_ALLOW": os.environ.get(
                "TRACE_ALERT_OUTBOUND_ALLOW", f"{LOOPBACK}/32"
            ),
            # moto accepts any credentials; boto3 needs some to sign the SQS requests
            "AWS_ACCESS_KEY_ID": os.environ.get(
                "AWS_ACCESS_KEY_ID", MOTO_CREDENTIALS["aws_access_key_id"]
            ),
            "AWS_SECRET_ACCESS_KEY": os.environ.get(
                "AWS_SECRET_ACCESS_KEY", MOTO_CREDENTIALS["aws_secret_access_key"]
            ),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", MOTO_REGION),
            "DAGSTER_HOME": str(DAGSTER_HOME),
        }

    @contextlib.contextmanager
    def running(self) -> Iterator[LocalServices]:
        """``up()`` now and ``down()`` on exit, even on error."""
        self.up()
        try:
            yield self
        finally:
            self.down()

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _print_status(services: LocalServices) -> bool:
    statuses = services.status()
    for item in statuses:
        state = "running" if item.running else "stopped"
        pid = f"pid {item.pid}" if item.pid else ""
        print(f"{item.name:<12} {state:<8} {pid:<11} {item.address}")  # noqa: T201
    return all(item.running for item in statuses)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infra.local.services up|down|status|env [--root DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.local.services",
        description="Start/stop Trace's local services (PostgreSQL, anvil, local object store).",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="project folder (default: <repo>/.local)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    services = LocalServices(args.root)
    try:
        if args.command == "up":
            services.up()
            _print_status(services)
            print(f'\nexport the settings with: eval "$({parser.prog} env)"')  # noqa: T201
        elif args.command == "down":
            services.down()
            print(f"local services in {services.root} stopped")  # noqa: T201
        elif args.command == "status":
            return 0 if _print_status(services) else 3
        else:
            for key, value in services.env().items():
                print(f"export {key}={shlex.quote(value)}")  # noqa: T201
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
