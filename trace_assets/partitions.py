"""Block-range partitions: dynamic, added by the chain-head sensor as `finalized` advances.

Keys are `{first:012d}-{last:012d}` (both inclusive), so lexical order is block order.
"""

from __future__ import annotations

import dagster as dg

__all__ = ["block_ranges", "MAX_PARTITIONS_PER_RUN"]

block_ranges = dg.DynamicPartitionsDefinition(name="block_ranges")

# The raw assets run any number of ranges in one run (a single-run backfill policy, which the
# dagster CLI needs for --partition-range); the chain-head sensor still requests runs of at
# most this many ranges so that one failing range holds back few others.
MAX_PARTITIONS_PER_RUN = 25
