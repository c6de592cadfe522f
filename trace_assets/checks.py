"""Asset checks built from the declarations that run after a materialisation, over committed data.

* Raw datasets: their declared quality rules (including `chain_continuity` on blocks) over the
  committed ranges of the run and, for continuity, their committed neighbours. The raw
  commit is already done; a blocking failure stops every downstream asset of the run, and the
  check's failure says which rule, how many rows and shows examples.
* Every dataset: `schema_matches_declaration`, the schema registry surfaced in the UI. It
  compares the schema registered at commit with the declaration and shows every registered
  schema version with its drift (added, removed, retyped columns).
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from trace_assets.derived.assets import SCHEMA_CHECK, SCHEMA_CHECK_DESCRIPTION
from trace_assets.partitions import block_ranges
from trace_assets.quality import (
    RuleOutcome,
    check_results,
    evaluate_rules,
    merge_outcomes,
    rule_check_specs,
)
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.registry import DatasetDeclaration, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.records import RuleResult

__all__ = [
    "DATASET_CHECKS",
    "run_partition_keys",
    "schema_check_result",
    "raw_rule_evaluation",
    "EvaluatedRange",
    "evaluate_range",
    "raw_rule_outcomes",
    "raw_check_specs",
    "raw_check_results",
    "rule_results",
]


def run_partition_keys(context: dg.AssetCheckExecutionContext) -> list[str] | None:
    """The block ranges of the run (from its tags); None when it names no partition."""
    tags = context.run.tags
    if PARTITION_NAME_TAG in tags:
        return [tags[PARTITION_NAME_TAG]]
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start and end:
        keys = sorted(context.instance.get_dynamic_partitions(block_ranges.name or ""))
        return [k for k in keys if start <= k <= end]
    return None


def schema_check_result(decl: DatasetDeclaration, read: ReadModel) -> dg.AssetCheckResult:
    declared = [{"name": c.name, "type": c.type, "nullable": c.nullable} for c in decl.columns]
    registered = read.registered_schema(decl.name)
    history = [
        {"schema_version": v, "schema_hash": h, "drift": drift}
        for v, h, drift in read.schema_history(decl.name)
    ]
    metadata: dict[str, Any] = {
        "schema_versions": dg.MetadataValue.json(history),
        "declared_columns": len(declared),
    }
    if registered is None:
        return dg.AssetCheckResult(
            asset_key=decl.name,
            check_name=SCHEMA_CHECK,
            passed=True,
            description="nothing committed yet",
            metadata=metadata,
        )
    version, fields = registered
    before = {f["name"]: f for f in fields}
    after = {f["name"]: f for f in declared}
    diff = {
        "missing_from_committed": [n for n in after if n not in before],
        "not_declared": [n for n in before if n not in after],
        "type_differs": [
            {"column": n, "committed": before[n]["type"], "declared": after[n]["type"]}
            for n in after
            if n in before and before[n]["type"] != after[n]["type"]
        ],
        "nullability_differs": [
            n for n in after if n in before and before[n]["nullable"] != after[n]["nullable"]
        ],
    }
    passed = not any(diff.values())
    metadata |= {"schema_version": version, "difference": dg.MetadataValue.json(diff)}
    return dg.AssetCheckResult(
        asset_key=decl.name,
        check_name=SCHEMA_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if passed
        else f"committed schema v{version} of {decl.name} differs from {decl.source_file}: "
        f"{ {k: v for k, v in diff.items() if v} }",
        metadata=metadata,
    )


def raw_rule_outcomes(decl: DatasetDeclaration, reader: Any, keys: list[str] | None) -> list[Any]:
    """The declared rules of a raw dataset over its committed ranges `keys` (None: all)."""
    return raw_rule_evaluation(decl, reader, keys)[0]


CONTINUITY_COLUMNS = ["block_number", "block_hash", "parent_hash"]


@dataclass(frozen=True)
class EvaluatedRange:
    """A raw dataset's row rules evaluated on one range's tables as they were committed (in
    the step that committed them, while the next range was extracted), so the checks at the
    end of the step do not read the range back. Valid for exactly `version`: a range
    committed again since is read and evaluated again."""

    version: int
    outcomes: list[RuleOutcome]
    links: pa.Table | None  # CONTINUITY_COLUMNS of the range (blocks only)


def evaluate_range(
    decl: DatasetDeclaration, key: str, version: int, table: pa.Table
) -> EvaluatedRange:
    """The row rules of a raw dataset on one committed range's table (`EvaluatedRange`)."""
    outcomes = (
        evaluate_rules(decl, {key: table}, kinds=_row_rule_kinds(decl))
        if _row_rule_kinds(decl)
        else []
    )
    continuity = any(r.kind == "chain_continuity" for r in decl.quality)
    return EvaluatedRange(
        version, outcomes, table.select(CONTINUITY_COLUMNS) if continuity else None
    )


