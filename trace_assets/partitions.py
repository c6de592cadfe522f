"""Block-range partitions: dynamic, added by the chain-head sensor as `finalized` advances.

Keys are `{first:012d}-{last:012d}` (both inclusive), so lexical order is block order.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from trace_resources.chain.ranges import complete_ranges

__all__ = [
    "block_ranges",
    "chain_partitions",
    "ChainAssets",
    "MAX_PARTITIONS_PER_RUN",
    "add_finalized_partitions",
]

block_ranges = dg.DynamicPartitionsDefinition(name="block_ranges")


def chain_partitions(chain: str) -> dg.DynamicPartitionsDefinition:
    """The block ranges of a secondary chain (`block_ranges__<chain>`), shared by its raw and
    derived assets."""
    return dg.DynamicPartitionsDefinition(name=f"block_ranges__{chain}")


@dataclass(frozen=True)
class ChainAssets:
    """How one chain's assets are named (`trace_resources.chains`): the primary's (`chain`
    None) as they always were; another chain's carry its name."""

    chain: str | None = None  # None: the primary chain

    def dataset(self, name: str) -> str:
        """The registry name of dataset `name` of this chain."""
        return name if self.chain is None else f"{self.chain}.{name}"

    def asset_key(self, name: str) -> dg.AssetKey:
        return dg.AssetKey(name if self.chain is None else [self.chain, name])

    @property
    def partitions(self) -> dg.DynamicPartitionsDefinition:
        return block_ranges if self.chain is None else chain_partitions(self.chain)


# The raw assets run any number of ranges in one run (a single-run backfill policy, which the
# dagster CLI needs for --partition-range); the chain-head sensor still requests runs of at
# most this many ranges so that one failing range holds back few others.
MAX_PARTITIONS_PER_RUN = 25


def add_finalized_partitions(
    instance: dg.DagsterInstance,
    finalized: int,
    range_size: int,
    partitions: str = block_ranges.name or "",
) -> list[str]:
    """Add every complete range up to `finalized` that the instance lacks; return the new keys.

    What the chain-head sensor does tick by tick, in one call (for the CLI and the demo);
    `partitions` names another chain's (`block_ranges__<chain>`).
    """
    existing = set(instance.get_dynamic_partitions(partitions))
    keys = [r.key for r in complete_ranges(-1, finalized, range_size) if r.key not in existing]
    if keys:
        instance.add_dynamic_partitions(partitions, keys)
    return keys
