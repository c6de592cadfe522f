"""Request and response models of the HTTP API (requests refuse unknown fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from trace_query_api.engine import MAX_SQL_CHARS
from trace_resources.alert_pipeline.rules import AlertRule
from trace_resources.tokens import DATASET_PATTERN, ORG_PATTERN, PARTITION_PATTERN

__all__ = [
    "DatasetName",
    "PinMap",
    "QueryRequest",
    "HistoryPublic",
    "HopPublic",
    "SavedQueryRunRequest",
    "ExportRequest",
    "SavedQueryCreate",
    "TransformApply",
    "TransformPublic",
    "TransformsPublic",
    "EnrichmentPublic",
    "EnrichmentsPublic",
    "ErrorBody",
    "ErrorPublic",
    "ColumnPublic",
    "QueryResultPublic",
    "DatasetSummaryPublic",
    "DatasetsPublic",
    "ColumnDocPublic",
    "PartitionPublic",
    "FreshnessPublic",
    "DatasetPublic",
    "SnapshotPublic",
    "ExportPublic",
    "ExportsPublic",
    "SavedQueryPublic",
    "SavedQueriesPublic",
    "HealthPublic",
    "ReadyPublic",
    "SECRET_MASK",
    "RULE_ID_PATTERN",
    "RuleId",
    "AlertRuleCreate",
    "AlertRuleUpdate",
    "AlertRuleVersionPublic",
    "AlertRulePublic",
    "AlertRuleDetailPublic",
    "AlertRulesPublic",
    "DeliveryPublic",
    "AlertPublic",
    "AlertsPublic",
    "DashboardPublic",
    "DashboardsPublic",
    "DashboardVersionPublic",
    "DashboardVersionsPublic",
    "PanelRunRequest",
    "EmbedRunRequest",
    "EmbedCreate",
    "EmbedPublic",
    "EmbedCreatedPublic",
    "EmbedsPublic",
    "EmbedDashboardPublic",
]

MAX_LIMIT = 1_000_000
DatasetName = Annotated[str, StringConstraints(pattern=DATASET_PATTERN.pattern, max_length=120)]
PartitionKey = Annotated[str, StringConstraints(pattern=PARTITION_PATTERN.pattern, max_length=100)]
Version = Annotated[int, Field(ge=1, le=2**31 - 1)]
PinMap = dict[DatasetName, dict[PartitionKey, Version]]
Sql = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SQL_CHARS)]
SnapshotId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Paging(_Request):
    limit: int | None = Field(
        None, ge=1, le=MAX_LIMIT, description="Rows per page (default and maximum: settings)."
    )
    offset: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Rows to skip (or use `cursor`)."
    )
    cursor: str | None = Field(
        None, max_length=2000, description="`next_cursor` of the previous page."
    )
    pin: PinMap | None = Field(
        None,
        description="Read exactly these versions: {dataset: {partition_key: version}}. A "
        "pinned dataset is read at these partitions only.",
    )
    snapshot: SnapshotId | None = Field(
        None, description="Read the versions recorded under this id by an earlier query."
    )


class QueryRequest(_Paging):
    sql: Sql = Field(description="One SELECT; datasets are referenced by their names.")


class SavedQueryRunRequest(_Paging):
    pass


class ExportRequest(_Request):
    sql: Sql
    format: Literal["parquet", "csv"] = "parquet"
    pin: PinMap | None = None
    snapshot: SnapshotId | None = None


class SavedQueryCreate(_Request):
    name: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]+$", max_length=200)]
    sql: Sql
    description: (
        Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=2000)] | None
    ) = None


class TransformApply(_Request):
    yaml: Annotated[str, StringConstraints(min_length=1, max_length=200_000)] = Field(
        description="The transform's declaration, as in its YAML file (`trace udf apply`)."
    )
    file: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,200}$")] = Field(
        "transform.yaml", description="The file's name, as errors name it (`file:line: field`)."
    )


class TransformPublic(BaseModel):
    name: str
    version: int
    changed: bool = Field(description="False: this very declaration was the newest version.")
    partitioning: str
    mode: str
    inputs: list[str]
    applied_by: str
    applied_at: datetime
    reloaded: bool | None = Field(
        None,
        description="Whether the running Dagster deployment reloaded its code location (null: "
        "no Dagster URL is configured, or nothing changed).",
    )
    reload: str | None = Field(None, description="What the reload did, in one line.")


class TransformsPublic(BaseModel):
    data: list[TransformPublic]
    count: int


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorPublic(BaseModel):
    error: ErrorBody


class ColumnPublic(BaseModel):
    name: str
    type: str


class QueryResultPublic(BaseModel):
    columns: list[ColumnPublic]
    rows: list[list[Any]]
    row_count: int
    offset: int
    next_cursor: str | None = Field(description="Pass it back with the same SQL for the next page.")
    truncated: bool = Field(
        description="True when more rows exist beyond the interactive row cap: export them."
    )
    notice: str | None = None
    snapshot: str = Field(description="Id of the versions read; pass `snapshot` to re-run.")
    versions: dict[str, dict[str, int]] = Field(
        description="{dataset: {partition_key: version}} this query read."
    )
    elapsed_ms: float


class DatasetSummaryPublic(BaseModel):
    name: str
    description: str | None
    visibility: Literal["public", "org"]
    owner: str | None
    chain: str | None = Field(
        description="The chain the dataset belongs to (None: an organisation's own dataset)."
    )
    partitions: int
    rows: int
    bytes: int
    last_commit_at: datetime | None


class DatasetsPublic(BaseModel):
    data: list[DatasetSummaryPublic]
    count: int


class ColumnDocPublic(BaseModel):
    name: str
    type: str
    nullable: bool
    doc: str | None


class PartitionPublic(BaseModel):
    key: str
    version: int
    rows: int
    bytes: int
    committed_at: datetime


class FreshnessPublic(BaseModel):
    last_commit_at: datetime | None
    latest_partition: str | None
    last_block: int | None = Field(description="Highest block covered (block-range datasets).")


class DatasetPublic(BaseModel):
    name: str
    description: str | None
    visibility: Literal["public", "org"]
    owner: str | None
    chain: str | None = Field(
        description="The chain the dataset belongs to (None: an organisation's own dataset)."
    )
    columns: list[ColumnDocPublic]
    partitions: list[PartitionPublic]
    current_versions: dict[str, int]
    rows: int
    bytes: int
    freshness: FreshnessPublic


class SnapshotPublic(BaseModel):
    id: str
    versions: dict[str, dict[str, int]]
    created_at: datetime


class ExportPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    format: Literal["parquet", "csv"]
    sql: str
    snapshot: str
    rows: int | None
    bytes: int | None
    error: ErrorBody | None
    download_url: str | None
    download_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int


class SavedQueryPublic(BaseModel):
    id: str
    name: str
    sql: str
    description: str | None
    created_by: str
    created_at: datetime


class SavedQueriesPublic(BaseModel):
    data: list[SavedQueryPublic]
    count: int


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


# -- alert rules and alerts --------------------------------------------------------------------

SECRET_MASK = "**********"  # how pydantic writes a SecretStr: what the service returns for one
RULE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
RuleId = Annotated[str, StringConstraints(pattern=RULE_ID_PATTERN)]


class AlertRuleCreate(AlertRule):
    """A rule declaration, as in a rule file (`trace alerts rule create`); `org` may be left
    out (it is the token's)."""

    org: str | None = Field(  # type: ignore[assignment]
        None, pattern=ORG_PATTERN.pattern, description="The token's organisation (default)."
    )


class AlertRuleUpdate(AlertRule):
    """The whole declaration of the rule's next version; `org` and `id` may be left out (they
    are the token's and the path's). Secrets are sent again: the service never returns them."""

    org: str | None = Field(  # type: ignore[assignment]
        None, pattern=ORG_PATTERN.pattern, description="The token's organisation (default)."
    )
    id: str | None = Field(  # type: ignore[assignment]
        None, pattern=RULE_ID_PATTERN, description="The rule id of the path (default)."
    )


class AlertRuleVersionPublic(BaseModel):
    version: int
    enabled: bool
    created_at: datetime


class AlertRulePublic(BaseModel):
    org: str
    id: str
    version: int = Field(description="The version shown (the one in force unless asked).")
    enabled: bool
    kind: str = Field(description="The condition's kind.")
    created_at: datetime = Field(description="When this version was written.")
    rule: AlertRule = Field(
        description=f"The declaration; secrets (webhook `secret`, SMTP `password`) read "
        f"{SECRET_MASK!r}."
    )


class AlertRuleDetailPublic(AlertRulePublic):
    latest_version: int = Field(description="The version in force.")
    versions: list[AlertRuleVersionPublic] = Field(description="Every version, oldest first.")


class AlertRulesPublic(BaseModel):
    data: list[AlertRulePublic]
    count: int


class DeliveryPublic(BaseModel):
    channel: str = Field(description="The rule's channel name.")
    state: Literal["pending", "delivered", "dead"]
    attempts: int = Field(description="Attempts since the alert was upserted or last replayed.")
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="When a pending delivery is due.")
    delivered_at: datetime | None
    dead_at: datetime | None
    replays: int = Field(description="Times `trace dlq replay` returned it to pending.")


