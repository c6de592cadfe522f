"""One access rule, every caller: organisations × tokens × datasets through the access module,
the query service's HTTP API (listing, dataset detail, a query), the alert scope and the `trace`
CLI (publishing, and storing an alert rule whose custom SQL reads the dataset). Every caller
must give the same answer, and a dataset a caller may not read must be reported exactly like
one that does not exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pyarrow as pa
import pytest
import yaml

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import PostgresServer
from tests.conftest import NewDatabase
from tests.query.conftest import Tokens, World, _new_database, _serve, bearer
from trace_assets.alerts.scope import AlertScope
from trace_assets.cli import main as trace_cli
from trace_resources.storage.access import readable_datasets
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.object_store import local_store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.tokens import Claims, Principal, issue_token

ORGS = ["acme", "globex"]
FIRST, SECOND = "000000000000-000000000049", "000000000050-000000000099"
ROWS = {FIRST: 3, SECOND: 4}  # rows of each partition of every org_<org>__matrix
NOT_THERE = "no_such_dataset"
DATASETS = [
    "blocks",  # raw
    "contracts",  # derived, declared public
    "community_matrix",  # committed, published with `trace public add`
    "matrix_internal",  # committed, neither declared nor published
    "org_acme__matrix",
    "org_globex__matrix",
    "org_acme__never_committed",
    NOT_THERE,
    'org_acme__matrix"; --',
    "ORG_ACME__MATRIX",
    "org_acme___matrix",
    "../blocks",
]


@dataclass(frozen=True)
class Token:
    label: str
    jwt: str
    principal: Principal


def _token(tokens: Tokens, label: str, org: str, **scope: object) -> Token:
    jwt, claims = issue_token(tokens.keyring, tokens.settings, org=org, subject=label, **scope)
    return Token(label, jwt, Principal.from_claims(Claims.model_validate(claims)))


def tokens_of(tokens: Tokens, org: str) -> list[Token]:
    listed = ["blocks", "community_matrix", "matrix_internal"]
    listed += ["org_acme__matrix", "org_globex__matrix"]
    return [
        _token(tokens, "org", org),
        _token(tokens, "narrowed", org, datasets=["contracts", f"org_{org}__matrix"]),
        _token(
            tokens,
            "task",
            org,
            datasets=listed,
            task="t",
            partitions={f"org_{org}__matrix": [FIRST]},
        ),
    ]


@pytest.fixture(scope="module")
def matrix_world(
    world: World,
    postgres: PostgresServer,
    new_database: NewDatabase,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    """A state database of its own (what this test commits and publishes stays here)."""
    root = tmp_path_factory.mktemp("matrix-objects")
    settings = world.settings.model_copy(
        update={
            "state_dsn": _new_database(
                postgres, new_database, f"q{os.getpid()}_state_matrix", "state"
            ),
            "data_dsn": _new_database(
                postgres, new_database, f"q{os.getpid()}_data_matrix", "data"
            ),
            "object_store": "local",
            "local_store_root": root,
            "bucket_datasets": "trace-datasets",
            "bucket_results": "trace-results",
        }
    )
    built = World(settings, local_store(root, settings.bucket_datasets), [])
    writer = built.writer()
    one = PartitionData(pa.table({"n": [1]}))
    for name in ("community_matrix", "matrix_internal"):
        writer.write(name, UNPARTITIONED, one)
    for org in ORGS:
        for key, rows in ROWS.items():
            data = PartitionData(pa.table({"n": pa.array(range(rows), pa.int64())}))
            writer.write(f"org_{org}__matrix", key, data)
    return built


@pytest.fixture(scope="module")
def matrix_client(
    matrix_world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    log = tmp_path_factory.mktemp("uvicorn") / "matrix.log"
    server: QueryServer
    for server in _serve(matrix_world.settings, log, {}):
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http


@pytest.fixture
def cli_env(matrix_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in settings_env(matrix_world.settings).items():
        monkeypatch.setenv(key, value)


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def error_body(response: httpx.Response, name: str) -> tuple[int, str]:
    """The response with the dataset's name blanked, to compare with a missing one's."""
    text = json.dumps(response.json(), sort_keys=True)
    for spelling in (name, name.lower()):
        text = text.replace(json.dumps(spelling)[1:-1], "X")
    return response.status_code, text


def test_every_caller_gives_the_same_answer(
    matrix_world: World,
    matrix_client: httpx.Client,
    tokens: Tokens,
    cli_env: None,
    tmp_path: Path,
) -> None:
    assert trace_cli(["public", "add", "community_matrix"]) == 0  # the CLI publishes
    engine = engine_for(matrix_world.settings.state_dsn)
    scope = AlertScope(matrix_world.settings.state_dsn)
    rule_ids = iter(range(10_000))
    answers: dict[tuple[str, str, str], bool] = {}
    for org in ORGS:
        for token in tokens_of(tokens, org):
            with engine.connect() as conn:
                rule = readable_datasets(conn, org, token.principal)
            headers = bearer(token.jwt)
            listed = matrix_client.get("/v1/datasets", headers=headers).json()["data"]
            partitions = {d["name"]: d["partitions"] for d in listed}
            assert sorted(partitions) == sorted(rule)  # the listing is the rule, no more
            missing_detail = matrix_client.get(f"/v1/datasets/{NOT_THERE}", headers=headers)
            missing_query = query(matrix_client, headers, NOT_THERE)
            for name in DATASETS:
                readable = name in rule
                answers[org, token.label, name] = readable

                detail = matrix_client.get(f"/v1/datasets/{quote(name, safe='')}", headers=headers)
                if readable:
                    assert detail.status_code == 200, (org, token.label, name, detail.text)
                elif "/" not in name:  # a '/' never reaches the route: not a dataset path
                    assert error_body(detail, name) == error_body(missing_detail, NOT_THERE)

                # SQL identifiers are case-insensitive: the query reads the lowercased name
                sql_name = name.lower()
                answer = query(matrix_client, headers, name)
                if sql_name in rule:
                    assert answer.status_code == 200, (org, token.label, name, answer.text)
                    if sql_name.endswith("__matrix"):  # exactly the partitions it may read
                        keys = rule[sql_name].partitions or set(ROWS)
                        assert answer.json()["rows"] == [[sum(ROWS[k] for k in keys)]]
                        assert partitions[sql_name] == len(keys)
                else:
                    assert error_body(answer, name) == error_body(missing_query, NOT_THERE)

                if token.label != "org":
                    continue
                # without a token, the alert scope and the CLI apply the organisation's rule
                assert (name in scope.readable(org)) == readable, (org, name)
                rule_file = tmp_path / f"rule-{next(rule_ids)}.yaml"
                rule_file.write_text(yaml.safe_dump(alert_rule(org, rule_file.stem, name)))
                stored = trace_cli(["alerts", "rule", "create", str(rule_file)])
                assert stored == (0 if sql_name in rule else 2), (org, name)

    assert trace_cli(["public", "remove", "community_matrix"]) == 0
    with engine.connect() as conn:
        assert "community_matrix" not in readable_datasets(conn, "acme")
    assert "community_matrix" not in AlertScope(matrix_world.settings.state_dsn).readable("acme")

    for org in ORGS:
        assert {n for n in DATASETS if answers[org, "org", n]} == {
            "blocks",
            "contracts",
            "community_matrix",
            f"org_{org}__matrix",
        }
        assert {n for n in DATASETS if answers[org, "narrowed", n]} == {
            "contracts",
            f"org_{org}__matrix",
        }
        assert {n for n in DATASETS if answers[org, "task", n]} == {
            "blocks",
            "community_matrix",
            f"org_{org}__matrix",
        }


def query(client: httpx.Client, headers: dict[str, str], name: str) -> httpx.Response:
    return client.post(
        "/v1/query", json={"sql": f"SELECT count(*) FROM {quoted(name)}"}, headers=headers
    )


def alert_rule(org: str, rule_id: str, dataset: str) -> dict[str, object]:
    hook = {"kind": "webhook", "name": "h", "url": "http://127.0.0.1:9/", "secret": "s" * 32}
    sql = f"SELECT 1 AS alert_key FROM {quoted(dataset)}"
    # the CLI validates the file (a ';' inside a quoted name is refused there, as any SQL
    # the rule may not run)
    condition = {"kind": "custom_sql", "sql": sql}
    return {"org": org, "id": rule_id, "condition": condition, "channels": [hook]}
