"""The UI path of `make bench-ingest`: a backfill launched as the Dagster UI launches it.

`dagster dev` (webserver, daemon, code server) is started as `make dev` starts it, on the
deployment's instance configuration (dagster_home/dagster.yaml: warm run launcher, Trace's
run coordinator) and the benchmark's PostgreSQL; the backfill is submitted with the UI's own
GraphQL mutation (`launchPartitionBackfill`, the selector the asset page's "Materialize"
dialog sends for several assets over several partitions) and timed from the submission to
the backfill's completion, polled through GraphQL as the UI's backfill page polls it.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx

from infra.local.dagster_cli import dagster_dev_command
from infra.local.services import REPO_ROOT, PostgresServer, free_port

LAUNCH = """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status timestamp endTimestamp runs(limit: 50) { runId status } } } }"""
LOCATIONS = """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
DAEMONS = """{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"""
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
READY_TIMEOUT_S = 180.0
BACKFILL_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def _say(message: str) -> None:
    print(f"[bench-ingest] {message}", flush=True)


@dataclass
class Breakdown:
    """Where one UI backfill's time went, from the run's event timestamps (seconds)."""

    total: float
    to_run_created: float  # submit -> the backfill daemon's tick created the run (queued)
    queued: float  # created -> dequeued and launched by the run queue's daemon (STARTING)
    launch: float  # launched -> the run's process started (warm-worker fork)
    to_step: float  # run start -> step start (resources, plan)
    step: float  # the raw step: extract, verify, commit, checks
    run_end: float  # step end -> run success
    to_completed: float  # run success -> the backfill daemon marked the backfill completed

    def line(self, direct: bool = False) -> str:
        """`direct`: a run launched by a command (`run_breakdown`), not a backfill."""
        first, end = (
            ("command start->run created", "run end->command exit")
            if direct
            else ("submit->run created", "run end->backfill completed")
        )
        return (
            f"{first} {self.to_run_created:.2f} s, queued {self.queued:.2f} s, "
            f"launch {self.launch:.2f} s, start->step {self.to_step:.2f} s, "
            f"step {self.step:.2f} s, step->run end {self.run_end:.2f} s, "
            f"{end} {self.to_completed:.2f} s"
        )

    @staticmethod
    def median(items: list[Breakdown]) -> Breakdown:
        fields = Breakdown.__dataclass_fields__
        return Breakdown(
            **{name: statistics.median(getattr(b, name) for b in items) for name in fields}
        )


_DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _group_processes(group: int) -> list[str]:
    """`pid state command` of every live process in the process group (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != group:  # pgrp
                continue
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        found.append(f"{stat.parent.name} {fields[0]} {command[:160]}")
    return found


class DagsterDev:
    """`dagster dev` with the deployment's dagster.yaml on the benchmark's services, in its own
    process group; stopped with SIGINT (its own graceful stop), then SIGKILL."""

    def __init__(self, env: dict[str, str], pg: PostgresServer, work: Path) -> None:
        self.home = work / "dagster_home_ui"
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", self.home / "dagster.yaml")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "dagster-dev.log"
        self.env = {
            **env,
            "DAGSTER_HOME": str(self.home),
            **pg.dagster_env(),
            # the benchmark drives the backfill; the sensors' runs would compete with it
            "TRACE_SENSORS_RUNNING": "false",
            # a stop that hangs is diagnosed with SIGABRT: every process prints its threads' stacks
            "PYTHONFAULTHANDLER": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> DagsterDev:
        # SIGINT back to its default for `dagster dev`: an ignored SIGINT is inherited across
        # exec, and a `dagster dev` started by a process that ignores it never stops on it
        # (its services did: it was the parent that went on waiting, measured with stacks)
        command = [sys.executable, "-c", _DEFAULT_SIGINT_EXEC, *dagster_dev_command(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env,
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.client.close()
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stuck = (
                f"dagster dev did not stop in {STOP_TIMEOUT_S:.0f} s: SIGKILL; still running: "
                + "; ".join(_group_processes(process.pid))
            )
            os.killpg(process.pid, signal.SIGABRT)  # their stacks to the log (faulthandler)
            time.sleep(2)
            _say(stuck)
            # kept where a passing test run leaves it too (pytest shows only failures' output)
            record = REPO_ROOT / ".local" / "dagster-dev-slow-stops.log"
            record.parent.mkdir(parents=True, exist_ok=True)
            with record.open("a") as out:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                out.write(f"{stamp} {stuck}\n{self._log_tail(60_000)}\n")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # what a killed run or code server left in the group
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.client.post("/graphql", json={"query": query, "variables": variables or {}})
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL error: {body['errors']}")
        return dict(body["data"])

    def _log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _wait_ready(self) -> None:
        """Until the webserver answers, the code location is loaded and every daemon is
        healthy (the backfill and run-queue daemons have ticked)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        started = time.monotonic()
        stage = "webserver"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SystemExit(
                    f"dagster dev exited ({self.process.returncode}):\n" + self._log_tail()
                )
            try:
                if stage == "webserver":
                    if self.client.get("/server_info", timeout=2).status_code == 200:
                        stage = "location"
                if stage == "location":
                    entries = self.graphql(LOCATIONS)["workspaceOrError"]["locationEntries"]
                    trace = [e for e in entries if e["name"] == "trace"]
                    if trace and trace[0]["loadStatus"] == "LOADED":
                        loaded = trace[0]["locationOrLoadError"]
                        if loaded["__typename"] != "RepositoryLocation":
                            raise SystemExit(f"the code location did not load: {loaded}")
                        stage = "daemons"
                if stage == "daemons":
                    statuses = self.graphql(DAEMONS)["instance"]["daemonHealth"][
                        "allDaemonStatuses"
                    ]
                    if statuses and all(s["healthy"] for s in statuses):
                        _say(f"dagster dev ready in {time.monotonic() - started:.1f} s")
                        return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"dagster dev not ready ({stage}) in {READY_TIMEOUT_S:.0f} s:\n"
                    + self._log_tail()
                )
            time.sleep(0.5)

    def backfill(self, keys: list[str], assets: list[str], poll_s: float = 0.2) -> str:
        """Submit the backfill as the UI does; return its id once it completed successfully."""
        params = {  # LaunchAssetChoosePartitionsDialog's selector for an asset-job selection
            "tags": [],
            "assetSelection": [{"path": [name]} for name in assets],
            "partitionNames": keys,
            "fromFailure": False,
        }
        launched = self.graphql(LAUNCH, {"p": params})["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise SystemExit(f"the UI backfill was refused: {launched}")
        backfill_id = str(launched["backfillId"])
        deadline = time.monotonic() + BACKFILL_TIMEOUT_S
        while True:
            status = self.graphql(STATUS, {"id": backfill_id})["partitionBackfillOrError"]
            if status["status"] in DONE:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the UI backfill did not complete: {status}")
            time.sleep(poll_s)
        if status["status"] != "COMPLETED_SUCCESS":
            raise SystemExit(f"the UI backfill ended {status['status']}: {status['runs']}")
        return backfill_id


def breakdown(
    instance: dg.DagsterInstance, backfill_id: str, submitted: float, completed: float
) -> Breakdown:
    """The backfill's phases from its run's events (one run: a single-run backfill)."""
    backfill = instance.get_backfill(backfill_id)
    assert backfill is not None
    runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    if len(runs) != 1:
        raise SystemExit(f"the UI backfill made {len(runs)} runs, expected one (single run)")
    [run] = runs
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for entry in instance.all_logs(run.run_id):
        if entry.dagster_event is None:
            continue
        name = entry.dagster_event.event_type_value
        first.setdefault(name, entry.timestamp)
        last[name] = entry.timestamp

    def at(name: str, events: dict[str, float] = first) -> float:
        if name not in events:
            raise SystemExit(f"run {run.run_id} has no {name} event: {sorted(first)}")
        return events[name]

    completed_at = backfill.backfill_end_timestamp or completed
    created = at("PIPELINE_ENQUEUED")
    return Breakdown(
        total=completed - submitted,
        to_run_created=created - backfill.backfill_timestamp,
        queued=at("PIPELINE_STARTING") - created,
        launch=at("PIPELINE_START") - at("PIPELINE_STARTING"),
        to_step=at("STEP_START") - at("PIPELINE_START"),
        step=at("STEP_SUCCESS", last) - at("STEP_START"),
        run_end=at("PIPELINE_SUCCESS") - at("STEP_SUCCESS", last),
        to_completed=completed_at - at("PIPELINE_SUCCESS"),
    )


def run_breakdown(
    instance: dg.DagsterInstance, run_id: str, submitted: float, completed: float
) -> Breakdown:
    """A run launched directly (`trace backfill`): `to_run_created` is from the command's start
    to the run's creation, `to_completed` from the run's success to the command's exit."""
    record = instance.get_run_record_by_id(run_id)
    assert record is not None and record.create_timestamp is not None
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is not None:
            first.setdefault(entry.dagster_event.event_type_value, entry.timestamp)
            last[entry.dagster_event.event_type_value] = entry.timestamp
    created = record.create_timestamp.timestamp()
    return Breakdown(
        total=completed - submitted,
        to_run_created=created - submitted,
        queued=first["PIPELINE_STARTING"] - created,
        launch=first["PIPELINE_START"] - first["PIPELINE_STARTING"],
        to_step=first["STEP_START"] - first["PIPELINE_START"],
        step=last["STEP_SUCCESS"] - first["STEP_START"],
        run_end=first["PIPELINE_SUCCESS"] - last["STEP_SUCCESS"],
        to_completed=completed - first["PIPELINE_SUCCESS"],
    )


def time_ui(
    dev: DagsterDev, instance: dg.DagsterInstance, keys: list[str], assets: list[str]
) -> tuple[float, Breakdown]:
    started_wall = time.time()
    started = time.perf_counter()
    backfill_id = dev.backfill(keys, assets)
    seconds = time.perf_counter() - started
    return seconds, breakdown(instance, backfill_id, started_wall, started_wall + seconds)
