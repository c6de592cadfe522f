"""Sustained live traffic on an interval-mining anvil devnet, with alerting transactions on demand.

Usage::

    anvil --chain-id 10143 --block-time 0.3 --port 28545 --silent &
    python -m infra.devnet.load --rpc http://127.0.0.1:28545 --tps 400 --seconds 600 \\
        [--accounts 256] [--tokens 2] [--anvil-pid PID] [--alerts-every 5]

or ``--spawn-anvil`` instead of ``--rpc`` to start (and stop) an anvil with ``--block-time``
here. From Python::

    with DevnetLoad(url, tps=400) as load:
        alert = load.inject_native()            # a native transfer to load.watched_address
        big = load.inject_erc20()               # an ERC-20 transfer above load.alert_threshold
        load.wait_included(alert, timeout=5)
        alert.block_number, alert.sent_at       # receipt's block, wall clock before sending
        load.finalized_seen_at(alert.block_number)  # wall clock when that block was finalized
    stats = load.stats()

What it does
------------
Unlike :mod:`infra.devnet.generate` (which mines each block itself and checks every receipt
against a model), this runs against a node that mines on its own (``--block-time``), like a
live chain, and only keeps the send rate:

* Set-up: ``anvil_autoImpersonateAccount(true)``, ``anvil_setBalance`` for ``accounts`` load
  accounts, a deployer and an alert sender (addresses from :func:`derive_address`, no keys),
  ``tokens`` TraceToken deployments, then ``batchTransfer`` s of a large balance of each token
  to every load account and to the alert sender. It waits for the node to mine these.
* A sender thread sends ``tps`` transactions per second with batched ``eth_sendTransaction``
  every ``tick`` seconds (the deficit against ``tps * elapsed``, so the rate stays steady
  whatever a batch costs). Senders go round-robin over the accounts, nonces are kept here,
  gas and fees are explicit. Mix: ERC-20 ``transfer`` (one Transfer log), ``batchTransfer`` to
  2-3 recipients (one Transfer log each) and native transfers, all between load accounts and
  for amounts far below ``alert_threshold``, so that only injected transactions are alerting.
  Balances are large enough for hours of traffic, so no balance model is needed.
* A watcher thread polls ``eth_blockNumber`` every ``poll_interval`` seconds and records, for
  each new block, the wall-clock time the head was first seen and its transaction count; it
  also fetches the receipts of injected transactions to record the block they landed in.
* ``inject_native`` / ``inject_erc20`` send one alerting transaction at once from the alert
  sender (a higher priority fee than the load, so it is in the next block) and return an
  :class:`AlertTx` whose ``block_number`` the watcher fills in from the receipt.

``stop`` (or leaving the ``with`` block) stops and joins both threads and closes the
connections; transactions already sent stay in the node's mempool and are mined as usual.

Measured on the 2-core dev machine (shared with other test runs), anvil 1.7.1 ``--block-time
0.3``: 400 tx/s for 600 s gave 1,990 blocks, tx/block p50 120, p1 100, p5 117 (10 blocks under
100), block interval p50 300 ms, p95 329 ms; CPU: this process 8.6 % of a core, anvil 4.7 %.
Alerting transactions were in the next block (send -> head seen p50 161 ms, max 329 ms). Anvil
stalls once its chain holds ~114.7k and ~229.4k transactions (7/8 of 2^17 and 2^18: 0.95 s and
1.8 s without a block, then a catch-up block) and its memory grows by ~3.5 MB/s at this rate.
One sending connection tops out near 3,500 tx/s (anvil 40 %, this process 12 %); above ~15M
gas a block (anvil's default 30M limit / 2) the base fee climbs every block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from infra.devnet.compile import DevnetToolError, load_artifact
from infra.devnet.generate import (
    DEFAULT_CHAIN_ID,
    ETHER,
    FINALITY_DEPTH,
    GAS_BATCH_BASE,
    GAS_BATCH_PER_RECIPIENT,
    GAS_DEPLOY,
    GAS_NATIVE,
    GAS_TRANSFER,
    GWEI,
    KNOWN_SELECTORS,
    TRANSFER_TOPIC,
    GeneratorError,
    PlannedTx,
    Rpc,
    RpcError,
    _check_chain,
    _tx_request,
    _word_addr,
    _word_uint,
    derive_address,
    encode_batch_transfer,
    encode_constructor,
)

log = logging.getLogger(__name__)

ACCOUNT_BALANCE = 10**9 * ETHER  # native balance of every account (anvil_setBalance)
TOKEN_DECIMALS = 18
ACCOUNT_TOKENS = 10**24  # each load account's balance of each token
ALERTER_TOKENS = 10**33  # the alert sender's balance of each token
DEFAULT_ALERT_THRESHOLD = 10**24  # ERC-20 transfers above this (raw units) are alerting
LOAD_MAX_ERC20 = 10**18  # load ERC-20 amounts are in [1, this]: never alerting
LOAD_MAX_NATIVE = ETHER
DISTRIBUTE_CHUNK = 100  # recipients per set-up batchTransfer
SETUP_TIMEOUT = 60.0
# Fees: a max fee far above anvil's base fee (which rises 12.5 % a block while blocks are more
# than half full), a priority fee of 1 gwei for the load and 10 gwei for alerting transactions,
# so that they are first in their block.
LOAD_FEE_WEI = 1000 * GWEI
ALERT_FEE_WEI = 2 * LOAD_FEE_WEI
ALERT_PRIORITY_WEI = 10 * GWEI
# Traffic mix (relative weights per transaction).
LOAD_MIX: tuple[tuple[str, int], ...] = (("transfer", 55), ("batch", 10), ("native", 35))
MAX_CONSECUTIVE_FAILURES = 5
WARMUP_BLOCKS = 3  # blocks after the load starts that stats() leaves out


class LoadError(RuntimeError):
    """The node is not suitable, the set-up failed, or a load thread died."""


@dataclass
class AlertTx:
    """One injected alerting transaction; the watcher fills in the receipt fields."""

    kind: str  # "native" | "erc20"
    tx_hash: str
    sender: str
    to: str  # the recipient (the watched address by default)
    token: str | None  # the ERC-20 contract, None for a native transfer
    value: int  # wei or raw token units
    sent_at: float  # wall clock (time.time()) just before the transaction was sent
    block_number: int | None = None  # from the receipt
    status: int | None = None  # receipt status (1 = success)
    block_seen_at: float | None = None  # wall clock when the watcher first saw that head
    _included: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}


@dataclass
class LoadStats:
    """What the load achieved; the block figures leave out the first WARMUP_BLOCKS blocks."""

    seconds: float
    tps_target: float
    sent: int  # transactions sent (a failed batch counts too: some of it may have landed)
    send_rate: float
    send_errors: int
    blocks: int
    first_block: int | None
    last_block: int | None
    tx_per_block_p50: float | None
    tx_per_block_min: int | None
    tx_per_block_max: int | None
    tx_per_block_mean: float | None
    block_interval_p50: float | None  # seconds between new heads, by the watcher's clock
    block_interval_p95: float | None
    block_interval_max: float | None
    skipped_heads: int  # blocks that appeared two or more at once between two polls
    max_pending: int  # largest txpool pending + queued seen (sampled once a second)
    alerts: int
    alerts_included: int
    load_cpu_seconds: float  # this process (all threads) during the load
    load_cpu_percent: float  # of one core
    anvil_cpu_seconds: float | None
    anvil_cpu_percent: float | None

    def one_line(self) -> str:
        return (
            f"{self.sent} txs sent in {self.seconds:.1f}s ({self.send_rate:.0f}/s, target "
            f"{self.tps_target:.0f}, {self.send_errors} errors); {self.blocks} blocks: tx/block "
            f"p50 {self.tx_per_block_p50} min {self.tx_per_block_min} max "
            f"{self.tx_per_block_max}; interval p50 {_ms(self.block_interval_p50)} p95 "
            f"{_ms(self.block_interval_p95)} max {_ms(self.block_interval_max)}; CPU load "
            f"{self.load_cpu_percent:.0f}% anvil "
            f"{'-' if self.anvil_cpu_percent is None else f'{self.anvil_cpu_percent:.0f}%'}"
        )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class DevnetLoad:
    """Sustained ERC-20 + native traffic on a live (interval-mining) anvil; see the module doc.

    ``rpc_url``: the anvil JSON-RPC URL. ``tps``: transactions per second to send (block time
    0.3 s and 100 tx/block = 333 tps). ``accounts``: load senders (round-robin). ``tokens``:
    TraceToken deployments. ``tick``: seconds between send batches (smaller spreads the
    transactions more evenly over the blocks). ``watched_address``: the recipient of alerting
    transactions (default derived from ``seed``). ``alert_threshold``: load ERC-20 amounts stay
    far below it, ``inject_erc20`` sends above it. ``anvil_pid``: only to report anvil's CPU.
    """

    def __init__(
        self,
        rpc_url: str,
        tps: float = 400.0,
        *,
        accounts: int = 256,
        tokens: int = 2,
        seed: int = 11,
        chain_id: int = DEFAULT_CHAIN_ID,
        tick: float = 0.05,
        poll_interval: float = 0.02,
        max_batch: int = 1000,
        watched_address: str | None = None,
        alert_threshold: int = DEFAULT_ALERT_THRESHOLD,
        anvil_pid: int | None = None,
    ) -> None:
        if tps < 0 or accounts < 2 or tokens < 1 or tick <= 0 or poll_interval <= 0:
            raise ValueError("need tps >= 0, accounts >= 2, tokens >= 1, tick and poll > 0")
        if alert_threshold < LOAD_MAX_ERC20:
            raise ValueError(f"alert_threshold must be >= {LOAD_MAX_ERC20} (the largest load)")
        self.rpc_url = rpc_url
        self.tps = float(tps)
        self.chain_id = chain_id
        self.tick = tick
        self.poll_interval = poll_interval
        self.max_batch = max_batch
        self.alert_threshold = alert_threshold
        self.anvil_pid = anvil_pid
        self.addresses = [derive_address(seed, f"load:{i}") for i in range(accounts)]
        self.deployer = derive_address(seed, "load-deployer")
        self.alerter = derive_address(seed, "load-alerter")
        self.watched_address = (watched_address or derive_address(seed, "watched")).lower()
        self.n_tokens = tokens
        self.token_addresses: list[str] = []
        self._rng = random.Random(seed)
        self._nonces: list[int] = []
        self._alerter_nonce = 0
        self._kinds = [k for k, _ in LOAD_MIX]
        self._weights = [w for _, w in LOAD_MIX]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards the fields below and the alert connection
        self._alert_rpc: Rpc | None = None
        self._alerts: list[AlertTx] = []
        self._heads: dict[int, tuple[float, float, int]] = {}  # n -> (wall, monotonic, tx_count)
        self._start_block: int | None = None
        self._skipped = 0
        self._max_pending = 0
        self._sent = 0
        self._send_errors = 0
        self._error: BaseException | None = None
        self._t0 = 0.0
        self._t_end: float | None = None
        self._cpu0 = 0.0
        self._cpu_end: float | None = None
        self._anvil_cpu0: float | None = None
        self._anvil_cpu_end: float | None = None
        artifact = load_artifact("TraceToken")
        ids = artifact["methodIdentifiers"]
        for sig, sel in KNOWN_SELECTORS.items():
            if ids.get(sig) != sel:
                raise LoadError(f"selector mismatch for {sig}: build has {ids.get(sig)}")
        if artifact.get("eventTopics", {}).get("Transfer(address,address,uint256)") != (
            TRANSFER_TOPIC
        ):
            raise LoadError("unexpected Transfer topic in the TraceToken build json")
        self._bytecode = str(artifact["bytecode"])
        self._sel_transfer = ids["transfer(address,uint256)"]
        self._sel_batch = ids["batchTransfer(address[],uint256[])"]

    # ----------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(raise_error=exc is None)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        """Set up accounts and tokens (waits for them to be mined), then start the threads."""
        if self._threads:
            raise LoadError("already started")
        rpc = Rpc(self.rpc_url, timeout=30.0)
        try:
            self._setup(rpc)
        except GeneratorError as exc:
            raise LoadError(f"load set-up failed: {exc}") from exc
        finally:
            rpc.close()
        self._alert_rpc = Rpc(self.rpc_url, timeout=30.0)
        self._stop.clear()
        self._t0 = time.monotonic()
        self._cpu0 = time.process_time()
        self._anvil_cpu0 = self._anvil_cpu()
        self._threads = [
            threading.Thread(target=self._guard(self._watch), name="devnet-load-watch"),
            threading.Thread(target=self._guard(self._send), name="devnet-load-send"),
        ]
        for t in self._threads:
            t.start()
        log.info("load started: %.0f tx/s from %d accounts", self.tps, len(self.addresses))

    def stop(self, raise_error: bool = True) -> LoadStats:
        """Stop and join the threads, close the connections; raise if a thread failed."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
            if t.is_alive():  # pragma: no cover - a hung RPC call longer than its timeout
                raise LoadError(f"thread {t.name} did not stop")
        with self._lock:
            if self._alert_rpc is not None:
                self._alert_rpc.close()
                self._alert_rpc = None
        if self._t_end is None and self._threads:
            self._t_end = time.monotonic()
            self._cpu_end = time.process_time()
            self._anvil_cpu_end = self._anvil_cpu()
        if raise_error and self._error is not None:
            raise LoadError(f"the load failed: {self._error!r}") from self._error
        return self.stats()

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                log.exception("%s failed", threading.current_thread().name)
                self._error = exc
                self._stop.set()

        return run

    def _anvil_cpu(self) -> float | None:
        if self.anvil_pid is None:
            return None
        try:
            return process_cpu_seconds(self.anvil_pid)
        except (OSError, ValueError, IndexError):
            return None

    # ----------------------------------------------------------------------- set-up
    def _setup(self, rpc: Rpc) -> None:
        _check_chain(rpc, self.chain_id)
        everyone = [*self.addresses, self.deployer, self.alerter]
        rpc.batch(
            [("anvil_autoImpersonateAccount", [True])]
            + [("anvil_setBalance", [a, hex(ACCOUNT_BALANCE)]) for a in everyone]
        )
        counts = rpc.batch([("eth_getTransactionCount", [a, "pending"]) for a in everyone])
        nonces = [int(c, 16) for c in counts]
        self._nonces = nonces[: len(self.addresses)]
        deployer_nonce, self._alerter_nonce = nonces[-2], nonces[-1]
        supply = len(self.addresses) * ACCOUNT_TOKENS + ALERTER_TOKENS
        deploys = []
        for k in range(self.n_tokens):
            data = "0x" + self._bytecode[2:]
            data += encode_constructor(f"Load Token {k}", f"LT{k}", TOKEN_DECIMALS, supply)
            tx = PlannedTx("deploy", 0, None, 0, data, GAS_DEPLOY, [])
            deploys.append(self._request(tx, self.deployer, deployer_nonce, LOAD_FEE_WEI))
            deployer_nonce += 1
        receipts = self._mine(rpc, [("eth_sendTransaction", [r]) for r in deploys])
        self.token_addresses = [r["contractAddress"].lower() for r in receipts]
        recipients = [*self.addresses, self.alerter]
        amounts = [ACCOUNT_TOKENS] * len(self.addresses) + [ALERTER_TOKENS]
        calls = []
        for token in self.token_addresses:
            for i in range(0, len(recipients), DISTRIBUTE_CHUNK):
                chunk = recipients[i : i + DISTRIBUTE_CHUNK]
                data = encode_batch_transfer(
                    self._sel_batch, chunk, amounts[i : i + DISTRIBUTE_CHUNK]
                )
                gas = GAS_BATCH_BASE + GAS_BATCH_PER_RECIPIENT * len(chunk)
                tx = PlannedTx("batch", 0, token, 0, data, gas, [])
                req = self._request(tx, self.deployer, deployer_nonce, LOAD_FEE_WEI)
                calls.append(("eth_sendTransaction", [req]))
                deployer_nonce += 1
        self._mine(rpc, calls)
        self._start_block = int(rpc.call("eth_blockNumber"), 16)

    def _mine(self, rpc: Rpc, calls: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
        """Send set-up transactions, wait until the node mined them all; fail on a revert."""
        hashes = rpc.batch(calls)
        deadline = time.monotonic() + SETUP_TIMEOUT
        while True:
            receipts = rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
            if all(r is not None for r in receipts):
                break
            if time.monotonic() > deadline:
                raise LoadError(
                    f"the node did not mine the set-up transactions within {SETUP_TIMEOUT:.0f}s "
                    "(start anvil with --block-time, or with automine)"
                )
            time.sleep(0.05)
        failed = [r["transactionHash"] for r in receipts if r.get("status") != "0x1"]
        if failed:
            raise LoadError(f"set-up transactions failed: {failed}")
        return list(receipts)

    def _request(self, tx: PlannedTx, sender: str, nonce: int, fee: int) -> dict[str, Any]:
        return _tx_request(tx, sender, nonce, fee, False, self.chain_id)

    # ----------------------------------------------------------------------- load
    def _plan(self) -> PlannedTx:
        rng = self._rng
        n = len(self.addresses)
        kind = rng.choices(self._kinds, self._weights)[0]
        if kind == "native":
            to = self.addresses[rng.randrange(n)]
            return PlannedTx("native", 0, to, rng.randint(1, LOAD_MAX_NATIVE), "0x", GAS_NATIVE, [])
        token = rng.choice(self.token_addresses)
        if kind == "transfer":
            to = self.addresses[rng.randrange(n)]
            data = "0x" + self._sel_transfer + _word_addr(to) + _word_uint(rng.randint(1, 10**18))
            return PlannedTx("transfer", 0, token, 0, data, GAS_TRANSFER, [])
        k = rng.randint(2, 3)
        to_list = [self.addresses[rng.randrange(n)] for _ in range(k)]
        data = encode_batch_transfer(
            self._sel_batch, to_list, [rng.randint(1, LOAD_MAX_ERC20) for _ in range(k)]
        )
        return PlannedTx(
            "batch", 0, token, 0, data, GAS_BATCH_BASE + GAS_BATCH_PER_RECIPIENT * k, []
        )

    def _send(self) -> None:
        rpc = Rpc(self.rpc_url, timeout=30.0)
        n = len(self.addresses)
        cursor = 0
        failures = 0
        try:
            t0 = time.monotonic()
            next_tick = t0
            while not self._stop.is_set():
                now = time.monotonic()
                due = int(self.tps * (now - t0)) - self._sent
                if due > self.max_batch:  # far behind: do not build an ever-growing backlog
                    t0 += (due - self.max_batch) / self.tps
                    due = self.max_batch
                if due > 0:
                    calls = []
                    for _ in range(due):
                        i = cursor % n
                        cursor += 1
                        req = self._request(
                            self._plan(), self.addresses[i], self._nonces[i], LOAD_FEE_WEI
                        )
                        self._nonces[i] += 1
                        calls.append(("eth_sendTransaction", [req]))
                    try:
                        rpc.batch(calls)
                        failures = 0
                    except GeneratorError as exc:
                        failures += 1
                        self._send_errors += 1
                        if failures >= MAX_CONSECUTIVE_FAILURES or self._stop.is_set():
                            raise
                        log.warning("send batch failed (%s); resyncing nonces", exc)
                        if not isinstance(exc, RpcError):
                            time.sleep(0.5)
                        counts = rpc.batch(
                            [("eth_getTransactionCount", [a, "pending"]) for a in self.addresses]
                        )
                        self._nonces = [int(c, 16) for c in counts]
                    self._sent += due
                next_tick += self.tick
                delay = next_tick - time.monotonic()
                if delay < 0:
                    next_tick = time.monotonic()
                elif self._stop.wait(delay):
                    break
        finally:
            rpc.close()

    # ----------------------------------------------------------------------- watcher
    def _watch(self) -> None:
        rpc = Rpc(self.rpc_url, timeout=30.0)
        try:
            last = int(rpc.call("eth_blockNumber"), 16)
            next_pool_check = 0.0
            while not self._stop.wait(self.poll_interval):
                head = int(rpc.call("eth_blockNumber"), 16)
                mono = time.monotonic()
                if head > last:
                    wall = time.time()
                    new = list(range(last + 1, head + 1))
                    counts = rpc.batch(
                        [("eth_getBlockTransactionCountByNumber", [hex(b)]) for b in new]
                    )
                    with self._lock:
                        for b, c in zip(new, counts, strict=True):
                            self._heads[b] = (wall, mono, int(c or "0x0", 16))
                        self._skipped += len(new) - 1
                    last = head
                    self._check_alerts(rpc)
                if mono >= next_pool_check:
                    next_pool_check = mono + 1.0
                    pool = rpc.call("txpool_status")
                    pending = int(pool.get("pending", "0x0"), 16)
                    pending += int(pool.get("queued", "0x0"), 16)
                    self._max_pending = max(self._max_pending, pending)
        finally:
            rpc.close()

    def _check_alerts(self, rpc: Rpc) -> None:
        with self._lock:
            waiting = [a for a in self._alerts if a.block_number is None]
        if not waiting:
            return
        receipts = rpc.batch([("eth_getTransactionReceipt", [a.tx_hash]) for a in waiting])
        for alert, receipt in zip(waiting, receipts, strict=True):
            if receipt is None:
                continue
            number = int(receipt["blockNumber"], 16)
            with self._lock:
                seen = self._heads.get(number)
                alert.block_number = number
                alert.status = int(receipt["status"], 16)
                alert.block_seen_at = seen[0] if seen else time.time()
            alert._included.set()

    # ----------------------------------------------------------------------- alerts
    def inject_native(self, value: int = ETHER, to: str | None = None) -> AlertTx:
        """Send a native transfer of ``value`` wei to ``to`` (default: the watched address)."""
        recipient = (to or self.watched_address).lower()
        tx = PlannedTx("native", 0, recipient, value, "0x", GAS_NATIVE, [])
        return self._inject("native", tx, recipient, None, value)

    def inject_erc20(
        self, value: int | None = None, to: str | None = None, token: int = 0
    ) -> AlertTx:
        """Send an ERC-20 transfer of ``value`` (default 10 x the threshold) of token number
        ``token`` to ``to`` (default: the watched address)."""
        amount = 10 * self.alert_threshold if value is None else value
        recipient = (to or self.watched_address).lower()
        address = self.token_addresses[token]
        data = "0x" + self._sel_transfer + _word_addr(recipient) + _word_uint(amount)
        tx = PlannedTx("transfer", 0, address, 0, data, GAS_TRANSFER, [])
        return self._inject("erc20", tx, recipient, address, amount)

    def _inject(self, kind: str, tx: PlannedTx, to: str, token: str | None, value: int) -> AlertTx:
        with self._lock:
            if self._alert_rpc is None:
                raise LoadError("the load is not running")
            req = self._request(tx, self.alerter, self._alerter_nonce, ALERT_FEE_WEI)
            req["maxPriorityFeePerGas"] = hex(ALERT_PRIORITY_WEI)
            sent_at = time.time()
            try:
                tx_hash = self._alert_rpc.call("eth_sendTransaction", req)
            except GeneratorError as exc:
                raise LoadError(f"could not send the alerting transaction: {exc}") from exc
            self._alerter_nonce += 1
            alert = AlertTx(kind, tx_hash.lower(), self.alerter, to, token, value, sent_at)
            self._alerts.append(alert)
        return alert

    def wait_included(self, alert: AlertTx, timeout: float = 10.0) -> AlertTx:
        """Wait until the watcher has the alerting transaction's receipt; raise on timeout."""
        if not alert._included.wait(timeout):
            raise LoadError(f"{alert.kind} alert {alert.tx_hash} not mined within {timeout}s")
        return alert

    @property
    def alerts(self) -> list[AlertTx]:
        with self._lock:
            return list(self._alerts)

    # ----------------------------------------------------------------------- heads
    def head_seen_at(self, number: int) -> float | None:
        """Wall clock when the watcher first saw block ``number`` as the head (None: not yet)."""
        with self._lock:
            seen = self._heads.get(number)
        return seen[0] if seen else None

    def finalized_seen_at(self, number: int) -> float | None:
        """Wall clock when block ``number`` became finalized (anvil: head = number + 64)."""
        return self.head_seen_at(number + FINALITY_DEPTH)

    def blocks(self) -> list[tuple[int, float, int]]:
        """(number, wall clock first seen, tx count) of every block seen since the start."""
        with self._lock:
            return [(n, wall, c) for n, (wall, _, c) in sorted(self._heads.items())]

    def stats(self) -> LoadStats:
        end = self._t_end if self._t_end is not None else time.monotonic()
        seconds = max(end - self._t0, 1e-9)
        cpu_end = self._cpu_end if self._cpu_end is not None else time.process_time()
        anvil_end = self._anvil_cpu_end if self._t_end is not None else self._anvil_cpu()
        with self._lock:
            heads = sorted(self._heads.items())
            alerts = list(self._alerts)
        start = (self._start_block or 0) + WARMUP_BLOCKS
        window = [(n, mono, c) for n, (_, mono, c) in heads if n > start]
        counts = [c for _, _, c in window]
        intervals = [
            b[1] - a[1] for a, b in zip(window, window[1:], strict=False) if b[0] == a[0] + 1
        ]
        anvil_cpu = (
            anvil_end - self._anvil_cpu0
            if anvil_end is not None and self._anvil_cpu0 is not None
            else None
        )
        load_cpu = cpu_end - self._cpu0
        return LoadStats(
            seconds=round(seconds, 3),
            tps_target=self.tps,
            sent=self._sent,
            send_rate=round(self._sent / seconds, 1),
            send_errors=self._send_errors,
            blocks=len(window),
            first_block=window[0][0] if window else None,
            last_block=window[-1][0] if window else None,
            tx_per_block_p50=statistics.median(counts) if counts else None,
            tx_per_block_min=min(counts) if counts else None,
            tx_per_block_max=max(counts) if counts else None,
            tx_per_block_mean=round(statistics.fmean(counts), 1) if counts else None,
            block_interval_p50=round(statistics.median(intervals), 4) if intervals else None,
            block_interval_p95=round(_percentile(intervals, 0.95), 4) if intervals else None,
            block_interval_max=round(max(intervals), 4) if intervals else None,
            skipped_heads=self._skipped,
            max_pending=self._max_pending,
            alerts=len(alerts),
            alerts_included=sum(a.block_number is not None for a in alerts),
            load_cpu_seconds=round(load_cpu, 2),
            load_cpu_percent=round(100 * load_cpu / seconds, 1),
            anvil_cpu_seconds=None if anvil_cpu is None else round(anvil_cpu, 2),
            anvil_cpu_percent=None if anvil_cpu is None else round(100 * anvil_cpu / seconds, 1),
        )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.devnet.load",
        description="Sustained ERC-20/native traffic on a live (interval-mining) anvil devnet.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--rpc", help="anvil JSON-RPC URL, e.g. http://127.0.0.1:8545")
    target.add_argument(
        "--spawn-anvil",
        action="store_true",
        help="start an anvil with --block-time here (stopped at the end)",
    )
    parser.add_argument("--tps", type=float, default=400.0, help="tx per second (default 400)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration (default 60)")
    parser.add_argument("--accounts", type=int, default=256, help="load senders (default 256)")
    parser.add_argument("--tokens", type=int, default=2, help="ERC-20 tokens (default 2)")
    parser.add_argument("--tick", type=float, default=0.05, help="send interval (default 0.05)")
    parser.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    parser.add_argument("--chain-id", type=int, default=DEFAULT_CHAIN_ID)
    parser.add_argument("--block-time", default="0.3", help="with --spawn-anvil (default 0.3)")
    parser.add_argument(
        "--anvil-arg",
        action="append",
        default=[],
        help="with --spawn-anvil: an extra anvil argument, e.g. --anvil-arg=--gas-limit=1e9",
    )
    parser.add_argument("--anvil-pid", type=int, help="report this anvil's CPU use")
    parser.add_argument(
        "--alerts-every",
        type=float,
        default=0.0,
        help="inject a native and an ERC-20 alerting transaction every N seconds (default: none)",
    )
    parser.add_argument("--blocks-out", metavar="PATH", help="write the per-block figures (JSON)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    node = None
    if args.spawn_anvil:
        import tempfile

        from infra.local.services import AnvilNode, free_port

        root = Path(tempfile.mkdtemp(prefix="trace-load-"))
        node = AnvilNode(
            root,
            free_port(),
            chain_id=args.chain_id,
            persist=False,
            extra_args=["--block-time", args.block_time, *args.anvil_arg],
        )
        node.start()
    try:
        url = node.url if node is not None else args.rpc
        pid = node.pid if node is not None else args.anvil_pid
        load = DevnetLoad(
            url,
            args.tps,
            accounts=args.accounts,
            tokens=args.tokens,
            seed=args.seed,
            chain_id=args.chain_id,
            tick=args.tick,
            anvil_pid=pid,
        )
        with load:
            deadline = time.monotonic() + args.seconds
            next_alert = time.monotonic() + args.alerts_every
            next_progress = time.monotonic() + 10
            while time.monotonic() < deadline and load.running:
                time.sleep(0.1)
                if args.alerts_every and time.monotonic() >= next_alert:
                    next_alert += args.alerts_every
                    load.inject_native()
                    load.inject_erc20()
                if time.monotonic() >= next_progress:
                    next_progress += 10
                    log.info("%s", load.stats().one_line())
        stats = load.stats()
        if args.blocks_out:
            Path(args.blocks_out).write_text(
                json.dumps(
                    {
                        "blocks": load.blocks(),
                        "alerts": [a.to_dict() for a in load.alerts],
                        "stats": dataclasses.asdict(stats),
                    }
                )
            )
    except (LoadError, DevnetToolError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.stop()
    print(json.dumps(dataclasses.asdict(stats)))
    print(stats.one_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
