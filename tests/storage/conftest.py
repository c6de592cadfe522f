"""Fixtures of the commit-protocol tests: writer processes, stores, invariant checks."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from infra.local.services import MotoS3Server
from tests.utils.invariants import InvariantReport, check_invariants
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.version_store import VersionStore

REPO = Path(__file__).resolve().parents[2]
EVENT_TIMEOUT_S = 60


@dataclass
class WriterProcess:
    """A `tests.storage.writer_proc` subprocess and the JSON events it printed."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def next_event(self, timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if line is None:
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"writer {self.pid} exited ({self.proc.returncode}) before the next event; "
                f"stderr: {self.stderr()[-3000:]}"
            )
        event = json.loads(line)
        self.seen.append(event)
        return event

    def expect(self, name: str) -> dict[str, Any]:
        event = self.next_event()
        assert event["event"] == name, f"expected {name!r}, got {event}"
        return event

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = EVENT_TIMEOUT_S) -> tuple[int, list[dict[str, Any]]]:
        """Wait for exit; the return code and every event it printed."""
        self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(json.loads(line))
        return self.proc.returncode, self.seen

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()


SpawnWriter = Callable[..., WriterProcess]


@pytest.fixture
def writer_spec(state_dsn: str, s3_server: MotoS3Server, s3_bucket: str) -> dict[str, Any]:
    return {
        "dsn": state_dsn,
        "endpoint_url": s3_server.endpoint_url,
        "bucket": s3_bucket,
        "dataset": "blocks",
        "partition": "000000000000-000000000049",
    }


@pytest.fixture
def spawn_writer(writer_spec: dict[str, Any]) -> Iterator[SpawnWriter]:
    """Start writer processes; every one still alive at the end of the test is killed."""
    started: list[WriterProcess] = []

    def spawn(crash_point: str | None = None, **spec: Any) -> WriterProcess:
        env = {k: v for k, v in os.environ.items() if k != "TRACE_CRASH_POINT"}
        if crash_point:
            env["TRACE_CRASH_POINT"] = crash_point
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.storage.writer_proc", json.dumps(writer_spec | spec)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        writer = WriterProcess(proc)
        started.append(writer)
        return writer

    yield spawn
    for writer in started:
        if writer.proc.poll() is None:
            writer.proc.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            writer.proc.wait(timeout=10)
        for stream in (writer.proc.stdin, writer.proc.stdout, writer.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def store(objects: ObjectStoreResource) -> ObjectStore:
    return objects.datasets()


@pytest.fixture
def versions(state: StateStoreResource) -> VersionStore:
    return state.versions()


@pytest.fixture
def invariants(versions: VersionStore, store: ObjectStore) -> Callable[[], InvariantReport]:
    return lambda: check_invariants(versions, store)


@pytest.fixture
def cli(state_dsn: str, s3_server: MotoS3Server, s3_bucket: str) -> Callable[..., str]:
    env = {
        **os.environ,
        "TRACE_STATE_DSN": state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_BUCKET_DATASETS": s3_bucket,
    }

    """Run the `trace` CLI against the test's state database and bucket; its stdout."""

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("trace")), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run
