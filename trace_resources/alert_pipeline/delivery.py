"""Delivery of upserted alerts to their channels: webhook (HMAC-signed), Slack and email (SMTP).

State lives in `trace_alert_deliveries`, one row per (alert, channel):

- the deliverer claims due rows (`FOR UPDATE SKIP LOCKED`, so any number of deliverers share
  the work), counts the attempt and pushes `next_attempt_at` past a lease in the same
  transaction: a deliverer killed mid-send leaves the row due again once the lease runs out
  (at least once; receivers dedupe on `X-Trace-Dedupe-Key`);
- a channel's token bucket (`trace_alert_channels`) is charged in that transaction; rows over
  the rate wait, without the wait counting as an attempt;
- success marks the row delivered; a failure schedules the next attempt (`retry_schedule`).

The retry schedule lives in the row, so it survives any restart of the deliverers: the first
failure fixes `retry_until` = now + the channel's retry period (its `retry_period_s`, clamped to
the operator's bounds, else TRACE_ALERT_RETRY_PERIOD_S: 24 h); each failure waits
base * 2^(attempt-1) seconds, capped at TRACE_ALERT_BACKOFF_MAX_S and jittered over the upper
half of that, and never less than the receiver's `Retry-After` (429 and 503; seconds or an
HTTP date, cut to TRACE_ALERT_RETRY_AFTER_MAX_S). No attempt is scheduled past `retry_until`:
the last one happens at it, and its failure marks the row `dead` (the dead-letter state that
`trace dlq list` shows and `trace dlq replay` returns to pending with a new period), as does
a `Retry-After` that ends after it. A permanent failure is dead at once: an HTTP 4xx other than
408 and 429, an SMTP 5xx reply, a channel the outbound policy refuses or the rule no longer
has, a secret that does not open. TRACE_ALERT_DELIVERY_MAX_ATTEMPTS is a safety bound only.
Every attempt is a row of `trace_alert_delivery_attempts` (start, end, outcome, Retry-After,
what it scheduled).

Each row is sent in its own worker thread with a time limit and its own outcome, so a poison
alert (a receiver that hangs, answers 5xx, or a channel that no longer exists) never blocks
the others.

Webhook request: POST, body = JSON `{"dedupe_key", "alert"}`, headers
`X-Trace-Timestamp: <unix seconds>`, `X-Trace-Signature: <hex HMAC-SHA256(secret,
"<timestamp>.<body>")>`, `X-Trace-Dedupe-Key`. Slack: POST `{"text": …}`.

Email: one message to all of the channel's recipients over SMTP (stdlib smtplib; STARTTLS or
implicit TLS with certificate checks, optional AUTH), subject `[trace] <alert text>`, a plain
text body with the alert text and its JSON, `Message-ID` derived from the dedupe key and an
`X-Trace-Dedupe-Key` header (so a mail filter can drop the repeat of an at-least-once retry).
A recipient the server refuses fails the attempt: a wrong address surfaces as a dead letter
rather than as silence. The delivery timeout bounds each SMTP step and, roughly, the whole
exchange (each step gets what is left of it).

Receivers are chosen by tenants, so every connection (HTTP and SMTP) goes through the outbound
policy (`outbound.OutboundPolicy`: resolved and checked at each attempt, connected to the
checked address, TLS still verified against the host name) and redirects are never followed.
`last_error`, which the tenant reads, never holds what a receiver said: an HTTP status with its
standard reason phrase, an SMTP reply code with a fixed description, or a fixed category of
connection failure. Channel secrets are opened (`trace_resources.sealed`) only here, when sent.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import hashlib
import hmac
import json
import logging
import random
import signal
import smtplib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from http import HTTPStatus
from types import FrameType
from typing import Any

import httpcore
import httpx
import sqlalchemy as sa
from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.outbound import (
    HostUnresolved,
    OutboundPolicy,
    OutboundRefused,
)
from trace_resources.alert_pipeline.rules import (
    AlertRule,
    AnyChannel,
    EmailChannel,
    RuleStore,
    WebhookChannel,
)
from trace_resources.event_history import CORRELATION_ID, process_name, record_hops
from trace_resources.sealed import Keyring, SealError, is_sealed, secret_context
from trace_resources.settings import Settings, get_settings
from trace_resources.storage.crash import crash_point
from trace_resources.telemetry import TRACEPARENT, Tracing
from trace_resources.worker_metrics import DelivererMetrics

__all__ = [
    "Claim",
    "DeliveryPolicy",
    "Deliverer",
    "backoff_s",
    "expected_attempts",
    "parse_retry_after",
    "sign",
    "verify_signature",
    "main",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the deliverer sends and retries (see the module docstring for the schedule)."""

    max_attempts: int = 250  # a safety bound: the retry period is what ends retries
    backoff_base_s: float = 1.0
    backoff_max_s: float = 3600.0
    retry_period_s: float = 86_400.0
    retry_period_min_s: float = 60.0
    retry_period_max_s: float = 604_800.0
    retry_after_max_s: float = 3600.0
    timeout_s: float = 10.0
    default_rate_per_s: float = 10.0
    concurrency: int = 8

    @property
    def lease_s(self) -> float:
        # longer than one send can take, so a live deliverer's row is never re-claimed
        return self.timeout_s * 3 + 5

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            max_attempts=settings.alert_delivery_max_attempts,
            backoff_base_s=settings.alert_backoff_base_s,
            backoff_max_s=settings.alert_backoff_max_s,
            retry_period_s=settings.alert_retry_period_s,
            retry_period_min_s=settings.alert_retry_period_min_s,
            retry_period_max_s=settings.alert_retry_period_max_s,
            retry_after_max_s=settings.alert_retry_after_max_s,
            timeout_s=settings.alert_delivery_timeout_s,
            default_rate_per_s=settings.alert_channel_rate_per_s,
            concurrency=settings.alert_delivery_concurrency,
        )

    def period_s(self, channel: AnyChannel | None) -> float:
        """The retry period of a channel: its own within the bounds (which may have narrowed
        since the rule was written), else the default."""
        own = getattr(channel, "retry_period_s", None)
        if own is None:
            return self.retry_period_s
        return min(max(float(own), self.retry_period_min_s), self.retry_period_max_s)