def _row_rule_kinds(decl: DatasetDeclaration) -> set[str]:
    return {str(r.kind) for r in decl.quality} - {"chain_continuity"}


def raw_rule_evaluation(
    decl: DatasetDeclaration,
    reader: DatasetReader,
    keys: list[str] | None,
    evaluated: Mapping[str, EvaluatedRange] | None = None,
) -> tuple[list[RuleOutcome], dict[str, int]]:
    """The declared rules of a raw dataset over its committed ranges `keys` (None: all), and
    the version of every range they were evaluated on (pinned while read).

    Ranges in `evaluated` whose committed version is the one evaluated are not read again.
    Continuity is checked over the ranges and their committed neighbours, as one table, so
    links across range boundaries are checked too; a broken link counts against the range of
    the block whose parent hash disagrees.
    """
    evaluated = evaluated or {}
    committed = reader.resolve(decl.name)
    keys = sorted(committed) if keys is None else [k for k in keys if k in committed]
    row_rules = _row_rule_kinds(decl)
    continuity = any(r.kind == "chain_continuity" for r in decl.quality)
    around: set[str] = set(keys)
    if keys and continuity:
        for k in keys:
            r = parse_partition_key(k)
            around |= {n for n in (r.previous_key(), r.next_key()) if n and n in committed}
    outcomes: list[RuleOutcome] = []
    if not keys:
        return outcomes, {}
    with reader.pinned(decl.name, sorted(around)) as records:
        versions = {k: records[k].version for k in sorted(around) if k in records}
        known = {k: e for k, e in evaluated.items() if k in versions and e.version == versions[k]}
        if row_rules:
            tables: dict[str | None, pa.Table] = {
                k: reader.read_versions([records[k]])
                for k in keys
                if k in records and k not in known
            }
            fresh = evaluate_rules(decl, tables, kinds=row_rules) if tables else []
            by_rule: dict[str, list[RuleOutcome]] = {o.rule: [o] for o in fresh}
            for k in keys:
                if k in known:
                    for o in known[k].outcomes:
                        by_rule.setdefault(o.rule, []).append(o)
            outcomes += [merge_outcomes(items) for items in by_rule.values()]
        if continuity:
            parts = []
            for k in versions:
                links = known[k].links if k in known else None
                parts.append(
                    links
                    if links is not None
                    else reader.read_versions([records[k]]).select(CONTINUITY_COLUMNS)
                )
            table = pa.concat_tables(parts)
            outcome = evaluate_rules(decl, {None: table}, kinds={"chain_continuity"})[0]
            _attribute_links(outcome, table, list(versions))
            outcomes.append(outcome)
    return outcomes, versions


