"""What every finalized block range must have: a sealed version of each raw and block-range
derived dataset, and a successful alert evaluation. `trace gaps` reports the ranges that lack
one; the gap-repair sensor (`trace_sensors/gap_repair.py`) re-requests them. For another chain
of TRACE_CHAINS a range must have its raw datasets (`chain_gap_scope`): it has no alert
evaluation, and its derived datasets are not in its scope yet (the automation requests them)."""

from __future__ import annotations

from trace_assets.alerts.assets import alert_evaluations
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import RAW_ASSET_KEYS, RawChain
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.gaps import GapScope

__all__ = ["GAP_SCOPE", "chain_gap_scope"]

GAP_SCOPE = GapScope(
    partitions=block_ranges.name or "",
    datasets=(
        *(k.to_user_string() for k in RAW_ASSET_KEYS),
        *(a.key.to_user_string() for a in DERIVED_ASSETS if a.partitions_def == block_ranges),
    ),
    evaluations=(alert_evaluations.key.to_user_string(),),
)


def chain_gap_scope(chain: str) -> GapScope:
    """What every finalized range of another chain must have: its raw datasets, sealed
    (`<chain>.blocks` ..., in `block_ranges__<chain>`)."""
    raw = RawChain(chain)
    return GapScope(
        partitions=raw.partitions.name or "",
        datasets=tuple(raw.dataset(name) for name in RAW_DATASETS),
        evaluations=(),
    )
