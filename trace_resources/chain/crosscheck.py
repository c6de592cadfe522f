"""Check a range's extracted tables against what the node's block headers commit to.

`verify.py` checks the three raw tables against each other and against the headers' logs
blooms; that cannot see a log left out when other logs of its block set the same bloom bits,
nor a block hash rewritten consistently (hash and the next block's parent hash), since the
hashes themselves were taken on trust. Here Trace fetches, with its own client and in batches,
each block's header (`eth_getBlockByNumber`), receipts (`eth_getBlockReceipts`) and raw
transactions (`eth_getRawTransactionByBlockNumberAndIndex`), recomputes the block hash, the
receipts root and the transactions root from them (`headers.py`), and then requires the
extracted tables to equal that evidence: header columns, transaction hashes and outcomes, every
log (count and content, which catches a log a bloom cannot miss) and, with the raw
transactions, each transaction's type, nonce, gas limit, recipient, value and input. (The
sender is not recovered from the signature: it is the one extracted column left unchecked.)

Which checks an endpoint allows is probed once (`probe_checks`): a chain whose header is not
Ethereum's RLP form, or an endpoint that does not serve a method, makes a check
"unverifiable: <reason>", which is logged and shown by `trace rpc probe`, never silently skipped.
An endpoint that lies about everything, the probe block included, looks like an unknown
header format; a second endpoint is the answer to that, not this module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from eth_hash.auto import keccak

from trace_resources.chain.headers import (
    HeaderFormatError,
    decode_transaction,
    header_hash,
    receipts_root,
    transactions_root,
)
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.rpc import Rpc
from trace_resources.chain.verify import VerificationReport
from trace_resources.errors import RpcRefusedError

__all__ = [
    "CHECKS",
    "Check",
    "CheckStatus",
    "NodeEvidence",
    "check_against_node",
    "fetch_evidence",
    "probe_checks",
]

log = logging.getLogger(__name__)

Check = Literal["block_hash", "receipts_root", "transactions_root", "transaction_hashes"]
CHECKS: tuple[Check, ...] = (
    "block_hash",
    "receipts_root",
    "transactions_root",
    "transaction_hashes",
)
CHECK_DESCRIPTIONS: dict[Check, str] = {
    "block_hash": "block hash recomputed from the header (keccak-256 of its RLP)",
    "receipts_root": "receipts root recomputed from eth_getBlockReceipts; logs equal the receipts'",
    "transactions_root": "transactions root recomputed from the raw transactions",
    "transaction_hashes": "transaction hashes recomputed from the raw transactions",
}
_RAW_TX = "eth_getRawTransactionByBlockNumberAndIndex"
# how far below the sample block the probe looks for a block with transactions
_PROBE_DEPTH = 32


@dataclass(frozen=True)
class CheckStatus:
    """Whether a check can be made against an endpoint, and why (not)."""

    check: Check
    possible: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {'ok' if self.possible else 'unverifiable'}: {self.detail}"


def _refused(exc: RpcRefusedError) -> str:
    return f"the endpoint refuses it ({exc})"


def probe_checks(rpc: Rpc, at: int | str = "finalized") -> dict[Check, CheckStatus]:
    """Which checks can be made against the endpoint: each is tried on a recent block (the
    latest with transactions among the `_PROBE_DEPTH` blocks up to `at`)."""
    head = rpc.call("eth_getBlockByNumber", [at if isinstance(at, str) else hex(at), False])
    if not head:
        raise RpcRefusedError(f"the endpoint {rpc.label} has no block {at!r} to probe checks on")
    top = int(head["number"], 16)
    numbers = list(range(top, max(-1, top - _PROBE_DEPTH), -1))
    headers = rpc.batch("eth_getBlockByNumber", [[hex(n), False] for n in numbers])
    header = next((h for h in headers if h and h.get("transactions")), head)
    number = int(header["number"], 16)
    where = f"block {number}, {len(header.get('transactions') or [])} transaction(s)"
    return {
        "block_hash": _probe_hash(header, where),
        "receipts_root": _probe_receipts(rpc, header, where),
        **_probe_transactions(rpc, header, where),
    }


def _probe_hash(header: Mapping[str, Any], where: str) -> CheckStatus:
    try:
        recomputed = header_hash(header)
    except HeaderFormatError as exc:
        return CheckStatus("block_hash", False, f"{exc} ({where})")
    if "0x" + recomputed.hex() != header.get("hash"):
        return CheckStatus(
            "block_hash",
            False,
            f"the hash recomputed from the header of {where} is not the endpoint's "
            f"{header.get('hash')}: the chain's header is not Ethereum's RLP header (with the "
            "fork fields up to Prague's requestsHash)",
        )
    return CheckStatus("block_hash", True, f"recomputed on {where}")


def _probe_receipts(rpc: Rpc, header: Mapping[str, Any], where: str) -> CheckStatus:
    try:
        receipts = rpc.call("eth_getBlockReceipts", [header["number"]])
    except RpcRefusedError as exc:
        return CheckStatus("receipts_root", False, _refused(exc))
    try:
        root = receipts_root(receipts or [])
    except (HeaderFormatError, KeyError, TypeError) as exc:
        return CheckStatus("receipts_root", False, f"a receipt of {where} is malformed: {exc}")
    if "0x" + root.hex() != header.get("receiptsRoot"):
        return CheckStatus(
            "receipts_root",
            False,
            f"the receipts root recomputed for {where} is not the header's: the chain's "
            "receipts are not encoded as Ethereum's (EIP-2718 typed receipts)",
        )
    return CheckStatus("receipts_root", True, f"recomputed on {where}")


def _probe_transactions(
    rpc: Rpc, header: Mapping[str, Any], where: str
) -> dict[Check, CheckStatus]:
    count = len(header.get("transactions") or [])
    try:
        raws = _raw_bytes(
            rpc.batch(_RAW_TX, [[header["number"], hex(i)] for i in range(max(count, 1))])
        )
    except RpcRefusedError as exc:
        return {
            check: CheckStatus(check, False, _refused(exc))
            for check in ("transactions_root", "transaction_hashes")
        }
    raws = raws[:count]
    root: CheckStatus = CheckStatus("transactions_root", True, f"recomputed on {where}")
    if "0x" + transactions_root(raws).hex() != header.get("transactionsRoot"):
        root = CheckStatus(
            "transactions_root",
            False,
            f"the transactions root recomputed for {where} is not the header's: the chain's "
            "transactions are not encoded as Ethereum's (EIP-2718)",
        )
    hashes: CheckStatus = CheckStatus("transaction_hashes", True, f"recomputed on {where}")
    if ["0x" + keccak(r).hex() for r in raws] != header.get("transactions"):
        hashes = CheckStatus(
            "transaction_hashes",
            False,
            f"a transaction hash of {where} is not keccak-256 of its raw transaction (anvil's "
            "impersonated transactions are hashed with their sender, for example)",
        )
    return {"transactions_root": root, "transaction_hashes": hashes}


def _raw_bytes(raws: Sequence[Any]) -> list[bytes]:
    return [
        bytes.fromhex(r[2:]) if isinstance(r, str) and r.startswith("0x") else b"" for r in raws
    ]


@dataclass
class NodeEvidence:
    """What the node says about a range, fetched by Trace's own client (None: not fetched)."""

    block_range: BlockRange
    checks: frozenset[Check]
    headers: dict[int, dict[str, Any] | None]
    receipts: dict[int, list[dict[str, Any]] | None] | None = None
    raw_transactions: dict[int, list[bytes]] | None = None


