"""Stopping leaves nothing running: `make dev` (`python -m infra.dev`) started in the background
of a non-interactive shell, where SIGINT is ignored, stops every process it started on SIGTERM
and on SIGINT, exits 0, and starts again from the services it left; a SIGKILLed CLI backfill's
steps stop with it and stage nothing more.

Processes are found two ways: the tree below the process (snapshotted while it runs: orphans
are re-parented), and a tag in the environment that every process started below inherits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from infra.local.dagster_cli import materialize_command
from infra.local.services import LocalServices, PostgresServer, free_port
from tests.conftest import RANGE_SIZE, Devnet
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_resources.chain.ranges import complete_ranges
from trace_resources.processes import ProcessId, descendants, stop_processes
from trace_resources.settings import Settings
from trace_resources.storage import state as tables
from trace_resources.storage.state import engine_for

REPO = Path(__file__).resolve().parents[2]
TAG = "TRACE_TEST_PROCESS_TAG"
START_LIMIT_S = 240  # limits of the test on a loaded machine, not speed assertions
STOP_LIMIT_S = 60
STEP_STOP_LIMIT_S = 40  # the steps' grace is 10 s; unguarded, they retry for 10 min


def _tagged(tag: str) -> set[ProcessId]:
    """Live processes whose environment holds TAG=tag."""
    needle = f"{TAG}={tag}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            ident = ProcessId.of(int(entry.name))
            if ident is not None and ident.alive():
                found.add(ident)
    return found


def _cmdline(proc: ProcessId) -> str:
    try:
        return Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_gone(procs: set[ProcessId], tag: str, limit_s: float) -> set[ProcessId]:
    """What is still alive of `procs` and of the tagged processes when all are gone or at the
    limit."""
    deadline = time.monotonic() + limit_s
    while True:
        alive = {p for p in procs if p.alive()} | _tagged(tag)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture
def tag() -> Iterator[str]:
    """A fresh tag; whatever still carries it at the end is stopped (the test failed)."""
    value = uuid.uuid4().hex
    yield value
    stop_processes(_tagged(value), 5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class DevSetup:
    root: Path
    ports: dict[str, int]
    env: dict[str, str]
    tag: str


@pytest.fixture(scope="module")
def dev_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevSetup]:
    """One services folder and set of ports for the module's `make dev` starts: each start
    after the first finds the services' data the one before left."""
    root = tmp_path_factory.mktemp("dev") / "local"
    ports = {name: free_port() for name in ("pg", "anvil", "sqs", "ui", "query")}
    tag = uuid.uuid4().hex
    env = {
        **os.environ,
        TAG: tag,
        "TRACE_PG_PORT": str(ports["pg"]),
        "TRACE_ANVIL_PORT": str(ports["anvil"]),
        "TRACE_SQS_PORT": str(ports["sqs"]),
    }
    yield DevSetup(root, ports, env, tag)
    stop_processes(_tagged(tag), 5)
    services = LocalServices(
        root, pg_port=ports["pg"], anvil_port=ports["anvil"], sqs_port=ports["sqs"]
    )
    services.down()


