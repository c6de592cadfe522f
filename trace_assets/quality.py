"""Quality rules evaluated with DuckDB over Arrow tables (staged output or committed data).

A rule finds its failing rows; its error rate is failing rows / rows; it fails when the rate
is above the rule's threshold. Each outcome keeps a few failing rows as examples, so that a
failure says which rule, how many rows and shows them.

The circuit breaker: derived assets evaluate their rules on what they are about to commit and
raise `QualityGateError` before the IO manager sees the output when a blocking rule fails, so
nothing is committed and readers keep the previous version.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime as dt
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb
import numpy as np
import pyarrow as pa

from trace_resources.chain.ranges import parse_partition_key
from trace_resources.errors import TraceError
from trace_resources.registry import (
    ChainContinuityRule,
    DatasetDeclaration,
    NotNullRule,
    RangeRule,
    RegexRule,
    SqlRule,
    UniqueRule,
    check_description,
)

__all__ = [
    "EXAMPLES",
    "QualityGateError",
    "RuleOutcome",
    "evaluate_rule",
    "evaluate_rules",
    "check_description",
    "check_results",
    "rule_check_specs",
    "gate",
    "merge_outcomes",
]

EXAMPLES = 5


class QualityGateError(TraceError):
    """A blocking quality rule failed: the data was not committed."""


@dataclass
class RuleOutcome:
    rule: str
    kind: str
    rows: int
    failing: int
    threshold: float
    blocking: bool
    examples: list[dict[str, Any]] = field(default_factory=list)
    by_partition: dict[str, int] = field(default_factory=dict)
    rows_by_partition: dict[str, int] = field(default_factory=dict)
    examples_by_partition: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def partition_passed(self, key: str) -> bool:
        """Whether the rule passed on one partition alone (its own error rate)."""
        rows = self.rows_by_partition.get(key, 0)
        return (self.by_partition.get(key, 0) / rows if rows else 0.0) <= self.threshold

    @property
    def error_rate(self) -> float:
        return self.failing / self.rows if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return self.error_rate <= self.threshold

    def summary(self) -> str:
        shown = "; ".join(str(e) for e in self.examples[:3])
        return (
            f"rule {self.rule!r} ({self.kind}): {self.failing} of {self.rows} rows fail "
            f"(error rate {self.error_rate:.4%} > threshold {self.threshold:.4%})"
            + (f"; e.g. {shown}" if shown else "")
        )


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _Databases:
    """One in-memory DuckDB database per process, each evaluation on a connection of its own.

    A new database (`duckdb.connect()`) costs ~10 ms of CPU to open and close (it starts its
    threads); a raw range evaluates three datasets' rules, so a 12-range backfill paid ~0.4 s
    of its two cores for databases alone. A cursor (a connection to the shared database) costs
    ~0.15 ms, and what is registered on it (`data`) is its own: evaluations on several threads
    do not see each other's tables.

    Forks (the warm run worker forks runs): DuckDB's threads do not survive a fork, and a
    child that frees an inherited database crashes (SIGSEGV, measured). So a fork retires the
    database: the parent frees it once its open connections close and opens a new one when
    next asked; the child never frees its copy and opens its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db: duckdb.DuckDBPyConnection | None = None
        self._retired: duckdb.DuckDBPyConnection | None = None
        os.register_at_fork(
            before=self._retire, after_in_parent=self._release, after_in_child=self._keep
        )
        atexit.register(self._close_at_exit)

    def _close_at_exit(self) -> None:
        """Closed before the interpreter tears its modules down (DuckDB's bindings report a
        database still open then as leaked)."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    def _retire(self) -> None:
        self._lock.acquire()  # held across the fork: no cursor is being made meanwhile
        self._retired, self._db = self._db, None

    def _release(self) -> None:
        self._retired = None  # freed here once the connections still open on it close
        self._lock.release()

    def _keep(self) -> None:
        if self._retired is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._retired))  # never freed here
            self._retired = None
        self._lock = threading.Lock()

    def connection(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._db is None:
                self._db = duckdb.connect()
            return self._db.cursor()


_DATABASES = _Databases()


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> int:
    """A single-number query, its result fetched completely."""
    rows = con.execute(sql, params).fetchall()
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    names = [d[0] for d in cursor.description or []]
    return [{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in cursor.fetchall()]


def _failing_query(rule: Any, first: int | None, last: int | None) -> tuple[str, list[Any]]:
    """SELECT of the failing rows of a row-level rule."""
    if isinstance(rule, NotNullRule):
        where = " OR ".join(f"{_q(c)} IS NULL" for c in rule.columns)
        return f"SELECT * FROM data WHERE {where}", []
    if isinstance(rule, RangeRule):
        bounds, params = [], []
        if rule.min is not None:
            bounds.append(f"{_q(rule.column)} < ?")
            params.append(rule.min)
        if rule.max is not None:
            bounds.append(f"{_q(rule.column)} > ?")
            params.append(rule.max)
        return f"SELECT * FROM data WHERE {' OR '.join(bounds) or 'false'}", params
    if isinstance(rule, RegexRule):
        column = _q(rule.column)
        return (f"SELECT * FROM data WHERE NOT regexp_full_match({column}, ?)", [rule.pattern])
    if isinstance(rule, SqlRule):
        return rule.query.format(first_block=first, last_block=last), []
    raise TypeError(f"no row query for rule kind {rule.kind}")


def evaluate_rule(
    rule: Any,
    table: pa.Table,
    partition_key: str | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> RuleOutcome:
    """Evaluate one declared rule over a table (registered in DuckDB as `data`)."""
    own = con is None
    con = con or _DATABASES.connection()
    try:
        con.register("data", table)
        bounds = parse_partition_key(partition_key) if partition_key else None
        first, last = (bounds.start, bounds.last) if bounds else (None, None)
        rows = table.num_rows
        if isinstance(rule, UniqueRule):
            key = ", ".join(_q(c) for c in rule.columns)
            dupes = f"SELECT {key}, count(*) AS copies FROM data GROUP BY {key} HAVING count(*) > 1"
            count = _count(con, f"SELECT coalesce(sum(copies - 1), 0) FROM ({dupes})", [])
            examples = (
                _rows(con, f"{dupes} ORDER BY copies DESC LIMIT {EXAMPLES}", []) if count else []
            )
        elif isinstance(rule, ChainContinuityRule):
            links = (
                "SELECT b.block_number, b.parent_hash, p.block_hash AS previous_block_hash "
                "FROM data b JOIN data p ON p.block_number + 1 = b.block_number"
            )
            rows = _count(con, f"SELECT count(*) FROM ({links})", [])
            broken = f"{links} WHERE b.parent_hash IS DISTINCT FROM p.block_hash"
            count = _count(con, f"SELECT count(*) FROM ({broken})", [])
            examples = _rows(con, f"{broken} ORDER BY 1 LIMIT {EXAMPLES}", []) if count else []
        else:
            query, params = _failing_query(rule, first, last)
            count = _count(con, f"SELECT count(*) FROM ({query})", params)
            examples = (
                _rows(con, f"SELECT * FROM ({query}) LIMIT {EXAMPLES}", params) if count else []
            )
        con.unregister("data")
    finally:
        if own:
            con.close()
    return RuleOutcome(
        rule=rule.name,
        kind=rule.kind,
        rows=rows,
        failing=count,
        threshold=rule.threshold,
        blocking=rule.blocking,
        examples=examples,
        by_partition={partition_key: count} if partition_key else {},
        rows_by_partition={partition_key: rows} if partition_key else {},
        examples_by_partition={partition_key: examples} if partition_key else {},
    )


def merge_outcomes(outcomes: Iterable[RuleOutcome]) -> RuleOutcome:
    """One outcome per rule over several partitions."""
    items = list(outcomes)
    first = items[0]
    merged = RuleOutcome(first.rule, first.kind, 0, 0, first.threshold, first.blocking)
    for o in items:
        merged.rows += o.rows
        merged.failing += o.failing
        merged.examples += o.examples[: max(0, EXAMPLES - len(merged.examples))]
        merged.by_partition.update(o.by_partition)
        merged.rows_by_partition.update(o.rows_by_partition)
        merged.examples_by_partition.update(o.examples_by_partition)
    return merged


PARTITION_COLUMN = "__trace_partition"


def evaluate_rules(
    decl: DatasetDeclaration, tables: Mapping[str | None, pa.Table], kinds: set[str] | None = None
) -> list[RuleOutcome]:
    """Every rule of the declaration over every partition's table, merged per rule.

    With several partitions, the row rules (not_null, range, regex, unique) run once over all
    of them, grouped by partition, instead of once per partition; custom SQL rules run per
    partition (they may use the partition's bounds and return rows without it).
    """
    rules = [r for r in decl.quality if kinds is None or r.kind in kinds]
    grouped_kinds = (NotNullRule, RangeRule, RegexRule, UniqueRule)
    together = len(tables) > 1 and None not in tables
    with _DATABASES.connection() as con:
        combined = _with_partition_column(tables) if together else None
        outcomes = []
        for rule in rules:
            if combined is not None and isinstance(rule, grouped_kinds):
                outcomes.append(_evaluate_grouped(rule, combined, tables, con))
            else:
                outcomes.append(
                    merge_outcomes(
                        evaluate_rule(rule, table, key, con) for key, table in tables.items()
                    )
                )
        return outcomes


def _with_partition_column(tables: Mapping[str | None, pa.Table]) -> pa.Table:
    names = pa.array([str(k) for k in tables], pa.string())
    parts = []
    for index, table in enumerate(tables.values()):
        codes = pa.array(np.full(table.num_rows, index, dtype=np.int32))
        label = pa.DictionaryArray.from_arrays(codes, names)
        parts.append(table.append_column(PARTITION_COLUMN, label))
    return pa.concat_tables(parts, promote_options="permissive")


def _evaluate_grouped(
    rule: Any,
    combined: pa.Table,
    tables: Mapping[str | None, pa.Table],
    con: duckdb.DuckDBPyConnection,
) -> RuleOutcome:
    """One rule over every partition at once, with the failing rows counted per partition."""
    p = _q(PARTITION_COLUMN)
    params: list[Any] = []
    if isinstance(rule, UniqueRule):
        key = ", ".join(_q(c) for c in rule.columns)
        failing_rows = (
            f"SELECT {p}, {key}, count(*) AS copies FROM data GROUP BY {p}, {key} "
            "HAVING count(*) > 1"
        )
        count_sql = f"SELECT {p}, sum(copies - 1) FROM ({failing_rows}) GROUP BY {p}"
        order = "copies DESC"
    else:
        failing_rows, params = _failing_query(rule, None, None)
        count_sql = f"SELECT {p}, count(*) FROM ({failing_rows}) GROUP BY {p}"
        order = p
    con.register("data", combined)
    try:
        counts = con.execute(count_sql, params).fetchall()
        # up to EXAMPLES failing rows of each partition, with the partition they come from
        shown = (
            _rows(
                con,
                f"SELECT * FROM ({failing_rows}) "
                f"QUALIFY row_number() OVER (PARTITION BY {p} ORDER BY {order}) <= {EXAMPLES} "
                f"ORDER BY {p}, {order}",
                params,
            )
            if counts
            else []
        )
    finally:
        con.unregister("data")
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in shown:
        by_key.setdefault(str(row.pop(PARTITION_COLUMN)), []).append(row)
    failing = {str(k): int(v) for k, v in counts}
    return RuleOutcome(
        rule=rule.name,
        kind=rule.kind,
        rows=combined.num_rows,
        failing=sum(failing.values()),
        threshold=rule.threshold,
        blocking=rule.blocking,
        examples=[row for rows in by_key.values() for row in rows][:EXAMPLES],
        by_partition={str(k): failing.get(str(k), 0) for k in tables},
        rows_by_partition={str(k): t.num_rows for k, t in tables.items()},
        examples_by_partition=by_key,
    )


def rule_check_specs(decl: DatasetDeclaration) -> list[dg.AssetCheckSpec]:
    """An asset check per declared rule, described in words (`check_description`, the text
    `trace docs` shows) with the rule as declared kept as metadata."""
    return [
        dg.AssetCheckSpec(
            name=rule.name,
            asset=decl.name,
            blocking=rule.blocking,
            description=check_description(decl, rule),
            metadata={"trace/rule": dg.MetadataValue.json(rule.model_dump(mode="json"))},
        )
        for rule in decl.quality
    ]


def check_results(asset: str, outcomes: Iterable[RuleOutcome]) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            asset_key=asset,
            check_name=o.rule,
            passed=o.passed,
            severity=dg.AssetCheckSeverity.ERROR if o.blocking else dg.AssetCheckSeverity.WARN,
            description=None if o.passed else o.summary(),
            metadata={
                "rows": o.rows,
                "failing_rows": o.failing,
                "error_rate": o.error_rate,
                "threshold": o.threshold,
                "examples": dg.MetadataValue.json(o.examples),
                "failing_by_partition": dg.MetadataValue.json(
                    {k: v for k, v in o.by_partition.items() if v}
                ),
            },
        )
        for o in outcomes
    ]


def gate(dataset: str, outcomes: Iterable[RuleOutcome]) -> None:
    """The circuit breaker: raise if a blocking rule's error rate passed its threshold."""
    tripped = [o for o in outcomes if o.blocking and not o.passed]
    if tripped:
        raise QualityGateError(
            f"{dataset} was not committed: {len(tripped)} blocking quality rule(s) failed. "
            + " | ".join(o.summary() for o in tripped)
            + ". Fix the upstream data (or the rule) and re-materialise these partitions."
        )
