"""`make bench-freshness`: how fresh the head tier keeps the datasets on a live 300 ms chain.

The deployment path, all real processes: anvil mining every 0.3 s on its own (chain id 10143)
under `DevnetLoad(tps=400)` (~120 transactions a block), PostgreSQL, moto (S3 + SQS), the head
follower (`python -m trace_assets.head`, production ranges of 10,000 blocks), the alert sink and
deliverer, a signed-webhook receiver, the query service (uvicorn) and, as in production, the
Dagster daemon with the chain-head sensor (it seals nothing here: the first range completes
only after 10,000 blocks, ~50 minutes). A rule (`watched_addresses` on the load's watched
address, `native_transfers`) is created through the query service by a token of org `bench`.

Every `--alert-every` seconds one alerting native transfer is injected (`inject_native`: it
lands alone in the next block). For each, from the moment its block became finalized
(`load.finalized_seen_at`: the load's watcher first saw head = block + 64, anvil's
`finalized` tag) to
  * its alert's arrival at the webhook receiver (alerts), and
  * its row being returned by `POST /v1/query` (a SELECT on native_transfers for its tx hash,
    polled every `--query-poll` s for every pending transaction; the time is when the answer
    with the row arrived) (freshness).
Every second the follower's `/metrics` (trace_dataset_lag_blocks / _seconds) is sampled with the
machine's load average. Anvil stalls (~1-2 s without a block at ~115k and ~230k transactions)
are found from the load's block times and reported; the figures are given with and without the
alerts finalized in a stall's shadow.

Last lines: `alerts: p50_s=… p99_s=… n=… range_size=10000` then
`freshness: p50_s=… p99_s=… lag_max_blocks=…`. `make bench-alerts` runs the same harness
(`infra/bench/alerts.py`) and adds the sink's throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from infra.bench.alerts import dagster_daemon, percentile  # the daemon as bench-alerts starts it
from infra.devnet.load import AlertTx, DevnetLoad, process_cpu_seconds
from infra.local.alert_workers import AlertWorkers
from infra.local.query_service import QueryServer
from infra.local.services import (
    REPO_ROOT,
    TRACE_SCHEMAS,
    AnvilNode,
    MotoS3Server,
    PostgresServer,
    free_port,
    stop_process_group,
)
from infra.local.webhook_receiver import WebhookReceiver
from trace_resources.alert_pipeline import tables as t

CHAIN_ID = 10143
SECRET = "bench-webhook-secret-0123456789abcdef"
QUEUE = "trace-alerts"
ORG = "bench"


def _say(message: str) -> None:
    print(f"[bench-head] {message}", flush=True)


def _fmt(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"p50 {statistics.median(values):6.2f} s  p99 {percentile(values, 99):6.2f} s  "
        f"min {min(values):6.2f}  max {max(values):6.2f}  n={len(values)}"
    )


# -- the follower process ------------------------------------------------------------------


@contextlib.contextmanager
def follower_process(env: dict[str, str], work: Path, timeout: float = 120) -> Iterator[int]:
    """`python -m trace_assets.head` in its own process group, until its `follower ready`."""
    log = work / "follower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trace_assets.head"],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while "follower ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the follower did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        stop_process_group(proc.pid, 30)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


# -- samplers ------------------------------------------------------------------------------

_METRIC = re.compile(
    r'^(trace_dataset_(?:lag_blocks|lag_seconds|head_block))\{dataset="blocks"\} (\S+)$', re.M
)
_APPEND = re.compile(r"^trace_head_append_seconds_(sum|count) (\S+)$", re.M)


@dataclass
class LagSample:
    at: float
    blocks: float
    seconds: float
    loadavg: float
    follower_cpu_s: float
    head_block: float  # newest block the follower committed (its gauge)
    chain_finalized: int  # the chain's finalized head read right after the metrics
    append_sum: float  # trace_head_append_seconds_sum
    append_count: float

    @property
    def observed_blocks(self) -> float:
        """Blocks finalized on the chain, not committed, at the sample (not the follower's
        view as of its last cycle)."""
        return max(0.0, self.chain_finalized - self.head_block)


@dataclass
class LagSampler:
    """The follower's /metrics every `interval` s (a thread)."""

    url: str
    follower_pid: int
    rpc_url: str
    interval: float = 1.0
    samples: list[LagSample] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    text = client.get(self.url).text
                    values = dict(_METRIC.findall(text))
                    append = dict(_APPEND.findall(text))
                    finalized = client.post(
                        self.rpc_url,
                        json={
                            "jsonrpc": "2.0",
                            "id": 1,
                            "method": "eth_getBlockByNumber",
                            "params": ["finalized", False],
                        },
                    ).json()["result"]["number"]
                    self.samples.append(
                        LagSample(
                            time.time(),
                            float(values["trace_dataset_lag_blocks"]),
                            float(values["trace_dataset_lag_seconds"]),
                            os.getloadavg()[0],
                            process_cpu_seconds(self.follower_pid),
                            float(values["trace_dataset_head_block"]),
                            int(finalized, 16),
                            float(append.get("sum", 0)),
                            float(append.get("count", 0)),
                        )
                    )
                except Exception:  # a missed sample is counted, never fatal
                    self.failures += 1
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass
class QueryPoller:
    """Polls `POST /v1/query` for the rows of the pending alerting transactions (a thread)."""

    url: str
    token: str
    poll_s: float
    pending: dict[str, float] = field(default_factory=dict)  # tx hash -> injected at
    visible: dict[str, float] = field(default_factory=dict)  # tx hash -> answer arrived at
    request_s: list[tuple[float, float]] = field(default_factory=list)  # (at, seconds)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, tx_hash: str) -> None:
        with self._lock:
            self.pending[tx_hash] = time.time()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="query-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    hashes = sorted(self.pending)
                if hashes:
                    values = ", ".join(f"unhex('{h[2:]}')" for h in hashes)
                    sql = (
                        "SELECT lower(hex(transaction_hash)) AS h FROM native_transfers "
                        f"WHERE transaction_hash IN ({values})"
                    )
                    sent = time.perf_counter()
                    try:
                        response = client.post("/v1/query", json={"sql": sql})
                        arrived = time.time()
                        self.request_s.append((arrived, time.perf_counter() - sent))
                        if response.status_code != 200:
                            self.errors.append(f"{response.status_code} {response.text[:200]}")
                        else:
                            for (found,) in response.json()["rows"]:
                                key = "0x" + str(found).lower()
                                with self._lock:
                                    if self.pending.pop(key, None) is not None:
                                        self.visible[key] = arrived
                    except httpx.HTTPError as exc:
                        self.errors.append(repr(exc))
                self._stop.wait(self.poll_s)


