"""`make bench-alerts`: latency from a block becoming finalized on the devnet to its alert
reaching a webhook receiver, through the deployment path; and the sink's throughput.

Latency (issue 14, the head path): the harness of `infra/bench/freshness.py` (one run serves
both figures; see its docstring): anvil mining every 0.3 s under 400 tx/s of load, the head
follower process with production ranges of 10,000 blocks, the sink and deliverer, a webhook
receiver, the query service (the rule is created through it), and the Dagster daemon with the
chain-head sensor as in production (it seals nothing: no range completes during the run).
At least 300 alerting blocks (one native transfer to the watched address each); a block's
latency runs from `load.finalized_seen_at(block)` to its alert's first arrival.

`--sealed-path [flags]` runs the former benchmark of the sealed tier instead (issues 6-13:
ranges of 5 one-second blocks mined by the benchmark, alerts from the chain-head sensor's runs).

Sink throughput: `--sink-messages` alerts pushed to their own queue, then the sink process
started; from its `ready` line until every row is in Postgres.

Last line: `alerts: p50_s=<> p99_s=<> n=<> range_size=<> sink_msgs_per_s=<>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from dagster._core.events import DagsterEventType
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from infra.local.alert_workers import AlertWorkers
from infra.local.services import (
    REPO_ROOT,
    TRACE_SCHEMAS,
    AnvilNode,
    MotoS3Server,
    PostgresServer,
    free_port,
)
from infra.local.webhook_receiver import WebhookReceiver
from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.queue import BufferMessage, SqsBuffer
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule

CHAIN_ID = 10143
FINALITY_LAG = 64  # anvil: finalized = latest - 64
WATCHED = "0x" + "ab" * 20
SECRET = "bench-webhook-secret-0123456789abcdef"
QUEUE = "trace-alerts"


def _say(message: str) -> None:
    print(f"[bench-alerts] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


# -- sink throughput -----------------------------------------------------------------------


def sink_throughput(env: dict[str, str], pg: PostgresServer, n: int, work: Path) -> float:
    """Alerts per second the sink process moves from the buffer into Postgres."""
    pg.ensure_databases(("bench_sink",))
    pg.migrate({"bench_sink": "data"})
    dsn = pg.dsn("bench_sink")
    engine = t.data_engine(dsn)
    buffer = SqsBuffer("bench-sink", endpoint_url=env["TRACE_SQS_ENDPOINT_URL"])
    destination = {"org": "bench", "rule_id": "r", "rule_version": 1, "channels": ["hook"]}
    messages = [
        BufferMessage(f"sink-{i:07d}", {"type": "alert", "n": i, "text": f"alert {i}"}, destination)
        for i in range(n)
    ]
    for start in range(0, n, 250):  # as evaluations of successive ranges publish
        buffer.send(messages[start : start + 250])
    depth = buffer.approximate_depth()
    log = work / "sink-throughput.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trace_resources.alert_pipeline.sink", "--queue", "bench-sink"],
            env={**env, "TRACE_DATA_DSN": dsn},
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while "sink ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"the sink exited: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        started = time.perf_counter()
        while _count(engine, "SELECT count(*) FROM trace_alerts") < n:
            if time.perf_counter() - started > 600:
                raise RuntimeError("the sink did not drain the buffer in 10 minutes")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    engine.dispose()
    _say(
        f"sink: {n} alerts in {depth} SQS messages drained into Postgres in {seconds:.2f} s "
        f"({n / seconds:.0f} alerts/s)"
    )
    return n / seconds


def _count(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


# -- the Dagster daemon --------------------------------------------------------------------


@contextlib.contextmanager
def dagster_daemon(env: dict[str, str], home: Path, dequeue_s: int | None) -> Iterator[Path]:
    """`dagster-daemon run` on the repository's dagster.yaml, in its own process group."""
    home.mkdir(parents=True, exist_ok=True)
    config = (REPO_ROOT / "dagster_home" / "dagster.yaml").read_text()
    if dequeue_s is not None:
        config = re.sub(
            r"(?m)^    dequeue_interval_seconds: .*$",
            f"    dequeue_interval_seconds: {dequeue_s}",
            config,
        )
    (home / "dagster.yaml").write_text(config)
    log = home / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", "workspace.yaml"],
            env={**env, "DAGSTER_HOME": str(home)},
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        # the daemon, its code server and any run worker share its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers (a run worker mid-step)


