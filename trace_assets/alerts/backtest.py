"""Backtest: how often a rule would have fired over committed history, sending nothing.

`backtest` evaluates one rule (stored or not) over the current committed version of every
block range in a window (pinned reads, as the evaluation asset reads), with the same code as
`alert_evaluations`, then

- dedupes as the sink does (one alert per distinct dedupe_key), and
- replays the channel rate limits as the deliverer applies them: a token bucket per channel
  (rate = the channel's `rate_per_s` or the default `TRACE_ALERT_CHANNEL_RATE_PER_S`, burst =
  max(1, rate)), with each alert arriving at its block's timestamp. An alert finding no token
  would be delayed (the deliverer defers it, it never drops it): the report counts those as
  rate-limited and gives the longest delay.

It publishes nothing: no buffer message, no Postgres row, no delivery.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from trace_assets.alerts.composite import backtest_composite
from trace_assets.alerts.evaluate import RangeData, evaluate_rules
from trace_assets.alerts.scope import AlertScope, load_range, referenced
from trace_resources.alert_pipeline.queue import BufferMessage
from trace_resources.alert_pipeline.rules import ALERT_DATASETS, AlertRule, Composite, StoredRule
from trace_resources.errors import TraceError
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.paths import UNPARTITIONED

__all__ = [
    "BacktestError",
    "BacktestReport",
    "ChannelReport",
    "backtest",
    "committed_ranges",
    "parse_partition_span",
    "simulate_bucket",
]

_KEY = re.compile(r"^(\d+)-(\d+)$")


class BacktestError(TraceError):
    """A backtest that can not run as asked (bad window, no committed ranges)."""


@dataclass
class ChannelReport:
    name: str
    kind: str
    rate_per_s: float
    would_deliver: int  # on time: a token was there when the alert arrived
    rate_limited: int  # delayed by the channel's rate limit (delivered later, not dropped)
    max_delay_s: float


@dataclass
class BacktestReport:
    rule: str
    ranges_scanned: int
    first_range: str | None
    last_range: str | None
    alerts_raised: int
    distinct_alerts: int
    ranges_with_alerts: int
    channels: list[ChannelReport]
    examples: list[dict[str, Any]]
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        span = f"{self.first_range} .. {self.last_range}" if self.first_range else "none"
        out = [
            f"backtest of {self.rule} (nothing is sent)",
            f"  ranges scanned:      {self.ranges_scanned} ({span})",
            f"  alerts raised:       {self.alerts_raised} in {self.ranges_with_alerts} range(s)",
            f"  distinct (deduped):  {self.distinct_alerts}",
        ]
        for c in self.channels:
            out.append(
                f"  channel {c.name} ({c.kind}, {c.rate_per_s:g}/s): would deliver "
                f"{c.would_deliver} on time, {c.rate_limited} rate-limited"
                + (f" (delayed up to {c.max_delay_s:.1f}s)" if c.rate_limited else "")
            )
        for key, error in sorted(self.errors.items()):
            out.append(f"  not evaluated: {key}: {error}")
        if self.examples:
            out.append(f"  first {len(self.examples)} example(s):")
            out += [f"    {e['partition_key']}: {e['text']}" for e in self.examples]
        return out


def _bounds(partition_key: str) -> tuple[int, int] | None:
    match = _KEY.match(partition_key)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_partition_span(span: str) -> tuple[str, str]:
    """`FIRST_KEY..LAST_KEY` (both inclusive; one key alone is a span of one range)."""
    first, sep, last = span.partition("..")
    last = last if sep else first
    for key in (first, last):
        if _bounds(key) is None:
            raise BacktestError(
                f"--partitions {span!r}: {key!r} is not a block-range key; give "
                "FIRST..LAST like 000000000000-000000000249..000000000250-000000000499"
            )
    if first > last:
        raise BacktestError(f"--partitions {span!r}: the first key is after the last")
    return first, last


def committed_ranges(
    reader: DatasetReader,
    rule: AlertRule,
    *,
    from_block: int | None = None,
    to_block: int | None = None,
    span: tuple[str, str] | None = None,
) -> list[str]:
    """Block ranges with a committed version of a dataset the rule reads, in the window
    (ranges overlapping [from_block, to_block], or the keys within `span`), in block order."""
    if from_block is not None and to_block is not None and from_block > to_block:
        raise BacktestError(f"--from-block {from_block} is after --to-block {to_block}")
    keys: set[str] = set()
    for dataset in {*ALERT_DATASETS, *referenced(rule)}:
        keys |= set(reader.versions.read.current_version_numbers(dataset))
    selected = []
    for key in sorted(keys - {UNPARTITIONED}):
        bounds = _bounds(key)
        if bounds is None:
            continue
        if span is not None and not span[0] <= key <= span[1]:
            continue
        if from_block is not None and bounds[1] < from_block:
            continue
        if to_block is not None and bounds[0] > to_block:
            continue
        selected.append(key)
    return selected


def simulate_bucket(times: Sequence[float], rate: float) -> tuple[int, int, float]:
    """(on time, delayed, longest delay) of alerts arriving at `times` (sorted) on a channel
    with a token bucket of `rate` per second and burst max(1, rate) — the deliverer's."""
    burst = max(1.0, rate)
    tokens = burst
    last: float | None = None
    on_time = delayed = 0
    longest = 0.0
    for at in times:
        if last is not None:
            tokens = min(burst, tokens + max(0.0, at - last) * rate)
        last = at
        if tokens >= 1.0:
            on_time += 1
        else:
            delayed += 1
            longest = max(longest, (1.0 - tokens) / rate)
        tokens -= 1.0  # below zero: a backlog waiting for tokens
    return on_time, delayed, longest


