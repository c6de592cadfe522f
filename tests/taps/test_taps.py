"""Wire taps on the real services: committed versions (the commit protocol on PostgreSQL and
the S3 API), accepted alerts (the sink on SQS and PostgreSQL) and a Dagster run's events
(Trace's pooled event log storage) reach their taps once each, in order; a replay re-drives a
consumer to the result the original stream gave; a full buffer drops and counts while the
primary path completes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import prometheus_client
import pyarrow as pa
import pytest
import sqlalchemy as sa
import yaml

from infra.local.services import MotoS3Server
from tests.alerts.conftest import ROOT, Workers
from tests.conftest import NewDatabase
from tests.utils.writes import commit_one, stage_one
from trace_assets.cli import main as trace_main
from trace_resources import taps
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.alert_pipeline.queue import BufferMessage, SqsBuffer
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import get_settings
from trace_resources.storage import state as state_tables
from trace_resources.storage.commit import PartitionData
from trace_resources.taps.replay import read_records

KEYS = ["000000000000-000000000049", "000000000050-000000000099"]
_counter = itertools.count()


def _table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"block_number": pa.array(range(offset, offset + n), pa.uint64())})


@pytest.fixture
def tap_env(
    monkeypatch: pytest.MonkeyPatch, s3_server: MotoS3Server, state_dsn: str
) -> Iterator[Any]:
    """`tap_env(taps, s3_endpoint=...)` declares TRACE_TAPS for this process (the hub starts
    them at the first event); the taps stop when the test ends."""

    def declare(declared: list[dict[str, Any]], *, s3_endpoint: str | None = None) -> None:
        taps.reset()
        monkeypatch.setenv("TRACE_TAPS", json.dumps(declared))
        monkeypatch.setenv("TRACE_STATE_DSN", state_dsn)
        monkeypatch.setenv("TRACE_S3_ENDPOINT_URL", s3_endpoint or s3_server.endpoint_url)
        monkeypatch.setenv("TRACE_SQS_ENDPOINT_URL", s3_server.endpoint_url)

    yield declare
    taps.reset(timeout_s=1.0)


def _fifo_queue(s3_server: MotoS3Server) -> str:
    name = f"tap-{os.getpid()}-{next(_counter)}.fifo"
    s3_server.s3_client()  # credentials set by the autouse fixture
    import boto3

    boto3.client("sqs", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_queue(
        QueueName=name, Attributes={"FifoQueue": "true"}
    )
    return name


def _queue_records(s3_server: MotoS3Server, name: str) -> list[dict[str, Any]]:
    import boto3

    client = boto3.client("sqs", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    url = client.get_queue_url(QueueName=name)["QueueUrl"]
    out: list[dict[str, Any]] = []
    while True:
        got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = got.get("Messages", [])
        if not messages:
            return out
        out += [json.loads(m["Body"]) for m in messages]
        client.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert trace_main([*argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _alert_messages(engine: sa.Engine, org: str, n: int) -> list[BufferMessage]:
    rule = parse_rule(
        {
            "org": org,
            "id": "big",
            "condition": {"kind": "watched_addresses", "addresses": ["0x" + "11" * 20]},
            "channels": [
                {
                    "kind": "webhook",
                    "name": "hook",
                    "url": "http://127.0.0.1:9/x",
                    "secret": "test-webhook-secret-0123456789",
                }
            ],
        }
    )
    stored = RuleStore(engine).create(rule)
    destination = {
        "org": org,
        "rule_id": "big",
        "rule_version": stored.version,
        "channels": ["hook"],
    }
    return [
        BufferMessage(f"{org}-{i:04d}", {"type": "alert", "org": org, "n": i}, destination)
        for i in range(n)
    ]


def _drain(sink: Sink, expected: int) -> None:
    handled = 0
    for _ in range(60):
        handled += sink.cycle(wait_s=1)
        if handled >= expected:
            return
    raise AssertionError(f"the sink handled {handled} of {expected} buffer messages")


def test_commits_and_alerts_reach_their_taps_once_in_order(
    tap_env: Any,
    s3_server: MotoS3Server,
    s3_bucket: str,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    state_dsn: str,
    new_database: NewDatabase,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alerts_queue = _fifo_queue(s3_server)
    tap_env(
        [
            {"name": "commits", "source": "commits", "to": f"s3://{s3_bucket}/taps/commits"},
            {
                "name": "blocks-only",
                "source": "commits",
                "to": f"s3://{s3_bucket}/taps/blocks",
                "select": ["blocks"],
            },
            {"name": "alerts", "source": "alerts", "to": f"sqs://{alerts_queue}"},
        ]
    )
    writer = state.writer(objects)
    writer.write("blocks", KEYS[0], PartitionData(_table(10)))
    writer.write("logs", KEYS[0], PartitionData(_table(3)))
    staged = stage_one(writer, "blocks", KEYS[1], PartitionData(_table(5, 50)))
    commit_one(writer, staged)
    commit_one(writer, staged)  # a retry after an unknown outcome: no second version, no event
    writer.write("blocks", KEYS[0], PartitionData(_table(7)))  # version 2

    engine = alert_tables.data_engine(
        new_database(f"data_tap_{os.getpid()}_{next(_counter)}", "data")
    )
    buffer = SqsBuffer(
        f"tap-alerts-{os.getpid()}-{next(_counter)}",
        endpoint_url=s3_server.endpoint_url,
        visibility_timeout_s=5,
    )
    messages = _alert_messages(engine, "acme", 6)
    buffer.send(messages[:4] + messages[:2])  # repeats: the sink accepts each alert once
    _drain(Sink(buffer, engine, batch=50), 6)
    buffer.send(messages[4:] + messages[3:4])
    _drain(Sink(buffer, engine, batch=50), 3)
    for tap in taps.hub().taps:
        assert tap.flush(20), f"tap {tap.config.name} did not write within 20 s"

    # the commits tap holds exactly the outbox's events, in commit order, numbered 1, 2, 3 …
    with state_tables.engine_for(state_dsn).connect() as conn:
        outbox = conn.execute(
            sa.select(
                state_tables.outbox.c.id,
                state_tables.outbox.c.dataset,
                state_tables.outbox.c.partition_key,
                state_tables.outbox.c.version,
            ).order_by(state_tables.outbox.c.id)
        ).all()
    assert len(outbox) == 4
    settings = get_settings()
    records = list(read_records(settings, settings.tap_configs()[0]))
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert [
        (
            r["event"]["outbox_id"],
            r["event"]["dataset"],
            r["event"]["partition_key"],
            r["event"]["version"],
        )
        for r in records
    ] == [tuple(row) for row in outbox]
    blocks_only = list(read_records(settings, settings.tap_configs()[1]))
    assert [(r["seq"], r["event"]["dataset"], r["event"]["version"]) for r in blocks_only] == [
        (1, "blocks", 1),
        (2, "blocks", 1),
        (3, "blocks", 2),
    ]

    # the alerts tap (a FIFO queue): each accepted alert once, in the order the sink took them
    tapped = _queue_records(s3_server, alerts_queue)
    assert [r["seq"] for r in tapped] == list(range(1, 7))
    assert [r["event"]["dedupe_key"] for r in tapped] == [m.dedupe_key for m in messages]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM trace_alerts")).scalar() == 6

    status = {row["tap"]: row for row in _cli_json(capsys, "taps", "--json")}
    assert (status["commits"]["written"], status["commits"]["dropped"]) == (4, 0)
    assert (status["blocks-only"]["written"], status["alerts"]["written"]) == (3, 6)
    engine.dispose()


class _Consumer(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, Any], int]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((json.loads(body), int(self.headers["X-Trace-Tap-Seq"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _alert_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        alerts = conn.execute(
            sa.text(
                "SELECT dedupe_key, org, kind, payload::text, destination::text "
                "FROM trace_alerts ORDER BY dedupe_key"
            )
        ).all()
        deliveries = conn.execute(
            sa.text(
                "SELECT dedupe_key, channel, state FROM trace_alert_deliveries "
                "ORDER BY dedupe_key, channel"
            )
        ).all()
    return [tuple(r) for r in alerts] + [tuple(r) for r in deliveries]


def test_replay_redrives_a_consumer_to_the_same_result(
    tap_env: Any,
    s3_server: MotoS3Server,
    s3_bucket: str,
    new_database: NewDatabase,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tap_env(
        [{"name": "alerts", "source": "alerts", "to": f"s3://{s3_bucket}/taps/alerts", "batch": 4}]
    )
    original = alert_tables.data_engine(
        new_database(f"data_a_{os.getpid()}_{next(_counter)}", "data")
    )
    replayed = alert_tables.data_engine(
        new_database(f"data_b_{os.getpid()}_{next(_counter)}", "data")
    )
    messages = _alert_messages(original, "acme", 5) + _alert_messages(original, "globex", 4)
    _alert_messages(replayed, "acme", 0)  # the consumer downstream knows the same rules
    _alert_messages(replayed, "globex", 0)
    source = SqsBuffer(
        f"tap-alerts-{os.getpid()}-{next(_counter)}",
        endpoint_url=s3_server.endpoint_url,
        visibility_timeout_s=5,
    )
    source.send(messages + messages[:3])
    _drain(Sink(source, original, batch=50), len(messages) + 3)
    assert taps.hub().get("alerts").flush(20)

    # the tap re-sent to a second queue, which a second sink consumes into its own database
    target = f"replay-{os.getpid()}-{next(_counter)}"
    target_buffer = SqsBuffer(target, endpoint_url=s3_server.endpoint_url, visibility_timeout_s=5)
    capsys.readouterr()
    assert trace_main(["taps", "replay", "alerts", "--to", f"sqs://{target}"]) == 0
    assert "replayed 9 record(s) of tap alerts from 1 producer(s)" in capsys.readouterr().out

    # a webhook consumer gets the events in the original order, with their sequence numbers
    _Consumer.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Consumer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/consumer"
        assert trace_main(["taps", "replay", "alerts", "--to", url]) == 0
        assert [seq for _, seq in _Consumer.received] == list(range(1, 10))
        assert [BufferMessage.from_dict(e) for e, _ in _Consumer.received] == messages
        # nothing is offered after now: an empty replay
        assert trace_main(["taps", "replay", "alerts", "--to", url, "--since", "2999-01-01"]) == 0
        assert len(_Consumer.received) == 9
    finally:
        server.shutdown()
        server.server_close()
    # what a mistaken replay says
    capsys.readouterr()
    assert trace_main(["taps", "replay", "alertz", "--to", url]) == 2
    assert "unknown tap 'alertz'; taps: alerts" in capsys.readouterr().err
    assert trace_main(["taps", "replay", "alerts", "--to", "ftp://x"]) == 2
    assert "no replay destination: use sqs://" in capsys.readouterr().err

    # the consumer downstream (another deployment: no taps of its own here) reaches the result
    # the original stream gave
    taps.configure([], get_settings())
    _drain(Sink(target_buffer, replayed, batch=50), len(messages))
    assert _alert_rows(replayed) == _alert_rows(original)
    assert len(_alert_rows(original)) == 2 * len(messages)
    original.dispose()
    replayed.dispose()


class _SlowConsumer(BaseHTTPRequestHandler):
    """Takes 0.3 s per record on `/slow` (a replay then runs for seconds), none elsewhere."""

    received: list[tuple[str, int]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/slow":
            time.sleep(0.3)
        type(self).received.append((self.path, int(self.headers["X-Trace-Tap-Seq"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_one_replay_of_a_tap_at_a_time_and_a_paused_one_stops_when_it_wakes(
    tap_env: Any,
    s3_server: MotoS3Server,
    s3_bucket: str,
    new_database: NewDatabase,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tap_env([{"name": "alerts", "source": "alerts", "to": f"s3://{s3_bucket}/taps/lease"}])
    dsn = new_database(f"data_l_{os.getpid()}_{next(_counter)}", "data")
    engine = alert_tables.data_engine(dsn)
    messages = _alert_messages(engine, "acme", 12)
    source = SqsBuffer(
        f"tap-lease-{os.getpid()}-{next(_counter)}", endpoint_url=s3_server.endpoint_url
    )
    source.send(messages)
    _drain(Sink(source, engine, batch=50), len(messages))
    assert taps.hub().get("alerts").flush(20)
    monkeypatch.setenv("TRACE_LEADER_LEASE_S", "2")
    monkeypatch.setenv("TRACE_LEADER_RENEW_S", "0.5")

    _SlowConsumer.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowConsumer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    first = subprocess.Popen(
        [str(Path(sys.executable).with_name("trace")), "taps", "replay", "alerts"]
        + ["--to", f"{url}/slow"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _SlowConsumer.received:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        # a second replay while the first runs is refused: it would send every record twice
        capsys.readouterr()
        assert trace_main(["taps", "replay", "alerts", "--to", f"{url}/fast"]) == 2
        assert "another replay of tap alerts is running (" in capsys.readouterr().err
        # the first paused past its lease: another replay takes over and re-drives it all
        os.killpg(first.pid, signal.SIGSTOP)
        before = len(_SlowConsumer.received)
        time.sleep(3)
        assert trace_main(["taps", "replay", "alerts", "--to", f"{url}/fast"]) == 0
        assert [q for path, q in _SlowConsumer.received if path == "/fast"] == list(range(1, 13))
        # woken, the paused one stops at its next record: at most the one it was sending
        os.killpg(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
        server.shutdown()
        server.server_close()
    assert first.returncode == 2, (out, err)
    assert "replay of tap alerts stopped after" in err and "it lost its lease" in err, err
    slow = [q for path, q in _SlowConsumer.received if path == "/slow"]
    assert before <= len(slow) <= before + 1 and len(slow) < 12
    engine.dispose()


def test_a_forked_process_taps_as_its_own_producer(
    tap_env: Any,
    s3_bucket: str,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Dagster run is a fork of a warm worker (threads do not survive a fork): the child
    starts its own taps, numbers its own events from 1 and sends them before it exits."""
    tap_env([{"name": "commits", "source": "commits", "to": f"s3://{s3_bucket}/taps/commits"}])
    writer = state.writer(objects)
    writer.write("blocks", KEYS[0], PartitionData(_table(3)))
    assert taps.hub().get("commits").flush(20)  # the parent's writer idle before the fork
    pid = os.fork()
    if pid == 0:  # the child: what the run worker's child does around its run
        code = 1
        try:
            for version in (1, 2):
                taps.offer("commits", {"dataset": "blocks", "version": version}, selector="blocks")
            code = 0
        finally:
            taps.reset()
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    writer.write("blocks", KEYS[0], PartitionData(_table(4)))  # the parent's taps still run
    assert taps.hub().get("commits").flush(20)
    settings = get_settings()
    by_producer: dict[str, list[tuple[int, int]]] = {}
    for r in read_records(settings, settings.tap_configs()[0]):
        by_producer.setdefault(r["producer"], []).append((r["seq"], r["event"]["version"]))
    assert sorted(by_producer.values()) == [[(1, 1), (2, 2)], [(1, 1), (2, 2)]]
    [row] = _cli_json(capsys, "taps", "--json")
    assert (row["producers"], row["offered"], row["written"]) == (2, 4, 4)


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.stop_all()


