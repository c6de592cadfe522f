"""Run the alert sink and the alert deliverer (and, with `with_follower`, the head follower) as
child processes: for `make dev` and `make demo`.

Each runs in its own session (a Ctrl-C in the terminal reaches us, not them), logs to
`<root>/alerts/{sink,deliverer}.log`, and stops on SIGTERM: the sink drains the buffer into
Postgres first, the deliverer finishes the sends in flight. They get SIGTERM too if the
process that started them dies, killed too (`PR_SET_PDEATHSIG`: start them from the main
thread). So stop these before the local services (the SQS API keeps its queues in memory).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from infra.local.services import (
    REPO_ROOT,
    ServiceError,
    _log_tail,
    _signal_group,
    stop_process_group,
)
from trace_resources.processes import dies_with_this_process

__all__ = ["AlertWorkers"]

_WORKERS = {
    "sink": ("trace_resources.alert_pipeline.sink", "sink ready on queue"),
    "deliverer": ("trace_resources.alert_pipeline.delivery", "deliverer ready"),
}
# the head follower (`with_follower=True`): appends and alerts each finalized block
_FOLLOWER = {"follower": ("trace_assets.head", "follower ready")}


class AlertWorkers:
    """`with AlertWorkers(env, root) as workers:` the sink and the deliverer, stopped on exit."""

    def __init__(
        self,
        env: Mapping[str, str],
        root: Path,
        *,
        start_timeout: float = 60.0,
        with_follower: bool = False,
    ) -> None:
        self.env = dict(env)
        self.workers = {**_WORKERS, **(_FOLLOWER if with_follower else {})}
        self.dir = Path(root) / "alerts"
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_file(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, (module, _) in self.workers.items():
                with self.log_file(name).open("ab") as log:
                    self.procs[name] = subprocess.Popen(
                        [sys.executable, "-m", module],
                        env=self.env,
                        cwd=REPO_ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=dies_with_this_process(),  # we die (killed too): it stops
                    )
            for name, (_, ready) in self.workers.items():
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

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM all at once (the sink drains while the deliverer finishes its sends), then
        wait for each, SIGKILL after `timeout`."""
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            stop_process_group(proc.pid, timeout)
            proc.wait(timeout=10)
        self.procs.clear()

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