class AlertPublic(BaseModel):
    dedupe_key: str
    kind: Literal["alert", "retraction"]
    rule_id: str | None
    rule_version: int | None
    partition_key: str | None = Field(description="The block range the alert was raised on.")
    text: str | None
    created_at: datetime = Field(description="When the sink stored it.")
    correlation_id: str | None = Field(
        default=None, description="Its unit of work's id: GET /v1/history/{id} shows the path."
    )
    payload: dict[str, Any] = Field(description="The alert as delivered to the channels.")
    deliveries: list[DeliveryPublic]


class HopPublic(BaseModel):
    hop: str = Field(description="block.finalized, commit, alert.raised, alert.delivered, ...")
    at: datetime
    process: str = Field(description="The service (and host:pid) that made the hop.")
    org: str | None = Field(description="Your organisation; null: a public (chain) hop.")
    details: dict[str, Any]


class HistoryPublic(BaseModel):
    correlation_id: str
    hops: list[HopPublic] = Field(description="In time order.")


class AlertsPublic(BaseModel):
    data: list[AlertPublic]
    count: int
    next_cursor: str | None = Field(description="Pass it as `cursor` for the next (older) page.")


class EnrichmentPublic(BaseModel):
    name: str = Field(description="The dataset, org_<org>__<name>.")
    version: int = Field(description="The committed version holding this upload's rows.")
    changed: bool = Field(description="False: the upload held exactly the current rows.")
    rows: int
    columns: list[ColumnPublic]


