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
