"""What a user sees of the head tier: a transfer is queryable and alerted within a block or two
of its finalization while its range is still open, and sealing the range changes none of it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx

from infra.local.alert_workers import AlertWorkers
from infra.local.query_service import QueryServer, settings_env
from infra.local.webhook_receiver import WebhookReceiver
from tests.head.conftest import (
    FINALITY,
    SECRET,
    WATCHED,
    Chain,
    Lake,
    MakeLake,
    assert_range_matches_chain,
    snapshot,
    wait_for,
)
from tests.query.conftest import bearer, keyring_spec
from trace_resources.chain.ranges import range_containing
from trace_resources.settings import QuerySettings
from trace_resources.tokens import Keyring, issue_token


def query_service(lake: Lake, cache: Path) -> tuple[QueryServer, str]:
    """The query service (uvicorn) over the lake, and an org token for it."""
    settings = QuerySettings(
        **lake.settings.model_dump(),
        query_token_keys=keyring_spec(),
        query_token_signing_kid="k-new",
        query_cache_dir=cache,
    )
    token = issue_token(Keyring.from_settings(settings), settings, org="acme", subject="alice")[0]
    env = {**lake.env, **settings_env(settings)}
    return QueryServer(env, log_file=lake.root / "query.log"), token


def delivered(hook: WebhookReceiver) -> Counter[str]:
    return Counter(d.dedupe_key for d in hook.snapshot())


def test_a_watched_transfer_is_queryable_and_alerted_while_its_10000_block_range_is_open(
    chain: Chain, make_lake: MakeLake, tmp_path: Path
) -> None:
    lake = make_lake(10_000)
    with WebhookReceiver(SECRET) as hook, AlertWorkers(lake.env, lake.root):
        lake.rule("acme", "watch", f"{hook.url}/acme")
        follower = lake.process()
        follower.start()
        follower.wait_ready()

        tx = chain.send(WATCHED, 123_456_789)
        block = int(chain.receipt(tx)["blockNumber"], 16)
        partition = range_containing(block, 10_000)
        chain.wait_finalized(block)
        lake.wait_committed(partition.key, block)

        # the range is open: far from complete, its current version is the follower's appends
        assert chain.head("finalized") < partition.last
        record = lake.current("native_transfers", partition.key)
        assert record is not None and record.commit_mode == "append"

        server, token = query_service(lake, tmp_path / "query-cache")
        with server, httpx.Client(base_url=server.url, timeout=60) as client:
            reply = client.post(
                "/v1/query",
                json={
                    "sql": "SELECT block_number, transaction_hash, value_string, to_address "
                    f"FROM native_transfers WHERE block_number = {block}"
                },
                headers=bearer(token),
            )
        assert reply.status_code == 200, reply.text
        rows = [r for r in reply.json()["rows"] if r[3] == WATCHED]
        assert rows == [[block, tx, "123456789", WATCHED]]
        # read from the open range's current version (the follower keeps appending meanwhile)
        [(key, version)] = reply.json()["versions"]["native_transfers"].items()
        assert key == partition.key and version >= record.version

        wait_for(lambda: len(hook.snapshot()) >= 1, "the alert at the webhook", 120)
        [alert] = lake.alerts().values()
        assert alert["row"]["transaction_hash"] == tx
        assert alert["partition_key"] == partition.key
        [delivery] = hook.snapshot()
        assert delivery.alert["row"]["transaction_hash"] == tx
        assert hook.rejected == 0
        assert follower.stop() == 0


def test_sealing_a_followed_range_changes_no_row_and_resends_no_alert(
    chain: Chain, make_lake: MakeLake
) -> None:
    lake = make_lake(100)
    workers = AlertWorkers(lake.env, lake.root)
    with WebhookReceiver(SECRET) as hook:
        workers.start()
        try:
            lake.rule("acme", "watch", f"{hook.url}/acme")
            # earlier tests' transfers to WATCHED stay in ranges before the finalized head this
            # test's follower starts from (one of them once made a 4th alert)
            latest = chain.head("latest")
            fresh = range_containing(latest, 100).last + 1
            chain.mine(fresh + FINALITY + 1 - latest)
            chain.wait_finalized(fresh)
            follower = lake.process()
            follower.start()
            follower.wait_ready()
            sent = [chain.send(WATCHED, 1000 + i) for i in range(3)]
            blocks = [int(chain.receipt(tx)["blockNumber"], 16) for tx in sent]
            partition = range_containing(blocks[-1], 100)
            first = range_containing(blocks[0], 100)
            # the range of the last transfer completes (mined at once: no need to wait for
            # 64+ blocks of 0.2 s) and the follower appends all of it
            chain.mine(max(0, partition.last + FINALITY + 1 - chain.head("latest")))
            chain.wait_finalized(partition.last + 1)
            lake.wait_committed(partition.key, partition.last)
            keys = sorted({first.key, partition.key})
            before = {key: snapshot(lake, key) for key in keys}
            for key in keys:
                record = lake.current("blocks", key)
                assert record is not None and record.commit_mode == "append"
            wait_for(
                lambda: len(lake.alerts()) == 3 and len(hook.distinct_keys()) == 3,
                "3 alerts stored and delivered",
                120,
                lambda: (lake.alerts().keys(), delivered(hook)),
            )
            alerts_before = lake.alerts()

            for key in keys:
                result = lake.seal(key)
                [evaluation] = result.asset_materializations_for_node("alert_evaluations")
                meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
                assert (meta["trace/new_alerts"], meta["trace/retractions"]) == (0, 0), meta
        finally:
            workers.stop()  # the sink drains the buffer; the deliverer finishes its sends

        for key in keys:
            record = lake.current("blocks", key)
            assert record is not None and record.commit_mode == "replace"
            assert snapshot(lake, key) == before[key]
            start = int(key.split("-")[0])
            assert_range_matches_chain(lake, chain, key, start, int(key.split("-")[1]))
        assert lake.alerts() == alerts_before
        assert lake.alerts("retraction") == {}
        assert delivered(hook) == Counter({k: 1 for k in alerts_before})
        assert {a["row"]["transaction_hash"] for a in alerts_before.values()} == set(sent)
        assert follower.stop() == 0
