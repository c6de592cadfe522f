"""The header hash and trie roots Trace recomputes, against the trie library's own trie.

The ordered-trie root is built in one pass from the trie package's node encodings; its
`HexaryTrie`, inserted into key by key, is the reference. Malformed headers are refused with
what they lack, so `probe_checks` can say why a chain's hashes are unverifiable.
"""

from __future__ import annotations

from typing import Any

import pytest
import rlp
from hypothesis import given, settings
from hypothesis import strategies as st
from trie import HexaryTrie

from trace_resources.chain.headers import (
    HeaderFormatError,
    TransactionContent,
    decode_transaction,
    header_hash,
    receipts_root,
    transactions_root,
)


def reference_root(items: list[bytes]) -> bytes:
    trie = HexaryTrie({})
    for index, item in enumerate(items):
        trie.set(rlp.encode(index), item)
    return trie.root_hash


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=120), max_size=300))
def test_the_ordered_trie_root_is_the_hexary_tries(items: list[bytes]) -> None:
    assert transactions_root(items) == reference_root(items)


def test_an_empty_block_has_the_empty_tries_root() -> None:
    assert transactions_root([]) == receipts_root([]) == HexaryTrie({}).root_hash


def test_a_receipt_is_encoded_with_its_type_and_logs() -> None:
    log = {"address": "0x" + "aa" * 20, "topics": ["0x" + "bb" * 32], "data": "0x01"}
    legacy = {"status": "0x1", "cumulativeGasUsed": "0x5208", "logsBloom": "0x" + "00" * 256}
    typed = {**legacy, "type": "0x2", "logs": [log]}
    payload = [b"\x01", b"\x52\x08", b"\x00" * 256, []]
    assert receipts_root([legacy]) == reference_root([rlp.encode(payload)])
    logs = [[b"\xaa" * 20, [b"\xbb" * 32], b"\x01"]]
    assert receipts_root([typed]) == reference_root([b"\x02" + rlp.encode([*payload[:3], logs])])


# Ethereum mainnet's genesis block: a header without any fork field, and its known hash
GENESIS: dict[str, Any] = {
    "parentHash": "0x" + "00" * 32,
    "sha3Uncles": "0x1dcc4de8dec75d7aab85b567b6ccd41ad312451b948a7413f0a142fd40d49347",
    "miner": "0x" + "00" * 20,
    "stateRoot": "0xd7f8974fb5ac78d9ac099b9ad5018bedc2ce0a72dad1827a1709da30580f0544",
    "transactionsRoot": "0x56e81f171bcc55a6ff8345e692c0f86e5b48e01b996cadc001622fb5e363b421",
    "receiptsRoot": "0x56e81f171bcc55a6ff8345e692c0f86e5b48e01b996cadc001622fb5e363b421",
    "logsBloom": "0x" + "00" * 256,
    "difficulty": "0x400000000",
    "number": "0x0",
    "gasLimit": "0x1388",
    "gasUsed": "0x0",
    "timestamp": "0x0",
    "extraData": "0x11bbe8db4e347b4e8c937c1c8370e4b5ed33adb3db69cbdb7a38e1e50b1b82fa",
    "mixHash": "0x" + "00" * 32,
    "nonce": "0x0000000000000042",
}
GENESIS_HASH = "d4e56740f876aef8c010b86a40d5f56745a118d0906a34e69aec8c0db1cb8fa3"


def test_a_header_without_fork_fields_hashes_to_its_block_hash() -> None:
    # (the devnet's Prague headers, with every fork field, are checked in
    # test_lying_endpoint.py's honest ranges)
    assert header_hash(GENESIS).hex() == GENESIS_HASH
    assert GENESIS["transactionsRoot"] == "0x" + transactions_root([]).hex()


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ({k: v for k, v in GENESIS.items() if k != "mixHash"}, "the header lacks mixHash"),
        (
            {**GENESIS, "baseFeePerGas": "0x7", "blobGasUsed": "0x0"},
            "fork fields ['baseFeePerGas', 'blobGasUsed'] out of fork order",
        ),
        ({**GENESIS, "number": 100}, "number is not a 0x-prefixed hex quantity"),
    ],
)
def test_a_malformed_header_is_refused_with_what_is_wrong(
    header: dict[str, Any], says: str
) -> None:
    with pytest.raises(HeaderFormatError, match=says.replace("[", r"\[").replace("]", r"\]")):
        header_hash(header)


def test_raw_transactions_decode_by_type_and_unknown_types_say_so() -> None:
    to, data = b"\x11" * 20, b"\x22\x33"
    legacy = rlp.encode([5, 7, 21000, to, 10**18, data, 27, 1, 2])
    dynamic = b"\x02" + rlp.encode([10143, 5, 1, 9, 21000, b"", 0, data, [], 0, 1, 2])
    assert decode_transaction(legacy) == TransactionContent(0, 5, 21000, to, 10**18, data)
    created = decode_transaction(dynamic)
    assert created is not None and (created.type, created.to, created.gas_limit) == (2, b"", 21000)
    assert decode_transaction(b"\x7e" + rlp.encode([b"deposit"])) is None
