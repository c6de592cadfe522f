"""The clear errors Trace raises before cryo is called, as a user meets them.

Each is checked through a Dagster materialisation of `raw_chain` where a user would meet it
there (unreachable RPC, wrong chain id, a range past the finalized head, a malformed partition
key) and through `ChainClient` otherwise (an unknown dataset). For each: the step's failure
says what is wrong and what to do, cryo was never called, nothing was staged or committed, and
errors that retrying cannot fix were not retried by Dagster's RetryPolicy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest

import trace_resources.chain.extract as extract_module
from infra.local.services import free_port
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet
from tests.utils.dagster_runs import (
    committed_rows,
    failure_description,
    materialize_keys,
    no_dagster_retry_delay,  # noqa: F401 - fixture
    step_attempts,
)
from tests.utils.fault_proxy import FaultProxy
from trace_resources import errors
from trace_resources.chain.extract import ChainClient
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.failures import as_dagster_failure
from trace_resources.settings import Settings

pytestmark = pytest.mark.usefixtures("no_dagster_retry_delay")

GOOD_KEY = BlockRange(50, 99).key


@pytest.fixture
def cryo_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every call Trace makes to cryo during the test (the errors here must come first)."""
    calls: list[tuple[str, dict[str, Any]]] = []

    async def fake_collect(dataset: str, **kwargs: Any) -> None:
        calls.append((dataset, kwargs))
        raise AssertionError("cryo must not be called")

    monkeypatch.setattr(extract_module.cryo, "async_collect", fake_collect)
    return calls


@pytest.fixture
def proxy(devnet: Devnet) -> Iterator[FaultProxy]:
    """A fault-free proxy, only to see which JSON-RPC calls Trace made."""
    with FaultProxy(devnet.url) as p:
        yield p


