"""Two chains in one deployment, end to end: the session's devnet (chain id 10143, the primary
`monad`) and a second anvil with chain id 31337 (`devnet2`), both declared in TRACE_CHAINS.

The same two ranges are committed for both through Dagster (`raw_chain` and the factory's
`raw_chain__devnet2`, each with its own ChainResource and partitions); each chain's rows equal
its own node's; the query service reads each only as its own chain (`monad.blocks`,
`devnet2.blocks`), and a token limited to one chain cannot see the other's. The secondary
chain follows its own finalized head (`chain_head_sensor__devnet2`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pyarrow as pa
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._core.utils import make_new_run_id

from infra.devnet.generate import GENESIS_TIMESTAMP, generate
from infra.local.query_service import QueryServer, settings_env
from infra.local.services import AnvilNode, MotoS3Server, free_port
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet
from trace_assets.cli.chain import _sync_chain
from trace_assets.definitions import build_definitions, build_resources
from trace_assets.raw.chain import RawChain, build_raw_chain, raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.resources import ChainResource
from trace_resources.settings import QuerySettings, Settings
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, issue_token
from trace_sensors.gap_repair import ATTEMPT_TAG, REASON_TAG, REPAIR_TAG

DEVNET2_ID = 31337
RANGES = 2
BLOCKS = RANGES * RANGE_SIZE


@pytest.fixture(scope="module")
def devnet2(services_root: Path) -> Iterator[AnvilNode]:
    """A second chain: another anvil, another chain id, its own (smaller) traffic."""
    node = AnvilNode(
        services_root / "anvil-devnet2",
        free_port(),
        chain_id=DEVNET2_ID,
        persist=False,
        # another genesis time too: no block of one chain has the hash of the other's
        extra_args=["--timestamp", str(GENESIS_TIMESTAMP + 3600)],
    )
    node.start()
    try:
        generate(
            node.url,
            blocks=BLOCKS,
            txs_per_block=3,
            accounts=10,
            tokens=1,
            seed=11,
            finalize=True,
            chain_id=DEVNET2_ID,
        )
        yield node
    finally:
        node.stop()


def _chains(devnet: Devnet, devnet2: AnvilNode) -> str:
    return json.dumps(
        [
            {
                "name": "monad",
                "chain_id": CHAIN_ID,
                "endpoints": [{"url": devnet.url, "name": "devnet"}],
                "range_size": RANGE_SIZE,
            },
            {
                "name": "devnet2",
                "chain_id": DEVNET2_ID,
                "endpoints": [{"url": devnet2.url, "name": "devnet2-node"}],
                "range_size": RANGE_SIZE,
            },
        ]
    )


@pytest.fixture(scope="module")
def two_chains(
    devnet: Devnet,
    devnet2: AnvilNode,
    postgres: Any,
    new_database: Any,
    s3_server: MotoS3Server,
) -> Iterator[tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]]]:
    """Both chains' first two ranges committed, each by its own asset, in one instance."""
    chains = _chains(devnet, devnet2)
    bucket = f"two-chains-{free_port()}"
    s3_server.s3_client().create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACE_CHAINS", chains)
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        settings = Settings(
            environment="test",
            chains=chains,
            state_dsn=new_database(f"two_chains_{free_port()}", "state"),
            object_store="s3",
            s3_endpoint_url=s3_server.endpoint_url,
            bucket_datasets=bucket,
            rpc_retry_budget_s=20,
            rpc_max_attempts=5,
        )
        keys = [f"{i * RANGE_SIZE:012d}-{(i + 1) * RANGE_SIZE - 1:012d}" for i in range(RANGES)]
        instance = dg.DagsterInstance.ephemeral()
        resources = build_resources(settings)
        results = {}
        for asset in (raw_chain, build_raw_chain(RawChain("devnet2"))):
            assert asset.partitions_def is not None
            instance.add_dynamic_partitions(asset.partitions_def.name, keys)  # type: ignore[attr-defined]
            results[asset.node_def.name] = dg.materialize(
                [asset],
                instance=instance,
                resources=resources,
                raise_on_error=False,
                tags={
                    ASSET_PARTITION_RANGE_START_TAG: keys[0],
                    ASSET_PARTITION_RANGE_END_TAG: keys[-1],
                },
            )
        yield settings, keys, results
        instance.dispose()