# -- the chain -----------------------------------------------------------------------------


@dataclass
class Chain:
    node: AnvilNode
    sender: str = ""
    mined_at: dict[int, float] = field(default_factory=dict)
    finalized_at: dict[int, float] = field(default_factory=dict)
    finalized: int = -1

    def start(self) -> None:
        self.node.rpc("evm_setAutomine", [False])
        self.sender = self.node.rpc("eth_accounts")[0]
        self._note_finalized()

    def transfer(self, value_wei: int) -> None:
        self.node.rpc(
            "eth_sendTransaction",
            [{"from": self.sender, "to": WATCHED, "value": hex(value_wei), "gas": hex(21000)}],
        )

    def mine(self) -> int:
        self.node.rpc("evm_mine")
        now = time.time()
        number = int(self.node.rpc("eth_blockNumber"), 16)
        self.mined_at[number] = now
        self._note_finalized()
        return number

    def _note_finalized(self) -> None:
        block = self.node.rpc("eth_getBlockByNumber", ["finalized", False])
        finalized = int(block["number"], 16)
        now = time.time()
        for number in range(self.finalized + 1, finalized + 1):
            self.finalized_at[number] = now
        self.finalized = max(self.finalized, finalized)


# -- the benchmark -------------------------------------------------------------------------


def block_of(alert: dict[str, object]) -> int:
    row = alert.get("row")
    assert isinstance(row, dict), alert
    return int(row["block_number"])


@dataclass(frozen=True, order=True)
class RunTiming:
    created: float  # the sensor's tick requested it
    launched: float  # the queued run coordinator dequeued and launched it
    started: float  # its run worker began executing
    ended: float


def run_times(home: Path, range_size: int) -> tuple[dict[int, RunTiming], dict[str, list[float]]]:
    """First block of each range -> timing of the first successful run that materialised it;
    and the duration of each step, by step."""
    instance = dg.DagsterInstance.from_config(str(home))
    out: dict[int, RunTiming] = {}
    steps: dict[str, list[float]] = {}
    try:
        for record in instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS])
        ):
            run = record.dagster_run
            tags = run.tags
            first = tags.get(ASSET_PARTITION_RANGE_START_TAG) or tags.get(PARTITION_NAME_TAG)
            last = tags.get(ASSET_PARTITION_RANGE_END_TAG) or first
            if not first or record.start_time is None or record.end_time is None:
                continue
            launched = record.start_time
            begun: dict[str, float] = {}
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event is None:
                    continue
                if event.event_type == DagsterEventType.RUN_STARTING:
                    launched = entry.timestamp
                elif event.event_type == DagsterEventType.STEP_START and event.step_key:
                    begun[event.step_key] = entry.timestamp
                elif event.event_type == DagsterEventType.STEP_SUCCESS and event.step_key:
                    if event.step_key in begun:
                        steps.setdefault(event.step_key, []).append(
                            entry.timestamp - begun[event.step_key]
                        )
            timing = RunTiming(
                record.create_timestamp.timestamp(),
                launched,
                float(record.start_time),
                float(record.end_time),
            )
            for start in range(int(first[:12]), int(str(last)[:12]) + 1, range_size):
                if start not in out or timing < out[start]:
                    out[start] = timing
    finally:
        instance.dispose()
    return out, steps


