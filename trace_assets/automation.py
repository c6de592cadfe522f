"""Automation conditions of Trace's assets.

`on_new_data()` is Dagster's `eager()` reacting to a dependency's new *data version* instead
of to any materialization of it. Every committed dataset partition reports the content hash of
its committed version as its data version (`trace_resources.storage.io_manager.data_version`,
also on the partitions the outbox relay reports), and a commit of data identical to the current
version keeps that version (an `unchanged` attempt, `trace/unchanged`): re-extracting or
re-deriving a range with the same data therefore starts nothing downstream, while a new
version does.
"""

import dagster as dg

__all__ = ["on_new_data"]


def on_new_data() -> dg.AutomationCondition:
    """`eager()` with "a dependency was updated" narrowed to "a dependency's data version
    changed" (still ignoring updates by a run that also plans this asset, and still reacting
    to dependencies requested on the same tick)."""
    changed = (
        dg.AutomationCondition.data_version_changed()
        & ~dg.AutomationCondition.executed_with_root_target()
    ).with_label("data_version_changed_without_root")
    return (
        dg.AutomationCondition.eager()
        .replace("newly_updated_without_root", changed)
        .with_label("eager_on_new_data")
    )
