"""The IO manager: config fields plus delegation to the commit protocol.

It is the only code that begins, commits or fails attempts for Dagster assets. An asset returns
a `pyarrow.Table` (one partition or an unpartitioned dataset), a `PartitionData`, or a mapping
`{partition_key: PartitionData}` when one run materialises many partitions (a ranged backfill);
`handle_output` stages them (concurrently) and commits them in one transaction.

Assets that stream large ranges stage each partition as they go, so a run's memory does not
grow with its number of partitions. They do it through one call, `DatasetIOManager.staging`:

    @dg.asset(io_manager_key="dataset_io_manager", ...)
    def big(
        context: dg.AssetExecutionContext,
        dataset_io_manager: dg.ResourceParam[DatasetIOManager],
    ):
        with dataset_io_manager.staging(context) as staging:
            staged = {}
            for key, table in extract(context.partition_keys):
                [staged[key]] = staging.stage("big", {key: PartitionData(table)})
        return staged  # {partition_key: StagedPartition}: handle_output commits them

`staging.stage` may be called from several threads at once; it begins the attempts with the
step's identity (run id, step key, retry number) and uploads their files. If the block raises,
every attempt it began is failed at once (their files are left for GC); otherwise the staged
partitions are handed over, and `handle_output` commits those of each output in one batched
transaction. Staged partitions that no output committed (the step failed between outputs)
are failed when the IO manager is torn down.

Every commit carries a commit key naming the logical writer (`commit_key_for`): a step, its
retries within the run, and re-executions of the run from the failure, so a step whose
output committed and which then failed commits that output once, however it is retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow as pa
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.execution.stats import StepEventStatus
from dagster_shared.utils.warnings import BetaWarning
from pydantic import Field, PrivateAttr

from trace_resources.chains import dataset_for_asset_key
from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import (
    DatasetWriter,
    PartitionData,
    ReadCache,
    StagedPartition,
    StepIdentity,
)
from trace_resources.storage.history import CORRELATION_TAG, process_name, run_correlation_id
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.outbox import correlations
from trace_resources.storage.paths import UNPARTITIONED, attempt_prefix
from trace_resources.storage.records import (
    Attempt,
    CommitHook,
    CommitMode,
    CommitResult,
    FileEntry,
    VersionRecord,
)

__all__ = [
    "DatasetIOManager",
    "Staging",
    "COMMIT_MODE_METADATA",
    "REPAIRS_RUN_TAG",
    "commit_key_for",
    "commit_metadata",
    "data_version",
    "data_version_tags",
    "versioned_output",
]

COMMIT_MODE_METADATA = "trace/commit_mode"
# on a gap-repair run: the failed run of the range it repairs, so a step that committed some
# outputs before that run died commits them once (the commit key anchors on the failed run)
REPAIRS_RUN_TAG = "trace/repairs_run"


def commit_key_for(context: dg.OutputContext) -> str | None:
    """The logical writer of this output: `dagster:<anchor run id>:<step key>`.

    Step retries keep the run id; a re-execution gets a new run id with the old run as its
    parent (a gap-repair run names the failed run in `REPAIRS_RUN_TAG`). The anchor is the
    earliest run in the parent chain whose attempts at this step all failed since: a retry
    after a failure finds the version its earlier try committed and commits nothing new, while
    re-executing a step that had succeeded (a deliberate refresh) anchors on the new run and
    makes a new version.
    """
    try:
        step = context.step_context
    except Exception:  # outside a run (direct invocation): every write is its own writer
        return None
    return _step_commit_key(step.dagster_run, step.instance, context.step_key)


def _step_commit_key(run: dg.DagsterRun, instance: dg.DagsterInstance, step_key: str) -> str:
    anchor = run.run_id
    seen = {anchor}
    parent = _parent_of(run)
    while parent is not None and parent not in seen:
        stats = instance.get_run_step_stats(parent, step_keys=[step_key])
        if any(s.status == StepEventStatus.SUCCESS for s in stats):
            break
        anchor = parent
        seen.add(parent)
        parent_run = instance.get_run_by_id(parent)
        parent = _parent_of(parent_run) if parent_run is not None else None
    return f"dagster:{anchor}:{step_key}"


def _parent_of(run: dg.DagsterRun) -> str | None:
    """The run this one re-executes: Dagster's parent run, or the failed run a gap-repair run
    (a new run, not a re-execution: sensors cannot request those) names in its tags."""
    return run.parent_run_id or run.tags.get(REPAIRS_RUN_TAG) or None


def _output_step(context: dg.OutputContext) -> StepIdentity:
    try:
        retry_number = context.step_context.previous_attempt_count
    except Exception:  # outside a run (direct invocation) there is no step context
        retry_number = 0
    return StepIdentity(context.run_id, context.step_key, retry_number)


def _run_of(context: dg.OutputContext) -> dg.DagsterRun | None:
    """The Dagster run an output belongs to; None outside a run (direct invocation)."""
    try:
        return context.step_context.dagster_run
    except Exception:  # Dagster raises its own error when there is no step context
        return None


def _asset_step(context: dg.AssetExecutionContext) -> StepIdentity:
    step = context.op_execution_context.get_step_execution_context().step
    return StepIdentity(context.run.run_id, step.key, context.retry_number)


def _asset_commit_key(context: dg.AssetExecutionContext) -> str:
    step = context.op_execution_context.get_step_execution_context()
    return _step_commit_key(step.dagster_run, step.instance, step.step.key)


class Staging:
    """Partitions an asset streams to the object store while its step runs, under the step's
    identity; `DatasetIOManager.staging` makes one. Safe to use from several threads.

    An asset that covers many partitions may also commit them as it goes (`commit_together`,
    under the step's commit key) and return the `CommitResult`s; `committed_before` tells it
    what an earlier try of the same step committed, so a retry resumes after it."""

    def __init__(
        self, writer: DatasetWriter, step: StepIdentity, commit_key: str | None = None
    ) -> None:
        self._writer = writer
        self._step = step
        self._lock = threading.Lock()
        self.commit_key = commit_key
        self.staged: list[StagedPartition] = []
        self.begun: list[Attempt] = []  # begun for another process's upload, not yet adopted

    def committed_before(
        self, datasets: Sequence[str], partition_keys: Sequence[str]
    ) -> dict[tuple[str, str], CommitResult]:
        """What this step's logical writer (its earlier tries, or the run it re-executes)
        committed already, by (dataset, partition key)."""
        if self.commit_key is None:
            return {}
        records = self._writer.versions.read.committed_by_key(
            datasets, partition_keys, self.commit_key
        )
        return {k: CommitResult(r, True, r.schema_version, None) for k, r in records.items()}

    def commit_together(
        self,
        staged: Sequence[StagedPartition],
        within: CommitHook | None = None,
    ) -> list[CommitResult]:
        """Commit staged partitions (of several datasets) in one transaction, all or nothing,
        under the step's commit key (with what `within` writes in it); they are no longer this
        block's to fail."""
        results = self._writer.commit_together(staged, commit_key=self.commit_key, within=within)
        done = {s.attempt.attempt_id for s in staged}
        with self._lock:
            self.staged = [s for s in self.staged if s.attempt.attempt_id not in done]
        return results

    def commit(self, staged: Sequence[StagedPartition]) -> dict[str, CommitResult]:
        """Commit staged partitions of one dataset in one batched transaction, by partition
        key, under the step's commit key (`DatasetWriter.commit`: a refused batch commits
        one by one), as `handle_output` would."""
        results = self._writer.commit(staged, commit_key=self.commit_key)
        done = {s.attempt.attempt_id for s in staged}
        with self._lock:
            self.staged = [s for s in self.staged if s.attempt.attempt_id not in done]
        return results

    def begin(self, dataset: str, key: str, *, mode: CommitMode = "replace") -> Attempt:
        """Begin an attempt whose files another process uploads under its prefix (a Python
        transform, with a task token); `adopt` it once they are verified. If the block raises
        first, the attempt is failed."""
        [attempt] = self._writer.begin(dataset, [key], mode=mode, step=self._step)
        with self._lock:
            self.begun.append(attempt)
        return attempt

    def adopt(
        self, attempt: Attempt, files: Sequence[FileEntry], schema: pa.Schema
    ) -> StagedPartition:
        """A begun attempt's verified files as a staged partition, for `handle_output` to
        commit (return it from the asset like `stage`'s)."""
        staged = self._writer.adopt(attempt, files, schema)
        with self._lock:
            self.begun = [a for a in self.begun if a.attempt_id != attempt.attempt_id]
            self.staged.append(staged)
        return staged

    def stage(
        self,
        dataset: str,
        partitions: Mapping[str, PartitionData],
        *,
        mode: CommitMode = "replace",
    ) -> list[StagedPartition]:
        """Begin an attempt per partition and upload its files (`DatasetWriter.stage`);
        return them from the asset, by partition key, for `handle_output` to commit."""
        staged = self._writer.stage(dataset, partitions, mode=mode, step=self._step)
        with self._lock:
            self.staged += staged
        return staged


def _expected_keys(context: dg.OutputContext | dg.InputContext) -> list[str]:
    return list(context.asset_partition_keys) if context.has_asset_partitions else [UNPARTITIONED]


def _as_partitions(
    context: dg.OutputContext, obj: object
) -> dict[str, PartitionData | StagedPartition | CommitResult]:
    expected = _expected_keys(context)
    if isinstance(obj, pa.Table):
        obj = PartitionData(obj)
    if isinstance(obj, PartitionData | CommitResult):
        if len(expected) != 1:
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned one table for {len(expected)} "
                "partitions: return a mapping {partition_key: PartitionData} when a run covers "
                "several partitions"
            )
        return {expected[0]: obj}
    if isinstance(obj, Mapping):
        if sorted(obj) != sorted(expected):
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} returned partitions {sorted(obj)[:3]}… "
                f"but the run materialises {expected[:3]}…; return exactly one entry per "
                "partition of the run"
            )
        return {
            k: v
            if isinstance(v, PartitionData | StagedPartition | CommitResult)
            else PartitionData(v)
            for k, v in obj.items()
        }
    raise dg.DagsterInvariantViolationError(
        f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; the dataset IO "
        "manager stores a pyarrow.Table, a PartitionData or a mapping of them by partition key"
    )


@dataclass
class _Output:
    staged: list[StagedPartition] = field(default_factory=list)
    tables: dict[str, PartitionData] = field(default_factory=dict)
    # committed by the asset itself while its step ran (`Staging.commit_together`)
    committed: dict[str, CommitResult] = field(default_factory=dict)


def _metadata(results: dict[str, CommitResult], uri: str) -> dict[str, Any]:
    versions = {k: r.version.version for k, r in results.items()}
    rows = sum(r.version.manifest.rows for r in results.values())
    size = sum(r.version.manifest.bytes for r in results.values())
    drifts = {k: r.drift for k, r in results.items() if r.drift}
    schema_versions = sorted({r.schema_version for r in results.values()})
    # Dagster copies one output's metadata onto every partition of a ranged run, so the
    # per-partition row count is set only when the run has one partition.
    metadata: dict[str, Any] = {
        "trace/rows_in_run": rows,
        "trace/bytes_in_run": size,
        "trace/partitions_committed": len(results),
        "trace/versions": dg.MetadataValue.json(versions),
        "trace/schema_version": schema_versions[-1],
        "trace/uri": dg.MetadataValue.path(uri),
    }
    if len(results) == 1:
        metadata["trace/version"] = next(iter(versions.values()))
        metadata["dagster/row_count"] = rows
    # a retry whose output had committed already: the same version, nothing new written
    metadata["trace/already_committed"] = all(r.already_committed for r in results.values())
    # identical to the current version: kept (trace/version, trace/versions), nothing written
    unchanged = sum(r.unchanged for r in results.values())
    metadata["trace/unchanged"] = unchanged == len(results)
    if len(results) > 1:
        metadata["trace/partitions_unchanged"] = unchanged
    if drifts:
        metadata["trace/schema_drift"] = dg.MetadataValue.json(drifts)
    return metadata


