"""Fixed-size block ranges and their partition keys (pure functions).

A key is `{start:012d}-{last:012d}` with both ends inclusive, so lexical order is block order
and a key reads as the blocks it holds. cryo takes ranges end-exclusive; `BlockRange.cryo_spec`
converts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trace_resources.errors import MalformedPartitionKeyError

__all__ = ["BlockRange", "parse_partition_key", "complete_ranges", "range_containing"]

_KEY = re.compile(r"^(\d{12})-(\d{12})$")


@dataclass(frozen=True, order=True)
class BlockRange:
    """Blocks `start` to `last`, both inclusive."""

    start: int
    last: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.last < self.start:
            raise MalformedPartitionKeyError(
                f"block range {self.start}..{self.last} is empty or negative; "
                "a range needs 0 <= start <= last"
            )

    @property
    def key(self) -> str:
        return f"{self.start:012d}-{self.last:012d}"

    @property
    def end_exclusive(self) -> int:
        return self.last + 1

    @property
    def size(self) -> int:
        return self.last - self.start + 1

    @property
    def cryo_spec(self) -> str:
        return f"{self.start}:{self.end_exclusive}"

    def blocks(self) -> range:
        return range(self.start, self.end_exclusive)

    def previous_key(self) -> str | None:
        """Key of the range just before this one, if it has the same size."""
        if self.start == 0:
            return None
        return BlockRange(self.start - self.size, self.start - 1).key

    def next_key(self) -> str:
        return BlockRange(self.last + 1, self.last + self.size).key


def parse_partition_key(key: str) -> BlockRange:
    """Parse `000000000000-000000009999` into a BlockRange, or say how the key is wrong."""
    match = _KEY.match(key)
    if match is None:
        raise MalformedPartitionKeyError(
            f"partition key {key!r} is malformed: expected two zero-padded 12-digit block "
            "numbers, first and last block inclusive, e.g. '000000000000-000000009999'"
        )
    return BlockRange(int(match.group(1)), int(match.group(2)))


def range_containing(block: int, range_size: int) -> BlockRange:
    start = (block // range_size) * range_size
    return BlockRange(start, start + range_size - 1)


def complete_ranges(after_block: int, finalized: int, range_size: int) -> list[BlockRange]:
    """Ranges that start after `after_block` and end at or below `finalized`.

    `after_block` is the last block already covered (-1 for none). Only whole ranges are
    returned: a range is complete once the finalized head reaches its last block.
    """
    if range_size <= 0:
        raise ValueError("range_size must be positive")
    ranges = []
    start = ((after_block + 1 + range_size - 1) // range_size) * range_size
    while start + range_size - 1 <= finalized:
        ranges.append(BlockRange(start, start + range_size - 1))
        start += range_size
    return ranges