def _attribute_links(outcome: RuleOutcome, table: Any, keys: list[str]) -> None:
    """Count continuity links (and broken ones) per range: the range of the later block."""
    ordered = table.sort_by("block_number")
    numbers = ordered["block_number"].to_pylist()
    hashes = ordered["block_hash"].to_pylist()
    parents = ordered["parent_hash"].to_pylist()
    ranges = [(k, parse_partition_key(k)) for k in keys]

    def key_of(number: int) -> str | None:
        return next((k for k, r in ranges if r.start <= number <= r.last), None)

    links: dict[str, int] = {k: 0 for k in keys}
    broken: dict[str, int] = {k: 0 for k in keys}
    for i in range(1, len(numbers)):
        if numbers[i] != numbers[i - 1] + 1:
            continue
        key = key_of(numbers[i])
        if key is None:
            continue
        links[key] += 1
        if parents[i] != hashes[i - 1]:
            broken[key] += 1
    outcome.by_partition = broken
    outcome.rows_by_partition = links
    outcome.examples_by_partition = {
        k: [e for e in outcome.examples if key_of(int(e["block_number"])) == k]
        for k in keys
        if broken[k]
    }


def rule_results(
    decl: DatasetDeclaration, outcomes: list[RuleOutcome], versions: dict[str, int]
) -> list[RuleResult]:
    """Per committed version, the outcome of every rule evaluated on it."""
    return [
        RuleResult(
            dataset=decl.name,
            partition_key=key,
            version=version,
            rule=o.rule,
            passed=o.partition_passed(key),
            blocking=o.blocking,
            failing_rows=o.by_partition.get(key, 0),
            rows=o.rows_by_partition.get(key, 0),
            threshold=o.threshold,
            examples=o.examples_by_partition.get(key, []),
        )
        for o in outcomes
        for key, version in versions.items()
        if key in o.rows_by_partition
    ]


def raw_check_specs(decl: DatasetDeclaration) -> list[dg.AssetCheckSpec]:
    """The checks of a raw dataset: its declared rules and the schema check. They run in the
    raw datasets' own step, after the commit (`raw_check_results`)."""
    return [
        *rule_check_specs(decl),
        dg.AssetCheckSpec(SCHEMA_CHECK, asset=decl.name, description=SCHEMA_CHECK_DESCRIPTION),
    ]


def raw_check_results(
    decl: DatasetDeclaration,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    selected: set[str],
    keys: list[str] | None,
    run_id: str,
    evaluated: Mapping[str, EvaluatedRange] | None = None,
) -> Iterator[dg.AssetCheckResult]:
    """The selected checks of a raw dataset over its committed ranges `keys` (None: all);
    ranges `evaluated` as they were committed in this step are not read back."""
    reader = state.reader(objects)
    outcomes, versions = raw_rule_evaluation(decl, reader, keys, evaluated)
    # kept with the versions: derived datasets refuse to read a version whose blocking
    # rule failed, in any later run too (`DatasetReader.read(refuse_failed_checks=True)`)
    state.versions().quality.record(rule_results(decl, outcomes, versions), run_id=run_id)
    evaluated = {o.rule for o in outcomes}
    for result in check_results(decl.name, outcomes):
        if result.check_name in selected:
            yield result
    for rule in decl.quality:  # nothing committed in the run's ranges: nothing to fail
        if rule.name in selected and rule.name not in evaluated:
            yield dg.AssetCheckResult(
                asset_key=decl.name,
                check_name=rule.name,
                passed=True,
                description="no committed rows to check",
            )
    if SCHEMA_CHECK in selected:
        yield schema_check_result(decl, state.versions().read)


def _build_schema_check(decl: DatasetDeclaration) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=decl.name,
        name=SCHEMA_CHECK,
        description=SCHEMA_CHECK_DESCRIPTION,
    )
    def _check(state: StateStoreResource) -> dg.AssetCheckResult:
        return schema_check_result(decl, state.versions().read)

    return _check


# raw datasets' checks are part of their asset (trace_assets/raw/chain.py): evaluated in its step
DATASET_CHECKS: list[dg.AssetChecksDefinition] = [
    _build_schema_check(d) for d in declarations().values() if d.kind != "raw"
]
