"""Organisations' enrichment uploads end to end, on the real services: CSV and Parquet rows
uploaded through the query service (a real uvicorn) and `trace enrich upload`, committed as
`org_<org>__<name>` through the commit protocol, readable by that organisation only, joined
with erc20_transfers by an unpartitioned SQL transform whose rows equal polars'; an
append-mode transform appends; hostile uploads are refused with one line and commit nothing;
`trace lineage impacted` reaches the transforms from erc20_transfers, logs and the upload."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import MotoS3Server, free_port
from tests.query.conftest import Tokens, bearer
from tests.udf.test_sql_udfs import World, module_world
from trace_assets.cli import main as trace_main
from trace_assets.definitions import build_definitions, build_resources
from trace_assets.udfs import build_udf_asset
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.state import engine_for
from trace_resources.tokens import issue_token
from trace_resources.udfs.catalogue import registered_udfs

LABELS = "org_acme__labels"
JOINED = "org_acme__labelled_activity"
APPENDED = "org_acme__label_log"
MAX_BYTES = 200_000
MAX_ROWS = 500

JOIN = f"""\
format_version: 1
name: {JOINED}
description: ERC-20 activity per labelled token, over every range
inputs:
  - dataset: erc20_transfers
    columns: [token, from_address]
  - dataset: {LABELS}
    columns: [address, label]
