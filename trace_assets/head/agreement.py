"""Does a sealed range agree with what the head follower appended to it?

The sealing run extracts and verifies the whole range again; the follower's appended
segments are superseded by its version whatever they hold. If they differ (a block hash, or
the rows of a block), the follower committed something the chain does not hold: that is
reported loudly (an error in the run's log and a failed `agrees_with_head` check), and the
sealed version wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from trace_resources.chain.extract import RangeData
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.storage.commit import DatasetReader

__all__ = ["HeadAgreement", "compare_with_head"]


@dataclass
class HeadAgreement:
    """One range: the blocks the follower appended, and where the sealed data differs."""

    partition_key: str
    appended_blocks: int = 0
    different_hashes: list[int] = field(default_factory=list)  # block numbers
    # dataset -> blocks whose row count differs: {block: (appended rows, sealed rows)}
    different_rows: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.different_hashes and not any(self.different_rows.values())

    def summary(self) -> str:
        if self.ok:
            return f"{self.partition_key}: the {self.appended_blocks} appended block(s) agree"
        parts = []
        if self.different_hashes:
            parts.append(f"block hashes differ at {_few(self.different_hashes)}")
        for name, blocks in sorted(self.different_rows.items()):
            if blocks:
                shown = ", ".join(
                    f"{b}: {a} appended vs {s} sealed" for b, (a, s) in sorted(blocks.items())[:5]
                )
                parts.append(f"{name} rows differ ({shown})")
        return (
            f"{self.partition_key}: what the head follower appended DIFFERS from the sealed "
            f"range ({'; '.join(parts)}); the sealed version replaces it. Check the RPC node "
            "the follower read (it served data that a later read of the same finalized blocks "
            "contradicts)"
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "appended_blocks": self.appended_blocks,
            "different_hashes": self.different_hashes[:100],
            "different_rows": {
                n: {str(b): list(v) for b, v in sorted(d.items())[:100]}
                for n, d in self.different_rows.items()
                if d
            },
        }


def _few(blocks: list[int]) -> str:
    shown = ", ".join(str(b) for b in blocks[:10])
    return shown + (f" and {len(blocks) - 10} more" if len(blocks) > 10 else "")


def _per_block(table: pa.Table, blocks: pa.Array) -> dict[int, int]:
    rows = table.filter(pc.is_in(table["block_number"], value_set=blocks))
    counts = rows.group_by("block_number").aggregate([("block_number", "count")])
    return dict(
        zip(
            counts["block_number"].to_pylist(),
            counts["block_number_count"].to_pylist(),
            strict=True,
        )
    )


def compare_with_head(reader: DatasetReader, data: RangeData) -> HeadAgreement | None:
    """Compare a freshly extracted range with the follower's appended version of it (None if
    the range's current version is not an appended one)."""
    key = data.block_range.key
    current = reader.resolve("blocks", [key]).get(key)
    if current is None or current.commit_mode != "append":
        return None
    report = HeadAgreement(key)
    appended = reader.read("blocks", [key])
    report.appended_blocks = appended.num_rows
    blocks = appended["block_number"].combine_chunks()
    sealed_blocks = data.tables["blocks"]
    sealed_hash = dict(
        zip(
            sealed_blocks["block_number"].to_pylist(),
            sealed_blocks["block_hash"].to_pylist(),
            strict=True,
        )
    )
    for number, block_hash in zip(
        appended["block_number"].to_pylist(), appended["block_hash"].to_pylist(), strict=True
    ):
        if sealed_hash.get(number) != block_hash:
            report.different_hashes.append(int(number))
    for name in RAW_DATASETS:
        if name == "blocks":
            continue
        ours = _per_block(reader.read(name, [key]), blocks)
        theirs = _per_block(data.tables[name], blocks)
        differ = {
            int(b): (ours.get(b, 0), theirs.get(b, 0))
            for b in set(ours) | set(theirs)
            if ours.get(b, 0) != theirs.get(b, 0)
        }
        report.different_rows[name] = differ
    return report
