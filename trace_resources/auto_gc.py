"""Automatic GC: the retention policies declared per dataset (`retention:` in
`trace_assets/datasets/*.yaml`) applied through `GarbageCollector.collect`, the code behind
`trace gc` (so the same guarantees hold: never a current version, one a reader pinned, or a live
attempt's files).

A dataset without a policy keeps every version. A declaration governs the dataset on every chain
(`blocks` and `devnet2.blocks`). The plan is computed first (a dry run); `apply_plan` then
removes only versions of that plan, so what was reported is an upper bound of what goes (a
version pinned in between stays).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from trace_resources.registry import DatasetDeclaration, RetentionPolicy, declarations
from trace_resources.storage.gc import GarbageCollector, GcPolicy, GcReport

__all__ = ["DatasetPlan", "apply_plan", "declared_policies", "lines", "plan", "policy_text"]


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset's policy and its GC report (dry run, or what was applied)."""

    dataset: str
    policy: RetentionPolicy
    report: GcReport

    def summary(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "policy": policy_text(self.policy),
            "versions": len(self.report.versions),
            "files": len(self.report.files),
            "bytes": self.report.bytes,
            "removed": [f"{p} v{v}" for _, p, v in self.report.planned],
        }


def policy_text(policy: RetentionPolicy) -> str:
    """The policy as it would be declared, e.g. `keep_last 3, older_than 30d`."""
    seconds = policy.older_than.total_seconds()
    age = f"{seconds:g}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            age = f"{seconds / size:g}{unit}"
            break
    return f"keep_last {policy.keep_last}, older_than {age}"


def declared_policies(
    stored: Sequence[str], decls: Mapping[str, DatasetDeclaration] | None = None
) -> dict[str, RetentionPolicy]:
    """The policy of each stored dataset whose declaration has one (`chain.name` follows the
    declaration of `name`); datasets without one are left out: they keep everything."""
    decls = decls if decls is not None else declarations()
    found: dict[str, RetentionPolicy] = {}
    for name in stored:
        decl = decls.get(name) or decls.get(name.partition(".")[2])
        if decl is not None and decl.retention is not None:
            found[name] = decl.retention
    return found


def _gc_policy(policy: RetentionPolicy) -> GcPolicy:
    return GcPolicy(keep_last=policy.keep_last, older_than=policy.older_than)


def plan(
    collector: GarbageCollector,
    decls: Mapping[str, DatasetDeclaration] | None = None,
    datasets: Sequence[str] | None = None,
) -> list[DatasetPlan]:
    """The dry run: per dataset with a policy (of all stored, or of `datasets`), what GC
    would remove now."""
    policies = declared_policies(collector.datasets(datasets), decls)
    return [
        DatasetPlan(
            name, policy, collector.collect(_gc_policy(policy), apply=False, datasets=[name])
        )
        for name, policy in sorted(policies.items())
    ]


def apply_plan(collector: GarbageCollector, planned: list[DatasetPlan]) -> list[DatasetPlan]:
    """Remove the planned versions (re-checked under the GC lock: one pinned or no longer
    beyond the policy meanwhile stays) and finish any interrupted deletion of the datasets."""
    return [
        DatasetPlan(
            p.dataset,
            p.policy,
            collector.collect(
                _gc_policy(p.policy), apply=True, datasets=[p.dataset], only=p.report.planned
            ),
        )
        for p in planned
    ]


def lines(plans: list[DatasetPlan]) -> Iterator[str]:
    """Per dataset, its policy and the report's lines (what `trace gc --policy` prints)."""
    for p in plans:
        yield f"{p.dataset} ({policy_text(p.policy)}):"
        for line in p.report.lines():
            yield f"  {line}"
    if not plans:
        yield "gc: no dataset declares a retention policy (every version is kept)"
