"""`trace backfill`: a backfill launched on the running Dagster deployment, followed to its end
with a progress bar.

    trace backfill                                   # the raw datasets over every known range
    trace backfill --from 1000 --to 2999             # the ranges holding those blocks
    trace backfill --select erc20_transfers --from 000000001000-000000001249
    trace backfill --detach                          # launch, print the run's URL, return

The run is launched through the webserver's GraphQL API (`TRACE_DAGSTER_URL`, `make dev`'s
http://127.0.0.1:3000), as the UI launches a run of selected assets over a partition range: one
run over the ranges (the assets' single-run backfill policy), with their checks, visible in the
UI like any other. It takes the run coordinator's fast lane (`trace/fast_lane`): launched at
once, as a fork of the deployment's warm worker, when a run slot is free, instead of waiting for
the backfill daemon's and the queue's ticks; without a free slot it queues like any run.

This process imports neither Dagster nor the code location: it starts in well under a second
where `dagster asset materialize` spends ~5 s importing Dagster and opening the instance before
its run starts. The price is a running deployment; without one, the command says so and gives
the `dagster asset materialize` line that runs the same backfill in the shell.

It follows the run's events, pushed by the webserver over its GraphQL websocket (read with
queries every `--poll` seconds where no websocket is served): a progress bar of ranges committed
(the raw step logs one line per committed range), failed checks, and the failure's message if
the run fails (exit 1). Ctrl-C stops the run (its committed ranges stay committed; a re-run
resumes after them), unless `--detach` was given.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

from trace_assets.cli.errors import CliError, unknown
from trace_resources.settings import Settings

__all__ = ["add_commands", "cmd_backfill"]

RAW = ("blocks", "transactions", "logs")
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"  # what `make dev` serves
FAST_LANE_TAG = "trace/fast_lane"  # trace_resources.instance.run_coordinator (imports dagster)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
DONE = {"SUCCESS", "FAILURE", "CANCELED"}
_COMMITTED = re.compile(r"^range (\d+)/(\d+) (\S+) committed")
_RESUMED = re.compile(r"^(\d+) of (\d+) range\(s\) were committed by an earlier try")

ASSETS = """
query TraceBackfillAssets {
  assetNodes {
    assetKey { path }
    jobNames
    isPartitioned
    repository { name location { name } }
  }
}"""

PARTITIONS = """
query TraceBackfillPartitions($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode { partitionKeys }
  }
}"""

LAUNCH = """
mutation TraceBackfillLaunch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

_EVENT_FIELDS = """
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { pipelineFailureError: error { message } }
        ... on AssetCheckEvaluationEvent {
          evaluation { assetKey { path } checkName success }
        }"""

FOLLOW = (
    """
query TraceBackfillFollow($runId: ID!, $after: String) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
  }
  logsForRun(runId: $runId, afterCursor: $after) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {"""
    + _EVENT_FIELDS
    + """
      }
    }
  }
}"""
)

# the same events pushed over the webserver's GraphQL websocket as they are stored: following a
# run costs the webserver a database read per stored batch (Dagster's event watcher) instead of
# a GraphQL query per poll (~20 ms of its CPU each, measured), and the end is seen at once
SUBSCRIBE = (
    """
subscription TraceBackfillEvents($runId: ID!, $after: String) {
  pipelineRunLogs(runId: $runId, cursor: $after) {
    __typename
    ... on PipelineRunLogsSubscriptionSuccess {
      cursor
      messages {"""
    + _EVENT_FIELDS
    + """
      }
    }
    ... on PipelineRunLogsSubscriptionFailure { message }
  }
}"""
)

STATUS = """
query TraceBackfillStatus($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
}"""

_RUN_ENDED = {
    "RunSuccessEvent": "SUCCESS",
    "RunFailureEvent": "FAILURE",
    "RunCanceledEvent": "CANCELED",
}

TERMINATE = """
mutation TraceBackfillTerminate($runId: String!) {
  terminateRun(runId: $runId) { __typename ... on Error { message } }
}"""


@dataclass
class Followed:
    """What a run's events said so far."""

    status: str = "STARTING"
    committed: int = 0
    resumed: int = 0
    failures: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    checks: int = 0

    def end(self, status: str) -> None:
        self.status = status


