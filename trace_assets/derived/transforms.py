"""The transforms of the derived datasets: pure functions from committed Arrow tables to Arrow
tables, so that Dagster assets, tests and the benchmark run exactly the same code.

Each partitioned transform works on any number of block ranges at once (a ranged run reads
them as one table); `split_by_range` then cuts the result into one table per partition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from Crypto.Hash import keccak

from trace_resources.chain.ranges import parse_partition_key

__all__ = [
    "TRANSFER_TOPIC",
    "contract_address",
    "contracts",
    "erc20_transfers",
    "native_transfers",
    "split_by_range",
    "traced_contracts",
    "traced_native_transfers",
    "daily_volume",
    "token_holders",
    "transaction_fees",
    "uint256_strings",
]

# keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")


def uint256_strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """32-byte big-endian words as exact decimal strings."""
    return pa.array(
        [None if v is None else str(int.from_bytes(v, "big")) for v in values.to_pylist()],
        pa.string(),
    )


def _timestamps_of(block_numbers: pa.ChunkedArray, blocks: pa.Table) -> pa.Array:
    index = pc.index_in(block_numbers, value_set=blocks["block_number"])
    return pc.take(blocks["timestamp"], index)


def erc20_transfers(logs: pa.Table, blocks: pa.Table) -> pa.Table:
    """Decoded Transfer(address indexed, address indexed, uint256) logs."""
    transfer = pa.scalar(TRANSFER_TOPIC, pa.binary())
    mask = pc.and_kleene(
        pc.and_kleene(
            pc.equal(logs["topic0"], transfer),
            pc.and_kleene(
                pc.equal(pc.binary_length(logs["topic1"]), 32),
                pc.equal(pc.binary_length(logs["topic2"]), 32),
            ),
        ),
        pc.and_kleene(pc.is_null(logs["topic3"]), pc.equal(pc.binary_length(logs["data"]), 32)),
    )
    t = logs.filter(pc.fill_null(mask, False))
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": _timestamps_of(t["block_number"], blocks),
            "transaction_hash": t["transaction_hash"],
            "transaction_index": t["transaction_index"],
            "log_index": t["log_index"],
            "token": t["address"],
            "from_address": pc.binary_slice(t["topic1"], 12, 32),
            "to_address": pc.binary_slice(t["topic2"], 12, 32),
            "value_binary": t["data"],
            "value_string": uint256_strings(t["data"]),
        }
    ).sort_by([("block_number", "ascending"), ("log_index", "ascending")])


def native_transfers(transactions: pa.Table) -> pa.Table:
    """Successful transactions with a value above zero."""
    mask = pc.and_kleene(
        pc.fill_null(transactions["success"], False),
        pc.not_equal(transactions["value_string"], "0"),
    )
    t = transactions.filter(mask)
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": t["timestamp"],
            "transaction_index": t["transaction_index"],
            "transaction_hash": t["transaction_hash"],
            "from_address": t["from_address"],
            "to_address": t["to_address"],
            "value_binary": t["value_binary"],
            "value_string": t["value_string"],
            "value_f64": t["value_f64"],
        }
    ).sort_by([("block_number", "ascending"), ("transaction_index", "ascending")])


def _fee(gas: pa.ChunkedArray, price: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """gas x price in wei, exact (decimal strings: the product can pass 2**64) and as a float."""
    exact = [
        None if g is None or p is None else g * p
        for g, p in zip(gas.to_pylist(), price.to_pylist(), strict=True)
    ]
    return (
        pa.array([None if f is None else str(f) for f in exact], pa.string()),
        pa.array([None if f is None else float(f) for f in exact], pa.float64()),
    )


def transaction_fees(transactions: pa.Table) -> pa.Table:
    """Every transaction's fee on both bases, named by basis: Monad charges the gas limit,
    Ethereum-style chains the gas used."""
    t = transactions
    on_limit, on_limit_f64 = _fee(t["gas_limit"], t["gas_price"])
    on_used, on_used_f64 = _fee(t["gas_used"], t["gas_price"])
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": t["timestamp"],
            "transaction_index": t["transaction_index"],
            "transaction_hash": t["transaction_hash"],
            "from_address": t["from_address"],
            "success": t["success"],
            "gas_limit": t["gas_limit"],
            "gas_used": t["gas_used"],
            "gas_price": t["gas_price"],
            "fee_on_gas_limit_string": on_limit,
            "fee_on_gas_limit_f64": on_limit_f64,
            "fee_on_gas_used_string": on_used,
            "fee_on_gas_used_f64": on_used_f64,
        }
    ).sort_by([("block_number", "ascending"), ("transaction_index", "ascending")])


# frames that run code in the caller's context move no value, whatever value they show
_NO_TRANSFER_CALL_TYPES = pa.array(["DELEGATECALL", "STATICCALL"], pa.string())
_CREATE_CALL_TYPES = pa.array(["CREATE", "CREATE2"], pa.string())


def _frames_that_happened(calls: pa.Table, mask: pa.ChunkedArray) -> pa.Table:
    """The frames of `mask` that were not undone, in block, transaction and call-tree order
    (`geth_calls` holds each transaction's frames in pre-order; the sort is stable)."""
    kept = pc.and_kleene(mask, pc.invert(calls["reverted"]))
    return calls.filter(pc.fill_null(kept, False)).sort_by(
        [("block_number", "ascending"), ("transaction_index", "ascending")]
    )


def traced_native_transfers(geth_calls: pa.Table, blocks: pa.Table) -> pa.Table:
    """Every movement of native currency that took effect, from the call traces: the
    transaction's own value (depth 0) and value sent by contracts (internal calls, creations
    and self-destructs at depth >= 1)."""
    moves_value = pc.and_kleene(
        pc.not_equal(pc.fill_null(geth_calls["value_string"], "0"), "0"),
        pc.invert(pc.is_in(geth_calls["call_type"], value_set=_NO_TRANSFER_CALL_TYPES)),
    )
    t = _frames_that_happened(geth_calls, moves_value)
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": _timestamps_of(t["block_number"], blocks),
            "transaction_index": t["transaction_index"],
            "transaction_hash": t["transaction_hash"],
            "trace_address": t["trace_address"],
            "depth": t["depth"],
            "call_type": t["call_type"],
            "from_address": t["from_address"],
            "to_address": t["to_address"],
            "value_binary": t["value_binary"],
            "value_string": t["value_string"],
            "value_f64": t["value_f64"],
        }
    )


