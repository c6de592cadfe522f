"""A job for tests/infra/test_run_launcher.py: its one step runs in a child process of the run
(the multiprocess executor), writes its pid to `$TRACE_TEST_PID_DIR/step.pid` and sleeps. Like
`trace_assets/definitions.py`, it has the step stop when the run's process is gone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg

from trace_resources.processes import exit_with_multiprocessing_parent

exit_with_multiprocessing_parent()


@dg.op
def sleepy() -> None:
    pid_file = Path(os.environ["TRACE_TEST_PID_DIR"]) / "step.pid"
    pid_file.write_text(str(os.getpid()))
    time.sleep(600)


@dg.job(executor_def=dg.multiprocess_executor)
def sleepy_job() -> None:
    sleepy()
