"""The sink: drains the alert buffer into Postgres data, never duplicating a row.

One cycle: receive up to `batch` messages, drop repeated dedupe_keys within the batch, then in
ONE transaction `INSERT … ON CONFLICT (dedupe_key) DO NOTHING` the alerts and their pending
per-channel delivery rows (and the `alert.raised` hop of each new alert that carries a
correlation id, `trace_resources.event_history`), commit, and only then delete the messages
from the queue. A sink killed anywhere in between loses nothing (the messages reappear after
the visibility timeout) and duplicates nothing (the repeat hits the conflict). Bodies that do
not parse go to the buffer's dead-letter queue (`<queue>-dlq`) so they never block the others.

Run as a long-lived worker: `python -m trace_resources.alert_pipeline.sink`. On SIGTERM (or
SIGINT) it stops receiving new long-polls, finishes the batch in hand, drains what is left in
the queue with short polls, flushes, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources import taps
from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.queue import BufferMessage, Received, SqsBuffer
from trace_resources.event_history import CORRELATION_ID, process_name, record_hops
from trace_resources.settings import Settings, get_settings
from trace_resources.storage.crash import crash_point
from trace_resources.telemetry import TRACEPARENT, Tracing
from trace_resources.worker_metrics import SinkMetrics

__all__ = ["Sink", "SinkStats", "dedupe_batch", "insert_new", "upsert_messages", "main"]

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    poison: int = 0
    batches: int = 0


def dedupe_batch(messages: Sequence[BufferMessage]) -> list[BufferMessage]:
    """First message of each dedupe_key, in order: a batch holding a key twice must not fail
    (Postgres refuses `ON CONFLICT` touching one row twice in one statement)."""
    seen: set[str] = set()
    unique = []
    for message in messages:
        if message.dedupe_key not in seen:
            seen.add(message.dedupe_key)
            unique.append(message)
    return unique


def _delivery_rows(message: BufferMessage) -> list[dict[str, Any]]:
    org = str(message.destination.get("org", ""))
    return [
        {"dedupe_key": message.dedupe_key, "channel": f"{org}/{name}", "state": "pending"}
        for name in message.destination.get("channels", [])
    ]


def _raised(message: BufferMessage) -> dict[str, Any]:
    """The `alert.raised` hop of a new alert (recorded only if it carries a correlation id)."""
    dest = message.destination
    return {
        "correlation_id": dest.get(CORRELATION_ID),
        "hop": "alert.raised",
        "process": process_name("trace-alert-sink"),
        "org": str(dest.get("org", "")),
        "details": {
            "dedupe_key": message.dedupe_key,
            "kind": str(message.payload.get("type", "alert")),
            "rule_id": dest.get("rule_id"),
            "rule_version": dest.get("rule_version"),
            "channels": list(dest.get("channels", [])),
        },
    }


_INSERT_ALERTS = (
    pg_insert(t.alerts)
    .on_conflict_do_nothing(index_elements=["dedupe_key"])
    .returning(t.alerts.c.dedupe_key)
)
# RETURNING makes psycopg2 run it as multi-row INSERTs too (without: one INSERT per row)
_INSERT_DELIVERIES = (
    pg_insert(t.deliveries)
    .on_conflict_do_nothing(index_elements=["dedupe_key", "channel"])
    .returning(t.deliveries.c.dedupe_key)
)


def upsert_messages(engine: sa.Engine, messages: Sequence[BufferMessage]) -> int:
    """Upsert alerts and their delivery rows in one transaction; returns rows inserted."""
    return len(insert_new(engine, messages))


def insert_new(engine: sa.Engine, messages: Sequence[BufferMessage]) -> list[BufferMessage]:
    """Upsert alerts and their delivery rows in one transaction; returns the messages whose
    rows were new, in the batch's order.

    One cached statement executed over the batch (SQLAlchemy's insertmanyvalues: multi-row
    INSERTs of up to 1,000 rows), not a statement compiled anew for every batch.
    """
    unique = dedupe_batch(messages)
    if not unique:
        return []
    with engine.begin() as conn:
        inserted = (
            conn.execute(
                _INSERT_ALERTS,
                [
                    {
                        "dedupe_key": m.dedupe_key,
                        "org": str(m.destination.get("org", "")),
                        "kind": str(m.payload.get("type", "alert")),
                        "payload": m.payload,
                        "destination": m.destination,
                    }
                    for m in unique
                ],
            )
            .scalars()
            .all()
        )
        new = set(inserted)
        rows = [r for m in unique if m.dedupe_key in new for r in _delivery_rows(m)]
        if rows:
            conn.execute(_INSERT_DELIVERIES, rows).all()
        record_hops(conn, [_raised(m) for m in unique if m.dedupe_key in new])
    return [m for m in unique if m.dedupe_key in new]


class Sink:
    def __init__(
        self,
        buffer: SqsBuffer,
        engine: sa.Engine,
        *,
        batch: int = 100,
        dead_letters: SqsBuffer | None = None,
        metrics: SinkMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.buffer = buffer
        self.engine = engine
        self.batch = batch
        self.dead_letters = dead_letters
        self.stats = SinkStats()
        self.metrics = metrics
        self.tracing = tracing
        self.stopping = threading.Event()

    def cycle(self, wait_s: int = 1) -> int:
        """Receive, upsert, acknowledge one batch; returns buffer messages handled (an
        unparseable SQS message counts as one)."""
        received = self.buffer.receive(self.batch, wait_s=wait_s)
        if not received:
            return 0
        self._handle(received)
        return sum(max(1, len(r.messages)) for r in received)

    def _handle(self, received: list[Received]) -> None:
        good = [r for r in received if not r.poison]
        poison = [r for r in received if r.poison]
        if poison:
            self._dead_letter(poison)
        messages = [m for r in good for m in r.messages]
        started = time.perf_counter()
        spans, messages = self._traced(messages)
        try:
            accepted = insert_new(self.engine, messages)
            inserted = len(accepted)
            for message in accepted:  # the alert stream's wire taps (non-blocking)
                taps.offer(
                    "alerts", message.as_dict(), selector=str(message.destination.get("org"))
                )
            crash_point("sink.after_upsert")
            self.buffer.delete([r.receipt for r in good])
        finally:
            for span in spans:
                span.end()
        if self.metrics is not None:
            self.metrics.received.inc(len(messages))
            self.metrics.inserted.inc(inserted)
            self.metrics.duplicates.inc(len(messages) - inserted)
            self.metrics.poison.inc(len(poison))
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.stats.received += len(messages) + len(poison)
        self.stats.inserted += inserted
        self.stats.duplicates += len(messages) - inserted
        self.stats.poison += len(poison)
        self.stats.batches += 1

    def _traced(self, messages: list[BufferMessage]) -> tuple[list[Any], list[BufferMessage]]:
        """One `alert.sink` span per trace the batch's messages came with (the child of the
        span that published them); each message then carries its sink span's traceparent
        into the alert's row, where the deliverer picks it up."""
        if self.tracing is None or not self.tracing.enabled:
            return [], messages
        spans: dict[str, Any] = {}
        handed_on: dict[str, str | None] = {}
        counts: dict[str, int] = {}
        out = []
        for message in messages:
            parent = message.destination.get(TRACEPARENT)
            if not isinstance(parent, str):
                out.append(message)
                continue
            if parent not in spans:
                spans[parent] = self.tracing.start("alert.sink", parent=parent)
                handed_on[parent] = self.tracing.traceparent(spans[parent])
            destination = {**message.destination, TRACEPARENT: handed_on[parent]}
            out.append(BufferMessage(message.dedupe_key, message.payload, destination))
            counts[parent] = counts.get(parent, 0) + 1
        for parent, span in spans.items():
            span.set_attribute("alert.messages", counts[parent])
        return list(spans.values()), out

    def _dead_letter(self, poison: list[Received]) -> None:
        if self.dead_letters is None:
            return  # left in the queue; SQS's redrive policy (if any) moves it
        for bad in poison:
            self.dead_letters.client.send_message(
                QueueUrl=self.dead_letters.queue_url, MessageBody=bad.raw
            )
        self.buffer.delete([p.receipt for p in poison])
        log.warning("moved %d unparseable buffer message(s) to the dead letters", len(poison))

    def run(self, idle_wait_s: int = 2) -> SinkStats:
        """Until `stopping` is set; then drain what is left (short polls) and return."""
        while not self.stopping.is_set():
            self.cycle(wait_s=idle_wait_s)
        log.info("sink stopping: draining the buffer")
        while self.cycle(wait_s=0):
            pass
        log.info(
            "sink stopped: %d received, %d inserted, %d duplicates, %d poison",
            self.stats.received,
            self.stats.inserted,
            self.stats.duplicates,
            self.stats.poison,
        )
        return self.stats


