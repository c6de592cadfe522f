"""The one Definitions object of Trace. Resources are chosen per environment in one place."""

from __future__ import annotations

import os

import dagster as dg

from trace_assets.alerts.assets import alert_evaluations
from trace_assets.audit import ingest_audit
from trace_assets.checks import DATASET_CHECKS
from trace_assets.derived.assets import DERIVED_ASSETS, TRACE_DERIVED_ASSETS, build_chain_derived
from trace_assets.gaps import GAP_SCOPE, chain_gap_scope
from trace_assets.head.checks import head_freshness_checks
from trace_assets.head.follower import HEAD_DATASETS
from trace_assets.partitions import MAX_PARTITIONS_PER_RUN, block_ranges
from trace_assets.raw.chain import RAW_ASSET_KEYS, RawChain, build_raw_chain, raw_chain
from trace_assets.raw.traces import geth_calls
from trace_assets.represent import load_represent_assets
from trace_assets.retention import build_retention_schedule, retention_gc_job
from trace_assets.udfs import load_enrichment_specs, load_udf_assets
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.processes import exit_with_multiprocessing_parent
from trace_resources.resources import ChainResource, ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings, get_settings
from trace_resources.storage.io_manager import DatasetIOManager
from trace_sensors.chain_head import RangeRuns, build_chain_head_sensor
from trace_sensors.freshness import build_head_freshness_sensor
from trace_sensors.gap_repair import build_gap_repair_sensor
from trace_sensors.iceberg import build_iceberg_publish_sensor
from trace_sensors.outbox import build_automation_sensor, build_outbox_relay_sensor
from trace_sensors.triggers import build_triggers

__all__ = [
    "defs",
    "build_resources",
    "raw_backfill_job",
    "RANGE_RUNS",
    "chain_range_runs",
    "chain_head_sensor",
    "gap_repair_sensor",
]

# A ranged run materialises many partitions per step; Dagster stores the per-partition
# materialization (and planned) events of one output as one batch insert when this is set,
# instead of one insert, NOTIFY and index transaction per partition. Dagster reads it in the
# process that stores the events: the run worker, which loads these definitions. An operator's
# own value wins.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", "1000")

# A step that Dagster's multiprocess executor runs in a child process (which loads these
# definitions) stops when the run's process dies, killed too (a SIGKILLed `dagster asset
# materialize` or run worker), instead of extracting and staging on for minutes with no one to
# record it: SIGTERM, which Dagster raises in the step as an interrupt, SIGKILL 10 s later.
exit_with_multiprocessing_parent()


def build_resources(settings: Settings) -> dict[str, object]:
    """Resources for the environment the settings describe (local, test or prod).

    Secrets come from `dg.EnvVar` so that they are read when a run starts, never at import.
    Without AWS_ACCESS_KEY_ID in the environment, S3 credentials come from boto3's own chain
    (an IAM role: the pod's service account, the ECS task role, the instance profile).
    """
    chain = ChainResource.from_settings(settings)
    if settings.object_store == "local":
        objects = ObjectStoreResource(kind="local", local_root=str(settings.local_store_root))
    else:
        objects = ObjectStoreResource(
            kind="s3",
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            **(
                {
                    "access_key_id": dg.EnvVar("AWS_ACCESS_KEY_ID"),
                    "secret_access_key": dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
                }
                if "AWS_ACCESS_KEY_ID" in os.environ
                else {}  # boto3's credential chain
            ),
            bucket_datasets=settings.bucket_datasets,
            bucket_results=settings.bucket_results,
            bucket_scratch=settings.bucket_scratch,
        )
    state = StateStoreResource(dsn=settings.state_dsn)
    # another chain of TRACE_CHAINS: its own ChainResource (trace_resources.chains.resource_key)
    secondaries = {
        f"chain__{config.name}": ChainResource.from_settings(settings, config)
        for config in settings.chain_configs()[1:]
    }
    return {
        "chain": chain,
        **secondaries,
        "objects": objects,
        "state": state,
        "dataset_io_manager": DatasetIOManager(objects=objects, state=state),
        "alerts": AlertsResource(
            data_dsn=settings.data_dsn,
            sqs_endpoint_url=settings.sqs_endpoint_url,
            region=settings.s3_region,
            queue=settings.alerts_queue,
            visibility_timeout_s=settings.alerts_visibility_timeout_s,
        ),
    }


