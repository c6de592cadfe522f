"""Run the query service (uvicorn) as a child process on loopback: for `make dev`, `make demo`,
the benchmark and the tests.

It runs in its own process group (started with a new session), so Ctrl-C in a terminal does not
reach it directly and `stop()` takes uvicorn's workers with it: SIGTERM (uvicorn shuts down
gracefully), then SIGKILL after a timeout. If the process that started it dies (killed too),
it gets SIGTERM (`PR_SET_PDEATHSIG`, tied to the starting thread: start it from the main
thread).

Bound to loopback, it runs in development mode by default (`TRACE_QUERY_DEV_MODE=true`): the
service then accepts the placeholder keys of `make dev`, `make demo`, the benchmarks and tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from infra.local.services import (
    LOOPBACK,
    REPO_ROOT,
    ServiceError,
    _http_answers,
    _log_tail,
    free_port,
    port_in_use,
    stop_process_group,
)
from trace_resources.processes import dies_with_this_process

__all__ = ["QueryServer", "settings_env"]


def settings_env(settings: BaseSettings, prefix: str = "TRACE_") -> dict[str, str]:
    """The environment variables that reproduce `settings` in another process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"{prefix}{name.upper()}"] = str(value)
    return env


class QueryServer:
    """`uvicorn trace_query_api.app:app --factory` on 127.0.0.1:port with the given env."""

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        *,
        workers: int = 1,
        log_file: Path | None = None,
        start_timeout: float = 60.0,
        dev_mode: bool = True,
    ) -> None:
        self.env = {
            **os.environ,
            **env,
            "TRACE_QUERY_HOST": LOOPBACK,
            "TRACE_QUERY_DEV_MODE": "true" if dev_mode else "false",
        }
        self.port = port or free_port()
        self.workers = workers
        self.log_file = log_file
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        if port_in_use(self.port):
            raise ServiceError(f"query service: port {self.port} is already in use")
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "trace_query_api.app:app",
            "--factory",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--no-access-log",
            "--no-server-header",
            "--log-level",
            "warning",
        ]
        output: Any = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_file.open("ab")
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=dies_with_this_process(),  # we die (killed too): it stops
            )
        finally:
            if output is not subprocess.DEVNULL:
                output.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ServiceError(
                    f"the query service exited with code {code} during start"
                    f"{_log_tail(self.log_file, 40)}"
                )
            if _http_answers(f"{self.url}/healthz", timeout=1.0) is not None:
                return self
            time.sleep(0.1)
        self.stop()
        raise ServiceError(
            f"the query service did not answer on {self.url} within {self.start_timeout:.0f} s"
            f"{_log_tail(self.log_file, 40)}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        stop_process_group(self.proc.pid, timeout)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
