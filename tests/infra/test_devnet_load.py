"""The live devnet load (infra.devnet.load) on a real interval-mining anvil: blocks carry ERC-20
and native transfers, injected alerting transactions record the block of their receipt, and
stopping leaves no thread or process behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from infra.devnet.generate import TRANSFER_TOPIC, Rpc
from infra.devnet.load import DevnetLoad
from infra.local.services import AnvilNode, free_port

TPS = 100.0  # 30 tx per 0.3 s block: enough to see every kind of transaction, cheap in CI
SECONDS = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_load_runs_injects_alerts_and_stops_cleanly(tmp_path: Path) -> None:
    threads_before = set(threading.enumerate())
    node = AnvilNode(tmp_path, free_port(), persist=False, extra_args=["--block-time", "0.3"])
    node.start()
    anvil_pid = node.pid
    assert anvil_pid is not None
    try:
        load = DevnetLoad(node.url, TPS, accounts=32, tokens=2, anvil_pid=anvil_pid)
        with load:
            assert load.running
            time.sleep(SECONDS / 2)
            native = load.inject_native(value=3 * 10**18)
            erc20 = load.inject_erc20()
            time.sleep(SECONDS / 2)
            load.wait_included(native, timeout=10)
            load.wait_included(erc20, timeout=10)
        assert not load.running
        stats = load.stats()

        rpc = Rpc(node.url)
        try:
            # the alerting transactions: the recorded block is the receipt's, sent before it
            for alert in (native, erc20):
                receipt = rpc.call("eth_getTransactionReceipt", alert.tx_hash)
                assert alert.block_number == int(receipt["blockNumber"], 16)
                assert alert.status == 1 and receipt["status"] == "0x1"
                assert alert.block_seen_at is not None and alert.sent_at <= alert.block_seen_at
                assert alert.to == load.watched_address
            tx = rpc.call("eth_getTransactionByHash", native.tx_hash)
            assert tx["to"].lower() == load.watched_address and int(tx["value"], 16) == 3 * 10**18
            erc20_logs = rpc.call("eth_getTransactionReceipt", erc20.tx_hash)["logs"]
            assert len(erc20_logs) == 1 and erc20_logs[0]["topics"][0] == TRANSFER_TOPIC
            assert int(erc20_logs[0]["data"], 16) == erc20.value > load.alert_threshold
            assert "0x" + erc20_logs[0]["topics"][2][-40:] == load.watched_address

            # the load itself: steady blocks with ERC-20 Transfer logs and native transfers
            assert stats.sent >= 0.9 * TPS * SECONDS and stats.send_errors == 0
            assert stats.blocks >= 20 and stats.tx_per_block_p50 is not None
            assert 20 <= stats.tx_per_block_p50 <= 40
            assert stats.alerts == stats.alerts_included == 2
            assert stats.block_interval_p50 is not None and stats.block_interval_p50 < 0.5
            assert stats.anvil_cpu_seconds is not None and stats.anvil_cpu_seconds > 0
            assert stats.first_block is not None and stats.last_block is not None
            # a block well before the alerting transactions (injected half-way)
            middle = stats.first_block + 3
            assert native.block_number is not None and middle < native.block_number - 3
            block = rpc.call("eth_getBlockByNumber", hex(middle), True)
            assert len(block["transactions"]) >= 10
            loaders = set(load.addresses)
            assert all(t["from"].lower() in loaders for t in block["transactions"])
            natives = [t for t in block["transactions"] if t["input"] == "0x" and t["to"]]
            assert natives and all(int(t["value"], 16) > 0 for t in natives)
            receipts = rpc.call("eth_getBlockReceipts", hex(middle))
            assert all(r["status"] == "0x1" for r in receipts)
            transfer_logs = [
                lg for r in receipts for lg in r["logs"] if lg["topics"][0] == TRANSFER_TOPIC
            ]
            assert transfer_logs
            assert {lg["address"].lower() for lg in transfer_logs} <= set(load.token_addresses)
            assert all(int(lg["data"], 16) < load.alert_threshold for lg in transfer_logs)
            # head times: every block seen; finalized = head + 64 is not reached in 10 s
            assert load.head_seen_at(stats.last_block) is not None
            assert load.finalized_seen_at(stats.last_block) is None
        finally:
            rpc.close()
    finally:
        node.stop()
    assert not _alive(anvil_pid)
    leaked = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not leaked, leaked