@pytest.mark.timeout(START_LIMIT_S + STOP_LIMIT_S + 60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dev_stops_everything(dev_setup: DevSetup, sig: signal.Signals) -> None:
    ports, tag = dev_setup.ports, dev_setup.tag
    log = dev_setup.root.parent / f"dev-{sig.name}.log"
    dev = (
        f"{sys.executable} -m infra.dev --root {dev_setup.root} --port {ports['ui']} "
        f"--query-port {ports['query']}"
    )
    # `&` in a non-interactive shell: the job starts with SIGINT ignored
    shell = subprocess.Popen(
        ["sh", "-c", f'{dev} >{log} 2>&1 & echo "$!"; wait "$!"; echo "exit=$?"'],
        cwd=REPO,
        env=dev_setup.env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert shell.stdout is not None
        pid = int(shell.stdout.readline())
        deadline = time.monotonic() + START_LIMIT_S
        while not (
            _answers(f"http://127.0.0.1:{ports['ui']}/server_info")
            and _answers(f"http://127.0.0.1:{ports['query']}/healthz")
        ):
            assert shell.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        started = set(descendants(pid)) | _tagged(tag)
        commands = " | ".join(_cmdline(p) for p in started)
        for part in (
            "dagster_webserver",
            "dagster._daemon",
            "dagster api grpc",  # the code server
            "uvicorn",
            "alert_pipeline.sink",
            "alert_pipeline.delivery",
            "trace_assets.head",
            "postgres",
            "anvil",
            "moto.server",
        ):
            assert part in commands, f"{part} not started: {commands}"

        os.kill(pid, sig)
        out, _ = shell.communicate(timeout=STOP_LIMIT_S)
        assert out.strip().splitlines()[-1] == "exit=0", log.read_text()[-3000:]
        left = _wait_gone(started, tag, 10)
        assert not left, [_cmdline(p) for p in left]
        assert f"[dev] {sig.name}: stopping" in log.read_text()
    finally:
        if shell.poll() is None:
            stop_processes(_tagged(tag), 5)
            shell.wait()
        if shell.stdout is not None:
            shell.stdout.close()


def test_killed_cli_backfill_stops_its_steps(
    devnet: Devnet,
    postgres: PostgresServer,
    test_settings: Settings,
    tmp_path: Path,
    tag: str,
) -> None:
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    db = f"dagster_stops_{os.getpid()}"
    postgres.psql(f'CREATE DATABASE "{db}" OWNER trace')
    # the third range's logs never come (each request held, then dropped): the backfill is
    # still extracting when it is killed, and would retry on for minutes if its step lived
    third = range(int(keys[2][:12]), int(keys[2][13:]) + 1)
    faults = [Fault("timeout", methods={"eth_getLogs"}, blocks=third, delay=1.0)]
    with FaultProxy(devnet.url, faults=faults) as proxy:
        env = {
            **os.environ,
            TAG: tag,
            "DAGSTER_HOME": str(home),
            **postgres.dagster_env(db),
            "TRACE_RPC_URL": proxy.url,
            "TRACE_RPC_RETRY_BUDGET_S": "600",
            "TRACE_RPC_MAX_ATTEMPTS": "1000",
            "TRACE_RANGE_SIZE": str(RANGE_SIZE),
            "TRACE_STATE_DSN": test_settings.state_dsn,
            "TRACE_OBJECT_STORE": "s3",
            "TRACE_S3_ENDPOINT_URL": test_settings.s3_endpoint_url or "",
            "TRACE_BUCKET_DATASETS": test_settings.bucket_datasets,
        }
        bin_dir = Path(sys.executable).parent
        sync = subprocess.run(
            [str(bin_dir / "trace"), "partitions", "sync"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sync.returncode == 0, sync.stderr
        log = tmp_path / "materialize.log"
        with log.open("w") as out:
            cli = subprocess.Popen(
                materialize_command("blocks,transactions,logs", keys[0], keys[-1]),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        engine = engine_for(test_settings.state_dsn)

        def staged() -> list[tuple[str, str, str]]:
            query = sa.select(
                tables.attempts.c.dataset,
                tables.attempts.c.partition_key,
                tables.attempts.c.state,
            ).order_by(tables.attempts.c.dataset, tables.attempts.c.partition_key)
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(query)]

        try:
            deadline = time.monotonic() + START_LIMIT_S
            while not (staged() and faults[0].injected):  # staging, and stuck on the third
                assert cli.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            running = set(descendants(cli.pid)) | _tagged(tag)
            cli.kill()
            cli.wait()
            left = _wait_gone(running, tag, STEP_STOP_LIMIT_S)
            assert not left, [_cmdline(p) for p in left]
            # nothing of the run is left to extract or stage
            attempts, requests = staged(), len(proxy.requests)
            time.sleep(2)
            assert staged() == attempts and len(proxy.requests) == requests
            assert {key for _, key, _ in attempts} < set(keys)  # it was killed half way
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
            engine.dispose()
