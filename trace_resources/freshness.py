"""How far each dataset is behind the chain's `finalized` head: in blocks, and in seconds of
chain time (the finalized block's timestamp minus that of the newest block committed; Monad's
timestamps have one-second granularity). Read by `trace datasets`, the freshness sensor and
the `head_freshness` checks; the head follower's own metrics measure the same lag by wall
clock (`trace_assets/head/metrics.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from trace_resources.chain.extract import ChainClient
from trace_resources.storage.read_model import ReadModel

__all__ = ["HEAD_FRESHNESS_CHECK", "DatasetLag", "dataset_lags"]

# the name of each head dataset's freshness check (declared by the assets, reported by the
# freshness sensor)
HEAD_FRESHNESS_CHECK = "head_freshness"


@dataclass(frozen=True)
class DatasetLag:
    dataset: str
    finalized: int
    head_block: int | None  # newest block committed (None: nothing committed)
    committed_at: datetime | None
    lag_blocks: int | None
    lag_seconds: float | None

    def within(self, max_blocks: int, max_seconds: float) -> bool:
        return (
            self.lag_blocks is not None
            and self.lag_blocks <= max_blocks
            and (self.lag_seconds or 0.0) <= max_seconds
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "finalized": self.finalized,
            "head_block": self.head_block,
            "committed_at": self.committed_at.isoformat() if self.committed_at else None,
            "lag_blocks": self.lag_blocks,
            "lag_seconds": self.lag_seconds,
        }


def dataset_lags(read: ReadModel, client: ChainClient, datasets: Sequence[str]) -> list[DatasetLag]:
    """Each dataset's lag behind the finalized head, in the order given."""
    finalized = client.head().finalized
    heads = read.heads(list(datasets))
    stamps: dict[int, int] = {}

    def timestamp(number: int) -> int | None:
        if number not in stamps:
            found = client.block_ref(number)
            if found is None:
                return None
            stamps[number] = found[1]
        return stamps[number]

    out = []
    for name in datasets:
        head = heads.get(name)
        if head is None:
            out.append(DatasetLag(name, finalized, None, None, None, None))
            continue
        block, committed_at = head
        lag = max(0, finalized - block)
        seconds: float | None = 0.0
        if lag:
            newest, final = timestamp(block), timestamp(finalized)
            seconds = float(final - newest) if newest is not None and final is not None else None
        out.append(DatasetLag(name, finalized, block, committed_at, lag, seconds))
    return out
