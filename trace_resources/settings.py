"""Every environment variable Trace reads, in one place.

Values are read when `get_settings()` is called, never at import time, so tests can set the
environment before building resources without reloading modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

MONAD_TESTNET_CHAIN_ID = 10143


class Settings(BaseSettings):
    """Trace's configuration, from `TRACE_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TRACE_", extra="ignore")

    environment: Literal["local", "test", "prod"] = Field(
        "local", description="Which resource set definitions.py builds."
    )

    # chain
    rpc_url: str = Field("http://127.0.0.1:18545", description="Monad JSON-RPC endpoint.")
    chain_id: int = Field(MONAD_TESTNET_CHAIN_ID, description="Chain id the endpoint must report.")
    range_size: int = Field(
        10_000, gt=0, description="Blocks per partition (10,000 on Monad; small on the devnet)."
    )
    rpc_requests_per_second: int | None = Field(
        None, gt=0, description="Cap on RPC requests per second passed to cryo (None: no cap)."
    )
    rpc_max_concurrent_requests: int = Field(
        32, gt=0, description="Cap on concurrent RPC requests passed to cryo."
    )
    extract_concurrency: int = Field(
        2, gt=0, description="Block ranges extracted at once within one run."
    )
    rpc_timeout_s: float = Field(10.0, gt=0, description="Timeout of Trace's own RPC calls.")
    rpc_collect_timeout_s: float = Field(
        300.0, gt=0, description="Timeout of one cryo extraction of one range."
    )
    rpc_retry_budget_s: float = Field(
        120.0, gt=0, description="Total time spent retrying transient RPC faults for one range."
    )
    rpc_max_attempts: int = Field(8, gt=0, description="Attempts per RPC operation.")

    # postgres
    state_dsn: str = Field(
        "postgresql+psycopg2://trace:trace@127.0.0.1:54329/trace_state",
        description="SQLAlchemy URL of the Trace state database (registry, versions, outbox).",
    )
    data_dsn: str = Field(
        "postgresql+psycopg2://trace:trace@127.0.0.1:54329/trace_data",
        description="SQLAlchemy URL of the Trace data database (sinks, alerts).",
    )

    # object store
    object_store: Literal["local", "s3"] = Field(
        "local", description="'local' (a folder, survives restarts) or 's3' (any S3 API)."
    )
    local_store_root: Path = Field(
        Path(".local/objectstore"), description="Root folder of the local object store."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (None: AWS).")
    s3_region: str = Field("us-east-1", description="S3 region.")
    bucket_datasets: str = Field("trace-datasets", description="Bucket of committed datasets.")
    bucket_results: str = Field("trace-results", description="Bucket of query results/exports.")
    bucket_scratch: str = Field("trace-scratch", description="Bucket of scratch files.")

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "TRACE_RPC_URL must be an http(s) URL such as http://127.0.0.1:18545, "
                f"got {value!r}"
            )
        return value


def get_settings() -> Settings:
    """Read the settings from the environment now."""
    return Settings()
