"""When a verified range does not link to the committed range before it, repair the wrong one.

The commit protocol refuses a range whose first block's parent hash is not the hash the
committed previous range recorded for its last block (`ChainContinuityError`). That keeps
forks apart, but it trusts whichever range came first: if the committed one is wrong (an
endpoint lied while it was extracted, on a chain whose hashes could not be recomputed then),
every honest range after it would be refused and the wrong one would stay current.

So the boundary is judged (`trace_resources.chain.boundary`: the two blocks' headers fetched
again, their hashes recomputed) and:
- the committed previous range is wrong: it is extracted again (verified like any range) and
  committed as its new version, which replaces the wrong one as current, and the new range is
  then committed after it, in the same step;
- the new range is wrong: it is refused as incomplete (retried like any faulty extraction);
- otherwise (both wrong, neither, or the endpoint cannot judge): the continuity error stands,
  with the verdict added.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from trace_resources.chain.boundary import judge_boundary
from trace_resources.chain.extract import ChainClient, RangeData
from trace_resources.chain.ranges import BlockRange, parse_partition_key
from trace_resources.errors import ChainContinuityError, RangeIncompleteError
from trace_resources.resources import StateStoreResource
from trace_resources.storage.records import BatchNotCommitted, CommitResult

__all__ = ["BoundaryRepair"]

log = logging.getLogger(__name__)


@dataclass
class BoundaryRepair:
    """What a boundary repair needs: the endpoint, and the committed ranges' sources."""

    client: ChainClient
    state: StateStoreResource
    blocks: str = "blocks"  # the chain's blocks dataset (`<chain>.blocks` on another chain)

    def commit(
        self,
        commit: Callable[[], list[CommitResult]],
        data: RangeData,
        recommit: Callable[[RangeData], object],
    ) -> list[CommitResult]:
        """`commit()` (stage and commit) the range `data`; on a disagreement with the previous
        committed range, judge it, `recommit` a re-extracted previous range if that one is
        wrong, and stage and commit `data` again (a refused attempt cannot commit later)."""
        try:
            return commit()
        except BatchNotCommitted as exc:
            if not isinstance(exc.__cause__, ChainContinuityError):
                raise
            previous = self._previous_source(data.block_range)
            if previous is None or previous[0] != data.first.number - 1:
                raise  # the disagreement is with the next range: the new one was verified
            self._repair(data, previous, exc.__cause__, recommit)
            return commit()

    def _previous_source(self, block_range: BlockRange) -> tuple[int, str] | None:
        key = block_range.previous_key()
        if key is None:
            return None
        current = self.state.versions().read.current_versions(self.blocks, [key]).get(key)
        source = current.manifest.source if current is not None else None
        if not source:
            return None
        return int(source["last"]["number"]), str(source["last"]["hash"])

    def _repair(
        self,
        data: RangeData,
        previous: tuple[int, str],
        error: ChainContinuityError,
        recommit: Callable[[RangeData], object],
    ) -> None:
        checks = self.client.node_checks()
        verdict = judge_boundary(
            self.client.rpc,
            previous,
            (data.first.number, data.first.hash, data.first.parent_hash),
            recompute=checks["block_hash"].possible,
        )
        key = data.block_range.previous_key()
        if verdict.wrong == "new":
            raise RangeIncompleteError(
                f"blocks {data.block_range.start}..{data.block_range.last} were extracted "
                f"wrongly: block {data.first.number} names parent {data.first.parent_hash}, but "
                f"{verdict.detail}. Nothing was committed; the range is retried"
            )
        if verdict.wrong != "committed" or key is None:
            raise ChainContinuityError(f"{error} ({verdict.wrong} wrong: {verdict.detail})")
        log.warning(
            "the committed range %s is wrong: it records %s for block %d, but %s; extracting it "
            "again to replace it before committing %s",
            key,
            previous[1],
            verdict.number,
            verdict.detail,
            data.block_range.key,
        )
        repaired = self.client.extract_verified(parse_partition_key(key))
        if repaired.last.hash != verdict.true_hash:
            raise ChainContinuityError(
                f"{error}; the committed range {key} is wrong ({verdict.detail}), and extracting "
                f"it again gave {repaired.last.hash} for block {verdict.number}: the endpoint "
                "keeps answering wrongly; use another endpoint"
            )
        recommit(repaired)
