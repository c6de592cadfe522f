"""Several chains as configuration: TRACE_CHAINS and its one-line refusals, the one mapping of
(chain, dataset) to a dataset name, SQL's chain-qualified names, chain-limited tokens and
`trace chains`. No service is needed; the query service's side is tests/query/test_chains.py.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from pydantic import ValidationError

from trace_assets.cli import main as trace_cli
from trace_query_api.engine import Parser
from trace_query_api.errors import UnknownDatasetError
from trace_resources.chains import (
    ChainNames,
    asset_path,
    chain_of,
    dataset_name,
    partitions_name,
    qualified_reference,
    split_dataset_name,
)
from trace_resources.errors import ConfigError
from trace_resources.settings import QuerySettings, Settings
from trace_resources.storage.access import readable_datasets
from trace_resources.tokens import Claims, Keyring, Principal, issue_token

MONAD = {
    "name": "monad",
    "chain_id": 10143,
    "endpoints": [{"url": "http://127.0.0.1:18545", "name": "local"}],
    "range_size": 250,
}
DEVNET2 = {
    "name": "devnet2",
    "chain_id": 31337,
    "endpoints": [{"url": "https://rpc.example/SECRET-KEY"}],
    "finality": 12,
}
NAMES = ChainNames("monad", ("devnet2",))


def _refusal(chains: list[Any] | str, **settings: Any) -> str:
    text = chains if isinstance(chains, str) else json.dumps(chains)
    with pytest.raises(ValidationError) as caught:
        Settings(chains=text, **settings)
    errors = caught.value.errors()
    assert len(errors) == 1
    message = str(errors[0]["msg"]).removeprefix("Value error, ")
    assert "\n" not in message
    return message


def test_the_primary_chain_is_what_the_single_chain_settings_mean() -> None:
    settings = Settings(chains=json.dumps([MONAD, DEVNET2]))
    assert [c.name for c in settings.chain_configs()] == ["monad", "devnet2"]
    assert (settings.chain_name, settings.chain_id, settings.range_size) == ("monad", 10143, 250)
    assert [e.label for e in settings.endpoints()] == ["local"]
    assert settings.rpc_url == "http://127.0.0.1:18545"
    devnet2 = settings.chain_configs()[1]
    assert (devnet2.chain_id, devnet2.range_size, devnet2.finality) == (31337, 10_000, 12)
    # without TRACE_CHAINS: one chain, from today's settings
    single = Settings(
        chain_id=7, range_size=50, rpc_url="http://127.0.0.1:1", chain_name="main_net"
    )
    (only,) = single.chain_configs()
    assert (only.name, only.chain_id, only.range_size, only.finality) == (
        "main_net",
        7,
        50,
        "finalized",
    )
    assert [e.url for e in only.endpoints] == ["http://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({**DEVNET2, "name": "Devnet"}, ["chain 2 ('Devnet')", "name:", "lowercase"]),
        ({**DEVNET2, "name": "main"}, ["chain 2 ('main')", "name:", "reserved"]),
        ({**DEVNET2, "chain_id": "x"}, ["chain 2 ('devnet2')", "chain_id:"]),
        ({**DEVNET2, "endpoints": []}, ["chain 2 ('devnet2')", "endpoints:", "at least 1"]),
        (
            {**DEVNET2, "endpoints": [{"url": "ftp://x"}]},
            ["chain 2 ('devnet2')", "endpoints.0.url:", "http(s) URL"],
        ),
        ({**DEVNET2, "finality": "latest"}, ["finality:", '"finalized", "safe" or a depth']),
        ({**DEVNET2, "finality": -1}, ["finality:", "got -1"]),
        ({**DEVNET2, "rangesize": 5}, ["rangesize:", "fields: name, chain_id"]),
        ({**DEVNET2, "chain_id": 10143}, ["share the chain_id 10143"]),
        ({**DEVNET2, "name": "monad"}, ["share the name monad"]),
    ],
)
def test_a_bad_chain_is_refused_naming_the_entry_and_the_field(
    entry: dict[str, Any], says: list[str]
) -> None:
    message = _refusal([MONAD, entry])
    for part in says:
        assert part in message, message


def test_bad_chain_lists_and_contradictions_are_refused() -> None:
    assert "not JSON" in _refusal("[{")
    assert "non-empty JSON list" in _refusal("[]")
    message = _refusal([MONAD], chain_id=1)
    assert "TRACE_CHAIN_ID=1 contradicts the primary chain 'monad'" in message
    assert "contradicts" in _refusal([MONAD], range_size=9)
    # the same values, or an empty TRACE_RPC_ENDPOINTS, say nothing against it
    Settings(chains=json.dumps([MONAD]), chain_id=10143, range_size=250, rpc_endpoints="")
    with pytest.raises(ValidationError, match="chain_name"):
        Settings(chain_name="9lives")


def test_one_mapping_of_chain_and_dataset_to_a_name() -> None:
    assert dataset_name("monad", "blocks", NAMES) == "blocks"
    assert dataset_name("devnet2", "blocks", NAMES) == "devnet2.blocks"
    assert split_dataset_name("devnet2.blocks", NAMES) == ("devnet2", "blocks")
    assert split_dataset_name("erc20_transfers", NAMES) == ("monad", "erc20_transfers")
    assert split_dataset_name("org_acme__labels", NAMES) == (None, "org_acme__labels")
    assert chain_of("devnet3.blocks", NAMES) is None  # not configured: no chain's dataset
    for chain, dataset in [("monad", "logs"), ("devnet2", "logs"), ("devnet2", "transactions")]:
        assert split_dataset_name(dataset_name(chain, dataset, NAMES), NAMES) == (chain, dataset)
    assert asset_path("blocks", NAMES) == ["blocks"]
    assert asset_path("devnet2.blocks", NAMES) == ["devnet2", "blocks"]
    assert partitions_name("monad", NAMES) == "block_ranges"
    assert partitions_name("devnet2", NAMES) == "block_ranges__devnet2"
    assert qualified_reference("MONAD", "Blocks", NAMES) == "blocks"
    assert qualified_reference("devnet2", "blocks", NAMES) == "devnet2.blocks"
    assert qualified_reference("devnet3", "blocks", NAMES) is None
    assert qualified_reference("monad", "org_acme__labels", NAMES) is None
    with pytest.raises(ValueError, match="no chain 'devnet3'"):
        dataset_name("devnet3", "blocks", NAMES)
    with pytest.raises(ValueError, match="not a chain dataset"):
        dataset_name("devnet2", "org_acme__labels", NAMES)


@pytest.fixture
def two_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACE_CHAINS", json.dumps([MONAD, DEVNET2]))


@pytest.mark.usefixtures("two_chains")
def test_sql_names_chains_as_schemas() -> None:
    parser = Parser()
    try:
        parsed = parser.parse(
            "SELECT * FROM monad.blocks m JOIN devnet2.blocks d USING (block_number) "
            "JOIN Blocks USING (block_number) JOIN DEVNET2.LOGS USING (block_number)"
        )
        assert parsed.datasets == {"blocks", "devnet2.blocks", "devnet2.logs"}
        assert parsed.aliases == (("monad.blocks", "blocks"),)
        for sql, name in [
            ("SELECT * FROM devnet3.blocks", "devnet3.blocks"),
            ("SELECT * FROM main.blocks", "main.blocks"),
            ("SELECT * FROM memory.devnet2.blocks", "memory.devnet2.blocks"),
            ("SELECT * FROM monad.org_acme__labels", "monad.org_acme__labels"),
        ]:
            with pytest.raises(UnknownDatasetError) as caught:
                parser.parse(sql)
            assert repr(name) in caught.value.message
    finally:
        parser.close()


@pytest.mark.usefixtures("two_chains")
def test_a_chain_limited_token_reads_its_chains_and_its_org_only() -> None:
    settings = QuerySettings(environment="test")
    token, _ = issue_token(
        Keyring.from_settings(settings), settings, org="acme", subject="a", chains=["monad"]
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["scope"]["chains"] == ["monad"]
    principal = Principal.from_claims(Claims.model_validate(claims))
    names = ["blocks", "devnet2.blocks", "devnet2.logs", "devnet3.blocks", "org_acme__labels"]
    # names the rule decides alone (declared public, qualified, org-owned ones need their rows:
    # a connection that is never opened shows that none of these needs SQL)
    readable = readable_datasets(_NoDatabase(), "acme", principal, among=names[:4])  # type: ignore[arg-type]
    assert set(readable) == {"blocks"}
    everything = readable_datasets(_NoDatabase(), "acme", None, among=names[:4])  # type: ignore[arg-type]
    assert set(everything) == {"blocks", "devnet2.blocks", "devnet2.logs"}
    assert principal.chain_allows(None)  # an organisation's datasets belong to no chain
    with pytest.raises(ConfigError, match="--chain narrows an org token"):
        issue_token(
            Keyring.from_settings(settings),
            settings,
            org="acme",
            subject="a",
            chains=["monad"],
            datasets=["blocks"],
            task="t",
        )


class _NoDatabase:
    def connect(self) -> Any:
        raise AssertionError("the access rule asked the database")


@pytest.mark.usefixtures("two_chains")
def test_trace_chains_prints_the_configured_chains(capsys: pytest.CaptureFixture[str]) -> None:
    assert trace_cli(["chains", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["chain_id"], c["primary"]) for c in shown] == [
        ("monad", 10143, True),
        ("devnet2", 31337, False),
    ]
    assert shown[1]["endpoints"] == ["rpc.example"] and shown[1]["finality"] == 12
    assert trace_cli(["chains"]) == 0
    text = capsys.readouterr().out
    assert "monad (primary)" in text and "12 blocks deep" in text and "SECRET" not in text
    assert trace_cli(["token", "issue", "--org", "acme", "--subject", "a", "--chain", "nope"]) == 2
    assert "unknown chain 'nope'; chains: devnet2, monad" in capsys.readouterr().err
    assert (
        trace_cli(["token", "issue", "--org", "acme", "--subject", "a", "--chain", "devnet2"]) == 0
    )
    issued = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert issued["scope"]["chains"] == ["devnet2"]


def test_a_bad_trace_chains_stops_the_cli_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRACE_CHAINS", json.dumps([MONAD, {**DEVNET2, "finality": "soon"}]))
    assert trace_cli(["chains"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chain 2 ('devnet2'): finality:" in err
