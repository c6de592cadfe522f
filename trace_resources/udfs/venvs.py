"""The virtual environments of Python UDFs: one per (interpreter, declared requirements, the
runtime's own needs), built with uv and cached.

`build_venv(requirements)` returns the venv to run a UDF in (`UdfVenv.python`). A venv is built
once per cache key, the hash of the interpreter's version, the sorted requirements and the
runtime's requirements (dagster-pipes and pyarrow at the platform's versions), under
`TRACE_UDF_VENV_DIR/<key>`: in a temporary directory beside it, then renamed, under a per-key
file lock, so concurrent builders of one key build it once and a reader never sees half a venv.
uv's own cache makes a build of known packages a matter of links. Source distributions are
never built (`--no-build`): building one runs its code, as the platform's user.

The interpreter must be executable by the UDFs' users (`jail.py`), which a Python under /root
(pyenv, uv's own) is not: `TRACE_UDF_PY_PYTHON`, else this Python if others may run it, else
python3.X on PATH or in /usr/bin. The venv is readable by everyone and holds nothing secret.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from trace_resources.settings import get_settings

__all__ = ["UdfVenv", "UdfVenvError", "build_venv", "runtime_requirements", "udf_python"]


class UdfVenvError(Exception):
    """A UDF's environment can not be built; the message is one line saying why."""


@dataclass(frozen=True)
class UdfVenv:
    """A built venv: its directory, its interpreter, and whether it came from the cache."""

    path: Path
    python: Path
    cache_hit: bool


def runtime_requirements() -> list[str]:
    """What the UDF runtime itself imports, at the platform's versions."""
    return [f"dagster-pipes=={version('dagster-pipes')}", f"pyarrow=={version('pyarrow')}"]


def others_can_run(path: Path) -> bool:
    """Whether a user with no group in common could execute `path` (every parent searchable)."""
    path = path.resolve()
    if not path.is_file() or not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


def udf_python() -> Path:
    """The interpreter UDF venvs are built on (see the module's docstring)."""
    configured = get_settings().udf_py_python
    if configured:
        found = shutil.which(configured)
        if found is None or not others_can_run(Path(found)):
            raise UdfVenvError(
                f"TRACE_UDF_PY_PYTHON={configured!r} is not an interpreter other users can run"
            )
        return Path(found)
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    candidates = [base, Path(f"/usr/bin/{minor}")]
    on_path = shutil.which(minor)
    candidates += [Path(on_path)] if on_path else []
    for candidate in candidates:
        if candidate.exists() and others_can_run(candidate):
            return candidate.resolve()
    raise UdfVenvError(
        f"no {minor} that other users can run (this one is {base}): install "
        "one (e.g. apt-get install python3) or set TRACE_UDF_PY_PYTHON"
    )


def uv_binary() -> str:
    for candidate in (shutil.which("uv"), str(Path.home() / ".local" / "bin" / "uv")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise UdfVenvError("uv not found: install it (pip install uv) or put it on PATH")


@lru_cache(maxsize=8)
def python_version(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import sys, platform; print(sys.version, platform.machine())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def checked_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements, normalised and sorted; a malformed one is refused by name."""
    checked = []
    for text in requirements:
        try:
            checked.append(str(Requirement(text)))
        except InvalidRequirement as exc:
            first = str(exc).splitlines()[0]
            raise UdfVenvError(f"requirement {text!r} is not valid: {first}") from None
    return sorted(set(checked))


def cache_key(python: Path, requirements: list[str], runtime: list[str]) -> str:
    material = {"python": python_version(python), "requirements": requirements, "runtime": runtime}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def uv_failure(stderr: str) -> str:
    """uv's explanation in one line, without its tree drawing."""
    lines = [re.sub(r"^[\s×╰─▶│├]+(cause:)?", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("hint:", "help:"))]
    reason = next((line for line in lines if line.startswith("Because")), None)
    return reason or (lines[-1] if lines else "uv failed without saying why")


def build_venv(requirements: Sequence[str], *, cache_dir: Path | None = None) -> UdfVenv:
    """The venv for these requirements, from the cache or built now (see the module)."""
    wanted = checked_requirements(requirements)
    python = udf_python()
    runtime = runtime_requirements()
    root = (cache_dir or get_settings().udf_venv_dir).resolve()
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    closed = [str(p) for p in (root, *root.parents) if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        raise UdfVenvError(
            f"the UDF venv cache {root} is not reachable by the UDFs' users: {closed[0]} is "
            "not searchable by others (chmod o+x, or set TRACE_UDF_VENV_DIR elsewhere)"
        )
    key = cache_key(python, wanted, runtime)
    final = root / key
    venv_python = final / "bin" / "python"
    if venv_python.exists():
        return UdfVenv(final, venv_python, cache_hit=True)
    with locked(root / f".{key}.lock"):
        if venv_python.exists():
            return UdfVenv(final, venv_python, cache_hit=True)
        building = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            install(building, python, wanted, runtime)
            building.chmod(0o755)
            os.rename(building, final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return UdfVenv(final, venv_python, cache_hit=False)


def install(target: Path, python: Path, requirements: list[str], runtime: list[str]) -> None:
    uv = uv_binary()
    # UV_* stay: an operator's index, cache or offline mode apply to the UDFs' venvs too
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    steps = [
        [uv, "venv", "--quiet", "--relocatable", "--python", str(python), str(target)],
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--no-build",
            "--python",
            str(target / "bin" / "python"),
            *requirements,
            *runtime,
        ],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            declared = ", ".join(requirements) or "no requirements"
            raise UdfVenvError(
                f"could not build the UDF's environment ({declared}): {uv_failure(done.stderr)}"
            )
