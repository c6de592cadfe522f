"""Limits and isolation of Python UDF processes (v1: logical isolation on one host).

`jail_argv(argv, limits, status_file=...)` prefixes a command with the jail's wrapper
(`jail_exec.py`), so it composes with anything that takes a command list, an environment and a
cwd, such as Dagster's `PipesSubprocessClient`:

    status = Path(private_tmp) / "jail.json"      # a place the UDF's uid can not reach
    command = jail_argv([str(venv.python), "-m", "udf_runner"], JailLimits.from_settings(),
                        status_file=status, env_keys=["TRACE_TASK_TOKEN", ...])
    try:
        client.run(command=command, context=context, env={"TRACE_TASK_TOKEN": token, ...})
    except dg.DagsterPipesExecutionError:
        stop = read_stop(status)  # None, or why the jail stopped it: str(stop) is
        if stop is None:          # "the UDF ran longer than 60 s (TRACE_UDF_PY_TIMEOUT_S)"
            raise
        raise dg.Failure(f"{stop}; nothing was committed") from None

Dagster Pipes' default temp files (the context and the messages, in private directories made
directly under the temp dir) are handed to the run's uid by the wrapper; the UDF's own code must
be readable by other users (e.g. a copy in a 0755 directory).

What the command gets (details in `jail_exec.py`): its own uid (`TRACE_UDF_PY_UID_BASE` + a free
slot; no account is needed, so a container image needs no extra user) with no supplementary
groups and no new privileges, a fresh private cwd that is also HOME and TMPDIR, only the
environment variables named in `env_keys` plus Dagster Pipes' bootstrap variables (never the
caller's whole environment: `PipesSubprocessClient` passes `os.environ`), and the limits of
`JailLimits`. The wrapper relays stdout/stderr, and at a limit kills every process of the run;
it writes the reason to `status_file` and exits with `STOPPED_EXIT`. Not run as root, the
command runs as the current user (logged as a warning): the limits hold, the isolation does not.

What v1 relies on besides: the platform's files that hold secrets or other organisations' data
are not readable by other users (`infra/local/services.py` makes the services' root 0750
root:postgres and dagster_home 0700; the PostgreSQL data directory is 0700; the UDF venvs are
world-readable and hold nothing secret). The network is not isolated (v2).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trace_resources.settings import Settings, byte_size, get_settings
from trace_resources.udfs.jail_exec import REASONS, STOPPED_EXIT

__all__ = [
    "JAIL_EXEC",
    "REASONS",
    "STOPPED_EXIT",
    "JailLimits",
    "JailStop",
    "jail_argv",
    "read_stop",
]

log = logging.getLogger(__name__)

JAIL_EXEC = Path(__file__).with_name("jail_exec.py")


@dataclass(frozen=True)
class JailLimits:
    """What one UDF process may use; `from_settings()` reads the TRACE_UDF_PY_* settings."""

    timeout_s: float = 300.0
    cpu_s: int = 300
    memory: int = 2 * 2**30
    nofile: int = 256
    nproc: int = 256
    file_size: int = 2**30
    output: int = 16 * 10**6
    uid_base: int = 64_100
    slots: int = 32
    jail_dir: Path = field(default_factory=lambda: Path("/tmp/trace-udf-jail"))

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> JailLimits:
        s = settings or get_settings()
        return cls(
            timeout_s=s.udf_py_timeout_s,
            cpu_s=s.udf_py_cpu_s,
            memory=byte_size(s.udf_py_memory),
            nofile=s.udf_py_nofile,
            nproc=s.udf_py_nproc,
            file_size=byte_size(s.udf_py_file_size),
            output=byte_size(s.udf_py_output),
            uid_base=s.udf_py_uid_base,
            slots=s.udf_py_slots,
            jail_dir=s.udf_py_jail_dir,
        )


@dataclass(frozen=True)
class JailStop:
    """Why the jail stopped a command: `reason` is one of timeout, cpu, memory, output,
    processes, open_files, file_size, terminated; `message` says it in words ("ran longer than
    60 s (TRACE_UDF_PY_TIMEOUT_S)") to follow "the UDF ..."."""

    reason: str
    message: str
    returncode: int

    def __str__(self) -> str:
        return f"the UDF {self.message}"


def jail_argv(
    argv: list[str],
    limits: JailLimits | None = None,
    *,
    status_file: Path | str | None = None,
    env_keys: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """`argv` run under the jail: the command list to give to Popen or a Pipes client, whose
    environment must hold the variables named in `env_keys` (only those reach the command, with
    Dagster Pipes' own). `status_file` (a path the UDF's user can not reach, e.g. in the
    caller's private temp dir) receives the outcome; read it with `read_stop`."""
    limits = limits or JailLimits.from_settings()
    if os.geteuid() != 0:
        log.warning(
            "not running as root: Python UDFs run as the current user (uid %d), limited but "
            "not isolated from this user's files and processes",
            os.geteuid(),
        )
    spec = asdict(limits) | {
        "jail_dir": str(limits.jail_dir),
        "status": str(status_file) if status_file is not None else None,
        "env_keys": list(env_keys),
    }
    # -I -S: the wrapper (root) reads no PYTHON* variable, user site or .pth file
    return [sys.executable, "-I", "-S", str(JAIL_EXEC), "--spec", json.dumps(spec), "--", *argv]


def read_stop(status_file: Path | str) -> JailStop | None:
    """Why the jail stopped the command, or None if it ran to its own end (whatever its exit
    code) or never started."""
    try:
        record = json.loads(Path(status_file).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("reason") not in REASONS:
        return None
    return JailStop(record["reason"], record["message"], int(record["returncode"]))