def test_a_sink_process_sends_its_tap_before_it_exits(
    s3_server: MotoS3Server,
    s3_bucket: str,
    state_dsn: str,
    new_database: NewDatabase,
    workers: Workers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The alert sink as its own process, its tap declared in its environment: SIGTERM drains
    the queue, and the tap's writer sends every accepted alert before the process exits."""
    data_dsn = new_database(f"data_proc_{os.getpid()}_{next(_counter)}", "data")
    engine = alert_tables.data_engine(data_dsn)
    queue_name = f"tap-alerts-{os.getpid()}-{next(_counter)}"  # not the alert tests' names
    declared = [
        {"name": "alerts", "source": "alerts", "to": f"s3://{s3_bucket}/taps/alerts", "flush_s": 5}
    ]  # a batch still filling when SIGTERM comes
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    env.update(s3_server.env())
    env.update(
        {
            "TRACE_DATA_DSN": data_dsn,
            "TRACE_STATE_DSN": state_dsn,
            "TRACE_SQS_ENDPOINT_URL": s3_server.endpoint_url,
            "TRACE_ALERTS_QUEUE": queue_name,
            "TRACE_ALERTS_VISIBILITY_TIMEOUT_S": "5",
            "TRACE_TAPS": json.dumps(declared),
            "PYTHONPATH": str(ROOT),
        }
    )
    sink = workers.start("trace_resources.alert_pipeline.sink", env, "--idle-wait", "1")
    workers.wait_for_log(sink, "sink ready")
    messages = _alert_messages(engine, "acme", 7)
    SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url, visibility_timeout_s=5).send(
        messages + messages[:2]
    )

    def accepted() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM trace_alerts")).scalar_one())

    for _ in range(300):
        if accepted() == 7:
            break
        time.sleep(0.05)
    Workers.signal(sink, signal.SIGTERM)
    assert sink.wait(timeout=30) == 0, workers.log(sink)[-2000:]
    monkeypatch.setenv("TRACE_TAPS", json.dumps(declared))
    monkeypatch.setenv("TRACE_S3_ENDPOINT_URL", s3_server.endpoint_url)
    settings = get_settings()
    records = list(read_records(settings, settings.tap_configs()[0]))
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert [BufferMessage.from_dict(r["event"]) for r in records] == messages
    engine.dispose()


