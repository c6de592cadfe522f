"""A fast, deterministic generator of realistic raw block ranges (blocks, transactions, logs),
for benchmarks at scales no devnet reaches (`make bench-scale`).

Every range is generated on its own from `(seed, first block)` with numpy, so any range can be
made again alone, in any order, with the same bytes. The shape follows a busy EVM chain at
Monad's pace (300 ms blocks): ~30 transactions and ~36 logs per block by default, senders and
recipients drawn from a Zipf-like pool of accounts, tokens from a smaller pool.

What makes the derived datasets do real work:
- transactions: ~60% move native value (exact 32-byte big-endian, decimal digits, float), ~3%
  fail, ~0.5% create a contract (`to_address` null, unique (sender, nonce)); gas limit, gas
  used <= limit and an effective gas price, so `transaction_fees` multiplies real numbers; an
  ERC-20 `transfer(address,uint256)` call carries its 68 bytes of call data.
- logs: ~70% ERC-20 `Transfer` (topic0 = keccak of the signature, topic1/topic2 the 32-byte
  left-padded sender and recipient, 32 bytes of data, no topic3), ~10% ERC-721 `Transfer`
  (four topics, no data: `erc20_transfers` must leave them out), ~20% other events.
- blocks link by parent hash, count their transactions, and carry the logs bloom of their
  logs (yellow paper 4.3.1), so `trace_resources.chain.verify.verify_range` passes.

Hashes are random bytes (seeded), not the keccak of an encoded header or transaction: nothing
in Trace recomputes them from content.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from Crypto.Hash import keccak

from trace_resources.chain.extract import BlockRef, RangeData
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_SCHEMAS

__all__ = ["ChainShape", "MONAD_BLOCK_S", "generate_range", "GENESIS_TIMESTAMP"]

MONAD_BLOCK_S = 0.3
GENESIS_TIMESTAMP = 1_750_000_000
TRANSFER_TOPIC = keccak.new(digest_bits=256, data=b"Transfer(address,address,uint256)").digest()
TRANSFER_SELECTOR = keccak.new(digest_bits=256, data=b"transfer(address,uint256)").digest()[:4]
BLOOM_BITS = 2048


@dataclass(frozen=True)
class ChainShape:
    """How busy the generated chain is (means per block / per transaction) and its pools."""

    chain_id: int = 10143
    txs_per_block: float = 30.0
    logs_per_tx: float = 1.2
    accounts: int = 50_000
    tokens: int = 500
    validators: int = 200
    event_kinds: int = 50  # other (non-Transfer) event signatures
    nft_ids: int = 10_000

    @property
    def rows_per_block(self) -> float:
        return 1 + self.txs_per_block * (1 + self.logs_per_tx)


@dataclass(frozen=True)
class _Pools:
    accounts: np.ndarray  # (n, 20) uint8
    tokens: np.ndarray  # (n, 20) uint8
    validators: np.ndarray  # (n, 20) uint8
    events: np.ndarray  # (n, 32) uint8: topic0 of the other events
    account_weights: np.ndarray  # Zipf-like: a few accounts send and receive most
    # the 3 logs-bloom bits each item sets, hashed once per pool (not once per log)
    account_topic_bits: np.ndarray  # (accounts + 1, 3): the 32-byte topic; last: zero address
    token_bits: np.ndarray  # (tokens, 3): the 20-byte emitting address
    event_bits: np.ndarray  # (event_kinds + 1, 3): the other events' topic0; last: Transfer
    nft_bits: np.ndarray  # (nft_ids, 3): the token id as topic3


@functools.lru_cache(maxsize=4)
def _pools(seed: int, shape: ChainShape) -> _Pools:
    rng = np.random.default_rng([seed, 0xA11CE])
    weights = 1.0 / np.arange(1, shape.accounts + 1) ** 0.8
    accounts = rng.integers(0, 256, (shape.accounts, 20), dtype=np.uint8)
    tokens = rng.integers(0, 256, (shape.tokens, 20), dtype=np.uint8)
    events = rng.integers(0, 256, (shape.event_kinds, 32), dtype=np.uint8)
    ids = np.arange(shape.nft_ids, dtype=np.uint64)
    return _Pools(
        accounts=accounts,
        tokens=tokens,
        validators=rng.integers(0, 256, (shape.validators, 20), dtype=np.uint8),
        events=events,
        account_weights=weights / weights.sum(),
        account_topic_bits=_bits_of(np.vstack([_padded(accounts), np.zeros((1, 32), np.uint8)])),
        token_bits=_bits_of(tokens),
        event_bits=_bits_of(np.vstack([events, np.frombuffer(TRANSFER_TOPIC, np.uint8)])),
        nft_bits=_bits_of(_uint256_words(ids)),
    )


def _bits_of(rows: np.ndarray) -> np.ndarray:
    return np.array([_bloom_bits(row.tobytes()) for row in rows], dtype=np.int64).reshape(-1, 3)


def block_hash(seed: int, number: int) -> bytes:
    """The generated chain's hash of block `number` (the same from every range)."""
    return hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=32).digest()