# -- the run -------------------------------------------------------------------------------


@dataclass
class HeadRun:
    """What one run measured."""

    alerts: list[AlertTx]
    finalized_at: dict[int, float]  # block -> finalized seen (load's watcher)
    received_at: dict[int, float]  # block -> first webhook arrival
    visible_at: dict[int, float]  # block -> row returned by the query service
    committed_at: dict[int, float]  # block -> follower's commit of its native_transfers segment
    upserted_at: dict[int, float]  # block -> alert row upserted by the sink
    lag: list[LagSample]
    stalls: list[tuple[int, float, float]]  # (block after the gap, gap start, gap seconds)
    load_line: str
    query_request_s: list[tuple[float, float]]
    notes: list[str]


def head_run(args: argparse.Namespace, *, daemon: bool, before: Any = None) -> tuple[HeadRun, Any]:
    """Start everything, run the load and the alerts, stop everything; `before(env, pg, work)`
    runs first on the fresh services (the sink throughput part of bench-alerts)."""
    from trace_resources.settings import QuerySettings
    from trace_resources.tokens import Keyring, generate_key, issue_token

    work = Path(tempfile.mkdtemp(prefix="trace-bench-head-"))
    pg = PostgresServer(work / "pg", free_port())
    s3 = MotoS3Server(free_port())
    node = AnvilNode(
        work,
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--block-time", str(args.block_time)],
    )
    before_result = None
    try:
        pg.start()
        pg.ensure_databases(("dagster", "trace_state", "trace_data"))
        pg.migrate(TRACE_SCHEMAS)
        s3.start()
        s3.create_buckets()
        node.start()
        metrics_port = free_port()
        key, _ = generate_key("bench", "HS256")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACE_", "DAGSTER_"))}
        env.update(s3.env())
        env.update(
            {
                "TRACE_ENVIRONMENT": "test",
                "TRACE_RPC_URL": node.url,
                "TRACE_CHAIN_ID": str(CHAIN_ID),
                "TRACE_RANGE_SIZE": str(args.range_size),
                "TRACE_STATE_DSN": pg.dsn("trace_state"),
                "TRACE_DATA_DSN": pg.dsn("trace_data"),
                "TRACE_SQS_ENDPOINT_URL": s3.endpoint_url,
                "TRACE_ALERTS_QUEUE": QUEUE,
                "TRACE_ALERT_OUTBOUND_ALLOW": "127.0.0.1/32",  # the bench's receivers
                "TRACE_HEAD_METRICS_PORT": str(metrics_port),
                "TRACE_QUERY_TOKEN_KEYS": key,
                "TRACE_QUERY_RATE_ORG_PER_S": "1000000",
                "TRACE_QUERY_RATE_ORG_BURST": "1000000",
                "TRACE_QUERY_RATE_USER_PER_S": "1000000",
                "TRACE_QUERY_RATE_USER_BURST": "1000000",
                **pg.dagster_env(),
                "PYTHONPATH": str(REPO_ROOT),
            }
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "TRACE_"))})
        if before is not None:
            before_result = before(env, pg, work)
        settings = QuerySettings()
        token, _ = issue_token(
            Keyring.from_settings(settings),
            settings,
            org=ORG,
            subject="bench",
            ttl_s=3 * 3600,
            capabilities=["alerts:manage"],
        )
        engine = t.data_engine(pg.dsn("trace_data"))
        state = sa.create_engine(pg.dsn("trace_state"))
        load = DevnetLoad(node.url, tps=args.tps, anvil_pid=node.pid)
        _say(f"anvil --block-time {args.block_time} on {node.url}; load set-up ...")
        with contextlib.ExitStack() as stack:
            load.start()
            stack.callback(load.stop, False)
            hook = stack.enter_context(WebhookReceiver(SECRET))
            server = stack.enter_context(
                QueryServer(env, log_file=work / "query.log", start_timeout=120)
            )
            client = stack.enter_context(
                httpx.Client(
                    base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
                )
            )
            rule = {
                "id": "watched",
                "description": "native transfers to the load's watched address",
                "condition": {
                    "kind": "watched_addresses",
                    "addresses": [load.watched_address],
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
            client.post("/v1/alerts/rules", json=rule).raise_for_status()
            _say(f"rule {ORG}/watched created through {server.url}/v1/alerts/rules")
            stack.enter_context(AlertWorkers(env, work))
            follower_pid = stack.enter_context(follower_process(env, work))
            if daemon:
                stack.enter_context(dagster_daemon(env, work / "dagster_home", None))
            run = measure(args, load, hook, server.url, token, metrics_port, follower_pid)
            run.notes.append(_follower_errors(work / "follower.log"))
            if daemon:
                run.notes.append(_dagster_runs(env))
        run.committed_at = _committed(state, run.alerts)
        run.upserted_at = _upserted(engine)
        run.load_line = load.stats().one_line()
        engine.dispose()
        state.dispose()
        return run, before_result
    finally:
        node.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def measure(
    args: argparse.Namespace,
    load: DevnetLoad,
    hook: WebhookReceiver,
    query_url: str,
    token: str,
    metrics_port: int,
    follower_pid: int,
) -> HeadRun:
    def arrived() -> dict[int, float]:
        first: dict[int, float] = {}
        for d in hook.snapshot():
            row = d.alert.get("row")
            if isinstance(row, dict):
                block = int(row["block_number"])
                first[block] = min(first.get(block, d.received_at), d.received_at)
        return first

    # warm-up: the follower catches up from block 0 of the open range, one alert end to end
    warm = load.wait_included(load.inject_native(), timeout=30)
    assert warm.block_number is not None
    _say(f"warm-up alert in block {warm.block_number}; waiting for it at the receiver ...")
    deadline = time.monotonic() + 300
    while warm.block_number not in arrived():
        if time.monotonic() > deadline or not load.running:
            raise RuntimeError("no warm-up alert within 300 s")
        time.sleep(0.1)
    _say("warm-up alert arrived; measuring")

    sampler = LagSampler(f"http://127.0.0.1:{metrics_port}/metrics", follower_pid, load.rpc_url)
    poller = QueryPoller(query_url, token, args.query_poll)
    sampler.start()
    poller.start()
    alerts: list[AlertTx] = []
    started = time.monotonic()
    next_at = started
    next_progress = started + 60
    try:
        while time.monotonic() - started < args.seconds or len(alerts) < args.alerts:
            if not load.running:
                raise RuntimeError("the load stopped")
            now = time.monotonic()
            if now >= next_at:
                alert = load.inject_native()
                alerts.append(alert)
                poller.add(alert.tx_hash)
                next_at += args.alert_every
            if now >= next_progress:
                next_progress += 60
                last = sampler.samples[-1] if sampler.samples else None
                _say(
                    f"{now - started:4.0f} s: {len(alerts)} alerts sent, {len(arrived())} "
                    f"received, {len(poller.visible)} visible; lag "
                    f"{last.blocks if last else '-'} blocks; load avg {os.getloadavg()[0]:.1f}; "
                    f"{load.stats().one_line()}"
                )
            time.sleep(0.02)
        _say(f"{len(alerts)} alerting transactions sent; waiting for every alert and row")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = arrived()
            blocks = {a.block_number for a in alerts}
            if None not in blocks and blocks <= set(got) and not poller.pending:
                break
            time.sleep(0.2)
    finally:
        poller.stop()
        sampler.stop()
    got = arrived()
    blocks = load.blocks()
    finalized_at = {
        a.block_number: at
        for a in alerts
        if a.block_number is not None and (at := load.finalized_seen_at(a.block_number)) is not None
    }
    visible_at = {
        a.block_number: poller.visible[a.tx_hash]
        for a in alerts
        if a.block_number is not None and a.tx_hash in poller.visible
    }
    stalls = [
        (n2, w1, w2 - w1)
        for (n1, w1, _), (n2, w2, _) in zip(blocks, blocks[1:], strict=False)
        if w2 - w1 > args.stall_s
    ]
    notes = []
    if poller.errors:
        notes.append(f"query errors: {len(poller.errors)}, e.g. {poller.errors[:2]}")
    if sampler.failures:
        notes.append(f"metrics samples missed: {sampler.failures}")
    dup = len({a.block_number for a in alerts}) != len(alerts)
    if dup:
        notes.append("some alerting transactions shared a block")
    return HeadRun(
        alerts,
        finalized_at,
        got,
        visible_at,
        {},
        {},
        sampler.samples,
        stalls,
        "",
        poller.request_s,
        notes,
    )


def _committed(state: sa.Engine, alerts: list[AlertTx]) -> dict[int, float]:
    """When the follower committed each alerting block's native_transfers segment (one row of
    trace_segments per append, with its first and last block; its created_at is the start of
    the commit transaction)."""
    wanted = {a.block_number for a in alerts if a.block_number is not None}
    out: dict[int, float] = {}
    with state.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT created_at, first_block, last_block FROM trace_segments "
                "WHERE dataset = 'native_transfers' AND first_block IS NOT NULL"
            )
        )
        for row in rows:
            for number in wanted:
                if row.first_block <= number <= row.last_block:
                    out[number] = row.created_at.timestamp()
    return out