# what the chain-head sensor needs from the assets (trace_sensors imports no trace_assets)
RANGE_RUNS = RangeRuns(block_ranges, RAW_ASSET_KEYS, MAX_PARTITIONS_PER_RUN)
chain_head_sensor = build_chain_head_sensor(RANGE_RUNS)


def chain_range_runs(chain: str) -> RangeRuns:
    """What the chain-head sensor of another chain of TRACE_CHAINS runs: that chain's raw asset,
    partitions and resource (`RawChain`)."""
    raw = RawChain(chain)
    keys = [raw.asset_key(name) for name in RAW_DATASETS]
    return RangeRuns(raw.partitions, keys, MAX_PARTITIONS_PER_RUN, chain, raw.resource_key)


# re-requests ranges a failed or killed run left missing (GAP_SCOPE: what a range must have)
gap_repair_sensor = build_gap_repair_sensor(RANGE_RUNS, GAP_SCOPE)

raw_backfill_job = dg.define_asset_job(
    "raw_chain_job",
    selection=dg.AssetSelection.assets(raw_chain),
    description="Extract, verify and commit blocks, transactions and logs of block ranges.",
)


def _chain_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    sensors = []
    for config in settings.chain_configs()[1:]:
        runs = chain_range_runs(config.name)
        sensors.append(build_chain_head_sensor(runs, settings.sensors_running))
        scope = chain_gap_scope(config.name)
        sensors.append(build_gap_repair_sensor(runs, scope, settings.sensors_running))
    return sensors


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or get_settings()
    jobs = [raw_backfill_job, retention_gc_job]
    # TRACE_TRIGGERS: file arrival and webhook sensors, schedules (trace_sensors/triggers.py)
    trigger_sensors, trigger_schedules = build_triggers(
        settings.trigger_configs(), [j.name for j in jobs], settings.sensors_running
    )
    return dg.Definitions(
        assets=[
            raw_chain,
            # the raw datasets of every other chain of TRACE_CHAINS (README: Several chains)
            *(build_raw_chain(RawChain(c.name)) for c in settings.chain_configs()[1:]),
            geth_calls,
            ingest_audit,
            *DERIVED_ASSETS,
            *TRACE_DERIVED_ASSETS,
            # ... and the datasets each other chain derives from its raw ones, as the primary
            *(a for c in settings.chain_configs()[1:] for a in build_chain_derived(c.name)),
            alert_evaluations,
            # organisations' transforms, as applied when the code location (re)loads
            *load_udf_assets(settings.state_dsn),
            *load_enrichment_specs(settings.state_dsn),  # the uploads they may join
            # dashboard panels with `represent: true`: their charts as assets (represent.py)
            *load_represent_assets(settings.state_dsn),
        ],
        asset_checks=[*DATASET_CHECKS, head_freshness_checks],
        jobs=jobs,
        # automatic GC under the declared retention policies (trace_assets/retention.py)
        schedules=[build_retention_schedule(settings.sensors_running), *trigger_schedules],
        sensors=[
            build_chain_head_sensor(RANGE_RUNS, settings.sensors_running),
            build_gap_repair_sensor(RANGE_RUNS, GAP_SCOPE, settings.sensors_running),
            # each other chain follows its own finalized head and repairs its own gaps
            # (`chain_head_sensor__<chain>`, `gap_repair_sensor__<chain>`)
            *_chain_sensors(settings),
            build_outbox_relay_sensor(settings.sensors_running),
            build_iceberg_publish_sensor(settings.sensors_running),
            build_automation_sensor(settings.sensors_running),
            build_head_freshness_sensor(HEAD_DATASETS, settings.sensors_running),
            *trigger_sensors,
        ],
        resources=build_resources(settings),
        # every step of a run in the run's own process: no interpreter started per step (a
        # fresh one costs seconds, more than a raw range's checks take); a run's steps run
        # one after the other, which is what a range's datasets and their checks need anyway
        executor=dg.in_process_executor,
    )


defs = build_definitions()