def _fixed_binary(rows: np.ndarray) -> pa.Array:
    """An (n, width) uint8 array as a binary column of n values of `width` bytes."""
    n, width = rows.shape
    offsets = np.arange(n + 1, dtype=np.int64) * width
    data = np.ascontiguousarray(rows).tobytes()
    return pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    ).cast(pa.binary())


def _padded(rows: np.ndarray, width: int = 32) -> np.ndarray:
    """Left-pad each row with zero bytes to `width` (an address as a 32-byte topic or word)."""
    out = np.zeros((rows.shape[0], width), dtype=np.uint8)
    out[:, width - rows.shape[1] :] = rows
    return out


def _uint256_words(values: np.ndarray) -> np.ndarray:
    """uint64 values as 32-byte big-endian words."""
    out = np.zeros((len(values), 32), dtype=np.uint8)
    out[:, 24:] = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    return out


def _null_where(array: pa.Array, missing: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(missing), pa.nulls(len(array), array.type), array)


def _bloom_bits(item: bytes) -> tuple[int, int, int]:
    digest = keccak.new(digest_bits=256, data=item).digest()
    return tuple(((digest[i] << 8) | digest[i + 1]) & 2047 for i in (0, 2, 4))  # type: ignore[return-value]


def _blooms(
    n_blocks: int, log_block: np.ndarray, items: list[tuple[np.ndarray, np.ndarray]]
) -> pa.Array:
    """Each block's 256-byte logs bloom from its logs' addresses and topics: `items` holds,
    per column, the 3 bits of each log's value (n_logs, 3) and where the value is present."""
    found = np.zeros((n_blocks, BLOOM_BITS), dtype=bool)
    for bits, present in items:
        found[np.repeat(log_block[present], 3), bits[present].ravel()] = True
    # bit i of the big-endian 2048-bit number: pack least significant bit first, then reverse
    packed = np.packbits(found, axis=1, bitorder="little")[:, ::-1]
    return _fixed_binary(packed)


