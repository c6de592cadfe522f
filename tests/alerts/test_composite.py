"""Composite alert rules (the Aggregator) over committed block ranges, end to end: transfers
committed through the real writer (Postgres state, S3 API) -> `evaluate_partition` (the
`alert_evaluations` asset's work) -> SQS buffer -> sink -> `trace_alerts`, with correlation
state in Postgres data.

Three ranges of 10 blocks hold hand-made ERC-20 transfers (the devnet's traffic has no
controlled big-move-then-exchange pattern); members: `big` (a transfer of TOKEN above 1000)
and `to_exchange` (a transfer to EXCHANGE), correlated by the sender, within 10 blocks:

    alice  big at 2 and 3, to_exchange at 11 and 12   -> one firing (window 2..11)
    bob    big at 5, to_exchange at 16                -> none (16 is past 5..14): a timeout
    carol  big at 14, to_exchange at 15               -> one firing
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa

from tests.alerts.conftest import webhook
from tests.conftest import MotoS3Server, NewDatabase
from tests.derived.conftest import aws_env  # noqa: F401
from trace_assets.alerts.assets import evaluate_partition
from trace_assets.alerts.backtest import backtest
from trace_assets.alerts.composite import aggregate, backtest_composite
from trace_assets.alerts.scope import AlertScope
from trace_resources import event_history
from trace_resources.alert_pipeline.composite import CompositeEvent, EvaluatedRange
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.alert_pipeline.rules import RuleError, RuleStore, StoredRule, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.registry import arrow_schema, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage import triggers as trigger_table
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.history import CORRELATION_TAG
from trace_resources.storage.state import engine_for
from trace_resources.triggers import CompositeTrigger, parse_triggers
from trace_sensors.triggers import build_composite_sensor

SCHEMA = arrow_schema(declarations()["erc20_transfers"])
TOKEN = "0x" + "70" * 20
EXCHANGE = "0x" + "ee" * 20
ALICE, BOB, CAROL, OTHER = ("0x" + c * 20 for c in ("a1", "b0", "c0", "99"))
KEYS = ["000000000000-000000000009", "000000000010-000000000019", "000000000020-000000000029"]
# (block, sender, receiver, amount)
TRANSFERS = [
    (2, ALICE, OTHER, 5000),
    (3, ALICE, OTHER, 7000),
    (5, BOB, OTHER, 5000),
    (11, ALICE, EXCHANGE, 10),
    (12, ALICE, EXCHANGE, 20),
    (14, CAROL, OTHER, 9000),
    (15, CAROL, EXCHANGE, 1),
    (16, BOB, EXCHANGE, 5),
]
_counter = itertools.count()


def transfers(rows: list[tuple[int, str, str, int]]) -> pa.Table:
    def raw(address: str) -> bytes:
        return bytes.fromhex(address[2:])

    columns: dict[str, list[Any]] = {
        "chain_id": [10143] * len(rows),
        "block_number": [b for b, *_ in rows],
        "block_timestamp": [1_700_000_000 + b for b, *_ in rows],
        "transaction_hash": [bytes([i + 1]) * 32 for i in range(len(rows))],
        "transaction_index": [0] * len(rows),
        "log_index": [0] * len(rows),
        "token": [raw(TOKEN)] * len(rows),
        "from_address": [raw(s) for _, s, _, _ in rows],
        "to_address": [raw(r) for _, _, r, _ in rows],
        "value_binary": [v.to_bytes(32, "big") for *_, v in rows],
        "value_string": [str(v) for *_, v in rows],
    }
    return pa.table(columns, schema=SCHEMA)


def in_range(key: str) -> list[tuple[int, str, str, int]]:
    first = int(key.split("-")[0])
    return [t for t in TRANSFERS if first <= t[0] <= first + 9]


class Chain:
    """Committed ranges of erc20_transfers (and empty native_transfers) in a fresh state."""

    def __init__(self, state: StateStoreResource, objects: ObjectStoreResource) -> None:
        self.state, self.objects = state, objects

    @property
    def reader(self) -> DatasetReader:
        return self.state.reader(self.objects)

    def commit(self, key: str, rows: list[tuple[int, str, str, int]]) -> None:
        native = arrow_schema(declarations()["native_transfers"]).empty_table()
        with self.state.writer(self.objects) as writer:
            writer.write("erc20_transfers", key, PartitionData(transfers(rows)))
            writer.write("native_transfers", key, PartitionData(native))


@pytest.fixture(scope="module")
def chain(
    aws_env: None,  # noqa: F811
    new_database: NewDatabase,
    s3_server: MotoS3Server,
) -> Chain:
    bucket = f"trace-composite-{os.getpid()}-{next(_counter)}"
    s3_server.s3_client().create_bucket(Bucket=bucket)
    objects = ObjectStoreResource(
        kind="s3",
        endpoint_url=s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        bucket_datasets=bucket,
    )
    state = StateStoreResource(dsn=new_database(f"composite_{os.getpid()}", "state"))
    out = Chain(state, objects)
    for key in KEYS:
        out.commit(key, in_range(key))
    return out


def composite_rule(rule_id: str, op: str, **extra: Any) -> dict[str, Any]:
    return {
        "org": "acme",
        "id": rule_id,
        "condition": {
            "kind": "composite",
            "op": op,
            "key": "from_address",
            "window_blocks": 10,
            "members": [
                {
                    "name": "big",
                    "condition": {
                        "kind": "erc20_transfer_above",
                        "token": TOKEN,
                        "threshold": "1000",
                    },
                },
                {
                    "name": "to_exchange",
                    "condition": {
                        "kind": "watched_addresses",
                        "addresses": [EXCHANGE],
                        "datasets": ["erc20_transfers"],
                    },
                    "key": "from_address",
                },
            ],
            **extra,
        },
        "channels": [webhook("hook", "http://127.0.0.1:9/hook")],
    }


class Pipeline:
    """Evaluate ranges as the `alert_evaluations` asset does; drain the buffer to Postgres."""

    def __init__(self, chain: Chain, engine: sa.Engine, resource: AlertsResource) -> None:
        self.chain, self.engine, self.resource = chain, engine, resource
        self.sink = Sink(resource.buffer(), engine, batch=100)

    def evaluate(self, *keys: str) -> None:
        rules = self.resource.rules().latest(enabled_only=True)
        scope = AlertScope(self.chain.state.dsn)
        for key in keys:
            evaluate_partition(key, rules, self.chain.reader, scope, self.resource)
        while self.sink.cycle(wait_s=1):
            pass

    def stored(self, kind: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT dedupe_key, payload FROM trace_alerts WHERE kind = :k"),
                {"k": kind},
            ).all()
        return {r.dedupe_key: r.payload for r in rows}

    def standing(self, outcome: str = "fired") -> dict[str, dict[str, Any]]:
        """The alerts standing (raised and not retracted), by dedupe_key."""
        retracted = set(self.stored("retraction"))
        return {
            k: p
            for k, p in self.stored("alert").items()
            if f"retract:{k}" not in retracted and p.get("outcome") == outcome
        }


@pytest.fixture
def pipeline(
    chain: Chain, engine: sa.Engine, data_dsn: str, s3_server: MotoS3Server, queue_name: str
) -> Iterator[Pipeline]:
    SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url)
    resource = AlertsResource(
        data_dsn=data_dsn, sqs_endpoint_url=s3_server.endpoint_url, queue=queue_name
    )
    yield Pipeline(chain, engine, resource)


def by_key(alerts: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for payload in alerts.values():
        counts[payload["correlation_key"]] = counts.get(payload["correlation_key"], 0) + 1
    return counts


def test_all_of_fires_once_per_key_and_a_recommit_without_a_retracts_it(
    pipeline: Pipeline, chain: Chain
) -> None:
    store = RuleStore(pipeline.engine)
    stored = store.create(parse_rule(composite_rule("pair", "all_of")))

    pipeline.evaluate(KEYS[0], KEYS[1])
    fired = pipeline.standing()
    assert by_key(fired) == {ALICE: 1, CAROL: 1}
    alice = next(p for p in fired.values() if p["correlation_key"] == ALICE)
    assert alice["window"] == [2, 11]
    assert [e["block_number"] for e in alice["row"]["events"]] == [2, 11]
    assert alice["source_ranges"] == KEYS[:2]

    # evaluating the same committed ranges again publishes nothing new
    before = set(pipeline.stored("alert"))
    pipeline.evaluate(KEYS[1], KEYS[0])
    assert set(pipeline.stored("alert")) == before
    live = {
        k: (p["correlation_key"], p["window"], p["outcome"]) for k, p in pipeline.standing().items()
    }
    backtest = backtest_composite(chain.reader, stored, KEYS[:2])
    assert {
        m.dedupe_key: (m.payload["correlation_key"], m.payload["window"], m.payload["outcome"])
        for m in backtest
    } == live

    # range 0 re-committed without alice's big transfers: her firing is retracted, once
    chain.commit(KEYS[0], [t for t in in_range(KEYS[0]) if t[1] != ALICE])
    try:
        pipeline.evaluate(KEYS[0])
        retractions = pipeline.stored("retraction")
        alice_key = next(k for k, p in fired.items() if p["correlation_key"] == ALICE)
        assert set(retractions) == {f"retract:{alice_key}"}
        assert retractions[f"retract:{alice_key}"]["partition_key"] == KEYS[0]
        assert by_key(pipeline.standing()) == {CAROL: 1}
        # the backtest over the committed history now agrees with the live state
        backtest = backtest_composite(chain.reader, stored, KEYS[:2])
        assert {m.dedupe_key for m in backtest} == set(pipeline.standing())
    finally:
        chain.commit(KEYS[0], in_range(KEYS[0]))  # the module's other tests see the original


def test_sequence_timeout_fires_when_b_never_follows_within_the_window(
    pipeline: Pipeline, chain: Chain
) -> None:
    store = RuleStore(pipeline.engine)
    stored = store.create(parse_rule(composite_rule("follow", "sequence", timeout=True)))

    pipeline.evaluate(KEYS[0])
    # bob's window (blocks 5..14) is not past yet: no timeout before its blocks are committed
    assert pipeline.standing("timeout") == {}
    pipeline.evaluate(KEYS[1], KEYS[2])
    timeouts = pipeline.standing("timeout")
    assert by_key(timeouts) == {BOB: 1}
    [bob] = timeouts.values()
    assert "to_exchange did not follow big at block 5 within 10 blocks" in bob["text"]
    assert bob["partition_key"] == KEYS[1]
    assert by_key(pipeline.standing()) == {ALICE: 1, CAROL: 1}
    expected = {**pipeline.standing(), **timeouts}
    assert {m.dedupe_key for m in backtest_composite(chain.reader, stored, KEYS)} == set(expected)
    # `trace alerts backtest` reports the same firings
    report = backtest(
        stored.rule,
        chain.reader,
        AlertScope(chain.state.dsn),
        KEYS,
        default_rate_per_s=10,
        version=stored.version,
    )
    assert (report.alerts_raised, report.distinct_alerts) == (3, 3)
    assert {e["dedupe_key"] for e in report.examples} == set(expected)


def _tick(
    trigger: CompositeTrigger, chain: Chain, pipeline: Pipeline, cursor: str | None
) -> dg.SensorResult:
    """One tick of the trigger's sensor, as Dagster's daemon runs it, on the real state."""
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        cursor=cursor,
        resources={"state": chain.state, "alerts": pipeline.resource},
    )
    result = build_composite_sensor(trigger)(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_a_composite_rule_as_a_run_trigger_requests_one_run_per_firing(
    pipeline: Pipeline, chain: Chain
) -> None:
    def declared(name: str, rule: str, **extra: str) -> dict[str, str]:
        entry = {"name": name, "kind": "composite", "org": "acme", "rule": rule}
        return {**entry, "job": "retention_gc_job", **extra}

    pair, timeouts, absent = parse_triggers(
        json.dumps(
            [
                declared("pair-run", "pair-run"),
                declared("follow-timeout", "follow-run", outcome="timeout"),
                declared("nothing", "absent"),
            ]
        )
    )
    assert isinstance(pair, CompositeTrigger) and isinstance(timeouts, CompositeTrigger)
    assert isinstance(absent, CompositeTrigger)
    # a rule that does not exist: the tick says so and what to do, and requests nothing
    skipped = _tick(absent, chain, pipeline, None)
    assert not skipped.run_requests
    assert "acme has no alert rule 'absent'" in str(skipped.skip_reason)

    store = RuleStore(pipeline.engine)
    store.create(parse_rule(composite_rule("pair-run", "all_of")))
    store.create(parse_rule(composite_rule("follow-run", "sequence", timeout=True)))
    pipeline.evaluate(*KEYS)

    first = _tick(pair, chain, pipeline, None)
    assert [
        (r.job_name, r.tags["trace/correlation_key"], r.tags["trace/window"])
        for r in first.run_requests
    ] == [("retention_gc_job", ALICE, "2-11"), ("retention_gc_job", CAROL, "14-23")]
    fired = {p["correlation_key"]: k for k, p in pipeline.standing().items()}
    assert [r.tags["trace/firing"] for r in first.run_requests] == [fired[ALICE], fired[CAROL]]
    # the tick was lost (its cursor not stored): the same run keys, which Dagster runs once
    again = _tick(pair, chain, pipeline, None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    # stored: the next tick records them; a restarted sensor requests nothing more
    assert _tick(pair, chain, pipeline, first.cursor).run_requests == []
    assert _tick(pair, chain, pipeline, None).run_requests == []
    # each firing is the origin of its run's work (message history), recorded once
    correlation_id = first.run_requests[0].tags[CORRELATION_TAG]
    hops = event_history.read_hops([engine_for(chain.state.dsn)], correlation_id)
    assert [(h.hop, h.org, h.details["firing"]) for h in hops] == [
        ("composite.fired", "acme", fired[ALICE])
    ]

    # outcome timeout: bob's big transfer that no transfer to the exchange followed
    late = _tick(timeouts, chain, pipeline, None)
    assert [
        (r.tags["trace/composite_outcome"], r.tags["trace/correlation_key"], r.tags["trace/window"])
        for r in late.run_requests
    ] == [("timeout", BOB, "5-14")]

    # range 0 re-committed without alice's big transfers: her firing is retracted; the run
    # requested for it is not undone, the retraction is recorded once, nothing new requested
    chain.commit(KEYS[0], [t for t in in_range(KEYS[0]) if t[1] != ALICE])
    try:
        pipeline.evaluate(KEYS[0])
        assert _tick(pair, chain, pipeline, None).run_requests == []
        seen = trigger_table.seen_objects(engine_for(chain.state.dsn), "pair-run")
        assert {key for key, version in seen if version == "retracted"} == {fired[ALICE]}
    finally:
        chain.commit(KEYS[0], in_range(KEYS[0]))  # the module's other tests see the original


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"op": "n_of_m"}, "`n_of_m` needs `n` between 1 and the number of members"),
        ({"op": "all_of", "n": 2}, "`n` applies to op `n_of_m` only"),
        ({"key": "block_number"}, "condition.composite.key"),
        ({"window_blocks": 0}, "condition.composite.window_blocks"),
        ({"key": ["from_address", "from_address"]}, "a key is 1 to 4 different columns"),
        (
            {"key": ["token", "from_address"]},  # the watched member keeps one column
            "keys of different widths never correlate",
        ),
    ],
)
def test_bad_composite_rules_are_refused_with_the_field(
    change: dict[str, Any], message: str
) -> None:
    data = composite_rule("bad", "all_of")
    data["condition"] = {**data["condition"], **change}
    with pytest.raises(RuleError, match=message.replace("`", ".")):
        parse_rule(data)


def test_a_compound_key_correlates_on_every_column_of_it(pipeline: Pipeline) -> None:
    """[token, from_address]: the same sender of the same token (all transfers here are of
    TOKEN, so the same firings as by sender, under keys that name both)."""
    rule = composite_rule("pair-token", "all_of", key=["token", "from_address"])
    rule["condition"]["members"][1]["key"] = ["token", "from_address"]
    RuleStore(pipeline.engine).create(parse_rule(rule))
    pipeline.evaluate(KEYS[0], KEYS[1])
    fired = pipeline.standing()
    assert by_key(fired) == {f"{TOKEN}|{ALICE}": 1, f"{TOKEN}|{CAROL}": 1}
    assert all(f"for token+from_address {TOKEN}|" in p["text"] for p in fired.values())


def _event(block: int, member: str, index: int, key: str, ts: int) -> CompositeEvent:
    event = {
        "member": member,
        "member_index": index,
        "key": key,
        "block_number": block,
        "transaction_index": 0,
        "log_index": 0,
        "timestamp": ts,
    }
    return CompositeEvent(KEYS[0], f"{member}@{block}", member, block, event)


def test_n_of_m_counts_distinct_members_and_a_seconds_window_narrows_it() -> None:
    """The aggregation alone (a pure function): 2 of 3 members within 5 blocks and 20 s."""
    rule = composite_rule("two", "n_of_m", n=2, window_blocks=5, window_s=20, timeout=True)
    third = {"name": "c", "condition": {"kind": "watched_addresses", "addresses": [OTHER]}}
    rule["condition"]["members"].append(third)
    stored = StoredRule(parse_rule(rule), 1)
    events = [
        _event(1, "big", 0, ALICE, 100),
        _event(2, "big", 0, ALICE, 101),  # the same member again: still one of two
        _event(3, "c", 2, ALICE, 102),  # second distinct member: fires
        _event(1, "big", 0, BOB, 100),
        _event(4, "c", 2, BOB, 130),  # within 5 blocks but 30 s later: times out instead
    ]
    ranges = [EvaluatedRange(KEYS[0], 0, 9)]
    out = aggregate(stored, events, ranges)
    assert [(m.payload["correlation_key"], m.payload["outcome"]) for m in out] == [
        (ALICE, "fired"),
        (BOB, "timeout"),  # big at 1: nothing else within 20 s
        (BOB, "timeout"),  # c at 4 opened a window of its own; blocks 4..8 passed alone
    ]
    assert [m.payload["window"] for m in out] == [[1, 5], [1, 5], [4, 8]]
    # decided at: the completing event, the event past 20 s, the window's last block
    assert [m.payload["row"]["block_number"] for m in out] == [3, 4, 8]
    # deterministic: the same events in another order give the same keys
    assert [m.dedupe_key for m in aggregate(stored, events[::-1], ranges)] == [
        m.dedupe_key for m in out
    ]