partitioning: none
mode: replace
schema:
  - {{name: label, type: string, doc: the organisation's label of the token}}
  - {{name: transfers, type: int64, doc: Transfer events of the labelled tokens}}
  - {{name: senders, type: int64, doc: distinct senders}}
quality:
  - {{name: one_row_per_label, kind: unique, columns: [label]}}
code:
  kind: sql
  sql: |
    SELECT l.label, count(*) AS transfers, count(DISTINCT t.from_address) AS senders
    FROM erc20_transfers t JOIN {LABELS} l ON t.token = l.address
    GROUP BY l.label
"""

APPEND = f"""\
format_version: 1
name: {APPENDED}
description: One row per label each time it is materialised
inputs:
  - dataset: {LABELS}
    columns: [label]
partitioning: none
mode: append
schema:
  - {{name: label, type: string, doc: the organisation's label}}
code:
  kind: sql
  sql: SELECT label FROM {LABELS} WHERE label IS NOT NULL
"""


world = module_world("enr")


@pytest.fixture(scope="module")
def dagster_down() -> str:
    """A Dagster URL nothing answers at: the UI is down."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(
    world: World,
    s3_server: MotoS3Server,
    dagster_down: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[QueryServer]:
    env = {
        **settings_env(world.settings),
        **s3_server.env(),
        "TRACE_ENRICHMENT_MAX_BYTES": str(MAX_BYTES),
        "TRACE_ENRICHMENT_MAX_ROWS": str(MAX_ROWS),
        "TRACE_DAGSTER_URL": dagster_down,
    }
    log = tmp_path_factory.mktemp("enr-uvicorn") / "uvicorn.log"
    with QueryServer(env, log_file=log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: QueryServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def _manager(world: World, org: str = "acme") -> dict[str, str]:
    tokens = Tokens(world.settings)
    jwt = issue_token(
        tokens.keyring, world.settings, org=org, subject="ops", capabilities=["transforms:manage"]
    )[0]
    return bearer(jwt)


def _transfers(world: World) -> pl.DataFrame:
    frame = pl.from_arrow(world.reader.read("erc20_transfers", world.keys))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _labels_csv(tokens: list[bytes]) -> str:
    """Labels for every other token, one address that moved nothing, a weight left empty."""
    lines = ["address,label,weight"]
    for i, token in enumerate(tokens):
        if i % 2 == 0:
            lines.append(f"0x{token.hex()},token {i % 3},{i if i % 4 else ''}")
    lines.append(f'0x{"ab" * 20},"never, moved",7')
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def uploaded(world: World, client: httpx.Client) -> pl.DataFrame:
    """The labels, uploaded as CSV through the query service: what was committed."""
    tokens = sorted(set(_transfers(world)["token"].to_list()))
    assert len(tokens) >= 2
    response = client.put(
        "/v1/enrichments/labels",
        params={"schema": "address:binary,label:string,weight:int64"},
        headers={**_manager(world), "Content-Type": "text/csv"},
        content=_labels_csv(tokens),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == LABELS and body["version"] == 1 and body["changed"] is True
    assert body["columns"] == [
        {"name": "address", "type": "binary"},
        {"name": "label", "type": "string"},
        {"name": "weight", "type": "int64"},
    ]
    frame = pl.from_arrow(world.reader.read(LABELS, [UNPARTITIONED]))
    assert isinstance(frame, pl.DataFrame)
    assert body["rows"] == frame.height == (len(tokens) + 1) // 2 + 1
    return frame


def _query(client: httpx.Client, world: World, org: str, sql: str) -> httpx.Response:
    return client.post(
        "/v1/query", headers=bearer(Tokens(world.settings).org(org)), json={"sql": sql}
    )


def test_an_upload_is_the_organisations_own_dataset(
    world: World, client: httpx.Client, uploaded: pl.DataFrame
) -> None:
    # the rows as the CSV wrote them: hex addresses as bytes, a quoted comma, an empty int
    never = uploaded.filter(pl.col("address") == bytes.fromhex("ab" * 20))
    assert never["label"].to_list() == ["never, moved"] and never["weight"].to_list() == [7]
    assert uploaded["weight"].null_count() > 0

    mine = _query(client, world, "acme", f"SELECT count(*) FROM {LABELS}")
    assert mine.status_code == 200, mine.text
    assert mine.json()["rows"] == [[uploaded.height]]
    theirs = _query(client, world, "globex", f"SELECT count(*) FROM {LABELS}")
    missing = _query(client, world, "globex", "SELECT count(*) FROM org_acme__nothing_here")
    assert theirs.status_code == missing.status_code != 200
    assert theirs.text.replace(LABELS, "X") == missing.text.replace("org_acme__nothing_here", "X")

    def listed(org: str) -> set[str]:
        headers = bearer(Tokens(world.settings).org(org))
        return {d["name"] for d in client.get("/v1/datasets", headers=headers).json()["data"]}

    assert LABELS in listed("acme") and LABELS not in listed("globex")
    acme = client.get("/v1/enrichments", headers=bearer(Tokens(world.settings).org("acme")))
    assert [(e["name"], e["rows"]) for e in acme.json()["data"]] == [(LABELS, uploaded.height)]
    globex = client.get("/v1/enrichments", headers=bearer(Tokens(world.settings).org("globex")))
    assert globex.json() == {"data": [], "count": 0}

    # a plain org token reads it but does not upload
    plain = client.put(
        "/v1/enrichments/labels",
        params={"schema": "address:binary,label:string,weight:int64"},
        headers={**bearer(Tokens(world.settings).org("acme")), "Content-Type": "text/csv"},
        content="address,label,weight\n",
    )
    assert plain.status_code == 403 and plain.json()["error"]["code"] == "missing_capability"


def _parquet(table: pa.Table, **kwargs: object) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def _current_version(world: World, dataset: str) -> int | None:
    found = ReadModel(engine_for(world.settings.state_dsn)).current_version_numbers(dataset)
    return found.get(UNPARTITIONED)


def test_hostile_or_broken_uploads_get_one_line_and_commit_nothing(
    world: World, client: httpx.Client, uploaded: pl.DataFrame, tmp_path: Path
) -> None:
    # a transform owns org_acme__token_rollup: an upload may not take its name
    declared = client.post(
        "/v1/transforms",
        headers=_manager(world),
        json={
            "yaml": JOIN.replace(JOINED, "org_acme__token_rollup"),
            "file": "rollup.yaml",
        },
    )
    assert declared.status_code == 201, declared.text
    schema = {"schema": "address:binary,label:string,weight:int64"}
    csv = {"Content-Type": "text/csv"}
    header = "address,label,weight\n"
    ok_row = f"0x{'01' * 20},x,1\n"
    bomb = _parquet(
        pa.table({"s": [f"{i}" + "a" * 200_000 for i in range(10)]}),
        compression="zstd",
        use_dictionary=False,
    )
    assert len(bomb) < MAX_BYTES  # small on the wire, 2 MB decoded
    cases: list[tuple[str, str, dict[str, str], dict[str, str], bytes | str, int, str]] = [
        (
            "bad hex",
            "labels",
            schema,
            csv,
            header + ok_row + "zz,y,2\n",
            422,
            "line 3, column 'address': 'zz' is not a valid binary (write bytes as 0x-prefixed "
            "hex, e.g. 0x00ab)",
        ),
        (
            "bad int",
            "labels",
            schema,
            csv,
            header + ok_row + ok_row + f"0x{'02' * 20},y,many\n",
            422,
            "line 4, column 'weight': 'many' is not a valid int64 (invalid literal",
        ),
        (
            "short row",
            "labels",
            schema,
            csv,
            header + "0x01,y\n",
            422,
            "line 2: 2 fields, the header has 3",
        ),
        (
            "no schema",
            "labels",
            {},
            csv,
            header + ok_row,
            422,
            "a CSV upload needs its schema: name:type for each column",
        ),
        (
            "other columns",
            "labels",
            {"schema": "address:binary,name:string"},
            csv,
            header + ok_row,
            422,
            "line 1: the CSV's columns are address, label, weight; the schema declares "
            "address, name",
        ),
        (
            "unknown type",
            "labels",
            {"schema": "address:bytes20"},
            csv,
            header,
            422,
            "schema: column 'address' has unknown type 'bytes20'; use one of ",
        ),
        (
            "too many rows",
            "labels",
            schema,
            csv,
            header + ok_row * (MAX_ROWS + 1),
            422,
            f"line {MAX_ROWS + 2}: the CSV has more than {MAX_ROWS} rows "
            "(TRACE_ENRICHMENT_MAX_ROWS)",
        ),
        (
            "a file of blank lines",
            "labels",
            schema,
            csv,
            header + "\n" * (MAX_ROWS + 1),
            422,
            f"line {MAX_ROWS + 2}: the CSV has more than {MAX_ROWS} rows",
        ),
        (
            "too many columns",
            "labels",
            schema,
            csv,
            ",".join(f"c{i}" for i in range(100)) + "\n",
            422,
            "the CSV's header (line 1) has 100 columns, more than 64 "
            "(TRACE_ENRICHMENT_MAX_COLUMNS)",
        ),
        (
            "a field without end",
            "labels",
            schema,
            csv,
            header + '0x01,"' + "a" * 150_000 + "\n",
            422,
            "line 2: the CSV does not parse: field larger than field limit",
        ),
        (
            "too large",
            "labels",
            schema,
            csv,
            header + ok_row * (MAX_BYTES // len(ok_row) + 1),
            413,
            f"the request body is larger than {MAX_BYTES} bytes, the limit of this service "
            "(TRACE_ENRICHMENT_MAX_BYTES)",
        ),
        (
            "parquet bomb",
            "labels",
            {},
            {"Content-Type": "application/vnd.apache.parquet"},
            bomb,
            422,
            "the Parquet file decodes to ",
        ),
        (
            "not parquet",
            "labels",
            {},
            {"Content-Type": "application/vnd.apache.parquet"},
            b"PAR1 this is not a parquet file",
            422,
            "the file is not Parquet: ",
        ),
        (
            "nested parquet",
            "labels",
            {},
            {"Content-Type": "application/vnd.apache.parquet"},
            _parquet(pa.table({"address": [{"a": 1}]})),
            422,
            "column 'address' has type struct<a: int64>, not one of Trace's types",
        ),
        (
            "another organisation's prefix",
            "org_globex__labels",
            schema,
            csv,
            header + ok_row,
            422,
            "name 'org_globex__labels' belongs to organisation 'globex'; organisation 'acme' "
            "uploads to its own datasets, org_acme__<name>",
        ),
        (
            "path-like name",
            "..labels",
            schema,
            csv,
            header + ok_row,
            422,
            "name '..labels' is not a dataset name: lowercase letters and digits",
        ),
        (
            "a platform dataset's name",
            "erc20_transfers",
            schema,
            csv,
            header + ok_row,
            422,
            "name 'erc20_transfers' is a platform dataset's name; choose another",
        ),
        (
            "a transform's name",
            "token_rollup",
            schema,
            csv,
            header + ok_row,
            422,
            "org_acme__token_rollup is a transform's dataset (`trace udf list`); upload under "
            "another name",
        ),
        (
            "a retyped column",
            "labels",
            {"schema": "address:string,label:string,weight:int64"},
            csv,
            header + ok_row,
            422,
            f"the data staged for {LABELS} does not match its registered schema v1: removed "
            "columns none, retyped ['address']",
        ),
    ]
    for what, name, params, headers, body, status, message in cases:
        response = client.put(
            f"/v1/enrichments/{name}",
            params=params,
            headers={**_manager(world), **headers},
            content=body,
        )
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert error["message"].startswith(message), (what, error)
        assert "\n" not in error["message"], what
    # a path in the name never reaches the route (no dataset is named by it)
    escaped = client.put(
        "/v1/enrichments/..%2F..%2Fblocks",
        params=schema,
        headers={**_manager(world), **csv},
        content=header + ok_row,
    )
    assert escaped.status_code == 404
    # nothing was committed: the labels are still the first upload, no other dataset exists
    assert _current_version(world, LABELS) == 1
    for name in ("org_globex__labels", "org_acme__erc20_transfers", "org_acme__token_rollup"):
        assert _current_version(world, name) is None, name
    again = pl.from_arrow(world.reader.read(LABELS, [UNPARTITIONED]))
    assert isinstance(again, pl.DataFrame)
    assert_frame_equal(again, uploaded)

    # and a transform may not take an upload's name
    stolen = client.post(
        "/v1/transforms",
        headers=_manager(world),
        json={"yaml": JOIN.replace(JOINED, LABELS), "file": "stolen.yaml"},
    )
    assert stolen.status_code == 422
    assert stolen.json()["error"]["details"] == [
        f"stolen.yaml:2: name: {LABELS!r} is an uploaded enrichment dataset; name the "
        "transform differently"
    ]


def _materialise(world: World, name: str) -> dg.ExecuteInProcessResult:
    """The transform's newest applied version, materialised in process (unpartitioned)."""
    engine = engine_for(world.settings.state_dsn)
    udf = registered_udfs(engine)[name]
    [stored] = [s for s in udf_store.latest(engine) if s.name == name]
    asset = build_udf_asset(udf, stored.version)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in world.cli_env.items():
            if key.startswith(("AWS_", "TRACE_")):
                mp.setenv(key, value)
        with dg.DagsterInstance.ephemeral() as instance:
            result = dg.materialize(
                [asset], instance=instance, resources=build_resources(world.settings)
            )
    assert result.success
    return result


def test_an_unpartitioned_transform_joins_the_upload_and_equals_polars(
    world: World, client: httpx.Client, uploaded: pl.DataFrame, dagster_down: str
) -> None:
    applied = client.post(
        "/v1/transforms", headers=_manager(world), json={"yaml": JOIN, "file": "joined.yaml"}
    )
    assert applied.status_code == 201, applied.text
    # the apply stands though the Dagster UI is down, and says so in one line
    assert applied.json()["reloaded"] is False
    reload = applied.json()["reload"]
    assert reload.startswith(f"the Dagster webserver at {dagster_down} did not answer (")
    assert reload.endswith(
        "the transform is stored: reload the code location when it is up "
        "(Deployment > Reload in the Dagster UI)"
    )
    _materialise(world, JOINED)
    committed = world.reader.resolve(JOINED)
    assert list(committed) == [UNPARTITIONED] and committed[UNPARTITIONED].version == 1
    got = pl.from_arrow(world.reader.read(JOINED, [UNPARTITIONED]))
    assert isinstance(got, pl.DataFrame)
    expected = (
        _transfers(world)
        .join(uploaded.select("address", "label"), left_on="token", right_on="address")
        .group_by("label")
        .agg(
            pl.len().cast(pl.Int64).alias("transfers"),
            pl.col("from_address").n_unique().cast(pl.Int64).alias("senders"),
        )
    )
    assert expected.height >= 2  # several labels joined: real rows
    assert_frame_equal(got.sort("label"), expected.sort("label"))
    # the organisation reads it through the query service
    answer = _query(client, world, "acme", f"SELECT sum(transfers) FROM {JOINED}")
    assert answer.json()["rows"] == [[int(expected["transfers"].sum())]]


def test_a_new_upload_is_a_new_version_that_transforms_read(
    world: World,
    client: httpx.Client,
    uploaded: pl.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Replace mode: the same rows again change nothing; new rows (Parquet, its own schema,
    through `trace enrich upload`) are version 2, and the append-mode transform appends."""
    same = client.put(
        "/v1/enrichments/labels",
        params={"schema": "address:binary,label:string,weight:int64"},
        headers={**_manager(world), "Content-Type": "text/csv"},
        content=_labels_csv(sorted(set(_transfers(world)["token"].to_list()))),
    )
    assert same.status_code == 200 and same.json()["changed"] is False
    assert same.json()["version"] == 1

    applied = client.post(
        "/v1/transforms", headers=_manager(world), json={"yaml": APPEND, "file": "log.yaml"}
    )
    assert applied.status_code == 201, applied.text
    _materialise(world, APPENDED)
    first = world.reader.read(APPENDED, [UNPARTITIONED]).num_rows
    assert first == uploaded.height  # every label is set

    for key, value in {**settings_env(world.settings), **world.cli_env}.items():
        if key.startswith(("AWS_", "TRACE_")):
            monkeypatch.setenv(key, value)
    relabelled = uploaded.with_columns(pl.lit("relabelled").alias("label")).head(3)
    path = tmp_path / "labels.parquet"
    pq.write_table(relabelled.to_arrow(), path)
    assert trace_main(["enrich", "upload", str(path), "--org", "acme", "--name", "labels"]) == 0
    assert capsys.readouterr().out == (
        f"uploaded {LABELS}: version 2, 3 rows (address binary, label string, weight int64)\n"
    )
    assert _current_version(world, LABELS) == 2
    # an operator's mistake is one line too
    assert trace_main(["enrich", "upload", str(path), "--org", "acme", "--name", "../x"]) == 2
    assert capsys.readouterr().err == (
        "trace: EnrichmentError: name '../x' is not a dataset name: lowercase letters and "
        "digits joined by single underscores, starting with a letter, at most 63 characters "
        "(e.g. address_labels)\n"
    )

    # append: the second materialisation adds its rows as a new version of the dataset
    _materialise(world, APPENDED)
    committed = world.reader.resolve(APPENDED)[UNPARTITIONED]
    assert committed.version == 2 and committed.commit_mode == "append"
    log = pl.from_arrow(world.reader.read(APPENDED, [UNPARTITIONED]))
    assert isinstance(log, pl.DataFrame)
    assert log.height == first + 3
    assert log["label"].to_list().count("relabelled") == 3  # from the new upload's version
    answer = _query(client, world, "acme", f"SELECT count(*) FROM {APPENDED}")
    assert answer.json()["rows"] == [[first + 3]]


def test_lineage_impacted_reaches_transforms_from_their_inputs_and_uploads(
    world: World,
    client: httpx.Client,
    uploaded: pl.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    applied = client.post(
        "/v1/transforms", headers=_manager(world), json={"yaml": JOIN, "file": "joined.yaml"}
    )
    assert applied.status_code in (200, 201), applied.text
    for key, value in settings_env(world.settings).items():
        monkeypatch.setenv(key, value)

    def impacted(dataset: str, columns: str) -> dict[str, list[str]]:
        assert trace_main(["lineage", "impacted", "--dataset", dataset, "--columns", columns]) == 0
        out = capsys.readouterr().out.splitlines()
        return {line.split("\t")[0]: line.split("\t")[1].split(",") for line in out}

    every = ["label", "transfers", "senders"]  # no lineage declared: every input column
    assert impacted("erc20_transfers", "token")[JOINED] == every
    from_logs = impacted("logs", "address")
    assert "token" in from_logs["erc20_transfers"] and from_logs[JOINED] == every
    from_upload = impacted(LABELS, "label")
    assert from_upload[JOINED] == every
    assert "erc20_transfers" not in from_upload

    # the code location: the upload is an asset of the organisation's group, the source of
    # the transform that joins it (its lineage in the UI, column lineage included)
    defs = build_definitions(world.settings)
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey(JOINED)).parent_keys == {
        dg.AssetKey("erc20_transfers"),
        dg.AssetKey(LABELS),
    }
    specs = {s.key: s for s in defs.resolve_all_asset_specs()}
    assert specs[dg.AssetKey(LABELS)].group_name == "org_acme"
    lineage = specs[dg.AssetKey(JOINED)].metadata["dagster/column_lineage"]
    assert {(d.asset_key, d.column_name) for d in lineage.deps_by_column["label"]} >= {
        (dg.AssetKey(LABELS), "label"),
        (dg.AssetKey("erc20_transfers"), "token"),
    }