def _ceiling_s(attempt: int, policy: DeliveryPolicy) -> float:
    # min() first: 2 ** a large attempt count would overflow a float
    return min(policy.backoff_max_s, policy.backoff_base_s * 2 ** min(max(0, attempt - 1), 64))


def backoff_s(attempt: int, policy: DeliveryPolicy, rng: random.Random | None = None) -> float:
    """Delay after failed attempt `attempt`: base * 2^(attempt-1), capped, jittered over the
    upper half (so retries of many alerts spread out, yet never come early)."""
    ceiling = _ceiling_s(attempt, policy)
    return (rng or random).uniform(ceiling / 2, ceiling)


def expected_attempts(policy: DeliveryPolicy, period_s: float | None = None) -> int:
    """About how many attempts a delivery that always fails gets within a retry period (the
    mean of the jitter; the last attempt happens at the period's end)."""
    period = policy.retry_period_s if period_s is None else period_s
    elapsed, attempts = 0.0, 1
    while attempts < policy.max_attempts:
        elapsed += 0.75 * _ceiling_s(attempts, policy)
        attempts += 1
        if elapsed >= period:
            break
    return attempts


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delay-seconds or an HTTP date, RFC 9110
    10.2.3), or None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def duration(seconds: float) -> str:
    """`90s`, `45m`, `24h`, `1h30m`: a retry period as an operator reads it."""
    whole = round(seconds)
    if whole < 60 or whole % 60:
        return f"{seconds:g}s"
    hours, minutes = divmod(whole // 60, 60)
    return "".join(
        part for part in (f"{hours}h" if hours else "", f"{minutes}m" if minutes else "")
    )


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300.0
) -> bool:
    """What a receiver does: constant-time compare, and refuse stale timestamps (replays)."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def email_message(channel: EmailChannel, claim: Claim) -> EmailMessage:
    """The message one alert sends on an email channel."""
    text = str(claim.payload.get("text") or claim.dedupe_key)
    subject = " ".join(f"[trace] {text}".split())
    message = EmailMessage()
    message["From"] = channel.from_address
    message["To"] = ", ".join(channel.to)
    message["Subject"] = subject if len(subject) <= 200 else subject[:197] + "..."
    digest = hashlib.sha256(claim.dedupe_key.encode()).hexdigest()
    message["Message-ID"] = f"<{digest}@trace.alerts>"
    message["X-Trace-Dedupe-Key"] = claim.dedupe_key
    alert = json.dumps(
        {"dedupe_key": claim.dedupe_key, "alert": claim.payload}, sort_keys=True, indent=2
    )
    message.set_content(f"{text}\n\n{alert}\n")
    return message


# what an SMTP reply code means (the server's own text is never stored: the tenant reads it)
_SMTP_CODES = {
    421: "service not available",
    450: "mailbox unavailable",
    451: "local error in processing",
    452: "insufficient storage",
    454: "temporary authentication failure",
    500: "command not recognised",
    501: "syntax error in parameters",
    502: "command not implemented",
    503: "bad sequence of commands",
    504: "parameter not implemented",
    521: "does not accept mail",
    530: "authentication required",
    534: "authentication mechanism too weak",
    535: "authentication credentials invalid",
    538: "encryption required",
    550: "mailbox unavailable",
    551: "user not local",
    552: "storage allocation exceeded",
    553: "mailbox name not allowed",
    554: "transaction failed",
    555: "parameters not recognised",
}


def smtp_reply(code: int) -> str:
    """`<code> <fixed description>` of an SMTP reply code."""
    meaning = _SMTP_CODES.get(code) or (
        "temporary failure" if 400 <= code < 500 else "permanent failure" if code >= 500 else ""
    )
    return f"{code} {meaning}".strip()


def http_status(code: int) -> str:
    """`HTTP <code> <standard reason phrase>`: never the receiver's own text."""
    try:
        return f"HTTP {code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def connection_failure(exc: BaseException) -> str:
    """A fixed category for a failed connection, from the exception and its causes."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OutboundRefused):
            return f"refused by outbound policy: {seen}"
        if isinstance(seen, ssl.SSLCertVerificationError):
            return "TLS certificate verification failed"
        if isinstance(seen, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ConnectionResetError | BrokenPipeError):
            return "connection reset by the receiver"
        if isinstance(seen, socket.gaierror):
            return "host does not resolve"
        if isinstance(seen, TimeoutError | httpx.TimeoutException | httpcore.TimeoutException):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    return "connection failed"


def _refusals(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt} ({smtp_reply(code)})" for rcpt, (code, _) in sorted(refused.items()))


def _smtp_permanent(refused: dict[str, tuple[int, bytes]]) -> bool:
    """Every recipient refused with a 5xx reply: a permanent failure (RFC 5321 4.2.1)."""
    return bool(refused) and all(code >= 500 for code, _ in refused.values())


class _PinnedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, connecting to an address the outbound policy checked at
    this very connection (TLS above it still uses the URL's host for SNI and certificate
    checks: httpcore passes the origin's host name to `start_tls`)."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        address = self.policy.addresses(host, port)[0]
        return super().connect_tcp(str(address), port, timeout, local_address, socket_options)


def pinned_client(policy: OutboundPolicy, timeout_s: float) -> httpx.Client:
    """An httpx client whose every connection passes the outbound policy; no redirects, no
    proxies from the environment (a proxy would connect where the policy can not see)."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no public way to give its transport a network backend; its pool is rebuilt
    # with the same defaults (httpx.Limits()) and the pinning backend
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=_PinnedBackend(policy),
    )
    return httpx.Client(
        transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False
    )


