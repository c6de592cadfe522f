"""Recompute what a block header commits to: its hash, its transactions root, its receipts root.

An endpoint's answer is a claim. A block's hash is keccak-256 of the RLP of its header, and the
header holds the roots of the ordered tries of the block's transactions and receipts; so from a
header, the block's raw transactions and its receipts, Trace recomputes the hash and both roots
itself (rlp, eth-hash and trie, the libraries the Python Ethereum clients use) instead of taking
them on trust. A rewritten hash, a dropped or altered transaction, receipt or log then no
longer matches the header it claims to belong to.

The header's RLP field list grows with forks: London adds `baseFeePerGas`, Shanghai
`withdrawalsRoot`, Cancun `blobGasUsed`, `excessBlobGas` and `parentBeaconBlockRoot`, Prague
`requestsHash`. A node serves the fields its chain's header has; they are encoded in that
order, as far as they are present. A chain whose header is not of this form (its recomputed
hash differs for every block) cannot be verified this way: `probe_checks` says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rlp
from eth_hash.auto import keccak
from rlp.codec import encode_raw
from rlp.sedes import big_endian_int
from trie.constants import BLANK_NODE, BLANK_NODE_HASH
from trie.utils.nibbles import bytes_to_nibbles
from trie.utils.nodes import (
    compute_extension_key,
    compute_leaf_key,
    get_common_prefix_length,
)

__all__ = [
    "HeaderFormatError",
    "TransactionContent",
    "decode_transaction",
    "header_hash",
    "receipts_root",
    "transactions_root",
    "receipt_logs",
]

# (JSON-RPC name, is a quantity); quantities are RLP-encoded as minimal big-endian integers
_BASE_FIELDS: tuple[tuple[str, bool], ...] = (
    ("parentHash", False),
    ("sha3Uncles", False),
    ("miner", False),
    ("stateRoot", False),
    ("transactionsRoot", False),
    ("receiptsRoot", False),
    ("logsBloom", False),
    ("difficulty", True),
    ("number", True),
    ("gasLimit", True),
    ("gasUsed", True),
    ("timestamp", True),
    ("extraData", False),
    ("mixHash", False),
    ("nonce", False),
)
# fields later forks append, in header order (a header has a prefix of them)
_FORK_FIELDS: tuple[tuple[str, bool], ...] = (
    ("baseFeePerGas", True),  # London
    ("withdrawalsRoot", False),  # Shanghai
    ("blobGasUsed", True),  # Cancun
    ("excessBlobGas", True),
    ("parentBeaconBlockRoot", False),
    ("requestsHash", False),  # Prague
)


class HeaderFormatError(ValueError):
    """A header (or receipt) lacks a field its encoding needs, or has one out of order."""


def _bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise HeaderFormatError(f"{name} is not a 0x-prefixed hex string: {value!r}")
    digits = value[2:]
    return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)


def _quantity(value: Any, name: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise HeaderFormatError(f"{name} is not a 0x-prefixed hex quantity: {value!r}")
    return int(value, 16)


def _field(header: Mapping[str, Any], name: str, quantity: bool) -> int | bytes:
    return _quantity(header[name], name) if quantity else _bytes(header[name], name)


def header_fields(header: Mapping[str, Any]) -> list[int | bytes]:
    """The header's RLP list: the base fields, then the fork fields it has, in order."""
    missing = [name for name, _ in _BASE_FIELDS if header.get(name) is None]
    if missing:
        raise HeaderFormatError(f"the header lacks {', '.join(missing)}")
    fields = [_field(header, name, quantity) for name, quantity in _BASE_FIELDS]
    present = [header.get(name) is not None for name, _ in _FORK_FIELDS]
    count = sum(present)
    if present[:count] != [True] * count:  # a later fork's field without an earlier one's
        names = [name for (name, _), p in zip(_FORK_FIELDS, present, strict=True) if p]
        raise HeaderFormatError(f"the header has fork fields {names} out of fork order")
    fields.extend(_field(header, name, quantity) for name, quantity in _FORK_FIELDS[:count])
    return fields


def header_hash(header: Mapping[str, Any]) -> bytes:
    """keccak-256 of the header's RLP: the block hash the header actually has."""
    return keccak(rlp.encode(header_fields(header)))


def _trie_root(items: Sequence[bytes]) -> bytes:
    """Root of the ordered trie of `items`, keyed by the RLP of their index (the yellow
    paper's transactions and receipts tries).

    Built in one pass from the sorted keys with the trie package's node encodings (leaf and
    extension keys) rather than by inserting into its `HexaryTrie`: that trie is a mutable,
    database-backed structure which re-reads and re-encodes nodes on every insert, about 10x
    slower for this one-shot use. The tests hold both to the same roots.
    """
    if not items:
        return BLANK_NODE_HASH
    pairs = sorted((bytes_to_nibbles(rlp.encode(i)), item) for i, item in enumerate(items))
    return keccak(encode_raw(_trie_node(pairs, 0)))


