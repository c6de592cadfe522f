"""Block-range partitions: dynamic, added by the chain-head sensor as `finalized` advances.

Keys are `{first:012d}-{last:012d}` (both inclusive), so lexical order is block order.
"""

from __future__ import annotations

import dagster as dg

__all__ = ["block_ranges", "MAX_PARTITIONS_PER_RUN"]

block_ranges = dg.DynamicPartitionsDefinition(name="block_ranges")

# A backfill of hundreds of ranges runs as runs of this many ranges each, not one process per
# range. Each run holds its ranges' tables in memory until the IO manager commits them, which
# bounds this number: 25 ranges of 10,000 Monad blocks stay well inside a worker's memory.
MAX_PARTITIONS_PER_RUN = 25
