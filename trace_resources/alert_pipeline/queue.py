"""The dataset buffer on the SQS API: messages of (dedupe_key, payload, destination).

At-least-once: a received message stays in the queue (hidden for the visibility timeout) until
the sink deletes it after its upsert committed; a sink that dies before deleting lets the
message reappear, and the upsert's `ON CONFLICT (dedupe_key) DO NOTHING` absorbs the repeat.

Packing: one `send` packs up to `pack` buffer messages into one SQS message (body
`{"messages": [...]}`, at most 256 KiB, the SQS limit), ten SQS messages per SendMessageBatch.
SQS bills and rate-limits per request and per 64 KiB, so a range's hundred alerts cost a
handful of requests instead of a hundred; the receiver unpacks them and acknowledges an SQS
message only after every buffer message in it was upserted. A body holding one message
(`{"dedupe_key": …}`, the unpacked form) is read as well.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BufferMessage", "Received", "SqsBuffer", "DEFAULT_PACK", "MAX_BODY_BYTES"]

_SQS_BATCH = 10  # the SQS API's limit per SendMessageBatch / ReceiveMessage / DeleteMessageBatch
MAX_BODY_BYTES = 256 * 1024  # SQS: per message, and per SendMessageBatch request
DEFAULT_PACK = 100  # buffer messages per SQS message (alerts are ~0.5 KiB: < 64 KiB)


@dataclass(frozen=True)
class BufferMessage:
    dedupe_key: str
    payload: dict[str, Any]
    destination: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dedupe_key": self.dedupe_key,
            "payload": self.payload,
            "destination": self.destination,
        }

    def body(self) -> str:
        return _dumps(self.as_dict())

    @classmethod
    def from_dict(cls, data: Any) -> BufferMessage:
        return cls(str(data["dedupe_key"]), dict(data["payload"]), dict(data["destination"]))

    @classmethod
    def from_body(cls, body: str) -> BufferMessage:
        return cls.from_dict(json.loads(body))


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def unpack(body: str) -> tuple[BufferMessage, ...]:
    """The buffer messages of one SQS body (packed or single); ValueError when it does not
    parse, so the whole body goes to the dead letters as it was sent."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            messages = tuple(BufferMessage.from_dict(m) for m in data["messages"])
        else:
            messages = (BufferMessage.from_dict(data),)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a buffer message body: {exc}") from exc
    if not messages:
        raise ValueError("not a buffer message body: no messages")
    return messages


@dataclass(frozen=True)
class Received:
    """One SQS message: its buffer messages (none: a body that does not parse, poison)."""

    messages: tuple[BufferMessage, ...]
    receipt: str
    message_id: str
    raw: str

    @property
    def poison(self) -> bool:
        return not self.messages


class SqsBuffer:
    """One SQS queue (created on first use if missing)."""

    def __init__(
        self,
        queue: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        visibility_timeout_s: int = 30,
        pack: int = DEFAULT_PACK,
    ) -> None:
        if pack < 1:
            raise ValueError(f"pack must be at least 1 buffer message per SQS message, got {pack}")
        # imported here, not with the module: the code location imports this module for its
        # types, and boto3 costs ~0.3 s that a run without alerts (a raw backfill) never needs
        import boto3

        self.client = boto3.client("sqs", endpoint_url=endpoint_url, region_name=region)
        self.visibility_timeout_s = visibility_timeout_s
        self.pack = pack
        self.queue_url: str = self.client.create_queue(
            QueueName=queue,
            Attributes={"VisibilityTimeout": str(visibility_timeout_s)},
        )["QueueUrl"]

    # -- sending ---------------------------------------------------------------------------

    def _bodies(self, messages: Iterable[BufferMessage]) -> Iterable[tuple[str, int]]:
        """(SQS body, buffer messages in it): up to `pack` messages, at most MAX_BODY_BYTES."""
        parts: list[str] = []
        size = 0
        overhead = len('{"messages":[]}')
        for message in messages:
            part = message.body()
            part_size = len(part.encode())
            if part_size + overhead > MAX_BODY_BYTES:
                raise ValueError(
                    f"buffer message {message.dedupe_key!r} is {part_size} bytes; SQS takes at "
                    f"most {MAX_BODY_BYTES} per message: keep alert payloads small (link to "
                    "the data instead of embedding it)"
                )
            if parts and (
                len(parts) == self.pack or overhead + size + len(parts) + part_size > MAX_BODY_BYTES
            ):
                yield '{"messages":[' + ",".join(parts) + "]}", len(parts)
                parts, size = [], 0
            parts.append(part)
            size += part_size
        if parts:
            yield '{"messages":[' + ",".join(parts) + "]}", len(parts)

    def send(self, messages: Iterable[BufferMessage]) -> int:
        """Publish; returns the buffer messages sent (not the SQS messages)."""
        batch: list[str] = []
        batch_bytes = 0
        sent = 0
        counted = 0
        for body, n in self._bodies(messages):
            body_bytes = len(body.encode())
            if batch and (len(batch) == _SQS_BATCH or batch_bytes + body_bytes > MAX_BODY_BYTES):
                self._send_batch(batch)
                sent += counted
                batch, batch_bytes, counted = [], 0, 0
            batch.append(body)
            batch_bytes += body_bytes
            counted += n
        if batch:
            self._send_batch(batch)
            sent += counted
        return sent

    def _send_batch(self, bodies: Sequence[str]) -> None:
        entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
        for _ in range(5):
            result = self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            failed = {f["Id"] for f in result.get("Failed", [])}
            entries = [e for e in entries if e["Id"] in failed]
            if not entries:
                return
        raise RuntimeError(f"SQS refused {len(entries)} message(s) five times")

    # -- receiving -------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: int = 1) -> list[Received]:
        """SQS messages holding up to about `max_messages` buffer messages (several
        ReceiveMessage calls); waits only on the first.

        Asks for no more SQS messages than could hold `max_messages` when senders pack at most
        `pack` each, so a batch exceeds `max_messages` only when one SQS message alone does.
        Stops collecting after a third of the visibility timeout, so the batch is upserted and
        acknowledged while its messages are still hidden (else they would cycle forever).
        """
        received: list[Received] = []
        count = 0
        wait = wait_s
        deadline = None
        while count < max_messages:
            if deadline is not None and time.monotonic() > deadline:
                break
            room = (max_messages - count) // self.pack
            if room == 0 and received:
                break
            response = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(_SQS_BATCH, max(1, room)),
                WaitTimeSeconds=wait,
            )
            got = response.get("Messages", [])
            if not got:
                break
            if deadline is None:
                deadline = time.monotonic() + self.visibility_timeout_s / 3
            for m in got:
                try:
                    messages = unpack(m["Body"])
                except ValueError:
                    messages = ()
                received.append(Received(messages, m["ReceiptHandle"], m["MessageId"], m["Body"]))
                count += max(1, len(messages))
            wait = 0
        return received

    def delete(self, receipts: Sequence[str]) -> int:
        """Acknowledge; returns how many the queue refused (e.g. a receipt that expired
        because the message became visible again: it will be redelivered, and deduplicated)."""
        refused = 0
        for start in range(0, len(receipts), _SQS_BATCH):
            chunk = receipts[start : start + _SQS_BATCH]
            result = self.client.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(chunk)],
            )
            refused += len(result.get("Failed", []))
        return refused

    def approximate_depth(self) -> int:
        """SQS messages in the queue, visible or in flight (each holds up to `pack` buffer
        messages)."""
        attrs = self.client.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )
