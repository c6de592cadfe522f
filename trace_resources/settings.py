"""Every environment variable Trace reads, in one place.

Values are read when `get_settings()` is called, never at import time, so tests can set the
environment before building resources without reloading modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from trace_resources.config_entries import validated_entries
from trace_resources.sealed import Keyring, SealError
from trace_resources.triggers import AnyTrigger, parse_triggers

__all__ = [
    "RpcEndpoint",
    "parse_endpoints",
    "ChainConfig",
    "CHAIN_NAME_PATTERN",
    "parse_chains",
    "TapConfig",
    "parse_taps",
    "Settings",
    "get_settings",
    "QuerySettings",
    "get_query_settings",
]

MONAD_TESTNET_CHAIN_ID = 10143


SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$"


def byte_size(text: str) -> int:
    """`1GB`, `512MiB`, `2.5 GB` in bytes (units of 1000 or 1024, as written)."""
    found = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*$", text)
    if found is None:
        raise ValueError(f"{text!r} is not a size such as 512MB or 1GiB")
    number, unit = found.groups()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    if unit not in scale:
        raise ValueError(f"{text!r}: unknown unit {unit!r} (B, KB, MB, GB, TB, KiB, ... TiB)")
    return int(float(number) * scale[unit])


class RpcEndpoint(BaseModel):
    """One JSON-RPC endpoint (a provider) and the limits it enforces, which Trace stays within.

    One entry of `TRACE_RPC_ENDPOINTS`, e.g. ``{"url": "https://rpc.example/KEY", "name":
    "example", "requests_per_second": 25, "max_batch": 100, "max_logs_range": 1000,
    "unsupported": ["debug"]}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="http(s) URL of the endpoint (may hold an API key).")
    name: str | None = Field(
        None, description="Name in logs and errors (default: the URL's host, never its path)."
    )
    requests_per_second: int | None = Field(
        None, gt=0, description="Requests per second the endpoint allows (None: no limit)."
    )
    max_concurrent_requests: int | None = Field(
        None, gt=0, description="Requests in flight at once (None: no limit)."
    )
    max_batch: int = Field(500, gt=0, description="Largest JSON-RPC batch it accepts (1: none).")
    max_logs_range: int | None = Field(
        None, gt=0, description="Most blocks one eth_getLogs call may span (None: no limit)."
    )
    unsupported: tuple[str, ...] = Field(
        (), description="Namespaces (`debug`) or methods it does not serve."
    )

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"url must be an http(s) URL such as http://127.0.0.1:18545: {value!r}"
            )
        return value

    @property
    def label(self) -> str:
        """The name, or the URL's host and port: never the path, where providers put keys."""
        return self.name or (urlsplit(self.url).netloc.rpartition("@")[2] or self.url)

    def serves(self, method: str) -> bool:
        return method not in self.unsupported and method.split("_")[0] not in self.unsupported


