"""One explicit Arrow schema per raw dataset, stable across partitions.

Every table carries `chain_id` and `block_number`. Hashes and addresses are raw bytes.
256-bit quantities are kept exact: `value_binary` holds the 32-byte big-endian integer and
`value_string` its decimal digits; `value_f64` is a lossy convenience for quick analysis.
"""

from __future__ import annotations

from typing import Literal, get_args

import pyarrow as pa

from trace_resources.errors import UnknownDatasetError

__all__ = [
    "RawDataset",
    "RAW_DATASETS",
    "RAW_DESCRIPTIONS",
    "RAW_SCHEMAS",
    "raw_schema",
    "CRYO_COLUMNS",
    "GETH_CALLS",
    "TRACE_DATASETS",
    "TRACE_DESCRIPTIONS",
    "TRACE_SCHEMAS",
    "TraceDataset",
]

RawDataset = Literal["blocks", "transactions", "logs"]
RAW_DATASETS: tuple[RawDataset, ...] = get_args(RawDataset)

_HASH = pa.binary()
_ADDRESS = pa.binary()


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


BLOCKS = pa.schema(
    [
        _field("chain_id", pa.uint64(), "EIP-155 chain id"),
        _field("block_number", pa.uint64(), "block height"),
        _field("block_hash", _HASH, "block hash (32 bytes)"),
        _field("parent_hash", _HASH, "hash of the parent block (32 bytes)"),
        _field("timestamp", pa.uint64(), "block timestamp, seconds since the Unix epoch"),
        _field("author", _ADDRESS, "block proposer / fee recipient (20 bytes)", True),
        _field("transaction_count", pa.uint32(), "number of transactions in the block"),
        _field("gas_used", pa.uint64(), "gas used by all transactions", True),
        _field("base_fee_per_gas", pa.uint64(), "EIP-1559 base fee in wei", True),
        _field("size", pa.uint64(), "block size in bytes", True),
        _field("state_root", _HASH, "state trie root", True),
        _field("transactions_root", _HASH, "transactions trie root", True),
        _field("receipts_root", _HASH, "receipts trie root", True),
        _field("logs_bloom", pa.binary(), "256-byte bloom filter of the block's logs", True),
        _field("extra_data", pa.binary(), "proposer's extra data", True),
    ]
)

TRANSACTIONS = pa.schema(
    [
        _field("chain_id", pa.uint64(), "EIP-155 chain id"),
        _field("block_number", pa.uint64(), "block height"),
        _field("block_hash", _HASH, "hash of the block holding the transaction"),
        _field("timestamp", pa.uint64(), "block timestamp, seconds since the Unix epoch"),
        _field("transaction_index", pa.uint32(), "position in the block"),
        _field("transaction_hash", _HASH, "transaction hash (32 bytes)"),
        _field("nonce", pa.uint64(), "sender nonce"),
        _field("from_address", _ADDRESS, "sender (20 bytes)"),
        _field("to_address", _ADDRESS, "recipient; null for contract creation", True),
        _field("value_binary", pa.binary(), "value in wei, exact, 32-byte big-endian"),
        _field("value_string", pa.string(), "value in wei, exact, decimal digits"),
        _field("value_f64", pa.float64(), "value in wei as a float (lossy)"),
        _field("input", pa.binary(), "call data", True),
        _field(
            "gas_limit",
            pa.uint64(),
            "gas limit; Monad charges for it whatever is used (fee = gas_limit x gas_price)",
            True,
        ),
        _field(
            "gas_used",
            pa.uint64(),
            "gas used (from the receipt); the fee basis on Ethereum-style chains, not on Monad "
            "(see gas_limit)",
            True,
        ),
        _field("gas_price", pa.uint64(), "effective gas price in wei", True),
        _field("transaction_type", pa.uint32(), "EIP-2718 type", True),
        _field("max_priority_fee_per_gas", pa.uint64(), "EIP-1559 tip cap", True),
        _field("max_fee_per_gas", pa.uint64(), "EIP-1559 fee cap", True),
        _field("success", pa.bool_(), "receipt status", True),
    ]
)

LOGS = pa.schema(
    [
        _field("chain_id", pa.uint64(), "EIP-155 chain id"),
        _field("block_number", pa.uint64(), "block height"),
        _field("block_hash", _HASH, "hash of the block holding the log"),
        _field("transaction_index", pa.uint32(), "position of the emitting transaction"),
        _field("log_index", pa.uint32(), "position of the log in the block"),
        _field("transaction_hash", _HASH, "emitting transaction hash"),
        _field("address", _ADDRESS, "emitting contract (20 bytes)"),
        _field("topic0", _HASH, "event signature hash", True),
        _field("topic1", _HASH, "first indexed argument", True),
        _field("topic2", _HASH, "second indexed argument", True),
        _field("topic3", _HASH, "third indexed argument", True),
        _field("data", pa.binary(), "non-indexed event data", True),
    ]
)

