"""A lying endpoint: answers that agree with each other but not with the chain are refused.

A FaultProxy in front of the session devnet rewrites its answers the way a faulty or hostile
provider could, in ways the tables' own consistency (blocks present, parent links, counts, logs
bloom) cannot see:
- one log left out where the other logs of its block already set all of its bloom bits (from
  `eth_getLogs` alone, or from the receipts too);
- a block's hash rewritten consistently (its hash, the next block's parent hash, its logs);
- the hash of a range's last block rewritten while that range is extracted, the next range
  extracted honestly afterwards (today the wrong range committed, the honest one was refused);
- the same at a range's first block, the range before it filled in afterwards (out of order),
  and an endpoint in use that cannot judge the boundary (another endpoint decides).
Each is refused with an error that names the block and the check that caught it, and nothing
wrong is ever current. Honest devnet ranges pass every check the devnet allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest
from Crypto.Hash import keccak

from tests.conftest import CHAIN_ID, Devnet
from tests.utils.dagster_runs import (
    failure_description,
    materialize_keys,
    no_dagster_retry_delay,  # noqa: F401 - fixture
)
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_assets.cli import main
from trace_resources.chain.boundary import judge_boundary
from trace_resources.chain.crosscheck import probe_checks
from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.rpc import RetryPolicy
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.errors import RangeIncompleteError
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import RpcEndpoint, Settings

FIRST, SECOND, THIRD = BlockRange(50, 99), BlockRange(100, 149), BlockRange(150, 199)
HONEST = BlockRange(1, 150)
ONE_TRY = RetryPolicy(max_attempts=1, budget_s=10)

HASH_CHECK = "block hash is not the hash of its header"
LOGS_CHECK = "logs differ from the block's receipts"
RECEIPTS_CHECK = "receipts root is not the root of the block's receipts"


def _bits(item: bytes) -> set[int]:
    digest = keccak.new(digest_bits=256, data=item).digest()
    return {((digest[i] << 8) | digest[i + 1]) & 2047 for i in (0, 2, 4)}


def _log_bits(log: dict[str, Any]) -> set[int]:
    items = [log["address"], *log["topics"]]
    return set().union(*(_bits(bytes.fromhex(i[2:])) for i in items))


@dataclass(frozen=True)
class CoveredLog:
    block: int
    log_index: int


@pytest.fixture(scope="module")
def covered_log(devnet: Devnet) -> CoveredLog:
    """A log of SECOND whose bloom bits the other logs of its block all set already (e.g. a
    Transfer of a token whose sender and recipient also appear in other Transfers)."""
    logs = devnet.node.rpc(
        "eth_getLogs", [{"fromBlock": hex(SECOND.start), "toBlock": hex(SECOND.last)}]
    )
    by_block: dict[int, list[dict[str, Any]]] = {}
    for log in logs:
        by_block.setdefault(int(log["blockNumber"], 16), []).append(log)
    for number, block_logs in sorted(by_block.items()):
        for log in block_logs:
            others = set().union(*(_log_bits(o) for o in block_logs if o is not log))
            if _log_bits(log) <= others:
                return CoveredLog(number, int(log["logIndex"], 16))
    raise AssertionError(f"the devnet has no log in {SECOND.key} whose bloom bits are covered")


def _hash(devnet: Devnet, number: int) -> str:
    return devnet.node.rpc("eth_getBlockByNumber", [hex(number), False])["hash"]


def _fake(number: int) -> str:
    return "0x" + keccak.new(digest_bits=256, data=b"forged %d" % number).hexdigest()


@pytest.fixture
def proxy(devnet: Devnet) -> Iterator[FaultProxy]:
    with FaultProxy(devnet.url) as p:
        yield p


def _refusal(proxy: FaultProxy, block_range: BlockRange) -> str:
    client = ChainClient(
        proxy.url, CHAIN_ID, retry=ONE_TRY, verify_receipts=True, verify_transactions_root=True
    )
    try:
        with pytest.raises(RangeIncompleteError) as refused:
            client.extract_range(block_range)
    finally:
        client.close()
    return str(refused.value)


def test_honest_devnet_ranges_pass_every_check_the_devnet_allows(devnet: Devnet) -> None:
    client = ChainClient(devnet.url, CHAIN_ID, verify_receipts=True, verify_transactions_root=True)
    try:
        checks = client.node_checks()
        # deployments, token and native transfers: every kind of traffic the devnet generates
        data = client.extract_range(HONEST)
        kinds = {
            r["type"]
            for n in (2, 60, 120)
            for r in devnet.node.rpc("eth_getBlockReceipts", [hex(n)])
        }
    finally:
        client.close()
    assert {c for c, s in checks.items() if s.possible} == {
        "block_hash",
        "receipts_root",
        "transactions_root",
    }
    # anvil hashes its impersonated transactions with their sender: said, not skipped
    hashes = checks["transaction_hashes"]
    assert not hashes.possible and "not keccak-256 of its raw transaction" in hashes.detail
    assert str(hashes).startswith("transaction_hashes: unverifiable: ")
    assert data.tables["blocks"].num_rows == HONEST.size
    assert data.tables["logs"].num_rows > 0
    assert {"0x0", "0x2"} <= kinds  # legacy and EIP-1559 transactions, and their receipts


def test_a_log_the_bloom_cannot_miss_is_caught_by_the_receipts(
    proxy: FaultProxy, covered_log: CoveredLog
) -> None:
    proxy.set_faults(
        [Fault("drop_log", blocks={covered_log.block}, log_index=covered_log.log_index)]
    )
    message = _refusal(proxy, SECOND)
    assert proxy.injected["drop_log"] > 0
    assert f"{LOGS_CHECK} (eth_getBlockReceipts: count or content): blocks {covered_log.block}" in (
        message
    )
    # the bloom check alone would have let it through
    assert "logs missing" not in message


def test_a_log_left_out_of_the_receipts_too_breaks_the_receipts_root(
    proxy: FaultProxy, covered_log: CoveredLog
) -> None:
    proxy.set_faults(
        [
            Fault(
                "drop_log",
                methods={"eth_getLogs", "eth_getBlockReceipts"},
                blocks={covered_log.block},
                log_index=covered_log.log_index,
            )
        ]
    )
    message = _refusal(proxy, SECOND)
    assert f"{RECEIPTS_CHECK} (recomputed): blocks {covered_log.block}" in message
    assert LOGS_CHECK not in message  # logs and receipts agree with each other: only the root


def test_a_consistently_rewritten_block_hash_is_caught_by_its_header(
    devnet: Devnet, proxy: FaultProxy
) -> None:
    proxy.set_faults([Fault("replace_hash", replace={_hash(devnet, 120): _fake(120)})])
    message = _refusal(proxy, SECOND)
    # block 120's header does not hash to the forged hash; block 121's header, naming the
    # forged parent, does not hash to 121's own hash either
    assert f"{HASH_CHECK} (keccak-256 of the header's RLP recomputed): blocks 120, 121" in message
    # the rewrite is consistent: the tables' own checks found nothing
    assert "parent hash does not link" not in message and "another fork" not in message


def test_a_transaction_altered_in_the_block_is_caught_by_its_raw_transaction(
    devnet: Devnet, proxy: FaultProxy
) -> None:
    tx = devnet.node.rpc("eth_getTransactionByBlockNumberAndIndex", [hex(120), "0x0"])
    altered = tx["input"][:-2] + ("00" if tx["input"][-2:] != "00" else "01")
    proxy.set_faults(
        [Fault("replace_hash", methods={"eth_getBlockByNumber"}, replace={tx["input"]: altered})]
    )
    message = _refusal(proxy, SECOND)
    assert "transactions differ from their raw transactions" in message
    assert "input): blocks 120" in message
    # the hash, the header and the receipts are all still the honest ones
    assert HASH_CHECK not in message and RECEIPTS_CHECK not in message


@pytest.mark.usefixtures("no_dagster_retry_delay")
def test_a_hash_forged_at_a_range_boundary_is_never_current(
    devnet: Devnet,
    test_settings: Settings,
    state: StateStoreResource,
    proxy: FaultProxy,
) -> None:
    honest = _hash(devnet, FIRST.last)
    proxy.set_faults([Fault("replace_hash", replace={honest: _fake(FIRST.last)})])
    settings = test_settings.model_copy(
        update={"rpc_url": proxy.url, "rpc_max_attempts": 1, "rpc_retry_budget_s": 10}
    )
    result, instance = materialize_keys(settings, [FIRST.key])
    assert not result.success
    message = failure_description(result)
    assert message.startswith("RangeIncompleteError: ")
    assert f"blocks {FIRST.start}..{FIRST.last} failed verification" in message
    assert f"{HASH_CHECK} (keccak-256 of the header's RLP recomputed): blocks {FIRST.last}" in (
        message
    )
    for name in RAW_DATASETS:
        assert state.versions().read.current_versions(name) == {}

    # the endpoint tells the truth again: both ranges commit, linked by the honest hash
    proxy.set_faults([])
    result, _ = materialize_keys(settings, [FIRST.key, SECOND.key], instance)
    assert result.success, failure_description(result)
    for name in RAW_DATASETS:
        current = state.versions().read.current_versions(name)
        assert sorted(current) == [FIRST.key, SECOND.key]
        first, second = current[FIRST.key].manifest.source, current[SECOND.key].manifest.source
        assert first is not None and second is not None
        assert first["last"]["hash"] == honest == second["first"]["parent_hash"]


def test_probe_says_which_checks_an_unknown_header_format_makes_impossible(
    devnet: Devnet, proxy: FaultProxy
) -> None:
    """Every block's hash rewritten (as a chain with another header format would look): the
    hash check is unverifiable, with its reason, and the others still run."""
    head = devnet.node.rpc("eth_getBlockByNumber", ["finalized", False])
    top = int(head["number"], 16)
    forged = {_hash(devnet, n): _fake(n) for n in range(top - 40, top + 1)}
    proxy.set_faults([Fault("replace_hash", replace=forged)])
    client = ChainClient(proxy.url, CHAIN_ID)
    try:
        checks = probe_checks(client.rpc)
    finally:
        client.close()
    assert not checks["block_hash"].possible
    assert str(checks["block_hash"]).startswith("block_hash: unverifiable: the hash recomputed")
    assert "is not the endpoint's" in checks["block_hash"].detail
    assert checks["receipts_root"].possible and checks["transactions_root"].possible


def test_a_boundary_disagreement_is_judged_by_the_recomputed_header(devnet: Devnet) -> None:
    """Committed 99 (forged or honest) against the next range's first block 100 (honest or
    naming a forged parent): the side that differs from the recomputed hash is the wrong one."""
    honest_99, honest_100 = _hash(devnet, 99), _hash(devnet, 100)
    forged = _fake(99)
    client = ChainClient(devnet.url, CHAIN_ID)
    try:
        verdicts = {
            case: judge_boundary(client.rpc, (99, committed), (100, honest_100, parent))
            for case, committed, parent in [
                ("committed forged", forged, honest_99),
                ("new forged", honest_99, forged),
                ("agree", honest_99, honest_99),
            ]
        }
    finally:
        client.close()
    assert {case: v.wrong for case, v in verdicts.items()} == {
        "committed forged": "committed",
        "new forged": "new",
        "agree": "neither",
    }
    assert all(v.true_hash == honest_99 for v in verdicts.values())
    assert "recomputed from its header" in verdicts["committed forged"].detail


@pytest.mark.usefixtures("no_dagster_retry_delay")
def test_a_wrong_committed_range_is_replaced_when_its_honest_neighbour_arrives(
    devnet: Devnet,
    test_settings: Settings,
    state: StateStoreResource,
    proxy: FaultProxy,
) -> None:
    """A range committed wrong where hashes could not be recomputed (the endpoint forged the
    probe's blocks too, so the hash check was unverifiable): when the honest next range does
    not link to it, the boundary is judged, the wrong range is extracted again and replaced,
    and the honest one is committed after it."""
    honest = _hash(devnet, FIRST.last)
    top = devnet.finalized
    forged = {_hash(devnet, n): _fake(n) for n in range(top - 40, top + 1)}
    proxy.set_faults([Fault("replace_hash", replace={**forged, honest: _fake(FIRST.last)})])
    settings = test_settings.model_copy(update={"rpc_url": proxy.url, "rpc_max_attempts": 1})
    result, instance = materialize_keys(settings, [FIRST.key])
    assert result.success, failure_description(result)
    wrong = state.versions().read.current_versions("blocks")[FIRST.key]
    assert wrong.manifest.source is not None
    assert wrong.manifest.source["last"]["hash"] == _fake(FIRST.last)  # the lie was committed

    proxy.set_faults([])
    result, _ = materialize_keys(settings, [SECOND.key], instance)
    assert result.success, failure_description(result)
    for name in RAW_DATASETS:
        current = state.versions().read.current_versions(name)
        assert sorted(current) == [FIRST.key, SECOND.key]
        first, second = current[FIRST.key], current[SECOND.key]
        assert first.version == 2 and second.version == 1
        assert first.manifest.source is not None and second.manifest.source is not None
        assert first.manifest.source["last"]["hash"] == honest
        assert second.manifest.source["first"]["parent_hash"] == honest


def test_an_endpoint_that_cannot_judge_a_boundary_leaves_it_to_another(
    devnet: Devnet, proxy: FaultProxy
) -> None:
    """The endpoint in use answers block 99 with a hash its header does not hash to: it cannot
    judge; the honest second endpoint decides, on either side of the boundary."""
    honest_99, honest_100 = _hash(devnet, 99), _hash(devnet, 100)
    forged = _fake(99)
    proxy.set_faults(
        [
            Fault(
                "replace_hash",
                methods={"eth_getBlockByNumber"},
                blocks={99},
                replace={honest_99: forged},
            )
        ]
    )
    endpoints = [RpcEndpoint(url=proxy.url, name="a"), RpcEndpoint(url=devnet.url, name="b")]
    client = ChainClient(proxy.url, CHAIN_ID, endpoints=endpoints)
    try:
        a, b = client.endpoints.rpc(0), client.endpoints.rpc(1)
        alone = judge_boundary([a], (99, forged), (100, honest_100, honest_99))
        before = judge_boundary([a, b], (99, forged), (100, honest_100, honest_99))
        after = judge_boundary(
            [a, b], (99, honest_99), (100, honest_100, forged), committed="after"
        )
        # a consistent rewrite (block 100 names the forged parent): the headers do not hash
        proxy.set_faults([Fault("replace_hash", replace={honest_99: forged})])
        consistent = judge_boundary([a, b], (99, forged), (100, honest_100, honest_99))
    finally:
        client.close()
    assert alone.wrong == "undecided" and alone.true_hash is None
    assert alone.detail == (
        "no endpoint could judge; configure another endpoint in TRACE_RPC_ENDPOINTS; "
        "endpoint a cannot judge: its block 100 does not name its block 99 as parent"
    )
    assert "endpoint a cannot judge: its headers of blocks 99..100 do not hash to the hashes" in (
        consistent.detail
    )
    for verdict in (before, after, consistent):
        assert verdict.wrong == "committed", verdict
        assert verdict.true_hash == honest_99 and verdict.decided_by == (1,)
        assert f"block 99's hash is {honest_99} (recomputed from its header, at endpoint b)" in (
            verdict.detail
        )
        assert "endpoint a cannot judge" in verdict.detail


def trace(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The real `trace` entry, in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.usefixtures("no_dagster_retry_delay")
def test_a_wrong_committed_range_is_replaced_when_the_gap_before_it_is_filled(
    devnet: Devnet,
    test_settings: Settings,
    state: StateStoreResource,
    objects: ObjectStoreResource,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """THIRD committed first, wrong (its first block names a forged parent, where hashes could
    not be recomputed); then FIRST and SECOND are ingested, with a second endpoint configured
    and the one in use (which no longer has block 149) unable to judge: SECOND does not link
    to THIRD, the honest endpoint judges THIRD wrong, THIRD is extracted again from it and
    replaced, and SECOND is committed before it. The wrong version is quarantined (the step's
    log, `trace quarantine list`), and the lie served again is refused."""
    honest = _hash(devnet, SECOND.last)
    top = devnet.finalized
    forged = {_hash(devnet, n): _fake(n) for n in range(top - 40, top + 1)}
    lie = [Fault("replace_hash", replace={**forged, honest: _fake(SECOND.last)})]
    proxy.set_faults(lie)
    settings = test_settings.model_copy(update={"rpc_url": proxy.url, "rpc_max_attempts": 1})
    result, instance = materialize_keys(settings, [THIRD.key])
    assert result.success, failure_description(result)
    wrong = state.versions().read.current_versions("blocks")[THIRD.key]
    assert wrong.manifest.source is not None
    assert wrong.manifest.source["first"]["parent_hash"] == _fake(SECOND.last)

    proxy.set_faults([Fault("missing_block", methods={"eth_getBlockByNumber"}, blocks={149})])
    endpoints = [{"url": proxy.url, "name": "a"}, {"url": devnet.url, "name": "b"}]
    two = settings.model_copy(update={"rpc_endpoints": json.dumps(endpoints)})
    result, _ = materialize_keys(two, [FIRST.key, SECOND.key], instance)
    assert result.success, failure_description(result)
    for name in RAW_DATASETS:
        current = state.versions().read.current_versions(name)
        assert sorted(current) == [FIRST.key, SECOND.key, THIRD.key]
        second, third = current[SECOND.key], current[THIRD.key]
        assert (current[FIRST.key].version, second.version, third.version) == (1, 1, 2)
        assert second.manifest.source is not None and third.manifest.source is not None
        assert second.manifest.source["last"]["hash"] == honest
        assert third.manifest.source["first"]["parent_hash"] == honest

    # quarantined: in the step's log, and listed by `trace quarantine list`
    served_by = proxy.url.split("//")[1]  # the endpoint's host and port (it had no name)
    logged = [e.message for e in instance.all_logs(result.run_id) if "quarantined" in e.message]
    assert any(
        m.startswith(
            f"blocks {THIRD.key} v1 quarantined (boundary_hash at block 149, served by "
            f"{served_by}), replaced by v2: the range {SECOND.key} before it"
        )
        and "at endpoint b" in m
        for m in logged
    ), logged
    monkeypatch.setenv("TRACE_STATE_DSN", state.dsn)
    code, out, err = trace(capsys, "quarantine", "list")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["dataset", "partition", "version", "replaced"]
    assert sorted(r.split()[:7] for r in rows) == [
        [name, THIRD.key, "v1", "v2", "boundary_hash", "149", served_by]
        for name in sorted(RAW_DATASETS)
    ]
    code, out, err = trace(capsys, "quarantine", "list", "--dataset", "blockz")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("trace: unknown dataset 'blockz'"), err
    # the replacement is current: `trace versions`, and the reader's rows
    code, out, _ = trace(capsys, "versions", "blocks", "--partition", THIRD.key)
    assert [r.split()[:3] for r in out.splitlines()[1:]] == [
        ["*", THIRD.key, "v2"],
        [THIRD.key, "v1", "replace"],
    ]
    blocks = state.reader(objects).read("blocks")
    parent = blocks.filter(pa.compute.equal(blocks["block_number"], THIRD.start))["parent_hash"]
    assert parent.to_pylist() == [bytes.fromhex(honest[2:])]

    # the endpoint serves the quarantined blocks again: refused, the replacement stays current
    proxy.set_faults(lie)
    result, _ = materialize_keys(settings, [THIRD.key], instance)
    assert not result.success
    message = failure_description(result)
    assert message.startswith("RangeIncompleteError: "), message
    assert f"are the blocks of blocks {THIRD.key} v1, quarantined as wrong (boundary_hash at " in (
        message
    )
    assert state.versions().read.current_versions("blocks")[THIRD.key].version == 2
