"""Dagster resources: thin configuration around the chain client and the storage layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from trace_resources.chain.extract import ChainClient
from trace_resources.chain.rpc import RetryPolicy
from trace_resources.leases import LeaderLease
from trace_resources.settings import ChainConfig, Settings, parse_endpoints
from trace_resources.storage.commit import DatasetReader, DatasetWriter
from trace_resources.storage.iceberg import IcebergPublisher, open_catalog
from trace_resources.storage.object_store import ObjectStore, local_store, s3_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore

__all__ = ["ChainResource", "ObjectStoreResource", "StateStoreResource"]


class ChainResource(dg.ConfigurableResource):
    """A Monad (or any EVM) JSON-RPC endpoint, extracted with cryo."""

    rpc_url: str = Field(description="JSON-RPC endpoint, e.g. http://127.0.0.1:18545.")
    chain_id: int = Field(description="Chain id the endpoint must report (10143: Monad testnet).")
    range_size: int = Field(description="Blocks per partition.")
    requests_per_second: int | None = Field(
        default=None, description="Cap on RPC requests per second (None: no cap)."
    )
    max_concurrent_requests: int = Field(
        default=32, description="Cap on concurrent RPC requests of one cryo extraction."
    )
    extract_concurrency: int = Field(
        default=1,
        description="Ranges extracted at once within one run (each uses its own cryo calls); "
        "uploads always overlap the next extraction.",
    )
    timeout_s: float = Field(default=10.0, description="Timeout of one RPC request, seconds.")
    collect_timeout_s: float = Field(
        default=300.0, description="Timeout of one cryo extraction of one range, seconds."
    )
    retry_budget_s: float = Field(
        default=120.0, description="Time spent retrying transient faults for one operation."
    )
    max_attempts: int = Field(default=8, description="Attempts per operation before giving up.")
    endpoints: str = Field(
        default="",
        description="JSON list of endpoints with their limits, in failover order "
        "(TRACE_RPC_ENDPOINTS; see trace_resources.settings.RpcEndpoint). Empty: rpc_url "
        "alone, limited by requests_per_second.",
    )
    verify_receipts: bool = Field(
        default=False,
        description="Also check each range against the node's receipts: receipts root and every "
        "log (TRACE_VERIFY_RECEIPTS).",
    )
    verify_transactions_root: bool = Field(
        default=False,
        description="Also recompute each block's transactions root from its raw transactions "
        "(one eth_getRawTransactionByBlockNumberAndIndex call per transaction; block hashes "
        "are always checked where the endpoint allows; TRACE_VERIFY_TRANSACTIONS_ROOT).",
    )
    finality: str = Field(
        default="finalized",
        description="Which head is final: `finalized`, `safe`, or a depth in blocks below "
        "`latest` written as digits (ChainConfig.finality in TRACE_CHAINS).",
    )

    @classmethod
    def from_settings(cls, settings: Settings, chain: ChainConfig | None = None) -> ChainResource:
        """The chain the `TRACE_RPC_*` / `TRACE_CHAIN_ID` / `TRACE_RANGE_SIZE` settings name
        (the primary chain), or another `chain` of TRACE_CHAINS with the same timeouts,
        retries and checks."""
        finality = "finalized"
        if chain is None and settings.chains.strip():  # the primary of TRACE_CHAINS
            finality = str(settings.chain_configs()[0].finality)
        if chain is not None:
            first = chain.endpoints[0]
            endpoints = [e.model_dump(exclude_defaults=True) for e in chain.endpoints]
            settings = settings.model_copy(
                update={
                    "rpc_url": first.url,
                    "chain_id": chain.chain_id,
                    "range_size": chain.range_size,
                    "rpc_requests_per_second": first.requests_per_second,
                    "rpc_endpoints": json.dumps(endpoints),
                }
            )
            finality = str(chain.finality)
        return cls(
            rpc_url=settings.rpc_url,
            chain_id=settings.chain_id,
            range_size=settings.range_size,
            requests_per_second=settings.rpc_requests_per_second,
            max_concurrent_requests=settings.rpc_max_concurrent_requests,
            extract_concurrency=settings.extract_concurrency,
            timeout_s=settings.rpc_timeout_s,
            collect_timeout_s=settings.rpc_collect_timeout_s,
            retry_budget_s=settings.rpc_retry_budget_s,
            max_attempts=settings.rpc_max_attempts,
            endpoints=settings.rpc_endpoints,
            verify_receipts=settings.verify_receipts,
            verify_transactions_root=settings.verify_transactions_root,
            finality=finality,
        )

    def client(self) -> ChainClient:
        return ChainClient(
            self.rpc_url,
            self.chain_id,
            requests_per_second=self.requests_per_second,
            max_concurrent_requests=self.max_concurrent_requests,
            timeout_s=self.timeout_s,
            collect_timeout_s=self.collect_timeout_s,
            retry=RetryPolicy(max_attempts=self.max_attempts, budget_s=self.retry_budget_s),
            endpoints=parse_endpoints(self.endpoints) if self.endpoints.strip() else (),
            parallel=self.extract_concurrency,
            verify_receipts=self.verify_receipts,
            verify_transactions_root=self.verify_transactions_root,
            finality=int(self.finality) if self.finality.isdigit() else self.finality,
        )


class ObjectStoreResource(dg.ConfigurableResource):
    """Buckets for datasets, results and scratch: S3 (any S3 API) or a local folder."""

    kind: Literal["local", "s3"] = Field(description="'local' folder or 's3' API.")
    local_root: str = Field(default=".local/objectstore", description="Root of the local store.")
    endpoint_url: str | None = Field(default=None, description="S3 API endpoint (None: AWS).")
    region: str = Field(default="us-east-1", description="S3 region.")
    access_key_id: str | None = Field(default=None, description="S3 access key (None: AWS chain).")
    secret_access_key: str | None = Field(default=None, description="S3 secret key.")
    bucket_datasets: str = Field(default="trace-datasets", description="Committed datasets.")
    bucket_results: str = Field(default="trace-results", description="Query results, exports.")
    bucket_scratch: str = Field(default="trace-scratch", description="Scratch files.")

    def bucket(self, name: str) -> ObjectStore:
        if self.kind == "local":
            return local_store(Path(self.local_root), name)
        return s3_store(
            name,
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key=self.access_key_id,
            secret_key=self.secret_access_key,
        )

    def datasets(self) -> ObjectStore:
        return self.bucket(self.bucket_datasets)


class StateStoreResource(dg.ConfigurableResource):
    """Postgres state: dataset registry, versions, pointers, attempts, outbox."""

    dsn: str = Field(description="SQLAlchemy URL, e.g. postgresql+psycopg2://u:p@host/trace_state.")
    lease_s: float = Field(
        default=600.0,
        description="Lease of a writer's attempt, seconds: a writer that stops heartbeating "
        "for this long is presumed dead, and staging cleanup may abandon its attempt.",
    )
    heartbeat_s: float | None = Field(
        default=None, description="Seconds between lease extensions (None: a third of lease_s)."
    )
    pin_ttl_s: float = Field(
        default=3600.0,
        description="How long a reader's pin protects the versions it reads from GC, seconds "
        "(a reader unpins when done; the TTL only matters for readers that die).",
    )
    outbox_settle_s: float = Field(
        default=300.0,
        description="The outbox relay reports a committed version Dagster has not recorded once "
        "its run has finished, or after this many seconds if the run still looks in progress "
        "(a killed run process).",
    )
    sensor_lease_s: float = Field(
        default=90.0,
        gt=0,
        description="Leader lease of the singletons that run as sensors (the outbox relay, the "
        "Iceberg publisher), seconds, longer than a few of their 30 s ticks: of several copies "
        "(Dagster daemons on one state database) only the holder acts, renewing it at each "
        "tick; a standby takes over this long after the holder's last tick, and a late tick "
        "of the old holder has its writes refused.",
    )

    def versions(self) -> VersionStore:
        return VersionStore(engine_for(self.dsn), lease_s=self.lease_s)

    def writer(self, objects: ObjectStoreResource) -> DatasetWriter:
        return DatasetWriter(objects.datasets(), self.versions(), heartbeat_s=self.heartbeat_s)

    def reader(self, objects: ObjectStoreResource) -> DatasetReader:
        return DatasetReader(objects.datasets(), self.versions(), pin_ttl_s=self.pin_ttl_s)

    def iceberg(
        self, objects: ObjectStoreResource, lease: LeaderLease | None = None
    ) -> IcebergPublisher:
        """The open-tables publisher: the SQL catalog on this database, the tables' metadata
        under `_iceberg/` of the datasets bucket, their data the committed Parquet files.
        `lease`: the publisher's leader lease, kept across passes (else one per pass)."""
        store = objects.datasets()
        catalog = open_catalog(
            self.dsn,
            f"{store.uri_prefix}/_iceberg",
            endpoint_url=objects.endpoint_url if objects.kind == "s3" else None,
            access_key=objects.access_key_id,
            secret_key=objects.secret_access_key,
            region=objects.region,
        )
        return IcebergPublisher(self.versions(), store, catalog, lease=lease)