def _range_time(data: RangeData) -> float | None:
    latest = None
    for _, table in data.tables.values():
        for column in ("block_timestamp", "timestamp"):
            if column in table.column_names and table.num_rows:
                values = [v for v in table[column].to_pylist() if isinstance(v, int)]
                if values:
                    latest = max(latest or 0, max(values))
    return None if latest is None else float(latest)


def _arrival(message: BufferMessage, fallback: float | None) -> float | None:
    row = message.payload.get("row") or {}
    for column in ("block_timestamp", "timestamp"):
        if isinstance(row.get(column), int):
            return float(row[column])
    return fallback


def backtest(
    rule: AlertRule,
    reader: DatasetReader,
    scope: AlertScope,
    partitions: Iterable[str],
    *,
    default_rate_per_s: float,
    version: int = 0,
    examples: int = 5,
    progress: Callable[[str], None] | None = None,
) -> BacktestReport:
    """Evaluate `rule` over the current committed version of each range in `partitions`
    (`progress(key)` after each range: the CLI's progress bar)."""
    scope.check(rule, f"{rule.org}/{rule.id}")
    stored = StoredRule(rule.model_copy(update={"enabled": True}), version)
    extra = [n for n in referenced(rule) if n not in ALERT_DATASETS]
    raised = 0
    ranges_with_alerts = 0
    distinct: dict[str, tuple[float | None, BufferMessage]] = {}
    errors: dict[str, str] = {}
    keys = list(partitions)
    if isinstance(rule.condition, Composite):
        # aggregated across ranges: every firing over the whole window, as the live evaluation
        firings = backtest_composite(reader, stored, keys, progress)
        for message in firings:
            events = message.payload["row"]["events"]
            at = max(
                (e["timestamp"] for e in events if isinstance(e.get("timestamp"), int)),
                default=None,
            )
            distinct.setdefault(message.dedupe_key, (None if at is None else float(at), message))
        raised = len(firings)
        ranges_with_alerts = len({m.payload["partition_key"] for m in firings})
        keys_to_scan: list[str] = []
    else:
        keys_to_scan = keys
    for key in keys_to_scan:
        loaded = load_range(reader, key, [*ALERT_DATASETS, *extra])
        data = RangeData(loaded.partition_key, loaded.tables, loaded.missing)
        evaluation = evaluate_rules([stored], data, scope.refusals)
        errors.update(evaluation.errors)
        raised += len(evaluation.messages)
        ranges_with_alerts += bool(evaluation.messages)
        fallback = _range_time(data)
        for message in evaluation.messages:
            distinct.setdefault(message.dedupe_key, (_arrival(message, fallback), message))
        if progress is not None:
            progress(key)
    ordered = list(distinct.values())
    known = [at for at, _ in ordered if at is not None]
    start = min(known) if known else 0.0
    times = []
    for at, _ in ordered:
        start = at if at is not None else start
        times.append(start)
    times.sort()
    channels = []
    for channel in rule.channels:
        rate = float(getattr(channel, "rate_per_s", None) or default_rate_per_s)
        on_time, delayed, longest = simulate_bucket(times, rate)
        channels.append(ChannelReport(channel.name, channel.kind, rate, on_time, delayed, longest))
    return BacktestReport(
        rule=f"{rule.org}/{rule.id}",
        ranges_scanned=len(keys),
        first_range=keys[0] if keys else None,
        last_range=keys[-1] if keys else None,
        alerts_raised=raised,
        distinct_alerts=len(distinct),
        ranges_with_alerts=ranges_with_alerts,
        channels=channels,
        examples=[
            {
                "partition_key": m.payload["partition_key"],
                "dedupe_key": m.dedupe_key,
                "dataset_versions": m.payload["dataset_versions"],
                "text": m.payload["text"],
            }
            for _, m in ordered[:examples]
        ],
        errors=errors,
    )