def fetch_evidence(
    rpc: Rpc,
    block_range: BlockRange,
    checks: frozenset[Check],
    headers: Mapping[int, dict[str, Any] | None] | None = None,
) -> NodeEvidence:
    """Headers of the range (unless given, fetched from `rpc` already), and the receipts and
    raw transactions the checks need, batched."""
    numbers = list(block_range.blocks())
    if headers is None:
        answers = rpc.batch("eth_getBlockByNumber", [[hex(n), False] for n in numbers])
        headers = dict(zip(numbers, answers, strict=True))
    else:
        headers = {n: headers.get(n) for n in numbers}
    evidence = NodeEvidence(block_range, checks, headers)
    if "receipts_root" in checks:
        answers = rpc.batch("eth_getBlockReceipts", [[hex(n)] for n in numbers])
        evidence.receipts = dict(zip(numbers, answers, strict=True))
    if checks & {"transactions_root", "transaction_hashes"}:
        calls = [
            (n, i)
            for n, h in headers.items()
            if h is not None
            for i in range(len(h.get("transactions") or []))
        ]
        raws = rpc.batch(_RAW_TX, [[hex(n), hex(i)] for n, i in calls]) if calls else []
        evidence.raw_transactions = {n: [] for n in numbers}
        for (n, _), raw in zip(calls, _raw_bytes(raws), strict=True):
            evidence.raw_transactions[n].append(raw)
    return evidence


