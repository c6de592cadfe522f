"""Alert evaluation: rules x the committed rows of one block range -> buffer messages.

Pure functions (no Dagster, no I/O), shared by the `alert_evaluations` asset and the backtest.

Keys. Each alert carries a deterministic `dedupe_key` over (org, rule id + version, dataset,
partition, row identity): re-evaluating the same version of a range, or a re-commit that keeps
the row unchanged, gives the same key, so the sink stores the alert once. For the built-in
kinds the identity is the row's natural key (transaction hash and log index) plus a digest of
the row's content, so a re-commit that *changes* an alerting row (a fixed amount) retracts the
old alert and raises a new one; a custom SQL condition that returns an `alert_key` column
decides its rows' identity itself (else the whole row is the identity).

Versions. Each alert names the dataset versions it was computed from (`dataset_versions`):
the alert datasets' current versions of the range, plus those of any other dataset its
custom SQL read (0: the dataset had no committed data for the range).

Re-evaluation (`reconcile`). The evaluation ledger remembers, per range and rule version in
force, every alert raised and whether it is still standing. When a re-committed range is
evaluated again:

- an alert the new version still raises under the key it stands with is not published
  again (it was published before the ledger recorded it; the sink would keep one row per key
  anyway);
- an alert it raises for the first time is sent;
- a standing alert it no longer raises gets one retraction, key `retract:<its key>`;
- an alert that was retracted and is raised again (a later version restores the row) is sent
  as a new *generation*, key `<base key>:g<n>`, so the sink does not drop it as a repeat and
  receivers see it come back; retracting it again is `retract:<base key>:g<n>`.

Rules that could not be evaluated for the range (see `Evaluation.errors`) keep their ledger
entries untouched: an error never retracts anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trace_resources.alert_pipeline.queue import BufferMessage
from trace_resources.alert_pipeline.resource import LedgerEntry
from trace_resources.alert_pipeline.rules import (
    ALERT_DATASETS,
    AlertRule,
    Composite,
    CustomSql,
    Erc20TransferAbove,
    StoredRule,
    WatchedAddresses,
)
from trace_resources.sandbox import InlineSource, SandboxError
from trace_resources.sandbox.shared import alert_sql_pool
from trace_resources.settings import get_settings

__all__ = [
    "Evaluation",
    "LedgerEntry",
    "Plan",
    "RangeData",
    "dedupe_key",
    "evaluate_range",
    "evaluate_rules",
    "generation_key",
    "reconcile",
]


@dataclass(frozen=True)
class RangeData:
    """The committed rows of one block range: dataset -> (version, table).

    `missing`: datasets asked for that have no committed data for the range."""

    partition_key: str
    tables: Mapping[str, tuple[int, pa.Table]]
    missing: frozenset[str] = frozenset()

    @property
    def versions(self) -> dict[str, int]:
        """Versions of the alert datasets (what every rule's alerts were computed from)."""
        return self.versions_of(ALERT_DATASETS)

    def versions_of(self, names: Iterable[str]) -> dict[str, int]:
        wanted = set(names)
        return {n: v for n, (v, _) in sorted(self.tables.items()) if n in wanted}


def dedupe_key(rule: StoredRule, dataset: str, partition_key: str, identity: str) -> str:
    parts = [rule.rule.org, rule.rule.id, f"v{rule.version}", dataset, partition_key, identity]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def generation_key(base_key: str, generation: int) -> str:
    """The key of the n-th coming back of an alert (0: its first raising)."""
    return base_key if generation == 0 else f"{base_key}:g{generation}"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()]


