"""RPC faults through Dagster: a FaultProxy between Trace and the session devnet.

What a user relies on, checked end to end (the `raw_chain` asset, S3 API, Postgres):
- transient faults (HTTP 429/5xx, JSON-RPC -32603/-32005, a held request, dropped
  connections) on the calls cryo and Trace make are retried inside the step: the run
  succeeds and the committed data equals a fault-free extraction;
- persistent faults and data faults (a node dropping logs, transactions or blocks) fail the
  run with an error naming the problem (and the blocks), within the retry budget; the bad
  range is never committed, the ranges verified before it are (once: retries resume after
  them).

Budgets are small (3 attempts, 2 where the run is meant to fail, within 4 s per operation; a
3 s cryo collect timeout) and the asset's Dagster RetryPolicy keeps its retry count but not its
5 s/15 s delays (`no_dagster_retry_delay`), so the file runs in well under a minute.
"""

from __future__ import annotations

import time
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.conftest import CHAIN_ID, Devnet
from tests.utils.dagster_runs import (
    committed_rows,
    failure_description,
    materialize_keys,
    no_dagster_retry_delay,  # noqa: F401 - fixture
    step_attempts,
)
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings

pytestmark = pytest.mark.usefixtures("no_dagster_retry_delay")

RANGES = [BlockRange(50, 99), BlockRange(100, 149)]
KEYS = [r.key for r in RANGES]
BUDGET_S = 4.0
MAX_ATTEMPTS = 3
MAX_ATTEMPTS_FAILING = 2  # failing cases run 3 step attempts of these each: keep them short
COLLECT_TIMEOUT_S = 3.0
RPC_TIMEOUT_S = 1.0
DAGSTER_ATTEMPTS = 3  # raw_chain's RetryPolicy(max_retries=2)
# one step attempt: the retry budget, plus the extraction running when it ran out (bounded by
# the collect timeout), plus slack for Dagster, staging and a loaded machine
STEP_ATTEMPT_BOUND_S = BUDGET_S + COLLECT_TIMEOUT_S + 3.0

SORT_KEYS: dict[str, list[tuple[str, str]]] = {
    "blocks": [("block_number", "ascending")],
    "transactions": [("block_number", "ascending"), ("transaction_index", "ascending")],
    "logs": [("block_number", "ascending"), ("log_index", "ascending")],
}


def proxied(settings: Settings, proxy: FaultProxy, max_attempts: int = MAX_ATTEMPTS) -> Settings:
    return settings.model_copy(
        update={
            "rpc_url": proxy.url,
            "rpc_retry_budget_s": BUDGET_S,
            "rpc_max_attempts": max_attempts,
            "rpc_collect_timeout_s": COLLECT_TIMEOUT_S,
            "rpc_timeout_s": RPC_TIMEOUT_S,
        }
    )


@pytest.fixture(scope="module")
def clean(devnet: Devnet) -> dict[str, pa.Table]:
    """A fault-free extraction of RANGES straight from the devnet, cross-checked against it."""
    client = ChainClient(devnet.url, CHAIN_ID)
    try:
        data = [client.extract_range(r) for r in RANGES]
    finally:
        client.close()
    tables: dict[str, pa.Table] = {
        name: pa.concat_tables([d.tables[name] for d in data]).sort_by(SORT_KEYS[name])
        for name in RAW_DATASETS
    }
    # the reference itself equals the node's own answers
    hashes, logs = set(), 0
    for r in RANGES:
        for n in r.blocks():
            hashes |= set(devnet.node.rpc("eth_getBlockByNumber", [hex(n), False])["transactions"])
        logs += len(
            devnet.node.rpc("eth_getLogs", [{"fromBlock": hex(r.start), "toBlock": hex(r.last)}])
        )
    assert {
        "0x" + h.hex() for h in tables["transactions"]["transaction_hash"].to_pylist()
    } == hashes
    assert tables["logs"].num_rows == logs
    assert tables["blocks"]["block_number"].to_pylist() == [n for r in RANGES for n in r.blocks()]
    # the blocks the data faults below target carry transactions and logs
    for n in (120, 121, 130, 140):
        assert (
            tables["transactions"]
            .filter(pc.equal(tables["transactions"]["block_number"], n))
            .num_rows
            > 1
        )
        assert tables["logs"].filter(pc.equal(tables["logs"]["block_number"], n)).num_rows > 0
    return tables


def extraction_attempts(proxy: FaultProxy, block_range: BlockRange) -> int:
    """Extractions of a range that ran to the end: each makes one answered batch of
    eth_getBlockByNumber (Trace's own call: the range's headers; cryo sends no batches)."""
    return len(
        {
            r.seq
            for r in proxy.requests
            if r.method == "eth_getBlockByNumber"
            and r.batch
            and r.fault is None
            and r.params == [hex(block_range.start), False]
        }
    )