def _upserted(engine: sa.Engine) -> dict[int, float]:
    with engine.connect() as conn:
        return {
            int(r.block): r.at.timestamp()
            for r in conn.execute(
                sa.text(
                    "SELECT (payload->'row'->>'block_number')::bigint AS block, created_at AS at "
                    "FROM trace_alerts WHERE org = :org"
                ),
                {"org": ORG},
            )
        }


def _follower_errors(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if " ERROR " in x]
    return f"follower errors logged: {len(lines)}" + (f", e.g. {lines[0][:300]}" if lines else "")


def _dagster_runs(env: dict[str, str]) -> str:
    dsn = (
        f"postgresql+psycopg2://{env['TRACE_DAGSTER_PG_USER']}:{env['TRACE_DAGSTER_PG_PASSWORD']}"
        f"@127.0.0.1:{env['TRACE_DAGSTER_PG_PORT']}/dagster"
    )
    engine = sa.create_engine(dsn)
    try:
        with engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
            ticks = conn.execute(sa.text("SELECT count(*) FROM job_ticks")).scalar_one()
        return f"Dagster daemon: {runs} runs (no range completed), {ticks} sensor ticks"
    except Exception as exc:  # the schema is Dagster's: report, never fail the run on it
        return f"Dagster daemon: runs not counted ({type(exc).__name__})"
    finally:
        engine.dispose()


