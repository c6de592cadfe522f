"""Alert evaluation: rules x the committed rows of one block range -> buffer messages.

Pure functions (no Dagster), shared by the `alert_evaluations` asset and the backtest. Each
alert carries the dataset versions it was computed from and a deterministic dedupe_key over
(org, rule id + version, dataset, partition, row identity): the same row of the same range
under the same rule version always gives the same key, whichever version of the range (a
re-commit that keeps the row) or however many times it is evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from trace_resources.buffer.queue import BufferMessage
from trace_resources.buffer.rules import (
    ALERT_DATASETS,
    CustomSql,
    Erc20TransferAbove,
    StoredRule,
    WatchedAddresses,
)

__all__ = ["RangeData", "dedupe_key", "evaluate_range", "retractions"]


@dataclass(frozen=True)
class RangeData:
    """The committed rows of one block range: dataset -> (version, table)."""

    partition_key: str
    tables: Mapping[str, tuple[int, pa.Table]]

    @property
    def versions(self) -> dict[str, int]:
        return {name: version for name, (version, _) in sorted(self.tables.items())}


def dedupe_key(rule: StoredRule, dataset: str, partition_key: str, identity: str) -> str:
    parts = [rule.rule.org, rule.rule.id, f"v{rule.version}", dataset, partition_key, identity]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


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


def _identity(dataset: str, row: Mapping[str, Any]) -> str:
    if dataset == "erc20_transfers":
        return f"{row['transaction_hash']}:{row['log_index']}"
    if dataset == "native_transfers":
        return str(row["transaction_hash"])
    if "alert_key" in row:
        return str(row["alert_key"])
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


def _message(
    rule: StoredRule, data: RangeData, dataset: str, row: dict[str, Any], text: str
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
        "dataset_versions": data.versions,
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


def _custom(rule: StoredRule, cond: CustomSql, data: RangeData) -> list[BufferMessage]:
    conn = duckdb.connect(config={"enable_external_access": False, "threads": 1})
    try:
        for dataset in ALERT_DATASETS:
            table = _table(data, dataset)
            if table is not None:
                conn.register(dataset, table)
        conn.execute("SET lock_configuration = true")
        result = conn.sql(cond.sql).to_arrow_table()
    finally:
        conn.close()
    out = []
    for row in _rows(result):
        text = (
            f"[{rule.rule.org}/{rule.rule.id}] custom condition: "
            + json.dumps(row, sort_keys=True)[:500]
        )
        out.append(_message(rule, data, "custom_sql", row, text))
    return out


def evaluate_range(rules: Iterable[StoredRule], data: RangeData) -> list[BufferMessage]:
    """Every alert the enabled rules raise over one committed range."""
    out: list[BufferMessage] = []
    for rule in rules:
        if not rule.rule.enabled:
            continue
        cond = rule.rule.condition
        if isinstance(cond, Erc20TransferAbove):
            out += _above(rule, cond, data)
        elif isinstance(cond, WatchedAddresses):
            out += _watched(rule, cond, data)
        else:
            out += _custom(rule, cond, data)
    return out


def retractions(
    previous: Sequence[tuple[str, dict[str, Any], dict[str, Any]]],
    current: Sequence[BufferMessage],
    data: RangeData,
) -> list[BufferMessage]:
    """For alerts sent from an earlier version of this range that the current version no
    longer raises: a retraction message each (its own deterministic key)."""
    now = {m.dedupe_key for m in current}
    out = []
    for key, payload, destination in previous:
        if key in now:
            continue
        retraction = {
            **{k: payload.get(k) for k in ("org", "rule_id", "rule_version", "dataset")},
            "type": "retraction",
            "retracts": key,
            "partition_key": data.partition_key,
            "dataset_versions": data.versions,
            "text": f"[{payload.get('org')}/{payload.get('rule_id')}] RETRACTED: "
            f"{payload.get('text')} (range {data.partition_key} was re-committed)",
        }
        out.append(BufferMessage(f"retract:{key}", retraction, destination))
    return out