def assert_nothing_committed(state_dsn: str, state: StateStoreResource) -> None:
    rows = committed_rows(state_dsn)
    assert rows["versions"] == [] and rows["pointers"] == [] and rows["outbox"] == []
    assert all(s != "committed" for _, _, s in rows["attempts"]), rows["attempts"]
    versions = state.versions()
    for name in RAW_DATASETS:
        assert versions.read.current_versions(name) == {}


# -- transient faults: retried, the run succeeds, the data is complete -------------------------

# How each transient fault is absorbed, as measured with cryo 0.3.2:
RE_EXTRACTED = "Trace re-runs the extraction"  # cryo fails on it without retrying
CRYO_RETRY = "cryo retries the call"  # JSON-RPC rate-limit errors (-32005, 429)
CRYO_FALLBACK = "cryo falls back to eth_getTransactionReceipt"  # any eth_getBlockReceipts error
RPC_RETRY = "Trace's JsonRpcClient retries the call"  # Trace's own calls

TRANSIENT = [
    # cryo's calls
    pytest.param(
        dict(kind="http_429", methods={"eth_getLogs"}, count=2), RE_EXTRACTED, id="429-text-getLogs"
    ),
    pytest.param(
        dict(kind="http_5xx", status=503, methods={"eth_getBlockByNumber"}, blocks={55}, count=2),
        RE_EXTRACTED,
        id="503-text-getBlockByNumber",
    ),
    pytest.param(
        dict(kind="http_5xx", status=500, json_body=True, methods={"eth_getLogs"}, count=2),
        RE_EXTRACTED,
        id="500-json-getLogs",
    ),
    pytest.param(
        dict(
            kind="jsonrpc_error",
            code=-32603,
            message="internal error",
            methods={"eth_getBlockByNumber"},
            blocks={120},
            count=2,
        ),
        RE_EXTRACTED,
        id="rpc-32603-getBlockByNumber",
    ),
    pytest.param(
        dict(
            kind="timeout",
            delay=COLLECT_TIMEOUT_S + 2,
            methods={"eth_getBlockReceipts"},
            blocks={75},
            count=1,
        ),
        RE_EXTRACTED,
        id="held-getBlockReceipts",
    ),
    pytest.param(
        dict(kind="drop", methods={"eth_getLogs"}, count=2), RE_EXTRACTED, id="drop-getLogs"
    ),
    pytest.param(
        dict(kind="jsonrpc_error", methods={"eth_getLogs"}, count=3),
        CRYO_RETRY,
        id="rpc-32005-getLogs",
    ),
    pytest.param(
        dict(kind="http_5xx", status=503, methods={"eth_getBlockReceipts"}, count=2),
        CRYO_FALLBACK,
        id="503-text-getBlockReceipts",
    ),
    # Trace's own calls
    pytest.param(
        dict(kind="http_429", methods={"eth_chainId"}, count=2), RPC_RETRY, id="429-text-chainId"
    ),
    pytest.param(
        dict(
            kind="jsonrpc_error",
            code=-32603,
            message="internal error",
            methods={"eth_getBlockByNumber"},
            count=2,
        ),
        RPC_RETRY,
        id="rpc-32603-head",
    ),
    pytest.param(
        dict(
            kind="drop",
            methods={"eth_getBlockByNumber"},
            blocks={RANGES[0].start},
            batch=True,
            count=2,
        ),
        RPC_RETRY,
        id="drop-headers",
    ),
    pytest.param(
        dict(
            kind="timeout",
            delay=RPC_TIMEOUT_S + 2,
            methods={"eth_getBlockByNumber"},
            blocks={RANGES[0].start},
            batch=True,
            count=1,
        ),
        RPC_RETRY,
        id="held-headers",
    ),
]


