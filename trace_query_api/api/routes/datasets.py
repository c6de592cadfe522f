"""Dataset discovery and snapshots, limited to what the token may read."""

from __future__ import annotations

from fastapi import APIRouter, Path

from trace_query_api.api.deps import CurrentPrincipal, ServicesDep
from trace_query_api.api.docs import AUTH_ERRORS, errors
from trace_query_api.catalog import DatasetInfo
from trace_query_api.models import (
    ColumnDocPublic,
    DatasetPublic,
    DatasetsPublic,
    DatasetSummaryPublic,
    FreshnessPublic,
    PartitionPublic,
    SnapshotPublic,
)
from trace_resources.chain.ranges import parse_partition_key
from trace_resources.errors import MalformedPartitionKeyError

router = APIRouter(prefix="/v1", tags=["datasets"])


def _summary(info: DatasetInfo) -> DatasetSummaryPublic:
    return DatasetSummaryPublic(
        name=info.name,
        description=info.description,
        visibility="public" if info.visibility == "public" else "org",
        owner=info.owner,
        chain=info.chain,
        partitions=len(info.partitions),
        rows=info.rows,
        bytes=info.bytes,
        last_commit_at=info.last_commit_at,
    )


def _last_block(partition_key: str | None) -> int | None:
    if partition_key is None:
        return None
    try:
        return parse_partition_key(partition_key).last
    except MalformedPartitionKeyError:
        return None


@router.get(
    "/datasets",
    response_model=DatasetsPublic,
    summary="Datasets this token may read",
    responses=errors(*AUTH_ERRORS),
)
def list_datasets(principal: CurrentPrincipal, services: ServicesDep) -> DatasetsPublic:
    infos = services.catalog.list_datasets(principal)
    return DatasetsPublic(data=[_summary(i) for i in infos], count=len(infos))


@router.get(
    "/datasets/{name}",
    response_model=DatasetPublic,
    summary="Description, schema with column docs, partitions, current versions, freshness",
    responses=errors(*AUTH_ERRORS, 404),
)
def get_dataset(name: str, principal: CurrentPrincipal, services: ServicesDep) -> DatasetPublic:
    info = services.catalog.dataset(principal, name)
    latest = info.partitions[-1].key if info.partitions else None
    return DatasetPublic(
        name=info.name,
        description=info.description,
        visibility="public" if info.visibility == "public" else "org",
        owner=info.owner,
        chain=info.chain,
        columns=[ColumnDocPublic(**c) for c in services.catalog.columns(name)],
        partitions=[
            PartitionPublic(
                key=p.key,
                version=p.version,
                rows=p.rows,
                bytes=p.bytes,
                committed_at=p.committed_at,
            )
            for p in info.partitions
        ],
        current_versions={p.key: p.version for p in info.partitions},
        rows=info.rows,
        bytes=info.bytes,
        freshness=FreshnessPublic(
            last_commit_at=info.last_commit_at,
            latest_partition=latest,
            last_block=_last_block(latest),
        ),
    )


@router.get(
    "/snapshots/{snapshot_id}",
    response_model=SnapshotPublic,
    summary="The dataset versions a query read",
    responses=errors(*AUTH_ERRORS, 404),
)
def get_snapshot(
    principal: CurrentPrincipal,
    services: ServicesDep,
    snapshot_id: str = Path(max_length=64),
) -> SnapshotPublic:
    versions, created_at = services.catalog.snapshot_record(principal, snapshot_id)
    return SnapshotPublic(id=snapshot_id, versions=versions, created_at=created_at)