def _node_blocks(node_rpc: Any) -> list[dict[str, Any]]:
    return [node_rpc("eth_getBlockByNumber", [hex(n), False]) for n in range(BLOCKS)]


def _committed(settings: Settings, dataset: str) -> pa.Table:
    store = s3_store(settings.bucket_datasets, endpoint_url=settings.s3_endpoint_url)
    return DatasetReader(store, VersionStore(engine_for(settings.state_dsn))).read(dataset)


def _hex(values: pa.ChunkedArray) -> list[str]:
    return ["0x" + v.hex() for v in values.to_pylist()]


def test_the_definitions_carry_each_chain_with_its_own_resource_and_partitions(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
) -> None:
    settings, _, _ = two_chains
    defs = build_definitions(settings)
    graph = defs.resolve_asset_graph()
    assert {"blocks", "devnet2/blocks", "devnet2/transactions", "devnet2/logs"} <= {
        key.to_user_string() for key in graph.get_all_asset_keys()
    }
    secondary = defs.resolve_assets_def(dg.AssetKey(["devnet2", "blocks"]))
    assert secondary.partitions_def.name == "block_ranges__devnet2"  # type: ignore[union-attr]
    assert "chain__devnet2" in secondary.required_resource_keys
    primary = defs.resolve_assets_def(dg.AssetKey("blocks"))
    assert primary.node_def.name == "raw_chain" and "chain" in primary.required_resource_keys
    assert primary.partitions_def.name == "block_ranges"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("chain", "node_fixture", "chain_id", "prefix"),
    [
        ("raw_chain", "devnet", CHAIN_ID, ""),
        ("raw_chain__devnet2", "devnet2", DEVNET2_ID, "devnet2."),
    ],
)
def test_each_chain_commits_its_own_nodes_rows(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    request: pytest.FixtureRequest,
    chain: str,
    node_fixture: str,
    chain_id: int,
    prefix: str,
) -> None:
    settings, keys, results = two_chains
    assert results[chain].success
    node = request.getfixturevalue(node_fixture)
    node_rpc = node.node.rpc if isinstance(node, Devnet) else node.rpc
    blocks = _committed(settings, f"{prefix}blocks")
    expected = _node_blocks(node_rpc)
    assert blocks["block_number"].to_pylist() == list(range(BLOCKS))
    assert _hex(blocks["block_hash"]) == [b["hash"] for b in expected]
    assert set(blocks["chain_id"].to_pylist()) == {chain_id}
    transactions = _committed(settings, f"{prefix}transactions")
    assert sorted(_hex(transactions["transaction_hash"])) == sorted(
        h for b in expected for h in b["transactions"]
    )
    logs = _committed(settings, f"{prefix}logs")
    node_logs = node_rpc("eth_getLogs", [{"fromBlock": "0x0", "toBlock": hex(BLOCKS - 1)}])
    assert logs.num_rows == len(node_logs) > 0
    # registry rows and object paths carry the chain
    versions = VersionStore(engine_for(settings.state_dsn)).read
    for dataset in ("blocks", "transactions", "logs"):
        current = versions.current_versions(f"{prefix}{dataset}")
        assert sorted(current) == keys
        for record in current.values():
            assert all(f.key.startswith(f"{prefix}{dataset}/") for f in record.manifest.files)


