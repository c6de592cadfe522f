"""Selective re-materialisation: only the downstream assets that read the changed columns.

`impacted_datasets` (in the registry) follows the declared column lineage, transitively; this
module launches them: the partitioned ones in one ranged run over the given block ranges, then
the unpartitioned ones (rollups), which fold in whatever ranges changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.registry import DatasetDeclaration, declarations

__all__ = ["launch_impacted"]


def launch_impacted(
    datasets: Sequence[str],
    partition_keys: Sequence[str] | None,
    resources: dict[str, object],
    instance: dg.DagsterInstance,
    *,
    decls: Mapping[str, DatasetDeclaration] | None = None,
    extra_assets: Sequence[dg.AssetsDefinition] = (),
) -> list[dg.ExecuteInProcessResult]:
    """Materialise `datasets` (partitioned ones for `partition_keys`, default all ranges);
    `decls` and `extra_assets` add datasets beyond the platform's (organisations'
    transforms)."""
    decls = decls if decls is not None else declarations()
    partitioned = [d for d in datasets if decls[d].partitioning == "block_range"]
    unpartitioned = [d for d in datasets if decls[d].partitioning == "none"]
    assets = [raw_chain, *DERIVED_ASSETS, *extra_assets]
    results = []
    if partitioned:
        known = sorted(instance.get_dynamic_partitions(block_ranges.name or ""))
        keys = sorted(partition_keys) if partition_keys else known
        missing = sorted(set(keys) - set(known))
        if missing or not keys:
            raise ValueError(
                f"block range(s) {missing or '(none)'} are not partitions of this instance; "
                "run `trace partitions sync` or name existing ranges with --partition"
            )
        # a ranged run covers every range between its ends: run each contiguous stretch
        for stretch in _stretches(keys, known):
            tags = {
                ASSET_PARTITION_RANGE_START_TAG: stretch[0],
                ASSET_PARTITION_RANGE_END_TAG: stretch[-1],
            }
            results.append(
                dg.materialize(
                    assets,
                    selection=partitioned,
                    instance=instance,
                    resources=resources,
                    tags=tags,
                    raise_on_error=False,
                )
            )
    if unpartitioned and all(r.success for r in results):
        results.append(
            dg.materialize(
                assets,
                selection=unpartitioned,
                instance=instance,
                resources=resources,
                raise_on_error=False,
            )
        )
    return results


def _stretches(keys: Sequence[str], known: Sequence[str]) -> list[list[str]]:
    position = {k: i for i, k in enumerate(known)}
    stretches: list[list[str]] = []
    for key in keys:
        if stretches and position[key] == position[stretches[-1][-1]] + 1:
            stretches[-1].append(key)
        else:
            stretches.append([key])
    return stretches
