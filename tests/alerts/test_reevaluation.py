"""Re-evaluation when a range is re-committed, end to end: evaluation through Dagster on the
committed devnet data -> SQS buffer -> sink -> Postgres -> webhook deliveries.

A second version of a range's erc20_transfers (written through the real writer) removes one
alerting transfer and corrects the amount of another: the new alert is sent, each vanished
alert gets exactly one retraction, unchanged alerts are neither stored nor delivered twice,
and every alert names the committed versions it was computed from. A third version that
restores the removed transfer raises it again as a new generation; removing it once more
retracts that generation."""

from __future__ import annotations

from collections import Counter
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from tests.alerts.conftest import Receiver, webhook
from tests.derived.conftest import Env, aws_env, derived_env, raw_env  # noqa: F401
from trace_assets.alerts.assets import alert_evaluations
from trace_assets.alerts.evaluate import generation_key
from trace_resources.alert_pipeline.delivery import Deliverer, DeliveryPolicy
from trace_resources.alert_pipeline.queue import SqsBuffer
from trace_resources.alert_pipeline.resource import AlertsResource
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule
from trace_resources.alert_pipeline.sink import Sink
from trace_resources.registry import arrow_schema, declarations
from trace_resources.storage.commit import PartitionData

SCHEMA = arrow_schema(declarations()["erc20_transfers"])
FAST = DeliveryPolicy(max_attempts=3, backoff_base_s=0.2, timeout_s=2.0, concurrency=4)


def rows(engine: sa.Engine, kind: str) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT dedupe_key, payload FROM trace_alerts WHERE kind = :k"), {"k": kind}
        ).all()
    return {r.dedupe_key: r.payload for r in found}


def with_value(table: pa.Table, index: int, value: int) -> pa.Table:
    """The table with row `index`'s amount corrected to `value`."""
    strings = table["value_string"].to_pylist()
    binaries = table["value_binary"].to_pylist()
    strings[index] = str(value)
    binaries[index] = value.to_bytes(32, "big")
    table = table.set_column(
        table.schema.get_field_index("value_string"),
        SCHEMA.field("value_string"),
        pa.array(strings, pa.string()),
    )
    return table.set_column(
        table.schema.get_field_index("value_binary"),
        SCHEMA.field("value_binary"),
        pa.array(binaries, pa.binary()),
    )


def without(table: pa.Table, index: int) -> pa.Table:
    keep = pa.array([i != index for i in range(table.num_rows)])
    return table.filter(keep)