@pytest.fixture(scope="module")
def chains_query(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    s3_server: MotoS3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    settings, _, _ = two_chains
    results = f"{settings.bucket_datasets}-results"
    s3_server.s3_client().create_bucket(Bucket=results)
    env = {
        **settings_env(settings),
        **s3_server.env(),
        "TRACE_BUCKET_RESULTS": results,
        "TRACE_QUERY_CACHE_DIR": str(tmp_path_factory.mktemp("query-cache")),
    }
    server = QueryServer(env, log_file=tmp_path_factory.mktemp("uvicorn") / "two-chains.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http
    finally:
        server.stop()


def _ask(client: httpx.Client, sql: str, chains: list[str] | None = None) -> httpx.Response:
    settings = QuerySettings(environment="test")
    token, _ = issue_token(
        Keyring.from_settings(settings), settings, org="acme", subject="a", chains=chains
    )
    return client.post("/v1/query", json={"sql": sql}, headers={"Authorization": f"Bearer {token}"})


def _rows(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 200, response.text
    rows: list[list[Any]] = response.json()["rows"]
    return rows


def test_each_chain_is_read_only_as_itself(chains_query: httpx.Client) -> None:
    summary = "SELECT count(*), min(chain_id), max(chain_id) FROM {}"
    assert _rows(_ask(chains_query, summary.format("monad.blocks"))) == [
        [BLOCKS, CHAIN_ID, CHAIN_ID]
    ]
    assert _rows(_ask(chains_query, summary.format("blocks"))) == [[BLOCKS, CHAIN_ID, CHAIN_ID]]
    assert _rows(_ask(chains_query, summary.format("devnet2.blocks"))) == [
        [BLOCKS, DEVNET2_ID, DEVNET2_ID]
    ]
    shared = "SELECT count(*) FROM monad.blocks m JOIN devnet2.blocks d USING (block_hash)"
    assert _rows(_ask(chains_query, shared)) == [[0]]
    by_chain = _rows(
        _ask(
            chains_query,
            "SELECT (SELECT count(*) FROM devnet2.transactions), "
            "(SELECT count(DISTINCT chain_id) FROM devnet2.transactions)",
        )
    )
    assert by_chain[0][0] > 0 and by_chain[0][1] == 1


def test_a_token_of_one_chain_cannot_see_the_other(chains_query: httpx.Client) -> None:
    for sql, chains in [
        ("SELECT count(*) FROM devnet2.blocks", ["monad"]),
        ("SELECT count(*) FROM devnet2.logs", ["monad"]),
        ("SELECT count(*) FROM monad.blocks", ["devnet2"]),
        ("SELECT count(*) FROM transactions", ["devnet2"]),
    ]:
        response = _ask(chains_query, sql, chains)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "unknown_dataset"
    assert _rows(_ask(chains_query, "SELECT count(*) FROM devnet2.logs", ["devnet2"]))[0][0] > 0
    assert _rows(_ask(chains_query, "SELECT count(*) FROM logs", ["monad"]))[0][0] > 0


def test_a_chains_finality_decides_its_finalized_head(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    devnet2: AnvilNode,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, _, _ = two_chains
    devnet2_config = settings.chain_configs()[1]
    latest = int(devnet2.rpc("eth_blockNumber"), 16)
    tagged = int(devnet2.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
    heads = {}
    for finality in ("finalized", 10):
        config = devnet2_config.model_copy(update={"finality": finality})
        client = ChainResource.from_settings(settings, config).client()
        try:
            heads[finality] = client.head()
        finally:
            client.close()
    assert heads["finalized"].finalized == tagged < latest - 10
    assert heads[10].finalized == latest - 10 and heads[10].chain_id == DEVNET2_ID
    # `trace partitions sync` adds each chain's ranges to its own partitions
    instance = dg.DagsterInstance.ephemeral()
    _sync_chain(instance, settings, devnet2_config)
    added = instance.get_dynamic_partitions("block_ranges__devnet2")
    assert added[:RANGES] == two_chains[1] and len(added) == (tagged + 1) // RANGE_SIZE
    assert instance.get_dynamic_partitions("block_ranges") == []
    assert f"devnet2: added {len(added)} block range(s)" in capsys.readouterr().out


def _covered(result: SensorExecutionData, keys: list[str]) -> list[str]:
    """Every range of `keys` the result's runs cover, in order."""
    covered = []
    for request in result.run_requests or []:
        if request.partition_key is not None:
            covered.append(request.partition_key)
        else:
            first = request.tags[ASSET_PARTITION_RANGE_START_TAG]
            last = request.tags[ASSET_PARTITION_RANGE_END_TAG]
            covered += [k for k in keys if first <= k <= last]  # zero-padded: block order
    return covered


def test_the_secondary_chain_follows_its_own_finalized_head(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    devnet2: AnvilNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, committed, _ = two_chains
    monkeypatch.setenv("TRACE_CHAIN_HEAD_WATCH_S", "0")  # look once: nothing to wait for here
    defs = build_definitions(settings)
    assert defs.resolve_sensor_def("chain_head_sensor") is not None  # the primary's, as ever
    sensor = defs.resolve_sensor_def("chain_head_sensor__devnet2")
    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()

    def evaluate(cursor: str | None) -> SensorExecutionData:
        context = dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={"chain__devnet2": resources["chain__devnet2"], "state": resources["state"]},
            repository_def=defs.get_repository_def(),
        )
        return sensor.evaluate_tick(context)  # as the daemon does: resources by parameter name

    snapshot = devnet2.rpc("evm_snapshot")
    try:
        # devnet2's finalized head moves two ranges past the two committed ones
        devnet2.rpc("anvil_mine", [hex(2 * RANGE_SIZE)])
        finalized = int(devnet2.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        expected = [r.key for r in complete_ranges(-1, finalized, RANGE_SIZE)]
        assert expected[:RANGES] == committed and len(expected) > RANGES

        result = evaluate(None)
        assert result.skip_message is None, result.skip_message
        requests = result.dynamic_partitions_requests or []
        assert {r.partitions_def_name for r in requests} == {"block_ranges__devnet2"}
        assert [k for r in requests for k in r.partition_keys or []] == expected
        # the ranges committed as devnet2.blocks ... are registered, not requested again
        assert _covered(result, expected) == expected[RANGES:]
        devnet2_raw = [dg.AssetKey(["devnet2", n]) for n in ("blocks", "transactions", "logs")]
        assert [list(r.asset_selection or []) for r in result.run_requests or []] == [
            devnet2_raw
        ] * len(result.run_requests or [])
        assert result.cursor == str(int(expected[-1][13:]))

        for request in requests:  # as the daemon applies them
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        assert instance.get_dynamic_partitions("block_ranges__devnet2") == expected
        assert instance.get_dynamic_partitions("block_ranges") == []

        # nothing new finalized: nothing requested
        again = evaluate(result.cursor)
        assert not again.run_requests and not again.dynamic_partitions_requests
        assert f"no complete range past block {result.cursor}" in (again.skip_message or "")
    finally:
        assert devnet2.rpc("evm_revert", [snapshot])


def test_the_secondary_chain_repairs_its_own_gaps(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    devnet2: AnvilNode,
) -> None:
    settings, committed, _ = two_chains
    defs = build_definitions(settings)
    assert defs.resolve_sensor_def("gap_repair_sensor") is not None  # the primary's, as ever
    sensor = defs.resolve_sensor_def("gap_repair_sensor__devnet2")
    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    snapshot = devnet2.rpc("evm_snapshot")
    try:
        devnet2.rpc("anvil_mine", [hex(2 * RANGE_SIZE)])
        finalized = int(devnet2.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        expected = [r.key for r in complete_ranges(-1, finalized, RANGE_SIZE)]
        # every finalized range registered (as the chain-head sensor does), the same keys for
        # the primary; only devnet2's first two are committed (as devnet2.blocks ...)
        instance.add_dynamic_partitions("block_ranges__devnet2", expected)
        instance.add_dynamic_partitions("block_ranges", expected)
        # an unfinished run of the primary over the same ranges does not hold devnet2's back
        primary_run = dg.DagsterRun(
            job_name="raw_chain_job",  # a job's run: no asset selection, the primary's assets
            run_id=make_new_run_id(),
            status=dg.DagsterRunStatus.STARTED,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: expected[0],
                ASSET_PARTITION_RANGE_END_TAG: expected[-1],
            },
        )
        instance.add_run(primary_run)
        # nor does the primary's failed repair of a range with the same key count as devnet2's
        primary_repair = dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id=make_new_run_id(),
            status=dg.DagsterRunStatus.FAILURE,
            asset_selection=frozenset({dg.AssetKey("blocks")}),
            tags={REPAIR_TAG: expected[RANGES], ATTEMPT_TAG: "1"},
        )
        instance.add_run(primary_repair)
        result = sensor(
            dg.build_sensor_context(
                instance=instance,
                resources={
                    "chain__devnet2": resources["chain__devnet2"],
                    "state": resources["state"],
                },
                repository_def=defs.get_repository_def(),
            )
        )
        assert isinstance(result, dg.SensorResult), result
        requests = result.run_requests or []
        assert [r.partition_key for r in requests] == expected[RANGES:] != []
        devnet2_raw = [dg.AssetKey(["devnet2", n]) for n in ("blocks", "transactions", "logs")]
        assert [list(r.asset_selection or []) for r in requests] == [devnet2_raw] * len(requests)
        assert all("devnet2.blocks: never committed" in r.tags[REASON_TAG] for r in requests)
        assert [r.tags[ATTEMPT_TAG] for r in requests] == ["1"] * len(requests)
    finally:
        assert devnet2.rpc("evm_revert", [snapshot])
