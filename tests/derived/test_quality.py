"""Quality rules pass on good data and fail on data corrupted on purpose, with the counts
right; the circuit breaker keeps bad data from readers (nothing committed for the partition)."""

from __future__ import annotations

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.derived.conftest import ALL_ASSETS, Env, ranged_tags
from trace_assets.checks import (
    DATASET_CHECKS,
    evaluate_range,
    raw_rule_evaluation,
    raw_rule_outcomes,
)
from trace_assets.derived import transforms
from trace_assets.derived.assets import PARTITIONED_TRANSFORMS, derive_pipelined
from trace_assets.quality import RuleOutcome, evaluate_rule, evaluate_rules
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.registry import RangeRule, SqlRule, arrow_schema, declarations
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.state import engine_for


def rule(dataset: str, name: str):  # type: ignore[no-untyped-def]
    return next(r for r in declarations()[dataset].quality if r.name == name)


def set_rows(table: pa.Table, column: str, rows: list[int], value: object) -> pa.Table:
    values = table[column].to_pylist()
    for i in rows:
        values[i] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.field(column), pa.array(values, table.field(column).type))


@pytest.fixture(scope="module")
def transfers(raw_env: Env) -> tuple[str, pa.Table]:
    """One range of erc20_transfers computed from the committed raw data (not committed)."""
    key = raw_env.keys[2]
    table = transforms.erc20_transfers(
        raw_env.reader.read("logs", [key]), raw_env.reader.read("blocks", [key])
    )
    return key, table


def test_every_rule_passes_on_good_data(raw_env: Env, transfers: tuple[str, pa.Table]) -> None:
    key, table = transfers
    outcomes = evaluate_rules(declarations()["erc20_transfers"], {key: table})
    assert {o.rule for o in outcomes} == {r.name for r in declarations()["erc20_transfers"].quality}
    assert all(o.passed and o.failing == 0 and o.rows == table.num_rows for o in outcomes)
    raw = [
        o
        for d in ("blocks", "transactions", "logs")
        for o in raw_rule_outcomes(declarations()[d], raw_env.reader, raw_env.keys)
    ]
    assert {o.kind for o in raw} >= {"not_null", "unique", "regex", "sql", "chain_continuity"}
    assert all(o.passed and o.failing == 0 for o in raw), [o.summary() for o in raw]
    links = next(o for o in raw if o.kind == "chain_continuity")
    assert links.rows == len(raw_env.keys) * 50 - 1  # every consecutive pair was compared


def test_not_null_counts_null_rows(transfers: tuple[str, pa.Table]) -> None:
    key, table = transfers
    bad = set_rows(table, "to_address", [0, 5, 9], None)
    outcome = evaluate_rule(rule("erc20_transfers", "parties_not_null"), bad, key)
    assert (outcome.failing, outcome.passed, len(outcome.examples)) == (3, False, 3)
    assert outcome.examples[0]["to_address"] is None
    assert outcome.examples[0]["log_index"] == table["log_index"][0].as_py()


def test_unique_counts_duplicate_rows(transfers: tuple[str, pa.Table]) -> None:
    key, table = transfers
    bad = pa.concat_tables([table, table.slice(10, 4)])
    outcome = evaluate_rule(rule("erc20_transfers", "one_row_per_log"), bad, key)
    assert (outcome.failing, outcome.rows, outcome.passed) == (4, table.num_rows + 4, False)
    assert {e["copies"] for e in outcome.examples} == {2}


def test_regex_counts_malformed_values(transfers: tuple[str, pa.Table]) -> None:
    key, table = transfers
    bad = set_rows(table, "value_string", [1, 2], "0x10")
    bad = set_rows(bad, "value_string", [3], "007")
    outcome = evaluate_rule(rule("erc20_transfers", "value_is_decimal"), bad, key)
    assert outcome.failing == 3
    assert {e["value_string"] for e in outcome.examples} == {"0x10", "007"}


def test_range_counts_out_of_range_rows_and_threshold(transfers: tuple[str, pa.Table]) -> None:
    key, table = transfers
    bad = set_rows(table, "transaction_index", [4, 6], 200_000)
    strict = rule("erc20_transfers", "transaction_index_plausible")
    outcome = evaluate_rule(strict, bad, key)
    assert (outcome.failing, outcome.passed) == (2, False)
    tolerant = RangeRule(**{**strict.model_dump(), "threshold": 2 / table.num_rows})
    assert evaluate_rule(tolerant, bad, key).passed  # at the threshold: passes


