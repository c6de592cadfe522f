"""The warm run launcher's worker pool: started on demand, replaced when the project's code
changes (an edited asset takes effect on the next run), stopped with the launcher, no process
of a run outlives a killed run or pool, and a bad preload list is a clear error. Runs launched
through it are covered end to end by tests/assets/test_ui_backfill.py (backfill from the UI,
Terminate) and `make bench-alerts`."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.launcher.base import LaunchRunContext

from tests.infra.sleepy_job import sleepy_job
from trace_resources.instance.run_launcher import PROJECT_ROOT, WORKER_TAG, WarmRunLauncher
from trace_resources.processes import ProcessId

LIGHT = ["json", "trace_resources.settings"]  # a project module: its packages are watched


def test_pool_is_reused_then_replaced_when_project_code_changes() -> None:
    launcher = WarmRunLauncher(preload_modules=LIGHT)
    try:
        first = launcher._pool(sys.executable)
        assert first.alive()
        assert launcher._pool(sys.executable) is first  # same code: same warm pool

        source = PROJECT_ROOT / "trace_resources" / "settings.py"
        before = source.stat()
        try:
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
            second = launcher._pool(sys.executable)
        finally:
            os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert second is not first and second.alive()
        # the stale pool, retired, takes no run and exits (it had no runs to finish)
        assert first.process.wait(timeout=30) == 0
        assert not Path(first.socket_path).exists()
    finally:
        launcher.dispose()
    assert second.process.returncode is not None  # disposing stops the pool: nothing leaks
    assert not Path(second.socket_path).exists()


def test_a_preload_module_that_does_not_exist_is_a_clear_error() -> None:
    launcher = WarmRunLauncher(preload_modules=["json", "no_such_module_for_trace"])
    try:
        with pytest.raises(RuntimeError, match="exited with code 1 before it was ready"):
            launcher._pool(sys.executable)
    finally:
        launcher.dispose()


def _wait(condition: Callable[[], bool], limit_s: float = 60) -> bool:
    """Poll until condition() (the limit is the test's, not a speed assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_no_process_of_a_run_outlives_a_killed_run_or_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to a run's process: its step process stops; SIGKILL to the pool (the daemon or
    `make dev` gone): its runs stop, and Dagster records them as ended, not running."""
    monkeypatch.setenv("TRACE_TEST_PID_DIR", str(tmp_path))  # the pool, its runs, their steps
    overrides = {
        "run_launcher": {
            "module": "trace_resources.instance.run_launcher",
            "class": "WarmRunLauncher",
            "config": {"preload_modules": ["dagster", "dagster._cli.api"]},
        }
    }
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "home")) as instance:
        try:
            _kill_and_watch(instance, tmp_path / "step.pid", "run")
            _kill_and_watch(instance, tmp_path / "step.pid", "pool")
        finally:
            instance.run_launcher.dispose()


def _kill_and_watch(instance: dg.DagsterInstance, pid_file: Path, victim: str) -> None:
    launcher = instance.run_launcher
    assert isinstance(launcher, WarmRunLauncher)
    pid_file.unlink(missing_ok=True)
    origin = dg.reconstructable(sleepy_job).get_python_origin()
    run = instance.create_run_for_job(sleepy_job, job_code_origin=origin)
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    tagged = instance.get_run_by_id(run.run_id)
    assert tagged is not None
    run_proc = ProcessId.of(json.loads(tagged.tags[WORKER_TAG])["pid"])
    assert run_proc is not None
    assert _wait(pid_file.exists), "the step did not start"
    step = ProcessId.of(int(pid_file.read_text()))
    assert step is not None and step.alive()
    if victim == "run":
        os.kill(run_proc.pid, signal.SIGKILL)
    else:
        os.kill(launcher._pool(sys.executable).process.pid, signal.SIGKILL)
        assert _wait(lambda: not run_proc.alive()), "the run outlived its pool"

        def ended() -> bool:
            record = instance.get_run_by_id(run.run_id)
            return record is not None and record.is_finished

        assert _wait(ended), "the run is still recorded as running"
    assert _wait(lambda: not step.alive()), f"the step outlived the killed {victim}"
