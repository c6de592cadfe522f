"""The taps of one process: a bounded buffer and a writer thread per declared tap.

`offer(source, event, selector=...)` is what the primary path calls: it never blocks and
never raises. It gives the event the tap's next sequence number and puts it in the tap's
buffer; a full buffer drops it, and the drop is counted (`trace_tap_events_total{outcome=
"dropped"}` and `trace taps`), so a consumer sees the gap in the sequence numbers.

A record is `{"tap", "source", "producer", "seq", "at", "event"}`; `producer` names the
process (start time, host, pid), whose records' `seq` run 1, 2, 3 … in the order the events
were offered. The writer sends them in that order: an S3 tap writes one object per batch,
`<prefix>/<producer>/<first seq>-<last seq>.ndjson` (a retried write rewrites the same key);
an SQS tap sends one message per record (on a FIFO queue, grouped by tap and deduplicated by
producer and seq). A failing destination is retried with backoff, in order, while new events
fill the buffer and, once it is full, are dropped and counted. The writer saves its counters
to `trace_tap_producers` (state database) after every write.

A forked child (a Dagster run forked from a warm worker) starts its own taps when it first
offers: threads do not survive a fork. At exit the writers get up to `EXIT_FLUSH_S` to send
what is buffered; what they could not send is counted as failed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from trace_resources.settings import Settings, TapConfig, TapSource

__all__ = ["Hub", "Tap", "configure", "hub", "offer", "reset", "tap_metric", "EXIT_FLUSH_S"]

log = logging.getLogger(__name__)

EXIT_FLUSH_S = 5.0
_BACKOFF_MAX_S = 5.0
_SQS_BATCH = 10

Record = dict[str, Any]
Sender = Callable[[Sequence[Record]], None]


def producer_id() -> str:
    """Names this process, sorting by start time: `20261205T020000Z-host-1234-ab12`."""
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{started}-{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def tap_metric() -> Any:
    """`trace_tap_events_total{tap, outcome}`, created once per process in the default
    Prometheus registry; a process serving its own registry registers it there too
    (`registry.register(tap_metric())`). None without prometheus_client."""
    global _COUNTER
    if _COUNTER is None:
        try:
            from prometheus_client import Counter
        except ImportError:  # pragma: no cover - a dependency of the project
            return None
        _COUNTER = Counter(
            "trace_tap_events",
            "Events offered to a wire tap, by outcome: offered, written, dropped (buffer "
            "full), failed (not sent when the process stopped).",
            ["tap", "outcome"],
        )
    return _COUNTER


_COUNTER: Any = None


def _client(service: str, endpoint_url: str | None, region: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
    )


def s3_sender(config: TapConfig, producer: str, *, endpoint_url: str | None, region: str) -> Sender:
    parts = urlsplit(config.to)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    clients: list[Any] = []

    def send(records: Sequence[Record]) -> None:
        if not clients:  # in the writer thread: boto3's import and client cost ~0.3 s
            clients.append(_client("s3", endpoint_url, region))
        first, last = records[0]["seq"], records[-1]["seq"]
        key = f"{prefix}/{producer}/{first:012d}-{last:012d}.ndjson".lstrip("/")
        body = "".join(_dumps(r) + "\n" for r in records).encode()
        clients[0].put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson")

    return send


def sqs_sender(config: TapConfig, *, endpoint_url: str | None, region: str) -> Sender:
    name = urlsplit(config.to).netloc
    fifo = name.endswith(".fifo")
    url: list[str] = []
    clients: list[Any] = []

    def send(records: Sequence[Record]) -> None:
        if not clients:  # in the writer thread, as for S3
            clients.append(_client("sqs", endpoint_url, region))
        client = clients[0]
        if not url:
            url.append(client.get_queue_url(QueueName=name)["QueueUrl"])
        for start in range(0, len(records), _SQS_BATCH):
            chunk = records[start : start + _SQS_BATCH]
            entries: list[dict[str, Any]] = []
            for i, r in enumerate(chunk):
                entry: dict[str, Any] = {"Id": str(i), "MessageBody": _dumps(r)}
                if fifo:
                    entry["MessageGroupId"] = r["tap"]
                    entry["MessageDeduplicationId"] = f"{r['producer']}-{r['seq']}"[-128:]
                entries.append(entry)
            result = client.send_message_batch(QueueUrl=url[0], Entries=entries)
            if result.get("Failed"):
                # the whole chunk again (a standard queue may then hold a repeat: consumers
                # check (producer, seq)); a FIFO queue deduplicates it
                raise RuntimeError(f"SQS refused {len(result['Failed'])} tap message(s)")

    return send


class Tap:
    """One tap in this process: the bounded buffer, the sequence, the writer thread."""

    def __init__(
        self,
        config: TapConfig,
        send: Sender,
        *,
        producer: str,
        save: Callable[[Tap], None] | None = None,
    ) -> None:
        self.config = config
        self.producer = producer
        self._send = send
        self._save = save
        self._buffer: queue.Queue[Record] = queue.Queue(maxsize=config.buffer)
        self._lock = threading.Lock()
        self.seq = 0
        self.offered = 0
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self._abandoned = False
        self._hurry = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tap-{config.name}", daemon=True)
        self._thread.start()

    # -- the primary path ------------------------------------------------------------------

    def offer(self, event: dict[str, Any]) -> bool:
        """Buffer the event (True) or drop and count it (False); never blocks."""
        with self._lock:
            self.seq += 1
            self.offered += 1
            record = {
                "tap": self.config.name,
                "source": self.config.source,
                "producer": self.producer,
                "seq": self.seq,
                "at": time.time(),
                "event": event,
            }
            try:
                self._buffer.put_nowait(record)
                accepted = True
            except queue.Full:
                self.dropped += 1
                accepted = False
        counter = tap_metric()
        if counter is not None:
            counter.labels(self.config.name, "offered").inc()
            if not accepted:
                counter.labels(self.config.name, "dropped").inc()
        return accepted

    # -- the writer ------------------------------------------------------------------------

    def _next_batch(self) -> list[Record]:
        try:
            first = self._buffer.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.flush_s
        while len(batch) < self.config.batch:
            try:
                batch.append(self._buffer.get_nowait())
                continue
            except queue.Empty:
                pass
            wait = min(deadline - time.monotonic(), 0.05)
            if wait <= 0 or self._stopping.is_set() or self._hurry.is_set():
                break
            try:
                batch.append(self._buffer.get(timeout=wait))
            except queue.Empty:
                continue
        return batch

    def _deliver(self, batch: list[Record]) -> bool:
        """Send the batch, retrying with backoff until it is sent or the tap stops."""
        wait = 0.2
        while True:
            try:
                self._send(batch)
                return True
            except Exception as exc:  # noqa: BLE001 - any destination failure is retried
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("tap %s: write failed (%s); retrying", self.config.name, exc)
                if not self._abandoned:
                    self._save_counters()  # `trace taps` shows the error while it retries
                if self._stopping.wait(wait):
                    return False
                wait = min(wait * 2, _BACKOFF_MAX_S)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._stopping.is_set():
                    break
                continue
            sent = self._deliver(batch)
            with self._lock:
                if self._abandoned:
                    break  # `stop` gave up on this writer and counted what it held
                if sent:
                    self.written += len(batch)
                    self.last_error = None
                else:
                    self.failed += len(batch)
            counter = tap_metric()
            if counter is not None:
                counter.labels(self.config.name, "written" if sent else "failed").inc(len(batch))
            self._save_counters()
            if not sent:
                break
        if self._abandoned:
            return
        self._drain_as_failed()
        self._save_counters()

    def _drain_as_failed(self) -> None:
        lost = 0
        while not self._abandoned:
            try:
                self._buffer.get_nowait()
            except queue.Empty:
                break
            lost += 1
        if lost:
            with self._lock:
                if not self._abandoned:
                    self.failed += lost

    def _save_counters(self) -> None:
        if self._save is None:
            return
        try:
            self._save(self)
        except Exception as exc:  # noqa: BLE001 - counters are best effort, events are not
            log.warning("tap %s: could not save its counters: %s", self.config.name, exc)

    # -- control ---------------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything offered so far was written (True) or timeout_s passed."""
        deadline = time.monotonic() + timeout_s
        self._hurry.set()  # the writer sends what it holds without waiting to fill a batch
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    done = self.written + self.dropped + self.failed >= self.offered
                if done:
                    return True
                time.sleep(0.01)
            return False
        finally:
            self._hurry.clear()

    def stop(self, timeout_s: float = EXIT_FLUSH_S) -> None:
        """Send what is buffered (up to timeout_s), then stop the writer; the rest counts as
        failed."""
        self.flush(timeout_s)
        self._stopping.set()
        self._thread.join(timeout=max(timeout_s, 1.0))
        if self._thread.is_alive():
            # the writer is stuck in a write (a stalled destination): what it has not written
            # is lost with this process; count it, and let the writer's late outcome count nothing
            with self._lock:
                self._abandoned = True
                self.failed = self.offered - self.written - self.dropped
            self._save_counters()