def data_version(results: Mapping[str, CommitResult]) -> dg.DataVersion:
    """The Dagster data version of committed partitions: the committed version's content hash
    (`Manifest.content_hash`), so an unchanged commit reports the data version it had and
    automation that reacts to data-version changes ignores it.

    Dagster gives every partition of one output the same data version; for several partitions
    it is the hash of their (partition, content hash) pairs: equal to a partition's previous
    data version only if that partition's content is unchanged (a change in any partition of
    the run reports them all as changed)."""
    hashes = sorted((key, r.version.manifest.content_hash()) for key, r in results.items())
    if len(hashes) == 1:
        return dg.DataVersion(hashes[0][1])
    joined = "\n".join(f"{key}={digest}" for key, digest in hashes)
    return dg.DataVersion(hashlib.sha256(joined.encode()).hexdigest())


def data_version_tags(version: VersionRecord) -> dict[str, str]:
    """The tags that give a reported `AssetMaterialization` of one committed version its
    data version (as `data_version` does for an output)."""
    return {DATA_VERSION_TAG: version.manifest.content_hash()}


def versioned_output(
    results: Mapping[str, CommitResult], *, output_name: str = "result", **kwargs: Any
) -> dg.Output[Any]:
    """An asset's output of partitions it committed itself, with their `data_version`."""
    with warnings.catch_warnings():  # `data_version` on Output is flagged beta in 1.13
        warnings.simplefilter("ignore", BetaWarning)
        return dg.Output(
            dict(results), output_name=output_name, data_version=data_version(results), **kwargs
        )