def parse_endpoints(text: str) -> list[RpcEndpoint]:
    """`TRACE_RPC_ENDPOINTS` (a JSON list of `RpcEndpoint` objects) with one-line errors."""
    example = '[{"url": "https://rpc.example", "requests_per_second": 25, "max_batch": 100}]'
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc}); expected a list such as {example}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"expected a non-empty JSON list of endpoints such as {example}")
    endpoints = []
    for position, item in enumerate(raw, start=1):
        try:
            endpoints.append(RpcEndpoint.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: "
                + e["msg"].removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise ValueError(
                f"endpoint {position}: {problems} (fields: {', '.join(RpcEndpoint.model_fields)})"
            ) from None
    labels = [e.label for e in endpoints]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(
            f'endpoints {", ".join(duplicates)} appear twice: give each a distinct "name"'
        )
    return endpoints


CHAIN_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
# names DuckDB gives its own schemas and catalogs: a chain is a schema in the query sandbox
RESERVED_CHAIN_NAMES = frozenset(
    {"main", "temp", "system", "memory", "information_schema", "pg_catalog"}
)
Finality = Literal["finalized", "safe"] | int


class ChainConfig(BaseModel):
    """One chain of the deployment: where to read it and how it is partitioned.

    One entry of `TRACE_CHAINS`, e.g. ``{"name": "devnet2", "chain_id": 31337, "endpoints":
    [{"url": "http://127.0.0.1:18546"}], "range_size": 250, "finality": "finalized"}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="Lowercase identifier (a-z, digits, _; up to 31 characters); a secondary "
        "chain's datasets are named `<name>.<dataset>`."
    )
    chain_id: int = Field(gt=0, description="Chain id its endpoints must report.")
    endpoints: tuple[RpcEndpoint, ...] = Field(
        min_length=1, description="One or more endpoints (see RpcEndpoint), in failover order."
    )
    range_size: int = Field(10_000, gt=0, description="Blocks per partition.")
    finality: Finality = Field(
        "finalized",
        description="Which head counts as final: the `finalized` or `safe` tag, or a depth in "
        "blocks below `latest`.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not CHAIN_NAME_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a chain name: a lowercase letter, then up to 30 lowercase "
                "letters, digits or _ (e.g. monad, devnet2)"
            )
        if value in RESERVED_CHAIN_NAMES:
            raise ValueError(f"{value!r} is reserved by the query engine: choose another name")
        return value

    @field_validator("finality", mode="wrap")
    @classmethod
    def _finality_known(cls, value: object, handler: Any) -> Finality:
        if value in ("finalized", "safe") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return cast(Finality, handler(value))
        raise ValueError(
            f'"finalized", "safe" or a depth in blocks (an integer, 0 or more), got {value!r}'
        )


def parse_chains(text: str) -> list[ChainConfig]:
    """`TRACE_CHAINS` (a JSON list of `ChainConfig` objects, the primary first) with one-line
    errors naming the entry and the field."""
    chains = validated_entries(
        text,
        ChainConfig.model_validate,
        fields=ChainConfig.model_fields,
        setting="TRACE_CHAINS",
        entry="chain",
        example='[{"name": "monad", "chain_id": 10143, '
        '"endpoints": [{"url": "https://rpc.example"}]}]',
        empty_ok=False,
    )
    for field in ("name", "chain_id"):
        values = [getattr(c, field) for c in chains]
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"chains share the {field} {', '.join(twice)}: each must be unique")
    return chains


TAP_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
TapSource = Literal["commits", "alerts", "runs"]


class TapConfig(BaseModel):
    """One wire tap (an entry of `TRACE_TAPS`): a copy of one event stream, sent to a
    secondary destination off the primary path (`trace_resources.taps`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Lowercase identifier (a-z, digits, _ or -): the tap's name.")
    source: TapSource = Field(
        description="`commits` (every committed dataset version), `alerts` (every new alert "
        "the sink accepts) or `runs` (every event of a Dagster run)."
    )
    to: str = Field(
        description="`s3://<bucket>/<prefix>` (newline-delimited JSON objects under the "
        "prefix) or `sqs://<queue name>` (one message per event)."
    )
    select: tuple[str, ...] = Field(
        (),
        description="Only these: datasets (commits), organisations (alerts) or jobs (runs); "
        "empty: all.",
    )
    buffer: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Events held in memory per process before new ones are dropped (and counted).",
    )
    batch: int = Field(500, ge=1, le=10_000, description="Events per object (s3) at most.")
    flush_s: float = Field(
        0.5, gt=0, le=60, description="Seconds the writer waits to fill a batch before writing."
    )

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not TAP_NAME_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a tap name: a lowercase letter, then up to 62 lowercase "
                "letters, digits, _ or - (e.g. commits-audit)"
            )
        return value

    @field_validator("to")
    @classmethod
    def _destination_known(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "s3" and parts.netloc:
            return value
        if parts.scheme == "sqs" and parts.netloc and parts.path in ("", "/"):
            return value
        raise ValueError(
            f"{value!r} is no tap destination: use s3://<bucket>/<prefix> or sqs://<queue name>"
        )


def parse_taps(text: str) -> list[TapConfig]:
    """`TRACE_TAPS` (a JSON list of `TapConfig` objects) with one-line errors naming the entry
    and the field."""
    taps = validated_entries(
        text,
        TapConfig.model_validate,
        fields=TapConfig.model_fields,
        setting="TRACE_TAPS",
        entry="TRACE_TAPS entry",
        example='[{"name": "commits-audit", "source": "commits", "to": "s3://audit/taps/commits"}]',
        empty_ok=True,
    )
    names = [t.name for t in taps]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"TRACE_TAPS names {', '.join(twice)} twice: each tap needs its own name")
    return taps


def _contradicts(field: str, given: object, primary: ChainConfig) -> bool:
    """Whether a single-chain setting given explicitly says otherwise than the primary chain
    of TRACE_CHAINS (an empty TRACE_RPC_ENDPOINTS says nothing)."""
    if field == "rpc_endpoints":
        text = str(given)
        return bool(text.strip()) and parse_endpoints(text) != list(primary.endpoints)
    return bool(
        given
        != {
            "chain_name": primary.name,
            "chain_id": primary.chain_id,
            "range_size": primary.range_size,
        }[field]
    )