class _PinnedSMTP(smtplib.SMTP):
    policy: OutboundPolicy
    _host: str

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self.policy.connect(host, port, timeout, self.source_address)


class _PinnedSMTPSSL(smtplib.SMTP_SSL):
    policy: OutboundPolicy
    _host: str

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self.policy.connect(host, port, timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._host)


@dataclass(frozen=True)
class Claim:
    dedupe_key: str
    channel: str
    attempts: int  # this attempt's number within the replay
    payload: dict[str, Any]
    destination: dict[str, Any]
    replays: int = 0


def _attempted(claim: Claim, outcome: str, error: str | None) -> dict[str, Any]:
    """The hop of a delivery attempt's outcome (`alert.delivered`, `alert.retry`,
    `alert.dead`), recorded with the attempt when the alert carries a correlation id."""
    return {
        "correlation_id": claim.destination.get(CORRELATION_ID),
        "hop": f"alert.{outcome}",
        "process": process_name("trace-alert-deliverer"),
        "org": str(claim.destination.get("org", "")),
        "details": {
            "dedupe_key": claim.dedupe_key,
            "channel": claim.channel,
            "attempt": claim.attempts,
            "replay": claim.replays,
            "error": error,
        },
    }


@dataclass
class DelivererStats:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    rate_limited: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)


