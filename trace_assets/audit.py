"""`ingest_audit`: one row per committed version of a raw dataset, in append mode.

Operators answer "what was ingested, when, by which run, and from which blocks" from it: each
row names the raw dataset, block range and version, the attempt and Dagster run that
committed it, its rows and bytes, and the first and last block (number and hash) it holds.

It is fed downstream of the raw assets: a run appends every committed raw version the dataset
does not yet hold, read from the version store (so also versions whose step failed after its
commit, which the outbox relay reports to Dagster). Each raw version is one segment key
`{dataset}:{partition}:v{version}`; a run's rows are one file and one append carrying all
their keys. A retried run finds the keys already appended and commits nothing (idempotent);
two runs racing over overlapping versions conflict at commit (`SegmentConflictError`) and the
loser's retry recomputes the remainder. So each committed raw version appears exactly once.
"""

from collections.abc import Iterator

import dagster as dg
import pyarrow as pa

from trace_assets.raw.chain import RAW_ASSET_KEYS
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import DEFAULT_OWNER
from trace_resources.resources import StateStoreResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.io_manager import COMMIT_MODE_METADATA
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.records import CommittedVersion

__all__ = ["AUDIT_DATASET", "AUDIT_SCHEMA", "audit_batch", "ingest_audit", "segment_key"]

AUDIT_DATASET = "ingest_audit"
# one run appends at most this many rows; the automation condition runs it again for the rest
MAX_VERSIONS_PER_RUN = 5_000


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


AUDIT_SCHEMA = pa.schema(
    [
        _field("dataset", pa.string(), "raw dataset (blocks, transactions, logs)"),
        _field("partition_key", pa.string(), "block range `{first:012d}-{last:012d}`"),
        _field("version", pa.int32(), "committed version of that range"),
        _field("attempt_id", pa.string(), "the attempt (UUID) that committed it"),
        _field("run_id", pa.string(), "Dagster run of the attempt", nullable=True),
        _field("rows", pa.int64(), "rows in the version"),
        _field("bytes", pa.int64(), "Parquet bytes in the version"),
        _field("first_block", pa.int64(), "first block number", nullable=True),
        _field("first_block_hash", pa.string(), "first block hash (0x hex)", nullable=True),
        _field("last_block", pa.int64(), "last block number", nullable=True),
        _field("last_block_hash", pa.string(), "last block hash (0x hex)", nullable=True),
        _field("committed_at", pa.timestamp("us", tz="UTC"), "when the commit landed"),
    ]
)


def segment_key(version: CommittedVersion) -> str:
    return f"{version.dataset}:{version.partition_key}:v{version.version}"


def audit_batch(read: ReadModel, limit: int = MAX_VERSIONS_PER_RUN) -> PartitionData | None:
    """The rows of committed raw versions not yet in the audit, or None if there are none."""
    audited = read.appended_keys(AUDIT_DATASET, UNPARTITIONED)
    pending = [v for v in read.committed_versions(RAW_DATASETS) if segment_key(v) not in audited][
        :limit
    ]
    if not pending:
        return None
    rows = []
    for v in pending:
        source = v.source or {}
        first, last = source.get("first") or {}, source.get("last") or {}
        rows.append(
            {
                "dataset": v.dataset,
                "partition_key": v.partition_key,
                "version": v.version,
                "attempt_id": v.attempt_id,
                "run_id": v.run_id,
                "rows": v.rows,
                "bytes": v.bytes,
                "first_block": first.get("number"),
                "first_block_hash": first.get("hash"),
                "last_block": last.get("number"),
                "last_block_hash": last.get("hash"),
                "committed_at": v.created_at,
            }
        )
    table = pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA)
    return PartitionData(table, segment_keys=[segment_key(v) for v in pending])


@dg.asset(
    name=AUDIT_DATASET,
    io_manager_key="dataset_io_manager",
    deps=RAW_ASSET_KEYS,
    owners=[DEFAULT_OWNER],
    description="One row per committed version of blocks, transactions and logs: range, "
    "version, attempt and run, rows and bytes, first and last block hash. Append-only; each "
    "committed raw version appears exactly once.",
    metadata={
        COMMIT_MODE_METADATA: "append",
        "dagster/column_schema": dg.TableSchema(
            columns=[
                dg.TableColumn(
                    f.name,
                    str(f.type),
                    description=(f.metadata or {}).get(b"doc", b"").decode(),
                    constraints=dg.TableColumnConstraints(nullable=f.nullable),
                )
                for f in AUDIT_SCHEMA
            ]
        ),
    },
    # catch-up by design: any raw update (a run's or one the outbox relay reported) triggers a
    # run that appends whatever is missing, so a trigger missed while it ran loses nothing
    automation_condition=(
        dg.AutomationCondition.any_deps_updated().since_last_handled()
        & ~dg.AutomationCondition.in_progress()
    ),
    retry_policy=dg.RetryPolicy(max_retries=3, delay=2),
    output_required=False,
    group_name="audit",
    kinds={"parquet", "s3"},
)
def ingest_audit(
    context: dg.AssetExecutionContext, state: StateStoreResource
) -> Iterator[dg.Output[PartitionData]]:
    """Append the committed raw versions the audit does not hold yet (none: no materialization)."""
    with as_dagster_failure():
        batch = audit_batch(state.versions().read)
    if batch is None:
        context.log.info("every committed raw version is already in ingest_audit")
        return
    keys = batch.keys() or []
    yield dg.Output(
        batch,
        metadata={"trace/audited_versions": len(keys), "trace/first": keys[0]},
    )
