"""Several chains through the query service: a secondary chain's datasets are `<chain>.<dataset>`,
SQL addresses chains as schemas (`monad.blocks` beside `devnet2.blocks`), the catalogue names
each dataset's chain, and a token limited to chains sees another chain's datasets exactly as it
sees datasets that do not exist.

The secondary chain's `devnet2.blocks` is committed through the commit protocol (the same
writer the other query tests use) from the first committed range of `blocks`, with chain id
`DEVNET2_ID` and five rows, so each chain's answer is recognisably its own; it goes to a state
database of its own, so the package's other modules see no second chain. The service runs with
TRACE_CHAINS naming both chains (the primary is the world's devnet).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from infra.local.services import PostgresServer
from tests.conftest import CHAIN_ID, RANGE_SIZE, NewDatabase
from tests.query.conftest import Tokens, World, _new_database, _serve, bearer
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.tokens import issue_token

DEVNET2_ID = 31337
DEVNET2_ROWS = 5


def _chains(world: World) -> str:
    return json.dumps(
        [
            {
                "name": "monad",
                "chain_id": CHAIN_ID,
                "endpoints": [{"url": world.settings.rpc_url}],
                "range_size": RANGE_SIZE,
            },
            # never contacted here: the query service reads only committed files
            {
                "name": "devnet2",
                "chain_id": DEVNET2_ID,
                "endpoints": [{"url": "http://127.0.0.1:9"}],
            },
        ]
    )


@pytest.fixture(scope="module")
def chains_world(
    world: World, postgres: PostgresServer, new_database: NewDatabase
) -> Iterator[World]:
    """A state database of its own (the package's world stays single-chain) holding the
    first range of the primary's `blocks`, five blocks of `devnet2.blocks` and an org dataset."""
    chains = _chains(world)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACE_CHAINS", chains)  # the in-process access rule, as the service sees it
        state_dsn = _new_database(postgres, new_database, f"q{os.getpid()}_chains", "state")
        settings = world.settings.model_copy(update={"chains": chains, "state_dsn": state_dsn})
        built = World(settings, world.store, world.keys[:1])
        blocks = DatasetReader(world.store, world.versions()).read("blocks")
        first = blocks.filter(pc.less(blocks["block_number"], RANGE_SIZE))
        own = first.slice(0, DEVNET2_ROWS)
        own = own.set_column(
            0, own.schema.field(0), pa.array([DEVNET2_ID] * DEVNET2_ROWS, pa.uint64())
        )
        writer = built.writer()
        writer.write("blocks", world.keys[0], PartitionData(first))
        writer.write("devnet2.blocks", world.keys[0], PartitionData(own))
        labels = pa.table({"label": ["acme-1", "acme-2"]})
        writer.write("org_acme__labels", UNPARTITIONED, PartitionData(labels))
        yield built


@pytest.fixture(scope="module")
def chains_client(
    chains_world: World, aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    log = tmp_path_factory.mktemp("uvicorn") / "chains.log"
    serving = _serve(chains_world.settings, log, aws_env)
    server = next(serving)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http
    finally:
        serving.close()  # stops the server


def _token(world: World, chains: list[str] | None = None) -> str:
    tokens = Tokens(world.settings)
    return issue_token(tokens.keyring, world.settings, org="acme", subject="a", chains=chains)[0]


def _query(client: httpx.Client, token: str, sql: str) -> httpx.Response:
    return client.post("/v1/query", json={"sql": sql}, headers=bearer(token))


def _rows(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 200, response.text
    rows: list[list[Any]] = response.json()["rows"]
    return rows


def _unknown(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "unknown_dataset", error
    return error


def test_sql_addresses_each_chain_as_a_schema(
    chains_client: httpx.Client, chains_world: World
) -> None:
    token = _token(chains_world)
    side_by_side = _rows(
        _query(
            chains_client,
            token,
            "SELECT m.chain_id, d.chain_id, count(*) FROM monad.blocks m "
            "JOIN devnet2.blocks d USING (block_number) GROUP BY ALL",
        )
    )
    assert side_by_side == [[CHAIN_ID, DEVNET2_ID, DEVNET2_ROWS]]
    primary = _rows(
        _query(
            chains_client,
            token,
            "SELECT (SELECT count(*) FROM MONAD.Blocks), (SELECT count(*) FROM blocks), "
            "(SELECT count(*) FROM devnet2.blocks), (SELECT max(chain_id) FROM devnet2.blocks)",
        )
    )
    committed = DatasetReader(chains_world.store, chains_world.versions()).read("blocks")
    assert committed.num_rows == RANGE_SIZE
    assert primary == [[committed.num_rows, committed.num_rows, DEVNET2_ROWS, DEVNET2_ID]]
    # the views of one request are gone in the next: an unqualified query still works, and a
    # chain's schema is no way into another request's data
    assert _rows(_query(chains_client, token, "SELECT count(*) FROM blocks")) == [
        [committed.num_rows]
    ]


def test_an_unknown_chain_is_an_unknown_dataset(
    chains_client: httpx.Client, chains_world: World
) -> None:
    token = _token(chains_world)
    unknown = _unknown(_query(chains_client, token, "SELECT * FROM no_such_dataset"))
    for sql, name in [
        ("SELECT * FROM devnet3.blocks", "devnet3.blocks"),
        ("SELECT * FROM main.blocks", "main.blocks"),
        ("SELECT * FROM memory.monad.blocks", "memory.monad.blocks"),
        ("SELECT * FROM monad.org_acme__labels", "monad.org_acme__labels"),
        # derived from call traces: the primary's only
        ("SELECT * FROM devnet2.traced_native_transfers", "devnet2.traced_native_transfers"),
    ]:
        error = _unknown(_query(chains_client, token, sql))
        assert error["message"] == unknown["message"].replace("no_such_dataset", name)


def test_the_catalogue_names_each_datasets_chain(
    chains_client: httpx.Client, chains_world: World
) -> None:
    token = _token(chains_world)
    listed = chains_client.get("/v1/datasets", headers=bearer(token)).json()["data"]
    chains = {d["name"]: d["chain"] for d in listed}
    assert chains["blocks"] == "monad" and chains["erc20_transfers"] == "monad"
    assert chains["devnet2.blocks"] == "devnet2"
    # a secondary chain's derived datasets are public as the primary's; its traces are not its
    assert chains["devnet2.erc20_transfers"] == chains["devnet2.token_holders"] == "devnet2"
    assert not {"devnet2.geth_calls", "devnet2.traced_contracts"} & set(chains)
    assert chains["org_acme__labels"] is None
    detail = chains_client.get("/v1/datasets/devnet2.blocks", headers=bearer(token)).json()
    assert detail["chain"] == "devnet2" and detail["visibility"] == "public"
    assert detail["rows"] == DEVNET2_ROWS
    assert list(detail["current_versions"]) == [chains_world.keys[0]]
    assert [c["name"] for c in detail["columns"]][:2] == ["chain_id", "block_number"]


def test_a_token_limited_to_chains_sees_no_other_chain(
    chains_client: httpx.Client, chains_world: World
) -> None:
    primary_only = _token(chains_world, ["monad"])
    devnet2_only = _token(chains_world, ["devnet2"])
    absent = _unknown(_query(chains_client, primary_only, "SELECT * FROM no_such_dataset"))

    def looks_absent(token: str, name: str, sql: str) -> None:
        error = _unknown(_query(chains_client, token, sql))
        assert error["message"] == absent["message"].replace("no_such_dataset", name)
        response = chains_client.get(f"/v1/datasets/{name}", headers=bearer(token))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_dataset"

    looks_absent(primary_only, "devnet2.blocks", "SELECT * FROM devnet2.blocks")
    looks_absent(devnet2_only, "blocks", "SELECT * FROM monad.blocks")
    looks_absent(devnet2_only, "blocks", "SELECT * FROM blocks")
    # the organisation's own datasets belong to no chain: still readable
    for token in (primary_only, devnet2_only):
        assert _rows(_query(chains_client, token, "SELECT count(*) > 0 FROM org_acme__labels")) == [
            [True]
        ]
    assert _rows(_query(chains_client, devnet2_only, "SELECT count(*) FROM devnet2.blocks")) == [
        [DEVNET2_ROWS]
    ]
    listed = {
        d["name"]
        for d in chains_client.get("/v1/datasets", headers=bearer(primary_only)).json()["data"]
    }
    assert "blocks" in listed and "org_acme__labels" in listed
    assert not any(name.startswith("devnet2.") for name in listed)
    listed = {
        d["name"]
        for d in chains_client.get("/v1/datasets", headers=bearer(devnet2_only)).json()["data"]
    }
    assert "devnet2.blocks" in listed and "org_acme__labels" in listed and "blocks" not in listed