def _has_valid_port(parts: SplitResult) -> bool:
    """No port, or a number in range (`SplitResult.port` raises on anything else)."""
    try:
        return parts.port is None or parts.port > 0
    except ValueError:
        return False


class Deployment:
    """The webserver's GraphQL endpoint, with errors an operator can act on."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not _has_valid_port(parts)
        ):
            raise CliError(
                f"TRACE_DAGSTER_URL={url!r} is not an http(s) URL; set it to the Dagster "
                "webserver, e.g. http://127.0.0.1:3000 (what `make dev` serves)"
            )
        self._parts = parts
        self._timeout_s = timeout_s
        self._http: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def _connection(self) -> http.client.HTTPConnection:
        # the standard library's client: the command's ~6 GraphQL calls need no more, and
        # importing httpx and building its TLS context (even for http://) took 0.4 s of the
        # command's start, before its run was launched
        if self._http is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._parts.scheme == "https":
                self._http = http.client.HTTPSConnection(host, port, timeout=self._timeout_s)
            else:
                self._http = http.client.HTTPConnection(host, port, timeout=self._timeout_s)
        return self._http

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST on the kept-alive connection; once more on a new one if the server had closed
        it (an idle keep-alive connection may be closed between two calls). Only a reused
        connection is retried: on a new one the failure is the server's, and a mutation (the
        launch) is never sent twice for it."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        target = (self._parts.path.rstrip("/") or "") + path
        while True:
            connection = self._connection()
            reused = connection.sock is not None
            try:
                connection.request("POST", target, body, headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused:
                    raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise

    def stream_events(
        self,
        run_id: str,
        on_event: Callable[[dict[str, Any]], None],
        on_end: Callable[[str], None],
        idle_s: float = 1.0,
        stop: Callable[[], bool] = lambda: False,
    ) -> str | None:
        """Hand the run's events to `on_event` as the webserver pushes them (GraphQL over its
        websocket), until the run's end event (its status to `on_end`); return the cursor after
        the last event handled; or as soon as `stop()` is true (checked at least every
        `idle_s`).

        Returns early (with the cursor reached, None before any event) when the webserver
        serves no websocket or the connection breaks: the caller reads the rest with queries.
        While no event comes for `idle_s`, the run's status is read: the webserver reads new
        events at a cadence that backs off to 16 s while a run is quiet (Dagster's
        `SqlPollingEventWatcher`), and a run killed with its process may end with no event.
        """
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect
        from websockets.typing import Subprotocol

        url = re.sub(r"^http", "ws", self.url) + "/graphql"
        cursor: str | None = None
        try:
            with connect(
                url, subprotocols=[Subprotocol("graphql-ws")], open_timeout=5, max_size=2**24
            ) as socket:
                socket.send(json.dumps({"type": "connection_init", "payload": {}}))
                if json.loads(socket.recv(timeout=5)).get("type") != "connection_ack":
                    return None
                variables = {"runId": run_id, "after": None}
                payload = {"query": SUBSCRIBE, "variables": variables}
                socket.send(json.dumps({"id": "1", "type": "start", "payload": payload}))
                while not stop():
                    try:
                        message = json.loads(socket.recv(timeout=idle_s))
                    except TimeoutError:
                        if stop():
                            break
                        status = self.graphql(STATUS, {"runId": run_id})["runOrError"]
                        if status.get("status") in DONE or status["__typename"] != "Run":
                            return cursor
                        continue
                    if message.get("type") != "data":
                        return cursor  # an error, or the subscription completed
                    logs = (message.get("payload", {}).get("data") or {}).get("pipelineRunLogs")
                    if not logs or logs["__typename"] != "PipelineRunLogsSubscriptionSuccess":
                        return cursor
                    for event in logs["messages"]:
                        on_event(event)
                    cursor = logs["cursor"]
                    if ended := [e for e in logs["messages"] if e["__typename"] in _RUN_ENDED]:
                        on_end(_RUN_ENDED[ended[-1]["__typename"]])
                        return cursor
        except (OSError, WebSocketException, ValueError, KeyError, TypeError):
            return cursor
        return cursor

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        request = json.dumps({"query": query, "variables": variables}).encode()
        try:
            status, content = self._post("/graphql", request)
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(
                f"no Dagster webserver answers at {self.url} (TRACE_DAGSTER_URL): "
                f"{exc or type(exc).__name__}; start the deployment with `make dev`, or run the "
                "backfill in this shell with `dagster asset materialize` (see `trace backfill "
                "--help`)"
            ) from None
        if status != 200:
            raise CliError(
                f"{self.url}/graphql answered HTTP {status}: is TRACE_DAGSTER_URL "
                "the Dagster webserver (`make dev` serves it at http://127.0.0.1:3000)?"
            )
        try:
            body = json.loads(content)
        except ValueError:
            raise CliError(
                f"{self.url}/graphql did not answer JSON: is TRACE_DAGSTER_URL the Dagster "
                "webserver?"
            ) from None
        if body.get("errors"):
            first = body["errors"][0].get("message", body["errors"][0])
            raise CliError(
                f"{self.url}/graphql refused Trace's query ({first}): is TRACE_DAGSTER_URL a "
                "Dagster webserver of the version Trace pins (dagster 1.13)?"
            )
        return dict(body["data"])


@dataclass(frozen=True)
class Selection:
    datasets: list[str]
    location: str
    repository: str
    job: str
    keys: list[str]


def _select(
    deployment: Deployment, names: list[str], first: str | None, last: str | None
) -> Selection:
    nodes = deployment.graphql(ASSETS)["assetNodes"]
    by_name = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    if not by_name:
        raise CliError(
            f"the deployment at {deployment.url} has no assets loaded: open Deployment in the UI "
            "to see why the code location did not load"
        )
    for name in names:
        if name not in by_name:
            raise unknown("dataset", name, by_name, where=f"in the deployment at {deployment.url}")
    chosen = [by_name[n] for n in names]
    unpartitioned = [n for n, node in zip(names, chosen, strict=True) if not node["isPartitioned"]]
    if unpartitioned:
        raise CliError(
            f"{', '.join(unpartitioned)} {'is' if len(unpartitioned) == 1 else 'are'} not "
            "partitioned by block range: materialise it from the UI, or with `dagster asset "
            "materialize -m trace_assets.definitions --select NAME`"
        )
    repositories = {(n["repository"]["location"]["name"], n["repository"]["name"]) for n in chosen}
    jobs = set.intersection(*(set(n["jobNames"]) for n in chosen))
    asset_jobs = sorted(j for j in jobs if j.startswith("__ASSET_JOB"))
    if len(repositories) != 1 or not asset_jobs:
        raise CliError(
            f"{', '.join(names)} cannot run together in one run (different code locations or "
            "partitionings): backfill them one at a time"
        )
    [(location, repository)] = repositories
    partitions = deployment.graphql(PARTITIONS, {"key": {"path": [names[0]]}})
    keys = list(partitions["assetNodeOrError"].get("partitionKeys") or [])  # Dagster's order
    if not keys:
        raise CliError(
            "the deployment knows no block ranges yet: add the finalized ones with `trace "
            "partitions sync` (the chain-head sensor adds them as the chain finalizes)"
        )
    window = _window(keys, first, last)
    return Selection(names, location, repository, asset_jobs[0], window)


def _bound(value: str, keys: list[str], *, end: bool) -> int:
    """A block number, or the first (last) block of a range given by its partition key."""
    from trace_resources.chain.ranges import parse_partition_key

    if value.isdigit():
        return int(value)
    if value in keys:
        block_range = parse_partition_key(value)
        return block_range.last if end else block_range.start
    raise CliError(
        f"{'--to' if end else '--from'} {value!r} is neither a block number nor a known range "
        f"(ranges: {keys[0]} .. {keys[-1]}, {len(keys)} in all)"
    )


def _window(keys: list[str], first: str | None, last: str | None) -> list[str]:
    """The ranges holding the blocks `first`..`last`, as one span of `keys` (the deployment's
    order of its ranges: a run's partition range is a span of that order)."""
    from trace_resources.chain.ranges import parse_partition_key

    ordered = sorted(keys)
    low = _bound(first, ordered, end=False) if first is not None else 0
    high = _bound(last, ordered, end=True) if last is not None else None
    if high is not None and high < low:
        raise CliError(f"--to {last} is before --from {first}: swap them")
    inside = []
    for index, key in enumerate(keys):
        block_range = parse_partition_key(key)
        if block_range.last >= low and (high is None or block_range.start <= high):
            inside.append(index)
    if not inside:
        raise CliError(
            f"no known range holds blocks {low}..{'' if high is None else high} (ranges: "
            f"{ordered[0]} .. {ordered[-1]}); `trace partitions sync` adds newly finalized ones"
        )
    span = keys[inside[0] : inside[-1] + 1]
    if len(span) != len(inside):
        # Dagster orders dynamic partitions as they were added: a range added late (from the
        # UI, or by a sync after a gap) sits after later ones, and a run over a span would
        # take ranges outside the blocks asked for
        strays = [k for k in span if k not in {keys[i] for i in inside}]
        raise CliError(
            f"the deployment's ranges for blocks {low}..{'' if high is None else high} are not "
            f"in block order (it lists {strays[0]} among them): backfill them from the UI "
            "(Materialize, then the ranges), which runs any set of ranges, or narrow "
            "--from/--to"
        )
    return span


def _launch(deployment: Deployment, selection: Selection) -> str:
    tags = {
        RANGE_START_TAG: selection.keys[0],
        RANGE_END_TAG: selection.keys[-1],
        FAST_LANE_TAG: "true",
        "trace/launched_by": "trace backfill",
    }
    params = {
        "selector": {
            "repositoryLocationName": selection.location,
            "repositoryName": selection.repository,
            "jobName": selection.job,
            "assetSelection": [{"path": [name]} for name in selection.datasets],
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = deployment.graphql(LAUNCH, {"params": params})["launchRun"]
    if launched["__typename"] == "LaunchRunSuccess":
        return str(launched["run"]["runId"])
    reason = launched.get("message") or "; ".join(
        e["message"] for e in launched.get("errors") or []
    )
    raise CliError(f"the deployment refused the run ({launched['__typename']}): {reason}")


def _follow(
    deployment: Deployment,
    run_id: str,
    total: int,
    poll_s: float,
    stop: Callable[[], bool] = lambda: False,
) -> Followed:
    """Follow the run's events to its end: pushed over the webserver's websocket while it
    serves one, then read with queries (what is left, and the run's final status). Returns
    early, the status unknown, once `stop()` is true."""
    from trace_assets.cli.console import progress

    seen = Followed()
    with progress("ranges committed", total) as bar:
        cursor = deployment.stream_events(
            run_id, lambda event: _read_event(event, seen, bar), seen.end, stop=stop
        )
        ended = seen.status if seen.status in DONE else None
        while not stop():
            data = deployment.graphql(FOLLOW, {"runId": run_id, "after": cursor})
            run = data["runOrError"]
            if run["__typename"] != "Run":
                raise CliError(f"run {run_id} is gone from the deployment ({run['__typename']})")
            logs = data["logsForRun"]
            if logs["__typename"] == "EventConnection":
                cursor = logs["cursor"]
                for event in logs["events"]:
                    _read_event(event, seen, bar)
                if logs["hasMore"]:
                    continue
            if ended is not None:  # its end event was pushed (its status may lag a moment)
                seen.status = ended
                return seen
            # the status is read with the events: events written before it ended are in
            if run["status"] in DONE:
                seen.status = run["status"]
                return seen
            time.sleep(poll_s)
    return seen


def _read_event(event: dict[str, Any], seen: Followed, bar: Any) -> None:
    kind = event["__typename"]
    message = event.get("message") or ""
    if kind == "ExecutionStepFailureEvent":
        error = (event.get("error") or {}).get("message") or message
        seen.failures.append(error.strip().splitlines()[0] if error.strip() else message)
    elif kind == "RunFailureEvent":
        error = (event.get("pipelineFailureError") or {}).get("message")
        if error and not seen.failures:
            seen.failures.append(error.strip().splitlines()[0])
    elif kind == "AssetCheckEvaluationEvent":
        evaluation = event["evaluation"]
        seen.checks += 1
        if not evaluation["success"]:
            asset = "/".join(evaluation["assetKey"]["path"])
            seen.failed_checks.append(f"{asset}.{evaluation['checkName']}")
    elif match := _COMMITTED.match(message):
        seen.committed += 1
        bar.advance(match.group(3))
    elif match := _RESUMED.match(message):
        for _ in range(int(match.group(1))):
            seen.resumed += 1
            bar.advance("(committed by an earlier try)")


@contextlib.contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) while following a run sets the event: the follow loop sees it within a
    second and returns, and the command stops the run. No KeyboardInterrupt is raised inside
    the websocket or HTTP client, where it could leave a lock held and hang the command. A
    second Ctrl-C raises KeyboardInterrupt at once (caught here: the run is still stopped)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        try:  # signal handlers belong to the main thread: here Ctrl-C is a KeyboardInterrupt
            yield interrupted
        except KeyboardInterrupt:
            interrupted.set()
        return

    def on_sigint(signum: int, frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    except KeyboardInterrupt:
        interrupted.set()
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.select.split(",") if n.strip()]
    if not names:
        raise CliError("--select names no dataset; e.g. --select blocks,transactions,logs")
    deployment = Deployment(args.dagster_url or settings.dagster_url or DEFAULT_DAGSTER_URL)
    try:
        started = time.monotonic()
        selection = _select(deployment, names, args.start, args.end)
        try:
            run_id = _launch(deployment, selection)
        except KeyboardInterrupt:
            sys.stderr.write(
                "trace: interrupted while launching: if a run was launched, it shows in the "
                f"UI's Runs page ({deployment.url}/runs); stop it there\n"
            )
            return 130
        url = f"{deployment.url}/runs/{run_id}"
        span = f"{selection.keys[0]} .. {selection.keys[-1]}"
        sys.stderr.write(
            f"launched run {run_id}: {', '.join(names)} over {len(selection.keys)} range(s) "
            f"{span}\n  {url}\n"
        )
        if args.detach:
            sys.stdout.write(f"{run_id}\n")
            return 0
        with _ctrl_c() as interrupted:
            seen = _follow(deployment, run_id, len(selection.keys), args.poll, interrupted.is_set)
        if interrupted.is_set():
            try:
                stopped = deployment.graphql(TERMINATE, {"runId": run_id})["terminateRun"]
            except CliError as exc:
                stopped = {"__typename": "unreachable", "message": str(exc)}
            how = (
                "is stopping"
                if stopped["__typename"] == "TerminateRunSuccess"
                else f"was not stopped ({stopped.get('message') or stopped['__typename']})"
            )
            sys.stderr.write(
                f"trace: interrupted; run {run_id} {how}. Ranges it committed stay committed; "
                "`trace backfill` again resumes after them\n"
            )
            return 130
    finally:
        deployment.close()
    seconds = time.monotonic() - started
    if seen.status != "SUCCESS":
        why = seen.failures[-1] if seen.failures else "see the run's log"
        sys.stderr.write(
            f"trace: run {run_id} ended {seen.status} after {seconds:.1f} s: {why}\n  {url}\n"
        )
        return 1
    checks = (
        f"; {len(seen.failed_checks)} of {seen.checks} check(s) failed: "
        f"{', '.join(seen.failed_checks)}"
        if seen.failed_checks
        else f"; {seen.checks} check(s) passed"
    )
    resumed = f" ({seen.resumed} already committed)" if seen.resumed else ""
    sys.stdout.write(
        f"backfilled {', '.join(names)} over {len(selection.keys)} range(s) {span}{resumed} "
        f"in {seconds:.1f} s{checks}\n"
    )
    return 0


EPILOG = """Without a running deployment, the same backfill runs in this shell (slower to start:
it imports Dagster and the code location first):
  dagster asset materialize -m trace_assets.definitions --select blocks,transactions,logs \\
    --partition-range FIRST...LAST"""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "backfill",
        help="launch a backfill of block ranges on the running Dagster deployment and follow it",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--select",
        default=",".join(RAW),
        help="datasets to materialise, comma-separated (default: the raw datasets)",
    )
    parser.add_argument(
        "--from",
        dest="start",
        metavar="BLOCK|RANGE",
        help="first block (or range key) to backfill (default: the first known range)",
    )
    parser.add_argument(
        "--to",
        dest="end",
        metavar="BLOCK|RANGE",
        help="last block (or range key) to backfill (default: the last known range)",
    )
    parser.add_argument(
        "--dagster-url",
        help="the Dagster webserver (default: TRACE_DAGSTER_URL, http://127.0.0.1:3000)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="print the run id once launched and return, without following the run",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="seconds between reads of the run's progress when the webserver does not push "
        "its events over a websocket (default 0.25)",
    )
    parser.set_defaults(func=cmd_backfill)