def test_custom_sql_counts_rows_outside_their_partition(
    raw_env: Env, transfers: tuple[str, pa.Table]
) -> None:
    key, table = transfers
    outcome = evaluate_rule(rule("erc20_transfers", "rows_in_partition"), table, raw_env.keys[0])
    assert outcome.failing == table.num_rows > 0
    short = set_rows(table, "from_address", [7], b"\x01" * 19)
    assert evaluate_rule(rule("erc20_transfers", "addresses_are_20_bytes"), short, key).failing == 1


def test_rules_over_many_partitions_count_each_partition_as_alone(raw_env: Env) -> None:
    """A ranged run evaluates every range at once; each range's counts, rows and examples are
    those of that range evaluated alone, for every kind of rule, custom SQL included."""
    keys = raw_env.keys[:3]
    parts = {
        k: transforms.erc20_transfers(
            raw_env.reader.read("logs", [k]), raw_env.reader.read("blocks", [k])
        )
        for k in keys
    }
    parts[keys[0]] = set_rows(parts[keys[0]], "from_address", [1, 2], b"\x01" * 19)
    parts[keys[2]] = set_rows(parts[keys[2]], "value_string", [0], "-5")
    # a row of the second range that belongs to the first: only the second partition fails
    parts[keys[1]] = pa.concat_tables([parts[keys[1]], parts[keys[0]].slice(0, 1)])
    decl = declarations()["erc20_transfers"]
    decl = decl.model_copy(
        update={
            "quality": [
                *decl.quality,
                SqlRule(  # a query with its own CTE, using the bounds
                    name="late_rows",
                    kind="sql",
                    query="WITH late AS (SELECT * FROM data WHERE block_number > "
                    "{first_block} + 40) SELECT * FROM late",
                ),
            ]
        }
    )
    together = {o.rule: o for o in evaluate_rules(decl, parts)}
    for r in decl.quality:
        alone = [evaluate_rule(r, parts[k], k) for k in keys]
        got = together[r.name]
        assert got.by_partition == {k: a.failing for k, a in zip(keys, alone, strict=True)}
        assert got.rows_by_partition == {k: a.rows for k, a in zip(keys, alone, strict=True)}
        assert got.failing == sum(a.failing for a in alone)
        for k, a in zip(keys, alone, strict=True):
            assert len(got.examples_by_partition.get(k, [])) == len(a.examples), (r.name, k)
    assert together["addresses_are_20_bytes"].by_partition == {keys[0]: 2, keys[1]: 0, keys[2]: 0}
    assert together["rows_in_partition"].by_partition == {keys[0]: 0, keys[1]: 1, keys[2]: 0}
    assert together["value_is_decimal"].by_partition == {keys[0]: 0, keys[1]: 0, keys[2]: 1}
    assert 0 < together["late_rows"].failing < sum(t.num_rows for t in parts.values())

    broken = SqlRule(name="broken", kind="sql", query="SELECT * FROM data WHERE no_such_column")
    with pytest.raises(duckdb.BinderException, match="no_such_column"):
        evaluate_rules(decl.model_copy(update={"quality": [broken]}), parts)


def test_chain_continuity_finds_a_broken_link_across_ranges(raw_env: Env) -> None:
    blocks = declarations()["blocks"]
    key = raw_env.keys[3]
    table = raw_env.reader.read("blocks", [key])
    bad = set_rows(table, "parent_hash", [0], b"\xee" * 32)  # the link to the previous range
    with raw_env.state.writer(raw_env.objects) as writer:
        # no source hashes: bypasses the commit-time continuity check, as a buggy writer would
        writer.write("blocks", key, PartitionData(bad))
    try:
        outcomes = raw_rule_outcomes(blocks, raw_env.reader, [key])
        link = next(o for o in outcomes if o.kind == "chain_continuity")
        assert (link.failing, link.passed) == (1, False)
        first = int(key[:12])
        assert link.examples[0]["block_number"] == first
        assert link.examples[0]["parent_hash"] == "0x" + "ee" * 32
        # the neighbours were checked too: both boundaries of the range were compared
        assert link.rows == 3 * 50 - 1
    finally:
        with raw_env.state.writer(raw_env.objects) as writer:
            writer.write("blocks", key, PartitionData(table))
    assert all(o.passed for o in raw_rule_outcomes(blocks, raw_env.reader, [key]))