def commit_metadata(result: CommitResult, store: ObjectStore) -> dict[str, Any]:
    """One committed partition as Dagster shows it: its rows, bytes, version and where its
    files are."""
    r = result.version
    return {
        "dagster/row_count": r.manifest.rows,
        "trace/bytes": r.manifest.bytes,
        "trace/version": r.version,
        "trace/already_committed": result.already_committed,
        "trace/uri": dg.MetadataValue.path(
            store.uri(attempt_prefix(r.dataset, r.partition_key, r.attempt_id))
        ),
    }


def _partition_metadata(
    context: dg.OutputContext, results: dict[str, CommitResult], writer: DatasetWriter
) -> None:
    """Each partition of a run over many: its own rows, bytes, version and files' location
    (Dagster copies the output's metadata onto every partition; this overrides it)."""
    try:
        step = context.step_context
    except Exception:  # outside a run: no materialisation events to annotate
        return
    for key, result in results.items():
        step.add_asset_metadata(
            commit_metadata(result, writer.store), asset_key=context.asset_key, partition_key=key
        )


# a run's upstream tables kept between its steps (`DatasetIOManager.input_cache_bytes`),
# within a worker pod's memory; a table past it (a 100-range run's) is read again
INPUT_CACHE_BYTES = 1024**3


