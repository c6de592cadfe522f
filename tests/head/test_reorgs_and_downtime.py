"""Reorgs above `finalized` never reach the lake (a `safe` rule's alert on an orphaned block is
retracted), and sealing alone makes a correct range, alerted once, whether the follower ran
for none of it or for part of it."""

from __future__ import annotations

from collections import Counter

from infra.local.alert_workers import AlertWorkers
from infra.local.webhook_receiver import WebhookReceiver
from tests.head.conftest import (
    FINALITY,
    SAFETY,
    SECRET,
    WATCHED,
    Chain,
    MakeLake,
    assert_range_matches_chain,
    hexed,
    wait_for,
)
from trace_assets.head.__main__ import build_follower
from trace_resources.chain.ranges import range_containing

RANGE = 50


def delivered(hook: WebhookReceiver) -> Counter[str]:
    return Counter(d.dedupe_key for d in hook.snapshot())


def lake_hashes(lake_blocks: dict[int, str], first: int, last: int) -> dict[int, str]:
    return {n: h for n, h in lake_blocks.items() if first <= n <= last}


def test_reorgs_above_finalized_never_reach_the_lake_and_orphaned_safe_alerts_are_retracted(
    chain: Chain, make_lake: MakeLake
) -> None:
    lake = make_lake(RANGE)
    with WebhookReceiver(SECRET) as hook, AlertWorkers(lake.env, lake.root):
        lake.rule("acme", "early", f"{hook.url}/acme", confirmation="safe")
        follower = lake.process()
        follower.start()
        follower.wait_ready()

        # a shallow reorg: 10 blocks replaced, the first of them with a transaction of its own
        # (so that none of them is rebuilt identical)
        with chain.held():
            latest = chain.head("latest")
            shallow = {n: chain.block(n)["hash"] for n in range(latest - 9, latest + 1)}
            replacement = {"from": chain.accounts[7], "to": chain.accounts[6], "value": "0x7"}
            chain.rpc("anvil_reorg", [10, [[replacement, 0]]])
            assert chain.head("latest") == latest
            assert all(chain.block(n)["hash"] != h for n, h in shallow.items())

        # a watched transfer, seen at `safe` (alerted early), then orphaned by a reorg deeper
        # than 32 and shallower than 64 blocks: the transfer is in no canonical block
        tx = chain.send(WATCHED, 424_242)
        block = int(chain.receipt(tx)["blockNumber"], 16)
        chain.wait_latest(block + SAFETY + 1)
        with chain.paused():
            wait_for(
                lambda: len(hook.snapshot()) == 1,
                "the safe alert at the webhook",
                120,
                lambda: (lake.alerts(), follower.log()[-2000:]),
            )
            [(alert_key, alert)] = lake.alerts().items()
            assert alert["row"]["transaction_hash"] == tx
            assert chain.head("finalized") < block  # alerted before its block was final
            with chain.held():
                latest = chain.head("latest")
                depth = latest - block + 3  # block - 2 .. latest are replaced
                assert SAFETY < depth < FINALITY
                deep = {n: chain.block(n)["hash"] for n in range(block - 2, latest + 1)}
                other = {"from": chain.accounts[5], "to": chain.accounts[4], "value": "0x5"}
                chain.rpc("anvil_reorg", [depth, [[other, 0]]])
                assert chain.head("latest") == latest
                assert all(chain.block(n)["hash"] != h for n, h in deep.items())
        chain.mine(FINALITY)  # past both reorgs' heights
        assert chain.rpc("eth_getTransactionReceipt", [tx]) is None  # the transfer is gone

        last = chain.head("finalized")
        lake.wait_committed(range_containing(last, RANGE).key, last)
        wait_for(
            lambda: f"retract:{alert_key}" in delivered(hook),
            "the retraction at the webhook",
            120,
            lambda: (lake.alerts("retraction"), delivered(hook)),
        )
        assert follower.stop() == 0

    # the lake holds the canonical blocks at every height both reorgs touched
    first = min(*shallow, *deep)
    committed = sorted(lake.versions().read.current_versions("blocks"))
    assert first >= int(committed[0][:12])
    for key in committed:
        start, end = int(key[:12]), int(key[13:])
        if end < first or start > last:
            continue
        tip = lake.last_committed(key)
        assert tip is not None
        assert_range_matches_chain(lake, chain, key, start, tip)
        blocks = lake.read("blocks", key)
        hashes = dict(
            zip(
                blocks["block_number"].to_pylist(),
                [hexed(h) for h in blocks["block_hash"].to_pylist()],
                strict=True,
            )
        )
        assert not set(hashes.values()) & {*shallow.values(), *deep.values()}
    native = {
        hexed(h)
        for k in committed
        for h in lake.read("native_transfers", k)["transaction_hash"].to_pylist()
    }
    assert tx not in native
    [retraction] = lake.alerts("retraction").values()
    assert retraction["retracts"] == alert_key
    assert delivered(hook) == Counter({alert_key: 1, f"retract:{alert_key}": 1})