def test_rules_evaluated_as_committed_equal_those_read_back(raw_env: Env) -> None:
    """The raw step evaluates each range's rules on the tables it has just committed instead of
    reading them back: the outcomes are those of the committed data, and an evaluation of
    another version of a range (committed again since) is not used."""
    keys = raw_env.keys[1:4]
    for name in ("blocks", "transactions", "logs"):
        decl = declarations()[name]
        current = raw_env.reader.resolve(name, keys)
        evaluated = {
            k: evaluate_range(decl, k, current[k].version, raw_env.reader.read(name, [k]))
            for k in keys
        }
        read_back, versions = raw_rule_evaluation(decl, raw_env.reader, keys)
        in_step, in_step_versions = raw_rule_evaluation(decl, raw_env.reader, keys, evaluated)
        assert in_step_versions == versions
        summary = [
            (o.rule, o.rows, o.failing, o.by_partition, o.rows_by_partition) for o in read_back
        ]
        assert [
            (o.rule, o.rows, o.failing, o.by_partition, o.rows_by_partition) for o in in_step
        ] == summary

    # the evaluation is used for the version it was made on, and only for it
    blocks = declarations()["blocks"]
    key = keys[1]
    version = raw_env.reader.resolve("blocks", [key])[key].version
    table = raw_env.reader.read("blocks", [key])
    bad = set_rows(set_rows(table, "parent_hash", [0], b"\xee" * 32), "block_hash", [3], None)
    for at, fails in ((version, True), (version + 1, False)):
        outcomes, _ = raw_rule_evaluation(
            blocks, raw_env.reader, [key], {key: evaluate_range(blocks, key, at, bad)}
        )
        failed = {o.kind for o in outcomes if o.failing}
        assert failed == ({"chain_continuity", "not_null"} if fails else set()), failed