def generate_range(
    block_range: BlockRange, seed: int = 0, shape: ChainShape = ChainShape()
) -> RangeData:
    """The raw tables of `block_range` (deterministic in `seed`, `shape` and the range)."""
    rng = np.random.default_rng([seed, block_range.start, block_range.size])
    pools = _pools(seed, shape)
    numbers = np.arange(block_range.start, block_range.last + 1, dtype=np.uint64)
    n_blocks = len(numbers)
    hashes = [block_hash(seed, int(n)) for n in numbers]
    parent = block_hash(seed, block_range.start - 1) if block_range.start else bytes(32)
    parents = [parent, *hashes[:-1]]
    timestamps = (GENESIS_TIMESTAMP + (numbers * 3) // 10).astype(np.uint64)

    # transactions
    tx_counts = rng.poisson(shape.txs_per_block, n_blocks)
    n_tx = int(tx_counts.sum())
    tx_block = np.repeat(np.arange(n_blocks), tx_counts)
    tx_first = np.cumsum(tx_counts) - tx_counts
    tx_index = (np.arange(n_tx) - np.repeat(tx_first, tx_counts)).astype(np.uint32)
    tx_hashes = rng.integers(0, 256, (n_tx, 32), dtype=np.uint8)
    sender = rng.choice(shape.accounts, n_tx, p=pools.account_weights)
    recipient = rng.choice(shape.accounts, n_tx, p=pools.account_weights)
    kind = rng.random(n_tx)
    creates = kind < 0.005
    token_call = (kind >= 0.005) & (kind < 0.4)  # calls a token contract, no native value
    success = rng.random(n_tx) >= 0.03
    value = np.where(
        token_call | (rng.random(n_tx) < 0.35),
        0,
        rng.integers(1, 10**6, n_tx).astype(np.uint64) * np.uint64(10**12),
    ).astype(np.uint64)
    token_of_tx = rng.integers(0, shape.tokens, n_tx)
    to_rows = np.where(token_call[:, None], pools.tokens[token_of_tx], pools.accounts[recipient])
    to_address = _null_where(_fixed_binary(to_rows), creates)
    gas_limit = rng.integers(21_000, 500_000, n_tx).astype(np.uint64)
    gas_used = (gas_limit * rng.uniform(0.4, 1.0, n_tx)).astype(np.uint64)
    base_fee = np.uint64(50 * 10**9)
    gas_price = (base_fee + rng.integers(0, 2 * 10**9, n_tx).astype(np.uint64)).astype(np.uint64)
    amounts = rng.integers(1, 10**9, n_tx).astype(np.uint64) * np.uint64(10**9)
    # an ERC-20 transfer call: selector, recipient word, amount word; other transactions: empty
    call_data = np.concatenate(
        [
            np.broadcast_to(np.frombuffer(TRANSFER_SELECTOR, np.uint8), (n_tx, 4)),
            _padded(pools.accounts[recipient]),
            _uint256_words(amounts),
        ],
        axis=1,
    )
    input_lengths = np.where(token_call, 68, 0)
    input_offsets = np.r_[0, np.cumsum(input_lengths)].astype(np.int64)
    input_data = call_data[token_call].tobytes()
    tx_input = pa.Array.from_buffers(
        pa.large_binary(), n_tx, [None, pa.py_buffer(input_offsets), pa.py_buffer(input_data)]
    ).cast(pa.binary())
    value_array = pa.array(value, pa.uint64())
    block_hash_col = pa.array([hashes[i] for i in range(n_blocks)], pa.binary()).take(
        pa.array(tx_block)
    )
    transactions = pa.table(
        {
            "chain_id": pa.array(np.full(n_tx, shape.chain_id, np.uint64)),
            "block_number": pa.array(numbers[tx_block]),
            "block_hash": block_hash_col,
            "timestamp": pa.array(timestamps[tx_block]),
            "transaction_index": pa.array(tx_index),
            "transaction_hash": _fixed_binary(tx_hashes),
            # unique over the chain, so every creation has its own (deployer, nonce) address
            "nonce": pa.array(numbers[tx_block] * np.uint64(10_000) + tx_index),
            "from_address": _fixed_binary(pools.accounts[sender]),
            "to_address": to_address,
            "value_binary": _fixed_binary(_uint256_words(value)),
            "value_string": pc.cast(value_array, pa.string()),
            "value_f64": pa.array(value.astype(np.float64)),
            "input": tx_input,
            "gas_limit": pa.array(gas_limit),
            "gas_used": pa.array(gas_used),
            "gas_price": pa.array(gas_price),
            "transaction_type": pa.array(np.full(n_tx, 2, np.uint32)),
            "max_priority_fee_per_gas": pa.array(gas_price - base_fee),
            "max_fee_per_gas": pa.array(gas_price * np.uint64(2)),
            "success": pa.array(success),
        },
        schema=RAW_SCHEMAS["transactions"],
    )

    # logs: from successful transactions only (a failed one emits none)
    log_counts = np.where(success, rng.poisson(shape.logs_per_tx, n_tx), 0)
    log_counts = np.where(token_call & success, np.maximum(log_counts, 1), log_counts)
    n_logs = int(log_counts.sum())
    log_tx = np.repeat(np.arange(n_tx), log_counts)
    log_block = tx_block[log_tx]
    per_block = np.bincount(log_block, minlength=n_blocks)
    log_index = (np.arange(n_logs) - np.repeat(np.cumsum(per_block) - per_block, per_block)).astype(
        np.uint32
    )
    event = rng.random(n_logs)
    erc20 = event < 0.7
    nft = (event >= 0.7) & (event < 0.8)
    other = event >= 0.8
    first_of_tx = np.r_[True, log_tx[1:] != log_tx[:-1]] if n_logs else np.zeros(0, bool)
    # the first log of a token call is its own Transfer, emitted by the token it called
    erc20 |= token_call[log_tx] & first_of_tx
    nft &= ~erc20
    other &= ~erc20
    token = np.where(
        token_call[log_tx] & first_of_tx, token_of_tx[log_tx], rng.integers(0, shape.tokens, n_logs)
    )
    src = rng.choice(shape.accounts, n_logs, p=pools.account_weights)
    dst = rng.choice(shape.accounts, n_logs, p=pools.account_weights)
    src = np.where(token_call[log_tx] & first_of_tx, sender[log_tx], src)
    dst = np.where(token_call[log_tx] & first_of_tx, recipient[log_tx], dst)
    mint = rng.random(n_logs) < 0.02
    src = np.where(mint, shape.accounts, src)  # the zero address: a mint
    src_rows = np.vstack([pools.accounts, np.zeros((1, 20), np.uint8)])[src]
    event_kind = np.where(other, rng.integers(0, shape.event_kinds, n_logs), shape.event_kinds)
    topic0_rows = np.vstack([pools.events, np.frombuffer(TRANSFER_TOPIC, np.uint8)])[event_kind]
    nft_ids = rng.integers(0, shape.nft_ids, n_logs).astype(np.uint64)
    log_amounts = np.where(
        token_call[log_tx] & first_of_tx,
        amounts[log_tx],
        rng.integers(1, 10**12, n_logs).astype(np.uint64) * np.uint64(10**6),
    )
    data_rows = np.where(
        other[:, None, None],
        np.stack([_uint256_words(log_amounts), _uint256_words(nft_ids)], axis=1),
        np.stack([_uint256_words(log_amounts), np.zeros((n_logs, 32), np.uint8)], axis=1),
    ).reshape(n_logs, 64)
    data_lengths = np.select([erc20, nft], [32, 0], 64)
    keep = np.arange(64)[None, :] < data_lengths[:, None]
    data_offsets = np.r_[0, np.cumsum(data_lengths)].astype(np.int64)
    data = pa.Array.from_buffers(
        pa.large_binary(),
        n_logs,
        [None, pa.py_buffer(data_offsets), pa.py_buffer(data_rows[keep].tobytes())],
    ).cast(pa.binary())
    topic1 = _fixed_binary(_padded(src_rows))
    topic2 = _null_where(_fixed_binary(_padded(pools.accounts[dst])), other)
    topic3 = _null_where(_fixed_binary(_uint256_words(nft_ids)), ~nft)
    address = _fixed_binary(pools.tokens[token])
    topic0 = _fixed_binary(topic0_rows)
    logs = pa.table(
        {
            "chain_id": pa.array(np.full(n_logs, shape.chain_id, np.uint64)),
            "block_number": pa.array(numbers[log_block]),
            "block_hash": block_hash_col.take(pa.array(log_tx)),
            "transaction_index": pa.array(tx_index[log_tx]),
            "log_index": pa.array(log_index),
            "transaction_hash": _fixed_binary(tx_hashes[log_tx]),
            "address": address,
            "topic0": topic0,
            "topic1": topic1,
            "topic2": topic2,
            "topic3": topic3,
            "data": data,
        },
        schema=RAW_SCHEMAS["logs"],
    )

    block_gas = np.bincount(tx_block, weights=gas_used.astype(np.float64), minlength=n_blocks)
    blocks = pa.table(
        {
            "chain_id": pa.array(np.full(n_blocks, shape.chain_id, np.uint64)),
            "block_number": pa.array(numbers),
            "block_hash": pa.array(hashes, pa.binary()),
            "parent_hash": pa.array(parents, pa.binary()),
            "timestamp": pa.array(timestamps),
            "author": _fixed_binary(pools.validators[rng.integers(0, shape.validators, n_blocks)]),
            "transaction_count": pa.array(tx_counts.astype(np.uint32)),
            "gas_used": pa.array(block_gas.astype(np.uint64)),
            "base_fee_per_gas": pa.array(np.full(n_blocks, base_fee, np.uint64)),
            "size": pa.array((tx_counts * 180 + 600).astype(np.uint64)),
            "state_root": _fixed_binary(rng.integers(0, 256, (n_blocks, 32), dtype=np.uint8)),
            "transactions_root": _fixed_binary(
                rng.integers(0, 256, (n_blocks, 32), dtype=np.uint8)
            ),
            "receipts_root": _fixed_binary(rng.integers(0, 256, (n_blocks, 32), dtype=np.uint8)),
            "logs_bloom": _blooms(
                n_blocks,
                log_block,
                [
                    (pools.token_bits[token], np.ones(n_logs, bool)),
                    (pools.event_bits[event_kind], np.ones(n_logs, bool)),
                    (pools.account_topic_bits[src], np.ones(n_logs, bool)),
                    (pools.account_topic_bits[dst], ~other),
                    (pools.nft_bits[nft_ids.astype(np.int64)], nft),
                ],
            ),
            "extra_data": pa.array([b""] * n_blocks, pa.binary()),
        },
        schema=RAW_SCHEMAS["blocks"],
    )
    first = BlockRef(block_range.start, "0x" + hashes[0].hex(), "0x" + parents[0].hex())
    last = BlockRef(block_range.last, "0x" + hashes[-1].hex(), "0x" + parents[-1].hex())
    return RangeData(
        block_range,
        {"blocks": blocks, "transactions": transactions, "logs": logs},
        first,
        last,
        endpoint="synthetic",
    )
