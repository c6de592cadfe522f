"""When a verified range does not link to a committed neighbour, repair the wrong one.

The commit protocol refuses a range whose first block's parent hash is not the hash the
committed previous range recorded for its last block, or whose last block's hash is not the
parent hash the committed next range recorded for its first block (`ChainContinuityError`).
That keeps forks apart, but it trusts whichever range came first: if the committed one is
wrong (an endpoint lied while it was extracted, on a chain whose hashes could not be
recomputed then), every honest neighbour would be refused and the wrong one would stay current.
The next side matters when a gap is filled out of order (a range committed before the one
before it is ingested, or re-ingested).

So the boundary is judged (`trace_resources.chain.boundary`: the two blocks' headers fetched
again, their hashes recomputed; the other configured endpoints asked when the one in use
cannot decide) and:
- the committed neighbour is wrong: it is extracted again, from an endpoint that decided
  (verified like any range), and committed as its new version, which replaces the wrong one
  as current; the wrong version is quarantined (`trace quarantine list`, and the step's log)
  and the new range is then committed beside it, in the same step;
- the new range is wrong: it is refused as incomplete (retried like any faulty extraction);
- otherwise (both wrong, neither, or no endpoint can judge): the continuity error stands,
  with the verdict added.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from trace_resources.chain.boundary import Side, judge_boundary
from trace_resources.chain.extract import ChainClient, RangeData
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.errors import ChainContinuityError, RangeIncompleteError
from trace_resources.resources import StateStoreResource
from trace_resources.storage.quarantine import QuarantineRecord
from trace_resources.storage.records import BatchNotCommitted, CommitHook, CommitResult

__all__ = ["BoundaryRepair"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Boundary:
    """Where a new range and a committed neighbour disagree: block `before` = (number, hash)
    and block `after` = (number, hash, parent hash), as the two ranges recorded them."""

    key: str  # the committed neighbour's partition
    committed: Side  # which side of the boundary the committed neighbour is on
    before: tuple[int, str]
    after: tuple[int, str, str]


@dataclass
class BoundaryRepair:
    """What a boundary repair needs: the endpoints, and the committed ranges' sources."""

    client: ChainClient
    state: StateStoreResource
    blocks: str = "blocks"  # the chain's blocks dataset (`<chain>.blocks` on another chain)
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def drain(self) -> list[QuarantineRecord]:
        """The versions quarantined since the last call (for the step's log)."""
        with self._lock:
            records, self.quarantined = self.quarantined, []
        return records

    def commit(
        self,
        commit: Callable[[], list[CommitResult]],
        data: RangeData,
        recommit: Callable[[RangeData, CommitHook], dict[str, CommitResult]],
    ) -> list[CommitResult]:
        """`commit()` (stage and commit) the range `data`, unless it repeats a quarantined
        version's blocks; on a disagreement with a committed neighbour, judge it, `recommit` a
        re-extracted neighbour if that one is wrong (quarantining the wrong version), and
        stage and commit `data` again (a refused attempt cannot commit later)."""
        self._refuse_quarantined(data)
        repaired: set[str] = set()
        while True:
            try:
                return commit()
            except BatchNotCommitted as exc:
                if not isinstance(exc.__cause__, ChainContinuityError):
                    raise
                boundary = self._disagreement(data)
                if boundary is None or boundary.key in repaired:
                    raise
                self._repair(data, boundary, exc.__cause__, recommit)
                repaired.add(boundary.key)

    def _refuse_quarantined(self, data: RangeData) -> None:
        key = data.block_range.key
        record = self.state.versions().quarantine.matches(self.blocks, key, data.source)
        if record is not None:
            raise RangeIncompleteError(
                f"blocks {data.block_range.start}..{data.block_range.last} from endpoint "
                f"{data.endpoint or self.client.rpc.label} are the blocks of {record.dataset} "
                f"{key} v{record.version}, quarantined as wrong ({record.check} at block "
                f"{record.block}). Nothing was committed; the range is retried (remove the "
                "endpoint from TRACE_RPC_ENDPOINTS if it keeps serving them)"
            )

    def _disagreement(self, data: RangeData) -> _Boundary | None:
        """The committed neighbour `data` does not link to (the previous one first)."""
        previous_key, next_key = data.block_range.previous_key(), data.block_range.next_key()
        keys = [k for k in (previous_key, next_key) if k]
        current = self.state.versions().read.current_versions(self.blocks, keys)
        sources = {k: v.manifest.source for k, v in current.items() if v.manifest.source}
        previous, following = sources.get(previous_key or ""), sources.get(next_key)
        first, last = data.first, data.last
        if (
            previous_key is not None
            and previous is not None
            and int(previous["last"]["number"]) == first.number - 1
            and str(previous["last"]["hash"]) != first.parent_hash
        ):
            before = (first.number - 1, str(previous["last"]["hash"]))
            return _Boundary(
                previous_key, "before", before, (first.number, first.hash, first.parent_hash)
            )
        if (
            following is not None
            and int(following["first"]["number"]) == last.number + 1
            and str(following["first"]["parent_hash"]) != last.hash
        ):
            after = following["first"]
            return _Boundary(
                next_key,
                "after",
                (last.number, last.hash),
                (int(after["number"]), str(after["hash"]), str(after["parent_hash"])),
            )
        return None

    def _judges(self) -> list[int]:
        """The endpoints to judge with: the one in use first, then the others."""
        endpoints = self.client.endpoints
        return [endpoints.current] + [i for i in range(len(endpoints)) if i != endpoints.current]

    def _repair(
        self,
        data: RangeData,
        boundary: _Boundary,
        error: ChainContinuityError,
        recommit: Callable[[RangeData, CommitHook], dict[str, CommitResult]],
    ) -> None:
        checks = self.client.node_checks()
        order = self._judges()
        verdict = judge_boundary(
            [self.client.endpoints.rpc(i) for i in order],
            boundary.before,
            boundary.after,
            recompute=checks["block_hash"].possible,
            committed=boundary.committed,
        )
        block_range = data.block_range
        if verdict.wrong == "new":
            raise RangeIncompleteError(
                f"blocks {block_range.start}..{block_range.last} were extracted wrongly: at "
                f"its boundary with the committed range {boundary.key}, {verdict.detail}. "
                "Nothing was committed; the range is retried"
            )
        if verdict.wrong != "committed":
            raise ChainContinuityError(f"{error} ({verdict.wrong} wrong: {verdict.detail})")
        log.warning(
            "the committed range %s is wrong at block %d: %s; extracting it again to replace "
            "it before committing %s",
            boundary.key,
            verdict.number,
            verdict.detail,
            block_range.key,
        )
        endpoint = order[verdict.decided_by[0]]
        repaired = self.client.extract_verified(parse_partition_key(boundary.key), None, endpoint)
        got = (
            (repaired.last.number, repaired.last.hash)
            if boundary.committed == "before"
            else (repaired.first.number - 1, repaired.first.parent_hash)
        )
        if got != (verdict.number, verdict.true_hash):
            raise ChainContinuityError(
                f"{error}; the committed range {boundary.key} is wrong ({verdict.detail}), and "
                f"extracting it again from endpoint {self.client.endpoints.label(endpoint)} "
                f"gave {got[1]} for block {verdict.number}: the endpoint keeps answering "
                "wrongly; use another endpoint"
            )
        read = self.state.versions().read
        prefix = self.blocks.removesuffix("blocks")  # the chain's (`<chain>.` or none)
        current = {
            name: read.current_versions(prefix + name, [boundary.key]) for name in RAW_DATASETS
        }
        wrong = {name: v[boundary.key] for name, v in current.items() if boundary.key in v}
        side = "before" if boundary.committed == "after" else "after"
        detail = f"the range {block_range.key} {side} it did not link to it, and {verdict.detail}"
        records: list[QuarantineRecord] = []

        def quarantine(conn: sa.Connection, results: list[CommitResult]) -> None:
            """In the replacement's own transaction: the wrong versions it supersedes."""
            replaced = dict(zip(RAW_DATASETS, results, strict=True))
            records[:] = [
                QuarantineRecord(
                    dataset=prefix + name,
                    partition_key=boundary.key,
                    version=version.version,
                    replaced_by=replaced[name].version.version,
                    check="boundary_hash",
                    block=verdict.number,
                    endpoint=(version.manifest.source or {}).get("endpoint"),
                    detail=detail,
                    source=version.manifest.source,
                )
                for name, version in wrong.items()
                if replaced[name].version.version != version.version
            ]
            self.state.versions().quarantine.record(records, conn)

        recommit(repaired, quarantine)
        with self._lock:
            self.quarantined.extend(records)
        for record in records:
            log.warning("%s", record.summary())
