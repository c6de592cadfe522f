"""`WarmRunLauncher`: Dagster runs started from a warm, preloaded worker (no interpreter start).

Set in `dagster_home/dagster.yaml`. A run launched here is the same run Dagster's default launcher
would start (`dagster api execute_run` on the run's own code origin, in its own process, its
events in the instance's event log, terminable from the UI), but its process is forked from
`trace_resources.instance.run_worker`, a pool server that has imported dagster, the heavy
libraries and the code location once. Launch to first step drops from 4-11 s (a fresh
interpreter importing ~4 s of modules) to a fork (~0.2-0.4 s), which is what the chain-head
path's alert latency (issue 6) waits on for every new range.

Edited code takes effect on the next run, as with the default launcher: before each launch the
launcher compares the project's source files (size and modification time of every file in the
packages of the preloaded project modules) with what the pool imported, and replaces a stale
pool (it is retired: its runs under way finish on the code they started with, then it exits).
The code location also builds an asset per organisation's transform from Postgres state
(`trace udf apply`), so the number of applied transform versions is part of the signature: a
transform applied since the pool started replaces it too.

One pool server per Python executable named by the runs' code origins, started on the first
launch and stopped (stdin closed) when the launcher is disposed of. A run lives no longer than
its pool, and the pool no longer than the launching process (webserver or daemon): when either
stops or is killed, its runs get SIGTERM, which Dagster turns into a cancellation, so stopping
`make dev` stops its runs and leaves no orphan. The worker's pid and host are stored as a run
tag (`WORKER_TAG`, hidden from the UI), so `terminate` works from any process on the host (the
webserver's Terminate button): it sends the run's process SIGINT, which Dagster's run worker
turns into a clean cancellation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import Array, Field, Noneable
from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import HIDDEN_TAG_PREFIX
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClass, serialize_value
from dagster._serdes.config_class import ConfigurableClassData

# Dagster hides run tags under `.dagster/` from the UI and the GraphQL API (`TagType.HIDDEN`),
# as dagster-aws's ECS launcher does with its `.dagster/eni_id`: where a run's process lives is
# the launcher's business, not the operator's. (`.dagster/run_worker` itself is Dagster's.)
WORKER_TAG = f"{HIDDEN_TAG_PREFIX}trace/run_worker"
# runs launched before the tag was hidden carry it here; still read, so they stay terminable
_LEGACY_WORKER_TAG = "trace/run_worker"

# imported once by the pool server (the project's modules last: a change to their files
# replaces the pool, see `source_signature`)
DEFAULT_PRELOAD = (
    "dagster",
    "dagster._cli.api",
    "dagster_aws.s3",
    "dagster_postgres",
    "dagster_duckdb",
    "polars",
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.dataset",
    "pyarrow.fs",
    "pyarrow.parquet",
    "numpy",
    "duckdb",
    "boto3",
    "botocore.session",
    "sqlalchemy",
    "psycopg2",
    "pydantic",
    "pydantic_settings",
    "yaml",
    "httpx",
    "cryo",
    "trace_assets.definitions",
    "trace_assets.run_warmup",
    "trace_resources.instance.warmup",
)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def source_signature(modules: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every source file of the project's packages, when `modules`
    holds one of them (what they import of the project is then in the pool too)."""
    packages = sorted(p.parent for p in PROJECT_ROOT.glob("trace_*/__init__.py"))
    if not any((PROJECT_ROOT / m.split(".")[0]) in packages for m in modules):
        return ()
    entries = []
    for package in packages:
        for path in sorted(package.rglob("*")):
            if path.suffix in (".py", ".yaml", ".yml", ".sql", ".sol", ".json"):
                st = path.stat()
                entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(entries)


def registry_signature() -> tuple[tuple[str, int, int], ...]:
    """The applied transforms' part of the signature, from the state database of the
    settings (one query; -1 while it is out of reach, so the pool is replaced again once it
    answers)."""
    from trace_resources.settings import get_settings
    from trace_resources.storage.state import engine_for
    from trace_resources.storage.udfs import version_count

    try:
        count = version_count(engine_for(get_settings().state_dsn))
    except Exception:
        count = -1
    return (("trace_udf_versions", count, 0),)


