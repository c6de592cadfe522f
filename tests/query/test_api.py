"""The query service as a consumer uses it, through a real uvicorn: discovery, queries in
JSON / CSV / Arrow, pagination and the row cap, pinned re-runs, exports to S3, saved queries,
and the `trace token` / `trace public` commands. Every expected answer is computed from the
committed data through the storage layer, not written down."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from infra.local.query_service import QueryServer, settings_env
from tests.query.conftest import Tokens, World, bearer
from trace_query_api.encode import ARROW_MEDIA_TYPE
from trace_resources.chain.schemas import RAW_SCHEMAS
from trace_resources.registry import declarations, public_declared
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.paths import UNPARTITIONED

REPO = Path(__file__).resolve().parents[2]


def committed(world: World, dataset: str) -> pa.Table:
    """What the storage layer says is committed (the independent path to the same data)."""
    return DatasetReader(world.store, world.versions()).read(dataset)


def pq_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def current_versions(world: World, dataset: str) -> dict[str, int]:
    return {k: r.version for k, r in world.versions().read.current_versions(dataset).items()}


def query(client: httpx.Client, token: str, sql: str, **body: Any) -> httpx.Response:
    return client.post("/v1/query", json={"sql": sql, **body}, headers=bearer(token))


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def wait_export(client: httpx.Client, token: str, export_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = ok(client.get(f"/v1/exports/{export_id}", headers=bearer(token)))
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"export {export_id} did not finish")


def cli(world: World, server_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trace_assets.cli", *args],
        env={**os.environ, **server_env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_health_readiness_metrics_and_docs(client: httpx.Client, tokens: Tokens) -> None:
    assert ok(client.get("/healthz")) == {"status": "ok"}
    ready = ok(client.get("/readyz"))
    assert ready == {
        "status": "ready",
        "checks": {"postgres": "ok", "datasets_bucket": "ok", "results_bucket": "ok"},
    }
    ok(query(client, tokens.org(), "SELECT 1 AS one"))
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'trace_query_http_requests_total{method="POST",route="/v1/query",status="200"}' in (
        metrics.text
    )
    assert 'trace_query_queries_total{outcome="ok"}' in metrics.text
    spec = ok(client.get("/openapi.json"))
    assert {"/v1/query", "/v1/datasets", "/v1/exports", "/v1/saved-queries"} <= set(spec["paths"])
    assert "CapabilityToken" in spec["components"]["securitySchemes"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_discovery_lists_what_the_token_may_read(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    acme = ok(client.get("/v1/datasets", headers=bearer(tokens.org("acme"))))
    names = [d["name"] for d in acme["data"]]
    # every dataset the registry declares public (raw and derived), and the org's own
    declared = sorted(public_declared())
    assert {"blocks", "erc20_transfers", "token_holders"} <= set(declared)
    assert names == sorted([*declared, "org_acme__labels", "org_acme__pinned"])
    blocks = next(d for d in acme["data"] if d["name"] == "blocks")
    assert blocks["visibility"] == "public" and blocks["owner"] is None
    assert blocks["partitions"] == len(world.keys)
    assert blocks["rows"] == committed(world, "blocks").num_rows
    labels = next(d for d in acme["data"] if d["name"] == "org_acme__labels")
    assert (labels["visibility"], labels["owner"]) == ("org", "acme")

    globex = ok(client.get("/v1/datasets", headers=bearer(tokens.org("globex"))))
    assert [d["name"] for d in globex["data"]] == sorted([*declared, "org_globex__secret"])

    # a derived dataset: the declaration's description and column docs, before any commit
    decl = declarations()["erc20_transfers"]
    derived = ok(client.get("/v1/datasets/erc20_transfers", headers=bearer(tokens.org())))
    assert derived["description"] == decl.description and derived["visibility"] == "public"
    assert [(c["name"], c["doc"]) for c in derived["columns"]] == [
        (c.name, c.doc) for c in decl.columns
    ]
    assert derived["partitions"] == []

    detail = ok(client.get("/v1/datasets/transactions", headers=bearer(tokens.org())))
    schema = RAW_SCHEMAS["transactions"]
    assert [c["name"] for c in detail["columns"]] == schema.names
    assert {c["name"]: c["doc"] for c in detail["columns"]} == {
        f.name: f.metadata[b"doc"].decode() for f in schema
    }
    assert [p["key"] for p in detail["partitions"]] == world.keys
    assert detail["current_versions"] == current_versions(world, "transactions")
    assert detail["rows"] == committed(world, "transactions").num_rows
    assert detail["freshness"]["latest_partition"] == world.keys[-1]
    assert detail["freshness"]["last_block"] == int(world.keys[-1][13:])
    assert detail["description"].startswith("One row per transaction")

    own = ok(client.get("/v1/datasets/org_acme__labels", headers=bearer(tokens.org())))
    assert [(c["name"], c["type"]) for c in own["columns"]] == [
        ("address", "binary"),
        ("label", "string"),
    ]


def test_query_returns_the_committed_rows_and_names_their_versions(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    body = ok(
        query(
            client,
            tokens.org(),
            "SELECT block_number, block_hash, transaction_count FROM blocks ORDER BY block_number",
            limit=500,
        )
    )
    expected = committed(world, "blocks").sort_by("block_number")
    assert [c["name"] for c in body["columns"]] == [
        "block_number",
        "block_hash",
        "transaction_count",
    ]
    assert body["columns"][1]["type"] == "BLOB"
    assert body["rows"] == [
        [n, "0x" + h.hex(), c]
        for n, h, c in zip(
            expected["block_number"].to_pylist(),
            expected["block_hash"].to_pylist(),
            expected["transaction_count"].to_pylist(),
            strict=True,
        )
    ]
    assert body["row_count"] == expected.num_rows and body["next_cursor"] is None
    assert body["versions"] == {"blocks": current_versions(world, "blocks")}
    assert len(body["snapshot"]) == 32


def test_org_datasets_join_public_ones(client: httpx.Client, tokens: Tokens, world: World) -> None:
    body = ok(
        query(
            client,
            tokens.org(),
            "SELECT l.label, count(*) AS n FROM transactions t "
            "JOIN org_acme__labels l ON t.from_address = l.address GROUP BY 1 ORDER BY 1",
        )
    )
    txs = committed(world, "transactions")
    labels = committed(world, "org_acme__labels")
    joined = txs.join(labels, keys="from_address", right_keys="address", join_type="inner")
    counts = joined.group_by("label").aggregate([("label", "count")]).sort_by("label")
    assert body["rows"] == [
        [label, n]
        for label, n in zip(
            counts["label"].to_pylist(), counts["label_count"].to_pylist(), strict=True
        )
    ]
    assert set(body["versions"]) == {"transactions", "org_acme__labels"}


def test_arrow_and_csv_by_accept(client: httpx.Client, tokens: Tokens) -> None:
    sql = "SELECT block_number, block_hash FROM blocks WHERE block_number < 7 ORDER BY 1"
    as_json = ok(query(client, tokens.org(), sql))
    arrow = client.post(
        "/v1/query",
        json={"sql": sql},
        headers={**bearer(tokens.org()), "Accept": ARROW_MEDIA_TYPE},
    )
    assert arrow.status_code == 200 and arrow.headers["content-type"] == ARROW_MEDIA_TYPE
    table = paipc.open_stream(arrow.content).read_all()
    assert table.schema.field("block_hash").type == pa.binary()
    assert [[n, "0x" + h.hex()] for n, h in zip(*table.to_pydict().values(), strict=True)] == (
        as_json["rows"]
    )
    meta = table.schema.metadata[b"trace"].decode()
    assert as_json["snapshot"] in meta

    as_csv = client.post(
        "/v1/query", json={"sql": sql}, headers={**bearer(tokens.org()), "Accept": "text/csv"}
    )
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["trace-snapshot"] == as_json["snapshot"]
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert rows[0] == ["block_number", "block_hash"]
    assert [[int(n), h] for n, h in rows[1:]] == as_json["rows"]


def test_pages_follow_cursors_up_to_the_row_cap(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    sql = "SELECT block_number, transaction_index FROM transactions ORDER BY 1, 2"
    expected = (
        committed(world, "transactions")
        .select(["block_number", "transaction_index"])
        .sort_by([("block_number", "ascending"), ("transaction_index", "ascending")])
    )
    cap = world.settings.query_row_cap
    assert expected.num_rows > cap  # the cap bites
    rows: list[list[int]] = []
    page = ok(query(client, tokens.org(), sql, limit=400))
    snapshot = page["snapshot"]
    while True:
        assert page["offset"] == len(rows) and page["snapshot"] == snapshot
        rows += page["rows"]
        if page["next_cursor"] is None:
            break
        page = ok(query(client, tokens.org(), sql, cursor=page["next_cursor"], limit=400))
    assert len(rows) == cap
    assert rows == [list(r.values()) for r in expected.slice(0, cap).to_pylist()]
    assert page["truncated"] is True and "/v1/exports" in page["notice"]

    error(query(client, tokens.org(), sql, offset=cap), 400, "row_cap_exceeded")
    error(query(client, tokens.org(), sql, limit=501), 400, "bad_pagination")
    error(query(client, tokens.org(), sql, limit=0), 422, "bad_pagination")
    error(query(client, tokens.org(), sql, offset=-1), 422, "bad_pagination")
    cursor = ok(query(client, tokens.org(), sql, limit=10))["next_cursor"]
    error(query(client, tokens.org(), "SELECT 2", cursor=cursor), 400, "bad_pagination")
    error(query(client, tokens.org(), sql, cursor="bm90LWEtY3Vyc29y"), 400, "bad_pagination")
    error(query(client, tokens.org(), sql, cursor=cursor, offset=5), 400, "bad_pagination")
    offset_page = ok(query(client, tokens.org(), sql, offset=10, limit=5))
    assert offset_page["rows"] == rows[10:15]


def test_pinned_versions_and_snapshots_reproduce_an_answer(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    sql = "SELECT sum(n) AS total, count(*) AS rows FROM org_acme__pinned"
    first = ok(query(client, tokens.org(), sql))
    version = world.versions().read.current_versions("org_acme__pinned")[UNPARTITIONED].version
    assert first["rows"] == [[6, 3]]
    assert first["versions"] == {"org_acme__pinned": {UNPARTITIONED: version}}
    paging = ok(query(client, tokens.org(), "SELECT n FROM org_acme__pinned ORDER BY n", limit=1))
    assert paging["rows"] == [[1]]

    world.writer().write(
        "org_acme__pinned", UNPARTITIONED, PartitionData(pa.table({"n": pa.array([10, 20])}))
    )
    assert ok(query(client, tokens.org(), sql))["rows"] == [[30, 2]]
    assert ok(query(client, tokens.org(), sql, snapshot=first["snapshot"]))["rows"] == [[6, 3]]
    pinned = ok(query(client, tokens.org(), sql, pin=first["versions"]))
    assert pinned["rows"] == [[6, 3]] and pinned["snapshot"] == first["snapshot"]
    newer = {"org_acme__pinned": {UNPARTITIONED: version + 1}}
    assert ok(query(client, tokens.org(), sql, pin=newer))["rows"] == [[30, 2]]
    # a cursor keeps reading the versions its first page read
    second = ok(
        query(
            client,
            tokens.org(),
            "SELECT n FROM org_acme__pinned ORDER BY n",
            cursor=paging["next_cursor"],
            limit=1,
        )
    )
    assert second["rows"] == [[2]]

    message = error(
        query(client, tokens.org(), sql, pin={"org_acme__pinned": {UNPARTITIONED: 99}}),
        404,
        "unknown_version",
    )
    assert "99" in message
    error(
        query(client, tokens.org(), "SELECT count(*) FROM blocks", snapshot=first["snapshot"]),
        400,
        "snapshot_mismatch",
    )
    error(
        query(client, tokens.org(), sql, snapshot=first["snapshot"], pin=first["versions"]),
        400,
        "invalid_request",
    )
    record = ok(client.get(f"/v1/snapshots/{first['snapshot']}", headers=bearer(tokens.org())))
    assert record["versions"] == first["versions"]


def test_exports_write_the_whole_result_to_s3(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    token = tokens.org(subject="exporter")
    sql = "SELECT * FROM transactions WHERE block_number < 150 ORDER BY block_number"
    expected = committed(world, "transactions").filter(pc.less(pc.field("block_number"), 150))
    assert expected.num_rows > world.settings.query_row_cap  # more than a query may page
    created = client.post("/v1/exports", json={"sql": sql}, headers=bearer(token))
    assert created.status_code == 202, created.text
    assert created.json()["status"] in ("queued", "running", "succeeded")
    done = wait_export(client, token, created.json()["id"])
    assert done["status"] == "succeeded", str(done["error"])
    assert done["rows"] == expected.num_rows
    assert done["download_url"].startswith(world.settings.s3_endpoint_url)  # presigned S3 GET
    download = httpx.get(done["download_url"], timeout=30)
    assert download.status_code == 200
    table = pq.read_table(pa.BufferReader(download.content))
    assert table.num_rows == expected.num_rows and len(download.content) == done["bytes"]
    assert sorted(table["transaction_hash"].to_pylist()) == sorted(
        expected["transaction_hash"].to_pylist()
    )
    assert table["block_number"].to_pylist() == sorted(table["block_number"].to_pylist())

    as_csv = client.post(
        "/v1/exports",
        json={"sql": "SELECT block_number, block_hash FROM blocks", "format": "csv"},
        headers=bearer(token),
    )
    done_csv = wait_export(client, token, as_csv.json()["id"])
    text = httpx.get(done_csv["download_url"], timeout=30).text
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == ["block_number", "block_hash"]
    assert len(lines) - 1 == committed(world, "blocks").num_rows == done_csv["rows"]
    assert all(h.startswith("0x") and len(h) == 66 for _, h in lines[1:])

    listed = ok(client.get("/v1/exports", headers=bearer(token)))
    assert {e["id"] for e in listed["data"]} >= {done["id"], done_csv["id"]}

    error(
        client.post("/v1/exports", json={"sql": "DROP TABLE blocks"}, headers=bearer(token)),
        400,
        "statement_not_allowed",
    )
    failing = client.post(
        "/v1/exports",
        json={"sql": "SELECT CAST(transaction_count || 'x' AS INTEGER) FROM blocks"},
        headers=bearer(token),
    )
    failed = wait_export(client, token, failing.json()["id"])
    assert failed["status"] == "failed" and failed["download_url"] is None
    assert failed["error"]["code"] == "invalid_sql" and "Conversion" in failed["error"]["message"]


def test_saved_queries_are_shared_within_the_org(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    alice, bob = tokens.org(subject="alice"), tokens.org(subject="bob")
    sql = "SELECT count(*) AS blocks FROM blocks"
    created = client.post(
        "/v1/saved-queries",
        json={"name": "block count", "sql": sql, "description": "how many blocks"},
        headers=bearer(alice),
    )
    assert created.status_code == 201, created.text
    saved = created.json()
    assert saved["created_by"] == "alice" and saved["sql"] == sql
    listed = ok(client.get("/v1/saved-queries", headers=bearer(bob)))
    assert saved["id"] in [q["id"] for q in listed["data"]]
    ran = ok(client.post(f"/v1/saved-queries/{saved['id']}/run", json={}, headers=bearer(bob)))
    assert ran["rows"] == [[committed(world, "blocks").num_rows]]
    assert ok(client.get(f"/v1/saved-queries/{saved['id']}", headers=bearer(bob)))["name"] == (
        "block count"
    )

    error(
        client.post(
            "/v1/saved-queries", json={"name": "block count", "sql": sql}, headers=bearer(bob)
        ),
        409,
        "saved_query_exists",
    )
    error(
        client.post(
            "/v1/saved-queries",
            json={"name": "evil", "sql": "ATTACH 'x.db'"},
            headers=bearer(bob),
        ),
        400,
        "statement_not_allowed",
    )
    error(
        client.post(
            "/v1/saved-queries",
            json={"name": "from a task", "sql": sql},
            headers=bearer(tokens.task(["blocks"])),
        ),
        403,
        "task_token_not_allowed",
    )
    error(
        client.post(
            "/v1/saved-queries",
            json={"name": "x", "sql": sql, "owner": "globex"},
            headers=bearer(bob),
        ),
        422,
        "invalid_request",
    )
    error(client.delete(f"/v1/saved-queries/{saved['id']}", headers=bearer(bob)), 403, "not_owner")
    deleted = client.delete(f"/v1/saved-queries/{saved['id']}", headers=bearer(alice))
    assert deleted.status_code == 204
    error(
        client.get(f"/v1/saved-queries/{saved['id']}", headers=bearer(alice)),
        404,
        "unknown_saved_query",
    )


def test_task_tokens_read_only_their_datasets_and_partitions(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    key = world.keys[1]
    task = tokens.task(["blocks", "org_acme__labels"], partitions={"blocks": [key]})
    body = ok(
        query(client, task, "SELECT count(*), min(block_number), max(block_number) FROM blocks")
    )
    assert body["rows"] == [[50, int(key[:12]), int(key[13:])]]
    assert body["versions"] == {"blocks": {key: current_versions(world, "blocks")[key]}}
    assert ok(query(client, task, "SELECT count(*) FROM org_acme__labels"))["rows"] == [[20]]
    error(query(client, task, "SELECT count(*) FROM transactions"), 404, "unknown_dataset")
    error(
        query(client, task, "SELECT count(*) FROM blocks", pin={"blocks": {world.keys[0]: 1}}),
        404,
        "unknown_version",
    )
    listed = ok(client.get("/v1/datasets", headers=bearer(task)))
    assert [(d["name"], d["partitions"]) for d in listed["data"]] == [
        ("blocks", 1),
        ("org_acme__labels", 1),
    ]
    narrowed = tokens.org(datasets=["blocks"])
    error(query(client, narrowed, "SELECT 1 FROM logs"), 404, "unknown_dataset")
    assert ok(query(client, narrowed, "SELECT count(*) FROM blocks"))["rows"] == [[200]]


def test_cli_issues_and_revokes_tokens(
    client: httpx.Client, world: World, server: QueryServer
) -> None:
    env = settings_env(world.settings)
    issued = cli(
        world, env, "token", "issue", "--org", "acme", "--subject", "carol", "--ttl", "600"
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    jti = issued.stderr.split()[1]
    assert ok(query(client, token, "SELECT 41 + 1"))["rows"] == [[42]]
    task = cli(
        world,
        env,
        "token",
        "issue",
        "--org",
        "acme",
        "--subject",
        "job-7",
        "--task",
        "rollup",
        "--dataset",
        "blocks",
        "--partition",
        world.keys[0],
    )
    assert task.returncode == 0, task.stderr
    assert ok(query(client, task.stdout.strip(), "SELECT count(*) FROM blocks"))["rows"] == [[50]]

    revoked = cli(world, env, "token", "revoke", jti, "--reason", "test")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    error(query(client, token, "SELECT 1"), 401, "token_revoked")

    bad = cli(world, env, "token", "issue", "--org", "Not An Org", "--subject", "x")
    assert bad.returncode == 2 and "org" in bad.stderr

    # --capability alerts:manage: the token may change the org's alert rules, a plain one not
    manager = cli(
        world,
        env,
        "token",
        "issue",
        "--org",
        "acme",
        "--subject",
        "ops",
        "--capability",
        "alerts:manage",
    )
    assert manager.returncode == 0, manager.stderr
    disable = "/v1/alerts/rules/no-such-rule/disable"
    error(client.post(disable, headers=bearer(manager.stdout.strip())), 404, "unknown_rule")
    plain = cli(world, env, "token", "issue", "--org", "acme", "--subject", "ops")
    error(client.post(disable, headers=bearer(plain.stdout.strip())), 403, "missing_capability")


def test_published_datasets_are_public(client: httpx.Client, tokens: Tokens, world: World) -> None:
    env = settings_env(world.settings)
    for org in ("acme", "globex"):
        error(
            query(client, tokens.org(org), "SELECT * FROM platform_stats"), 404, "unknown_dataset"
        )
    added = cli(world, env, "public", "add", "platform_stats", "--description", "platform KPIs")
    assert added.returncode == 0, added.stderr
    try:
        for org in ("acme", "globex"):
            rows = ok(query(client, tokens.org(org), "SELECT metric, value FROM platform_stats"))
            assert rows["rows"] == [["m", 1]]
        detail = ok(client.get("/v1/datasets/platform_stats", headers=bearer(tokens.org())))
        assert (detail["visibility"], detail["description"]) == ("public", "platform KPIs")
    finally:
        removed = cli(world, env, "public", "remove", "platform_stats")
        assert removed.returncode == 0, removed.stderr
    error(query(client, tokens.org(), "SELECT * FROM platform_stats"), 404, "unknown_dataset")


def test_gc_keeps_what_an_export_reads_and_snapshots_of_removed_versions_are_gone(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    writer, versions = world.writer(), world.versions()
    gc = GarbageCollector(world.store, versions)
    policy = GcPolicy(keep_last=1, older_than=timedelta(0))
    writer.write("org_acme__gc", UNPARTITIONED, PartitionData(pa.table({"n": [1, 2, 3]})))
    first = ok(query(client, tokens.org(), "SELECT sum(n) FROM org_acme__gc"))
    token = tokens.org(subject="gc-exporter")
    slow = (  # long enough for a commit and a GC to happen while it runs
        "SELECT n, (SELECT count(*) FROM range(4000000000)) AS c FROM org_acme__gc ORDER BY n"
    )
    created = client.post("/v1/exports", json={"sql": slow, "format": "csv"}, headers=bearer(token))
    assert created.status_code == 202, created.text
    writer.write("org_acme__gc", UNPARTITIONED, PartitionData(pa.table({"n": [100]})))
    during = gc.collect(policy, apply=True, datasets=["org_acme__gc"])
    assert ok(client.get(f"/v1/exports/{created.json()['id']}", headers=bearer(token)))[
        "status"
    ] in ("queued", "running"), "the export ended before GC ran; make it slower"
    assert during.versions == []  # version 1 is pinned by the export
    done = wait_export(client, token, created.json()["id"])
    assert done["status"] == "succeeded", done
    lines = list(csv.reader(io.StringIO(httpx.get(done["download_url"], timeout=30).text)))
    assert [row[0] for row in lines[1:]] == ["1", "2", "3"]  # what was current at submission

    after = gc.collect(policy, apply=True, datasets=["org_acme__gc"])
    assert [(v.partition_key, v.version) for v in after.versions] == [(UNPARTITIONED, 1)]
    assert ok(query(client, tokens.org(), "SELECT sum(n) FROM org_acme__gc"))["rows"] == [[100]]
    error(
        query(client, tokens.org(), "SELECT sum(n) FROM org_acme__gc", snapshot=first["snapshot"]),
        404,
        "unknown_version",
    )


def test_files_from_s3_are_checked_and_cached_under_their_checksum(
    client: httpx.Client, tokens: Tokens, world: World, s3_client: Any
) -> None:
    ok(query(client, tokens.org(), "SELECT count(*) FROM transactions"))
    cached = {p.stem for p in Path(world.settings.query_cache_dir).glob("*/*.parquet")}
    wanted = {
        f.sha256
        for r in world.versions().read.current_versions("transactions").values()
        for f in r.manifest.files
    }
    assert wanted <= cached

    # a committed object that no longer matches its manifest is refused, not served
    writer = world.writer()
    writer.write("org_acme__tampered", UNPARTITIONED, PartitionData(pa.table({"n": [1, 2]})))
    record = world.versions().read.current_versions("org_acme__tampered")[UNPARTITIONED]
    s3_client.put_object(
        Bucket=world.settings.bucket_datasets,
        Key=record.manifest.files[0].key,
        Body=pq_bytes(pa.table({"n": [666, 667]})),
    )
    message = error(
        query(client, tokens.org(), "SELECT sum(n) FROM org_acme__tampered"), 503, "corrupt_file"
    )
    assert "manifest" in message