@pytest.mark.parametrize(("spec", "recovery"), TRANSIENT)
def test_transient_faults_are_retried_and_the_data_is_complete(
    devnet: Devnet,
    test_settings: Settings,
    objects: ObjectStoreResource,
    state: StateStoreResource,
    clean: dict[str, pa.Table],
    spec: dict[str, Any],
    recovery: str,
) -> None:
    fault = Fault(**spec)
    with FaultProxy(devnet.url, [fault]) as proxy:
        result, instance = materialize_keys(proxied(test_settings, proxy), KEYS)
        records = proxy.requests
        attempts = sum(extraction_attempts(proxy, r) for r in RANGES)

    assert result.success, failure_description(result)
    # the faults were injected, exactly as often as asked
    assert fault.injected == spec["count"]
    assert proxy.injected == {spec["kind"]: spec["count"]}
    # every faulted call was answered later: asked again, or (cryo's fallback) each receipt of
    # the block asked for one by one
    answered = {(r.method, str(r.params)) for r in records if r.fault is None}
    faulted = [r for r in records if r.fault is not None]
    for call in faulted:
        if recovery == CRYO_FALLBACK:
            block = int(call.params[0], 16)
            txs = clean["transactions"].filter(
                pc.equal(clean["transactions"]["block_number"], block)
            )
            for h in txs["transaction_hash"].to_pylist():
                assert ("eth_getTransactionReceipt", str(["0x" + h.hex()])) in answered
        else:
            assert (call.method, str(call.params)) in answered, call
    # ... inside one extraction, or by Trace re-running it
    if recovery == RE_EXTRACTED:
        assert attempts > len(RANGES)
    else:
        assert attempts == len(RANGES)
    # ... all inside the step: Dagster did not have to retry it
    assert step_attempts(result, instance).restarts == 0

    # one version of each range of each dataset, equal to the fault-free extraction
    reader = state.reader(objects)
    for name in RAW_DATASETS:
        current = state.versions().read.current_versions(name)
        assert {k: v.version for k, v in current.items()} == {k: 1 for k in KEYS}
        committed = reader.read(name).sort_by(SORT_KEYS[name])
        assert committed.num_rows == clean[name].num_rows, name
        assert committed.equals(clean[name], check_metadata=False), name


# -- persistent and data faults: a clear error, within the budget, nothing committed ----------

# (fault, ranges of the run, does the step get as far as extracting?, error, what it says)
FAILING = [
    # persistent transport / JSON-RPC faults: RpcFaultError or RpcUnreachableError
    pytest.param(
        dict(kind="http_429", methods={"eth_getLogs"}),
        RANGES[:1],
        True,
        "RpcFaultError",
        ["cryo could not extract blocks 50..99", "HTTP 429", "TRACE_RPC_REQUESTS_PER_SECOND"],
        id="persistent-429-getLogs",
    ),
    pytest.param(
        dict(kind="http_5xx", status=503),
        RANGES[:1],
        False,
        "RpcFaultError",
        ["kept failing eth_chainId", "503 Service Unavailable"],
        id="persistent-503-all",
    ),
    pytest.param(
        dict(kind="drop"),
        RANGES[:1],
        False,
        "RpcUnreachableError",
        [
            "did not answer eth_chainId",
            f"retried up to {MAX_ATTEMPTS_FAILING} times within {BUDGET_S:.0f} s",
            "TRACE_RPC_URL",
        ],
        id="persistent-drop-all",
    ),
    pytest.param(
        dict(
            kind="jsonrpc_error",
            code=-32603,
            message="internal error",
            methods={"eth_getBlockByNumber"},
            blocks={RANGES[0].start},
            batch=True,
        ),
        RANGES[:1],
        False,  # cryo runs, but Trace's own header batch never gets an answer
        "RpcFaultError",
        ["kept failing eth_getBlockByNumber", "-32603: internal error"],
        id="persistent-32603-headers",
    ),
    # data faults: RangeIncompleteError naming the blocks. Missing logs hit the second range
    # of a two-range run: the first range, verified and already staged, is not committed either
    pytest.param(
        dict(kind="missing_logs", blocks={120, 121}),
        RANGES,
        True,
        "RangeIncompleteError",
        ["blocks 100..149 failed verification", "logs missing", "blocks 120, 121"],
        id="missing-logs",
    ),
    pytest.param(
        # cryo's answer only: Trace's own headers (one batch) still list every transaction
        dict(kind="truncate_txs", methods={"eth_getBlockByNumber"}, blocks={130}, batch=False),
        RANGES[1:],
        True,
        "RangeIncompleteError",
        ["blocks 100..149 failed verification", "transactions missing: blocks 130"],
        id="truncated-txs",
    ),
    pytest.param(
        dict(kind="missing_block", methods={"eth_getBlockByNumber"}, blocks={140}),
        RANGES[1:],
        True,
        "RangeIncompleteError",
        ["blocks 100..149", "missing blocks (the node returned no block for them): blocks 140"],
        id="missing-block",
    ),
]


