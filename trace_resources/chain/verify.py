"""Completeness checks run on every extracted range before anything is committed.

cryo 0.3.2 can return a silently partial dataset when the node drops data, so Trace checks
the three raw tables against each other and against the block headers:
- every block of the range is present exactly once and the parent hashes link up;
- each block has exactly `transaction_count` transactions, indexed 0..n-1;
- logs are indexed 0..m-1 within each block, and the logs bloom recomputed from the extracted
  logs equals the block header's logs bloom (so a block with logs has them all, as far as a
  bloom can tell, and a block without logs has none);
- every transaction and log belongs to the block hash the blocks table has for its number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from Crypto.Hash import keccak

from trace_resources.chain.ranges import BlockRange
from trace_resources.errors import RangeIncompleteError

__all__ = ["VerificationReport", "verify_range"]

BLOOM_BITS = 2048
BLOOM_BYTES = BLOOM_BITS // 8
_BLOOM_COLUMNS = ("address", "topic0", "topic1", "topic2", "topic3")


@dataclass
class VerificationReport:
    """What is wrong with a range's extracted data, block by block."""

    block_range: BlockRange
    problems: dict[str, list[int]] = field(default_factory=dict)

    def add(self, problem: str, blocks: list[int] | np.ndarray) -> None:
        blocks = [int(b) for b in blocks]
        if blocks:
            self.problems.setdefault(problem, []).extend(blocks)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_incomplete(self) -> None:
        if self.ok:
            return
        details = "; ".join(
            f"{problem}: {_summarise(blocks)}" for problem, blocks in sorted(self.problems.items())
        )
        raise RangeIncompleteError(
            f"blocks {self.block_range.start}..{self.block_range.last} failed verification and "
            f"were not committed ({details}). The RPC node returned incomplete or inconsistent "
            "data; the range is retried automatically, and if this persists check the node's "
            "health or use another endpoint"
        )


def _summarise(blocks: list[int], limit: int = 10) -> str:
    unique = sorted(set(blocks))
    shown = ", ".join(str(b) for b in unique[:limit])
    more = f" and {len(unique) - limit} more" if len(unique) > limit else ""
    return f"blocks {shown}{more}"


def _bloom_bits(item: bytes) -> tuple[int, int, int]:
    """The 3 bits an address or topic sets in a 2048-bit logs bloom (yellow paper, 4.3.1)."""
    digest = keccak.new(digest_bits=256, data=item).digest()
    return tuple(((digest[i] << 8) | digest[i + 1]) & 2047 for i in (0, 2, 4))  # type: ignore[return-value]


