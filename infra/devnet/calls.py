"""Devnet traffic that only call traces show, appended after the ordinary traffic.

:func:`call_traffic` deploys ``TraceFactory`` and mines ``rounds`` blocks, each holding:

* ``split`` with a value: the factory pays three recipients from inside the call (internal
  CALL frames with a value);
* ``deploy(salt)`` with a value: the factory creates two ``TraceChild`` contracts, one with
  CREATE and one with CREATE2, and funds each (contracts created by a contract, and value
  moved by CREATE frames);
* ``splitOrKeep`` with a value: two payments go through, the third is made by a call that
  reverts and is caught, so the trace holds a value frame whose payment was undone.

It only appends blocks (automine off, ``evm_mine`` with increasing timestamps), so blocks
generated before it keep their hashes, and it returns what the traces must show, computed
from the rules rather than read back from the node: the transfers that happened (and the
one that did not) and the addresses of the created contracts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from Crypto.Hash import keccak

from infra.devnet.compile import BUILD_DIR, load_artifact
from infra.devnet.generate import (
    FINALITY_DEPTH,
    GeneratorError,
    Rpc,
    _word_addr,
    _word_uint,
)

__all__ = ["CallTraffic", "call_traffic"]

FACTORY_BALANCE = 10**24
SPLIT_VALUE = 3 * 10**15  # three recipients, 10**15 wei each
DEPLOY_VALUE = 2 * 10**15  # 10**15 wei to each new child
KEEP_VALUE = 3 * 10**15  # two payments go through, the third is undone
GAS = 1_500_000
FEE = 10 * 10**9


@dataclass
class CallTraffic:
    """What the appended blocks must show in their call traces."""

    first_block: int
    last_block: int
    factory: str
    sender: str
    # (block, from, to, value) of the value moved from inside calls (not the top-level tx)
    internal_transfers: list[tuple[int, str, str, int]] = field(default_factory=list)
    # (block, from, to, value) of a value frame whose payment was undone (a caught revert)
    undone_transfers: list[tuple[int, str, str, int]] = field(default_factory=list)
    # (block, creator, address, kind) of the contracts created by the factory
    created: list[tuple[int, str, str, str]] = field(default_factory=list)


def _keccak(data: bytes) -> bytes:
    return keccak.new(data=data, digest_bits=256).digest()


def _create_address(deployer: str, nonce: int) -> str:
    # rlp([deployer, nonce]) for a nonce below 0x80 and a 20-byte address
    nonce_rlp = bytes([nonce]) if 0 < nonce < 0x80 else b"\x80"
    if nonce >= 0x80:
        raise GeneratorError("the factory creates fewer than 128 contracts")
    payload = b"\x94" + bytes.fromhex(deployer[2:]) + nonce_rlp
    return "0x" + _keccak(bytes([0xC0 + len(payload)]) + payload)[12:].hex()


def _create2_address(deployer: str, salt: bytes, init_code: bytes) -> str:
    data = b"\xff" + bytes.fromhex(deployer[2:]) + salt + _keccak(init_code)
    return "0x" + _keccak(data)[12:].hex()


def _recipient(seed: int, label: str) -> str:
    return (
        "0x" + hashlib.sha3_256(f"trace-devnet-calls:{seed}:{label}".encode()).digest()[-20:].hex()
    )


def _address_array(selector: str, addresses: list[str]) -> str:
    return (
        "0x"
        + selector
        + _word_uint(32)
        + _word_uint(len(addresses))
        + "".join(_word_addr(a) for a in addresses)
    )


class _Sender:
    def __init__(self, rpc: Rpc, address: str, chain_id: int) -> None:
        self.rpc, self.address, self.chain_id = rpc, address, chain_id
        self.nonce = int(rpc.call("eth_getTransactionCount", address, "latest"), 16)

    def request(self, to: str | None, data: str, value: int) -> dict[str, Any]:
        req: dict[str, Any] = {
            "from": self.address,
            "nonce": hex(self.nonce),
            "gas": hex(GAS),
            "value": hex(value),
            "input": data,
            "chainId": hex(self.chain_id),
            "type": "0x2",
            "maxFeePerGas": hex(FEE),
            "maxPriorityFeePerGas": hex(10**9),
        }
        if to is not None:
            req["to"] = to
        self.nonce += 1
        return req


def _mine(rpc: Rpc, requests: list[dict[str, Any]], number: int, ts: int) -> list[dict[str, Any]]:
    """Send `requests` in order (strictly decreasing tips keep that order), mine one block."""
    for pos, req in enumerate(requests):
        req["maxPriorityFeePerGas"] = hex(10**9 + (len(requests) - pos) * 10**6)
    rpc.batch([("eth_sendTransaction", [r]) for r in requests])
    rpc.call("evm_mine", ts)
    receipts = rpc.call("eth_getBlockReceipts", hex(number)) or []
    if len(receipts) != len(requests) or any(r["status"] != "0x1" for r in receipts):
        raise GeneratorError(f"block {number}: call traffic failed: {receipts}")
    return receipts


def call_traffic(
    rpc_url: str, rounds: int = 3, seed: int = 7, chain_id: int = 10143, finalize: bool = True
) -> CallTraffic:
    """Append 1 + `rounds` blocks of factory traffic (and, with `finalize`, FINALITY_DEPTH
    empty blocks so that all of it is finalized)."""
    factory_art = load_artifact("TraceFactory")  # compiles TraceChild too (same source file)
    child_art = json.loads((BUILD_DIR / "TraceChild.json").read_text())
    selectors = factory_art["methodIdentifiers"]
    child_code = bytes.fromhex(child_art["bytecode"].removeprefix("0x"))
    rpc = Rpc(rpc_url)
    try:
        sender = _Sender(rpc, _recipient(seed, "sender"), chain_id)
        rpc.batch(
            [
                ("anvil_autoImpersonateAccount", [True]),
                ("anvil_setBalance", [sender.address, hex(FACTORY_BALANCE)]),
                ("evm_setAutomine", [False]),
            ]
        )
        head = rpc.call("eth_getBlockByNumber", "latest", False)
        number, ts = int(head["number"], 16) + 1, int(head["timestamp"], 16) + 1
        factory = _create_address(sender.address, sender.nonce)
        _mine(
            rpc,
            [sender.request(None, "0x" + factory_art["bytecode"].removeprefix("0x"), 0)],
            number,
            ts,
        )
        out = CallTraffic(number, number, factory, sender.address)
        factory_nonce = 1  # EIP-161: a contract's nonce starts at 1
        for i in range(rounds):
            number, ts = number + 1, ts + 1
            paid = [_recipient(seed, f"split-{i}-{k}") for k in range(3)]
            kept = [_recipient(seed, f"keep-{i}-{k}") for k in range(3)]
            salt = _keccak(f"salt-{seed}-{i}".encode())
            _mine(
                rpc,
                [
                    sender.request(
                        factory, _address_array(selectors["split(address[])"], paid), SPLIT_VALUE
                    ),
                    sender.request(
                        factory, "0x" + selectors["deploy(bytes32)"] + salt.hex(), DEPLOY_VALUE
                    ),
                    sender.request(
                        factory,
                        _address_array(selectors["splitOrKeep(address[])"], kept),
                        KEEP_VALUE,
                    ),
                ],
                number,
                ts,
            )
            each = SPLIT_VALUE // 3
            out.internal_transfers += [(number, factory, to, each) for to in paid]
            plain = _create_address(factory, factory_nonce)
            salted = _create2_address(factory, salt, child_code)
            factory_nonce += 2
            out.created += [
                (number, factory, plain, "CREATE"),
                (number, factory, salted, "CREATE2"),
            ]
            half = DEPLOY_VALUE // 2
            out.internal_transfers += [
                (number, factory, plain, half),
                (number, factory, salted, DEPLOY_VALUE - half),
            ]
            # splitOrKeep: factory -> factory.pay (value), then pay -> recipient
            for k, to in enumerate(kept):
                target = out.undone_transfers if k == 2 else out.internal_transfers
                target.append((number, factory, factory, each))
                target.append((number, factory, to, each))
        out.last_block = number
        if finalize:
            for j in range(FINALITY_DEPTH):
                rpc.call("evm_mine", ts + 1 + j)
        rpc.call("evm_setAutomine", True)
        return out
    finally:
        rpc.close()