@pytest.mark.parametrize(("spec", "ranges", "extracted", "error", "says"), FAILING)
def test_persistent_and_data_faults_fail_clearly_and_commit_no_bad_range(
    devnet: Devnet,
    test_settings: Settings,
    state_dsn: str,
    state: StateStoreResource,
    spec: dict[str, Any],
    ranges: list[BlockRange],
    extracted: bool,
    error: str,
    says: list[str],
) -> None:
    fault = Fault(**spec)
    keys = [r.key for r in ranges]
    with FaultProxy(devnet.url, [fault]) as proxy:
        started = time.monotonic()
        settings = proxied(test_settings, proxy, max_attempts=MAX_ATTEMPTS_FAILING)
        result, instance = materialize_keys(settings, keys)
        elapsed = time.monotonic() - started
        attempts = extraction_attempts(proxy, ranges[-1])
        good_extracted = [extraction_attempts(proxy, r) for r in ranges[:-1]]

    assert not result.success
    assert fault.injected > 0
    message = failure_description(result)
    assert message.startswith(f"{error}: "), message
    for text in says:
        assert text in message, (text, message)
    data = result.failure_data_for_node("raw_chain")
    assert data is not None and data.user_failure_data is not None
    assert data.user_failure_data.metadata["error"].value == error

    # transient by nature, so Dagster's RetryPolicy retried the step twice; every step attempt
    # gave up within the retry budget (not after cryo's or the node's own timeouts)
    steps = step_attempts(result, instance)
    assert steps.restarts == DAGSTER_ATTEMPTS - 1
    assert len(steps.durations) == DAGSTER_ATTEMPTS
    assert all(d < STEP_ATTEMPT_BOUND_S for d in steps.durations), steps.durations
    assert elapsed < DAGSTER_ATTEMPTS * STEP_ATTEMPT_BOUND_S
    if extracted:
        # the faulty range was extracted again inside each step attempt
        assert DAGSTER_ATTEMPTS < attempts <= DAGSTER_ATTEMPTS * MAX_ATTEMPTS_FAILING, attempts
    else:
        assert attempts == 0

    if not extracted or len(ranges) == 1:
        assert_nothing_committed(state_dsn, state)
        return
    # the good range(s) before the bad one committed once, as they verified; the step's
    # retries resumed after them (extracted once), and the bad range was never committed
    assert good_extracted == [1] * (len(ranges) - 1), good_extracted
    for name in RAW_DATASETS:
        assert sorted(state.versions().read.current_versions(name)) == keys[:-1], name


# -- a run over many ranges keeps what it verified -------------------------------------------


def test_a_bad_range_keeps_the_ranges_before_it_and_a_retry_resumes_after_them(
    devnet: Devnet, test_settings: Settings, state_dsn: str, state: StateStoreResource
) -> None:
    """Ranges commit one by one as they verify: a range the node answers wrongly fails the
    run, the ranges verified before it stay committed (and show as materialised in Dagster),
    and the step's retries extract only what is left."""
    fault = Fault(kind="missing_block", methods={"eth_getBlockByNumber"}, blocks={140})
    with FaultProxy(devnet.url, [fault]) as proxy:
        settings = proxied(test_settings, proxy, max_attempts=MAX_ATTEMPTS_FAILING)
        result, instance = materialize_keys(settings, KEYS)
        good, bad = (extraction_attempts(proxy, r) for r in RANGES)

    assert not result.success
    assert "blocks 140" in failure_description(result)
    assert step_attempts(result, instance).restarts == DAGSTER_ATTEMPTS - 1
    # the good range was extracted once; every step attempt extracted the bad one again
    assert good == 1, good
    assert bad >= DAGSTER_ATTEMPTS, bad
    versions = state.versions()
    for name in RAW_DATASETS:
        assert list(versions.read.current_versions(name)) == [KEYS[0]], name
    # Dagster shows the committed range as materialised, with its own rows and version
    for name in RAW_DATASETS:
        events = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(name)), limit=10
        ).records
        partitions = {e.partition_key for e in events}
        assert partitions == {KEYS[0]}, (name, partitions)
        metadata = events[0].asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["trace/version"].value == 1
        assert (
            metadata["dagster/row_count"].value
            == versions.read.current_versions(name)[KEYS[0]].manifest.rows
        )
    logs = [
        e.message
        for e in instance.all_logs(result.run_id)
        if e.message and "committed" in e.message
    ]
    assert any("range 1/2 " + KEYS[0] + " committed" in m for m in logs), logs
    assert any("resuming with the 1 other" in m for m in logs), logs
    assert any("1 of 2 range(s) were committed before the failure" in m for m in logs), logs

    # the node answers right again: a new run commits the bad range; the good one keeps its
    # version (identical data is no new version)
    result, instance = materialize_keys(test_settings, KEYS)
    assert result.success
    for name in RAW_DATASETS:
        current = versions.read.current_versions(name)
        assert sorted(current) == KEYS
        assert current[KEYS[0]].version == 1, name
    per_partition = {
        e.partition_key: e.asset_materialization.metadata  # type: ignore[union-attr]
        for e in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("blocks")), limit=10
        ).records
    }
    assert {k: m["dagster/row_count"].value for k, m in per_partition.items()} == {
        r.key: r.size for r in RANGES
    }