def _canonical(row: Mapping[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


def _identity(dataset: str, row: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(_canonical(row).encode()).hexdigest()[:16]
    if dataset == "erc20_transfers":
        return f"{row['transaction_hash']}:{row['log_index']}#{digest}"
    if dataset == "native_transfers":
        return f"{row['transaction_hash']}#{digest}"
    if "alert_key" in row:
        return str(row["alert_key"])
    return _canonical(row)


def _message(
    rule: StoredRule,
    data: RangeData,
    dataset: str,
    row: dict[str, Any],
    text: str,
    read: Iterable[str] = (),
) -> BufferMessage:
    key = dedupe_key(rule, dataset, data.partition_key, _identity(dataset, row))
    payload = {
        "type": "alert",
        "org": rule.rule.org,
        "rule_id": rule.rule.id,
        "rule_version": rule.version,
        "rule_kind": rule.rule.condition.kind,
        "dataset": dataset,
        "partition_key": data.partition_key,
        "dataset_versions": data.versions_of([*ALERT_DATASETS, *read]),
        "base_key": key,
        "generation": 0,
        "row": row,
        "text": text,
    }
    destination = {
        "org": rule.rule.org,
        "rule_id": rule.rule.id,
        "rule_version": rule.version,
        "channels": [c.name for c in rule.rule.channels],
    }
    return BufferMessage(key, payload, destination)


def _table(data: RangeData, dataset: str) -> pa.Table | None:
    entry = data.tables.get(dataset)
    return None if entry is None else entry[1]


def _above(rule: StoredRule, cond: Erc20TransferAbove, data: RangeData) -> list[BufferMessage]:
    table = _table(data, "erc20_transfers")
    if table is None or table.num_rows == 0:
        return []
    token = bytes.fromhex(cond.token[2:].lower())
    of_token = table.filter(
        pc.equal(table["token"], pa.scalar(token, table.schema.field("token").type))
    )
    threshold = int(cond.threshold)
    out = []
    for row in _rows(of_token):
        if int(row["value_string"]) > threshold:
            text = (
                f"[{rule.rule.org}/{rule.rule.id}] {row['value_string']} of token {cond.token} "
                f"from {row['from_address']} to {row['to_address']} in block "
                f"{row['block_number']} (tx {row['transaction_hash']})"
            )
            out.append(_message(rule, data, "erc20_transfers", row, text))
    return out


def _watched(rule: StoredRule, cond: WatchedAddresses, data: RangeData) -> list[BufferMessage]:
    watched = pa.array([bytes.fromhex(a[2:].lower()) for a in cond.addresses], pa.binary())
    out = []
    for dataset in cond.datasets:
        table = _table(data, dataset)
        if table is None or table.num_rows == 0:
            continue
        sender = pc.is_in(table["from_address"].cast(pa.binary()), value_set=watched)
        receiver = pc.is_in(table["to_address"].cast(pa.binary()), value_set=watched)
        hit = pc.fill_null(pc.or_(sender, receiver), False)
        for row in _rows(table.filter(hit)):
            text = (
                f"[{rule.rule.org}/{rule.rule.id}] watched address active: {dataset} "
                f"{row['from_address']} -> {row['to_address']} value {row['value_string']} "
                f"in block {row['block_number']}"
            )
            out.append(_message(rule, data, dataset, row, text))
    return out


class _RuleFailed(Exception):
    """This rule can not be evaluated over this range (the others still are)."""


def _sandbox_failure(exc: SandboxError, timeout_s: float, memory: str) -> str:
    if exc.kind == "timeout":
        return (
            f"the SQL ran longer than its {timeout_s:g} s limit (TRACE_ALERT_SQL_TIMEOUT_S) "
            "and was stopped"
        )
    if exc.kind in ("memory", "crashed"):
        return (
            f"the SQL needed more than the {memory} a rule may use "
            "(TRACE_ALERT_SQL_MEMORY_LIMIT) and was stopped"
        )
    if exc.kind == "cpu":
        return f"the SQL used too much CPU time and was stopped: {exc.message}"
    return f"the SQL failed: {exc.message}"


def _custom(rule: StoredRule, cond: CustomSql, data: RangeData) -> list[BufferMessage]:
    read = cond.tables()
    absent = sorted(set(read) & data.missing)
    if absent:
        raise _RuleFailed(f"no committed data of {', '.join(absent)} for this range")
    # the organisation's SQL runs in a sandbox process (OS limits on memory, CPU and time, no
    # files, no network), over only the tables the statement reads
    sources = []
    for dataset in read:
        table = _table(data, dataset)
        if table is None and dataset in ALERT_DATASETS:
            continue  # no transfers committed for the range: as before, no table
        if table is None:
            raise _RuleFailed(f"dataset {dataset!r} was not loaded for this range")
        sources.append(InlineSource(dataset, table))
    settings = get_settings()
    timeout_s = settings.alert_sql_timeout_s
    max_rows = settings.alert_sql_max_rows
    try:
        with alert_sql_pool(settings).lease(wait_s=60 + timeout_s) as worker:
            page = worker.page(
                cond.sql,
                sources,
                offset=0,
                limit=max_rows,
                max_bytes=64 << 20,
                timeout_s=timeout_s,
            )
    except SandboxError as exc:
        raise _RuleFailed(
            _sandbox_failure(exc, timeout_s, settings.alert_sql_memory_limit)
        ) from None
    if page.has_more:
        raise _RuleFailed(
            f"the SQL returned more than {max_rows} rows (or 64 MB) for one range "
            "(TRACE_ALERT_SQL_MAX_ROWS): a rule should select the few rows worth an alert"
        )
    result = page.table
    out = []
    for row in _rows(result):
        text = (
            f"[{rule.rule.org}/{rule.rule.id}] custom condition: "
            + json.dumps(row, sort_keys=True)[:500]
        )
        out.append(_message(rule, data, "custom_sql", row, text, read))
    return out


@dataclass
class Evaluation:
    messages: list[BufferMessage] = field(default_factory=list)
    # rule key (org/id@vN) -> why it was not evaluated over this range
    errors: dict[str, str] = field(default_factory=dict)
    # (org, rule id) of the rules not evaluated: their earlier alerts are left standing
    skipped: set[tuple[str, str]] = field(default_factory=set)


def evaluate_rules(
    rules: Iterable[StoredRule],
    data: RangeData,
    refusals: Callable[[AlertRule], list[str]] | None = None,
) -> Evaluation:
    """Every alert the enabled rules raise over one committed range; a rule that can not be
    evaluated (its SQL fails, or reads a dataset its organisation may no longer read — as
    `refusals` says) is reported in `errors` and does not stop the others."""
    out = Evaluation()
    for rule in rules:
        if not rule.rule.enabled:
            continue
        cond = rule.rule.condition
        if isinstance(cond, Composite):
            # aggregated over committed history (trace_assets.alerts.composite): its alerts
            # are not this range's to retract
            out.skipped.add((rule.rule.org, rule.rule.id))
            continue
        try:
            if isinstance(cond, Erc20TransferAbove):
                out.messages += _above(rule, cond, data)
            elif isinstance(cond, WatchedAddresses):
                out.messages += _watched(rule, cond, data)
            else:
                refused = refusals(rule.rule) if refusals is not None else []
                if refused:
                    raise _RuleFailed(
                        f"reads {', '.join(refused)}, which organisation {rule.rule.org!r} "
                        "may not read (no such dataset, or no longer shared with it)"
                    )
                out.messages += _custom(rule, cond, data)
        except _RuleFailed as exc:
            out.errors[rule.key] = f"{data.partition_key}: {exc}"
            out.skipped.add((rule.rule.org, rule.rule.id))
    return out


def evaluate_range(rules: Iterable[StoredRule], data: RangeData) -> list[BufferMessage]:
    """Every alert the enabled rules raise over one committed range (errors raise)."""
    evaluation = evaluate_rules(rules, data)
    if evaluation.errors:
        raise ValueError("; ".join(f"{k}: {v}" for k, v in sorted(evaluation.errors.items())))
    return evaluation.messages


@dataclass
class Plan:
    alerts: list[BufferMessage]  # every alert the current version raises
    retractions: list[BufferMessage]
    ledger: list[LedgerEntry]  # new state of each entry evaluated
    new: int = 0  # alerts not standing before (first raising or a new generation)
    # keys of alerts already standing under the same key: published before (the ledger is
    # written only after publishing), so not sent again
    standing: frozenset[str] = frozenset()

    @property
    def messages(self) -> list[BufferMessage]:
        """What to publish: new alerts and new generations, and retractions. An alert standing
        under the same key is not re-sent (the head follower's alerts are not sent again by
        the sealed range's evaluation)."""
        return [*(a for a in self.alerts if a.dedupe_key not in self.standing), *self.retractions]


def _retraction(entry: LedgerEntry, data: RangeData) -> BufferMessage:
    payload = entry.payload
    computed_from = dict(payload.get("dataset_versions") or {})
    retraction = {
        **{k: payload.get(k) for k in ("org", "rule_id", "rule_version", "dataset")},
        "type": "retraction",
        "retracts": entry.key,
        "base_key": entry.base_key,
        "generation": entry.generation,
        "partition_key": data.partition_key,
        "retracted_versions": computed_from,
        "dataset_versions": data.versions_of([*ALERT_DATASETS, *computed_from]),
        "text": f"[{payload.get('org')}/{payload.get('rule_id')}] RETRACTED: "
        f"{payload.get('text')} (range {data.partition_key} was re-committed)",
    }
    return BufferMessage(f"retract:{entry.key}", retraction, entry.destination)


def reconcile(
    previous: Sequence[LedgerEntry],
    current: Sequence[BufferMessage],
    data: RangeData,
    skipped: Iterable[tuple[str, str]] = (),
) -> Plan:
    """What to publish for a range given the ledger (`previous`, entries of the rule versions
    in force) and what the current version raises (`current`, generation-0 keys)."""
    left_alone = set(skipped)
    before = {e.base_key: e for e in previous}
    alerts: list[BufferMessage] = []
    ledger: list[LedgerEntry] = []
    new = 0
    standing: set[str] = set()
    seen: set[str] = set()
    for message in current:
        base = message.dedupe_key
        if base in seen:
            continue
        seen.add(base)
        entry = before.get(base)
        if entry is None:
            generation = 0
        elif entry.standing:
            generation = entry.generation
        else:
            generation = entry.generation + 1
        if entry is None or not entry.standing:
            new += 1
        key = generation_key(base, generation)
        if entry is not None and entry.standing and entry.key == key:
            standing.add(key)
        payload = {**message.payload, "base_key": base, "generation": generation}
        sent = replace(message, dedupe_key=key, payload=payload)
        alerts.append(sent)
        dest = message.destination
        ledger.append(
            LedgerEntry(
                str(dest["org"]),
                str(dest["rule_id"]),
                int(dest["rule_version"]),
                base,
                key,
                generation,
                True,
                payload,
                dest,
            )
        )
    retracted: list[BufferMessage] = []
    for entry in previous:
        if entry.base_key in seen or not entry.standing:
            continue
        if (entry.org, entry.rule_id) in left_alone:
            continue
        retracted.append(_retraction(entry, data))
        ledger.append(replace(entry, standing=False))
    return Plan(alerts, retracted, ledger, new, frozenset(standing))
