"""The dataset buffer on the SQS API: messages of (dedupe_key, payload, destination).

At-least-once: a received message stays in the queue (hidden for the visibility timeout) until
the sink deletes it after its upsert committed; a sink that dies before deleting lets the
message reappear, and the upsert's `ON CONFLICT (dedupe_key) DO NOTHING` absorbs the repeat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import boto3

__all__ = ["BufferMessage", "Received", "SqsBuffer"]

_SQS_BATCH = 10  # the SQS API's limit per SendMessageBatch / ReceiveMessage / DeleteMessageBatch


@dataclass(frozen=True)
class BufferMessage:
    dedupe_key: str
    payload: dict[str, Any]
    destination: dict[str, Any]

    def body(self) -> str:
        return json.dumps(
            {
                "dedupe_key": self.dedupe_key,
                "payload": self.payload,
                "destination": self.destination,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_body(cls, body: str) -> BufferMessage:
        data = json.loads(body)
        return cls(str(data["dedupe_key"]), dict(data["payload"]), dict(data["destination"]))


@dataclass(frozen=True)
class Received:
    message: BufferMessage | None  # None: a body that does not parse (poison)
    receipt: str
    message_id: str
    raw: str


class SqsBuffer:
    """One SQS queue (created on first use if missing)."""

    def __init__(
        self,
        queue: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        visibility_timeout_s: int = 30,
    ) -> None:
        self.client = boto3.client("sqs", endpoint_url=endpoint_url, region_name=region)
        self.visibility_timeout_s = visibility_timeout_s
        self.queue_url: str = self.client.create_queue(
            QueueName=queue,
            Attributes={"VisibilityTimeout": str(visibility_timeout_s)},
        )["QueueUrl"]

    def send(self, messages: Iterable[BufferMessage]) -> int:
        batch: list[BufferMessage] = []
        sent = 0
        for message in messages:
            batch.append(message)
            if len(batch) == _SQS_BATCH:
                sent += self._send_batch(batch)
                batch = []
        if batch:
            sent += self._send_batch(batch)
        return sent

    def _send_batch(self, batch: Sequence[BufferMessage]) -> int:
        entries = [{"Id": str(i), "MessageBody": m.body()} for i, m in enumerate(batch)]
        for _ in range(5):
            result = self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            failed = {f["Id"] for f in result.get("Failed", [])}
            entries = [e for e in entries if e["Id"] in failed]
            if not entries:
                return len(batch)
        raise RuntimeError(f"SQS refused {len(entries)} message(s) five times")

    def receive(self, max_messages: int, wait_s: int = 1) -> list[Received]:
        """Up to `max_messages` (several ReceiveMessage calls); waits only on the first.

        Stops collecting after a third of the visibility timeout, so the batch is upserted and
        acknowledged while its messages are still hidden (else they would cycle forever).
        """
        received: list[Received] = []
        wait = wait_s
        deadline = None
        while len(received) < max_messages:
            if deadline is not None and time.monotonic() > deadline:
                break
            response = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(_SQS_BATCH, max_messages - len(received)),
                WaitTimeSeconds=wait,
            )
            got = response.get("Messages", [])
            if not got:
                break
            if deadline is None:
                deadline = time.monotonic() + self.visibility_timeout_s / 3
            for m in got:
                try:
                    message: BufferMessage | None = BufferMessage.from_body(m["Body"])
                except (ValueError, KeyError, TypeError):
                    message = None
                received.append(Received(message, m["ReceiptHandle"], m["MessageId"], m["Body"]))
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
        attrs = self.client.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )
