"""Python UDF processes under the jail, as real processes: hostile programs (a fork bomb, memory
exhaustion, an infinite loop, a CPU spinner, printing 1 GB, too many open files, a huge file)
are stopped with the reason a user reads; reads of the platform's files and of /proc/1/environ
are refused; nothing outlives a run, even a process that left its process group; a runaway run
does not stop another; a UDF's venv is built with uv once, cached, and runs under the jail;
and the jail composes with Dagster's PipesSubprocessClient."""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest

from infra.local.services import protect
from trace_resources.udfs.jail import STOPPED_EXIT, JailLimits, JailStop, jail_argv, read_stop
from trace_resources.udfs.jail_exec import live_processes_of
from trace_resources.udfs.venvs import UdfVenvError, build_venv, udf_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail's own uids need root")

UID_BASE = 64_700  # apart from the default range, so other test runs on the host do not meet
SLOTS = 4


@pytest.fixture(scope="module")
def jail_dir() -> Iterator[Path]:
    # under /tmp itself: the runs' private dirs must be reachable by their uids (pytest's
    # base temp dir is 0700)
    path = Path(tempfile.mkdtemp(prefix="udfjail-test-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def limits(jail_dir: Path) -> JailLimits:
    return JailLimits(
        timeout_s=60,
        cpu_s=60,
        memory=256 * 2**20,
        nofile=64,
        nproc=32,
        file_size=2**20,
        output=2**20,
        uid_base=UID_BASE,
        slots=SLOTS,
        jail_dir=jail_dir,
    )


@pytest.fixture(autouse=True)
def nothing_outlives_the_test() -> Iterator[None]:
    yield
    left = {uid: live_processes_of(uid) for uid in range(UID_BASE, UID_BASE + SLOTS)}
    assert not any(left.values()), f"jailed processes left running: {left}"


def run_jailed(
    code: str, limits: JailLimits, status: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = jail_argv(
        [str(udf_python()), "-c", textwrap.dedent(code)],
        limits,
        status_file=status,
        env_keys=sorted(env or {}),
    )
    # the caller's whole environment reaches the wrapper, as PipesSubprocessClient does it
    return subprocess.run(
        argv, env={**os.environ, **(env or {}), "PLATFORM_SECRET": "s3cr3t"}, capture_output=True
    )


HOSTILE = {
    "fork_bomb": (
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        {},
        "processes",
        "started too many processes or threads (more than 32, TRACE_UDF_PY_NPROC)",
    ),
    "memory_exhaustion": (
        """
        hoard = []
        while True:
            hoard.append(bytearray(10**7))
        """,
        {},
        "memory",
        "needed more than 256 MiB of memory (TRACE_UDF_PY_MEMORY)",
    ),
    "infinite_loop": (
        """
        import time
        while True:
            time.sleep(0.05)
        """,
        {"timeout_s": 2.0},
        "timeout",
        "ran longer than 2 s (TRACE_UDF_PY_TIMEOUT_S)",
    ),
    "cpu_spinner": (
        "while True: pass",
        {"cpu_s": 1},
        "cpu",
        "used more than 1 s of CPU (TRACE_UDF_PY_CPU_S)",
    ),
    "prints_1_GB": (
        """
        import sys
        chunk = "x" * 2**20
        for _ in range(1024):
            sys.stdout.write(chunk)
        """,
        {},
        "output",
        "printed more than 1 MiB on stdout/stderr (TRACE_UDF_PY_OUTPUT)",
    ),
    "too_many_open_files": (
        "handles = [open('/dev/null') for _ in range(1000)]",
        {},
        "open_files",
        "opened too many files (more than 64, TRACE_UDF_PY_NOFILE)",
    ),
    "huge_file": (
        "open('big', 'wb').write(b'x' * 10**8)",
        {},
        "file_size",
        "wrote a file larger than 1 MiB (TRACE_UDF_PY_FILE_SIZE)",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_udf_is_stopped_and_told_why(
    case: str, limits: JailLimits, tmp_path: Path
) -> None:
    code, overrides, reason, message = HOSTILE[case]
    status = tmp_path / "status.json"
    done = run_jailed(code, replace(limits, **overrides), status)
    assert done.returncode == STOPPED_EXIT, done.stderr.decode()[-2000:]
    stop = read_stop(status)
    assert stop is not None and (stop.reason, stop.message) == (reason, message)
    assert done.stderr.decode().endswith(f"trace-udf-jail: stopped: the UDF {message}\n")
    assert len(done.stdout) <= limits.output


def test_a_udf_gets_only_its_own_identity_environment_and_directory(
    limits: JailLimits, tmp_path: Path
) -> None:
    code = """
        import json, os
        print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                          "env": dict(os.environ), "cwd": os.getcwd(), "files": os.listdir()}))
    """
    done = run_jailed(code, limits, tmp_path / "status.json", env={"TASK_TOKEN": "t0ken"})
    assert done.returncode == 0, done.stderr.decode()
    seen = __import__("json").loads(done.stdout)
    assert UID_BASE <= seen["uid"] < UID_BASE + SLOTS and seen["gid"] == seen["uid"]
    assert seen["groups"] == []
    assert seen["env"]["TASK_TOKEN"] == "t0ken" and "PLATFORM_SECRET" not in seen["env"]
    assert not {"TRACE_STATE_DSN", "AWS_SECRET_ACCESS_KEY"} & set(seen["env"])
    assert seen["env"]["HOME"] == seen["cwd"] and seen["files"] == []
    assert Path(seen["cwd"]).parent == limits.jail_dir
    assert not Path(seen["cwd"]).exists(), "the private directory is removed after the run"
    assert read_stop(tmp_path / "status.json") is None


def test_a_udf_can_not_read_the_platforms_files(limits: JailLimits, tmp_path: Path) -> None:
    # a secret of root's, reachable by path (its directory is searchable)
    shared = Path(tempfile.mkdtemp(prefix="udfjail-files-", dir="/tmp"))
    try:
        shared.chmod(0o711)
        secret = shared / "secret.env"
        secret.write_text("TRACE_QUERY_TOKEN_KEYS=k1:HS256:abc\n")
        secret.chmod(0o600)
        # the services' root and dagster_home as infra/local/services.py leaves them
        services, home = shared / "services", shared / "dagster_home"
        (services / "objectstore" / "trace-datasets").mkdir(parents=True)
        (services / "objectstore" / "trace-datasets" / "part.parquet").write_bytes(b"rows")
        (home / "storage").mkdir(parents=True)
        (home / "storage" / "run.log").write_text("log")
        protect(services, home)
        code = f"""
            import os
            for path in ({str(secret)!r}, "/proc/1/environ", f"/proc/{{os.getppid()}}/environ",
                         {str(services / "objectstore/trace-datasets/part.parquet")!r},
                         {str(home / "storage/run.log")!r}):
                try:
                    open(path, "rb").read()
                    print("READ", path)
                except PermissionError:
                    print("refused", path)
        """
        done = run_jailed(code, limits, tmp_path / "status.json")
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 5 and all(line.startswith("refused ") for line in lines), lines


def test_nothing_a_udf_starts_outlives_it(limits: JailLimits, tmp_path: Path) -> None:
    code = """
        import os, time
        if os.fork() == 0:
            os.setsid()  # leaves the process group: a group kill would miss it
            if os.fork() == 0:
                time.sleep(600)
            time.sleep(600)
        print(os.getuid())
    """
    done = run_jailed(code, limits, tmp_path / "status.json")
    assert done.returncode == 0 and read_stop(tmp_path / "status.json") is None
    assert live_processes_of(int(done.stdout)) == []


def test_a_runaway_udf_does_not_stall_another(limits: JailLimits, tmp_path: Path) -> None:
    runaway_code = """
        import os
        for _ in range(3):  # four processes spinning on every core the host has
            if os.fork() == 0:
                break
        else:
            print(os.getuid(), flush=True)
        while True:
            pass
    """
    runaway_status = tmp_path / "runaway.json"
    runaway = subprocess.Popen(
        jail_argv(
            [str(udf_python()), "-c", textwrap.dedent(runaway_code)],
            replace(limits, timeout_s=6),
            status_file=runaway_status,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert runaway.stdout is not None
        runaway_uid = int(runaway.stdout.readline())  # it is running
        code = """
            import os
            print(os.getuid(), sum(range(10**6)))
        """
        done = run_jailed(code, limits, tmp_path / "well_behaved.json")
    finally:
        out, err = runaway.communicate()
    uid, total = done.stdout.split()
    assert done.returncode == 0 and int(total) == sum(range(10**6))
    assert int(uid) != runaway_uid
    assert read_stop(tmp_path / "well_behaved.json") is None
    assert read_stop(runaway_status) == JailStop(
        "timeout", "ran longer than 6 s (TRACE_UDF_PY_TIMEOUT_S)", -9
    )


def test_a_terminated_run_is_stopped_whole(limits: JailLimits, tmp_path: Path) -> None:
    """Dagster's terminate sends SIGTERM to the command it started: the wrapper."""
    status = tmp_path / "status.json"
    code = "import os, time\nos.fork()\nprint(1, flush=True)\ntime.sleep(600)"
    argv = jail_argv([str(udf_python()), "-c", code], limits, status_file=status)
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        process.stdout.readline()  # it runs, and its child too
        process.terminate()
        assert process.wait() == STOPPED_EXIT
    stop = read_stop(status)
    assert stop is not None and stop.reason == "terminated"


@pytest.fixture(scope="module")
def venv_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="udfjail-venvs-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_a_udf_venv_is_built_once_and_runs_under_the_jail(
    venv_dir: Path, limits: JailLimits, tmp_path: Path
) -> None:
    builds: list = []
    threads = [
        threading.Thread(
            target=lambda: builds.append(build_venv(["six==1.16.0"], cache_dir=venv_dir))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({build.path for build in builds}) == 1
    assert sorted(build.cache_hit for build in builds) == [False, True]
    again = build_venv(["six==1.16.0"], cache_dir=venv_dir)
    assert again.cache_hit and again.path == builds[0].path
    assert [p.name for p in venv_dir.iterdir() if not p.name.startswith(".")] == [again.path.name]

    code = "import six, pyarrow, dagster_pipes; print(six.__version__, pyarrow.__version__)"
    done = subprocess.run(
        jail_argv([str(again.python), "-c", code], limits, status_file=tmp_path / "s.json"),
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split()[0] == "1.16.0"


@pytest.mark.parametrize(
    ("requirement", "says"),
    [
        ("six==", "requirement 'six==' is not valid"),
        ("trace-no-such-package-4a1b==1.0", "trace-no-such-package-4a1b was not found"),
    ],
)
def test_a_bad_requirement_is_named_in_one_line(
    venv_dir: Path, requirement: str, says: str
) -> None:
    with pytest.raises(UdfVenvError) as raised:
        build_venv([requirement], cache_dir=venv_dir)
    assert says in str(raised.value) and "\n" not in str(raised.value)
    assert not [p for p in venv_dir.iterdir() if p.name.startswith(".build-")]


def test_a_venv_cache_the_udfs_can_not_reach_is_refused(tmp_path: Path) -> None:
    # pytest's base temp dir is 0700: a venv there could not be run by a UDF's user
    with pytest.raises(UdfVenvError, match="not reachable by the UDFs' users") as raised:
        build_venv(["six==1.16.0"], cache_dir=tmp_path / "venvs")
    assert "TRACE_UDF_VENV_DIR" in str(raised.value)


# warnings raised inside dagster 1.13's own Pipes session (the lead's Pipes launch meets them too)
@pytest.mark.filterwarnings("ignore:AssetExecutionContext.run_id is deprecated")
@pytest.mark.filterwarnings("ignore::dagster.PreviewWarning")
def test_the_jail_composes_with_pipes_subprocess_client(
    venv_dir: Path, limits: JailLimits, tmp_path: Path
) -> None:
    venv = build_venv([], cache_dir=venv_dir)
    script = tmp_path / "udf.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from dagster_pipes import open_dagster_pipes
            with open_dagster_pipes() as pipes:
                pipes.log.info(f"running as {os.getuid()}")
                pipes.report_asset_materialization(metadata={
                    "uid": os.getuid(), "token": os.environ.get("TASK_TOKEN", ""),
                    "leaked": sorted(k for k in os.environ if k.startswith("PLATFORM")),
                })
            """
        )
    )
    script.chmod(0o644)
    tmp_path.chmod(0o711)
    for parent in tmp_path.parents:
        if parent.is_relative_to("/tmp") and parent != Path("/tmp"):
            parent.chmod(parent.stat().st_mode | 0o001)
    status = tmp_path / "status.json"

    @dg.asset
    def jailed_udf(context, pipes: dg.PipesSubprocessClient) -> dg.MaterializeResult:
        command = jail_argv(
            [str(venv.python), str(script)], limits, status_file=status, env_keys=["TASK_TOKEN"]
        )
        return pipes.run(
            command=command, context=context, env={"TASK_TOKEN": "t0ken"}
        ).get_materialize_result()

    os.environ["PLATFORM_SECRET"] = "s3cr3t"
    try:
        result = dg.materialize(
            [jailed_udf], resources={"pipes": dg.PipesSubprocessClient()}, raise_on_error=True
        )
    finally:
        del os.environ["PLATFORM_SECRET"]
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert UID_BASE <= metadata["uid"] < UID_BASE + SLOTS
    assert metadata["token"] == "t0ken" and metadata["leaked"] == []
    assert read_stop(status) is None
