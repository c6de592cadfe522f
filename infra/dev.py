"""`make dev`: the local services plus the Dagster UI and daemon, and the query service beside
them, until interrupted.

The chain-head sensor (on by default) adds block ranges as the devnet's finalized head moves
and requests their runs; materialise and backfill from the UI at http://127.0.0.1:3000. The
query service (uvicorn) answers on http://127.0.0.1:8700 (docs at /docs); get a token with
`.venv/bin/trace token issue --org ORG --subject SUB`. The alert sink and deliverer and the head
follower run beside them: the devnet mines a block every `--block-time` seconds (0.3 by default,
like Monad) and the follower appends each finalized block to the open range within seconds.
Ctrl-C stops the workers (the sink drains the buffer), the query service and Dagster, then the
services.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from infra.local.alert_workers import AlertWorkers
from infra.local.query_service import QueryServer
from infra.local.services import DEFAULT_ROOT, REPO_ROOT, LocalServices, Miner


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
    args = parser.parse_args()
    services = LocalServices(args.root)
    services.up()
    env = {**os.environ, **services.env()}
    dagster = None
    query = QueryServer(env, args.query_port, log_file=args.root / "query-service.log")
    workers = AlertWorkers(env, args.root, with_follower=True)
    miner = Miner(services.anvil.url, args.block_time) if args.block_time > 0 else None
    try:
        query.start()
        print(f"[dev] query service on {query.url} (docs: {query.url}/docs)", flush=True)
        workers.start()
        if miner is not None:  # the chain moves: the follower appends, the sensor seals
            miner.start()
        print(
            f"[dev] alert sink, deliverer and head follower running (logs in {workers.dir})",
            flush=True,
        )
        command = [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(args.port),
        ]
        print(f"[dev] Dagster UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
        # its own process group: Ctrl-C reaches it once, through us, and we wait for it
        dagster = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)
        dagster.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if miner is not None:
            miner.stop()
        workers.stop()  # the sink drains the buffer before the services stop
        query.stop()
        if dagster is not None and dagster.poll() is None:
            os.killpg(dagster.pid, signal.SIGINT)
            try:
                dagster.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(dagster.pid, signal.SIGKILL)
                dagster.wait()
        services.down()
        print(
            "[dev] stopped the alert workers, the query service, Dagster and the local services",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