class DatasetIOManager(dg.ConfigurableIOManager):
    """Commits asset outputs as versioned Parquet datasets (staged, fenced, pointer swap)."""

    objects: ObjectStoreResource
    state: StateStoreResource
    input_cache_bytes: int = Field(
        default=INPUT_CACHE_BYTES,
        ge=0,
        description="Upstream tables a run keeps in memory between its steps, by committed "
        "version, so that steps reading the same versions (three derived datasets read "
        "`transactions`) read their files once; the oldest go first beyond this many bytes. "
        "0: every step reads its inputs from the object store.",
    )
    _writer: DatasetWriter | None = PrivateAttr(default=None)
    _inputs: ReadCache | None = PrivateAttr(default=None)
    # staged by an asset's `staging` block and not yet committed, by attempt id
    _handed_over: dict[str, StagedPartition] = PrivateAttr(default_factory=dict)
    # the version of each (dataset, partition key) this run's steps read (message history)
    _read: dict[tuple[str, str], int] = PrivateAttr(default_factory=dict)

    @contextlib.contextmanager
    def staging(self, context: dg.AssetExecutionContext) -> Iterator[Staging]:
        """Stage partitions while the asset runs: the one call for assets that stream (see
        the module docstring). If the block raises, every attempt it began is failed."""
        self._correlate(context.run.run_id, context.run.tags)
        staging = Staging(self._dataset_writer(), _asset_step(context), _asset_commit_key(context))
        try:
            yield staging
        except BaseException:
            self._dataset_writer().abort(staging.staged)
            self._dataset_writer().fail(staging.begun)
            raise
        self._dataset_writer().fail(staging.begun)  # begun, never adopted: never committed
        self._handed_over.update((s.attempt.attempt_id, s) for s in staging.staged)

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        dataset = dataset_for_asset_key(context.asset_key.path)
        mode = (context.definition_metadata or {}).get(COMMIT_MODE_METADATA, "replace")
        commit_mode: CommitMode = "append" if mode == "append" else "replace"
        writer = self._dataset_writer()
        run = _run_of(context)
        if run is not None:  # outside a run (direct invocation): no history
            self._correlate(run.run_id, run.tags)
        with as_dagster_failure():
            output = self._split_output(context, dataset, commit_mode, obj)
            try:
                if output.tables:
                    output.staged += writer.stage(
                        dataset, output.tables, mode=commit_mode, step=_output_step(context)
                    )
            except BaseException:
                writer.abort(output.staged)
                raise
            results = dict(output.committed)
            if output.staged:
                results |= writer.commit(output.staged, commit_key=commit_key_for(context))
        context.add_output_metadata(_metadata(results, writer.store.uri(f"{dataset}/")))
        if len(results) > 1:
            _partition_metadata(context, results, writer)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._writer is not None:
            # handed over by a step that failed before its output was handled: never committed
            self._writer.abort(self._handed_over.values())
            self._handed_over.clear()
            self._writer.close()
        if self._inputs is not None:
            self._inputs.clear()

    def _correlate(self, run_id: str, tags: Mapping[str, str]) -> None:
        """The run's versions commit under its unit of work's correlation id (message
        history): the run's `trace/correlation_id` tag (a trigger's); else, when every input
        version it read was committed under one id, that id (a derived range continues the
        work that committed its raw range); else its own, `run:<run id>`."""
        correlation_id = run_correlation_id(run_id, tags)
        if CORRELATION_TAG not in tags and self._read:
            inherited = set(
                correlations(
                    self.state.versions().engine,
                    [(d, k, v) for (d, k), v in self._read.items()],
                ).values()
            )
            if len(inherited) == 1:
                correlation_id = inherited.pop()
        self._dataset_writer().correlate(correlation_id, process_name("run"))

    def _dataset_writer(self) -> DatasetWriter:
        if self._writer is None:
            self._writer = self.state.writer(self.objects)
        return self._writer

    def _split_output(
        self, context: dg.OutputContext, dataset: str, mode: CommitMode, obj: object
    ) -> _Output:
        """The output's partitions: those the asset staged (checked to be this output's and
        handed over by `staging`) and the tables left to stage."""
        output = _Output()
        for key, data in sorted(_as_partitions(context, obj).items()):
            if isinstance(data, CommitResult):
                if (data.version.dataset, data.version.partition_key) != (dataset, key):
                    raise dg.DagsterInvariantViolationError(
                        f"the commit of {data.version.dataset}/{data.version.partition_key} "
                        f"was returned as {dataset}/{key}"
                    )
                output.committed[key] = data
                continue
            if not isinstance(data, StagedPartition):
                output.tables[key] = data
                continue
            attempt = data.attempt
            if (attempt.dataset, attempt.partition_key, attempt.mode) != (dataset, key, mode):
                raise dg.DagsterInvariantViolationError(
                    f"staged {attempt.dataset}/{attempt.partition_key} ({attempt.mode}) was "
                    f"returned as {dataset}/{key} ({mode})"
                )
            if attempt.attempt_id not in self._handed_over:
                raise dg.DagsterInvariantViolationError(
                    f"{dataset}/{key} was staged outside `DatasetIOManager.staging`: stage "
                    "streamed partitions inside `with dataset_io_manager.staging(context)`"
                )
            output.staged.append(data)
        for taken in output.staged:
            del self._handed_over[taken.attempt.attempt_id]
        return output

    def load_input(self, context: dg.InputContext) -> pa.Table:
        dataset = dataset_for_asset_key(context.asset_key.path)
        with as_dagster_failure():
            # a version whose blocking quality rules failed is never read downstream, in this
            # run or any later one (the circuit breaker across runs)
            return self.state.reader(self.objects).read(
                dataset,
                _expected_keys(context),
                refuse_failed_checks=True,
                cache=self._cache(),
                read=self._read,
            )

    def _cache(self) -> ReadCache | None:
        if self.input_cache_bytes <= 0:
            return None
        if self._inputs is None:
            self._inputs = ReadCache(self.input_cache_bytes)
        return self._inputs
