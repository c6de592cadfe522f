"""Declared triggers (`TRACE_TRIGGERS`): besides the chain head and dataset-updated, what else
starts work.

    {"name": "labels-drop", "kind": "file", "prefix": "s3://inbox/acme/labels/",
     "org": "acme", "enrichment": "labels", "schema": "address:binary,label:string"}
        each object landing under the prefix becomes the next version of acme's enrichment
        dataset `org_acme__labels` (or, with "job" instead of "enrichment", a run request)
    {"name": "rebuild", "kind": "webhook", "org": "acme", "job": "retention_gc_job"}
        `POST /v1/triggers/rebuild` with a token issued for it (`trace token issue
        --trigger rebuild`) records a call; a sensor turns each call into a run request
    {"name": "nightly-gc", "kind": "schedule", "cron": "30 2 * * *", "job": "retention_gc_job"}
        a Dagster schedule
    {"name": "whale-exit", "kind": "composite", "org": "acme", "rule": "big-then-exchange",
     "job": "retention_gc_job", "outcome": "fired"}
        each firing of acme's composite alert rule (`all_of`, `n_of_m`, `sequence`: the
        Aggregator, `trace_assets.alerts.composite`) that stands, once, becomes a run request
        of the job (outcome `timeout`: each timeout; `any`: both)

The models and their one-line validation live here; the tables of calls and seen objects are
`trace_resources.storage.triggers`, the sensors and schedules `trace_sensors.triggers`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from trace_resources.config_entries import validated_entries

__all__ = [
    "TRIGGER_NAME_PATTERN",
    "FileTrigger",
    "WebhookTrigger",
    "ScheduleTrigger",
    "CompositeTrigger",
    "AnyTrigger",
    "TriggerConfig",
    "parse_triggers",
    "split_prefix",
]

TRIGGER_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_ORG = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_JOB = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # an alert rule's id (alert_pipeline.rules)
_EXAMPLE = '[{"name": "rebuild", "kind": "webhook", "org": "acme", "job": "retention_gc_job"}]'


class _Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Lowercase identifier (a-z, digits, _ or -), unique.")

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not TRIGGER_NAME_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a trigger name: a lowercase letter, then up to 62 lowercase "
                "letters, digits, _ or - (e.g. labels-drop)"
            )
        return value


def _job_name(value: str | None) -> str | None:
    if value is not None and not _JOB.match(value):
        raise ValueError(f"{value!r} is not a Dagster job name (letters, digits and _)")
    return value


def _org_name(value: str) -> str:
    if not _ORG.match(value):
        raise ValueError(f"{value!r} is not an organisation name (e.g. acme or acme_labs)")
    return value


class FileTrigger(_Trigger):
    """Objects landing under an object-store prefix: each one, once, becomes the next version
    of an organisation's enrichment dataset, or a run request of a job."""

    kind: Literal["file"]
    prefix: str = Field(description="`s3://<bucket>/<prefix>` watched for new objects.")
    org: str = Field(description="The organisation the objects belong to.")
    enrichment: str | None = Field(
        None, description="Enrichment dataset name: each object is committed as its next version."
    )
    schema_: str | None = Field(
        None,
        alias="schema",
        description="Columns of a CSV object (`address:binary,label:string`); Parquet: optional.",
    )
    job: str | None = Field(
        None, description="Job to request a run of, per object (tag `trace/object_key`)."
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_valid(cls, value: str) -> str:
        split_prefix(value)
        return value

    @field_validator("org")
    @classmethod
    def _org_valid(cls, value: str) -> str:
        return _org_name(value)

    @field_validator("job")
    @classmethod
    def _job_valid(cls, value: str | None) -> str | None:
        return _job_name(value)

    @model_validator(mode="after")
    def _one_action(self) -> FileTrigger:
        if (self.enrichment is None) == (self.job is None):
            raise ValueError("give exactly one of enrichment (a dataset name) or job")
        return self


class WebhookTrigger(_Trigger):
    """`POST /v1/triggers/{name}`, with a token issued for this trigger, requests a run."""

    kind: Literal["webhook"]
    org: str = Field(description="The organisation whose tokens may fire it.")
    job: str = Field(description="Job to request a run of, per accepted call.")

    @field_validator("org")
    @classmethod
    def _org_valid(cls, value: str) -> str:
        return _org_name(value)

    @field_validator("job")
    @classmethod
    def _job_valid(cls, value: str) -> str | None:
        return _job_name(value)


class ScheduleTrigger(_Trigger):
    """A cron schedule of a job (a Dagster ScheduleDefinition)."""

    kind: Literal["schedule"]
    cron: str = Field(description="Cron expression, e.g. `30 2 * * *` (UTC unless timezone).")
    job: str = Field(description="Job to run at each tick.")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression.")

    @field_validator("job")
    @classmethod
    def _job_valid(cls, value: str) -> str | None:
        return _job_name(value)

    @field_validator("cron")
    @classmethod
    def _cron_valid(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError(
                f"{value!r} is not a cron expression: five fields, e.g. '30 2 * * *' (02:30 daily)"
            )
        return value


class CompositeTrigger(_Trigger):
    """Each standing firing of an organisation's composite alert rule requests a run, once.

    The rule is evaluated as an alert rule is (over committed, finalized ranges, in block
    order); the trigger acts on what it raised. A firing retracted before the sensor saw it
    (its range re-committed without an input event) requests nothing; a run already requested
    is not undone: the retraction is logged on the sensor's tick."""

    kind: Literal["composite"]
    org: str = Field(description="The organisation owning the rule.")
    rule: str = Field(description="Id of the organisation's composite alert rule.")
    job: str = Field(description="Job to request a run of, per firing.")
    outcome: Literal["fired", "timeout", "any"] = Field(
        "fired", description="Which firings: the completed windows, the timeouts, or both."
    )

    @field_validator("org")
    @classmethod
    def _org_valid(cls, value: str) -> str:
        return _org_name(value)

    @field_validator("rule")
    @classmethod
    def _rule_valid(cls, value: str) -> str:
        if not _RULE.match(value):
            raise ValueError(f"{value!r} is not an alert rule id (e.g. big-then-exchange)")
        return value

    @field_validator("job")
    @classmethod
    def _job_valid(cls, value: str) -> str | None:
        return _job_name(value)


AnyTrigger = FileTrigger | WebhookTrigger | ScheduleTrigger | CompositeTrigger
TriggerConfig = Annotated[AnyTrigger, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[AnyTrigger] = TypeAdapter(TriggerConfig)
_KINDS = ("file", "webhook", "schedule", "composite")


def split_prefix(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` as (bucket, `some/prefix/`)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{uri!r} is no object-store prefix: use s3://<bucket>/<prefix>/")
    return parts.netloc, parts.path.lstrip("/")


def _validate(item: Any) -> AnyTrigger:
    if not isinstance(item, dict) or item.get("kind") not in _KINDS:
        raise ValueError("kind must be one of file, webhook, schedule or composite")
    return _ADAPTER.validate_python(item)


def parse_triggers(text: str) -> list[AnyTrigger]:
    """`TRACE_TRIGGERS` (a JSON list) with one-line errors naming the entry and the field."""
    if not text.strip():
        return []
    triggers = validated_entries(
        text,
        _validate,
        setting="TRACE_TRIGGERS",
        entry="TRACE_TRIGGERS entry",
        example=_EXAMPLE,
        fields=(),
        empty_ok=True,
        skip_loc=1,  # the union's tag (its kind)
    )
    # Dagster names them `trigger__<name>` with `-` as `_`: labels-drop and labels_drop clash
    names = [t.name.replace("-", "_") for t in triggers]
    twice = sorted({t.name for t in triggers if names.count(t.name.replace("-", "_")) > 1})
    if twice:
        raise ValueError(
            f"TRACE_TRIGGERS names {' and '.join(twice)}: names are unique, `-` and `_` alike"
        )
    return triggers
