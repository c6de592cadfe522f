"""Extract verified call traces (`geth_calls`) of a block range with Trace's JSON-RPC client.

Monad serves no `trace_*` namespace; its `debug_traceBlockByNumber` needs the tracer options
object (a missing one is refused with -32602). cryo 0.3.2's `geth_calls` does send
`{"tracer": "callTracer", "tracerConfig": {}}`, but it panics without a message when the
endpoint lacks `debug_*`, adds a header request per block of its own, and keeps neither the
block hash nor whether a frame was undone by an enclosing failure. So Trace asks for the
traces itself, in batches, next to the headers it verifies them against:

* every block of the range is present, and its traces hold exactly one top-level frame per
  transaction of the block, in block order (`txHash`, where the node gives it, equals the
  transaction's hash);
* an endpoint that answers -32601 (method not found) raises `MethodUnsupportedError` naming
  the endpoint: the dataset cannot come from it, and retrying does not change that.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.rpc import JsonRpcError, Rpc
from trace_resources.chain.schemas import GETH_CALLS
from trace_resources.chain.verify import VerificationReport
from trace_resources.errors import (
    ChainContinuityError,
    DatasetError,
    MethodUnsupportedError,
    RpcRefusedError,
)

__all__ = [
    "TRACE_METHOD",
    "TRACER_OPTIONS",
    "TraceRange",
    "check_same_blocks",
    "extract_geth_calls",
    "flatten_block_traces",
]

TRACE_METHOD = "debug_traceBlockByNumber"
# explicit options: Monad refuses the call without them; onlyTopCall=False asks for every frame
TRACER_OPTIONS: dict[str, Any] = {"tracer": "callTracer", "tracerConfig": {"onlyTopCall": False}}
# traces of a busy block are large: fewer blocks per JSON-RPC batch than for headers
TRACE_BATCH_SIZE = 10
_METHOD_NOT_FOUND = -32601


@dataclass(frozen=True)
class TraceRange:
    """The verified `geth_calls` rows of one range, and its first and last block hashes."""

    block_range: BlockRange
    table: pa.Table
    first_hash: str
    last_hash: str
    _hashes: dict[int, str]

    @property
    def block_hashes(self) -> dict[int, str]:
        return self._hashes

    @property
    def source(self) -> dict[str, Any]:
        r = self.block_range
        return {
            "range": r.key,
            "first": {"number": r.start, "hash": self.first_hash},
            "last": {"number": r.last, "hash": self.last_hash},
            "trace_options": TRACER_OPTIONS,
        }


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value.removeprefix("0x"))


def _frames(
    frame: dict[str, Any], path: tuple[int, ...], undone: bool
) -> Iterator[tuple[tuple[int, ...], dict[str, Any], bool]]:
    """Every frame of a call tree in pre-order, with its path and whether it was undone."""
    undone = undone or bool(frame.get("error"))
    yield path, frame, undone
    for i, child in enumerate(frame.get("calls") or ()):
        yield from _frames(child, (*path, i), undone)


def flatten_block_traces(
    chain_id: int, number: int, block_hash: str, tx_hashes: Sequence[str], traces: list[Any]
) -> list[dict[str, Any]]:
    """The rows of one block's callTracer answer (one entry per transaction, in order)."""
    rows = []
    for index, (tx_hash, entry) in enumerate(zip(tx_hashes, traces, strict=True)):
        # geth and anvil wrap each transaction's tree as {"txHash", "result"}; some nodes do not
        top: dict[str, Any] = entry["result"] if "result" in entry else entry
        for path, frame, undone in _frames(top, (), False):
            value = int(frame["value"], 16) if frame.get("value") is not None else None
            rows.append(
                {
                    "chain_id": chain_id,
                    "block_number": number,
                    "block_hash": _bytes(block_hash),
                    "transaction_index": index,
                    "transaction_hash": _bytes(tx_hash),
                    "trace_address": ".".join(map(str, path)),
                    "depth": len(path),
                    "call_type": str(frame.get("type", "")).upper(),
                    "from_address": _bytes(frame["from"]),
                    "to_address": _bytes(frame.get("to")),
                    "value_binary": None if value is None else value.to_bytes(32, "big"),
                    "value_string": None if value is None else str(value),
                    "value_f64": None if value is None else float(value),
                    "gas": int(frame.get("gas", "0x0"), 16),
                    "gas_used": int(frame.get("gasUsed", "0x0"), 16),
                    "input": _bytes(frame.get("input")),
                    "output": _bytes(frame.get("output")),
                    "error": frame.get("error"),
                    "revert_reason": frame.get("revertReason"),
                    "reverted": undone,
                }
            )
    return rows


