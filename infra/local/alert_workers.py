"""Run the alert sink and the alert deliverer as child processes: for `make dev` and `make demo`.

Each runs in its own session (a Ctrl-C in the terminal reaches us, not them), logs to
`<root>/alerts/{sink,deliverer}.log`, and stops on SIGTERM: the sink drains the buffer into
Postgres first, the deliverer finishes the sends in flight. So stop these before the local
services (the SQS API keeps its queues in memory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from infra.local.services import REPO_ROOT, ServiceError, _log_tail

__all__ = ["AlertWorkers"]

_WORKERS = {
    "sink": ("trace_resources.buffer.sink", "sink ready on queue"),
    "deliverer": ("trace_resources.buffer.delivery", "deliverer ready"),
}


class AlertWorkers:
    """`with AlertWorkers(env, root) as workers:` the sink and the deliverer, stopped on exit."""

    def __init__(self, env: Mapping[str, str], root: Path, *, start_timeout: float = 60.0) -> None:
        self.env = dict(env)
        self.dir = Path(root) / "alerts"
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, (module, _) in _WORKERS.items():
                with self.log_file(name).open("ab") as log:
                    self.procs[name] = subprocess.Popen(
                        [sys.executable, "-m", module],
                        env=self.env,
                        cwd=REPO_ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            for name, (_, ready) in _WORKERS.items():
                self._wait_ready(name, ready)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, name: str, text: str) -> None:
        """Until the worker logged that its SIGTERM handler is installed (so stop drains)."""
        proc = self.procs[name]
        log = self.log_file(name)
        offset = 0
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            content = log.read_text(errors="replace")
            if text in content[offset:]:
                return
            if proc.poll() is not None:
                raise ServiceError(
                    f"alert {name} exited with code {proc.returncode} during start{_log_tail(log)}"
                )
            time.sleep(0.1)
        raise ServiceError(f"alert {name} did not start within {self.start_timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM each (the sink drains, the deliverer finishes its sends), SIGKILL after
        `timeout`; returns the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal(proc, signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                codes[name] = proc.wait(timeout=10)
        self.procs.clear()
        return codes

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


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
