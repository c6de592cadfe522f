"""The warm run launcher's worker pool: started on demand, replaced when the project's code
changes (an edited asset takes effect on the next run), stopped with the launcher, and a bad
preload list is a clear error. Runs launched through it are covered end to end by
tests/assets/test_ui_backfill.py (backfill from the UI, Terminate) and `make bench-alerts`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from trace_resources.instance.run_launcher import PROJECT_ROOT, WarmRunLauncher

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
        assert first.process.returncode is not None  # the stale pool stopped
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