def _hex_bytes(value: Any) -> bytes | None:
    if not isinstance(value, str) or not value.startswith("0x"):
        return None
    digits = value[2:]
    return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)


def _quantity(value: Any) -> int | None:
    return int(value, 16) if isinstance(value, str) and value.startswith("0x") else None


# extracted blocks column -> how the node's header gives it
_HEADER_COLUMNS: dict[str, tuple[str, Any]] = {
    "parent_hash": ("parentHash", _hex_bytes),
    "timestamp": ("timestamp", _quantity),
    "author": ("miner", _hex_bytes),
    "gas_used": ("gasUsed", _quantity),
    "base_fee_per_gas": ("baseFeePerGas", _quantity),
    "state_root": ("stateRoot", _hex_bytes),
    "transactions_root": ("transactionsRoot", _hex_bytes),
    "receipts_root": ("receiptsRoot", _hex_bytes),
    "logs_bloom": ("logsBloom", _hex_bytes),
    "extra_data": ("extraData", _hex_bytes),
}


def check_against_node(
    report: VerificationReport, tables: Mapping[Any, pa.Table], evidence: NodeEvidence
) -> None:
    """Add to `report` every block whose extracted rows differ from the node's evidence, or
    whose evidence does not hash to its header."""
    headers = {n: h for n, h in evidence.headers.items() if h}
    report.add(
        "missing blocks (the node returned no header to verify them against)",
        [n for n, h in evidence.headers.items() if not h],
    )
    _check_headers(report, tables["blocks"], headers, "block_hash" in evidence.checks)
    tx_hashes = {
        n: [_hex_bytes(t) for t in h.get("transactions") or []] for n, h in headers.items()
    }
    if evidence.raw_transactions is not None:
        _check_raw_transactions(
            report, headers, tx_hashes, evidence.raw_transactions, evidence.checks
        )
        if "transactions_root" in evidence.checks:
            _check_transaction_content(report, tables["transactions"], evidence.raw_transactions)
    _check_transaction_hashes(report, tables["transactions"], tx_hashes)
    if evidence.receipts is not None:
        _check_receipts(report, tables, headers, tx_hashes, evidence.receipts)


def _check_headers(
    report: VerificationReport,
    blocks: pa.Table,
    headers: Mapping[int, Mapping[str, Any]],
    recompute: bool,
) -> None:
    """The hash each header hashes to (or claims, when that cannot be recomputed), checked
    against the header's claim and the extracted blocks table, and every extracted header
    column against the header."""
    hashes: dict[int, bytes] = {}
    unhashable: list[int] = []
    for number, header in headers.items():
        claimed = _hex_bytes(header.get("hash")) or b""
        if not recompute:
            hashes[number] = claimed
            continue
        try:
            hashes[number] = header_hash(header)
        except HeaderFormatError:
            unhashable.append(number)
            continue
    report.add("block header malformed (its hash cannot be recomputed)", unhashable)
    report.add(
        "block hash is not the hash of its header (keccak-256 of the header's RLP recomputed)",
        [n for n, h in hashes.items() if h != _hex_bytes(headers[n].get("hash"))],
    )
    rows = blocks.select(["block_number", "block_hash", "transaction_count", *_HEADER_COLUMNS])
    for row in rows.to_pylist():
        number = row["block_number"]
        if number not in headers or number not in hashes:
            continue
        header = headers[number]
        if row["block_hash"] != hashes[number]:
            report.add("blocks: block_hash differs from the node's header hash", [number])
        if row["transaction_count"] != len(header.get("transactions") or []):
            report.add("blocks: transaction_count differs from the node's header", [number])
        for column, (name, parse) in _HEADER_COLUMNS.items():
            if row[column] != parse(header.get(name)):
                report.add(f"blocks: {column} differs from the node's header", [number])


def _check_raw_transactions(
    report: VerificationReport,
    headers: Mapping[int, Mapping[str, Any]],
    tx_hashes: Mapping[int, list[bytes | None]],
    raws: Mapping[int, list[bytes]],
    checks: frozenset[Check],
) -> None:
    wrong_root, wrong_hash = [], []
    for number, header in headers.items():
        block_raws = raws.get(number, [])
        if "transactions_root" in checks and (
            "0x" + transactions_root(block_raws).hex() != header.get("transactionsRoot")
        ):
            wrong_root.append(number)
        if "transaction_hashes" in checks and [keccak(r) for r in block_raws] != tx_hashes[number]:
            wrong_hash.append(number)
    report.add(
        "transactions root is not the root of the block's raw transactions (recomputed)",
        wrong_root,
    )
    report.add("transaction hashes in the header are not the raw transactions' hashes", wrong_hash)


