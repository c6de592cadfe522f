"""Composite alert rules (the Aggregator): `all_of`, `n_of_m` and `sequence` over member
conditions, correlated by a key, within a window of blocks (and optionally seconds).

Events. Each member is a simple condition (`erc20_transfer_above`, `watched_addresses`); every
row it matches in a committed range is one event of that member, with the row's block,
position (transaction and log index), timestamp and correlation key (the column the rule
names, e.g. `from_address`, or the values of several joined by `|`, e.g. `[token,
from_address]`). Events with no key value (a contract creation's `to_address`) are left out.

Aggregation (`aggregate`, a pure function). Events are taken in block order — (block,
transaction index, log index, member, identity), never wall-clock order — and only up to the
horizon: the last block of the contiguous run of evaluated ranges from the first one, so a
range evaluated out of order waits for the ranges before it. Per correlation key:

- a window opens at an event when none is open (`sequence`: only at the first member's event)
  and lasts `window_blocks` blocks from the opening block (and `window_s` seconds of block
  time, if set);
- events inside the window count toward it (`all_of`: every member; `n_of_m`: `n` distinct
  members; `sequence`: the next member expected, in order);
- the window completes when the count is reached: the rule fires once, the window closes;
- a window that passes without completing closes; with `timeout: true` it raises a timeout
  event ("b did not follow a within 50 blocks"), once the horizon has passed its last block
  (or a later event of the key lies beyond its seconds).

Each firing's `dedupe_key` hashes (org, rule id + version, firing kind, correlation key, the
opening event's identity): the same committed history always gives the same firings.

Live evaluation (`evaluate_composite`). For each committed range the range's member events
replace the ones stored for it (correlation state, `trace_resources.alert_pipeline.composite`),
the rule's firings are computed again from every stored event, and compared with what was
raised before (`evaluate.reconcile`): new firings are sent, a firing no longer raised — its
range was re-committed without an input event — gets one retraction (`retract:<key>`).

Backtest (`backtest_composite`): the same aggregation over the events of committed ranges read
afresh, with no state written; over the same ranges it yields the firings the live evaluation
stands with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trace_assets.alerts.evaluate import Plan, RangeData, evaluate_rules, reconcile
from trace_assets.alerts.scope import load_range
from trace_resources.alert_pipeline.composite import (
    CompositeEvent,
    EvaluatedRange,
    RuleRef,
    load_events,
    load_firings,
    load_ranges,
    record_range,
)
from trace_resources.alert_pipeline.queue import BufferMessage
from trace_resources.alert_pipeline.rules import (
    ALERT_DATASETS,
    Composite,
    StoredRule,
    describe_key,
    key_columns,
)
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.storage.commit import DatasetReader

__all__ = [
    "aggregate",
    "backtest_composite",
    "evaluate_composite",
    "horizon",
    "member_events",
]


def _cond(stored: StoredRule) -> Composite:
    cond = stored.rule.condition
    if not isinstance(cond, Composite):
        raise TypeError(f"{stored.key} is not a composite rule")
    return cond


def _span(partition_key: str) -> EvaluatedRange:
    blocks = parse_partition_key(partition_key)
    return EvaluatedRange(partition_key, blocks.start, blocks.last)


def member_events(stored: StoredRule, data: RangeData) -> list[CompositeEvent]:
    """The events every member condition raises over one committed range."""
    cond = _cond(stored)
    out: dict[tuple[str, str], CompositeEvent] = {}
    for index, member in enumerate(cond.members):
        as_rule = stored.rule.model_copy(update={"condition": member.condition})
        evaluation = evaluate_rules([StoredRule(as_rule, stored.version)], data)
        columns = key_columns(member.key or cond.key)
        for message in evaluation.messages:
            row = message.payload["row"]
            values = [row.get(column) for column in columns]
            if any(value is None for value in values):
                continue
            event = {
                "member": member.name,
                "member_index": index,
                "key": "|".join(str(value) for value in values),
                "block_number": int(row["block_number"]),
                "transaction_index": int(row.get("transaction_index") or 0),
                "log_index": int(row.get("log_index") or 0),
                "timestamp": row.get("block_timestamp"),
                "transaction_hash": row.get("transaction_hash"),
                "dataset": message.payload["dataset"],
            }
            identity = message.dedupe_key
            out[(identity, member.name)] = CompositeEvent(
                data.partition_key, identity, member.name, event["block_number"], event
            )
    return sorted(out.values(), key=_order)


def _order(e: CompositeEvent) -> tuple[int, int, int, int, str]:
    ev = e.event
    return (
        e.block_number,
        ev["transaction_index"],
        ev["log_index"],
        ev["member_index"],
        e.identity,
    )


def horizon(ranges: Iterable[EvaluatedRange]) -> int | None:
    """The last block of the contiguous run of evaluated ranges from the first one."""
    last: int | None = None
    for span in sorted(ranges, key=lambda r: r.first_block):
        if last is not None and span.first_block > last + 1:
            break
        last = span.last_block if last is None else max(last, span.last_block)
    return last


@dataclass
class _Window:
    opening: CompositeEvent
    seen: dict[str, CompositeEvent] = field(default_factory=dict)
    step: int = 0  # sequence: members matched so far, in order

    @property
    def first_block(self) -> int:
        return self.opening.block_number


def _expired(cond: Composite, window: _Window, block: int, timestamp: Any) -> bool:
    if block > window.first_block + cond.window_blocks - 1:
        return True
    opened_at = window.opening.event.get("timestamp")
    if cond.window_s is None or opened_at is None or timestamp is None:
        return False
    return int(timestamp) - int(opened_at) > cond.window_s


def _complete(cond: Composite, window: _Window) -> bool:
    if cond.op == "sequence":
        return window.step == len(cond.members)
    needed = len(cond.members) if cond.op == "all_of" else int(cond.n or 0)
    return len(window.seen) >= needed


def _count(cond: Composite, window: _Window, event: CompositeEvent) -> None:
    if cond.op != "sequence":
        window.seen.setdefault(event.member, event)
    elif event.event["member_index"] == window.step:
        window.seen[event.member] = event
        window.step += 1


def _range_of(block: int, ranges: Sequence[EvaluatedRange]) -> str:
    for span in ranges:
        if span.first_block <= block <= span.last_block:
            return span.partition_key
    return ""


def aggregate(
    stored: StoredRule, events: Iterable[CompositeEvent], ranges: Sequence[EvaluatedRange]
) -> list[BufferMessage]:
    """Every firing (and timeout) of a composite rule over the given events (see the module
    docstring); deterministic: the same events and ranges give the same messages."""
    cond = _cond(stored)
    last = horizon(ranges)
    if last is None:
        return []
    open_: dict[str, _Window] = {}
    out: list[BufferMessage] = []
    for event in sorted((e for e in events if e.block_number <= last), key=_order):
        key = str(event.event["key"])
        window = open_.get(key)
        if window is not None and _expired(
            cond, window, event.block_number, event.event.get("timestamp")
        ):
            out += _timeout(stored, cond, window, key, ranges, event.block_number)
            del open_[key]
            window = None
        if window is None:
            if cond.op == "sequence" and event.event["member_index"] != 0:
                continue
            window = open_[key] = _Window(event)
        _count(cond, window, event)
        if _complete(cond, window):
            out.append(_firing(stored, cond, window, key, event.block_number, ranges))
            del open_[key]
    for key, window in sorted(open_.items()):
        if last >= window.first_block + cond.window_blocks - 1:
            out += _timeout(stored, cond, window, key, ranges)
    return out


def _describe(window: _Window) -> str:
    return ", ".join(f"{name} at block {e.block_number}" for name, e in window.seen.items())


def _timeout(
    stored: StoredRule,
    cond: Composite,
    window: _Window,
    key: str,
    ranges: Sequence[EvaluatedRange],
    seen_at: int | None = None,
) -> list[BufferMessage]:
    """The timeout of an incomplete window (if the rule asks for one), decided at the window's
    last block, or earlier at `seen_at`, the block of an event past its seconds."""
    if not cond.timeout:
        return []
    missing = [m.name for m in cond.members if m.name not in window.seen]
    closes = window.first_block + cond.window_blocks - 1
    if seen_at is not None:
        closes = min(closes, seen_at)
    within = f"{cond.window_blocks} blocks" + (f" / {cond.window_s} s" if cond.window_s else "")
    text = (
        f"[{stored.rule.org}/{stored.rule.id}] TIMEOUT: {', '.join(missing)} did not follow "
        f"{_describe(window)} within {within} for {describe_key(cond.key)} {key}"
    )
    return [_message(stored, cond, "timeout", window, key, closes, ranges, text)]


def _firing(
    stored: StoredRule,
    cond: Composite,
    window: _Window,
    key: str,
    block: int,
    ranges: Sequence[EvaluatedRange],
) -> BufferMessage:
    text = (
        f"[{stored.rule.org}/{stored.rule.id}] {cond.op}: {_describe(window)} for "
        f"{describe_key(cond.key)} "
        f"{key} within {cond.window_blocks} blocks"
    )
    return _message(stored, cond, "fired", window, key, block, ranges, text)


def _message(
    stored: StoredRule,
    cond: Composite,
    outcome: str,
    window: _Window,
    key: str,
    block: int,
    ranges: Sequence[EvaluatedRange],
    text: str,
) -> BufferMessage:
    rule = stored.rule
    parts = [rule.org, rule.id, f"v{stored.version}", "composite", outcome, key]
    parts.append(window.opening.identity)
    dedupe = hashlib.sha256("|".join(parts).encode()).hexdigest()
    events = sorted(window.seen.values(), key=_order)
    payload = {
        "type": "alert",
        "org": rule.org,
        "rule_id": rule.id,
        "rule_version": stored.version,
        "rule_kind": "composite",
        "dataset": "composite",
        "partition_key": _range_of(block, ranges),
        "dataset_versions": {},
        "outcome": outcome,
        "op": cond.op,
        "correlation_key": key,
        "window": [window.first_block, window.first_block + cond.window_blocks - 1],
        "source_ranges": sorted({e.partition_key for e in events}),
        "row": {
            "block_number": block,
            "events": [e.event for e in events],
        },
        "text": text,
    }
    destination = {
        "org": rule.org,
        "rule_id": rule.id,
        "rule_version": stored.version,
        "channels": [c.name for c in rule.channels],
    }
    return BufferMessage(dedupe, payload, destination)


def evaluate_composite(engine: Any, stored: StoredRule, data: RangeData) -> Plan:
    """Record one committed range's member events for a composite rule and work out what to
    publish (new firings, retractions); the caller publishes `plan.messages`, then records
    `plan.ledger` with `save_firings`. Call under `composite_lock`."""
    ref = RuleRef(stored.rule.org, stored.rule.id, stored.version)
    record_range(engine, ref, _span(data.partition_key), member_events(stored, data))
    firings = aggregate(stored, load_events(engine, ref), load_ranges(engine, ref))
    return reconcile(load_firings(engine, ref), firings, data)


def backtest_composite(
    reader: DatasetReader,
    stored: StoredRule,
    partitions: Iterable[str],
    progress: Callable[[str], None] | None = None,
) -> list[BufferMessage]:
    """Every firing of a composite rule over the committed ranges given (read afresh; no
    state is written): what the live evaluation stands with after evaluating them."""
    events: list[CompositeEvent] = []
    ranges: list[EvaluatedRange] = []
    for key in partitions:
        loaded = load_range(reader, key, ALERT_DATASETS)
        data = RangeData(loaded.partition_key, loaded.tables, loaded.missing)
        events += member_events(stored, data)
        ranges.append(_span(key))
        if progress is not None:
            progress(key)
    return aggregate(stored, events, ranges)
