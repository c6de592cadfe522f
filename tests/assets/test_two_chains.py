"""Two chains in one deployment, end to end: the session's devnet (chain id 10143, the primary
`monad`) and a second anvil with chain id 31337 (`devnet2`), both declared in TRACE_CHAINS.

The same two ranges are committed for both through Dagster (`raw_chain` and the factory's
`raw_chain__devnet2`, each with its own ChainResource and partitions); each chain's rows equal
its own node's; the query service reads each only as its own chain (`monad.blocks`,
`devnet2.blocks`), and a token limited to one chain cannot see the other's. The secondary
chain follows its own finalized head (`chain_head_sensor__devnet2`), and derives the primary's
datasets from its own raw ones (`devnet2.erc20_transfers` ..., requested by the same
automation conditions).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
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
from tests.utils.dagster_runs import requested_ranges
from trace_assets.cli.chain import _sync_chain
from trace_assets.definitions import build_definitions, build_resources
from trace_assets.derived import transforms
from trace_assets.derived.assets import DERIVED_ASSETS, build_chain_derived
from trace_assets.raw.chain import RawChain, build_raw_chain, raw_chain
from trace_resources.chain.ranges import complete_ranges
from trace_resources.registry import arrow_schema, declarations
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
PARTITIONED_DERIVED = ("erc20_transfers", "native_transfers", "transaction_fees", "contracts")
ROLLUPS = ("token_daily_volume", "token_holders")
DEVNET2_RANGE_ASSETS = {
    dg.AssetKey(["devnet2", n]) for n in ("blocks", "transactions", "logs", *PARTITIONED_DERIVED)
}


@dataclass
class Automation:
    """The module's Dagster instance and the automation's cursor (its baseline tick taken
    before anything was committed, so the raw commits count as new upstream data)."""

    instance: dg.DagsterInstance
    cursor: Any = None


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
def automation() -> Iterator[Automation]:
    instance = dg.DagsterInstance.ephemeral()
    try:
        yield Automation(instance)
    finally:
        instance.dispose()


@pytest.fixture(scope="module")
def two_chains(
    devnet: Devnet,
    devnet2: AnvilNode,
    postgres: Any,
    new_database: Any,
    s3_server: MotoS3Server,
    automation: Automation,
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
        instance = automation.instance
        resources = build_resources(settings)
        results = {}
        for name in ("block_ranges", "block_ranges__devnet2"):
            instance.add_dynamic_partitions(name, keys)
        automation.cursor = _tick(settings, automation).cursor  # the baseline: nothing yet
        for asset in (raw_chain, build_raw_chain(RawChain("devnet2"))):
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


def _tick(settings: Settings, automation: Automation) -> dg.EvaluateAutomationConditionsResult:
    """One evaluation of the automation conditions, as the daemon's tick does."""
    with warnings.catch_warnings():  # dagster 1.13.27 selects with its own beta parameter
        warnings.filterwarnings("ignore", message="Parameter `include_sources`")
        result = dg.evaluate_automation_conditions(
            defs=build_definitions(settings), instance=automation.instance, cursor=automation.cursor
        )
    automation.cursor = result.cursor
    return result


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
    # devnet2 derives the primary's datasets from its own raw ones, with the same automation;
    # the asset checks and what is derived from call traces stay the primary's
    for name in (*PARTITIONED_DERIVED, *ROLLUPS):
        mine, theirs = dg.AssetKey(["devnet2", name]), dg.AssetKey(name)
        assert {tuple(p.path) for p in graph.get(mine).parent_keys} == {
            ("devnet2", *p.path) for p in graph.get(theirs).parent_keys
        }
        assert str(graph.get(mine).automation_condition) == str(
            graph.get(theirs).automation_condition
        )
        derived = defs.resolve_assets_def(mine)
        assert derived.partitions_def == (
            secondary.partitions_def if name in PARTITIONED_DERIVED else None
        )
        assert not list(derived.check_specs) and list(defs.resolve_assets_def(theirs).check_specs)
    assert not {"devnet2/geth_calls", "devnet2/traced_native_transfers"} & {
        key.to_user_string() for key in graph.get_all_asset_keys()
    }


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
    safe = int(devnet2.rpc("eth_getBlockByNumber", ["safe", False])["number"], 16)
    heads, followed = {}, {}
    for finality in ("finalized", "safe", 10):
        config = devnet2_config.model_copy(update={"finality": finality})
        client = ChainResource.from_settings(settings, config).client()
        try:
            heads[finality] = client.head()
            followed[finality] = client.heads()  # what the head follower reads
        finally:
            client.close()
    assert heads["finalized"].finalized == tagged < safe < latest - 10
    assert heads["safe"].finalized == safe
    assert heads[10].finalized == latest - 10 and heads[10].chain_id == DEVNET2_ID
    assert {f: h.finalized for f, h in followed.items()} == {
        f: h.finalized for f, h in heads.items()
    }
    # `trace partitions sync` adds each chain's ranges to its own partitions
    instance = dg.DagsterInstance.ephemeral()
    _sync_chain(instance, settings, devnet2_config)
    added = instance.get_dynamic_partitions("block_ranges__devnet2")
    assert added[:RANGES] == two_chains[1] and len(added) == (tagged + 1) // RANGE_SIZE
    assert instance.get_dynamic_partitions("block_ranges") == []
    assert f"devnet2: added {len(added)} block range(s)" in capsys.readouterr().out


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
        assert requested_ranges(result, expected) == expected[RANGES:]
        # its runs hold devnet2's raw datasets and its block-range datasets derived from them
        assert [set(r.asset_selection or []) for r in result.run_requests or []] == [
            DEVNET2_RANGE_ASSETS
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
        assert [set(r.asset_selection or []) for r in requests] == [DEVNET2_RANGE_ASSETS] * len(
            requests
        )
        assert all("devnet2.blocks: never committed" in r.tags[REASON_TAG] for r in requests)
        assert [r.tags[ATTEMPT_TAG] for r in requests] == ["1"] * len(requests)
    finally:
        assert devnet2.rpc("evm_revert", [snapshot])


def _automation_requested(
    tick: dg.EvaluateAutomationConditionsResult, path: list[str]
) -> list[str]:
    return sorted(str(k) for k in tick.get_requested_partitions(dg.AssetKey(path)))


@pytest.fixture(scope="module")
def two_chains_derived(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    automation: Automation,
) -> dict[str, Any]:
    """Both chains' derived datasets, materialised as the automation requests them: the
    block-range ones once the raw ranges are committed, then the rollups (what each tick
    requested is returned, by asset key)."""
    settings, keys, results = two_chains
    assert all(r.success for r in results.values())
    chains = {
        "": [raw_chain, *DERIVED_ASSETS],
        "devnet2": [build_raw_chain(RawChain("devnet2")), *build_chain_derived("devnet2")],
    }
    assets = [a for group in chains.values() for a in group]
    requested: dict[str, list[str]] = {}
    resources = build_resources(settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACE_CHAINS", settings.chains or "")
        tick = _tick(settings, automation)
        for prefix, group in chains.items():
            paths = [[prefix, n] if prefix else [n] for n in PARTITIONED_DERIVED]
            requested |= {"/".join(p): _automation_requested(tick, p) for p in paths}
            partitioned = [a for a in group[1:] if a.partitions_def is not None]
            result = dg.materialize(
                assets,
                instance=automation.instance,
                resources=resources,
                selection=dg.AssetSelection.assets(*partitioned),
                tags={
                    ASSET_PARTITION_RANGE_START_TAG: keys[0],
                    ASSET_PARTITION_RANGE_END_TAG: keys[-1],
                },
            )
            assert result.success
        tick = _tick(settings, automation)
        rollups = [a for group in chains.values() for a in group[1:] if a.partitions_def is None]
        requested |= {
            a.key.to_user_string(): ["*"] for a in rollups if tick.get_num_requested(a.key)
        }
        result = dg.materialize(
            assets,
            instance=automation.instance,
            resources=resources,
            selection=dg.AssetSelection.assets(*rollups),
        )
        assert result.success
    return requested


def test_each_chain_derives_its_datasets_when_its_raw_ranges_commit(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    two_chains_derived: dict[str, Any],
) -> None:
    settings, keys, _ = two_chains
    # the same automation (eager on new upstream data) requested both chains' datasets
    for name in PARTITIONED_DERIVED:
        assert two_chains_derived[name] == keys
        assert two_chains_derived[f"devnet2/{name}"] == keys
    for name in ROLLUPS:
        assert two_chains_derived[name] == two_chains_derived[f"devnet2/{name}"] == ["*"]

    versions = VersionStore(engine_for(settings.state_dsn)).read
    by_chain: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for prefix, chain_id in (("", CHAIN_ID), ("devnet2.", DEVNET2_ID)):
        raw = {n: _committed(settings, f"{prefix}{n}") for n in ("blocks", "transactions", "logs")}
        rows = by_chain.setdefault(prefix, {})
        for name in PARTITIONED_DERIVED:
            decl = declarations()[name]
            # the primary's transform over this chain's own committed raw tables
            expected = getattr(transforms, name)(**{up: raw[up] for up in decl.upstream})
            rows[name] = _sorted_rows(_committed(settings, f"{prefix}{name}"), decl)
            assert rows[name] == _sorted_rows(expected, decl), f"{prefix}{name}"
            assert {r["chain_id"] for r in rows[name]} == {chain_id}
            current = versions.current_versions(f"{prefix}{name}")
            assert sorted(current) == keys
            for record in current.values():  # registry rows and object paths carry the chain
                assert all(f.key.startswith(f"{prefix}{name}/") for f in record.manifest.files)
        # the rollups fold in this chain's erc20_transfers only
        transfers = _committed(settings, f"{prefix}erc20_transfers")
        tags = {
            k: f"{k}@v{r.version}"
            for k, r in versions.current_versions(f"{prefix}erc20_transfers").items()
        }
        for name in ROLLUPS:
            decl = declarations()[name]
            expected = getattr(transforms, _ROLLUP_TRANSFORMS[name])(transfers, tags)
            rows[name] = _sorted_rows(_committed(settings, f"{prefix}{name}"), decl)
            assert rows[name] == _sorted_rows(expected, decl) != [], f"{prefix}{name}"
    for name in (*PARTITIONED_DERIVED, *ROLLUPS):
        if name != "contracts":  # the same deployments on both chains' genesis might agree
            assert by_chain[""][name] != by_chain["devnet2."][name], name


_ROLLUP_TRANSFORMS = {"token_daily_volume": "daily_volume", "token_holders": "token_holders"}


def _sorted_rows(table: pa.Table, decl: Any) -> list[dict[str, Any]]:
    table = table.select(decl.column_names).cast(arrow_schema(decl))
    sortable = [
        f.name for f in table.schema if not pa.types.is_list(f.type) and f.name != "value_f64"
    ]
    return table.sort_by([(c, "ascending") for c in sortable]).to_pylist()


def test_each_chains_derived_datasets_are_read_only_as_itself(
    two_chains: tuple[Settings, list[str], dict[str, dg.ExecuteInProcessResult]],
    two_chains_derived: dict[str, Any],
    chains_query: httpx.Client,
) -> None:
    settings, _, _ = two_chains
    for chain, other, prefix, chain_id in (
        ("monad", "devnet2", "", CHAIN_ID),
        ("devnet2", "monad", "devnet2.", DEVNET2_ID),
    ):
        for name in (*PARTITIONED_DERIVED, *ROLLUPS):
            rows = _committed(settings, f"{prefix}{name}").num_rows
            sql = f"SELECT count(*), min(chain_id), max(chain_id) FROM {chain}.{name}"
            assert _rows(_ask(chains_query, sql, [chain])) == [[rows, chain_id, chain_id]], sql
            response = _ask(chains_query, sql, [other])
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "unknown_dataset"