def _header_bits(blooms: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Each header bloom as 2048 booleans (bit i of the big-endian number at column i), and
    which headers have bits beyond 2048 (a malformed bloom no log can account for)."""
    rows = np.zeros((len(blooms), BLOOM_BYTES), dtype=np.uint8)
    oversized = np.zeros(len(blooms), dtype=bool)
    for row, bloom in enumerate(blooms):
        bloom = bloom or b""
        if len(bloom) != BLOOM_BYTES:  # not 256 bytes: read it as the number it encodes
            value = int.from_bytes(bloom, "big")
            oversized[row] = value >> BLOOM_BITS != 0
            bloom = (value & ((1 << BLOOM_BITS) - 1)).to_bytes(BLOOM_BYTES, "big")
        rows[row] = np.frombuffer(bloom, dtype=np.uint8)
    # byte 255 holds bits 0..7: reverse the bytes, then unpack least significant bit first
    return np.unpackbits(rows[:, ::-1], axis=1, bitorder="little").astype(bool), oversized


def _bloom_mismatches(blocks: pa.Table, logs: pa.Table) -> tuple[list[int], list[int]]:
    """Blocks whose header bloom differs from the bloom of the logs extracted for them.

    Missing logs leave header bits unset by the extracted logs (unless every bit of a missing
    log is also set by another log of the block, which a bloom cannot tell apart); logs of
    another block or fork set bits the header lacks. Addresses and topics repeat heavily, so
    each distinct one is hashed once and the blooms are ORed together with numpy.
    """
    block_numbers = blocks["block_number"].to_numpy().astype(np.uint64)
    log_numbers = logs["block_number"].to_numpy().astype(np.uint64)
    numbers, where = np.unique(np.concatenate([block_numbers, log_numbers]), return_inverse=True)
    block_at, log_at = where[: len(block_numbers)], where[len(block_numbers) :]
    items = pa.concat_arrays([logs[c].combine_chunks() for c in _BLOOM_COLUMNS])
    encoded = pc.dictionary_encode(items)
    found = np.zeros(len(numbers) * BLOOM_BITS, dtype=bool)
    if len(encoded.dictionary):
        bits = np.array([_bloom_bits(item) for item in encoded.dictionary.to_pylist()])
        present = pc.is_valid(encoded.indices).to_numpy(zero_copy_only=False)
        indices = pc.fill_null(encoded.indices, 0).to_numpy(zero_copy_only=False)[present]
        owner = np.tile(log_at, len(_BLOOM_COLUMNS))[present]
        found[(owner[:, None] * BLOOM_BITS + bits[indices]).ravel()] = True
    found_here = found.reshape(len(numbers), BLOOM_BITS)[block_at]
    header, oversized = _header_bits(blocks["logs_bloom"].to_pylist())
    missing = np.flatnonzero((header & ~found_here).any(axis=1) | oversized)
    extra = np.flatnonzero((found_here & ~header).any(axis=1))
    return block_numbers[missing].tolist(), block_numbers[extra].tolist()


def _per_block_counts(numbers: pa.Array, block_range: BlockRange) -> np.ndarray:
    offsets = numbers.to_numpy(zero_copy_only=False).astype(np.int64) - block_range.start
    inside = (offsets >= 0) & (offsets < block_range.size)
    return np.bincount(offsets[inside], minlength=block_range.size)


def _check_blocks(blocks: pa.Table, report: VerificationReport) -> dict[int, bytes]:
    rng = report.block_range
    numbers = blocks["block_number"].to_numpy().astype(np.int64)
    counts = _per_block_counts(blocks["block_number"].combine_chunks(), rng)
    report.add("missing blocks", np.flatnonzero(counts == 0) + rng.start)
    report.add("duplicated blocks", np.flatnonzero(counts > 1) + rng.start)
    outside = numbers[(numbers < rng.start) | (numbers > rng.last)]
    report.add("blocks outside the range", outside)
    hashes = dict(zip(numbers.tolist(), blocks["block_hash"].to_pylist(), strict=True))
    parents = dict(zip(numbers.tolist(), blocks["parent_hash"].to_pylist(), strict=True))
    broken = [
        n
        for n in rng.blocks()[1:]
        if n in parents and n - 1 in hashes and parents[n] != hashes[n - 1]
    ]
    report.add("parent hash does not link to the previous block", broken)
    return hashes


def _check_children(
    name: str,
    table: pa.Table,
    index_column: str,
    expected: np.ndarray,
    hashes: dict[int, bytes],
    report: VerificationReport,
) -> None:
    """Rows per block equal `expected`, indexed 0..n-1, on the block hash of the blocks table."""
    rng = report.block_range
    counts = _per_block_counts(table["block_number"].combine_chunks(), rng)
    report.add(f"{name} missing", np.flatnonzero(counts < expected) + rng.start)
    report.add(f"{name} unexpected", np.flatnonzero(counts > expected) + rng.start)
    if table.num_rows == 0:
        return
    numbers = table["block_number"].to_numpy().astype(np.int64)
    index = table[index_column].to_numpy().astype(np.int64)
    # index must be 0..n-1 in each block: the sum and the max give it away when one is missing
    order = np.lexsort((index, numbers))
    numbers, index = numbers[order], index[order]
    starts = np.r_[0, np.flatnonzero(np.diff(numbers)) + 1]
    position = np.arange(len(numbers)) - np.repeat(starts, np.diff(np.r_[starts, len(numbers)]))
    report.add(f"{name} not contiguous by {index_column}", np.unique(numbers[position != index]))
    # one check per distinct (block number, block hash) pair, not per row
    pairs = table.group_by(["block_number", "block_hash"], use_threads=False).aggregate([])
    wrong_fork = {
        n
        for n, h in zip(
            pairs["block_number"].to_pylist(), pairs["block_hash"].to_pylist(), strict=True
        )
        if n in hashes and hashes[n] != h
    }
    report.add(f"{name} from another fork (block hash differs)", sorted(wrong_fork))


def _orphan_logs(transactions: pa.Table, logs: pa.Table) -> list[int]:
    """Blocks with a log whose (block number, transaction index) has no transaction."""
    keys = ["block_number", "transaction_index"]
    orphans = logs.select(keys).join(
        transactions.select(keys).group_by(keys, use_threads=False).aggregate([]),
        keys=keys,
        join_type="left anti",
        use_threads=False,
    )
    return pc.unique(orphans["block_number"]).to_pylist()


def verify_range(
    block_range: BlockRange, blocks: pa.Table, transactions: pa.Table, logs: pa.Table
) -> VerificationReport:
    """Check the three raw tables of one range; the report lists every problem found."""
    report = VerificationReport(block_range)
    hashes = _check_blocks(blocks, report)
    offsets = blocks["block_number"].to_numpy().astype(np.int64) - block_range.start
    valid = (offsets >= 0) & (offsets < block_range.size)
    expected_txs = np.zeros(block_range.size, dtype=np.int64)
    expected_txs[offsets[valid]] = blocks["transaction_count"].to_numpy()[valid]
    _check_children("transactions", transactions, "transaction_index", expected_txs, hashes, report)

    missing, extra = _bloom_mismatches(blocks, logs)
    report.add("logs missing (the block's logs bloom has bits no extracted log sets)", missing)
    report.add("logs not matching the block's logs bloom", extra)
    log_counts = _per_block_counts(logs["block_number"].combine_chunks(), block_range)
    # contiguity and fork checks for logs; their expected count per block is what was found
    _check_children("logs", logs, "log_index", log_counts, hashes, report)
    if transactions.num_rows and logs.num_rows:
        report.add("logs whose transaction is missing", sorted(_orphan_logs(transactions, logs)))
    return report


def count_by_block(table: pa.Table) -> dict[int, int]:
    """Rows per block number (used by tests and the demo summary)."""
    grouped = table.group_by("block_number").aggregate([("block_number", "count")])
    return dict(
        zip(
            grouped["block_number"].to_pylist(),
            pc.cast(grouped["block_number_count"], pa.int64()).to_pylist(),
            strict=True,
        )
    )