def _trie_node(pairs: list[tuple[tuple[int, ...], bytes]], depth: int) -> list[Any]:
    """The node holding `pairs` (sorted nibble keys sharing their first `depth` nibbles)."""
    if len(pairs) == 1:
        path, value = pairs[0]
        return [compute_leaf_key(path[depth:]), value]
    first, last = pairs[0][0], pairs[-1][0]  # sorted: their common prefix is everyone's
    common = get_common_prefix_length(first[depth:], last[depth:])
    if common:
        child = _trie_node(pairs, depth + common)
        return [compute_extension_key(first[depth : depth + common]), _reference(child)]
    branch: list[Any] = [BLANK_NODE] * 17
    ends_here = [p for p in pairs if len(p[0]) == depth]
    if ends_here:  # RLP keys are prefix-free, so never for these tries; kept for correctness
        branch[16] = ends_here[0][1]
    rest = [p for p in pairs if len(p[0]) > depth]
    for nibble, group in itertools.groupby(rest, key=lambda p: p[0][depth]):
        branch[nibble] = _reference(_trie_node(list(group), depth + 1))
    return branch


def _reference(node: list[Any]) -> Any:
    """How a parent refers to a node: inline when its RLP is under 32 bytes, else its hash."""
    encoded = encode_raw(node)  # nodes hold bytes only: no type inference needed
    return node if len(encoded) < 32 else keccak(encoded)


def transactions_root(raw_transactions: Sequence[bytes]) -> bytes:
    """The transactions root of a block from its transactions' EIP-2718 encodings (as
    `eth_getRawTransactionByBlockNumberAndIndex` serves them)."""
    return _trie_root(raw_transactions)


@dataclass(frozen=True)
class TransactionContent:
    """What a raw transaction says of itself (the sender needs its signature recovered)."""

    type: int
    nonce: int
    gas_limit: int
    to: bytes  # empty for a contract creation
    value: int
    input: bytes


# positions of nonce, gas limit, to, value and input in each EIP-2718 type's RLP payload
_TX_FIELDS: dict[int, tuple[int, int, int, int, int]] = {
    0: (0, 2, 3, 4, 5),  # legacy: nonce, gasPrice, gas, to, value, data, v, r, s
    1: (1, 3, 4, 5, 6),  # EIP-2930: chainId, nonce, gasPrice, gas, to, value, data, ...
    2: (1, 4, 5, 6, 7),  # EIP-1559: chainId, nonce, maxPriorityFee, maxFee, gas, to, ...
    3: (1, 4, 5, 6, 7),  # EIP-4844: as 1559, then blob fields
    4: (1, 4, 5, 6, 7),  # EIP-7702: as 1559, then the authorization list
}


def decode_transaction(raw: bytes) -> TransactionContent | None:
    """The content of a raw transaction; None for a type Trace does not know."""
    if not raw:
        return None
    kind, payload = (0, raw) if raw[0] >= 0xC0 else (raw[0], raw[1:])
    if kind not in _TX_FIELDS:
        return None
    fields = rlp.decode(payload)
    nonce, gas, to, value, data = (fields[i] for i in _TX_FIELDS[kind])
    return TransactionContent(
        kind,
        big_endian_int.deserialize(nonce),
        big_endian_int.deserialize(gas),
        to,
        big_endian_int.deserialize(value),
        data,
    )


def receipt_logs(receipt: Mapping[str, Any]) -> list[list[Any]]:
    """A receipt's logs as RLP items: [address, [topics], data]."""
    return [
        [
            _bytes(log["address"], "log address"),
            [_bytes(t, "log topic") for t in log["topics"]],
            _bytes(log["data"], "log data"),
        ]
        for log in receipt.get("logs") or []
    ]


def _receipt_encoding(receipt: Mapping[str, Any]) -> bytes:
    """EIP-2718 encoding of a receipt: type byte (none for legacy), then the RLP of
    [status or pre-Byzantium state root, cumulative gas used, logs bloom, logs]."""
    if receipt.get("status") is not None:
        outcome = big_endian_int.serialize(_quantity(receipt["status"], "receipt status"))
    elif receipt.get("root") is not None:
        outcome = _bytes(receipt["root"], "receipt root")
    else:
        raise HeaderFormatError("a receipt has neither status nor root")
    payload = encode_raw(  # bytes only (quantities serialised): no type inference needed
        [
            outcome,
            big_endian_int.serialize(_quantity(receipt["cumulativeGasUsed"], "cumulativeGasUsed")),
            _bytes(receipt["logsBloom"], "receipt logsBloom"),
            receipt_logs(receipt),
        ]
    )
    kind = _quantity(receipt.get("type") or "0x0", "receipt type")
    return payload if kind == 0 else bytes([kind]) + payload


def receipts_root(receipts: Sequence[Mapping[str, Any]]) -> bytes:
    """The receipts root of a block from its receipts (as `eth_getBlockReceipts` serves
    them, in transaction order)."""
    return _trie_root([_receipt_encoding(r) for r in receipts])