class Hub:
    """The taps of this process, by source."""

    def __init__(self, taps: Sequence[Tap] = ()) -> None:
        self.taps = list(taps)
        self.pid = os.getpid()
        self._engine: Any = None
        self._engine_lock = threading.Lock()

    def engine(self, dsn: str) -> Any:
        """This hub's own pool on the state database (its counters), never shared with a
        forked child (`forget_connections`)."""
        with self._engine_lock:
            if self._engine is None:
                from trace_resources.storage.migrations import open_engine

                self._engine = open_engine(dsn, "state")
            return self._engine

    def forget_connections(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them
        (closing would end the parent's sessions)."""
        if self._engine is not None:
            self._engine.dispose(close=False)

    def for_source(self, source: TapSource) -> list[Tap]:
        return [t for t in self.taps if t.config.source == source]

    def get(self, name: str) -> Tap:
        return next(t for t in self.taps if t.config.name == name)

    def stop(self, timeout_s: float = EXIT_FLUSH_S) -> None:
        for tap in self.taps:
            tap.stop(timeout_s)
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


def _saver(owner: Hub, state_dsn: str) -> Callable[[Tap], None]:
    def save(tap: Tap) -> None:
        from trace_resources.storage.taps import TapCounters, save_counters

        with tap._lock:
            counters = TapCounters(
                tap.config.name,
                tap.producer,
                tap.offered,
                tap.written,
                tap.dropped,
                tap.failed,
                tap.seq,
                tap.last_error,
            )
        save_counters(owner.engine(state_dsn), counters)

    return save


def configure(configs: Sequence[TapConfig], settings: Settings) -> Hub:
    """This process's taps: start them (stopping any started before)."""
    global _HUB
    with _HUB_LOCK:
        if _HUB is not None and _HUB.pid == os.getpid():
            _HUB.stop()
        producer = producer_id()
        owner = Hub()
        taps = []
        for config in configs:
            if config.to.startswith("s3://"):
                send = s3_sender(
                    config,
                    producer,
                    endpoint_url=settings.s3_endpoint_url,
                    region=settings.s3_region,
                )
            else:
                send = sqs_sender(
                    config, endpoint_url=settings.sqs_endpoint_url, region=settings.s3_region
                )
            taps.append(
                Tap(config, send, producer=producer, save=_saver(owner, settings.state_dsn))
            )
        owner.taps = taps
        _HUB = owner
        return _HUB


def hub() -> Hub:
    """This process's taps, started from the settings when first needed. Never raises: a
    setting that does not parse leaves the process without taps (and says so once)."""
    current = _HUB
    if current is not None and current.pid == os.getpid():
        return current
    from trace_resources.settings import get_settings

    try:
        settings = get_settings()
        configs = settings.tap_configs()
    except Exception as exc:  # noqa: BLE001 - the primary path must not fail for a tap
        log.error("wire taps are off in this process: %s", exc)
        with _HUB_LOCK:
            _set_empty()
        return _HUB  # type: ignore[return-value]
    if not configs:
        with _HUB_LOCK:
            _set_empty()
        return _HUB  # type: ignore[return-value]
    return configure(configs, settings)


def _set_empty() -> None:
    global _HUB
    if _HUB is None or _HUB.pid != os.getpid():
        _HUB = Hub()


def offer(source: TapSource, event: dict[str, Any], *, selector: str | None = None) -> None:
    """Offer one event of `source` to every tap of it that selects `selector` (a dataset,
    organisation or job). Never blocks, never raises."""
    try:
        for tap in hub().for_source(source):
            if not tap.config.select or selector in tap.config.select:
                tap.offer(event)
    except Exception as exc:  # noqa: BLE001 - the primary path must not fail for a tap
        log.error("wire tap offer failed: %s", exc)


def reset(timeout_s: float = EXIT_FLUSH_S) -> None:
    """Stop this process's taps (sending what is buffered, up to timeout_s); the next offer
    starts them again from the settings."""
    global _HUB
    with _HUB_LOCK:
        if _HUB is not None and _HUB.pid == os.getpid():
            _HUB.stop(timeout_s)
        _HUB = None


_HUB: Hub | None = None
_HUB_LOCK = threading.RLock()


# hubs inherited over a fork: kept referenced so their pooled connections (the parent's) are
# never closed by garbage collection in the child
_INHERITED: list[Hub] = []


def _forget_in_child() -> None:
    global _HUB, _HUB_LOCK
    if _HUB is not None:
        _HUB.forget_connections()
        _INHERITED.append(_HUB)
    _HUB = None
    _HUB_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(reset)