def evaluation_metadata(result: object) -> dict[str, object]:
    [evaluation] = result.asset_materializations_for_node("alert_evaluations")  # type: ignore[attr-defined]
    return {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}


def test_sealing_alone_commits_and_alerts_ranges_the_follower_missed_or_left_half_done(
    chain: Chain, make_lake: MakeLake
) -> None:
    lake = make_lake(RANGE)
    workers = AlertWorkers(lake.env, lake.root)
    with WebhookReceiver(SECRET) as hook:
        workers.start()
        try:
            lake.rule("acme", "watch", f"{hook.url}/acme")
            follower = lake.process()
            follower.start()
            follower.wait_ready()

            # a watched transfer early in a range; the follower appends and alerts it, then dies
            with chain.paused():
                while (chain.head("latest") + 1) % RANGE != 3:
                    chain.mine()
                first_tx = chain.send(WATCHED, 1)
                chain.mine()
            first_block = int(chain.receipt(first_tx)["blockNumber"], 16)
            half = range_containing(first_block, RANGE)
            lake.wait_committed(half.key, first_block)
            wait_for(lambda: len(hook.snapshot()) == 1, "the follower's alert", 120)
            follower.kill()
            appended = lake.last_committed(half.key)
            assert appended is not None and appended < half.last  # partly appended

            # a whole range passes with the follower down, with another watched transfer
            second_tx = chain.send(WATCHED, 2)
            second_block = int(chain.receipt(second_tx)["blockNumber"], 16)
            missed = range_containing(second_block, RANGE)
            assert missed.start == half.last + 1
            chain.mine(missed.last + FINALITY + 1 - chain.head("latest"))
            chain.wait_finalized(missed.last)
            assert lake.current("blocks", missed.key) is None

            sealed_half = evaluation_metadata(lake.seal(half.key))
            sealed_missed = evaluation_metadata(lake.seal(missed.key))
            # the follower's alert is standing: sealing sends nothing for it
            assert (sealed_half["trace/new_alerts"], sealed_half["trace/retractions"]) == (0, 0)
            assert (sealed_missed["trace/new_alerts"], sealed_missed["trace/retractions"]) == (1, 0)
            wait_for(lambda: len(hook.snapshot()) >= 2, "the sealed range's alert delivered", 120)
        finally:
            workers.stop()  # the sink drains the buffer; the deliverer finishes its sends

    for block_range in (half, missed):
        record = lake.current("blocks", block_range.key)
        assert record is not None and record.commit_mode == "replace"
        assert_range_matches_chain(
            lake, chain, block_range.key, block_range.start, block_range.last
        )
    alerts = lake.alerts()
    assert sorted(a["row"]["transaction_hash"] for a in alerts.values()) == sorted(
        [first_tx, second_tx]
    )
    assert {a["partition_key"] for a in alerts.values()} == {half.key, missed.key}
    assert lake.alerts("retraction") == {}
    assert delivered(hook) == Counter({key: 1 for key in alerts})


def test_a_range_sealed_under_the_follower_is_left_alone_and_it_moves_on(
    chain: Chain, make_lake: MakeLake
) -> None:
    lake = make_lake(RANGE)
    follower = build_follower(lake.settings)
    try:
        with chain.paused():  # the test decides every block
            while chain.head("finalized") % RANGE != 2:
                chain.mine()
            first = follower.cycle()  # a fresh start: the open range from its first block
            assert first.committed is not None
            sealed = range_containing(first.committed[1], RANGE)
            assert first.committed == (sealed.start, sealed.start + 2)

            # the range completes and its run seals it before the follower appends the rest
            chain.mine(RANGE + 10)
            before = lake.current("blocks", sealed.key)
            lake.seal(sealed.key)
            record = lake.current("blocks", sealed.key)
            assert before is not None and record is not None
            assert (before.commit_mode, record.commit_mode) == ("append", "replace")

            skipped = follower.cycle()
            assert (skipped.sealed_skip, skipped.committed) == (sealed.key, None)
            assert lake.current("blocks", sealed.key) == record  # nothing appended to it
            moved_on = follower.cycle()
            assert moved_on.committed is not None
            assert moved_on.committed[0] == sealed.last + 1  # the next range, from its start
        assert_range_matches_chain(lake, chain, sealed.key, sealed.start, sealed.last)
        next_key = range_containing(sealed.last + 1, RANGE).key
        assert_range_matches_chain(lake, chain, next_key, sealed.last + 1, moved_on.committed[1])
    finally:
        follower.close()