# -- the report ----------------------------------------------------------------------------


def report(run: HeadRun, args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    """Print the figures; return (alert latencies, query latencies, lag max blocks)."""
    blocks = [a.block_number for a in run.alerts if a.block_number is not None]
    fin = run.finalized_at

    def series(ends: dict[int, float], starts: dict[int, float] = fin) -> dict[int, float]:
        return {b: ends[b] - starts[b] for b in blocks if b in ends and b in starts}

    alert_lat = series(run.received_at)
    query_lat = series(run.visible_at)
    shadow = {
        b
        for b in blocks
        if b in fin
        and any(
            start - 2 <= fin[b] <= start + gap + args.stall_shadow_s for _, start, gap in run.stalls
        )
    }
    _say(f"load: {run.load_line}")
    stalls = ", ".join(f"{gap:.2f} s before block {n}" for n, _, gap in run.stalls)
    _say(f"anvil stalls (> {args.stall_s:.1f} s without a block): {stalls or 'none'}")
    _say(f"finalized -> alert at the webhook:   {_fmt(list(alert_lat.values()))}")
    _say(f"finalized -> row visible in a query: {_fmt(list(query_lat.values()))}")
    _say(
        f"without the {len(shadow)} alerts finalized within {args.stall_shadow_s:.0f} s of a "
        f"stall: alerts {_fmt([v for b, v in alert_lat.items() if b not in shadow])}; "
        f"query {_fmt([v for b, v in query_lat.items() if b not in shadow])}"
    )
    missing_alerts = sorted(set(blocks) - set(run.received_at))
    missing_rows = sorted(set(blocks) - set(run.visible_at))
    if missing_alerts or missing_rows:
        _say(f"never arrived: {len(missing_alerts)} alerts, never visible: {len(missing_rows)}")
    _say("breakdown (per alerting block):")
    stages = {
        "finalized -> follower commit (native_transfers segment)": series(run.committed_at),
        "finalized -> alert row upserted by the sink": series(run.upserted_at),
        "follower commit -> alert row upserted": series(run.upserted_at, run.committed_at),
        "alert row upserted -> webhook received": series(run.received_at, run.upserted_at),
        "follower commit -> row visible in a query": series(run.visible_at, run.committed_at),
    }
    for name, values in stages.items():
        _say(f"  {name:<56} {_fmt(list(values.values()))}")
    if run.query_request_s:
        polls = [q for _, q in run.query_request_s]
        _say(f"  {'one /v1/query poll (round trip)':<56} {_fmt(polls)}")
    lag = run.lag
    lag_blocks = [s.blocks for s in lag]
    lag_seconds = [s.seconds for s in lag]
    observed = [s.observed_blocks for s in lag]
    lag_max = max(observed + lag_blocks) if lag else float("nan")
    if lag:
        span = lag[-1].at - lag[0].at
        cpu = (lag[-1].follower_cpu_s - lag[0].follower_cpu_s) / max(span, 1e-9)
        loads = [s.loadavg for s in lag]
        _say(
            f"follower lag over {span:.0f} s ({len(lag)} samples, 1/s). Its metric "
            f"trace_dataset_lag_blocks: max {max(lag_blocks):.0f} p99 "
            f"{percentile(lag_blocks, 99):.0f} p50 {statistics.median(lag_blocks):.0f}; "
            f"_seconds: max {max(lag_seconds):.2f} p99 {percentile(lag_seconds, 99):.2f} "
            f"p50 {statistics.median(lag_seconds):.2f}"
        )
        _say(
            f"  observed (chain finalized at the sample - trace_dataset_head_block): max "
            f"{max(observed):.0f} p99 {percentile(observed, 99):.0f} p50 "
            f"{statistics.median(observed):.0f} blocks"
        )
        minutes = []
        for minute in range(int(span // 60) + 1):
            part = [s for s in lag if minute * 60 <= s.at - lag[0].at < (minute + 1) * 60]
            if len(part) < 2:
                continue
            appends = part[-1].append_count - part[0].append_count
            append_ms = (
                1000 * (part[-1].append_sum - part[0].append_sum) / appends if appends else 0.0
            )
            queries = [q for at, q in run.query_request_s if part[0].at <= at < part[-1].at]
            minutes.append(statistics.fmean(s.observed_blocks for s in part))
            _say(
                f"    minute {minute:2d}: observed lag mean "
                f"{statistics.fmean(s.observed_blocks for s in part):5.2f} max "
                f"{max(s.observed_blocks for s in part):4.0f} blocks; metric max "
                f"{max(s.blocks for s in part):3.0f} blocks {max(s.seconds for s in part):5.2f} s;"
                f" appends {appends:4.0f} (mean {append_ms:5.0f} ms); query poll p50 "
                f"{1000 * statistics.median(queries) if queries else 0:5.0f} ms; head block "
                f"{part[-1].head_block:.0f}; load avg "
                f"{statistics.fmean(s.loadavg for s in part):.1f}"
            )
        if len(minutes) >= 2:
            grows = minutes[-1] > 2 * minutes[0] + 3
            _say(
                f"  first minute {minutes[0]:.2f} blocks, last minute {minutes[-1]:.2f} blocks: "
                f"{'GROWING' if grows else 'bounded'}"
            )
        _say(
            f"  follower CPU {100 * cpu:.0f}% of a core; load average min {min(loads):.1f} "
            f"median {statistics.median(loads):.1f} max {max(loads):.1f} ({os.cpu_count()} cores)"
        )
    for note in run.notes:
        _say(note)
    return list(alert_lat.values()), list(query_lat.values()), lag_max


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=630, help="measured load duration")
    parser.add_argument("--alerts", type=int, default=300, help="at least this many alerts")
    parser.add_argument("--alert-every", type=float, default=1.8, help="seconds between alerts")
    parser.add_argument("--tps", type=float, default=400.0, help="load transactions per second")
    parser.add_argument("--block-time", type=float, default=0.3, help="anvil --block-time")
    parser.add_argument("--range-size", type=int, default=10_000, help="blocks per partition")
    parser.add_argument("--query-poll", type=float, default=0.1, help="seconds between polls")
    parser.add_argument("--stall-s", type=float, default=0.8, help="a gap this long is a stall")
    parser.add_argument(
        "--stall-shadow-s", type=float, default=10.0, help="alerts this soon after a stall"
    )
    parser.add_argument(
        "--no-daemon", action="store_true", help="without the Dagster daemon (not production)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    run, _ = head_run(args, daemon=not args.no_daemon)
    alert_lat, query_lat, lag_max = report(run, args)
    print(
        f"alerts: p50_s={statistics.median(alert_lat):.2f} p99_s={percentile(alert_lat, 99):.2f} "
        f"n={len(alert_lat)} range_size={args.range_size}"
    )
    print(
        f"freshness: p50_s={statistics.median(query_lat):.2f} "
        f"p99_s={percentile(query_lat, 99):.2f} lag_max_blocks={lag_max:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
