"""`make dev`: the local services plus the Dagster UI and daemon, and the query service beside
them, until interrupted.

The chain-head sensor (on by default) adds block ranges as the devnet's finalized head moves
and requests their runs; materialise and backfill from the UI at http://127.0.0.1:3000. The
query service (uvicorn) answers on http://127.0.0.1:8700 (docs at /docs); get a token with
`.venv/bin/trace token issue --org ORG --subject SUB`. The alert sink and deliverer and the head
follower run beside them: the devnet mines a block every `--block-time` seconds (0.3 by default,
like Monad) and the follower appends each finalized block to the open range within seconds.
Ctrl-C, SIGINT or SIGTERM (also when started from a script, with `&`, `nohup` or `timeout`,
whose background jobs ignore SIGINT) stops the workers (the sink drains the buffer), the query
service and Dagster (webserver, daemon, code server, run workers and their runs), then the
services, and exits 0. Every process started below this one is stopped: it is their subreaper
(orphans are re-parented to it, not to init), and what is left after the graceful stops gets
SIGTERM, then SIGKILL. Its children get SIGTERM if it is killed itself (`PR_SET_PDEATHSIG`);
the services then keep running, and the next `make dev` (or `make services-down`) takes them
over.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from infra.local.alert_workers import AlertWorkers
from infra.local.dagster_cli import dagster_dev_command
from infra.local.query_service import QueryServer
from infra.local.services import DEFAULT_ROOT, REPO_ROOT, LocalServices, Miner, ServiceError
from trace_resources.processes import (
    ProcessId,
    become_subreaper,
    descendants,
    die_with_parent,
    dies_with_this_process,
    stop_processes,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DAGSTER_STOP_TIMEOUT_S = 20.0  # its own graceful stop (webserver, daemon, code server)
LEFTOVER_STOP_TIMEOUT_S = 10.0  # runs cancelling, then SIGKILL


class Stop(BaseException):
    """A stop signal arrived (raised once, in the main thread)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM (and SIGHUP unless `nohup` ignores it) raise `Stop` once, until
    `stopping` is set; later ones are noted while the stop goes on.

    Handled rather than ignored, so the children started after this get their default
    dispositions back at exec: `dagster dev` and its webserver and daemon then stop on the
    interrupt they send themselves, which they would ignore when `make dev` was started in the
    background of a script (SIGINT ignored, inherited)."""

    def __init__(self) -> None:
        self.stopping = False
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: a closed terminal does not stop it
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:  # os.write: a print here could re-enter one under way
            os.write(1, f"[dev] {signal.Signals(signum).name}: already stopping\n".encode())
            return
        self.stopping = True
        raise Stop(signum)


def _subtrees(pids: list[int | None]) -> set[ProcessId]:
    found: set[ProcessId] = set()
    for pid in pids:
        if pid is None:
            continue
        ident = ProcessId.of(pid)
        if ident is not None:
            found.add(ident)
            found.update(descendants(pid))
    return found


def _stop_leftovers(services: LocalServices | None) -> None:
    """Stop every process still below us, but the services (stopped by `services.down`)."""
    keep = set()
    if services is not None:
        keep = _subtrees([services.postgres.pid, services.anvil.pid, services.sqs.pid])
    left = [p for p in descendants(os.getpid()) if p not in keep]
    if left:
        killed = stop_processes(left, LEFTOVER_STOP_TIMEOUT_S)
        print(
            f"[dev] stopped {len(left)} leftover process(es)"
            + (f", {len(killed)} with SIGKILL" if killed else ""),
            flush=True,
        )


def _stop_dagster(dagster: subprocess.Popen[bytes] | None) -> None:
    """Wait for `dagster dev` (sent SIGINT) to stop its webserver and daemon, which stop the
    code server and the run pool, whose runs get SIGTERM; past a timeout, SIGTERM everything
    below it, then SIGKILL."""
    if dagster is None or dagster.poll() is not None:
        return
    try:
        dagster.wait(timeout=DAGSTER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"[dev] Dagster did not stop in {DAGSTER_STOP_TIMEOUT_S:.0f} s: SIGTERM", flush=True)
        below = descendants(dagster.pid)
        stop_processes([p for p in [ProcessId.of(dagster.pid)] if p] + below, 5.0)
        dagster.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="local services folder")
    parser.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    parser.add_argument("--query-port", type=int, default=8700, help="query service port")
    parser.add_argument(
        "--block-time",
        type=float,
        default=0.3,
        help="devnet block time in seconds while dev runs (0: no new blocks)",
    )
    parser.add_argument(
        "--stop-with-parent",
        action="store_true",
        help="stop (as on SIGTERM) when the parent process exits: `make dev` passes it, as make "
        "exits on SIGTERM without passing it on",
    )
    args = parser.parse_args()
    signals = StopSignals()
    if args.stop_with_parent:
        die_with_parent(signal.SIGTERM, os.getppid())
    become_subreaper()
    services: LocalServices | None = None
    dagster: subprocess.Popen[bytes] | None = None
    query: QueryServer | None = None
    workers: AlertWorkers | None = None
    miner: Miner | None = None
    code = 0
    try:
        services = LocalServices(args.root)
        services.up()
        # the query service and the processes started here reload the UI's code location
        # when a transform is applied (`POST /v1/transforms`)
        env = {
            **os.environ,
            **services.env(),
            "TRACE_DAGSTER_URL": f"http://127.0.0.1:{args.port}",
        }
        command = dagster_dev_command(args.port)
        # first, as it takes longest to start (the others start meanwhile); its own process
        # group: Ctrl-C in the terminal reaches it once, through us
        dagster = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
            preexec_fn=dies_with_this_process(),  # SIGTERM: it stops as on Ctrl-C
        )
        query = QueryServer(env, args.query_port, log_file=args.root / "query-service.log")
        workers = AlertWorkers(env, args.root, with_follower=True)
        query.start()
        print(f"[dev] query service on {query.url} (docs: {query.url}/docs)", flush=True)
        workers.start()
        print(
            f"[dev] alert sink, deliverer and head follower running (logs in {workers.dir})",
            flush=True,
        )
        if args.block_time > 0:  # the chain moves: the follower appends, the sensor seals
            miner = Miner(services.anvil.url, args.block_time)
            miner.start()
        print(
            f"[dev] Dagster UI on http://127.0.0.1:{args.port} (pid {os.getpid()}; "
            "Ctrl-C or SIGTERM to stop)",
            flush=True,
        )
        code = dagster.wait()
        print(f"[dev] Dagster exited by itself with code {code}; stopping", flush=True)
        code = code or 1
    except Stop as stop:
        print(f"[dev] {stop}: stopping", flush=True)
    except ServiceError as error:
        print(f"[dev] error: {error}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signals.stopping = True  # a signal from now on does not cut the stop short
        if dagster is not None and dagster.poll() is None:
            dagster.send_signal(signal.SIGINT)  # stops while we stop the others
        if miner is not None:
            miner.stop()
        if workers is not None:
            workers.stop()  # the sink drains the buffer before the services stop
        if query is not None:
            query.stop()
        _stop_dagster(dagster)
        _stop_leftovers(services)  # runs, and anything a killed child left
        if services is not None:
            services.down()
        _stop_leftovers(None)
        print(
            "[dev] stopped the alert workers, the query service, Dagster and the local services",
            flush=True,
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