def fast(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(
        update={"rpc_retry_budget_s": 2.0, "rpc_max_attempts": 2, "rpc_timeout_s": 1.0, **update}
    )


def assert_nothing_staged_or_committed(state_dsn: str, s3_client: Any, s3_bucket: str) -> None:
    assert committed_rows(state_dsn) == {
        "versions": [],
        "pointers": [],
        "attempts": [],
        "outbox": [],
    }
    assert s3_client.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


def assert_failed_once(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance) -> str:
    """The step failed on its first attempt (no Dagster retry); what its failure says."""
    assert not result.success
    assert step_attempts(result, instance).restarts == 0
    return failure_description(result)


# -- through Dagster ------------------------------------------------------------------------


def test_rpc_unreachable(
    test_settings: Settings,
    state_dsn: str,
    s3_client: Any,
    s3_bucket: str,
    cryo_calls: list[Any],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result, instance = materialize_keys(fast(test_settings, rpc_url=url), [GOOD_KEY])

    assert not result.success
    message = failure_description(result)
    assert message.startswith(f"RpcUnreachableError: the JSON-RPC endpoint {url} did not answer")
    assert "ConnectError" in message
    assert "retried up to 2 times within 2 s" in message
    assert "check that the node is running and that TRACE_RPC_URL points at it" in message
    # a node can come back: this one is transient, so Dagster's RetryPolicy retries the step
    assert step_attempts(result, instance).restarts == 2
    assert cryo_calls == []
    assert_nothing_staged_or_committed(state_dsn, s3_client, s3_bucket)


def test_wrong_chain_id(
    test_settings: Settings,
    proxy: FaultProxy,
    state_dsn: str,
    s3_client: Any,
    s3_bucket: str,
    cryo_calls: list[Any],
) -> None:
    settings = fast(test_settings, rpc_url=proxy.url, chain_id=1)
    result, instance = materialize_keys(settings, [GOOD_KEY])

    message = assert_failed_once(result, instance)
    assert message == (
        f"WrongChainIdError: the endpoint {proxy.url} serves chain id {CHAIN_ID}, but Trace is "
        "configured for chain id 1: point TRACE_RPC_URL at a node of chain 1, or set "
        f"TRACE_CHAIN_ID={CHAIN_ID} if that chain is meant"
    )
    assert proxy.method_counts() == {"eth_chainId": 1}
    assert cryo_calls == []
    assert_nothing_staged_or_committed(state_dsn, s3_client, s3_bucket)


def test_range_past_the_finalized_head(
    devnet: Devnet,
    test_settings: Settings,
    proxy: FaultProxy,
    state_dsn: str,
    s3_client: Any,
    s3_bucket: str,
    cryo_calls: list[Any],
) -> None:
    finalized = int(devnet.node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
    latest = int(devnet.node.rpc("eth_getBlockByNumber", ["latest", False])["number"], 16)
    start = (finalized + 1) // RANGE_SIZE * RANGE_SIZE  # the range holding finalized + 1
    past = BlockRange(start, start + RANGE_SIZE - 1)
    assert past.start <= finalized + 1 <= past.last

    result, instance = materialize_keys(fast(test_settings, rpc_url=proxy.url), [past.key])

    message = assert_failed_once(result, instance)
    assert message.startswith(
        f"RangeNotFinalizedError: block range {past.key} ends at block {past.last}, past the "
        f"chain's finalized block {finalized} (latest {latest}); Trace commits only finalized "
        "blocks."
    ), message
    assert "Wait until the chain-head sensor adds this range" in message
    assert proxy.method_counts() == {"eth_chainId": 1, "eth_getBlockByNumber": 2}
    assert {str(r.params) for r in proxy.requests if r.method == "eth_getBlockByNumber"} == {
        "['latest', False]",
        "['finalized', False]",
    }
    assert cryo_calls == []
    assert_nothing_staged_or_committed(state_dsn, s3_client, s3_bucket)


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (
            "abc",
            "MalformedPartitionKeyError: partition key 'abc' is malformed: expected two "
            "zero-padded 12-digit block numbers, first and last block inclusive, e.g. "
            "'000000000000-000000009999'",
        ),
        (
            "0-10",
            "MalformedPartitionKeyError: partition key '0-10' is malformed: expected two "
            "zero-padded 12-digit block numbers, first and last block inclusive, e.g. "
            "'000000000000-000000009999'",
        ),
        (
            "000000000099-000000000050",
            "MalformedPartitionKeyError: block range 99..50 is empty or negative; "
            "a range needs 0 <= start <= last",
        ),
    ],
    ids=["letters", "not-zero-padded", "reversed"],
)
def test_malformed_partition_key(
    test_settings: Settings,
    proxy: FaultProxy,
    state_dsn: str,
    s3_client: Any,
    s3_bucket: str,
    cryo_calls: list[Any],
    key: str,
    says: str,
) -> None:
    result, instance = materialize_keys(fast(test_settings, rpc_url=proxy.url), [key])

    assert assert_failed_once(result, instance) == says
    assert proxy.requests == []  # refused before any RPC call
    assert cryo_calls == []
    assert_nothing_staged_or_committed(state_dsn, s3_client, s3_bucket)


# -- through ChainClient ------------------------------------------------------------------


def test_unknown_dataset(proxy: FaultProxy, cryo_calls: list[Any]) -> None:
    client = ChainClient(proxy.url, CHAIN_ID)
    try:
        with pytest.raises(errors.UnknownDatasetError) as excinfo:
            client.preflight([BlockRange(50, 99)], ["blocks", "nope"])
    finally:
        client.close()
    assert str(excinfo.value) == (
        f"unknown raw dataset(s) 'nope': Trace extracts {', '.join(RAW_DATASETS)}"
    )
    assert proxy.requests == []  # refused before any RPC call
    assert cryo_calls == []


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (errors.WrongChainIdError, False),
        (errors.RangeNotFinalizedError, False),
        (errors.UnknownDatasetError, False),
        (errors.MalformedPartitionKeyError, False),
        (errors.RpcUnreachableError, True),
        (errors.RpcFaultError, True),
        (errors.RangeIncompleteError, True),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_only_transient_errors_are_left_to_dagster_retries(
    error: type[errors.TraceError], retried: bool
) -> None:
    with pytest.raises(dg.Failure) as excinfo, as_dagster_failure():
        raise error("what went wrong; what to do")
    assert excinfo.value.allow_retries is retried
    assert excinfo.value.description == f"{error.__name__}: what went wrong; what to do"
    assert excinfo.value.metadata["error"].value == error.__name__
