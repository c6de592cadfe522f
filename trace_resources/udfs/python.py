"""How the platform starts an organisation's Python transform: one external process per
partition, through Dagster Pipes, holding only that attempt's task credentials.

    udf_launch(python, runner, workdir) -> UdfLaunch     the ONE place that builds the process's
                                                         argv, environment and working folder
    ScopedPipesSubprocessClient.run_launch(...)          Dagster's PipesSubprocessClient, run
                                                         with exactly that environment (the
                                                         stock client copies os.environ) and a
                                                         wall-time limit

The environment is built from an allow-list, never copied from the platform's: no database
DSN, no object-store keys, no token signing key reach the process. What the process needs (the
query service's URL, its task token, its inputs, its upload URL, the declared schema) comes
in the Pipes context's extras. The runtime it runs is `trace_resources/udfs/runner.py`, copied
into the working folder (it imports nothing of the platform).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.pipes.client import PipesClientCompletedInvocation
from dagster._core.pipes.context import PipesSession
from dagster._core.pipes.utils import open_pipes_session
from dagster_shared.utils.warnings import PreviewWarning

from trace_resources.udfs.jail import JailLimits, jail_argv

__all__ = [
    "BASE_ENV",
    "RUNNER_PATH",
    "RUNNER_REQUIREMENTS",
    "MODULE_FILE",
    "UdfLaunch",
    "UdfTimeout",
    "ScopedPipesSubprocessClient",
    "prepare_workdir",
    "udf_launch",
]

RUNNER_PATH = Path(__file__).with_name("runner.py")
# what the runtime itself imports: a transform's own environment must hold these
RUNNER_REQUIREMENTS = ("pyarrow", "dagster-pipes")
RUNNER_FILE = "trace_udf_runner.py"
MODULE_FILE = "trace_udf_module.py"
# the only variables a transform's process gets from its launcher (plus Dagster Pipes' own)
_ENV_ALLOW = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"}
# ... and for every launcher (this one's jail, or a pod: trace_resources.udfs.k8s)
BASE_ENV = {**_ENV_ALLOW, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class UdfLaunch:
    """How to start a transform's process: `Popen(argv, env=env, cwd=cwd, **popen)`."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    popen: Mapping[str, Any] = field(default_factory=dict)


class UdfTimeout(Exception):
    """The transform's process ran past its wall-time limit and was killed."""


def prepare_workdir(workdir: Path, source: str) -> Path:
    """The transform's working folder: its module and the runtime; returns the runtime. The
    folder and its files are readable by the jailed uid (they hold the organisation's own code
    and the platform's public runtime, nothing secret)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    (workdir / MODULE_FILE).write_text(source)
    runner = workdir / RUNNER_FILE
    shutil.copyfile(RUNNER_PATH, runner)
    for path in (workdir / MODULE_FILE, runner):
        path.chmod(0o644)
    return runner


def udf_launch(
    python_executable: str,
    runner_script: Path,
    workdir: Path,
    jail: tuple[JailLimits, Path] | None = None,
) -> UdfLaunch:
    """The process of one attempt of a transform: its interpreter (its own venv's) runs the
    runtime in the attempt's working folder, with an environment built from an allow-list
    (isolated mode: no user site, no PYTHON* variables, no bytecode written).

    With `jail` (its limits, and a status file the UDF's uid can not reach), the command runs
    under the jail (`trace_resources.udfs.jail`): its own uid, its own private cwd/HOME/TMPDIR,
    and the limits; only the variables built here reach it."""
    env = {**BASE_ENV, "HOME": str(workdir), "TMPDIR": str(workdir)}
    argv = [python_executable, "-I", str(runner_script)]
    if jail is not None:
        limits, status_file = jail
        # HOME and TMPDIR are the jail's own private folder (and the wrapper finds the Pipes
        # files it hands to the UDF's uid under the system's temp folder)
        env = {k: v for k, v in env.items() if k not in ("HOME", "TMPDIR")}
        argv = jail_argv(argv, limits, status_file=status_file, env_keys=list(env))
    return UdfLaunch(argv, env, str(workdir), {"start_new_session": True})


@contextmanager
def udf_pipes_session(
    client: Any, context: dg.AssetExecutionContext, extras: Mapping[str, Any]
) -> Iterator[PipesSession]:
    """The Pipes session of one attempt with `client`'s context injector and message reader
    (the subprocess launcher's and the pod launcher's alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)  # Dagster's own use of a preview API
        with open_pipes_session(
            context=context,
            context_injector=client.context_injector,
            message_reader=client.message_reader,
            extras=dict(extras),
        ) as session:
            yield session


class ScopedPipesSubprocessClient(dg.PipesSubprocessClient):
    """Dagster's subprocess Pipes client, started with exactly the launch's environment (plus
    Pipes' bootstrap variables) instead of a copy of the orchestrator's, and killed (its whole
    process group) past `timeout_s`."""

    def run_launch(
        self,
        *,
        context: dg.AssetExecutionContext,
        launch: UdfLaunch,
        extras: Mapping[str, Any],
        timeout_s: float,
    ) -> tuple[PipesClientCompletedInvocation, int]:
        """Run the process to its end; its exit code with the completed invocation (a
        non-zero code is the caller's to report, with what the process said)."""
        with udf_pipes_session(self, context, extras) as session:
            process = subprocess.Popen(
                list(launch.argv),
                cwd=launch.cwd,
                env={**launch.env, **session.get_bootstrap_env_vars()},
                **launch.popen,
            )
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                raise UdfTimeout(f"ran longer than {timeout_s:g} s") from None
            except BaseException:  # interrupted (run terminated): stop it, then go on
                _kill_group(process)
                raise
        return PipesClientCompletedInvocation(session), int(process.returncode)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()