def buffer_from_settings(settings: Settings, queue: str | None = None) -> SqsBuffer:
    return SqsBuffer(
        queue or settings.alerts_queue,
        endpoint_url=settings.sqs_endpoint_url,
        region=settings.s3_region,
        visibility_timeout_s=settings.alerts_visibility_timeout_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trace_resources.alert_pipeline.sink", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--queue", help="queue name (default: TRACE_ALERTS_QUEUE)")
    parser.add_argument("--idle-wait", type=int, default=2, help="long-poll seconds when idle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sink %(levelname)s %(message)s")
    settings = get_settings()
    queue = args.queue or settings.alerts_queue
    metrics = SinkMetrics(settings.sink_metrics_port, settings.metrics_host)
    tracing = Tracing.configured("trace-alert-sink", settings.otlp_endpoint)
    taps.configure(settings.tap_configs(), settings)  # a bad TRACE_TAPS stops it here
    sink = Sink(
        buffer_from_settings(settings, queue),
        t.data_engine(settings.data_dsn),
        batch=settings.alerts_sink_batch,
        dead_letters=buffer_from_settings(settings, f"{queue}-dlq"),
        metrics=metrics,
        tracing=tracing,
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        sink.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("sink ready on queue %s", queue)  # from here on SIGTERM drains and flushes
    started = time.monotonic()
    try:
        stats = sink.run(idle_wait_s=args.idle_wait)
    finally:
        tracing.shutdown()
        metrics.close()
    log.info("sink ran %.1fs, %d batches", time.monotonic() - started, stats.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
