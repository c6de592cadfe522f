"""Replay: a tap's records, read back from its S3 prefix, re-sent to a downstream consumer.

Records are read per producing process in sequence order and merged by the time they were
offered, so every process's events keep their order. Each record's `event` is re-sent as
the original stream carried it: to `sqs://<queue>` as the message body (e.g. an alert tap's
buffer messages, which the alert sink reads), to `http(s)://…` as a POSTed JSON body; the
tap, producer and sequence number go along as message attributes or `X-Trace-Tap*` headers.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from trace_resources.errors import LeaseLostError, TraceError
from trace_resources.settings import Settings, TapConfig

__all__ = ["ReplayError", "ReplayOutcome", "read_records", "replay", "parse_since"]

Record = dict[str, Any]
_SQS_BATCH = 10
_CHECK_S = 1.0  # the replay's lease is checked in Postgres at least this often


class ReplayError(TraceError):
    """A replay that can not start or stopped (one line: what and how to go on)."""


@dataclass
class ReplayOutcome:
    sent: int = 0
    producers: int = 0
    gaps: int = 0  # sequence numbers missing within a producer (dropped events)


def parse_since(text: str | None) -> float | None:
    """`--since`: an ISO-8601 time (UTC unless it says otherwise) or Unix seconds."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            f"--since {text!r} is no time: give ISO-8601 (2026-12-05T02:00:00Z) or Unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.now().astimezone().tzinfo).astimezone()
    return moment.timestamp()


def _s3(settings: Settings) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)


