"""One devnet materialisation shared by the derived-dataset tests of a module: every finalized
range of blocks, transactions and logs, then every derived dataset, through Dagster with the
real IO manager (S3 API + Postgres registry)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from infra.local.services import MotoS3Server
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet, NewDatabase
from trace_assets.checks import DATASET_CHECKS
from trace_assets.definitions import build_resources
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetReader

_counter = itertools.count()
PARTITIONED = [a for a in DERIVED_ASSETS if a.partitions_def is not None]
ROLLUP = [a for a in DERIVED_ASSETS if a.partitions_def is None]
ALL_ASSETS = [raw_chain, *DERIVED_ASSETS]


@dataclass
class Env:
    settings: Settings
    instance: dg.DagsterInstance
    keys: list[str]
    objects: ObjectStoreResource
    state: StateStoreResource

    @property
    def reader(self) -> DatasetReader:
        return self.state.reader(self.objects)

    def resources(self) -> dict[str, object]:
        return build_resources(self.settings)


def ranged_tags(keys: list[str]) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


def make_env(new_database: NewDatabase, s3_server: MotoS3Server, devnet: Devnet) -> Env:
    name = f"derived_{os.getpid()}_{next(_counter)}"
    state_dsn = new_database(name, "state")
    bucket = f"trace-derived-{os.getpid()}-{next(_counter)}"
    s3_server.s3_client().create_bucket(Bucket=bucket)
    settings = Settings(
        environment="test",
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=state_dsn,
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=bucket,
        rpc_retry_budget_s=20,
        rpc_max_attempts=5,
    )
    objects = ObjectStoreResource(
        kind="s3",
        endpoint_url=s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        bucket_datasets=bucket,
    )
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name or "", keys)
    return Env(settings, instance, keys, objects, StateStoreResource(dsn=settings.state_dsn))


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


@pytest.fixture(scope="module")
def raw_env(
    aws_env: None, new_database: NewDatabase, s3_server: MotoS3Server, devnet: Devnet
) -> Iterator[Env]:
    """Every finalized range of the raw datasets committed (and their checks run), nothing else."""
    env = make_env(new_database, s3_server, devnet)
    result = dg.materialize(
        [raw_chain, *DATASET_CHECKS],
        instance=env.instance,
        resources=env.resources(),
        tags=ranged_tags(env.keys),
        selection=dg.AssetSelection.assets(raw_chain),
    )
    assert result.success
    try:
        yield env
    finally:
        env.instance.dispose()


@pytest.fixture(scope="module")
def derived_env(raw_env: Env) -> Env:
    """raw_env plus every derived dataset, materialised as the operator would: one ranged run
    for the partitioned datasets, then the rollup."""
    env = raw_env
    result = dg.materialize(
        [*ALL_ASSETS, *DATASET_CHECKS],
        instance=env.instance,
        resources=env.resources(),
        tags=ranged_tags(env.keys),
        selection=dg.AssetSelection.assets(*PARTITIONED),
    )
    assert result.success
    result = dg.materialize(
        [*ALL_ASSETS, *DATASET_CHECKS],
        instance=env.instance,
        resources=env.resources(),
        selection=dg.AssetSelection.assets(*ROLLUP),
    )
    assert result.success
    return env
