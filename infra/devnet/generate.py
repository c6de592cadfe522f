"""Deterministic devnet traffic generator for a fresh anvil chain.

Usage::

    anvil --chain-id 10143 --timestamp 1735689600 --port 28545 --silent &
    python -m infra.devnet.generate --rpc http://127.0.0.1:28545 \\
        [--blocks 3000] [--txs-per-block 30] [--accounts 300] [--tokens 5] [--seed 7] \\
        [--record PATH] [--finalize] [--chain-id 10143]

or, from Python, :func:`generate`.

What it does
------------
* Derives ``--accounts`` EOA addresses plus a token deployer from ``--seed`` (sha3-256 of a
  label; no keys are needed), funds them with ``anvil_setBalance`` and sends unsigned
  transactions from them through ``anvil_autoImpersonateAccount(true)`` + ``eth_sendTransaction``.
* Turns automine off and mines every block with ``evm_mine(timestamp)``; timestamps start at
  ``max(head timestamp, GENESIS_TIMESTAMP) + 1`` and grow by 1 s per block.
* Traffic: ``--tokens`` TraceToken (ERC-20) deployments in block 1, mints to a subset of the
  accounts in the next blocks, then a mix of ERC-20 transfers, ``batchTransfer`` to 2-4
  recipients (one Transfer log each), native transfers, approvals (some infinite),
  ``transferFrom`` against earlier approvals, owner mints and, now and then, a new token.
  About ``--txs-per-block`` transactions (uniform in [n/2, 3n/2], ~1 % empty blocks) and
  ~1.15 logs per transaction on average.
* Gas, fees and nonces are explicit. Transaction ``i`` of a block pays a strictly lower fee
  than transaction ``i-1``, so anvil's fee-ordered mempool puts them in the block in exactly
  the order they were built, whatever order the batched requests are handled in.
* A model of every ERC-20 balance and allowance keeps every transaction valid; balances
  credited in a block are only spent from the next block on, so the model does not depend on
  the order of the transactions inside a block. Every receipt is checked (status, position,
  logs equal to the expected logs) and the generator fails loudly on any difference.

Determinism: for a given seed and parameters, a fresh anvil started with
``--timestamp GENESIS_TIMESTAMP`` (1735689600) ends with the same block hashes every time. Without
a fixed genesis timestamp anvil's genesis hash depends on the wall clock, and so do all hashes.

``--record PATH`` writes JSON lines (``kind`` is the discriminator):

* ``meta``: parameters, chain id, accounts, deployer, timestamps.
* ``block``: block_number, block_hash, timestamp, tx_count, log_count (one per traffic block).
* ``erc20_transfer``: one per Transfer event: block_number, tx_index, log_index, tx_hash, token,
  from, to, value (decimal string), method (transfer, batchTransfer, transferFrom, mint,
  constructor).
* ``approval``: one per Approval event: block_number, tx_index, log_index, tx_hash, token, owner,
  spender, value.
* ``native_transfer``: block_number, tx_index, tx_hash, from, to, value.
* ``deployment``: block_number, tx_index, tx_hash, deployer, contract_address, name, symbol,
  decimals, initial_supply.
* ``summary``: the :class:`GenerationSummary` fields, written last.

Addresses and hashes are lower-case 0x-hex; uint256 values are decimal strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from infra.devnet.compile import DevnetToolError, load_artifact

log = logging.getLogger(__name__)

DEFAULT_CHAIN_ID = 10143  # Monad testnet
GENESIS_TIMESTAMP = 1_735_689_600  # 2025-01-01T00:00:00Z; start anvil with --timestamp <this>
FINALITY_DEPTH = 64  # anvil: finalized = latest - 64

# keccak-256 of the event signatures (also recomputed with `cast keccak` into the build json
# by infra.devnet.compile and cross-checked at start-up).
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL_TOPIC = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
# Function selectors = first 4 bytes of keccak-256(signature). The values are the well-known
# ERC-20 ones (e.g. `cast sig 'transfer(address,uint256)'` -> 0xa9059cbb); at start-up they are
# checked against solc's `methodIdentifiers` in the build json, which also provides batchTransfer.
KNOWN_SELECTORS = {
    "transfer(address,uint256)": "a9059cbb",
    "transferFrom(address,address,uint256)": "23b872dd",
    "approve(address,uint256)": "095ea7b3",
    "mint(address,uint256)": "40c10f19",
}
BATCH_TRANSFER_SIG = "batchTransfer(address[],uint256[])"

ZERO_ADDRESS = "0x" + "00" * 20
MAX_UINT256 = 2**256 - 1
GWEI = 10**9
ETHER = 10**18
ACCOUNT_BALANCE = 1_000_000 * ETHER  # set with anvil_setBalance, gas is never a concern

# Explicit gas limits (comfortably above what is used; they only matter for block packing).
GAS_NATIVE = 21_000
GAS_TRANSFER = 90_000
GAS_TRANSFER_FROM = 110_000
GAS_APPROVE = 70_000
GAS_MINT = 100_000
GAS_BATCH_BASE = 60_000
GAS_BATCH_PER_RECIPIENT = 40_000
GAS_DEPLOY = 2_000_000
BLOCK_GAS_BUDGET_FRACTION = 0.9

# Fees: tx i of a block pays BASE_FEE + (n - i) * FEE_STEP, strictly decreasing in build order.
BASE_FEE_WEI = 50 * GWEI
FEE_STEP_WEI = GWEI // 10

# Traffic mix (relative weights per transaction).
MIX: tuple[tuple[str, int], ...] = (
    ("transfer", 50),
    ("batch", 20),
    ("native", 18),
    ("approve", 6),
    ("transfer_from", 4),
    ("mint", 3),
)
EMPTY_BLOCK_PROBABILITY = 0.01
DEPLOY_PROBABILITY_PER_BLOCK = 1 / 150
INITIAL_HOLDER_FRACTION = 1 / 8
INFINITE_APPROVAL_PROBABILITY = 0.2
LEGACY_TX_PROBABILITY = 0.25
RECORD_FORMAT = 1


class GeneratorError(RuntimeError):
    """The chain is not suitable, or anvil rejected or mis-executed something."""


class RpcError(GeneratorError):
    """A JSON-RPC error response."""


@dataclass
class GenerationSummary:
    blocks: int
    first_block: int
    last_block: int
    transactions: int
    erc20_transfers: int  # Transfer logs (transfers, batch legs, transferFrom, mints, constructors)
    native_transfers: int
    deployments: int
    seconds: float
    logs: int = 0  # all logs (Transfer + Approval)
    approvals: int = 0  # Approval logs
    last_block_hash: str = ""
    head_block: int = 0  # chain head at the end (last_block + 64 with finalize)

    def one_line(self) -> str:
        rate = self.transactions / self.seconds if self.seconds else 0.0
        return (
            f"generated {self.blocks} blocks #{self.first_block}-#{self.last_block} "
            f"(head #{self.head_block}): {self.transactions} txs, {self.logs} logs "
            f"({self.erc20_transfers} ERC-20 transfers, {self.approvals} approvals), "
            f"{self.native_transfers} native transfers, {self.deployments} deployments "
            f"in {self.seconds:.1f}s ({rate:.0f} tx/s); last block hash {self.last_block_hash}"
        )


# --------------------------------------------------------------------------- JSON-RPC


class Rpc:
    """Minimal JSON-RPC client: one keep-alive HTTP connection, batches, loud errors."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url = url
        self._client = httpx.Client(
            timeout=timeout, headers={"content-type": "application/json"}, http2=False
        )
        self._next_id = 1

    def close(self) -> None:
        self._client.close()

    def _post(self, payload: Any) -> Any:
        try:
            resp = self._client.post(self.url, content=json.dumps(payload, separators=(",", ":")))
        except httpx.HTTPError as exc:
            raise GeneratorError(f"cannot reach {self.url}: {exc!r}") from exc
        if resp.status_code != 200:
            raise GeneratorError(f"HTTP {resp.status_code} from {self.url}: {resp.text[:500]}")
        return resp.json()

    def call(self, method: str, *params: Any) -> Any:
        return self.batch([(method, list(params))])[0]

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Send all calls in one request; return the results in order; raise on any error."""
        if not calls:
            return []
        first = self._next_id
        self._next_id += len(calls)
        payload = [
            {"jsonrpc": "2.0", "id": first + i, "method": m, "params": p}
            for i, (m, p) in enumerate(calls)
        ]
        body = self._post(payload if len(payload) > 1 else payload[0])
        responses = body if isinstance(body, list) else [body]
        by_id = {r.get("id"): r for r in responses if isinstance(r, dict)}
        results: list[Any] = []
        errors: list[str] = []
        for i, (method, params) in enumerate(calls):
            r = by_id.get(first + i)
            if r is None:
                errors.append(f"#{i} {method}: no response (got {str(body)[:300]})")
            elif "error" in r:
                errors.append(f"#{i} {method}({_short(params)}): {r['error']}")
            else:
                results.append(r.get("result"))
                continue
            results.append(None)
        if errors:
            more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
            raise RpcError(
                f"JSON-RPC error(s) from {self.url} in a batch of {len(calls)}: "
                + "; ".join(errors[:5])
                + more
            )
        return results


def _short(params: Any) -> str:
    text = json.dumps(params)
    return text if len(text) <= 400 else text[:400] + "..."


# --------------------------------------------------------------------------- ABI encoding


def _word_uint(value: int) -> str:
    if not 0 <= value <= MAX_UINT256:
        raise ValueError(f"uint256 out of range: {value}")
    return f"{value:064x}"


def _word_addr(address: str) -> str:
    return "0" * 24 + address[2:]


def _encode_bytes_tail(raw: bytes) -> str:
    padded = raw + b"\x00" * (-len(raw) % 32)
    return _word_uint(len(raw)) + padded.hex()


def encode_constructor(name: str, symbol: str, decimals: int, supply: int) -> str:
    """ABI-encode (string,string,uint8,uint256) without selector."""
    name_tail = _encode_bytes_tail(name.encode())
    symbol_tail = _encode_bytes_tail(symbol.encode())
    head = (
        _word_uint(4 * 32)
        + _word_uint(4 * 32 + len(name_tail) // 2)
        + _word_uint(decimals)
        + _word_uint(supply)
    )
    return head + name_tail + symbol_tail


def encode_batch_transfer(selector: str, recipients: Sequence[str], amounts: Sequence[int]) -> str:
    k = len(recipients)
    head = _word_uint(2 * 32) + _word_uint(2 * 32 + (1 + k) * 32)
    to_part = _word_uint(k) + "".join(_word_addr(a) for a in recipients)
    amounts_part = _word_uint(k) + "".join(_word_uint(v) for v in amounts)
    return "0x" + selector + head + to_part + amounts_part


def derive_address(seed: int, label: str) -> str:
    """Deterministic fake address: last 20 bytes of sha3-256("trace-devnet:<seed>:<label>")."""
    return "0x" + hashlib.sha3_256(f"trace-devnet:{seed}:{label}".encode()).digest()[-20:].hex()


# --------------------------------------------------------------------------- traffic model

# An expected log: (token address or None = the contract being deployed, topic0, a, b, value)
ExpectedLog = tuple[str | None, str, str, str, int]


@dataclass
class Token:
    index: int
    address: str
    owner: int  # actor index
    name: str
    symbol: str
    decimals: int
    balances: dict[int, int] = field(default_factory=dict)
    holders: list[int] = field(default_factory=list)  # actors with a committed balance > 0
    holder_pos: dict[int, int] = field(default_factory=dict)

    def set_balance(self, actor: int, value: int) -> None:
        if value < 0:
            raise AssertionError(f"negative balance modelled for actor {actor} in {self.symbol}")
        self.balances[actor] = value
        if value > 0 and actor not in self.holder_pos:
            self.holder_pos[actor] = len(self.holders)
            self.holders.append(actor)
        elif value == 0 and actor in self.holder_pos:
            pos = self.holder_pos.pop(actor)
            last = self.holders.pop()
            if last != actor:
                self.holders[pos] = last
                self.holder_pos[last] = pos


@dataclass
class PlannedTx:
    kind: str  # transfer|batch|transfer_from|approve|mint|native|deploy
    sender: int
    to: str | None
    value: int
    data: str
    gas: int
    logs: list[ExpectedLog]
    method: str = ""
    # effects applied once the block is confirmed
    debits: list[tuple[int, int, int]] = field(default_factory=list)  # (token, actor, amount)
    credits: list[tuple[int, int, int]] = field(default_factory=list)
    allowance_set: tuple[tuple[int, int, int], int] | None = None
    allowance_spend: tuple[tuple[int, int, int], int] | None = None
    deploy: dict[str, Any] | None = None


class Traffic:
    """Plans the transactions of each block and keeps the ERC-20 model."""

    def __init__(
        self, seed: int, accounts: int, artifact: dict[str, Any], initial_tokens: int
    ) -> None:
        self.rng = random.Random(seed)
        self.n_accounts = accounts
        self.addresses = [derive_address(seed, f"account:{i}") for i in range(accounts)]
        self.deployer = accounts  # actor index of the initial token deployer
        self.addresses.append(derive_address(seed, "deployer"))
        self.tokens: list[Token] = []
        self.allowances: dict[tuple[int, int, int], int] = {}
        self.allowance_keys: list[tuple[int, int, int]] = []
        self.allowance_pos: dict[tuple[int, int, int], int] = {}
        self.bootstrap: list[PlannedTx] = []
        self.deploy_counter = 0
        self.bytecode = str(artifact["bytecode"])
        ids = artifact["methodIdentifiers"]
        for sig, sel in KNOWN_SELECTORS.items():
            if ids.get(sig) != sel:
                raise GeneratorError(f"selector mismatch for {sig}: build has {ids.get(sig)}")
        topics = artifact.get("eventTopics", {})
        if (
            topics.get("Transfer(address,address,uint256)") != TRANSFER_TOPIC
            or topics.get("Approval(address,address,uint256)") != APPROVAL_TOPIC
        ):
            raise GeneratorError(f"unexpected event topics in the build json: {topics}")
        self.sel_transfer = ids["transfer(address,uint256)"]
        self.sel_transfer_from = ids["transferFrom(address,address,uint256)"]
        self.sel_approve = ids["approve(address,uint256)"]
        self.sel_mint = ids["mint(address,uint256)"]
        self.sel_batch = ids[BATCH_TRANSFER_SIG]
        self.mix_kinds = [k for k, _ in MIX]
        self.mix_weights = [w for _, w in MIX]
        for _ in range(initial_tokens):
            self.bootstrap.append(self._plan_deploy(self.deployer, initial=True))

    # -- helpers
    def _available(self, token: Token, actor: int, reserved: dict[tuple[int, int], int]) -> int:
        return token.balances.get(actor, 0) - reserved.get((token.index, actor), 0)

    def _random_account(self) -> int:
        return self.rng.randrange(self.n_accounts)

    def _pick_holder(
        self, reserved: dict[tuple[int, int], int], min_amount: int = 1
    ) -> tuple[Token, int, int] | None:
        if not self.tokens:
            return None
        for _ in range(4):
            token = self.rng.choice(self.tokens)
            if not token.holders:
                continue
            actor = self.rng.choice(token.holders)
            avail = self._available(token, actor, reserved)
            if avail >= min_amount:
                return token, actor, avail
        return None

    def _amount(self, avail: int) -> int:
        divisor = self.rng.choice((1, 2, 4, 10, 100, 1000, 10**6))
        return self.rng.randint(1, max(1, avail // divisor))

    # -- plans
    def _plan_deploy(self, sender: int, initial: bool) -> PlannedTx:
        self.deploy_counter += 1
        k = self.deploy_counter
        decimals = self.rng.choice((18, 18, 18, 6, 8))
        supply = self.rng.randint(10**6, 10**9) * 10**decimals
        name, symbol = f"Trace Token {k}", f"TT{k}"
        data = "0x" + self.bytecode[2:] + encode_constructor(name, symbol, decimals, supply)
        meta = {
            "name": name,
            "symbol": symbol,
            "decimals": decimals,
            "initial_supply": supply,
            "owner": sender,
            "initial": initial,
        }
        logs: list[ExpectedLog] = [
            (None, TRANSFER_TOPIC, ZERO_ADDRESS, self.addresses[sender], supply)
        ]
        return PlannedTx(
            "deploy", sender, None, 0, data, GAS_DEPLOY, logs, "constructor", deploy=meta
        )

    def _plan_native(self) -> PlannedTx:
        sender = self._random_account()
        to = self.addresses[self._random_account()]
        value = self.rng.randint(10**12, 5 * ETHER)
        return PlannedTx("native", sender, to, value, "0x", GAS_NATIVE, [], "native")

    def _plan_transfer(self, reserved: dict[tuple[int, int], int]) -> PlannedTx | None:
        picked = self._pick_holder(reserved)
        if picked is None:
            return None
        token, sender, avail = picked
        recipient = self._random_account()
        amount = self._amount(avail)
        data = "0x" + self.sel_transfer + _word_addr(self.addresses[recipient]) + _word_uint(amount)
        frm, to = self.addresses[sender], self.addresses[recipient]
        tx = PlannedTx(
            "transfer",
            sender,
            token.address,
            0,
            data,
            GAS_TRANSFER,
            [(token.address, TRANSFER_TOPIC, frm, to, amount)],
            "transfer",
        )
        tx.debits.append((token.index, sender, amount))
        tx.credits.append((token.index, recipient, amount))
        return tx

    def _plan_batch(self, reserved: dict[tuple[int, int], int]) -> PlannedTx | None:
        k = self.rng.randint(2, 4)
        picked = self._pick_holder(reserved, min_amount=k)
        if picked is None:
            return None
        token, sender, avail = picked
        recipients = [self._random_account() for _ in range(k)]
        share = avail // k
        amounts = [
            self.rng.randint(1, max(1, share // self.rng.choice((1, 10, 1000)))) for _ in range(k)
        ]
        data = encode_batch_transfer(
            self.sel_batch, [self.addresses[r] for r in recipients], amounts
        )
        frm = self.addresses[sender]
        logs: list[ExpectedLog] = [
            (token.address, TRANSFER_TOPIC, frm, self.addresses[r], a)
            for r, a in zip(recipients, amounts, strict=True)
        ]
        tx = PlannedTx(
            "batch",
            sender,
            token.address,
            0,
            data,
            GAS_BATCH_BASE + GAS_BATCH_PER_RECIPIENT * k,
            logs,
            "batchTransfer",
        )
        for r, a in zip(recipients, amounts, strict=True):
            tx.debits.append((token.index, sender, a))
            tx.credits.append((token.index, r, a))
        return tx

    def _plan_approve(self, touched: set[tuple[int, int, int]]) -> PlannedTx | None:
        if not self.tokens:
            return None
        token = self.rng.choice(self.tokens)
        owner = self.rng.choice(token.holders) if token.holders else self._random_account()
        spender = self._random_account()
        key = (token.index, owner, spender)
        if key in touched:
            return None
        touched.add(key)
        if self.rng.random() < INFINITE_APPROVAL_PROBABILITY:
            value = MAX_UINT256
        else:
            value = self._amount(max(token.balances.get(owner, 0), 10**token.decimals) * 2)
        data = "0x" + self.sel_approve + _word_addr(self.addresses[spender]) + _word_uint(value)
        tx = PlannedTx(
            "approve",
            owner,
            token.address,
            0,
            data,
            GAS_APPROVE,
            [
                (
                    token.address,
                    APPROVAL_TOPIC,
                    self.addresses[owner],
                    self.addresses[spender],
                    value,
                )
            ],
            "approve",
        )
        tx.allowance_set = (key, value)
        return tx

    def _plan_transfer_from(
        self, reserved: dict[tuple[int, int], int], touched: set[tuple[int, int, int]]
    ) -> PlannedTx | None:
        if not self.allowance_keys:
            return None
        key = self.rng.choice(self.allowance_keys)
        if key in touched:
            return None
        t, owner, spender = key
        token = self.tokens[t]
        allowed = self.allowances[key]
        avail = self._available(token, owner, reserved)
        cap = avail if allowed == MAX_UINT256 else min(avail, allowed)
        if cap <= 0:
            return None
        touched.add(key)
        recipient = self._random_account()
        amount = self._amount(cap)
        frm, to = self.addresses[owner], self.addresses[recipient]
        data = "0x" + self.sel_transfer_from + _word_addr(frm) + _word_addr(to) + _word_uint(amount)
        tx = PlannedTx(
            "transfer_from",
            spender,
            token.address,
            0,
            data,
            GAS_TRANSFER_FROM,
            [(token.address, TRANSFER_TOPIC, frm, to, amount)],
            "transferFrom",
        )
        tx.debits.append((t, owner, amount))
        tx.credits.append((t, recipient, amount))
        if allowed != MAX_UINT256:
            tx.allowance_spend = (key, amount)
        return tx

    def _plan_mint(
        self, token: Token | None = None, recipient: int | None = None
    ) -> PlannedTx | None:
        if token is None:
            if not self.tokens:
                return None
            token = self.rng.choice(self.tokens)
        if recipient is None:
            recipient = self._random_account()
        amount = self.rng.randint(10**3, 10**6) * 10**token.decimals
        to = self.addresses[recipient]
        data = "0x" + self.sel_mint + _word_addr(to) + _word_uint(amount)
        tx = PlannedTx(
            "mint",
            token.owner,
            token.address,
            0,
            data,
            GAS_MINT,
            [(token.address, TRANSFER_TOPIC, ZERO_ADDRESS, to, amount)],
            "mint",
        )
        tx.credits.append((token.index, recipient, amount))
        return tx

    def plan_block(self, target: int, gas_budget: int) -> list[PlannedTx]:
        """Plan the transactions of the next block (never more than gas_budget of gas limits)."""
        rng = self.rng
        if not self.bootstrap and rng.random() < EMPTY_BLOCK_PROBABILITY:
            return []
        n = rng.randint((target + 1) // 2, target + target // 2) if target > 0 else 0
        reserved: dict[tuple[int, int], int] = {}
        touched: set[tuple[int, int, int]] = set()
        planned: list[PlannedTx] = []
        gas = 0

        def add(tx: PlannedTx) -> bool:
            nonlocal gas
            if gas + tx.gas > gas_budget:
                return False
            gas += tx.gas
            for t, actor, amount in tx.debits:
                reserved[(t, actor)] = reserved.get((t, actor), 0) + amount
            planned.append(tx)
            return True

        while self.bootstrap and len(planned) < n:
            if not add(self.bootstrap[0]):
                break
            self.bootstrap.pop(0)
        if rng.random() < DEPLOY_PROBABILITY_PER_BLOCK and n > 0:
            add(self._plan_deploy(self._random_account(), initial=False))
        while len(planned) < n:
            kind = rng.choices(self.mix_kinds, self.mix_weights)[0]
            tx: PlannedTx | None
            if kind == "transfer":
                tx = self._plan_transfer(reserved)
            elif kind == "batch":
                tx = self._plan_batch(reserved)
            elif kind == "approve":
                tx = self._plan_approve(touched)
            elif kind == "transfer_from":
                tx = self._plan_transfer_from(reserved, touched)
            elif kind == "mint":
                tx = self._plan_mint()
            else:
                tx = None
            if tx is None:
                tx = self._plan_native()
            if not add(tx):
                break
        return planned

    def commit(self, txs: Sequence[PlannedTx], contract_addresses: Sequence[str | None]) -> None:
        """Apply the effects of a confirmed block to the model."""
        for tx, created in zip(txs, contract_addresses, strict=True):
            for t, actor, amount in tx.debits:
                tok = self.tokens[t]
                tok.set_balance(actor, tok.balances.get(actor, 0) - amount)
            for t, actor, amount in tx.credits:
                tok = self.tokens[t]
                tok.set_balance(actor, tok.balances.get(actor, 0) + amount)
            if tx.allowance_set is not None:
                key, value = tx.allowance_set
                self._set_allowance(key, value)
            if tx.allowance_spend is not None:
                key, amount = tx.allowance_spend
                self._set_allowance(key, self.allowances[key] - amount)
            if tx.deploy is not None:
                assert created is not None
                meta = tx.deploy
                token = Token(
                    index=len(self.tokens),
                    address=created,
                    owner=meta["owner"],
                    name=meta["name"],
                    symbol=meta["symbol"],
                    decimals=meta["decimals"],
                )
                self.tokens.append(token)
                token.set_balance(meta["owner"], meta["initial_supply"])
                if meta["initial"]:
                    k = max(1, round(self.n_accounts * INITIAL_HOLDER_FRACTION))
                    for actor in self.rng.sample(range(self.n_accounts), k):
                        mint = self._plan_mint(token, actor)
                        assert mint is not None
                        self.bootstrap.append(mint)

    def _set_allowance(self, key: tuple[int, int, int], value: int) -> None:
        if value < 0:
            raise AssertionError(f"negative allowance modelled for {key}")
        if value > 0:
            self.allowances[key] = value
            if key not in self.allowance_pos:
                self.allowance_pos[key] = len(self.allowance_keys)
                self.allowance_keys.append(key)
        elif key in self.allowance_pos:
            del self.allowances[key]
            pos = self.allowance_pos.pop(key)
            last = self.allowance_keys.pop()
            if last != key:
                self.allowance_keys[pos] = last
                self.allowance_pos[last] = pos
        else:
            self.allowances.pop(key, None)


# --------------------------------------------------------------------------- generation


def _hex(v: int) -> str:
    return hex(v)


def _tx_request(
    tx: PlannedTx, frm: str, nonce: int, fee: int, legacy: bool, chain_id: int
) -> dict[str, Any]:
    req: dict[str, Any] = {
        "from": frm,
        "nonce": _hex(nonce),
        "gas": _hex(tx.gas),
        "value": _hex(tx.value),
        "input": tx.data,
        "chainId": _hex(chain_id),
    }
    if tx.to is not None:
        req["to"] = tx.to
    if legacy:
        req["type"] = "0x0"
        req["gasPrice"] = _hex(fee)
    else:
        req["type"] = "0x2"
        req["maxFeePerGas"] = _hex(fee)
        req["maxPriorityFeePerGas"] = _hex(min(fee, GWEI + fee % GWEI))
    return req


@contextmanager
def _record_writer(path: str | Path | None) -> Iterator[Callable[[dict[str, Any]], None]]:
    if path is None:
        yield lambda row: None
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fh: IO[str]
    with p.open("w") as fh:

        def write(row: dict[str, Any]) -> None:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")

        yield write


def _check_chain(rpc: Rpc, chain_id: int) -> None:
    actual_chain_id, client, pool = rpc.batch(
        [("eth_chainId", []), ("web3_clientVersion", []), ("txpool_status", [])]
    )
    if int(actual_chain_id, 16) != chain_id:
        raise GeneratorError(
            f"refusing to generate traffic: {rpc.url} is chain id {int(actual_chain_id, 16)}, "
            f"expected {chain_id} (pass --chain-id {int(actual_chain_id, 16)} to override)"
        )
    if not str(client).lower().startswith("anvil"):
        raise GeneratorError(f"refusing to generate traffic: {rpc.url} is {client!r}, not anvil")
    pending = int(pool.get("pending", "0x0"), 16) + int(pool.get("queued", "0x0"), 16)
    if pending:
        raise GeneratorError(
            f"refusing to generate traffic: {pending} transactions already pending"
        )


class _Run:
    """State of one generation run (RPC connection, model, nonces, counters, record)."""

    def __init__(
        self,
        rpc: Rpc,
        traffic: Traffic,
        summary: GenerationSummary,
        write: Callable[[dict[str, Any]], None],
        chain_id: int,
        seed: int,
    ) -> None:
        self.rpc = rpc
        self.traffic = traffic
        self.addresses = traffic.addresses
        self.summary = summary
        self.write = write
        self.chain_id = chain_id
        self.fee_rng = random.Random(f"{seed}:fees")
        self.nonces: list[int] = []
        self.order_warned = False

    def setup(self) -> None:
        setup: list[tuple[str, list[Any]]] = [("anvil_autoImpersonateAccount", [True])]
        setup += [("anvil_setBalance", [a, _hex(ACCOUNT_BALANCE)]) for a in self.addresses]
        self.rpc.batch(setup)
        counts = self.rpc.batch(
            [("eth_getTransactionCount", [a, "latest"]) for a in self.addresses]
        )
        self.nonces = [int(n, 16) for n in counts]

    def mine_block(self, number: int, ts: int, planned: list[PlannedTx]) -> None:
        """Send the planned transactions in one batch, mine them, check and record the block."""
        n = len(planned)
        calls: list[tuple[str, list[Any]]] = []
        for pos, tx in enumerate(planned):
            fee = BASE_FEE_WEI + (n - pos) * FEE_STEP_WEI  # strictly decreasing: fixes the order
            legacy = self.fee_rng.random() < LEGACY_TX_PROBABILITY
            sender = self.addresses[tx.sender]
            req = _tx_request(tx, sender, self.nonces[tx.sender], fee, legacy, self.chain_id)
            self.nonces[tx.sender] += 1
            calls.append(("eth_sendTransaction", [req]))
        hashes = [h.lower() for h in self.rpc.batch(calls)]
        self.rpc.call("evm_mine", ts)
        receipts, block = self.rpc.batch(
            [
                ("eth_getBlockReceipts", [_hex(number)]),
                ("eth_getBlockByNumber", [_hex(number), False]),
            ]
        )
        if block is None or int(block["timestamp"], 16) != ts:
            raise GeneratorError(
                f"block {number} is missing or has an unexpected timestamp: {block}"
            )
        receipts = receipts or []
        if len(receipts) != n:
            raise GeneratorError(
                f"block {number} has {len(receipts)} transactions, {n} were sent "
                "(is something else sending transactions or mining blocks?)"
            )
        by_hash = {r["transactionHash"].lower(): r for r in receipts}
        created: list[str | None] = []
        block_logs = 0
        for pos, (tx, tx_hash) in enumerate(zip(planned, hashes, strict=True)):
            receipt = by_hash.get(tx_hash)
            if receipt is None:
                raise GeneratorError(f"transaction {tx_hash} ({tx.kind}) is not in block {number}")
            created.append(self._check_receipt(number, pos, tx, receipt))
            block_logs += self._record_tx(number, tx, receipt, created[-1])
        self.traffic.commit(planned, created)
        self.summary.transactions += n
        self.summary.logs += block_logs
        self.summary.last_block_hash = block["hash"].lower()
        self.write(
            {
                "kind": "block",
                "block_number": number,
                "block_hash": self.summary.last_block_hash,
                "timestamp": ts,
                "tx_count": n,
                "log_count": block_logs,
            }
        )

    def _check_receipt(
        self, number: int, pos: int, tx: PlannedTx, receipt: dict[str, Any]
    ) -> str | None:
        """Fail unless the tx succeeded with exactly the expected logs; return a new contract."""
        tx_hash = receipt["transactionHash"]
        if receipt.get("status") != "0x1":
            raise GeneratorError(
                f"{tx.kind} transaction {tx_hash} failed in block {number}: {receipt}"
            )
        tx_index = int(receipt["transactionIndex"], 16)
        if tx_index != pos and not self.order_warned:
            self.order_warned = True
            log.warning(
                "block %d: the transaction built at position %d landed at index %d; the mempool "
                "is not fee-ordered (anvil --order?), block hashes may not be reproducible",
                number,
                pos,
                tx_index,
            )
        created = receipt.get("contractAddress")
        created = created.lower() if created else None
        if tx.kind == "deploy" and created is None:
            raise GeneratorError(f"deployment {tx_hash} in block {number} has no contractAddress")
        expected = [
            (
                (addr or created or "").lower(),
                [topic0, "0x" + _word_addr(a), "0x" + _word_addr(b)],
                "0x" + _word_uint(value),
            )
            for addr, topic0, a, b, value in tx.logs
        ]
        actual = [
            (lg["address"].lower(), [t.lower() for t in lg["topics"]], lg["data"].lower())
            for lg in receipt.get("logs") or []
        ]
        if actual != expected:
            raise GeneratorError(
                f"block {number} tx {pos} ({tx.kind}, {tx_hash}): logs differ from the model."
                f"\nexpected: {expected}\nactual:   {actual}"
            )
        return created

    def _record_tx(
        self, number: int, tx: PlannedTx, receipt: dict[str, Any], created: str | None
    ) -> int:
        """Count and record one confirmed transaction; return its number of logs."""
        summary, write = self.summary, self.write
        base = {
            "block_number": number,
            "tx_index": int(receipt["transactionIndex"], 16),
            "tx_hash": receipt["transactionHash"].lower(),
        }
        sender = self.addresses[tx.sender]
        if tx.kind == "native":
            summary.native_transfers += 1
            write(
                {"kind": "native_transfer", **base, "from": sender, "to": tx.to}
                | {"value": str(tx.value)}
            )
        if tx.deploy is not None:
            summary.deployments += 1
            meta = tx.deploy
            write(
                {"kind": "deployment", **base, "deployer": sender, "contract_address": created}
                | {k: meta[k] for k in ("name", "symbol", "decimals")}
                | {"initial_supply": str(meta["initial_supply"])}
            )
        for lg, (token, topic0, a, b, value) in zip(receipt["logs"], tx.logs, strict=True):
            common = {**base, "log_index": int(lg["logIndex"], 16), "token": token or created}
            if topic0 == TRANSFER_TOPIC:
                summary.erc20_transfers += 1
                write(
                    {"kind": "erc20_transfer", **common, "from": a, "to": b}
                    | {"value": str(value), "method": tx.method}
                )
            else:
                summary.approvals += 1
                write({"kind": "approval", **common, "owner": a, "spender": b, "value": str(value)})
        return len(tx.logs)

    def finalize(self, first_ts: int) -> None:
        """Mine FINALITY_DEPTH empty blocks so that every traffic block is finalized."""
        for j in range(FINALITY_DEPTH):
            self.rpc.call("evm_mine", first_ts + j)
        finalized = self.rpc.call("eth_getBlockByNumber", "finalized", False)
        if finalized is None or int(finalized["number"], 16) < self.summary.last_block:
            raise GeneratorError(
                f"the finalized block is {finalized and int(finalized['number'], 16)}, "
                f"expected >= {self.summary.last_block}"
            )


def generate(
    rpc_url: str,
    blocks: int = 3000,
    txs_per_block: int = 30,
    accounts: int = 300,
    tokens: int = 5,
    seed: int = 7,
    record_path: str | Path | None = None,
    finalize: bool = False,
    chain_id: int = DEFAULT_CHAIN_ID,
) -> GenerationSummary:
    """Generate ``blocks`` blocks of deterministic traffic on the anvil at ``rpc_url``.

    Refuses (``GeneratorError``) unless the node is anvil with chain id ``chain_id`` and an
    empty mempool. Raises ``GeneratorError``/``RpcError`` on any JSON-RPC error, failed
    transaction or receipt that differs from the model. Automine / interval mining are
    restored after a successful run (left off after a failure); auto-impersonation stays on.
    """
    if blocks < 1 or txs_per_block < 0 or accounts < 2 or tokens < 0:
        raise ValueError("need blocks >= 1, txs_per_block >= 0, accounts >= 2, tokens >= 0")
    started = time.perf_counter()
    artifact = load_artifact("TraceToken")
    rpc = Rpc(rpc_url)
    try:
        _check_chain(rpc, chain_id)
        was_automine, was_interval = rpc.batch(
            [("anvil_getAutomine", []), ("anvil_getIntervalMining", [])]
        )
        rpc.batch([("evm_setAutomine", [False]), ("evm_setIntervalMining", [0])])
        head = rpc.call("eth_getBlockByNumber", "latest", False)
        head_number, head_ts = int(head["number"], 16), int(head["timestamp"], 16)
        genesis_ts = int(rpc.call("eth_getBlockByNumber", "0x0", False)["timestamp"], 16)
        if genesis_ts != GENESIS_TIMESTAMP:
            log.warning(
                "the genesis timestamp is %d, not %d: block hashes will not be reproducible "
                "(start anvil with --timestamp %d)",
                genesis_ts,
                GENESIS_TIMESTAMP,
                GENESIS_TIMESTAMP,
            )
        gas_budget = int(int(head["gasLimit"], 16) * BLOCK_GAS_BUDGET_FRACTION)
        traffic = Traffic(seed, accounts, artifact, tokens)
        first_block = head_number + 1
        first_ts = max(head_ts, GENESIS_TIMESTAMP) + 1
        summary = GenerationSummary(
            blocks=blocks,
            first_block=first_block,
            last_block=first_block + blocks - 1,
            transactions=0,
            erc20_transfers=0,
            native_transfers=0,
            deployments=0,
            seconds=0.0,
        )
        log.info(
            "generating %d blocks from #%d on %s (chain %d, seed %d, %d accounts, %d tokens)",
            blocks,
            first_block,
            rpc_url,
            chain_id,
            seed,
            accounts,
            tokens,
        )
        with _record_writer(record_path) as write:
            write(
                {
                    "kind": "meta",
                    "format": RECORD_FORMAT,
                    "chain_id": chain_id,
                    "seed": seed,
                    "blocks": blocks,
                    "txs_per_block": txs_per_block,
                    "accounts": accounts,
                    "tokens": tokens,
                    "first_block": first_block,
                    "first_timestamp": first_ts,
                    "genesis_timestamp": genesis_ts,
                    "deployer": traffic.addresses[traffic.deployer],
                    "account_addresses": traffic.addresses[: traffic.n_accounts],
                }
            )
            run = _Run(rpc, traffic, summary, write, chain_id, seed)
            run.setup()
            last_progress = time.perf_counter()
            for i in range(blocks):
                run.mine_block(
                    first_block + i, first_ts + i, traffic.plan_block(txs_per_block, gas_budget)
                )
                if time.perf_counter() - last_progress >= 10:
                    last_progress = time.perf_counter()
                    log.info(
                        "block %d/%d: %d txs so far, %.0f tx/s",
                        i + 1,
                        blocks,
                        summary.transactions,
                        summary.transactions / (last_progress - started),
                    )
            summary.head_block = summary.last_block
            if finalize:
                run.finalize(first_ts + blocks)
                summary.head_block += FINALITY_DEPTH
            if was_automine:
                rpc.call("evm_setAutomine", True)
            if was_interval:
                rpc.call("evm_setIntervalMining", was_interval)
            summary.seconds = round(time.perf_counter() - started, 3)
            write({"kind": "summary", **dataclasses.asdict(summary)})
        log.info("%s", summary.one_line())
        return summary
    finally:
        rpc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.devnet.generate",
        description="Generate deterministic ERC-20/native traffic on a fresh anvil devnet.",
    )
    parser.add_argument(
        "--rpc", required=True, help="anvil JSON-RPC URL, e.g. http://127.0.0.1:8545"
    )
    parser.add_argument(
        "--blocks", type=int, default=3000, help="traffic blocks to mine (default 3000)"
    )
    parser.add_argument(
        "--txs-per-block", type=int, default=30, help="average txs per block (default 30)"
    )
    parser.add_argument(
        "--accounts", type=int, default=300, help="number of accounts (default 300)"
    )
    parser.add_argument(
        "--tokens", type=int, default=5, help="tokens deployed up front (default 5)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    parser.add_argument("--record", metavar="PATH", help="write a JSON-lines record of the traffic")
    parser.add_argument(
        "--finalize",
        action="store_true",
        help=f"mine {FINALITY_DEPTH} empty blocks afterwards so all traffic is finalized",
    )
    parser.add_argument(
        "--chain-id",
        type=int,
        default=DEFAULT_CHAIN_ID,
        help=f"expected chain id (default {DEFAULT_CHAIN_ID})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        summary = generate(
            args.rpc,
            blocks=args.blocks,
            txs_per_block=args.txs_per_block,
            accounts=args.accounts,
            tokens=args.tokens,
            seed=args.seed,
            record_path=args.record,
            finalize=args.finalize,
            chain_id=args.chain_id,
        )
    except (GeneratorError, DevnetToolError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print(summary.one_line())  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