_CONTENT_COLUMNS: dict[str, pa.DataType] = {
    "block_number": pa.uint64(),
    "transaction_index": pa.uint32(),
    "transaction_type": pa.uint32(),
    "nonce": pa.uint64(),
    "gas_limit": pa.uint64(),
    "to_address": pa.binary(),
    "value_binary": pa.binary(),
    "input": pa.binary(),
}


def _check_transaction_content(
    report: VerificationReport, transactions: pa.Table, raws: Mapping[int, list[bytes]]
) -> None:
    """Each extracted transaction says what its raw transaction (under the header's
    transactions root) says: type, nonce, gas limit, recipient, value and input."""
    rows: dict[str, list[Any]] = {c: [] for c in _CONTENT_COLUMNS}
    unknown = []
    for number, block in raws.items():
        for index, raw in enumerate(block):
            content = decode_transaction(raw)
            if content is None:
                unknown.append(number)
                continue
            for column, value in zip(
                _CONTENT_COLUMNS,
                (number, index, content.type, content.nonce, content.gas_limit, content.to),
                strict=False,
            ):
                rows[column].append(value)
            rows["value_binary"].append(content.value.to_bytes(32, "big"))
            rows["input"].append(content.input)
    report.add("transactions of a type Trace cannot decode (raw transactions)", unknown)
    node = pa.table({c: pa.array(v, _CONTENT_COLUMNS[c]) for c, v in rows.items()})
    extracted = transactions.select(list(_CONTENT_COLUMNS)).cast(node.schema)
    extracted = pa.table(
        {
            c: pc.fill_null(extracted[c], b"") if pa.types.is_binary(t) else extracted[c]
            for c, t in _CONTENT_COLUMNS.items()
        }
    )
    skip = set(unknown)
    if skip:  # compared only where the raw transactions could be decoded
        keep = pc.invert(pc.is_in(extracted["block_number"], pa.array(sorted(skip), pa.uint64())))
        extracted = extracted.filter(keep)
    report.add(
        "transactions differ from their raw transactions (type, nonce, gas limit, to, value or "
        "input)",
        _differing_blocks(extracted, node, list(_CONTENT_COLUMNS)),
    )


def _check_transaction_hashes(
    report: VerificationReport, transactions: pa.Table, tx_hashes: Mapping[int, list[bytes | None]]
) -> None:
    """Each extracted transaction is the header's transaction at its index."""
    numbers, hashes = [], []
    for number, block in tx_hashes.items():
        numbers.extend([number] * len(block))
        hashes.extend(block)
    node = pa.table(
        {
            "block_number": pa.array(numbers, pa.uint64()),
            "transaction_index": pa.array(
                [i for block in tx_hashes.values() for i in range(len(block))], pa.uint32()
            ),
            "transaction_hash": pa.array(hashes, pa.binary()),
        }
    )
    extracted = transactions.select(node.column_names).cast(node.schema)
    report.add(
        "transactions differ from the node's header (transaction hash by index)",
        _differing_blocks(extracted, node, node.column_names),
    )


def _check_receipts(
    report: VerificationReport,
    tables: Mapping[Any, pa.Table],
    headers: Mapping[int, Mapping[str, Any]],
    tx_hashes: Mapping[int, list[bytes | None]],
    receipts: Mapping[int, list[dict[str, Any]] | None],
) -> None:
    wrong_root, unmatched, malformed = [], [], []
    logs: dict[str, list[Any]] = {c: [] for c in _LOG_COLUMNS}
    outcomes: dict[str, list[Any]] = {"block_number": [], "transaction_index": [], "success": []}
    for number, header in headers.items():
        block = receipts.get(number) or []
        try:
            root = receipts_root(block)
        except (HeaderFormatError, KeyError, TypeError, ValueError):
            malformed.append(number)
            continue
        if "0x" + root.hex() != header.get("receiptsRoot"):
            wrong_root.append(number)
        if [_hex_bytes(r.get("transactionHash")) for r in block] != tx_hashes[number]:
            unmatched.append(number)
        _collect_receipt_rows(number, block, logs, outcomes)
    report.add("receipts malformed (eth_getBlockReceipts)", malformed)
    report.add("receipts root is not the root of the block's receipts (recomputed)", wrong_root)
    report.add("receipts are not the header's transactions (hash by index)", unmatched)
    node_logs = pa.table({c: pa.array(v, _LOG_COLUMNS[c]) for c, v in logs.items()})
    extracted = _comparable_logs(tables["logs"])
    report.add(
        "logs differ from the block's receipts (eth_getBlockReceipts: count or content)",
        _differing_blocks(extracted, node_logs, list(_LOG_COLUMNS)),
    )
    report.add(
        "transactions: success differs from the receipt's status",
        _differing_outcomes(tables["transactions"], outcomes),
    )