def main() -> int:
    """The head path (issue 14): the follower at production range size; `--sealed-path ...`
    runs the former sealed-range benchmark instead (its own flags follow)."""
    if "--sealed-path" in sys.argv[1:]:
        return sealed_main([a for a in sys.argv[1:] if a != "--sealed-path"])
    from infra.bench import freshness

    parser = argparse.ArgumentParser(description=__doc__)
    freshness.add_arguments(parser)
    parser.add_argument("--sink-messages", type=int, default=10_000, help="sink throughput run")
    args = parser.parse_args()

    def sink_part(env: dict[str, str], pg: PostgresServer, work: Path) -> float:
        return sink_throughput(env, pg, args.sink_messages, work)

    run, sink_rate = freshness.head_run(args, daemon=not args.no_daemon, before=sink_part)
    alert_lat, query_lat, lag_max = freshness.report(run, args)
    print(
        f"freshness: p50_s={statistics.median(query_lat):.2f} "
        f"p99_s={percentile(query_lat, 99):.2f} lag_max_blocks={lag_max:.0f}"
    )
    print(
        f"alerts: p50_s={statistics.median(alert_lat):.2f} p99_s={percentile(alert_lat, 99):.2f} "
        f"n={len(alert_lat)} range_size={args.range_size} sink_msgs_per_s={sink_rate:.0f}"
    )
    return 0