def pool_signature(modules: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """What a pool preloading `modules` imported: the project's files and applied transforms."""
    sources = source_signature(modules)
    if not sources:  # the project's code is not preloaded: nothing of it can be stale
        return ()
    return sources + registry_signature()


class RunWorkerPool:
    """One `trace_resources.instance.run_worker` server process and its socket."""

    def __init__(
        self,
        executable: str,
        preload: Sequence[str],
        start_timeout_s: float,
        signature: tuple[tuple[str, int, int], ...],
    ):
        self.signature = signature  # the project's files as this worker imports them
        self._dir = tempfile.mkdtemp(prefix="trace-run-worker-")
        self.socket_path = os.path.join(self._dir, "worker.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p
        )
        self.process = subprocess.Popen(
            [
                executable,
                "-m",
                "trace_resources.instance.run_worker",
                "--socket",
                self.socket_path,
                "--preload",
                *preload,
            ],
            stdin=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + start_timeout_s
        while not self._connectable():
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"the run worker pool for {executable} exited with code "
                    f"{self.process.returncode} before it was ready; its error is in the "
                    "launching process's log above (often a module in preload_modules that "
                    "is not installed: remove it from dagster.yaml's run_launcher config)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the run worker pool for {executable} was not ready within "
                    f"{start_timeout_s:.0f} s; raise run_launcher.config.start_timeout_seconds"
                )
            time.sleep(0.05)

    def _connectable(self) -> bool:
        if not os.path.exists(self.socket_path):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)
            except OSError:
                return False
        return True

    def alive(self) -> bool:
        return self.process.poll() is None

    def start_run(self, serialized_args: str) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(self.socket_path)
            conn.sendall(serialized_args.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = conn.recv(64)
                if not chunk:
                    break
                answer += chunk
        if not answer.strip():
            raise RuntimeError("the run worker pool closed the connection without a pid")
        return int(answer)

    def retire(self) -> None:
        """Take no more runs; exit once the runs under way have ended."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.write(b"retire\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass

    def stop(self) -> None:
        """Exit now; the pool's runs get SIGTERM (Dagster cancels them)."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()  # the pool stops taking runs and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run as a fork of a preloaded worker process (see module docstring)."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        preload_modules: Sequence[str] | None = None,
        start_timeout_seconds: float = 60.0,
    ):
        self._inst_data = inst_data
        self._preload = tuple(preload_modules if preload_modules is not None else DEFAULT_PRELOAD)
        self._start_timeout_s = start_timeout_seconds
        self._pools: dict[str, RunWorkerPool] = {}
        self._retired: list[RunWorkerPool] = []  # replaced, finishing their runs
        self._lock = threading.Lock()
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "preload_modules": Field(
                Noneable(Array(str)),
                is_required=False,
                description="Modules the worker imports once (default: dagster, the heavy "
                "libraries Trace uses and the code location; a change to the files of a "
                "preloaded project package replaces the worker).",
            ),
            "start_timeout_seconds": Field(float, is_required=False, default_value=60.0),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def _pool(self, executable: str) -> RunWorkerPool:
        with self._lock:
            signature = pool_signature(self._preload)
            for done in [p for p in self._retired if not p.alive()]:
                done.stop()  # reaped, its folder removed
                self._retired.remove(done)
            pool = self._pools.get(executable)
            if pool is not None and pool.signature != signature:
                pool.retire()  # the code changed: runs from now on import the new code
                self._retired.append(pool)  # (kept: closing its stdin would stop its runs)
                pool = None
            if pool is None or not pool.alive():
                pool = RunWorkerPool(executable, self._preload, self._start_timeout_s, signature)
                self._pools[executable] = pool
            return pool

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        origin = run.job_code_origin
        if origin is None:
            raise RuntimeError(
                f"run {run.run_id} has no code origin, so no worker can load its job; launch it "
                "from the Dagster UI, the daemon or `dagster job launch`"
            )
        args = ExecuteRunArgs(
            job_origin=origin,
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=False,
        )
        pid = self._pool(origin.executable_path).start_run(serialize_value(args))
        self._instance.add_run_tags(
            run.run_id, {WORKER_TAG: json.dumps({"host": socket.gethostname(), "pid": pid})}
        )

    def _worker(self, run: DagsterRun) -> int | None:
        raw = run.tags.get(WORKER_TAG) or run.tags.get(_LEGACY_WORKER_TAG)
        if not raw:
            return None
        info = json.loads(raw)
        if info.get("host") != socket.gethostname():
            return None
        return int(info["pid"])

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        pid = self._worker(run)
        if pid is None:
            self._instance.report_engine_event(
                "Cannot terminate: the run has no worker on this host.", run, cls=type(self)
            )
            return False
        try:
            os.kill(pid, signal.SIGINT)  # Dagster's run worker cancels the run cleanly
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = self._worker(run)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no worker pid on this host")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, f"worker pid {pid} has exited")
        except PermissionError:
            pass
        return CheckRunHealthResult(WorkerStatus.RUNNING)

    def dispose(self) -> None:
        with self._lock:
            pools, self._pools = [*self._pools.values(), *self._retired], {}
            self._retired = []
        for pool in pools:
            pool.stop()