class Settings(BaseSettings):
    """Trace's configuration, from `TRACE_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TRACE_", extra="ignore")

    environment: Literal["local", "test", "prod"] = Field(
        "local", description="Which resource set definitions.py builds."
    )

    sensors_running: bool = Field(
        True, description="Whether sensors start running by default (tests start them stopped)."
    )

    # chain
    rpc_url: str = Field("http://127.0.0.1:18545", description="Monad JSON-RPC endpoint.")
    chain_id: int = Field(MONAD_TESTNET_CHAIN_ID, description="Chain id the endpoint must report.")
    range_size: int = Field(
        10_000, gt=0, description="Blocks per partition (10,000 on Monad; small on the devnet)."
    )
    chain_name: str = Field(
        "monad",
        description="Name of the chain TRACE_RPC_URL / TRACE_RPC_ENDPOINTS serve when "
        "TRACE_CHAINS is unset (queries may address its datasets as `<name>.<dataset>`).",
    )
    chains: str = Field(
        "",
        description="JSON list of the deployment's chains (see ChainConfig), the primary "
        "first: its datasets keep their plain names, another chain's are `<name>.<dataset>`. "
        "When set, the primary's entry also sets TRACE_CHAIN_ID, TRACE_CHAIN_NAME, "
        "TRACE_RANGE_SIZE, TRACE_RPC_ENDPOINTS and TRACE_RPC_URL (its first endpoint); the "
        "first four may not contradict it. Empty: one chain, from those settings.",
    )
    rpc_requests_per_second: int | None = Field(
        None, gt=0, description="Cap on RPC requests per second passed to cryo (None: no cap)."
    )
    taps: str = Field(
        "",
        description="JSON list of wire taps (see TapConfig): copies of the commits, alerts or "
        "run events to an object-store prefix or a second queue. Empty: no taps.",
    )
    triggers: str = Field(
        "",
        description="JSON list of declared triggers (trace_resources.triggers): file arrival "
        "under an object-store prefix, webhooks (`POST /v1/triggers/{name}`) and cron "
        "schedules. Empty: none.",
    )
    rpc_max_concurrent_requests: int = Field(
        32, gt=0, description="Cap on concurrent RPC requests passed to cryo."
    )
    rpc_endpoints: str = Field(
        "",
        description="JSON list of endpoints with their limits (see RpcEndpoint): a run's "
        "ranges are spread over the healthy ones in turn (each range's data from one), an "
        "endpoint that keeps failing gets no more ranges and its work fails over to the next, "
        "and block hashes are checked across them. Empty: TRACE_RPC_URL alone, limited by "
        "TRACE_RPC_REQUESTS_PER_SECOND and TRACE_RPC_MAX_CONCURRENT_REQUESTS.",
    )
    # 1 by default: cryo already runs up to rpc_max_concurrent_requests requests per range, and
    # on a CPU-bound local devnet a second range at once measured slower (BENCHMARKS.md)
    extract_concurrency: int = Field(
        1,
        gt=0,
        description="Block ranges extracted at once within one run, per healthy endpoint.",
    )
    rpc_timeout_s: float = Field(10.0, gt=0, description="Timeout of Trace's own RPC calls.")
    rpc_collect_timeout_s: float = Field(
        300.0, gt=0, description="Timeout of one cryo extraction of one range."
    )
    rpc_retry_budget_s: float = Field(
        120.0, gt=0, description="Total time spent retrying transient RPC faults for one range."
    )
    rpc_max_attempts: int = Field(8, gt=0, description="Attempts per RPC operation.")
    verify_receipts: bool = Field(
        False,
        description="Also check every range against the node's receipts (eth_getBlockReceipts): "
        "the receipts root recomputed and every extracted log equal to the receipts' logs, "
        "which catches a log a bloom cannot miss. About 2-3x the extraction's CPU on a loopback "
        "node (BENCHMARKS.md); block hashes are always recomputed from the headers.",
    )
    verify_transactions_root: bool = Field(
        False,
        description="Also recompute each block's transactions root and transaction hashes from "
        "its raw transactions (one eth_getRawTransactionByBlockNumberAndIndex per transaction).",
    )
    chain_head_interval_s: int = Field(
        1,
        gt=0,
        description="Minimum seconds between chain-head sensor ticks: how soon a completed "
        "range is requested (the Dagster daemon evaluates sensors every 5 s at most, so 5 "
        "or less means every daemon loop).",
    )
    chain_head_watch_s: float = Field(
        4.5,
        ge=0,
        lt=60,
        description="How long one chain-head sensor evaluation watches the finalized head for "
        "a newly completed range before it skips (0: look once). The daemon starts sensor "
        "evaluations every 5 s at most; watching most of that window lets a range be requested "
        "within TRACE_CHAIN_HEAD_POLL_S of completing instead of up to 5 s later.",
    )
    chain_head_poll_s: float = Field(
        0.2, gt=0, description="Seconds between finalized-head reads while watching."
    )
    chain_head_downstream: bool = Field(
        True,
        description="Whether the chain-head sensor's run of new ranges also materialises "
        "their derived datasets and alert evaluations (one run), rather than only the raw "
        "datasets (the automation sensor then runs the rest).",
    )
    gap_repair_interval_s: int = Field(
        60,
        gt=0,
        description="Minimum seconds between gap-repair sensor ticks (each scans every "
        "finalized range's committed versions and alert evaluations).",
    )
    gap_repair_backoff_s: float = Field(
        60.0,
        ge=0,
        description="Wait after a range's first repair run before the next one if the range "
        "is still missing; doubles per repair run, up to TRACE_GAP_REPAIR_BACKOFF_MAX_S. The "
        "first repair of a failed range is requested at once.",
    )
    gap_repair_backoff_max_s: float = Field(
        3600.0, ge=0, description="Longest wait between two repair runs of one range."
    )
    gap_repair_max_runs: int = Field(
        10, gt=0, description="Repair runs one gap-repair tick requests at most."
    )

    # the head follower (`python -m trace_assets.head`)
    head_max_batch_blocks: int = Field(
        100,
        gt=0,
        description="Most finalized blocks the head follower appends in one segment when it is "
        "behind (caught up, it appends each block as it is finalized).",
    )
    head_poll_s: float | None = Field(
        None,
        gt=0,
        description="Seconds between finalized-head reads when caught up (None: a third of the "
        "block time observed on the chain, between 0.05 and 1).",
    )
    head_metrics_port: int | None = Field(
        None, gt=0, lt=65536, description="Port of the follower's Prometheus /metrics (None: off)."
    )
    head_compact_min_segments: int = Field(
        64,
        gt=1,
        description="The follower compacts an open range's live segments into one file once "
        "this many have accumulated.",
    )
    head_max_lag_blocks: int = Field(
        100,
        ge=0,
        description="The `head_freshness` check fails when a head dataset is more blocks than "
        "this behind the finalized head.",
    )
    head_max_lag_s: float = Field(
        60.0,
        ge=0,
        description="… or more seconds of chain time than this behind it.",
    )
    head_compact_interval_s: float = Field(
        5.0, gt=0, description="Seconds between the follower's compaction checks."
    )

    # leader leases of the singletons (trace_resources/leases.py)
    leader_lease_s: float = Field(
        15.0,
        gt=0,
        description="Seconds a singleton's leader lease (the head follower, the outbox relay) "
        "lasts without renewal: a standby copy takes over this long after the leader stopped "
        "renewing (killed, paused, cut off), and the old leader's later writes are refused.",
    )
    leader_renew_s: float | None = Field(
        None,
        gt=0,
        description="Seconds between the leader's renewals of its lease (None: a third of "
        "TRACE_LEADER_LEASE_S); standbys try to take it as often. Must be below the lease.",
    )

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

    # alerts: buffer (SQS API), sink, delivery
    sqs_endpoint_url: str | None = Field(
        None,
        description="SQS API endpoint of the alert buffer (None: AWS; locally the moto "
        "server, which serves S3 and SQS on one port).",
    )
    alerts_queue: str = Field("trace-alerts", description="SQS queue name of the alert buffer.")
    alerts_visibility_timeout_s: int = Field(
        30,
        gt=0,
        description="Seconds a received buffer message stays hidden before it is "
        "redelivered (a sink that dies before acknowledging loses nothing).",
    )
    alerts_sink_batch: int = Field(
        100, gt=0, description="Messages the sink upserts in one Postgres transaction."
    )
    sink_metrics_port: int | None = Field(
        None, gt=0, lt=65536, description="Port of the alert sink's Prometheus /metrics (None: off)"
    )
    deliverer_metrics_port: int | None = Field(
        None,
        gt=0,
        lt=65536,
        description="Port of the alert deliverer's Prometheus /metrics (None: off).",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the workers' /metrics listen on (0.0.0.0 inside a container whose "
        "port the scraper reaches).",
    )
    metrics_pushgateway: str | None = Field(
        None,
        description="Prometheus Pushgateway URL that ingest runs push their metrics to when their "
        "step ends, e.g. http://localhost:9091 (None: not pushed).",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector base URL for traces over OTLP/HTTP, e.g. "
        "http://localhost:4318 (None: the standard OTEL_EXPORTER_OTLP_ENDPOINT, else tracing off).",
    )

    @field_validator("otlp_endpoint", "metrics_pushgateway")
    @classmethod
    def _observability_url_is_http(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"TRACE_{str(info.field_name).upper()} must be an http(s) URL such as "
                f"http://localhost:{4318 if info.field_name == 'otlp_endpoint' else 9091}: "
                f"{value!r}"
            )
        return value

    # delivery retries: an exponential schedule for a retry period, then the dead letters
    alert_retry_period_s: float = Field(
        86_400.0,
        gt=0,
        description="How long a failing delivery is retried, counted from its first failure, "
        "before it is dead-lettered (a rule's channel may set its own `retry_period_s` within "
        "TRACE_ALERT_RETRY_PERIOD_MIN_S..TRACE_ALERT_RETRY_PERIOD_MAX_S).",
    )
    alert_retry_period_min_s: float = Field(
        60.0, gt=0, description="Shortest retry period a rule's channel may set, seconds."
    )
    alert_retry_period_max_s: float = Field(
        604_800.0, gt=0, description="Longest retry period a rule's channel may set, seconds."
    )
    alert_backoff_base_s: float = Field(
        1.0,
        gt=0,
        description="Retry delay after the first failure; doubles per attempt (jittered over "
        "the upper half), up to TRACE_ALERT_BACKOFF_MAX_S.",
    )
    alert_backoff_max_s: float = Field(
        3_600.0, gt=0, description="Longest delay between two attempts, seconds."
    )
    alert_retry_after_max_s: float = Field(
        3_600.0,
        ge=0,
        description="Longest `Retry-After` (of a 429 or 503 answer) honoured, seconds; a "
        "longer one is cut to this.",
    )
    alert_delivery_max_attempts: int = Field(
        250,
        gt=0,
        description="Safety bound on attempts per alert and channel (the retry period is "
        "what normally ends retries: 24 h is about 44 attempts on the default schedule).",
    )
    alert_delivery_timeout_s: float = Field(
        10.0, gt=0, description="Time limit of one delivery request (webhook, Slack, SMTP)."
    )
    alert_channel_rate_per_s: float = Field(
        10.0,
        gt=0,
        description="Default deliveries per second per channel (a rule's channel "
        "may set its own `rate_per_s`).",
    )
    alert_delivery_concurrency: int = Field(
        8, gt=0, description="Deliveries in flight at once per deliverer process."
    )
    # custom-SQL alert rules run in sandbox worker processes (trace_resources.sandbox)
    alert_sql_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Time limit of one custom-SQL rule over one range or head segment; past "
        "it the rule is reported failed for that range and the others go on.",
    )
    alert_sql_memory_limit: str = Field(
        "512MB",
        pattern=SIZE_PATTERN,
        description="Memory of each custom-SQL rule sandbox (an OS address-space limit).",
    )
    alert_sql_sandboxes: int = Field(
        1, gt=0, description="Custom-SQL rule sandboxes per evaluating process."
    )
    alert_sql_max_rows: int = Field(
        10_000, gt=0, description="Alerts one custom-SQL rule may raise over one range."
    )

    # organisations' SQL transforms run in sandbox worker processes of their own
    udf_sql_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Time limit of an organisation's SQL transform over one partition; past "
        "it the run fails and nothing is committed.",
    )
    udf_sql_memory_limit: str = Field(
        "1GB",
        pattern=SIZE_PATTERN,
        description="Memory of each SQL-transform sandbox (an OS address-space limit).",
    )
    udf_sql_sandboxes: int = Field(
        1, gt=0, description="SQL-transform sandboxes per process that materialises transforms."
    )
    udf_sql_max_output: str = Field(
        "256MB",
        pattern=SIZE_PATTERN,
        description="Largest output of an SQL transform over one partition (Arrow bytes); "
        "beyond it the run fails and nothing is committed.",
    )

    # organisations' Python transforms run as jailed processes (trace_resources.udfs.jail)
    udf_py_timeout_s: float = Field(
        300.0, gt=0, description="Wall time of one Python UDF process; past it, it is killed."
    )
    udf_py_cpu_s: int = Field(
        300, gt=0, description="CPU seconds of one Python UDF process (RLIMIT_CPU)."
    )
    udf_py_memory: str = Field(
        "2GiB",
        pattern=SIZE_PATTERN,
        description="Memory of one Python UDF process (an OS address-space limit, RLIMIT_AS).",
    )
    udf_py_nofile: int = Field(
        256, gt=16, description="Files a Python UDF process may have open (RLIMIT_NOFILE)."
    )
    udf_py_nproc: int = Field(
        256,
        gt=1,
        description="Processes and threads one Python UDF run may have at once (RLIMIT_NPROC "
        "of its own uid; reaching it stops the run: a fork bomb).",
    )
    udf_py_file_size: str = Field(
        "1GiB", pattern=SIZE_PATTERN, description="Largest file a Python UDF may write."
    )
    udf_py_output: str = Field(
        "16MB",
        pattern=SIZE_PATTERN,
        description="What a Python UDF may print on stdout and stderr together; beyond it, it "
        "is killed.",
    )
    udf_py_uid_base: int = Field(
        64_100,
        gt=0,
        description="Python UDF runs execute as uid BASE+slot (one per run at once, no account "
        "needed); the range must be used by nothing else.",
    )
    udf_py_slots: int = Field(
        32, gt=0, description="Python UDF runs at once on one host (uids BASE..BASE+slots-1)."
    )
    udf_py_jail_dir: Path = Field(
        Path("/tmp/trace-udf-jail"),
        description="The jail's own directory (slot locks, each run's private cwd); made 0711.",
    )
    udf_py_python: str | None = Field(
        None,
        description="Interpreter the UDF venvs are built on; it must be executable by other "
        "users (None: this Python if it is, else python3.X from PATH or /usr/bin).",
    )
    udf_venv_dir: Path = Field(
        Path("/tmp/trace-udf-venvs"),
        description="Cache of the UDFs' virtual environments, one per (Python, requirements); "
        "its parents must be searchable by other users.",
    )

    # organisations' enrichment uploads (CSV or Parquet, `PUT /v1/enrichments/{name}`)
    enrichment_max_bytes: int = Field(
        64 * 1024**2,
        gt=0,
        description="Largest enrichment upload (the file's bytes); larger ones get a 413 "
        "before they are read. A Parquet file may decode to at most 4 times this.",
    )
    enrichment_max_rows: int = Field(
        1_000_000, gt=0, description="Rows an enrichment upload may hold."
    )
    enrichment_max_columns: int = Field(
        64, gt=0, description="Columns an enrichment upload may hold."
    )

    # environments (dev, staging, prod) that `trace promote` copies configuration between
    environments_file: Path = Field(
        Path("trace-environments.yaml"),
        description="YAML file naming each environment's state and data databases and its "
        "dataset declarations directory (`trace promote`; trace_resources.environments).",
    )

    # the running Dagster deployment, told to reload its code location when a transform is
    # applied (unset: nothing is reloaded, and the apply says how to reload by hand)
    dagster_url: str | None = Field(
        None,
        description="Base URL of the Dagster webserver (e.g. http://127.0.0.1:3000); "
        "`trace udf apply` and `POST /v1/transforms` reload its code location through its "
        "GraphQL API so a new transform appears without a restart, and `trace backfill` "
        "launches its runs there (http://127.0.0.1:3000 when unset). `make dev` sets it.",
    )
    dagster_location: str = Field(
        "trace", description="Name of the code location to reload (workspace.yaml)."
    )
    # organisations' Python transforms run as external processes through Dagster Pipes
    udf_query_url: str = Field(
        "http://127.0.0.1:8700",
        description="The query service as a Python transform's process reaches it: it reads "
        "its inputs and uploads its output there, with its task token only.",
    )
    udf_launcher: Literal["local", "k8s"] = Field(
        "local",
        description="Where a Python transform's process runs: `local` (a jailed process "
        "beside the Dagster step, through PipesSubprocessClient) or `k8s` (a pod of its own, "
        "through PipesK8sClient, with the same limits; trace_resources.udfs.k8s).",
    )
    udf_k8s_image: str = Field(
        "trace-udf-runner",
        description="Repository of the UDF runner image (infra/deploy/k8s/Dockerfile.udf-runner)"
        ", without a tag: a transform runs the tag its requirements name (`base` without any,"
        " else `req-<hash>`; the failure of a missing one says how to build it).",
    )
    udf_k8s_namespace: str = Field(
        "trace-udf",
        description="Kubernetes namespace of the UDF pods (its NetworkPolicy lets them reach "
        "the query service and DNS only).",
    )
    udf_python_retries: int = Field(
        1,
        ge=0,
        description="Dagster retries of a Python transform's step whose process died (each "
        "retry runs with new attempts and new credentials).",
    )

    # fault injection (tests only): read by trace_resources.storage.crash at each crash point
    crash_point: str | None = Field(
        None,
        description="TRACE_CRASH_POINT=name[@N][:stop]: SIGKILL (with `:stop`, SIGSTOP) the "
        "process the N-th time it reaches the named crash point (see "
        "trace_resources/storage/crash.py). Never set in production.",
    )

    @field_validator("rpc_endpoints")
    @classmethod
    def _rpc_endpoints_valid(cls, value: str) -> str:
        if value.strip():
            parse_endpoints(value)
        return value

    def endpoints(self) -> list[RpcEndpoint]:
        """The endpoints Trace extracts from, in failover order."""
        if self.rpc_endpoints.strip():
            return parse_endpoints(self.rpc_endpoints)
        return [
            # TRACE_RPC_MAX_CONCURRENT_REQUESTS stays what it was: cryo's cap per collect
            RpcEndpoint(url=self.rpc_url, requests_per_second=self.rpc_requests_per_second)
        ]

    @field_validator("chain_name")
    @classmethod
    def _chain_name_valid(cls, value: str) -> str:
        return str(ChainConfig._name_is_identifier(value))

    @field_validator("taps")
    @classmethod
    def _taps_valid(cls, value: str) -> str:
        if value.strip():
            parse_taps(value)
        return value

    def tap_configs(self) -> list[TapConfig]:
        """The declared wire taps (TRACE_TAPS), in order."""
        return parse_taps(self.taps) if self.taps.strip() else []

    @field_validator("triggers")
    @classmethod
    def _triggers_valid(cls, value: str) -> str:
        parse_triggers(value)
        return value

    def trigger_configs(self) -> list[AnyTrigger]:
        """The declared triggers (TRACE_TRIGGERS), in order."""
        return parse_triggers(self.triggers)

    @field_validator("chains")
    @classmethod
    def _chains_valid(cls, value: str) -> str:
        if value.strip():
            parse_chains(value)
        return value

    @model_validator(mode="after")
    def _primary_from_chains(self) -> Settings:
        """With TRACE_CHAINS, the primary chain's entry is what the single-chain settings mean
        (code that reads `chain_id`, `range_size` or the endpoints reads the primary)."""
        if not self.chains.strip():
            return self
        primary = parse_chains(self.chains)[0]
        endpoints = json.dumps([e.model_dump(exclude_defaults=True) for e in primary.endpoints])
        wanted = {
            "chain_name": primary.name,
            "chain_id": primary.chain_id,
            "range_size": primary.range_size,
            "rpc_endpoints": endpoints,
        }
        for field, value in wanted.items():
            given = getattr(self, field)
            if field in self.model_fields_set and _contradicts(field, given, primary):
                raise ValueError(
                    f"TRACE_{field.upper()}={given!r} contradicts the primary chain "
                    f"{primary.name!r} of TRACE_CHAINS ({value!r}): unset it, or change "
                    "TRACE_CHAINS' first entry"
                )
            setattr(self, field, value)
        self.rpc_url = primary.endpoints[0].url
        return self

    def chain_configs(self) -> list[ChainConfig]:
        """The deployment's chains, the primary first (TRACE_CHAINS, else one chain built
        from TRACE_CHAIN_NAME, TRACE_CHAIN_ID, the RPC settings and TRACE_RANGE_SIZE)."""
        if self.chains.strip():
            return parse_chains(self.chains)
        return [
            ChainConfig(
                name=self.chain_name,
                chain_id=self.chain_id,
                endpoints=tuple(self.endpoints()),
                range_size=self.range_size,
            )
        ]

    @model_validator(mode="after")
    def _renew_within_lease(self) -> Settings:
        if self.leader_renew_s is not None and self.leader_renew_s >= self.leader_lease_s:
            raise ValueError(
                f"TRACE_LEADER_RENEW_S={self.leader_renew_s:g} must be below "
                f"TRACE_LEADER_LEASE_S={self.leader_lease_s:g} (the leader renews several times "
                "per lease), e.g. TRACE_LEADER_LEASE_S=15 TRACE_LEADER_RENEW_S=5"
            )
        return self

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "TRACE_RPC_URL must be an http(s) URL such as http://127.0.0.1:18545, "
                f"got {value!r}"
            )
        return value

    # outbound policy and secrets at rest (issue 15)
    alert_outbound_allow: str = Field(
        "",
        description="Internal receivers alert channels may reach, comma-separated: CIDRs "
        "(`10.1.0.0/16`, `127.0.0.1`) and/or `host[:port]` entries (`hooks.internal:8443`). "
        "Everything else that is not a public address (loopback, private, link-local, "
        "metadata, ...) is refused when a rule is written and at every delivery.",
    )
    secrets_keys: SecretStr = Field(
        default_factory=lambda: SecretStr(DEV_SECRETS_KEYS),
        description="Keyring sealing channel secrets at rest, comma-separated `kid:base64key` "
        "(32-byte keys): the first key seals, every key opens. Rotate by putting a new key "
        "first, running `trace secrets rotate`, then dropping the old key.",
    )

    @model_validator(mode="after")
    def _secrets_keys_usable(self) -> Settings:
        keys = self.secrets_keys.get_secret_value()
        try:
            Keyring.parse(keys)
        except SealError as exc:
            raise ValueError(str(exc)) from None
        if self.environment == "prod" and PLACEHOLDER_MARK in keys:
            raise ValueError(
                "TRACE_SECRETS_KEYS still holds the development placeholder; set a real key in "
                "production, e.g. `k1:<key>` with a key from `python -c 'import base64, os; "
                "print(base64.b64encode(os.urandom(32)).decode())'`"
            )
        return self

    @model_validator(mode="after")
    def _retry_schedule_consistent(self) -> Settings:
        low, default, high = (
            self.alert_retry_period_min_s,
            self.alert_retry_period_s,
            self.alert_retry_period_max_s,
        )
        if not low <= default <= high:
            raise ValueError(
                f"TRACE_ALERT_RETRY_PERIOD_S ({default:g}) must lie within "
                f"TRACE_ALERT_RETRY_PERIOD_MIN_S ({low:g}) and TRACE_ALERT_RETRY_PERIOD_MAX_S "
                f"({high:g}): change one of the three"
            )
        if self.alert_backoff_base_s > self.alert_backoff_max_s:
            raise ValueError(
                f"TRACE_ALERT_BACKOFF_BASE_S ({self.alert_backoff_base_s:g}) is above "
                f"TRACE_ALERT_BACKOFF_MAX_S ({self.alert_backoff_max_s:g}): lower the first"
            )
        return self


def get_settings() -> Settings:
    """Read the settings from the environment now."""
    return Settings()


# Development-only secrets: usable by `make dev`, `make demo` and the tests, refused in prod.
PLACEHOLDER_MARK = "change-me"
DEV_TOKEN_KEYS = f"dev-1:HS256:trace-local-development-token-key-{PLACEHOLDER_MARK}"
DEV_URL_SIGNING_KEY = f"trace-local-download-url-key-{PLACEHOLDER_MARK}"
DEV_SECRETS_KEYS: str = f"dev-{PLACEHOLDER_MARK}:vPDlojPMll/c/ULIvX6stFgMNAZJr15A0Gw+7Dhs0UY="


class QuerySettings(Settings):
    """The query service's settings (`TRACE_QUERY_*`) on top of the shared ones.

    The query service and `trace token` read these; Dagster code reads only `Settings`, so a
    Dagster deployment does not need the query service's secrets. Read by libraries, not here:
    `AWS_*` credentials (boto3 / pyarrow's S3 client, for the buckets and presigned URLs) and
    `PROMETHEUS_MULTIPROC_DIR` (set it to an empty folder to sum /metrics over uvicorn workers).
    """

    query_host: str = Field("127.0.0.1", description="Interface uvicorn binds to.")
    query_port: int = Field(8700, gt=0, lt=65536, description="Port of the query service.")
    query_workers: int = Field(1, gt=0, description="uvicorn worker processes.")
    # capability tokens
    query_token_keys: SecretStr = Field(
        SecretStr(DEV_TOKEN_KEYS),
        description=(
            "Keyring of token keys, comma-separated `KID:ALG:MATERIAL`: `HS256` with a secret of "
            "at least 32 bytes, `EdDSA` with a base64url Ed25519 private key (signs and "
            "verifies) or `EdDSA-public` with a base64url public key (verifies only). Keep the "
            "old key next to the new one while tokens signed with it are alive (rotation)."
        ),
    )
    query_token_signing_kid: str | None = Field(
        None, description="Key id that signs new tokens (None: the first key able to sign)."
    )
    query_token_issuer: str = Field("trace", description="`iss` of issued and accepted tokens.")
    query_token_audience: str = Field(
        "trace-query", description="`aud` of issued and accepted tokens."
    )
    query_token_default_ttl_s: int = Field(
        3600, gt=0, description="Lifetime of a token issued without --ttl, seconds."
    )
    query_token_max_ttl_s: int = Field(
        30 * 86400, gt=0, description="Longest accepted token lifetime (exp - iat), seconds."
    )
    query_token_leeway_s: int = Field(
        30, ge=0, description="Clock skew tolerated on exp / iat / nbf, seconds."
    )
    query_embed_frame_ancestors: str = Field(
        "*",
        pattern=r"^(\*|'none'|'self'|(https?://[A-Za-z0-9.:*\[\]-]+)( https?://[A-Za-z0-9.:*\[\]-]+)*)$",
        description="Who may frame a dashboard's embed page (`/ui/embed/<id>`): the CSP "
        "`frame-ancestors` sources, e.g. `https://intranet.example.com https://wiki.example.com`; "
        "`*` any web page. The `/ui/` page itself is never framed.",
    )
    # the sandbox
    query_timeout_s: float = Field(
        10.0, gt=0, description="Hard time limit of an interactive query, seconds."
    )
    query_memory_limit: str = Field(
        "1GB",
        pattern=SIZE_PATTERN,
        description="Memory of each sandbox worker process (one query at a time each), e.g. "
        "`1GB`: an OS address-space limit above the worker's size at start; DuckDB's own "
        "memory_limit is 3/4 of it.",
    )
    query_threads: int = Field(1, gt=0, description="DuckDB threads of each sandbox.")
    query_sandbox_cache_bytes: int = Field(
        256 * 1024**2,
        ge=0,
        description="Decoded committed files each sandbox worker keeps in memory (on top of "
        "its memory limit).",
    )
    query_max_response_bytes: int = Field(
        16 * 1024**2,
        gt=1024,
        description="Byte budget of one page of a query's answer (a page ends early at it and "
        "`next_cursor` continues; one row larger than half of it fails with a 422), and the "
        "largest batch an export's sandbox sends at once.",
    )
    query_max_concurrent: int = Field(
        4, gt=0, description="Queries run at once per process (the number of sandboxes)."
    )
    query_queue_timeout_s: float = Field(
        2.0, ge=0, description="How long a query waits for a free sandbox before a 429."
    )
    query_page_rows_default: int = Field(1000, gt=0, description="Rows per page by default.")
    query_page_rows_max: int = Field(10_000, gt=0, description="Largest page a client may ask.")
    query_row_cap: int = Field(
        100_000, gt=0, description="Rows an interactive query may page through; beyond: export."
    )
    # rate limits (shared by every process through Postgres)
    query_rate_org_per_s: float = Field(50.0, gt=0, description="Requests/s per organisation.")
    query_rate_org_burst: int = Field(100, gt=0, description="Burst per organisation.")
    query_rate_user_per_s: float = Field(20.0, gt=0, description="Requests/s per subject.")
    query_rate_user_burst: int = Field(40, gt=0, description="Burst per subject.")
    # exports
    query_export_workers: int = Field(2, gt=0, description="Export jobs run at once per process.")
    query_export_timeout_s: float = Field(300.0, gt=0, description="Time limit of an export.")
    query_export_row_cap: int = Field(50_000_000, gt=0, description="Rows an export may write.")
    query_export_url_ttl_s: int = Field(
        900, gt=0, description="Lifetime of a presigned / signed download URL, seconds."
    )
    query_url_signing_key: SecretStr = Field(
        SecretStr(DEV_URL_SIGNING_KEY),
        description="HMAC key of the service's own download links (local object store).",
    )
    # caches of committed files (immutable: a file's key names its attempt)
    query_cache_dir: Path = Field(
        Path(".local/query-cache"), description="Disk cache of committed files read from S3."
    )
    query_cache_disk_bytes: int = Field(
        2 * 1024**3, ge=0, description="Size bound of the disk cache (0: no disk cache)."
    )
    query_cache_memory_bytes: int = Field(
        512 * 1024**2, ge=0, description="Size bound of the in-memory cache of decoded files."
    )
    query_version_cache: bool = Field(
        True,
        description="Keep the current versions' files between commits (dropped when a commit "
        "moves a pointer: LISTEN/NOTIFY on the state database; a query still sees every commit "
        "acknowledged before it arrived). False: resolve them in PostgreSQL on every query.",
    )
    # edge limits and secure defaults (issue 15)
    query_max_body_bytes: int = Field(
        1024**2,
        gt=0,
        description="Largest request body the service reads; larger ones get a 413 before "
        "they are parsed or the token is checked (SQL itself is capped at 100,000 characters).",
    )
    query_max_upload_bytes: int = Field(
        256 * 1024**2,
        gt=0,
        description="Largest file a task uploads to its staging keys (`PUT "
        "/v1/tasks/uploads/...`: a Python transform's output for one partition).",
    )
    query_org_max_concurrent: int | None = Field(
        None,
        gt=0,
        description="Interactive queries one organisation runs at once per process (None: half "
        "of TRACE_QUERY_MAX_CONCURRENT, at least 1), so one organisation can not take every "
        "slot.",
    )
    query_org_max_exports: int = Field(
        2, gt=0, description="Exports one organisation may have queued or running at once."
    )
    query_dev_mode: bool = Field(
        False,
        description="Development mode: the service starts with the placeholder token and URL "
        "signing keys, and only when bound to loopback (TRACE_QUERY_HOST=127.0.0.1). Never set "
        "in production.",
    )

    @property
    def query_memory_bytes(self) -> int:
        """`query_memory_limit` in bytes."""
        return byte_size(self.query_memory_limit)

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_prod(self) -> QuerySettings:
        secrets = {
            "TRACE_QUERY_TOKEN_KEYS": self.query_token_keys.get_secret_value(),
            "TRACE_QUERY_URL_SIGNING_KEY": self.query_url_signing_key.get_secret_value(),
        }
        if self.environment == "prod":
            for name, value in secrets.items():
                if PLACEHOLDER_MARK in value:
                    raise ValueError(
                        f"{name} still holds the development placeholder; set a real secret "
                        "in production, e.g. "
                        + ("`k1:HS256:<secret>` with " if name.endswith("KEYS") else "")
                        + "a secret from `python -c 'import secrets; "
                        "print(secrets.token_urlsafe(48))'`"
                    )
        return self


def get_query_settings() -> QuerySettings:
    """Read the query service's settings from the environment now."""
    return QuerySettings()