def _fetch(rpc: Rpc, numbers: list[int]) -> tuple[list[Any], list[Any]]:
    headers = rpc.batch("eth_getBlockByNumber", [[hex(n), False] for n in numbers])
    try:
        traces = rpc.batch(
            TRACE_METHOD, [[hex(n), TRACER_OPTIONS] for n in numbers], size=TRACE_BATCH_SIZE
        )
    except RpcRefusedError as exc:
        cause = exc.__cause__
        if isinstance(cause, JsonRpcError) and cause.code == _METHOD_NOT_FOUND:
            endpoint = rpc.label  # never a key in the URL's path
            raise MethodUnsupportedError(
                f"the endpoint {endpoint} does not serve {TRACE_METHOD} (JSON-RPC -32601, "
                "method not found): geth_calls needs the debug_* namespace with the "
                "callTracer, and the datasets derived from it (traced_native_transfers, "
                "traced_contracts) wait for it. Point TRACE_RPC_URL at a provider that serves "
                "debug_*, or leave geth_calls unmaterialised on this deployment"
            ) from exc
        raise
    return headers, traces


def extract_geth_calls(rpc: Rpc, chain_id: int, block_range: BlockRange) -> TraceRange:
    """The call frames of every transaction of `block_range`, verified complete."""
    numbers = list(block_range.blocks())
    headers, traces = _fetch(rpc, numbers)
    report = VerificationReport(block_range)
    report.add(
        "missing blocks (the node returned no block for them)",
        [n for n, h in zip(numbers, headers, strict=True) if h is None],
    )
    report.raise_if_incomplete()
    wrong_count, wrong_hash, untraceable, rows = [], [], [], []
    for number, header, block_traces in zip(numbers, headers, traces, strict=True):
        tx_hashes = [h.lower() for h in header["transactions"]]
        block_traces = block_traces or []
        if len(block_traces) != len(tx_hashes):
            wrong_count.append(number)
            continue
        if any(
            not isinstance(t, dict) or ("result" not in t and "from" not in t) for t in block_traces
        ):
            untraceable.append(number)  # e.g. {"error": "execution timeout"} for a transaction
            continue
        traced = [t.get("txHash") for t in block_traces]
        if any(h is not None and h.lower() != tx for h, tx in zip(traced, tx_hashes, strict=False)):
            wrong_hash.append(number)
            continue
        rows += flatten_block_traces(chain_id, number, header["hash"], tx_hashes, block_traces)
    report.add(
        "blocks whose traces do not hold one top-level call frame per transaction", wrong_count
    )
    report.add("blocks whose traces name other transactions than the block holds", wrong_hash)
    report.add("blocks with a transaction the node answered an error for, not a trace", untraceable)
    report.raise_if_incomplete()
    return TraceRange(
        block_range,
        pa.Table.from_pylist(rows, schema=GETH_CALLS),
        headers[0]["hash"],
        headers[-1]["hash"],
        {n: h["hash"].lower() for n, h in zip(numbers, headers, strict=True)},
    )


def check_same_blocks(traced: TraceRange, committed: pa.Table | None, url: str) -> None:
    """Refuse traces of other blocks than the range's committed `blocks` (another fork), or
    of a range whose blocks are not committed: the datasets derived from `geth_calls` join
    it with `blocks`, and must never mix two forks."""
    key = traced.block_range.key
    if committed is None or committed.num_rows == 0:
        raise DatasetError(
            f"geth_calls of range {key}: the range's blocks are not committed, and the traces "
            "are checked against them (never two forks in one range). Materialise raw_chain "
            "(blocks, transactions, logs) for the range first"
        )
    ours = {
        int(n): "0x" + h.hex()
        for n, h in zip(
            committed["block_number"].to_pylist(), committed["block_hash"].to_pylist(), strict=True
        )
    }
    differ = sorted(n for n, h in traced.block_hashes.items() if ours.get(n) != h)
    if differ:
        n = differ[0]
        raise ChainContinuityError(
            f"geth_calls of range {key}: the endpoint {url} traced block {n} with hash "
            f"{traced.block_hashes[n]}, but the committed blocks hold {ours.get(n)} "
            f"({len(differ)} block(s) differ): the endpoint is on another fork than the "
            "committed range. Nothing was committed; re-materialise raw_chain for the range "
            "if the committed blocks are the stale ones, then geth_calls"
        )