def test_circuit_breaker_keeps_bad_data_from_readers(raw_env: Env) -> None:
    key = raw_env.keys[1]
    logs = raw_env.reader.read("logs", [key])
    is_transfer = pc.equal(logs["topic0"], pa.scalar(transforms.TRANSFER_TOPIC, pa.binary()))
    duplicated = pa.concat_tables([logs, logs.filter(is_transfer).slice(0, 3)])
    with raw_env.state.writer(raw_env.objects) as writer:
        writer.write("logs", key, PartitionData(duplicated))
    try:
        result = dg.materialize(
            ALL_ASSETS,
            instance=raw_env.instance,
            resources=raw_env.resources(),
            tags=ranged_tags(raw_env.keys[:2]),
            selection=["erc20_transfers"],
            raise_on_error=False,
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.step_failure_data.user_failure_data.description
        assert "erc20_transfers was not committed" in message
        assert "'one_row_per_log' (unique): 3 of" in message
        assert "copies" in message  # shows examples
        check = next(
            e.asset_check_evaluation_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.asset_check_evaluation_data.check_name == "one_row_per_log"
        )
        assert not check.passed
        assert check.metadata["failing_rows"].value == 3
        assert check.metadata["failing_by_partition"].value == {key: 3}
        # nothing reached readers: no version for either range of the failed run
        assert raw_env.reader.resolve("erc20_transfers", raw_env.keys[:2]) == {}
        # the ranges staged while the rules ran were failed at once (their files are GC's),
        # not left live until their leases ran out
        with engine_for(raw_env.settings.state_dsn).connect() as conn:
            states = conn.exec_driver_sql(
                "SELECT partition_key, state FROM trace_attempts WHERE dataset = 'erc20_transfers'"
            ).all()
        assert states and {k for k, _ in states} <= set(raw_env.keys[:2]), states
        assert "staging" not in {state for _, state in states}, states
    finally:
        with raw_env.state.writer(raw_env.objects) as writer:
            writer.write("logs", key, PartitionData(logs))
    good = dg.materialize(
        ALL_ASSETS,
        instance=raw_env.instance,
        resources=raw_env.resources(),
        tags=ranged_tags(raw_env.keys[:2]),
        selection=["erc20_transfers"],
    )
    assert good.success
    assert sorted(raw_env.reader.resolve("erc20_transfers")) == raw_env.keys[:2]


def test_a_failed_upstream_check_blocks_downstream_in_later_runs(raw_env: Env) -> None:
    """Run 1 commits bad logs and its blocking check fails; run 2, a separate run, must not
    build erc20_transfers from that version and says why; a fixed version unblocks it."""
    assert len(raw_env.keys) >= 6  # two ranges no other test of the module touches
    keys = raw_env.keys[-2:]
    bad_key = keys[1]
    logs = raw_env.reader.read("logs", [bad_key])
    # two non-Transfer logs twice: caught by logs' blocking `one_row_per_log`, invisible to
    # erc20_transfers' own rules (they are not transfers)
    is_transfer = pc.equal(logs["topic0"], pa.scalar(transforms.TRANSFER_TOPIC, pa.binary()))
    others = logs.filter(pc.invert(pc.fill_null(is_transfer, False))).slice(0, 2)
    assert others.num_rows == 2
    bad = pa.concat_tables([logs, others]).sort_by(
        [("block_number", "ascending"), ("log_index", "ascending")]
    )
    with raw_env.state.writer(raw_env.objects) as writer:
        writer.write("logs", bad_key, PartitionData(bad))
    bad_version = raw_env.reader.resolve("logs", [bad_key])[bad_key].version
    try:
        first = dg.materialize(  # run 1: the checks of the raw datasets over the two ranges
            [*ALL_ASSETS, *DATASET_CHECKS],
            instance=raw_env.instance,
            resources=raw_env.resources(),
            tags=ranged_tags(keys),
            selection=dg.AssetSelection.checks_for_assets("logs"),
            raise_on_error=False,
        )
        check = next(
            e.asset_check_evaluation_data
            for e in first.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.asset_check_evaluation_data.check_name == "one_row_per_log"
            and e.asset_check_evaluation_data.asset_key == dg.AssetKey("logs")
        )
        assert not check.passed and check.metadata["failing_by_partition"].value == {bad_key: 2}

        second = dg.materialize(  # run 2: a separate run of the downstream asset
            ALL_ASSETS,
            instance=raw_env.instance,
            resources=raw_env.resources(),
            tags=ranged_tags(keys),
            selection=["erc20_transfers"],
            raise_on_error=False,
        )
        assert not second.success
        failure = next(e for e in second.all_events if e.event_type_value == "STEP_FAILURE")
        user_failure = failure.step_failure_data.user_failure_data
        assert user_failure is not None and user_failure.description is not None
        message = user_failure.description
        assert message.startswith("UpstreamQualityError: logs partition(s) " + bad_key)
        assert f"rule 'one_row_per_log' failed on logs {bad_key} v{bad_version}: 2 of " in message
        assert "'copies': 2" in message  # examples
        assert keys[0] not in message.split("failed blocking")[0]  # the good range is not named
        # readers never see derived data built from the bad version
        assert raw_env.reader.resolve("erc20_transfers", keys) == {}
    finally:
        with raw_env.state.writer(raw_env.objects) as writer:
            writer.write("logs", bad_key, PartitionData(logs))
    fixed = dg.materialize(  # a new version of the range (its checks pass) unblocks it
        [*ALL_ASSETS, *DATASET_CHECKS],
        instance=raw_env.instance,
        resources=raw_env.resources(),
        tags=ranged_tags(keys),
        selection=dg.AssetSelection.checks_for_assets("logs")
        | dg.AssetSelection.assets("erc20_transfers"),
    )
    assert fixed.success
    assert sorted(raw_env.reader.resolve("erc20_transfers", keys)) == keys


@pytest.mark.parametrize("dataset", ["erc20_transfers", "transaction_fees"])
def test_a_run_derived_chunk_by_chunk_equals_the_run_derived_whole(
    raw_env: Env, dataset: str
) -> None:
    """A multi-range run transforms, checks and stages its ranges a chunk at a time (the rules
    and staging of one chunk beside the transform of the next): the same rows per range and the
    same rule outcomes as the ranges transformed in one piece; unsorted input is taken whole."""
    decl = declarations()[dataset]
    upstream = {u: raw_env.reader.read(u, raw_env.keys) for u in decl.upstream}

    calls: list[list[str]] = []

    def derive(
        inputs: dict[str, pa.Table], chunks: int
    ) -> tuple[list[object], dict[str, pa.Table]]:
        staged: dict[str, pa.Table] = {}
        calls.clear()

        def stage(parts: dict[str, PartitionData]) -> list[object]:
            assert not set(parts) & set(staged), "a range staged twice"
            calls.append(sorted(parts, key=start))
            staged.update((k, p.table) for k, p in parts.items())
            return list(parts)

        outcomes, handles = derive_pipelined(
            decl,
            PARTITIONED_TRANSFORMS[dataset],
            arrow_schema(decl),
            inputs,
            list(reversed(raw_env.keys)),  # in any order
            stage,  # type: ignore[arg-type]
            chunks=chunks,
            min_rows=0,  # the devnet's ranges are small
        )
        assert sorted(handles) == sorted(raw_env.keys)  # type: ignore[type-var]
        return outcomes, staged

    whole_outcomes, whole = derive(upstream, 1)
    assert len(calls) == 1
    assert len(raw_env.keys) >= 4
    assert sum(t.num_rows for t in whole.values()) > 0
    for chunks in (3, len(raw_env.keys)):
        outcomes, parts = derive(upstream, chunks)
        # staged a chunk of consecutive ranges at a time
        assert 2 <= len(calls) <= chunks, calls
        in_order = sorted(calls, key=lambda chunk: start(chunk[0]))
        assert [k for chunk in in_order for k in chunk] == sorted(raw_env.keys, key=start)
        assert sorted(parts) == sorted(whole)
        for key, table in whole.items():
            assert parts[key].equals(table), (chunks, key)
        assert [seen(o) for o in outcomes] == [seen(o) for o in whole_outcomes]
    # a duplicated row at the end breaks the block order: taken whole, the duplicate still
    # counted by the range's unique rule
    first = decl.upstream[0]
    rows = upstream[first]
    if first == "logs":
        rows = rows.filter(
            pc.equal(rows["topic0"], pa.scalar(transforms.TRANSFER_TOPIC, pa.binary()))
        )
    shuffled = {**upstream, first: pa.concat_tables([upstream[first], rows.slice(0, 1)])}
    outcomes, parts = derive(shuffled, 3)
    assert sorted(parts) == sorted(whole) and len(calls) == 1
    unique = next(o for o in outcomes if o.kind == "unique")
    assert unique.failing == 1, unique
    assert [k for k, n in unique.by_partition.items() if n] == [min(raw_env.keys, key=start)]


def start(key: str) -> int:
    return parse_partition_key(key).start


def seen(outcome: RuleOutcome) -> tuple[object, ...]:
    """What a rule's check shows (a partition without failing rows shows no examples)."""
    return (
        outcome.rule,
        outcome.rows,
        outcome.failing,
        outcome.examples,
        outcome.by_partition,
        outcome.rows_by_partition,
        {k: v for k, v in outcome.examples_by_partition.items() if v},
    )


FORKED_EVALUATIONS = """
import os, sys
import pyarrow as pa
from trace_assets.quality import evaluate_rules
from trace_resources.registry import declarations

decl = declarations()["logs"]
table = pa.table({"block_number": pa.array([1, 1, 2], pa.uint64()),
                  "log_index": pa.array([0, 0, 0], pa.uint32()),
                  "address": [b"a", None, b"c"], "transaction_hash": [b"x", b"y", b"z"]})

def failing():
    outcomes = evaluate_rules(decl, {"000000000000-000000000999": table})
    return {o.rule: o.failing for o in outcomes}

print("parent before", failing(), flush=True)
pid = os.fork()
if pid == 0:
    print("child", failing(), flush=True)
    sys.exit(0)  # a normal exit: the interpreter frees what it still holds
_, status = os.waitpid(pid, 0)
print("child status", status, flush=True)
print("parent after", failing(), flush=True)
"""


def test_rules_evaluate_in_a_forked_child_and_in_its_parent_after_the_fork(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The rules share one DuckDB database per process; the warm run worker forks runs. A
    child must evaluate on a database of its own and exit cleanly (freeing an inherited one
    crashes it), and the parent must go on evaluating after the fork."""
    import subprocess
    import sys

    script = tmp_path / "forked.py"
    script.write_text(FORKED_EVALUATIONS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = "{'one_row_per_log': 1, 'address_not_null': 1}"
    assert done.stdout.splitlines() == [
        f"parent before {expected}",
        f"child {expected}",
        "child status 0",
        f"parent after {expected}",
    ], done.stderr[-3000:]