def traced_contracts(geth_calls: pa.Table, blocks: pa.Table) -> pa.Table:
    """Every contract created, from the call traces: by transactions (depth 0) and by other
    contracts (CREATE and CREATE2 frames at depth >= 1), unless the creation was undone."""
    creates = pc.and_kleene(
        pc.is_in(geth_calls["call_type"], value_set=_CREATE_CALL_TYPES),
        pc.is_valid(geth_calls["to_address"]),
    )
    t = _frames_that_happened(geth_calls, creates)
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": _timestamps_of(t["block_number"], blocks),
            "transaction_index": t["transaction_index"],
            "transaction_hash": t["transaction_hash"],
            "trace_address": t["trace_address"],
            "depth": t["depth"],
            "create_type": t["call_type"],
            "deployer": t["from_address"],
            "contract_address": t["to_address"],
            "gas_used": t["gas_used"],
        }
    )


def _rlp_bytes(data: bytes) -> bytes:
    if len(data) == 1 and data[0] < 0x80:
        return data
    if len(data) >= 56:
        raise ValueError("only short RLP strings are needed here")
    return bytes([0x80 + len(data)]) + data


def contract_address(deployer: bytes, nonce: int) -> bytes:
    """The CREATE address: keccak256(rlp([deployer, nonce]))[12:]."""
    nonce_bytes = nonce.to_bytes((nonce.bit_length() + 7) // 8, "big") if nonce else b""
    payload = _rlp_bytes(deployer) + _rlp_bytes(nonce_bytes)
    encoded = bytes([0xC0 + len(payload)]) + payload
    return keccak.new(data=encoded, digest_bits=256).digest()[12:]


def contracts(transactions: pa.Table) -> pa.Table:
    """Contracts created by successful contract-creation transactions."""
    mask = pc.and_kleene(
        pc.fill_null(transactions["success"], False), pc.is_null(transactions["to_address"])
    )
    t = transactions.filter(mask)
    addresses = [
        contract_address(d, n)
        for d, n in zip(t["from_address"].to_pylist(), t["nonce"].to_pylist(), strict=True)
    ]
    return pa.table(
        {
            "chain_id": t["chain_id"],
            "block_number": t["block_number"],
            "block_timestamp": t["timestamp"],
            "transaction_index": t["transaction_index"],
            "transaction_hash": t["transaction_hash"],
            "deployer": t["from_address"],
            "deployer_nonce": t["nonce"],
            "contract_address": pa.array(addresses, pa.binary()),
            "gas_used": t["gas_used"],
        }
    ).sort_by([("block_number", "ascending"), ("transaction_index", "ascending")])


def split_by_range(table: pa.Table, keys: Sequence[str]) -> dict[str, pa.Table]:
    """One slice per block-range partition; the table must be sorted by block_number."""
    numbers = table["block_number"].to_numpy() if table.num_rows else np.array([], np.uint64)
    out = {}
    for key in keys:
        r = parse_partition_key(key)
        lo = int(np.searchsorted(numbers, r.start, side="left"))
        hi = int(np.searchsorted(numbers, r.last, side="right"))
        out[key] = table.slice(lo, hi - lo)
    return out


def daily_volume(transfers: pa.Table, range_tags: dict[str, str]) -> pa.Table:
    """Per UTC day and token: transfers, exact volume, distinct senders and receivers.

    `range_tags` maps each block-range key of `transfers` to its `key@vN` tag, recorded per
    day in `source_ranges`. The exact 256-bit volume is summed as eight 32-bit limbs in
    64-bit integers (exact for fewer than 2**32 transfers a group) and recombined in Python.
    """
    values = transfers["value_binary"].to_pylist()
    limbs = np.frombuffer(b"".join(values), dtype=">u4").reshape(-1, 8).astype(np.uint64)
    keys = sorted(range_tags)
    starts = np.array([parse_partition_key(k).start for k in keys], dtype=np.uint64)
    numbers = transfers["block_number"].to_numpy()
    which = np.searchsorted(starts, numbers, side="right") - 1 if len(keys) else np.array([])
    frame = pl.DataFrame(
        {
            "day": (transfers["block_timestamp"].to_numpy() // 86_400).astype(np.int32),
            "chain_id": transfers["chain_id"].to_numpy(),
            "token": transfers["token"].to_pylist(),
            "from_address": transfers["from_address"].to_pylist(),
            "to_address": transfers["to_address"].to_pylist(),
            "range_tag": [range_tags[keys[i]] for i in which],
            **{f"l{i}": limbs[:, i] for i in range(8)},
        },
        schema_overrides={"token": pl.Binary, "from_address": pl.Binary, "to_address": pl.Binary},
    )
    tags = frame.group_by("day").agg(pl.col("range_tag").unique().sort().alias("source_ranges"))
    grouped = (
        frame.group_by("day", "chain_id", "token")
        .agg(
            pl.len().alias("transfer_count"),
            *[pl.col(f"l{i}").sum() for i in range(8)],
            pl.col("from_address").n_unique().alias("distinct_senders"),
            pl.col("to_address").n_unique().alias("distinct_receivers"),
        )
        .join(tags, on="day")
        .sort("day", "token")
    )
    volumes = [
        str(sum(int(row[i]) << (32 * (7 - i)) for i in range(8)))
        for row in grouped.select([f"l{i}" for i in range(8)]).iter_rows()
    ]
    return pa.table(
        {
            "day": pa.array(grouped["day"].to_numpy(), pa.int32()).cast(pa.date32()),
            "chain_id": pa.array(grouped["chain_id"].to_numpy(), pa.uint64()),
            "token": pa.array(grouped["token"].to_list(), pa.binary()),
            "transfer_count": pa.array(grouped["transfer_count"].to_numpy(), pa.uint64()),
            "volume_string": pa.array(volumes, pa.string()),
            "distinct_senders": pa.array(grouped["distinct_senders"].to_numpy(), pa.uint64()),
            "distinct_receivers": pa.array(grouped["distinct_receivers"].to_numpy(), pa.uint64()),
            "source_ranges": pa.array(grouped["source_ranges"].to_list(), pa.list_(pa.string())),
        }
    )


ZERO_ADDRESS = bytes(20)


def _limb_sums(values: list[bytes]) -> np.ndarray:
    """32-byte big-endian words as eight 32-bit limbs in uint64 (for exact grouped sums)."""
    if not values:
        return np.zeros((0, 8), dtype=np.uint64)
    return np.frombuffer(b"".join(values), dtype=">u4").reshape(-1, 8).astype(np.uint64)


def _recombine(limbs: Sequence[int]) -> int:
    return sum(int(v) << (32 * (7 - i)) for i, v in enumerate(limbs))


def token_holders(transfers: pa.Table, range_tags: dict[str, str]) -> pa.Table:
    """Per token: holders (addresses other than the zero address whose balance, received
    minus sent over every transfer given, is above zero), transfers, last block and the
    `key@vN` tags of the ranges holding its transfers.

    Balances are exact: amounts are summed per (token, address) as 32-bit limbs in 64-bit
    integers, separately for what was received and what was sent, and recombined in Python.
    """
    keys = sorted(range_tags)
    starts = np.array([parse_partition_key(k).start for k in keys], dtype=np.uint64)
    numbers = transfers["block_number"].to_numpy()
    which = np.searchsorted(starts, numbers, side="right") - 1 if len(keys) else np.array([])
    limbs = _limb_sums(transfers["value_binary"].to_pylist())
    tokens = transfers["token"].to_pylist()
    base = {
        "chain_id": transfers["chain_id"].to_numpy(),
        "token": tokens,
        **{f"l{i}": limbs[:, i] for i in range(8)},
    }
    binary = {"token": pl.Binary, "address": pl.Binary}
    received = pl.DataFrame(
        {**base, "address": transfers["to_address"].to_pylist()}, schema_overrides=binary
    )
    sent = pl.DataFrame(
        {**base, "address": transfers["from_address"].to_pylist()}, schema_overrides=binary
    )
    sums = [pl.col(f"l{i}").sum() for i in range(8)]
    inflow = received.group_by("chain_id", "token", "address").agg(*sums)
    outflow = sent.group_by("chain_id", "token", "address").agg(*sums)
    balances: dict[tuple[int, bytes], dict[bytes, int]] = {}
    for frame, sign in ((inflow, 1), (outflow, -1)):
        for row in frame.iter_rows():
            chain_id, token, address, *parts = row
            per_token = balances.setdefault((chain_id, token), {})
            per_token[address] = per_token.get(address, 0) + sign * _recombine(parts)
    meta = (
        pl.DataFrame(
            {
                "chain_id": transfers["chain_id"].to_numpy(),
                "token": tokens,
                "block_number": numbers,
                "range_tag": [range_tags[keys[i]] for i in which],
            },
            schema_overrides={"token": pl.Binary},
        )
        .group_by("chain_id", "token")
        .agg(
            pl.len().alias("transfer_count"),
            pl.col("block_number").max().alias("last_block"),
            pl.col("range_tag").unique().sort().alias("source_ranges"),
        )
        .sort("token")
    )
    holders = [
        sum(
            1
            for address, balance in balances.get((chain_id, token), {}).items()
            if balance > 0 and address != ZERO_ADDRESS
        )
        for chain_id, token in zip(meta["chain_id"].to_list(), meta["token"].to_list(), strict=True)
    ]
    return pa.table(
        {
            "chain_id": pa.array(meta["chain_id"].to_numpy(), pa.uint64()),
            "token": pa.array(meta["token"].to_list(), pa.binary()),
            "holders": pa.array(holders, pa.uint64()),
            "transfer_count": pa.array(meta["transfer_count"].to_numpy(), pa.uint64()),
            "last_block": pa.array(meta["last_block"].to_numpy(), pa.uint64()),
            "source_ranges": pa.array(meta["source_ranges"].to_list(), pa.list_(pa.string())),
        }
    )