def sealed_main(argv: list[str]) -> int:
    """The sealed path of issues 6-13 (ranges of 5 one-second blocks, no follower)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alerts", type=int, default=120, help="alerting blocks (>= 100)")
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds between blocks")
    parser.add_argument("--range-size", type=int, default=5, help="blocks per partition")
    parser.add_argument("--sink-messages", type=int, default=10_000, help="sink throughput run")
    parser.add_argument(
        "--dequeue-interval",
        type=int,
        default=None,
        help="queued run coordinator dequeue interval, s (default: dagster.yaml's)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after, seconds")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="trace-bench-alerts-"))
    pg = PostgresServer(work / "pg", free_port())
    s3 = MotoS3Server(free_port())
    node = AnvilNode(work, free_port(), chain_id=CHAIN_ID, persist=False)
    try:
        pg.start()
        pg.ensure_databases(("dagster", "trace_state", "trace_data"))
        pg.migrate(TRACE_SCHEMAS)
        s3.start()
        s3.create_buckets()
        node.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACE_", "DAGSTER_"))}
        env.update(s3.env())
        env.update(
            {
                "TRACE_RPC_URL": node.url,
                "TRACE_CHAIN_ID": str(CHAIN_ID),
                "TRACE_RANGE_SIZE": str(args.range_size),
                "TRACE_STATE_DSN": pg.dsn("trace_state"),
                "TRACE_DATA_DSN": pg.dsn("trace_data"),
                "TRACE_SQS_ENDPOINT_URL": s3.endpoint_url,
                "TRACE_ALERTS_QUEUE": QUEUE,
                "TRACE_ALERT_OUTBOUND_ALLOW": "127.0.0.1/32",  # the bench's receivers
                **pg.dagster_env(),
                "PYTHONPATH": str(REPO_ROOT),
            }
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "TRACE_"))})
        sink_rate = sink_throughput(env, pg, args.sink_messages, work)

        engine = t.data_engine(pg.dsn("trace_data"))
        with WebhookReceiver(SECRET) as hook:
            RuleStore(engine).create(
                parse_rule(
                    {
                        "org": "bench",
                        "id": "watched",
                        "condition": {
                            "kind": "watched_addresses",
                            "addresses": [WATCHED],
                            "datasets": ["native_transfers"],
                        },
                        "channels": [
                            {
                                "kind": "webhook",
                                "name": "hook",
                                "url": f"{hook.url}/alerts",
                                "secret": SECRET,
                                "rate_per_s": 100,
                            }
                        ],
                    }
                )
            )
            with (
                AlertWorkers(env, work) as _workers,
                dagster_daemon(env, work / "dagster_home", args.dequeue_interval) as daemon_log,
            ):
                latencies, breakdown = measure(args, node, hook, engine, work, daemon_log)
        engine.dispose()
    finally:
        node.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    p50, p99 = statistics.median(latencies), percentile(latencies, 99)
    _say(
        f"latency over {len(latencies)} alerts: p50 {p50:.2f} s, p99 {p99:.2f} s, "
        f"min {min(latencies):.2f} s, max {max(latencies):.2f} s"
    )
    for name, values in breakdown.items():
        if values:
            _say(
                f"  {name:<34} median {statistics.median(values):6.2f} s  "
                f"p99 {percentile(values, 99):6.2f} s"
            )
    print(
        f"alerts: p50_s={p50:.2f} p99_s={p99:.2f} n={len(latencies)} "
        f"sink_msgs_per_s={sink_rate:.0f}"
    )
    return 0


def measure(
    args: argparse.Namespace,
    node: AnvilNode,
    hook: WebhookReceiver,
    engine: sa.Engine,
    work: Path,
    daemon_log: Path,
) -> tuple[list[float], dict[str, list[float]]]:
    chain = Chain(node)
    chain.start()
    deadline = time.monotonic() + args.timeout

    def arrived() -> dict[int, float]:
        first: dict[int, float] = {}
        for d in hook.snapshot():
            block = block_of(d.alert)
            first[block] = min(first.get(block, d.received_at), d.received_at)
        return first

    def tick(until: float) -> None:
        while time.time() < until:
            time.sleep(min(0.01, max(0.0, until - time.time())))

    # warm-up: one alert through the whole path (daemon, code server, first run, workers)
    chain.transfer(1)
    warm = chain.mine()
    _say(f"warm-up alert in block {warm}; waiting for it at the receiver ...")
    next_at = time.time()
    while warm not in arrived():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no warm-up alert; daemon log:\n{daemon_log.read_text()[-4000:]}")
        next_at += args.block_time
        tick(next_at)
        chain.mine()
    _say(f"warm-up alert arrived; head {max(chain.mined_at)}, finalized {chain.finalized}")

    alerting: list[int] = []
    for i in range(args.alerts):
        chain.transfer(2 + i)
        next_at += args.block_time
        tick(next_at)
        alerting.append(chain.mine())
    _say(f"{len(alerting)} alerting blocks mined ({alerting[0]}..{alerting[-1]}); finalizing")
    while not set(alerting) <= set(arrived()):
        if time.monotonic() > deadline:
            missing = sorted(set(alerting) - set(arrived()))
            raise RuntimeError(f"{len(missing)} alerts never arrived (e.g. {missing[:5]})")
        next_at += args.block_time
        tick(next_at)
        chain.mine()  # the chain goes on, so every alerting block becomes finalized

    got = arrived()
    latencies = [got[b] - chain.finalized_at[b] for b in alerting]
    size = args.range_size
    runs, steps = run_times(work / "dagster_home", size)
    with engine.connect() as conn:
        upserted = {
            int(r.block): r.at.timestamp()
            for r in conn.execute(
                sa.text(
                    "SELECT (payload->'row'->>'block_number')::bigint AS block, created_at AS at "
                    "FROM trace_alerts WHERE org = 'bench'"
                )
            )
        }
    breakdown: dict[str, list[float]] = {
        "block finalized -> range finalized": [],
        "range finalized -> run requested": [],
        "run requested -> launched (queue)": [],
        "run launched -> started (process)": [],
        "run started -> row upserted": [],
        "row upserted -> webhook received": [],
    }
    for b in alerting:
        first = b - b % size
        range_final = chain.finalized_at.get(first + size - 1)
        run = runs.get(first)
        if range_final is None or run is None or b not in upserted:
            continue
        breakdown["block finalized -> range finalized"].append(range_final - chain.finalized_at[b])
        breakdown["range finalized -> run requested"].append(run.created - range_final)
        breakdown["run requested -> launched (queue)"].append(run.launched - run.created)
        breakdown["run launched -> started (process)"].append(run.started - run.launched)
        breakdown["run started -> row upserted"].append(upserted[b] - run.started)
        breakdown["row upserted -> webhook received"].append(got[b] - upserted[b])
    measured = {run for b in alerting if (run := runs.get(b - b % size)) is not None}
    breakdown["run duration (started -> ended)"] = [r.ended - r.started for r in measured]
    for step, durations in sorted(steps.items()):
        breakdown[f"step {step}"] = durations
    return latencies, breakdown


if __name__ == "__main__":
    raise SystemExit(main())
