"""Each derived dataset equals an independent computation on the devnet: ERC-20 transfers and
deployments against the traffic generator's own record of what it sent, native transfers
against JSON-RPC, the daily rollup against plain polars over the record."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime

import polars as pl

from tests.conftest import Devnet
from tests.derived.conftest import Env
from trace_resources.chain.ranges import parse_partition_key


def _hex(b: bytes | None) -> str | None:
    return None if b is None else "0x" + b.hex()


def record(devnet: Devnet, kind: str, last_block: int) -> list[dict]:
    rows = [json.loads(line) for line in devnet.record_path.read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind and r.get("block_number", 0) <= last_block]


def last_block(env: Env) -> int:
    return parse_partition_key(env.keys[-1]).last


def test_erc20_transfers_equal_the_generator_record(derived_env: Env, devnet: Devnet) -> None:
    sent = {
        (
            r["block_number"],
            r["log_index"],
            r["tx_hash"],
            r["token"],
            r["from"],
            r["to"],
            r["value"],
        )
        for r in record(devnet, "erc20_transfer", last_block(derived_env))
    }
    table = derived_env.reader.read("erc20_transfers")
    got = {
        (
            r["block_number"],
            r["log_index"],
            _hex(r["transaction_hash"]),
            _hex(r["token"]),
            _hex(r["from_address"]),
            _hex(r["to_address"]),
            r["value_string"],
        )
        for r in table.to_pylist()
    }
    assert len(sent) > 1000
    assert got == sent
    assert table.num_rows == len(sent)  # no duplicates either
    for r in table.slice(0, 200).to_pylist():  # binary and decimal forms agree exactly
        assert int.from_bytes(r["value_binary"], "big") == int(r["value_string"])
        assert len(r["value_binary"]) == 32
    # approvals share the contracts but are not transfers
    assert record(devnet, "approval", last_block(derived_env))


def test_native_transfers_and_fees_equal_json_rpc(derived_env: Env, devnet: Devnet) -> None:
    expected = set()
    fees = set()
    for number in range(0, last_block(derived_env) + 1):
        block = devnet.node.rpc("eth_getBlockByNumber", [hex(number), True])
        receipts = devnet.node.rpc("eth_getBlockReceipts", [hex(number)])
        status = {r["transactionHash"]: int(r["status"], 16) for r in receipts}
        by_hash = {r["transactionHash"]: r for r in receipts}
        for tx in block["transactions"]:
            receipt = by_hash[tx["hash"]]
            price = int(receipt["effectiveGasPrice"], 16)
            fees.add(
                (
                    tx["hash"],
                    str(int(tx["gas"], 16) * price),  # Monad charges the limit
                    str(int(receipt["gasUsed"], 16) * price),
                )
            )
            if int(tx["value"], 16) > 0 and status[tx["hash"]] == 1:
                expected.add(
                    (
                        number,
                        int(tx["transactionIndex"], 16),
                        tx["hash"],
                        tx["from"].lower(),
                        (tx["to"] or "").lower() or None,
                        str(int(tx["value"], 16)),
                        int(block["timestamp"], 16),
                    )
                )
    got = {
        (
            r["block_number"],
            r["transaction_index"],
            _hex(r["transaction_hash"]),
            _hex(r["from_address"]),
            _hex(r["to_address"]),
            r["value_string"],
            r["block_timestamp"],
        )
        for r in derived_env.reader.read("native_transfers").to_pylist()
    }
    assert len(expected) > 500
    assert got == expected
    sent = record(devnet, "native_transfer", last_block(derived_env))
    assert {r["tx_hash"] for r in sent} <= {g[2] for g in got}

    # every transaction's fee, on each basis, named by it
    charged = derived_env.reader.read("transaction_fees")
    assert len(fees) > 1000 and charged.num_rows == len(fees)
    assert {
        (_hex(r["transaction_hash"]), r["fee_on_gas_limit_string"], r["fee_on_gas_used_string"])
        for r in charged.to_pylist()
    } == fees
    assert any(r["fee_on_gas_limit_f64"] > r["fee_on_gas_used_f64"] for r in charged.to_pylist())


def test_contracts_equal_the_recorded_deployments(derived_env: Env, devnet: Devnet) -> None:
    deployed = {
        (r["block_number"], r["tx_index"], r["tx_hash"], r["deployer"], r["contract_address"])
        for r in record(devnet, "deployment", last_block(derived_env))
    }
    got = {
        (
            r["block_number"],
            r["transaction_index"],
            _hex(r["transaction_hash"]),
            _hex(r["deployer"]),
            _hex(r["contract_address"]),
        )
        for r in derived_env.reader.read("contracts").to_pylist()
    }
    assert len(deployed) >= 4
    assert got == deployed


def test_daily_volume_equals_polars_over_the_record(derived_env: Env, devnet: Devnet) -> None:
    last = last_block(derived_env)
    days = {
        r["block_number"]: datetime.fromtimestamp(r["timestamp"], UTC).date()
        for r in record(devnet, "block", last)
    }
    days[0] = datetime.fromtimestamp(
        int(devnet.node.rpc("eth_getBlockByNumber", ["0x0", False])["timestamp"], 16), UTC
    ).date()
    frame = pl.DataFrame(record(devnet, "erc20_transfer", last)).with_columns(
        pl.col("block_number").replace_strict(days, return_dtype=pl.Date).alias("day")
    )
    grouped = frame.group_by("day", "token").agg(
        pl.len().alias("transfer_count"),
        pl.col("value").alias("values"),
        pl.col("from").n_unique().alias("distinct_senders"),
        pl.col("to").n_unique().alias("distinct_receivers"),
    )
    expected = {
        (r["day"], r["token"]): (
            r["transfer_count"],
            str(sum(int(v) for v in r["values"])),
            r["distinct_senders"],
            r["distinct_receivers"],
        )
        for r in grouped.iter_rows(named=True)
    }
    table = derived_env.reader.read("token_daily_volume")
    got = {
        (r["day"], _hex(r["token"])): (
            r["transfer_count"],
            r["volume_string"],
            r["distinct_senders"],
            r["distinct_receivers"],
        )
        for r in table.to_pylist()
    }
    assert got == expected
    tags = defaultdict(set)
    for r in table.to_pylist():
        tags[r["day"]].update(r["source_ranges"])
    assert set().union(*tags.values()) == {f"{k}@v1" for k in derived_env.keys}
