"""Which range is wrong when two neighbouring ranges disagree at their boundary.

A range's first block names its parent's hash; the committed range before it recorded that
block's hash. When they differ, the commit protocol refuses the newer range
(`ChainContinuityError`), which is right only if the committed one is honest. Here the
boundary's two headers are fetched again and their hashes recomputed from their fields
(`headers.header_hash`), so the verdict rests on what the headers hash to, not on which answer
came first. Where the chain's headers cannot be recomputed, the endpoint's current answer is
all there is, and the verdict says so (a second endpoint is then the better judge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trace_resources.chain.headers import HeaderFormatError, header_hash
from trace_resources.chain.rpc import Rpc

__all__ = ["BoundaryVerdict", "judge_boundary"]

Wrong = Literal["committed", "new", "both", "neither", "undecided"]


@dataclass(frozen=True)
class BoundaryVerdict:
    """Which side of a boundary disagrees with the chain, and the hash block `number` has."""

    wrong: Wrong
    number: int
    true_hash: str | None
    detail: str


def judge_boundary(
    rpc: Rpc,
    committed_last: tuple[int, str],
    new_first: tuple[int, str, str],
    *,
    recompute: bool = True,
) -> BoundaryVerdict:
    """Judge `committed_last` = (number, hash) of the committed range's last block against
    `new_first` = (number, hash, parent hash) of the next range's first block."""
    number, committed_hash = committed_last
    first_number, first_hash, first_parent = new_first
    if first_number != number + 1:
        raise ValueError(f"block {first_number} does not follow block {number}")
    before, after = rpc.batch(
        "eth_getBlockByNumber", [[hex(number), False], [hex(first_number), False]]
    )
    if not before or not after:
        return BoundaryVerdict(
            "undecided", number, None, f"the endpoint has no block {number} or {first_number}"
        )
    how = "recomputed from its header"
    try:
        if not recompute:
            raise HeaderFormatError("the chain's headers cannot be recomputed")
        true_before = "0x" + header_hash(before).hex()
        true_after = "0x" + header_hash(after).hex()
    except HeaderFormatError as exc:
        true_before, true_after = before["hash"], after["hash"]
        how = f"as the endpoint answers now, not recomputed ({exc})"
    if before["hash"] != true_before or after["parentHash"] != true_before:
        return BoundaryVerdict(
            "undecided",
            number,
            None,
            f"the endpoint's headers of blocks {number}..{first_number} do not hash to the "
            "hashes it gives them: it cannot judge; ask another endpoint",
        )
    committed_wrong = committed_hash != true_before
    new_wrong = first_parent != true_before or first_hash != true_after
    verdicts: dict[tuple[bool, bool], Wrong] = {
        (True, True): "both",
        (True, False): "committed",
        (False, True): "new",
        (False, False): "neither",
    }
    wrong = verdicts[(committed_wrong, new_wrong)]
    return BoundaryVerdict(
        wrong, number, true_before, f"block {number}'s hash is {true_before} ({how})"
    )
