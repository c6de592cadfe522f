"""S3 credentials: keys in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) are read when a
run starts; without them the object store takes its credentials from the AWS SDK's own chain (an
IAM role in production: the pod's service account, the ECS task role), here a shared credentials
file, and still reads and writes the bucket (moto's S3 API on loopback)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from infra.local.services import MotoS3Server
from trace_assets.definitions import build_resources
from trace_resources.resources import ObjectStoreResource
from trace_resources.settings import Settings


def _settings(s3_server: MotoS3Server, bucket: str, state_dsn: str) -> Settings:
    return Settings(
        environment="test",
        rpc_url="http://127.0.0.1:9",  # not contacted
        state_dsn=state_dsn,
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=bucket,
    )


def test_keys_in_the_environment_are_read_at_run_start(
    s3_server: MotoS3Server, s3_bucket: str, state_dsn: str
) -> None:
    objects = build_resources(_settings(s3_server, s3_bucket, state_dsn))["objects"]
    assert isinstance(objects, ObjectStoreResource)
    assert objects.access_key_id == dg.EnvVar("AWS_ACCESS_KEY_ID")


def test_without_keys_the_sdk_chain_supplies_them(
    s3_server: MotoS3Server,
    s3_bucket: str,
    state_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    profile = tmp_path / "credentials"
    profile.write_text("[default]\naws_access_key_id = role\naws_secret_access_key = role\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(profile))
    objects = build_resources(_settings(s3_server, s3_bucket, state_dsn))["objects"]
    assert isinstance(objects, ObjectStoreResource)
    assert objects.access_key_id is None and objects.secret_access_key is None
    store = objects.datasets()
    store.put_bytes("credentials-check/one", b"from the chain")
    assert store.get_bytes("credentials-check/one") == b"from the chain"