# Call traces are a raw dataset of their own, extracted apart from the three above: not every
# endpoint serves `debug_*`, and those that do not must not hold back blocks, transactions and
# logs. One row per call frame of `debug_traceBlockByNumber` with the callTracer, in pre-order.
GETH_CALLS = pa.schema(
    [
        _field("chain_id", pa.uint64(), "EIP-155 chain id"),
        _field("block_number", pa.uint64(), "block height"),
        _field("block_hash", _HASH, "hash of the block holding the transaction"),
        _field("transaction_index", pa.uint32(), "position of the transaction in the block"),
        _field("transaction_hash", _HASH, "transaction hash (32 bytes)"),
        _field(
            "trace_address",
            pa.string(),
            "path of the frame in the call tree: child positions joined by '.', '' for the "
            "transaction's top-level frame",
        ),
        _field("depth", pa.uint32(), "0 for the top-level frame, 1 for its calls, ..."),
        _field(
            "call_type",
            pa.string(),
            "CALL, STATICCALL, DELEGATECALL, CALLCODE, CREATE, CREATE2 or SELFDESTRUCT",
        ),
        _field("from_address", _ADDRESS, "caller (20 bytes)"),
        _field("to_address", _ADDRESS, "callee, or the created contract (20 bytes)", True),
        _field("value_binary", pa.binary(), "value sent in wei, exact, 32-byte big-endian", True),
        _field("value_string", pa.string(), "value sent in wei, exact, decimal digits", True),
        _field("value_f64", pa.float64(), "value sent in wei as a float (lossy)", True),
        _field("gas", pa.uint64(), "gas given to the frame"),
        _field("gas_used", pa.uint64(), "gas used by the frame"),
        _field("input", pa.binary(), "call data, or init code of a creation", True),
        _field("output", pa.binary(), "return data, or code of the created contract", True),
        _field("error", pa.string(), "why the frame failed (e.g. 'execution reverted')", True),
        _field("revert_reason", pa.string(), "decoded revert reason, if the node gave one", True),
        _field(
            "reverted",
            pa.bool_(),
            "the frame or a frame enclosing it failed: its effects, value included, were undone",
        ),
    ]
)

TraceDataset = Literal["geth_calls"]
TRACE_DATASETS: tuple[TraceDataset, ...] = get_args(TraceDataset)
TRACE_SCHEMAS: dict[TraceDataset, pa.Schema] = {"geth_calls": GETH_CALLS}
TRACE_DESCRIPTIONS: dict[TraceDataset, str] = {
    "geth_calls": "One row per call frame of every transaction (debug_traceBlockByNumber with "
    "the callTracer): calls, creations and self-destructs at every depth, with value, gas, "
    "input, output and whether the frame was undone. Internal transfers and contracts created "
    "by contracts are derived from it.",
}

# The business meaning of each raw dataset (Dagster asset descriptions, query-service discovery).
RAW_DESCRIPTIONS: dict[RawDataset, str] = {
    "blocks": "One row per block of the chain: hashes, parent hash, timestamp, gas, proposer, "
    "transaction count and logs bloom. The backbone every other dataset joins to.",
    "transactions": "One row per transaction with its receipt outcome (gas used, success); "
    "values in wei kept exact as 32-byte big-endian and decimal string.",
    "logs": "One row per event log emitted by a transaction: emitting contract, topics and "
    "data. Decoded datasets such as ERC-20 transfers are derived from it.",
}

RAW_SCHEMAS: dict[RawDataset, pa.Schema] = {
    "blocks": BLOCKS,
    "transactions": TRANSACTIONS,
    "logs": LOGS,
}

# Columns Trace asks cryo for; the rest of the schema is added by Trace itself.
CRYO_COLUMNS: dict[RawDataset, list[str]] = {
    "blocks": [f.name for f in BLOCKS if f.name != "transaction_count"],
    "transactions": [f.name for f in TRANSACTIONS],
    "logs": [f.name for f in LOGS],
}


def raw_schema(dataset: str) -> pa.Schema:
    schemas: dict[str, pa.Schema] = dict(RAW_SCHEMAS.items()) | dict(TRACE_SCHEMAS.items())
    try:
        return schemas[dataset]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown raw dataset {dataset!r}: the raw datasets are {', '.join(schemas)}"
        ) from None