def test_recommitted_range_sends_new_alerts_and_retracts_vanished_ones(
    derived_env: Env,  # noqa: F811
    engine: sa.Engine,
    data_dsn: str,
    s3_server: Any,
    queue_name: str,
    receiver: Receiver,
) -> None:
    env = derived_env
    versions = env.state.versions()
    # a range and token with a handful of transfers (>= 4): few alerts keep the test quick
    candidates = []
    for k in env.keys:
        table = env.reader.read("erc20_transfers", [k], SCHEMA)
        for tok, n in Counter(table["token"].to_pylist()).items():
            if n >= 4:
                candidates.append((n, k, tok))
    assert candidates, "the devnet has no range with 4 transfers of one token"
    _, key, token = min(candidates)
    v1 = env.reader.read("erc20_transfers", [key], SCHEMA)
    of_token = pc.equal(v1["token"], pa.scalar(token, pa.binary()))
    positions = [i for i, hit in enumerate(of_token.to_pylist()) if hit]
    vanish, corrected = positions[0], positions[1]

    store = RuleStore(engine)
    store.create(
        parse_rule(
            {
                "org": "acme",
                "id": "moves",
                "condition": {
                    "kind": "erc20_transfer_above",
                    "token": "0x" + token.hex(),
                    "threshold": "0",
                },
                "channels": [webhook("hook", receiver.url("/ok"), rate_per_s=1000)],
            }
        )
    )
    resources = {
        **env.resources(),
        "alerts": AlertsResource(
            data_dsn=data_dsn, sqs_endpoint_url=s3_server.endpoint_url, queue=queue_name
        ),
    }
    buffer = SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url)
    sink = Sink(buffer, engine, batch=100)
    deliverer = Deliverer(engine, FAST)

    def evaluate() -> dict[str, Any]:
        """Evaluate the range through Dagster, drain the buffer, deliver; the run's metadata."""
        result = dg.materialize(
            [alert_evaluations], instance=env.instance, resources=resources, partition_key=key
        )
        assert result.success
        while sink.cycle(wait_s=1):
            pass
        deliverer.run(until_idle=True)
        [mat] = result.asset_materializations_for_node("alert_evaluations")
        return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}

    def committed() -> dict[str, int]:
        return {
            name: versions.read.current_version_numbers(name, [key])[key]
            for name in ("erc20_transfers", "native_transfers")
        }

    def recommit(table: pa.Table) -> None:
        with env.state.writer(env.objects) as writer:
            writer.write("erc20_transfers", key, PartitionData(table))

    def delivered() -> Counter[str]:
        return Counter(receiver.keys("/ok"))

    # version 1: one alert per transfer of the token, each naming the committed versions
    first = evaluate()
    at_v1 = committed()
    alerts_v1 = rows(engine, "alert")
    assert len(alerts_v1) == len(positions) == first["trace/alerts"] == first["trace/new_alerts"]
    assert all(p["dataset_versions"] == at_v1 for p in alerts_v1.values())
    assert first["trace/dataset_versions"] == at_v1
    assert delivered() == Counter({k: 1 for k in alerts_v1})
    by_tx = {(p["row"]["transaction_hash"], p["row"]["log_index"]): k for k, p in alerts_v1.items()}

    def key_of(table: pa.Table, index: int) -> str:
        row = table.slice(index, 1).to_pylist()[0]
        return by_tx[("0x" + row["transaction_hash"].hex(), row["log_index"])]

    vanished_key, corrected_key = key_of(v1, vanish), key_of(v1, corrected)
    old_value = int(v1["value_string"][corrected].as_py())

    # version 2: one transfer removed (a reorg fix), one amount corrected
    v2 = without(with_value(v1, corrected, old_value + 1), vanish)
    recommit(v2)
    at_v2 = committed()
    assert at_v2["erc20_transfers"] == at_v1["erc20_transfers"] + 1
    second = evaluate()
    assert (second["trace/new_alerts"], second["trace/retractions"]) == (1, 2)
    alerts = rows(engine, "alert")
    [fresh] = set(alerts) - set(alerts_v1)
    assert alerts[fresh]["row"]["value_string"] == str(old_value + 1)
    assert alerts[fresh]["dataset_versions"] == at_v2
    retractions = rows(engine, "retraction")
    assert set(retractions) == {f"retract:{vanished_key}", f"retract:{corrected_key}"}
    for payload in retractions.values():
        assert payload["type"] == "retraction"
        assert payload["retracted_versions"] == at_v1  # computed from the superseded version
        assert payload["dataset_versions"] == at_v2
    # every key delivered exactly once: unchanged alerts were not sent again
    assert delivered() == Counter({k: 1 for k in [*alerts, *retractions]})

    # the same version evaluated again (a retried run): nothing new anywhere
    inserted = sink.stats.inserted
    third = evaluate()
    assert (third["trace/new_alerts"], third["trace/retractions"]) == (0, 0)
    assert sink.stats.inserted == inserted
    assert delivered() == Counter({k: 1 for k in [*alerts, *retractions]})

    # version 3 restores the removed transfer: it comes back as generation 1
    restored = pa.concat_tables([v2, v1.slice(vanish, 1)])
    recommit(restored)
    fourth = evaluate()
    assert (fourth["trace/new_alerts"], fourth["trace/retractions"]) == (1, 0)
    again = generation_key(vanished_key, 1)
    payload = rows(engine, "alert")[again]
    assert (payload["generation"], payload["base_key"]) == (1, vanished_key)
    assert payload["dataset_versions"] == committed()
    assert delivered()[again] == 1

    # version 4 removes it again: that generation is retracted, once
    recommit(v2)
    fifth = evaluate()
    assert (fifth["trace/new_alerts"], fifth["trace/retractions"]) == (0, 1)
    assert f"retract:{again}" in rows(engine, "retraction")
    assert delivered()[f"retract:{again}"] == 1
    assert max(delivered().values()) == 1
    deliverer.close()
