"""The logs-bloom check of range verification, against the yellow paper's definition.

Verification ORs the bloom bits of every extracted log's address and topics per block with
numpy; these tests build header blooms the reference way (a 2048-bit integer, 3 bits per item
from its keccak-256) and check that complete logs pass, and that a missing log, a log of
another block and malformed header blooms are each reported for the right block.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pyarrow as pa
from Crypto.Hash import keccak

from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_SCHEMAS
from trace_resources.chain.verify import verify_range

RANGE = BlockRange(100, 109)
TOPICS = ("topic0", "topic1", "topic2", "topic3")


def reference_bloom(items: list[bytes]) -> bytes:
    bloom = 0
    for item in items:
        digest = keccak.new(digest_bits=256, data=item).digest()
        for i in (0, 2, 4):
            bloom |= 1 << (((digest[i] << 8) | digest[i + 1]) & 2047)
    return bloom.to_bytes(256, "big")


def block_hash(number: int) -> bytes:
    return number.to_bytes(32, "big")


def make_logs(seed: int = 7) -> list[dict]:
    """Logs of blocks 100..109: some blocks without logs, repeated addresses, null topics."""
    rng = random.Random(seed)
    addresses = [bytes([a]) * 20 for a in range(1, 5)]
    logs = []
    for number in RANGE.blocks():
        for index in range(0 if number % 4 == 0 else rng.randint(1, 6)):
            topics = [rng.randbytes(32) if rng.random() < 0.7 else None for _ in TOPICS]
            logs.append(
                {
                    "block_number": number,
                    "block_hash": block_hash(number),
                    "transaction_index": 0,
                    "log_index": index,
                    "address": rng.choice(addresses),
                    **dict(zip(TOPICS, topics, strict=True)),
                }
            )
    return logs


def tables(logs: list[dict], blooms: Mapping[int, bytes | None] | None = None) -> dict:
    headers = blooms if blooms is not None else header_blooms(logs)
    blocks = [
        {
            "chain_id": 1,
            "block_number": n,
            "block_hash": block_hash(n),
            "parent_hash": block_hash(n - 1),
            "timestamp": n,
            "transaction_count": 1,
            "logs_bloom": headers.get(n, bytes(256)),
        }
        for n in RANGE.blocks()
    ]
    transactions = [
        {
            "chain_id": 1,
            "block_number": n,
            "block_hash": block_hash(n),
            "timestamp": n,
            "transaction_index": 0,
            "transaction_hash": block_hash(n + 1000),
            "nonce": n,
            "from_address": b"\x09" * 20,
            "value_binary": bytes(32),
            "value_string": "0",
            "value_f64": 0.0,
        }
        for n in RANGE.blocks()
    ]
    rows = [
        {"chain_id": 1, "transaction_hash": block_hash(r["block_number"] + 1000), **r} for r in logs
    ]
    return {
        "blocks": pa.Table.from_pylist(blocks, schema=RAW_SCHEMAS["blocks"]),
        "transactions": pa.Table.from_pylist(transactions, schema=RAW_SCHEMAS["transactions"]),
        "logs": pa.Table.from_pylist(rows, schema=RAW_SCHEMAS["logs"]),
    }


def header_blooms(logs: list[dict]) -> dict[int, bytes]:
    items: dict[int, list[bytes]] = {}
    for log in logs:
        found = [log["address"], *(log[t] for t in TOPICS if log[t] is not None)]
        items.setdefault(log["block_number"], []).extend(found)
    return {n: reference_bloom(items.get(n, [])) for n in RANGE.blocks()}


def problems(logs: list[dict], blooms: Mapping[int, bytes | None] | None = None) -> dict:
    return verify_range(RANGE, **tables(logs, blooms)).problems


MISSING = "logs missing (the block's logs bloom has bits no extracted log sets)"
EXTRA = "logs not matching the block's logs bloom"


def test_complete_logs_match_their_header_blooms() -> None:
    assert problems(make_logs()) == {}


def test_a_dropped_log_is_reported_for_its_block() -> None:
    logs = make_logs()
    dropped = next(i for i, log in enumerate(logs) if log["block_number"] == 105)
    blooms = header_blooms(logs)
    del logs[dropped]
    found = problems(logs, blooms)
    assert found[MISSING] == [105]
    assert EXTRA not in found


def test_a_log_moved_to_another_block_is_reported_on_both() -> None:
    logs = make_logs()
    blooms = header_blooms(logs)
    moved = next(log for log in logs if log["block_number"] == 103)
    moved["block_number"] = 104  # block 104 has no logs of its own (104 % 4 == 0)
    moved["block_hash"] = block_hash(104)
    moved["log_index"] = 0
    logs = [log for log in logs if log["block_number"] != 103 or log is moved]
    found = problems(logs, blooms)
    assert 103 in found[MISSING] and found[EXTRA] == [104]


def test_malformed_header_blooms_are_read_as_the_number_they_encode() -> None:
    logs = make_logs()
    reference = header_blooms(logs)
    blooms: dict[int, bytes | None] = dict(reference)
    blooms[100] = None  # no logs in block 100: a null bloom is an empty one
    blooms[101] = b"\x00" * 10 + reference[101]  # 266 bytes, same number: still matches
    blooms[102] = b"\x01" + reference[102]  # a bit beyond 2048 that no log can set
    blooms[104] = b"\x00\x01"  # bit 0 set in a block without logs
    found = problems(logs, blooms)
    assert found[MISSING] == [102, 104]
    assert EXTRA not in found
