"""Declared triggers on the real services: objects landing on the S3 API (moto) under a
prefix become an organisation's enrichment commit or a run request, each once, also after a
restart; a webhook call through the query service (uvicorn in a child process, PostgreSQL) with
a token for that trigger fires once per Idempotency-Key, and a Dagster sensor turns it into one
run request; other tokens and bad input are refused with one clear line; a declared schedule is
a ScheduleDefinition of the Definitions with its cron."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from infra.local.query_service import QueryServer, settings_env
from tests.conftest import NewDatabase
from trace_assets.definitions import build_definitions
from trace_resources import event_history
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import QuerySettings, Settings
from trace_resources.storage import triggers as table
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.history import CORRELATION_TAG
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, generate_key, issue_token
from trace_resources.triggers import FileTrigger, WebhookTrigger, parse_triggers
from trace_sensors.triggers import build_file_arrival_sensor, build_webhook_sensor

INBOX = "inbox/acme/labels/"


def _triggers(bucket: str) -> list[dict[str, str]]:
    return [
        {
            "name": "labels-drop",
            "kind": "file",
            "prefix": f"s3://{bucket}/{INBOX}",
            "org": "acme",
            "enrichment": "labels",
            "schema": "name:string,score:int64",
        },
        {
            "name": "files-run",
            "kind": "file",
            "prefix": f"s3://{bucket}/runs/",
            "org": "acme",
            "job": "retention_gc_job",
        },
        {"name": "rebuild", "kind": "webhook", "org": "acme", "job": "retention_gc_job"},
        {"name": "other", "kind": "webhook", "org": "acme", "job": "retention_gc_job"},
        {
            "name": "nightly-gc",
            "kind": "schedule",
            "cron": "30 2 * * 1-5",
            "job": "retention_gc_job",
        },
        {  # fired by a composite alert rule (tests/alerts/test_composite.py)
            "name": "whale-exit",
            "kind": "composite",
            "org": "acme",
            "rule": "big-then-exchange",
            "job": "retention_gc_job",
        },
    ]


def _tick(sensor: dg.SensorDefinition, resources: dict[str, object], cursor: str | None):
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(), cursor=cursor, resources=resources
    )
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "x", "kind": "cron"},
            "entry 1 ('x'): kind must be one of file, webhook, schedule or composite",
        ),
        (
            {
                "name": "x",
                "kind": "composite",
                "org": "acme",
                "rule": "r",
                "job": "j",
                "outcome": "?",
            },
            "outcome: Input should be 'fired', 'timeout' or 'any'",
        ),
        (
            {"name": "x", "kind": "composite", "org": "acme", "rule": "Big Rule", "job": "j"},
            "rule: 'Big Rule' is not an alert rule id",
        ),
        (
            {"name": "x", "kind": "schedule", "cron": "61 * * * *", "job": "j"},
            "entry 1 ('x'): cron: '61 * * * *' is not a cron expression",
        ),
        (
            {"name": "x", "kind": "file", "prefix": "/tmp/in", "org": "acme", "job": "j"},
            "prefix: '/tmp/in' is no object-store prefix: use s3://<bucket>/<prefix>/",
        ),
        (
            {"name": "x", "kind": "file", "prefix": "s3://b/in/", "org": "acme"},
            "give exactly one of enrichment (a dataset name) or job",
        ),
        (
            [
                {"name": "a-b", "kind": "webhook", "org": "acme", "job": "j"},
                {"name": "a_b", "kind": "webhook", "org": "acme", "job": "j"},
            ],
            "names a-b and a_b: names are unique, `-` and `_` alike",
        ),
        (
            {"name": "Bad Name", "kind": "webhook", "org": "acme", "job": "j"},
            "name: 'Bad Name' is not a trigger name",
        ),
    ],
)
def test_a_bad_trigger_declaration_is_refused_in_one_line(
    entry: dict[str, str] | list[dict[str, str]], message: str
) -> None:
    with pytest.raises(ValueError, match="TRACE_TRIGGERS") as caught:
        parse_triggers(json.dumps(entry if isinstance(entry, list) else [entry]))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_declared_triggers_are_in_the_definitions_and_an_unknown_job_is_refused(
    state_dsn: str,
) -> None:
    settings = Settings(
        environment="test", state_dsn=state_dsn, triggers=json.dumps(_triggers("b"))
    )
    defs = build_definitions(settings).get_repository_def()
    schedule = defs.get_schedule_def("trigger__nightly_gc")
    assert schedule.cron_schedule == "30 2 * * 1-5"
    assert schedule.job_name == "retention_gc_job"
    names = {s.name for s in defs.sensor_defs}
    assert {"trigger__labels_drop", "trigger__files_run", "trigger__rebuild"} <= names
    assert defs.get_sensor_def("trigger__whale_exit").job_name == "retention_gc_job"

    wrong = [{"name": "w", "kind": "webhook", "org": "acme", "job": "no_such_job"}]
    with pytest.raises(Exception, match="runs job 'no_such_job', which is not a job of Trace"):
        build_definitions(settings.model_copy(update={"triggers": json.dumps(wrong)}))


# -- file arrival ------------------------------------------------------------------------------


def test_each_object_landing_becomes_one_enrichment_commit(
    objects: ObjectStoreResource, state: StateStoreResource, s3_bucket: str, s3_client
) -> None:
    trigger = parse_triggers(json.dumps(_triggers(s3_bucket)))[0]
    assert isinstance(trigger, FileTrigger)
    sensor = build_file_arrival_sensor(trigger)
    resources = {"objects": objects, "state": state}
    engine = engine_for(state.dsn)
    reader = DatasetReader(objects.datasets(), VersionStore(engine))

    s3_client.put_object(
        Bucket=s3_bucket, Key=f"{INBOX}a.csv", Body=b"name,score\nalice,1\nbob,2\n"
    )
    s3_client.put_object(Bucket=s3_bucket, Key="elsewhere/x.csv", Body=b"name,score\neve,9\n")
    cursor = _tick(sensor, resources, None).cursor
    assert reader.read("org_acme__labels").sort_by("name").to_pylist() == [
        {"name": "alice", "score": 1},
        {"name": "bob", "score": 2},
    ]
    versions = VersionStore(engine)
    assert versions.read.current_version_numbers("org_acme__labels") == {UNPARTITIONED: 1}

    _tick(sensor, resources, cursor)  # nothing new
    _tick(build_file_arrival_sensor(trigger), resources, None)  # a restart without its cursor
    assert versions.read.current_version_numbers("org_acme__labels") == {UNPARTITIONED: 1}

    s3_client.put_object(Bucket=s3_bucket, Key=f"{INBOX}b.csv", Body=b"name,score\ncarol,3\n")
    s3_client.put_object(Bucket=s3_bucket, Key=f"{INBOX}bad.csv", Body=b"name,score\ndan,x\n")
    _tick(sensor, resources, cursor)
    _tick(sensor, resources, cursor)
    assert versions.read.current_version_numbers("org_acme__labels") == {UNPARTITIONED: 2}
    assert reader.read("org_acme__labels").to_pylist() == [{"name": "carol", "score": 3}]
    with engine.connect() as conn:
        outcomes = dict(
            conn.execute(
                sa.select(table.trigger_objects.c.object_key, table.trigger_objects.c.outcome)
            ).all()
        )
    assert set(outcomes) == {f"{INBOX}a.csv", f"{INBOX}b.csv", f"{INBOX}bad.csv"}
    assert outcomes[f"{INBOX}bad.csv"].startswith("refused: ")
    assert "line 2" in outcomes[f"{INBOX}bad.csv"]


def test_each_object_landing_requests_one_run_across_restarts(
    objects: ObjectStoreResource, state: StateStoreResource, s3_bucket: str, s3_client
) -> None:
    trigger = parse_triggers(json.dumps(_triggers(s3_bucket)))[1]
    assert isinstance(trigger, FileTrigger) and trigger.job == "retention_gc_job"
    resources = {"objects": objects, "state": state}
    s3_client.put_object(Bucket=s3_bucket, Key="runs/one.json", Body=b"{}")

    first = _tick(build_file_arrival_sensor(trigger), resources, None)
    assert [(r.job_name, r.tags["trace/object_key"]) for r in first.run_requests] == [
        ("retention_gc_job", "runs/one.json")
    ]
    correlation_id = first.run_requests[0].tags[CORRELATION_TAG]
    assert correlation_id.startswith("trigger:files-run:")
    # the tick was lost (its cursor not stored): the same run key again, which Dagster runs once
    again = _tick(build_file_arrival_sensor(trigger), resources, None)
    assert [r.run_key for r in again.run_requests] == [first.run_requests[0].run_key]
    # stored: the next tick records it; a restarted sensor requests nothing more
    assert _tick(build_file_arrival_sensor(trigger), resources, first.cursor).run_requests == []
    assert _tick(build_file_arrival_sensor(trigger), resources, None).run_requests == []
    # the arrival is the origin hop of the run's work, recorded once with the object
    _tick(build_file_arrival_sensor(trigger), resources, first.cursor)  # recorded already
    hops = event_history.read_hops([engine_for(state.dsn)], correlation_id)
    assert [(h.hop, h.org, h.details["key"]) for h in hops] == [
        ("file.arrived", "acme", "runs/one.json")
    ]


# -- webhooks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook_settings(new_database: NewDatabase, tmp_path_factory: pytest.TempPathFactory):
    key, _ = generate_key("k1", "HS256")
    return QuerySettings(
        environment="test",
        state_dsn=new_database(f"trig_{os.getpid()}_state", "state"),
        data_dsn=new_database(f"trig_{os.getpid()}_data", "data"),  # the history reads both
        object_store="local",
        local_store_root=tmp_path_factory.mktemp("trig-store"),
        query_token_keys=key,
        query_cache_dir=tmp_path_factory.mktemp("trig-cache"),
        triggers=json.dumps(_triggers("unused")),
    )


@pytest.fixture(scope="module")
def hook_server(
    hook_settings: QuerySettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    log = tmp_path_factory.mktemp("trig-uvicorn") / "uvicorn.log"
    server = QueryServer(settings_env(hook_settings), log_file=log)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _token(settings: QuerySettings, **kw: object) -> dict[str, str]:
    token, _ = issue_token(
        Keyring.from_settings(settings),
        settings,
        org="acme",
        subject="ci",
        **kw,  # type: ignore[arg-type]
    )
    return {"Authorization": f"Bearer {token}"}


def test_a_webhook_fires_once_per_idempotency_key_and_requests_one_run(
    hook_settings: QuerySettings, hook_server: QueryServer
) -> None:
    headers = {**_token(hook_settings, triggers=["rebuild"]), "Idempotency-Key": "deploy-41"}
    with httpx.Client(base_url=hook_server.url, timeout=30) as http:
        first = http.post("/v1/triggers/rebuild", headers=headers, json={"ref": "main"})
        again = http.post("/v1/triggers/rebuild", headers=headers, json={"ref": "main"})
        other = http.post(
            "/v1/triggers/rebuild", headers={**headers, "Idempotency-Key": "deploy-42"}
        )
    assert first.status_code == 202 and first.json()["fired"] is True
    assert again.status_code == 200 and again.json()["fired"] is False
    assert again.json()["call_id"] == first.json()["call_id"]
    assert other.status_code == 202 and other.json()["call_id"] != first.json()["call_id"]

    trigger = next(t for t in hook_settings.trigger_configs() if isinstance(t, WebhookTrigger))
    sensor = build_webhook_sensor(trigger)
    resources = {"state": StateStoreResource(dsn=hook_settings.state_dsn)}
    result = _tick(sensor, resources, None)
    assert [r.tags["trace/idempotency_key"] for r in result.run_requests] == [
        "deploy-41",
        "deploy-42",
    ]
    assert json.loads(result.run_requests[0].tags["trace/trigger_payload"]) == {"ref": "main"}
    assert all(r.job_name == "retention_gc_job" for r in result.run_requests)
    assert _tick(sensor, resources, result.cursor).run_requests == []

    # the call is the origin of its run's work: the run carries the id the answer named, and
    # the call's hop is in the history, once, as acme's (`GET /v1/history/{id}`)
    correlation_id = first.json()["correlation_id"]
    assert correlation_id == f"trigger:rebuild:{first.json()['call_id']}"
    assert result.run_requests[0].tags[CORRELATION_TAG] == correlation_id
    hops = event_history.read_hops([engine_for(hook_settings.state_dsn)], correlation_id)
    assert [(h.hop, h.org, h.details["idempotency_key"]) for h in hops] == [
        ("trigger.called", "acme", "deploy-41")
    ]
    reader = {"Authorization": _token(hook_settings)["Authorization"]}
    with httpx.Client(base_url=hook_server.url, timeout=30) as http:
        history = http.get(f"/v1/history/{correlation_id}", headers=reader)
    assert history.status_code == 200, history.text
    assert [h["hop"] for h in history.json()["hops"]] == ["trigger.called"]


def test_a_webhook_refuses_other_tokens_and_bad_input_in_one_line(
    hook_settings: QuerySettings, hook_server: QueryServer
) -> None:
    fires_other = _token(hook_settings, triggers=["other"])
    fires_rebuild = _token(hook_settings, triggers=["rebuild"])
    with httpx.Client(base_url=hook_server.url, timeout=30) as http:
        wrong_trigger = http.post("/v1/triggers/rebuild", headers=fires_other)
        org_token = http.post("/v1/triggers/rebuild", headers=_token(hook_settings))
        unknown = http.post("/v1/triggers/nope", headers=fires_rebuild)
        reads = http.post("/v1/query", headers=fires_rebuild, json={"sql": "SELECT 1"})
        not_json = http.post(
            "/v1/triggers/rebuild",
            headers={**fires_rebuild, "content-type": "application/json"},
            content=b"{nope",
        )
        bad_key = http.post(
            "/v1/triggers/rebuild", headers={**fires_rebuild, "Idempotency-Key": "has space"}
        )
        anonymous = http.post("/v1/triggers/rebuild")
    assert (wrong_trigger.status_code, wrong_trigger.json()["error"]["code"]) == (
        403,
        "trigger_not_allowed",
    )
    assert "--trigger rebuild" in wrong_trigger.json()["error"]["message"]
    assert org_token.status_code == 403
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_trigger")
    assert (reads.status_code, reads.json()["error"]["code"]) == (403, "trigger_token_not_allowed")
    assert not_json.status_code == 400
    assert "the body is not JSON" in not_json.json()["error"]["message"]
    assert bad_key.status_code == 400 and "Idempotency-Key" in bad_key.json()["error"]["message"]
    assert anonymous.status_code == 401
    with engine_for(hook_settings.state_dsn).connect() as conn:
        keys = conn.execute(sa.select(table.trigger_calls.c.idempotency_key)).scalars().all()
    assert "has space" not in keys
