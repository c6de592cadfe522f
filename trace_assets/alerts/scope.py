"""Which datasets an organisation's alert conditions may read, and loading them for a range.

The access rule is Trace's one rule (`trace_resources.storage.access.readable_datasets`, the
query service's too), for the organisation without a token: the public datasets (declared in
the registry, `trace_assets/datasets/*.yaml`, or published with `trace public add`) and the
organisation's own committed datasets, named `org_<org>__<name>`. The alert datasets
`erc20_transfers` and `native_transfers` are declared public, so every organisation reads them.

A block-range
dataset is read for the range being evaluated; an unpartitioned one in its current version.

A custom SQL condition is checked when a rule is stored (`RuleStore(check=…)`, the CLI, the
backtest): every table it reads must be a dataset its organisation may read, else the rule
is refused with an error naming the table. As in the query service, a dataset the
organisation may not read is reported exactly like one that does not exist. Evaluation checks
again (a dataset can be unpublished after a rule was stored): such a rule is skipped for the
range and reported, the other rules still run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from trace_resources.alert_pipeline.rules import ALERT_DATASETS, AlertRule, CustomSql, RuleError
from trace_resources.registry import arrow_schema, declarations
from trace_resources.storage.access import readable_datasets
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for

__all__ = ["AlertScope", "RangeTables", "load_range", "referenced", "scope_check"]


def referenced(rule: AlertRule) -> list[str]:
    """The datasets a rule's condition reads."""
    cond = rule.condition
    if isinstance(cond, CustomSql):
        return cond.tables()
    return list(ALERT_DATASETS)


@dataclass
class AlertScope:
    """The datasets each organisation may read, looked up once per organisation."""

    state_dsn: str
    _by_org: dict[str, set[str]] = field(default_factory=dict)

    def readable(self, org: str) -> set[str]:
        if org not in self._by_org:
            self._by_org[org] = set(readable_datasets(engine_for(self.state_dsn), org))
        return self._by_org[org]

    def refusals(self, rule: AlertRule) -> list[str]:
        """The tables a rule reads that its organisation may not read (or that do not exist)."""
        allowed = self.readable(rule.org)
        return [name for name in referenced(rule) if name not in allowed]

    def check(self, rule: AlertRule, source: str = "rule") -> None:
        """RuleError naming every table the condition reads that its organisation may not."""
        refused = self.refusals(rule)
        if not refused:
            return
        names = ", ".join(repr(n) for n in refused)
        readable = ", ".join(sorted(self.readable(rule.org)))
        raise RuleError(
            f"{source}: invalid alert rule\n  condition.custom_sql.sql: reads {names}, which "
            f"{'is not a dataset' if len(refused) == 1 else 'are not datasets'} organisation "
            f"{rule.org!r} may read (no such dataset, or not shared with it). Readable: "
            f"{readable}. Publish a dataset with `trace public add NAME`, or name one of the "
            f"organisation's own datasets (org_{rule.org}__…)."
        )


def scope_check(state_dsn: str) -> Callable[[AlertRule], None]:
    """A `RuleStore(check=…)` that refuses custom SQL over datasets the org may not read
    (looked up afresh for every rule stored)."""

    def check(rule: AlertRule) -> None:
        if isinstance(rule.condition, CustomSql):
            AlertScope(state_dsn).check(rule, f"{rule.org}/{rule.id}")

    return check


@dataclass(frozen=True)
class RangeTables:
    """Committed rows of one block range: dataset -> (version, table); `missing` lists the
    datasets asked for that have no committed data for the range (and no declared schema)."""

    partition_key: str
    tables: Mapping[str, tuple[int, pa.Table]]
    missing: frozenset[str] = frozenset()


def load_range(reader: DatasetReader, partition_key: str, datasets: Iterable[str]) -> RangeTables:
    """The current committed version of each dataset for one range, read under a pin.

    A block-range dataset without a version for the range is absent (a declared one is an
    empty table of its declared schema, except the alert datasets, which stay absent as the
    built-in rules expect); an unpartitioned dataset is read whole.
    """
    decls = declarations()
    tables: dict[str, tuple[int, pa.Table]] = {}
    missing: set[str] = set()
    for dataset in sorted(set(datasets)):
        decl = decls.get(dataset)
        schema = arrow_schema(decl) if decl is not None else None
        key = UNPARTITIONED if decl is not None and decl.partitioning == "none" else None
        with reader.pinned(dataset, [key or partition_key, UNPARTITIONED]) as records:
            record = records.get(key or partition_key) or records.get(UNPARTITIONED)
            if record is not None:
                tables[dataset] = (record.version, reader.read_versions([record], schema))
                continue
        if schema is not None and dataset not in ALERT_DATASETS:
            tables[dataset] = (0, schema.empty_table())
        elif dataset not in ALERT_DATASETS:
            missing.add(dataset)
    return RangeTables(partition_key, tables, frozenset(missing))
