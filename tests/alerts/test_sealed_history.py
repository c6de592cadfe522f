"""Message history on the sealed path: a run requested by a trigger carries its correlation id
(`trace/correlation_id`) to every version it commits (a `commit` hop in the commit's
transaction, the id on the version's outbox event); a derived run of its own, untagged,
continues the id of the inputs it read; the alert raised from those versions carries it through
the buffer (SQS on moto) to the sink's `alert.raised` hop, and the evaluation's span (OTLP to an
in-process collector) is the parent of the sink's. An untagged run with nothing
upstream is its own origin, `run:<run id>`. Real devnet (anvil), S3 API, PostgreSQL, Dagster's
in-process materialisation with the real IO manager."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.alerts.conftest import webhook
from tests.conftest import Devnet, MotoS3Server, NewDatabase
from tests.derived.conftest import ALL_ASSETS, PARTITIONED, Env, aws_env, make_env  # noqa: F401
from tests.utils.otlp_collector import OtlpCollector
from trace_assets.alerts.assets import evaluate_partition
from trace_assets.alerts.scope import AlertScope
from trace_assets.checks import DATASET_CHECKS
from trace_resources import event_history
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.storage import state as state_tables
from trace_resources.storage.history import CORRELATION_TAG
from trace_resources.storage.state import dispose_engine, engine_for
from trace_resources.telemetry import Tracing

RAW = {"blocks", "transactions", "logs"}
ORIGIN = "trigger:rebuild:7"  # what a webhook trigger's run carries


@pytest.fixture
def env(
    aws_env: None,  # noqa: F811
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    devnet: Devnet,
) -> Iterator[Env]:
    made = make_env(new_database, s3_server, devnet)
    try:
        yield made
    finally:
        made.instance.dispose()
        dispose_engine(made.state.dsn)  # the session's server has a bounded number of slots


def _materialise(env: Env, key: str, assets: list[str], tags: dict[str, str]) -> str:
    result = dg.materialize(
        [*ALL_ASSETS, *DATASET_CHECKS],
        instance=env.instance,
        resources=env.resources(),
        partition_key=key,
        tags=tags,
        selection=dg.AssetSelection.assets(*assets),
    )
    assert result.success
    return result.run_id


def _commits(env: Env, correlation_id: str) -> dict[str, str]:
    """dataset -> run id of each `commit` hop under the id (public hops: org NULL)."""
    hops = event_history.read_hops([engine_for(env.state.dsn)], correlation_id)
    assert all(h.org is None for h in hops)
    return {h.details["dataset"]: h.details["run_id"] for h in hops if h.hop == "commit"}


def test_a_triggered_runs_id_follows_its_commits_through_a_derived_run_to_its_alert(
    env: Env, engine: sa.Engine, data_dsn: str, s3_server: MotoS3Server, queue_name: str
) -> None:
    key = env.keys[1]
    raw_run = _materialise(env, key, ["blocks"], {CORRELATION_TAG: ORIGIN})
    derived = sorted(a.key.path[-1] for a in PARTITIONED)
    derived_run = _materialise(env, key, derived, {})  # untagged, as the automation's run is

    commits = _commits(env, ORIGIN)
    assert {d: r for d, r in commits.items() if d in RAW} == dict.fromkeys(RAW, raw_run)
    assert {d: r for d, r in commits.items() if d not in RAW} == dict.fromkeys(derived, derived_run)
    with engine_for(env.state.dsn).connect() as conn:  # the versions' events carry it too
        o = state_tables.outbox
        stamped = conn.execute(
            sa.select(o.c.dataset, o.c.correlation_id).where(o.c.partition_key == key)
        ).all()
    assert {(d, c) for d, c in stamped} == {(d, ORIGIN) for d in RAW | set(derived)}

    # an untagged run that reads nothing is its own origin
    other_run = _materialise(env, env.keys[2], ["blocks"], {})
    assert _commits(env, f"run:{other_run}") == dict.fromkeys(RAW, other_run)
    assert set(_commits(env, ORIGIN)) == RAW | set(derived)  # unchanged

    # the alert raised from the range's versions carries the id to the sink's hop
    transfers = env.reader.read("erc20_transfers", [key])
    assert transfers.num_rows > 0, "the devnet's range should hold ERC-20 transfers"
    token = "0x" + transfers["token"][0].as_py().hex()
    rule = {
        "org": "acme",
        "id": "any-move",
        "condition": {"kind": "erc20_transfer_above", "token": token, "threshold": "0"},
        "channels": [webhook("hook", "http://127.0.0.1:9/hook")],
    }
    stored = RuleStore(engine).create(parse_rule(rule))
    SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url)
    alerts = AlertsResource(
        data_dsn=data_dsn, sqs_endpoint_url=s3_server.endpoint_url, queue=queue_name
    )
    with OtlpCollector() as collector:
        evaluating = Tracing("trace-alert-evaluations", collector.url)
        sinking = Tracing("trace-alert-sink", collector.url)
        _, plan, errors = evaluate_partition(
            key, [stored], env.reader, AlertScope(env.state.dsn), alerts, evaluating
        )
        assert not errors and plan.alerts
        sink = Sink(alerts.buffer(), engine, batch=100, tracing=sinking)
        while sink.cycle(wait_s=1):
            pass
        evaluating.shutdown()
        sinking.shutdown()
        spans = collector.snapshot()
    # traced too: the range's evaluation, naming the work it continues, is the sink's parent
    [evaluate] = [s for s in spans if s.name == "alerts.evaluate"]
    assert evaluate.attributes["partition"] == key
    assert list(evaluate.attributes["trace.correlation_ids"]) == [ORIGIN]
    assert evaluate.attributes["alert.messages"] == len(plan.messages)
    sunk = [s for s in spans if s.name == "alert.sink"]
    assert sunk and all(
        (s.trace_id, s.parent_span_id) == (evaluate.trace_id, evaluate.span_id) for s in sunk
    )
    hops = event_history.read_hops([engine_for(env.state.dsn), engine], ORIGIN)
    raised = [h for h in hops if h.hop == "alert.raised"]
    assert len(raised) == len(plan.alerts) and {h.org for h in raised} == {"acme"}
    # in time order: every commit before the alerts raised from them
    assert [h.hop for h in hops] == ["commit"] * len(commits) + ["alert.raised"] * len(raised)
    # acme follows it whole; to another organisation it is an unknown id (its alerts are
    # acme's), while the commits alone stay public under the untagged run's id
    assert event_history.visible_to(hops, "acme") == hops
    assert event_history.visible_to(hops, "globex") is None
    other = event_history.read_hops([engine_for(env.state.dsn)], f"run:{other_run}")
    assert event_history.visible_to(other, "globex") == other