class EnrichmentsPublic(BaseModel):
    data: list[EnrichmentPublic]
    count: int


class TriggerCallPublic(BaseModel):
    """An accepted webhook call: the same Idempotency-Key answers the same call."""

    trigger: str
    call_id: int = Field(description="The call's id; a sensor requests one run per call.")
    correlation_id: str = Field(
        description="The id the run it requests and what that run commits carry: "
        "GET /v1/history/{correlation_id} follows them."
    )
    idempotency_key: str
    fired: bool = Field(
        description="True: this request recorded the call; False: the key had fired already "
        "and nothing new happens."
    )
    received_at: datetime


# -- dashboards (`trace_query_api.dashboards` holds the spec they carry) ---------------------


class DashboardPublic(BaseModel):
    id: str
    name: str
    version: int = Field(description="The version shown here (the newest unless asked).")
    current_version: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    spec: dict[str, Any] | None = Field(
        None, description="The version's spec; a saved query's SQL is copied into its panel."
    )


class DashboardsPublic(BaseModel):
    data: list[DashboardPublic]
    count: int


class DashboardVersionPublic(BaseModel):
    version: int
    created_by: str
    created_at: datetime


class DashboardVersionsPublic(BaseModel):
    data: list[DashboardVersionPublic]
    count: int


ParameterValues = dict[
    Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")],
    Annotated[str, StringConstraints(max_length=100)] | int | None,
]


class PanelRunRequest(_Request):
    parameters: ParameterValues = Field(
        default_factory=dict, description="Values of the dashboard's parameters (else defaults)."
    )
    version: Version | None = Field(None, description="Run the panel of this version.")
    limit: int | None = Field(None, ge=1, le=MAX_LIMIT)


class EmbedRunRequest(_Request):
    parameters: ParameterValues = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1, le=MAX_LIMIT)


class EmbedCreate(_Request):
    ttl_s: int = Field(3600, ge=1, description="Seconds until the link stops working.")
    panel: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")] | None = Field(
        None, description="Share this panel only (and the panel it drills into)."
    )
    version: Version | None = Field(None, description="Share this version (default: newest).")
    pin_versions: bool = Field(
        True, description="Read the dataset versions current now, on every view."
    )


class EmbedPublic(BaseModel):
    id: str
    dashboard_id: str
    version: int
    panel: str | None
    pins: dict[str, dict[str, int]] | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class EmbedCreatedPublic(EmbedPublic):
    token: str = Field(description="The embed token (read-only, this version's panels only).")
    url: str = Field(description="The embed page, token in the fragment: never sent to servers.")


class EmbedsPublic(BaseModel):
    data: list[EmbedPublic]
    count: int


class EmbedDashboardPublic(BaseModel):
    dashboard_id: str
    version: int
    name: str
    panel: str | None
    parameters: list[dict[str, Any]]
    panels: list[dict[str, Any]]
