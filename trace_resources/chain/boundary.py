"""Which range is wrong when two neighbouring ranges disagree at their boundary.

A range's first block names its parent's hash; the committed range before it recorded that
block's hash. When they differ, the commit protocol refuses the newer range
(`ChainContinuityError`), which is right only if the committed one is honest. Here the
boundary's two headers are fetched again and their hashes recomputed from their fields
(`headers.header_hash`), so the verdict rests on what the headers hash to, not on which answer
came first.

The endpoint in use judges first. When it cannot (its headers do not hash to the hashes it
gives them, or the chain's headers cannot be recomputed, so its answer alone is all there
would be), the other configured endpoints are asked: the verdict rests on the hashes they
agree on, recomputed where their headers allow, and names the endpoints that decided. When
they disagree, or none can answer, the verdict is "undecided" and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from trace_resources.chain.headers import HeaderFormatError, header_hash
from trace_resources.chain.rpc import Rpc
from trace_resources.errors import RpcFaultError, RpcRefusedError, RpcUnreachableError

__all__ = ["BoundaryVerdict", "Side", "judge_boundary"]

Wrong = Literal["committed", "new", "both", "neither", "undecided"]
Side = Literal["before", "after"]


@dataclass(frozen=True)
class BoundaryVerdict:
    """Which side of a boundary disagrees with the chain, the hash block `number` has (and
    block `number + 1`), and which endpoints decided (positions in the judge's `rpcs`)."""

    wrong: Wrong
    number: int
    true_hash: str | None
    detail: str
    true_next_hash: str | None = None
    decided_by: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Witness:
    """What one endpoint says blocks `number` and `number + 1` hash to, and how it knows."""

    before: str
    after: str
    recomputed: bool

    @property
    def how(self) -> str:
        return "recomputed from its header" if self.recomputed else "as answered, not recomputed"


def _recomputed(header: dict) -> str | None:
    try:
        return "0x" + header_hash(header).hex()
    except HeaderFormatError:
        return None


def _witness(rpc: Rpc, number: int, recompute: bool) -> _Witness | str:
    """The endpoint's hashes of blocks `number` and `number + 1`, or why it cannot judge."""
    try:
        before, after = rpc.batch(
            "eth_getBlockByNumber", [[hex(number), False], [hex(number + 1), False]]
        )
    except (RpcFaultError, RpcRefusedError, RpcUnreachableError) as exc:
        return f"it did not answer ({exc})"
    if not before or not after:
        return f"it has no block {number} or {number + 1}"
    given_before, given_after = before["hash"].lower(), after["hash"].lower()
    if after["parentHash"].lower() != given_before:
        return f"its block {number + 1} does not name its block {number} as parent"
    recomputed = (_recomputed(before), _recomputed(after))
    if recomputed == (given_before, given_after):
        return _Witness(given_before, given_after, recomputed=True)
    if recompute:
        return (
            f"its headers of blocks {number}..{number + 1} do not hash to the hashes it gives them"
        )
    return _Witness(given_before, given_after, recomputed=False)


def judge_boundary(
    rpcs: Rpc | Sequence[Rpc],
    last_before: tuple[int, str],
    first_after: tuple[int, str, str],
    *,
    recompute: bool = True,
    committed: Side = "before",
) -> BoundaryVerdict:
    """Judge the boundary between two ranges as they recorded it: `last_before` = (number,
    hash) of the earlier range's last block, `first_after` = (number, hash, parent hash) of
    the later range's first block. The committed range is the earlier one (`committed=
    "before"`) or the later one (`"after"`: a gap filled out of order). `rpcs`: the endpoint
    in use first, then the others to ask when it cannot decide; `recompute`: whether the
    chain's headers can be recomputed."""
    endpoints = [rpcs] if not isinstance(rpcs, Sequence) else list(rpcs)
    number, before_hash = last_before
    first_number, first_hash, first_parent = first_after
    if first_number != number + 1:
        raise ValueError(f"block {first_number} does not follow block {number}")
    said: dict[int, _Witness | str] = {0: _witness(endpoints[0], number, recompute)}
    first = said[0]
    if not (isinstance(first, _Witness) and first.recomputed):
        for position in range(1, len(endpoints)):
            said[position] = _witness(endpoints[position], number, recompute)
    witnesses = {p: w for p, w in said.items() if isinstance(w, _Witness)}
    if any(w.recomputed for w in witnesses.values()):  # the recomputed hashes decide
        witnesses = {p: w for p, w in witnesses.items() if w.recomputed}
    cannot = "; ".join(
        f"endpoint {endpoints[p].label} cannot judge: {w}"
        for p, w in said.items()
        if isinstance(w, str)
    )
    answers = {(w.before, w.after) for w in witnesses.values()}
    if len(answers) != 1:
        if answers:
            split = ", ".join(
                f"endpoint {endpoints[p].label} says block {number} is {w.before} ({w.how})"
                for p, w in sorted(witnesses.items())
            )
            why = f"the endpoints disagree: {split}"
        else:
            why = "no endpoint could judge; configure another endpoint in TRACE_RPC_ENDPOINTS"
        return BoundaryVerdict("undecided", number, None, "; ".join(filter(None, [why, cannot])))
    true_before, true_after = answers.pop()
    before_wrong = before_hash.lower() != true_before
    after_wrong = first_parent.lower() != true_before or first_hash.lower() != true_after
    committed_wrong, new_wrong = (
        (before_wrong, after_wrong) if committed == "before" else (after_wrong, before_wrong)
    )
    verdicts: dict[tuple[bool, bool], Wrong] = {
        (True, True): "both",
        (True, False): "committed",
        (False, True): "new",
        (False, False): "neither",
    }
    deciders = tuple(sorted(witnesses))
    how = next(iter(witnesses.values())).how
    names = ", ".join(endpoints[p].label for p in deciders)
    detail = f"block {number}'s hash is {true_before} ({how}, at endpoint {names})"
    if cannot:
        detail += f"; {cannot}"
    return BoundaryVerdict(
        verdicts[(committed_wrong, new_wrong)],
        number,
        true_before,
        detail,
        true_next_hash=true_after,
        decided_by=deciders,
    )