def read_records(
    settings: Settings,
    tap: TapConfig,
    *,
    since: float | None = None,
    outcome: ReplayOutcome | None = None,
) -> Iterator[Record]:
    """The tap's records, each producer's in sequence order, merged by offer time."""
    parts = urlsplit(tap.to)
    if parts.scheme != "s3":
        raise ReplayError(
            f"tap {tap.name!r} sends to a queue ({tap.to}); replay reads the records an s3:// "
            "tap keeps: declare the tap with to: s3://<bucket>/<prefix> to replay it"
        )
    bucket, prefix = parts.netloc, parts.path.strip("/")
    client = _s3(settings)
    by_producer: dict[str, list[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rest = key[len(prefix) + 1 :] if prefix else key
            producer, _, name = rest.partition("/")
            if name.endswith(".ndjson"):
                by_producer.setdefault(producer, []).append(key)
    if outcome is not None:
        outcome.producers = len(by_producer)

    def stream(keys: list[str]) -> Iterator[tuple[float, str, int, Record]]:
        last = 0
        for key in sorted(keys):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            for line in body.splitlines():
                record = json.loads(line)
                seq = int(record["seq"])
                if seq <= last:
                    continue  # a batch rewritten after an unknown outcome
                if outcome is not None and seq > last + 1:
                    outcome.gaps += seq - last - 1
                last = seq
                if since is None or float(record["at"]) >= since:
                    yield float(record["at"]), str(record["producer"]), seq, record

    merged = heapq.merge(*(stream(keys) for keys in by_producer.values()))
    for _, _, _, record in merged:
        yield record


def _to_sqs(settings: Settings, name: str, records: Iterable[Record]) -> int:
    import boto3

    client = boto3.client(
        "sqs", endpoint_url=settings.sqs_endpoint_url, region_name=settings.s3_region
    )
    try:
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    except client.exceptions.QueueDoesNotExist:
        raise ReplayError(f"no SQS queue {name!r}: create it, or name an existing one") from None
    fifo = name.endswith(".fifo")
    sent = 0
    chunk: list[Record] = []

    def flush() -> None:
        nonlocal sent
        entries = []
        for i, r in enumerate(chunk):
            entry: dict[str, Any] = {
                "Id": str(i),
                "MessageBody": json.dumps(r["event"], sort_keys=True, separators=(",", ":")),
                "MessageAttributes": {
                    "trace-tap": {"DataType": "String", "StringValue": str(r["tap"])},
                    "trace-tap-producer": {"DataType": "String", "StringValue": str(r["producer"])},
                    "trace-tap-seq": {"DataType": "Number", "StringValue": str(r["seq"])},
                },
            }
            if fifo:
                entry["MessageGroupId"] = str(r["tap"])
                entry["MessageDeduplicationId"] = f"replay-{r['producer']}-{r['seq']}"[-128:]
            entries.append(entry)
        result = client.send_message_batch(QueueUrl=url, Entries=entries)
        if result.get("Failed"):
            raise ReplayError(
                f"SQS refused {len(result['Failed'])} message(s) after {sent} sent; run again "
                f"with --since {chunk[0]['at']} to go on from there"
            )
        sent += len(chunk)
        chunk.clear()

    for record in records:
        chunk.append(record)
        if len(chunk) == _SQS_BATCH:
            flush()
    if chunk:
        flush()
    return sent


def _to_webhook(url: str, records: Iterable[Record]) -> int:
    import httpx

    sent = 0
    with httpx.Client(timeout=30) as client:
        for r in records:
            response = client.post(
                url,
                content=json.dumps(r["event"], sort_keys=True, separators=(",", ":")),
                headers={
                    "Content-Type": "application/json",
                    "X-Trace-Tap": str(r["tap"]),
                    "X-Trace-Tap-Producer": str(r["producer"]),
                    "X-Trace-Tap-Seq": str(r["seq"]),
                },
            )
            if response.status_code >= 300:
                raise ReplayError(
                    f"{url} answered {response.status_code} to record {r['producer']}/{r['seq']} "
                    f"after {sent} sent; fix the receiver and run again with --since {r['at']}"
                )
            sent += 1
    return sent


def replay(
    settings: Settings, tap: TapConfig, destination: str, *, since: float | None = None
) -> ReplayOutcome:
    """Re-send the tap's records (offered at `since` or later) to `destination`.

    One replay of a tap at a time: it holds the leader lease `tap-replay:<tap>` (renewed by a
    thread) and checks it before each send, so a second replay is refused while one runs and a
    replay paused past its lease (another has taken over since) stops at its next send instead
    of re-driving the consumer a second time."""
    parts = urlsplit(destination)
    if parts.scheme == "sqs" and parts.netloc:
        send: Callable[[Iterable[Record]], int] = lambda records: _to_sqs(  # noqa: E731
            settings, parts.netloc, records
        )
    elif parts.scheme in ("http", "https") and parts.netloc:
        send = lambda records: _to_webhook(destination, records)  # noqa: E731
    else:
        raise ReplayError(
            f"--to {destination!r} is no replay destination: use sqs://<queue name> or an "
            "http(s):// URL of the consumer"
        )
    outcome = ReplayOutcome()
    with _replay_lease(settings, tap) as fenced:
        outcome.sent = send(fenced(read_records(settings, tap, since=since, outcome=outcome)))
    return outcome


@contextlib.contextmanager
def _replay_lease(
    settings: Settings, tap: TapConfig
) -> Iterator[Callable[[Iterable[Record]], Iterator[Record]]]:
    """Hold the tap's replay lease for the block; what it yields passes records on only while
    the lease is still this replay's (checked before each record is handed to the sender)."""
    from trace_resources.leases import LeaderLease, default_holder
    from trace_resources.storage.state import engine_for

    engine = engine_for(settings.state_dsn)
    lease = LeaderLease(
        engine,
        f"tap-replay:{tap.name}",
        lease_s=settings.leader_lease_s,
        renew_s=settings.leader_renew_s,
        holder=default_holder("tap-replay"),
    )
    if lease.try_acquire() is None:
        current = lease.current()
        holder = f"{current.holder}, token {current.token}" if current else "another process"
        raise ReplayError(
            f"another replay of tap {tap.name} is running ({holder}): wait for it to end "
            "(`trace leases` shows it) or stop it; two would send every record twice"
        )
    sent = 0

    def fenced(records: Iterable[Record]) -> Iterator[Record]:
        """The records, checked against the lease in Postgres at least once a second (a
        pause longer than that, such as one past the lease, is always checked on waking)."""
        nonlocal sent
        checked = float("-inf")
        for record in records:
            try:
                if not lease.held():
                    raise LeaseLostError("the renewals found it taken")
                if time.monotonic() - checked >= _CHECK_S:
                    with engine.begin() as conn:
                        lease.check(conn)
                    checked = time.monotonic()
            except LeaseLostError as exc:
                raise ReplayError(
                    f"replay of tap {tap.name} stopped after {sent} record(s): it lost its lease "
                    f"(paused or cut off longer than {settings.leader_lease_s:g} s) and another "
                    f"replay has taken over; nothing more is sent from here ({exc})"
                ) from None
            sent += 1
            yield record

    try:
        yield fenced
    finally:
        lease.release()
