"""The generator behind `make bench-scale` (infra/bench/synthetic.py): deterministic, and its
ranges are valid raw data by Trace's own checks, so the benchmark measures real work."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from infra.bench.synthetic import TRANSFER_TOPIC, generate_range
from trace_assets.derived import transforms
from trace_assets.quality import evaluate_rules
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS, RAW_SCHEMAS
from trace_resources.chain.verify import verify_range
from trace_resources.registry import declarations

FIRST, SECOND = BlockRange(0, 149), BlockRange(150, 299)


def _verify(block_range: BlockRange, tables: dict[str, pa.Table]) -> dict[str, list[int]]:
    return verify_range(block_range, *(tables[name] for name in RAW_DATASETS)).problems


def test_the_same_seed_and_range_give_the_same_bytes_in_any_order() -> None:
    second_alone = generate_range(SECOND, seed=5)
    first = generate_range(FIRST, seed=5)
    second = generate_range(SECOND, seed=5)
    other_seed = generate_range(SECOND, seed=6)
    for name in RAW_DATASETS:
        assert second.tables[name].equals(second_alone.tables[name]), name
        assert not second.tables[name].equals(other_seed.tables[name]), name
    # consecutive ranges link up: the next range's first parent is this range's last block
    assert second.first.parent_hash == first.last.hash


def test_generated_ranges_pass_verification_and_every_raw_rule() -> None:
    first, second = generate_range(FIRST, seed=5), generate_range(SECOND, seed=5)
    for data in (first, second):
        assert _verify(data.block_range, data.tables) == {}
        for name in RAW_DATASETS:
            table = data.tables[name]
            assert table.schema.equals(RAW_SCHEMAS[name], check_metadata=True), name
            assert table.num_rows > 0, name
            decl = declarations()[name]
            kinds = {str(r.kind) for r in decl.quality} - {"chain_continuity"}
            failing = {
                o.rule: o.failing
                for o in evaluate_rules(decl, {data.block_range.key: table}, kinds=kinds)
                if o.failing
            }
            assert failing == {}, (name, failing)
    blocks = pa.concat_tables([first.tables["blocks"], second.tables["blocks"]])
    [continuity] = evaluate_rules(
        declarations()["blocks"], {None: blocks}, kinds={"chain_continuity"}
    )
    assert continuity.failing == 0


def test_a_dropped_log_fails_verification() -> None:
    data = generate_range(FIRST, seed=5)
    logs = data.tables["logs"]
    tampered = {**data.tables, "logs": logs.slice(1)}
    assert _verify(FIRST, tampered), "a range missing its first log must not verify"


def test_the_derived_transforms_have_real_work() -> None:
    tables = generate_range(FIRST, seed=5).tables
    logs = tables["logs"]
    transfers = transforms.erc20_transfers(logs, tables["blocks"])
    topic0_transfer = pc.sum(pc.equal(logs["topic0"], pa.scalar(TRANSFER_TOPIC))).as_py()
    # most logs are ERC-20 Transfers; the ERC-721 ones (four topics) are left out
    assert 0.5 * logs.num_rows < transfers.num_rows < topic0_transfer
    values = transfers["value_binary"].to_pylist()
    assert transfers["value_string"].to_pylist() == [str(int.from_bytes(v, "big")) for v in values]
    assert transforms.native_transfers(tables["transactions"]).num_rows > 0
    assert transforms.contracts(tables["transactions"]).num_rows > 0
    fees = transforms.transaction_fees(tables["transactions"])
    assert fees.num_rows == tables["transactions"].num_rows