class DeliveryError(Exception):
    """One attempt failed (the message says why, and is stored as `last_error`).

    `permanent`: retrying can not help (dead-lettered at once); `retry_after_s`: how long the
    receiver asked to wait (its `Retry-After`)."""

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s


def _permanently_refused(exc: BaseException) -> bool:
    """The outbound policy refused the receiver (a host that does not resolve may later)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OutboundRefused):
            return not isinstance(seen, HostUnresolved)
        seen = seen.__cause__ or seen.__context__
    return False


# HTTP answers worth retrying although 4xx: the request timed out, or the receiver throttles
_RETRYABLE_4XX = frozenset({408, 429})
# answers whose Retry-After is honoured
_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class _Decision:
    outcome: str  # delivered | retry | dead
    next_attempt_at: datetime | None = None
    retry_until: datetime | None = None
    reason: str | None = None  # why a dead row is dead


class Deliverer:
    def __init__(
        self,
        engine: sa.Engine,
        policy: DeliveryPolicy | None = None,
        *,
        rng: random.Random | None = None,
        outbound: OutboundPolicy | None = None,
        keyring: Keyring | None = None,
        metrics: DelivererMetrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tracing = tracing or Tracing("trace-alert-deliverer")
        self.policy = policy or DeliveryPolicy()
        if outbound is None or keyring is None:
            settings = get_settings()
            outbound = outbound or OutboundPolicy.from_settings(settings)
            keyring = keyring or Keyring.parse(settings.secrets_keys.get_secret_value())
        self.outbound = outbound
        self.keyring = keyring
        self.rules = RuleStore(engine, outbound=outbound, keyring=keyring)
        self.rng = rng or random.Random()
        self.http = pinned_client(outbound, self.policy.timeout_s)
        self.stats = DelivererStats()
        self.stopping = threading.Event()
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    # -- claiming --------------------------------------------------------------------------

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - rule versions are immutable
    def _rule(self, org: str, rule_id: str, version: int) -> AlertRule | None:
        stored = self.rules.get(org, rule_id, version)
        return None if stored is None else stored.rule

    def _rate(self, claim: Claim) -> float:
        channel = self._channel(claim)
        rate = getattr(channel, "rate_per_s", None) if channel is not None else None
        return float(rate or self.policy.default_rate_per_s)

    def _channel(self, claim: Claim) -> AnyChannel | None:
        dest = claim.destination
        try:
            rule = self._rule(str(dest["org"]), str(dest["rule_id"]), int(dest["rule_version"]))
            return None if rule is None else rule.channel(claim.channel.split("/", 1)[1])
        except (KeyError, ValueError, TypeError, IndexError):
            return None

    def claim(self, limit: int) -> list[Claim]:
        """Claim up to `limit` due rows, within each channel's rate."""
        d, a, at = t.deliveries, t.alerts, t.delivery_attempts
        with self.engine.begin() as conn:
            due = (
                sa.select(d.c.dedupe_key, d.c.channel)
                .where(d.c.state == "pending", d.c.next_attempt_at <= sa.func.now())
                .order_by(d.c.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
                .cte("due")
            )
            rows = conn.execute(
                sa.select(
                    d.c.dedupe_key,
                    d.c.channel,
                    d.c.attempts,
                    d.c.replays,
                    a.c.payload,
                    a.c.destination,
                )
                .join(due, (due.c.dedupe_key == d.c.dedupe_key) & (due.c.channel == d.c.channel))
                .join(a, a.c.dedupe_key == d.c.dedupe_key)
            ).all()
            claims = [
                Claim(r.dedupe_key, r.channel, r.attempts, r.payload, r.destination, r.replays)
                for r in rows
            ]
            allowed, deferred = self._charge_rate(conn, claims)
            lease = sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, self.policy.lease_s)
            if allowed:  # one statement per table for the whole claim, not one per row
                keys = [(c.dedupe_key, c.channel) for c in allowed]
                conn.execute(
                    d.update()
                    .where(sa.tuple_(d.c.dedupe_key, d.c.channel).in_(keys))
                    .values(attempts=d.c.attempts + 1, next_attempt_at=lease)
                )
                # an attempt still open here lost its deliverer (the lease ran out)
                conn.execute(
                    at.update()
                    .where(sa.tuple_(at.c.dedupe_key, at.c.channel).in_(keys))
                    .where(at.c.outcome.is_(None))
                    .values(outcome="lost")
                )
                conn.execute(
                    at.insert(),
                    [
                        {
                            "dedupe_key": c.dedupe_key,
                            "channel": c.channel,
                            "replay": c.replays,
                            "attempt": c.attempts + 1,
                        }
                        for c in allowed
                    ],
                )
            for claim, wait_s in deferred:
                conn.execute(
                    d.update()
                    .where(d.c.dedupe_key == claim.dedupe_key, d.c.channel == claim.channel)
                    .values(
                        next_attempt_at=sa.func.now()
                        + sa.func.make_interval(0, 0, 0, 0, 0, 0, wait_s)
                    )
                )
        with self._stats_lock:
            self.stats.rate_limited += len(deferred)
        if self.metrics is not None and deferred:
            self.metrics.rate_limited.inc(len(deferred))
        return [
            Claim(c.dedupe_key, c.channel, c.attempts + 1, c.payload, c.destination, c.replays)
            for c in allowed
        ]

    def _charge_rate(
        self, conn: sa.Connection, claims: list[Claim]
    ) -> tuple[list[Claim], list[tuple[Claim, float]]]:
        """Token bucket per channel (burst = max(1, rate)), kept in Postgres so every
        deliverer process shares it."""
        by_channel: dict[str, list[Claim]] = {}
        for claim in claims:
            by_channel.setdefault(claim.channel, []).append(claim)
        allowed: list[Claim] = []
        deferred: list[tuple[Claim, float]] = []
        c = t.channels
        for channel, group in sorted(by_channel.items()):
            rate = self._rate(group[0])
            burst = max(1.0, rate)
            conn.execute(
                sa.dialects.postgresql.insert(c)
                .values(channel=channel, tokens=burst)
                .on_conflict_do_nothing(index_elements=["channel"])
            )
            row = conn.execute(
                sa.select(
                    c.c.tokens,
                    sa.func.extract("epoch", sa.func.now() - c.c.updated_at).label("elapsed"),
                )
                .where(c.c.channel == channel)
                .with_for_update()
            ).one()
            tokens = min(burst, row.tokens + max(0.0, float(row.elapsed)) * rate)
            take = min(len(group), int(tokens))
            allowed += group[:take]
            for i, claim in enumerate(group[take:]):
                deferred.append((claim, (i + 1 - (tokens - take)) / rate))
            conn.execute(
                c.update()
                .where(c.c.channel == channel)
                .values(tokens=tokens - take, updated_at=sa.func.now())
            )
        return allowed, deferred

    # -- sending ---------------------------------------------------------------------------

    def _open(self, claim: Claim, channel: AnyChannel, field: str, value: str) -> str:
        """A channel secret in clear, for this send only."""
        if not is_sealed(value):  # stored before secrets were sealed: `trace secrets rotate`
            log.warning(
                "channel %s holds a secret in clear: run `trace secrets rotate`", claim.channel
            )
            return value
        context = secret_context(
            str(claim.destination.get("org")),
            str(claim.destination.get("rule_id")),
            channel.name,
            field,
        )
        try:
            return self.keyring.open(value, context)
        except SealError as exc:
            log.error("channel %s: its %s does not open: %s", claim.channel, field, exc)
            raise DeliveryError(
                f"the channel's {field} can not be opened (see the deliverer's log)",
                permanent=True,
            ) from None

    def send(self, claim: Claim) -> None:
        channel = self._channel(claim)
        if channel is None:
            raise DeliveryError(
                f"channel {claim.channel} is not in rule {claim.destination.get('rule_id')} "
                f"v{claim.destination.get('rule_version')}",
                permanent=True,
            )
        if isinstance(channel, WebhookChannel):
            body = json.dumps(
                {"dedupe_key": claim.dedupe_key, "alert": claim.payload},
                sort_keys=True,
                separators=(",", ":"),
            ).encode()
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "X-Trace-Timestamp": timestamp,
                "X-Trace-Signature": sign(
                    self._open(claim, channel, "secret", channel.secret.get_secret_value()),
                    timestamp,
                    body,
                ),
                "X-Trace-Dedupe-Key": claim.dedupe_key,
            }
            correlation_id = claim.destination.get(CORRELATION_ID)
            if isinstance(correlation_id, str):  # the receiver can ask for its history
                headers["X-Trace-Correlation-Id"] = correlation_id
            self._post(channel.url, body, headers)
        elif isinstance(channel, EmailChannel):
            password = channel.password
            self._mail(
                channel,
                email_message(channel, claim),
                None
                if password is None
                else self._open(claim, channel, "password", password.get_secret_value()),
            )
        else:
            text = str(claim.payload.get("text") or json.dumps(claim.payload, sort_keys=True))
            body = json.dumps({"text": text}).encode()
            self._post(channel.url, body, {"Content-Type": "application/json"})

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            # streamed and never read: the receiver's body is neither stored nor buffered
            with self.http.stream("POST", url, content=body, headers=headers) as response:
                status = response.status_code
                retry_after = response.headers.get("retry-after")
        except OutboundRefused as exc:
            raise DeliveryError(
                connection_failure(exc), permanent=_permanently_refused(exc)
            ) from exc
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timed out after {self.policy.timeout_s}s") from exc
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise DeliveryError("the channel's URL can not be used", permanent=True) from exc
        except httpx.RemoteProtocolError as exc:
            raise DeliveryError("the receiver's answer is not valid HTTP") from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(
                connection_failure(exc), permanent=_permanently_refused(exc)
            ) from exc
        if 300 <= status < 400:
            raise DeliveryError(f"{http_status(status)} (redirects are not followed)")
        if status >= 400 or status < 200:
            raise DeliveryError(
                http_status(status),
                permanent=400 <= status < 500 and status not in _RETRYABLE_4XX,
                retry_after_s=parse_retry_after(retry_after)
                if status in _RETRY_AFTER_STATUSES
                else None,
            )

    def _mail(self, channel: EmailChannel, message: EmailMessage, password: str | None) -> None:
        deadline = time.monotonic() + self.policy.timeout_s

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryError(f"SMTP exchange timed out after {self.policy.timeout_s}s")
            return remaining

        host, port = channel.smtp_host, channel.smtp_port
        where = f"SMTP {host}:{port}"
        try:
            smtp: smtplib.SMTP
            if channel.security == "ssl":
                smtp = _PinnedSMTPSSL(timeout=left(), context=ssl.create_default_context())
            else:
                smtp = _PinnedSMTP(timeout=left())
            smtp.policy = self.outbound
            smtp._host = host  # the TLS server name (SNI, certificate checks)
            with smtp:
                smtp.connect(host, port)

                def step() -> None:
                    if smtp.sock is not None:
                        smtp.sock.settimeout(left())

                step()
                smtp.ehlo()
                if channel.security == "starttls":
                    step()
                    smtp.starttls(context=ssl.create_default_context())
                    step()
                    smtp.ehlo()
                if channel.username is not None and password is not None:
                    step()
                    smtp.login(channel.username, password)
                step()
                refused = smtp.send_message(message)
                if refused:
                    raise DeliveryError(
                        f"{where} refused recipients: {_refusals(refused)}",
                        permanent=_smtp_permanent(refused),
                    )
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(
                f"{where} refused recipients: {_refusals(exc.recipients)}",
                permanent=_smtp_permanent(exc.recipients),
            ) from exc
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"{where} answered {smtp_reply(exc.smtp_code)}", permanent=exc.smtp_code >= 500
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(
                f"{where} does not support STARTTLS or AUTH as configured", permanent=True
            ) from exc
        except smtplib.SMTPServerDisconnected as exc:
            raise DeliveryError(f"{where}: the server closed the connection") from exc
        except OutboundRefused as exc:
            raise DeliveryError(
                f"{where}: {connection_failure(exc)}", permanent=_permanently_refused(exc)
            ) from exc
        except (TimeoutError, OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"{where}: {connection_failure(exc)}") from exc

    def deliver(self, claim: Claim) -> bool:
        """Send one claimed row and record the outcome; True when delivered."""
        parent = claim.destination.get(TRACEPARENT)
        attributes = {
            "alert.dedupe_key": claim.dedupe_key,
            "alert.channel": claim.channel,
            "alert.attempt": claim.attempts,
        }
        with self.tracing.span(
            "alert.deliver", attributes, parent=parent if isinstance(parent, str) else None
        ) as span:
            failure = self._send_measured(claim)
            crash_point("deliver.after_send")
            outcome = self._record(claim, failure)
            span.set_attribute("alert.outcome", outcome)
            if failure is not None:
                span.set_status(StatusCode.ERROR, str(failure))
        return failure is None

    def _send_measured(self, claim: Claim) -> DeliveryError | None:
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            self.send(claim)
            return None
        except DeliveryError as exc:
            return exc
        except Exception:  # a poison alert must not take the worker down
            log.exception(
                "delivery %s -> %s: unexpected error", claim.dedupe_key[:16], claim.channel
            )
            return DeliveryError("internal error (see the deliverer's log)")
        finally:
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                self.metrics.seconds.observe(time.perf_counter() - started)

    def retry_schedule(
        self,
        claim: Claim,
        failure: DeliveryError,
        now: datetime,
        retry_until: datetime | None,
    ) -> _Decision:
        """What follows a failed attempt, at `now` (the database's clock): a retry at
        `next_attempt_at`, or dead, with the reason."""
        if retry_until is None:  # the first failure (since the alert, or its last replay)
            retry_until = now + timedelta(seconds=self.policy.period_s(self._channel(claim)))

        def dead(reason: str) -> _Decision:
            return _Decision("dead", retry_until=retry_until, reason=reason)

        if failure.permanent:
            return dead("permanent failure: not retried")
        if claim.attempts >= self.policy.max_attempts:
            return dead(f"{self.policy.max_attempts} attempts (TRACE_ALERT_DELIVERY_MAX_ATTEMPTS)")
        if now >= retry_until:
            return dead("retry period over")
        delay = backoff_s(claim.attempts, self.policy, self.rng)
        if failure.retry_after_s is not None:
            asked = min(failure.retry_after_s, self.policy.retry_after_max_s)
            if now + timedelta(seconds=asked) > retry_until:
                return dead(f"Retry-After {asked:g}s ends after the retry period")
            delay = max(delay, asked)
        # the last attempt happens when the period ends, never after
        return _Decision(
            "retry",
            next_attempt_at=min(now + timedelta(seconds=delay), retry_until),
            retry_until=retry_until,
        )

    def _record(self, claim: Claim, failure: DeliveryError | None) -> str:
        d, at = t.deliveries, t.delivery_attempts
        where = (
            (d.c.dedupe_key == claim.dedupe_key)
            & (d.c.channel == claim.channel)
            & (d.c.state == "pending")
            & (d.c.attempts == claim.attempts)
        )
        attempt = (
            (at.c.dedupe_key == claim.dedupe_key)
            & (at.c.channel == claim.channel)
            & (at.c.replay == claim.replays)
            & (at.c.attempt == claim.attempts)
        )
        error = None if failure is None else str(failure)
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(d.c.retry_until, sa.func.now().label("now"))
                .where(where)
                .with_for_update()
            ).one_or_none()
            if row is None:  # replayed, or re-claimed after this deliverer's lease ran out
                decision = _Decision("superseded")
            elif failure is None:
                decision = _Decision("delivered")
            else:
                decision = self.retry_schedule(claim, failure, row.now, row.retry_until)
            if row is not None:
                conn.execute(d.update().where(where).values(**self._row_values(decision, error)))
                record_hops(conn, [_attempted(claim, decision.outcome, error)])
            conn.execute(
                at.update()
                .where(attempt)
                .values(
                    finished_at=sa.func.now(),
                    outcome=decision.outcome,
                    error=error,
                    retry_after_s=None if failure is None else failure.retry_after_s,
                    next_attempt_at=decision.next_attempt_at,
                )
            )
        self._count(claim, decision.outcome)
        if self.metrics is not None:
            self.metrics.attempts.labels(decision.outcome).inc()
        if failure is not None:
            log.warning(
                "delivery %s -> %s attempt %d %s: %s%s",
                claim.dedupe_key[:16],
                claim.channel,
                claim.attempts,
                decision.outcome,
                error,
                f" ({decision.reason})" if decision.reason else "",
            )
        return decision.outcome

    @staticmethod
    def _row_values(decision: _Decision, error: str | None) -> dict[str, Any]:
        if decision.outcome == "delivered":
            return {"state": "delivered", "delivered_at": sa.func.now(), "last_error": None}
        values: dict[str, Any] = {"last_error": error, "retry_until": decision.retry_until}
        if decision.outcome == "dead":
            return {
                **values,
                "state": "dead",
                "dead_at": sa.func.now(),
                "dead_reason": decision.reason,
            }
        return {**values, "next_attempt_at": decision.next_attempt_at}

    def _count(self, claim: Claim, outcome: str) -> None:
        stat = {"delivered": "delivered", "dead": "dead", "retry": "failed"}.get(outcome)
        with self._stats_lock:
            if stat is not None:
                setattr(self.stats, stat, getattr(self.stats, stat) + 1)
            if outcome == "delivered":
                self.stats.by_channel[claim.channel] = (
                    self.stats.by_channel.get(claim.channel, 0) + 1
                )

    # -- the worker loop -------------------------------------------------------------------

    def run(self, *, poll_s: float = 0.2, until_idle: bool = False) -> DelivererStats:
        """Deliver until `stopping` is set (or, with until_idle, nothing is due or in flight);
        on stop, finish the sends in flight and record them."""
        inflight: set[Future[bool]] = set()
        with ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="deliver") as pool:
            while not self.stopping.is_set():
                free = self.policy.concurrency - len(inflight)
                claimed = self.claim(free) if free > 0 else []
                for claim in claimed:
                    inflight.add(pool.submit(self.deliver, claim))
                if until_idle and not claimed and not inflight:
                    break
                if inflight:
                    done, _ = wait(
                        inflight, timeout=0 if claimed else poll_s, return_when=FIRST_COMPLETED
                    )
                    inflight -= done
                elif not claimed:
                    self.stopping.wait(poll_s)
            wait(inflight)
        return self.stats

    def pending_count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(t.deliveries.c.state == "pending")
                ).scalar_one()
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trace_resources.alert_pipeline.delivery",
        description="Deliver pending alerts until SIGTERM (finishes the sends in flight).",
    )
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between idle polls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deliver %(levelname)s %(message)s")
    try:
        settings = get_settings()
    except ValidationError as exc:  # an operator's mistake: one line, no traceback
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        sys.stderr.write(f"deliverer: invalid settings: {problems}\n")
        return 2
    metrics = DelivererMetrics(settings.deliverer_metrics_port, settings.metrics_host)
    deliverer = Deliverer(
        t.data_engine(settings.data_dsn),
        DeliveryPolicy.from_settings(settings),
        metrics=metrics,
        tracing=Tracing.configured("trace-alert-deliverer", settings.otlp_endpoint),
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        deliverer.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    policy = deliverer.policy
    log.info(
        "retry schedule: %s after the first failure, doubling up to %s between attempts, for "
        "%s (about %d attempts) before the dead letters; channels may set %s..%s",
        duration(policy.backoff_base_s),
        duration(policy.backoff_max_s),
        duration(policy.retry_period_s),
        expected_attempts(policy),
        duration(policy.retry_period_min_s),
        duration(policy.retry_period_max_s),
    )
    if expected_attempts(policy) >= policy.max_attempts:
        log.warning(
            "TRACE_ALERT_DELIVERY_MAX_ATTEMPTS (%d) ends retries before the retry period does: "
            "raise it, or lengthen TRACE_ALERT_BACKOFF_BASE_S / TRACE_ALERT_BACKOFF_MAX_S",
            policy.max_attempts,
        )
    log.info("deliverer ready (poll %.1fs)", args.poll)  # from here on SIGTERM finishes sends
    try:
        stats = deliverer.run(poll_s=args.poll)
    finally:
        deliverer.close()
        deliverer.tracing.shutdown()
        metrics.close()
    log.info("deliverer stopped: %s", stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