@pytest.fixture
def hanging_endpoint() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a stalled destination)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in accepted:
        conn.close()
    listener.close()


def _dropped_metric(tap: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "trace_tap_events_total", {"tap": tap, "outcome": "dropped"}
    )
    return value or 0.0


def test_a_full_buffer_drops_and_counts_while_commits_complete(
    tap_env: Any,
    hanging_endpoint: str,
    s3_bucket: str,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    state_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tap_env(
        [
            {
                "name": "stalled",
                "source": "commits",
                "to": "s3://audit/taps",
                "buffer": 3,
                "batch": 1,
            }
        ],
        s3_endpoint=hanging_endpoint,
    )
    dropped_before = _dropped_metric("stalled")
    writer = state.writer(objects)
    for i in range(8):
        writer.write("blocks", KEYS[0], PartitionData(_table(5 + i)))
    # the primary path completed: every version committed and current
    assert state.versions().read.current_versions("blocks")[KEYS[0]].version == 8
    tap = taps.hub().get("stalled")
    assert tap.offered == 8 and tap.written == 0
    # at most one event in the writer's hands and three in the buffer: the rest dropped
    assert tap.dropped >= 4
    assert _dropped_metric("stalled") - dropped_before == tap.dropped
    dropped = tap.dropped
    taps.reset(timeout_s=0.5)  # the writer gives up; its counters reach the state database
    [row] = _cli_json(capsys, "taps", "--json")
    assert (row["tap"], row["offered"], row["dropped"], row["written"]) == (
        "stalled",
        8,
        dropped,
        0,
    )
    assert row["failed"] == 8 - dropped


def test_run_events_reach_a_runs_tap_in_order(
    tap_env: Any, s3_bucket: str, state_dsn: str, tmp_path: Path
) -> None:
    tap_env(
        [
            {
                "name": "runs",
                "source": "runs",
                "to": f"s3://{s3_bucket}/taps/runs",
            }
        ]
    )

    @dg.asset
    def tapped_asset() -> int:
        return 1

    parsed = sa.make_url(state_dsn)
    (tmp_path / "dagster.yaml").write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "custom": {
                        "module": "trace_resources.instance.storage",
                        "class": "PooledPostgresStorage",
                        "config": {
                            "postgres_db": {
                                "username": parsed.username,
                                "password": parsed.password,
                                "hostname": parsed.host,
                                "port": parsed.port,
                                "db_name": parsed.database,
                                "scheme": "postgresql+psycopg2",
                            }
                        },
                    }
                },
                "telemetry": {"enabled": False},
            }
        )
    )
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        result = dg.materialize([tapped_asset], instance=instance)
        assert result.success
        stored = [
            (e.dagster_event.event_type.name if e.dagster_event else None, e.step_key)
            for e in instance.all_logs(result.run_id)
        ]
    assert taps.hub().get("runs").flush(20)
    settings = get_settings()
    records = list(read_records(settings, settings.tap_configs()[0]))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert {r["event"]["run_id"] for r in records} == {result.run_id}
    assert [(r["event"]["event_type"], r["event"]["step_key"]) for r in records] == stored
    assert "RUN_SUCCESS" in [r["event"]["event_type"] for r in records]


def test_a_bad_tap_declaration_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "TRACE_TAPS", json.dumps([{"name": "audit", "source": "commits", "to": "ftp://x/y"}])
    )
    assert trace_main(["taps"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "TRACE_TAPS entry 1 ('audit'): to:" in err and "s3://<bucket>/<prefix>" in err