def _differing_outcomes(transactions: pa.Table, outcomes: Mapping[str, list[Any]]) -> list[int]:
    """Blocks with a transaction whose success is not its receipt's status (where both say)."""
    node = pa.table(
        {
            "block_number": pa.array(outcomes["block_number"], pa.uint64()),
            "transaction_index": pa.array(outcomes["transaction_index"], pa.uint32()),
            "status": pa.array(outcomes["success"], pa.bool_()),
        }
    )
    keys = ["block_number", "transaction_index"]
    extracted = transactions.select([*keys, "success"]).cast(
        pa.schema(
            [
                ("block_number", pa.uint64()),
                ("transaction_index", pa.uint32()),
                ("success", pa.bool_()),
            ]
        )
    )
    both = extracted.join(node, keys=keys, join_type="inner", use_threads=False)
    differ = pc.fill_null(pc.not_equal(both["success"], both["status"]), False)
    return sorted(pc.unique(both.filter(differ)["block_number"]).to_pylist())


_TOPICS = ("topic0", "topic1", "topic2", "topic3")
_LOG_COLUMNS: dict[str, pa.DataType] = {
    "block_number": pa.uint64(),
    "log_index": pa.uint32(),
    "transaction_index": pa.uint32(),
    "address": pa.binary(),
    **{t: pa.binary() for t in _TOPICS},
    "data": pa.binary(),
}


def _collect_receipt_rows(
    number: int,
    block: Sequence[Mapping[str, Any]],
    logs: dict[str, list[Any]],
    outcomes: dict[str, list[Any]],
) -> None:
    """The block's logs as rows, indexed by position (block-wide log index, receipt index),
    not by what the receipts claim; and each receipt's status."""
    log_index = 0
    for tx_index, receipt in enumerate(block):
        status = _quantity(receipt.get("status"))
        outcomes["block_number"].append(number)
        outcomes["transaction_index"].append(tx_index)
        outcomes["success"].append(None if status is None else status == 1)
        for entry in receipt.get("logs") or []:
            topics = [_hex_bytes(t) for t in entry.get("topics") or []]
            logs["block_number"].append(number)
            logs["log_index"].append(log_index)
            logs["transaction_index"].append(tx_index)
            logs["address"].append(_hex_bytes(entry.get("address")))
            for i, name in enumerate(_TOPICS):
                logs[name].append(topics[i] if i < len(topics) else b"")
            logs["data"].append(_hex_bytes(entry.get("data")) or b"")
            log_index += 1


def _comparable_logs(logs: pa.Table) -> pa.Table:
    """Extracted logs with absent topics and data as empty bytes (join keys cannot be null)."""
    columns = {}
    for name, type_ in _LOG_COLUMNS.items():
        column = logs[name].cast(type_)
        columns[name] = pc.fill_null(column, b"") if pa.types.is_binary(type_) else column
    return pa.table(columns)


def _differing_blocks(extracted: pa.Table, node: pa.Table, keys: list[str]) -> list[int]:
    """Blocks with a row in one table and not in the other (all `keys` compared)."""
    blocks: set[int] = set()
    for left, right in ((extracted, node), (node, extracted)):
        if left.num_rows == 0:
            continue
        if right.num_rows == 0:
            blocks.update(pc.unique(left["block_number"]).to_pylist())
            continue
        only = left.join(
            right.group_by(keys, use_threads=False).aggregate([]),
            keys=keys,
            join_type="left anti",
            use_threads=False,
            coalesce_keys=True,
        )
        blocks.update(pc.unique(only["block_number"]).to_pylist())
    return sorted(blocks)
