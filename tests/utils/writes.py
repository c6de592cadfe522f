"""One partition through `DatasetWriter.stage` and `DatasetWriter.commit`, for tests that
act between the two (race, stall, crash or retry a commit)."""

from __future__ import annotations

from trace_resources.storage.commit import DatasetWriter, PartitionData, StagedPartition
from trace_resources.storage.records import CommitMode, CommitResult

__all__ = ["commit_one", "stage_one"]


def stage_one(
    writer: DatasetWriter,
    dataset: str,
    partition_key: str,
    data: PartitionData,
    *,
    mode: CommitMode = "replace",
) -> StagedPartition:
    [staged] = writer.stage(dataset, {partition_key: data}, mode=mode)
    return staged


def commit_one(
    writer: DatasetWriter, staged: StagedPartition, *, commit_key: str | None = None
) -> CommitResult:
    return writer.commit([staged], commit_key=commit_key)[staged.attempt.partition_key]
