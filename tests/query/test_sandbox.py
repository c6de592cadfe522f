"""Attempts to get out of the sandbox from SQL — files, settings, extensions, other databases,
the network, Python — and queries that try to exhaust time or memory. Every escape is refused
with a JSON error and reads nothing; every exhaustion is stopped within the time limit; and the
service keeps answering afterwards."""

from __future__ import annotations

import time

import httpx
import pytest

from infra.local.query_service import QueryServer
from tests.query.conftest import QUERY_TIMEOUT_S, SECRET, Tokens, World, bearer

# text that would only appear if a file, an environment or a secret leaked
LEAK_MARKERS = (SECRET, "root:x:0:0", "AWS_SECRET_ACCESS_KEY", "TRACE_QUERY_TOKEN_KEYS", "testing")


def globex_file(world: World) -> str:
    record = world.versions().read.current_versions("org_globex__secret")["__all__"]
    return world.store.path(record.manifest.files[0].key)


# {file}: a committed file of another org (its manifest path); {url}: the service itself
ESCAPES = {
    "read a system file": "SELECT * FROM read_csv('/etc/passwd')",
    "read the process environment": "SELECT * FROM read_text('/proc/self/environ')",
    "read a blob": "SELECT * FROM read_blob('/etc/hostname')",
    "sniff a file": "SELECT * FROM sniff_csv('/etc/passwd')",
    "read another org's committed file": "SELECT * FROM read_parquet('s3://{file}')",
    "scan a path as a table": "SELECT * FROM 's3://{file}'",
    "parquet metadata of another org's file": "SELECT * FROM parquet_metadata('s3://{file}')",
    "list files": "SELECT * FROM glob('/*')",
    "fetch a URL": "SELECT * FROM read_csv_auto('{url}/openapi.json')",
    "fetch over https": "SELECT * FROM read_json('https://example.com/x.json')",
    "write a file": "COPY (SELECT 1) TO '/tmp/trace-escape.csv'",
    "export the database": "EXPORT DATABASE '/tmp/trace-escape'",
    "attach another database": "ATTACH '/tmp/trace-escape.duckdb' AS evil",
    "attach postgres": "ATTACH 'host=127.0.0.1 dbname=postgres' AS pg (TYPE postgres)",
    "install an extension": "INSTALL httpfs",
    "load an extension": "LOAD httpfs",
    "load an extension from a path": "LOAD '/tmp/evil.duckdb_extension'",
    "turn external access back on": "SET enable_external_access = true",
    "unlock the configuration": "SET lock_configuration = false",
    "reset a setting": "RESET memory_limit",
    "pragma": "PRAGMA enable_profiling",
    "mutate duckdb_settings()": (
        "UPDATE duckdb_settings() SET value = 'true' WHERE name = 'enable_external_access'"
    ),
    "call a procedure": "CALL pragma_version()",
    "create a secret": "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "create a table": "CREATE TABLE t AS SELECT 1",
    "create a macro": "CREATE MACRO m(x) AS x",
    "drop a view": "DROP VIEW blocks",
    "two statements": "SELECT 1; SELECT * FROM read_csv('/etc/passwd')",
    "statement after a comment": "SELECT 1 /* ; */; ATTACH ':memory:' AS m",
    "CTE over a file": "WITH x AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM x",
    "CTE materialised over the network": (
        "WITH x AS MATERIALIZED (SELECT * FROM read_text('{url}/healthz')) SELECT * FROM x"
    ),
    "query() over a file": "SELECT * FROM query('SELECT * FROM read_csv(''/etc/passwd'')')",
    "query_table of another org": "SELECT * FROM query_table('org_globex__secret')",
    "postgres scanner": (
        "SELECT * FROM postgres_scan('host=127.0.0.1', 'public', 'trace_query_revoked_tokens')"
    ),
    "environment variable": "SELECT getenv('AWS_SECRET_ACCESS_KEY')",
    "python variables by name": "SELECT * FROM query_table('services')",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempts_are_refused(
    client: httpx.Client, tokens: Tokens, world: World, server: QueryServer, name: str
) -> None:
    sql = ESCAPES[name].format(file=globex_file(world), url=server.url)
    response = client.post("/v1/query", json={"sql": sql}, headers=bearer(tokens.org("acme")))
    assert response.status_code in (400, 404), response.text
    body = response.json()
    assert set(body) == {"error"}, response.text
    assert body["error"]["code"] in ("invalid_sql", "statement_not_allowed", "unknown_dataset")
    for marker in LEAK_MARKERS:
        assert marker not in response.text, f"leaked {marker!r}"


def test_both_gates_refuse(client: httpx.Client, tokens: Tokens) -> None:
    """The parser gate refuses what is not one SELECT; the locked engine refuses file access
    inside a SELECT; the catalog refuses names the token may not read."""
    expected = {
        "write a file": (400, "statement_not_allowed"),
        "read a system file": (400, "statement_not_allowed"),
        "query_table of another org": (404, "unknown_dataset"),
    }
    for name, (status, code) in expected.items():
        response = client.post(
            "/v1/query", json={"sql": ESCAPES[name]}, headers=bearer(tokens.org())
        )
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_shadowing_a_dataset_with_a_cte_reads_the_cte(client: httpx.Client, tokens: Tokens) -> None:
    response = client.post(
        "/v1/query",
        json={"sql": "WITH org_globex__secret AS (SELECT 7 AS n) SELECT * FROM org_globex__secret"},
        headers=bearer(tokens.org("acme")),
    )
    assert response.status_code == 200 and response.json()["rows"] == [[7]]
    assert response.json()["versions"] == {}


def test_settings_stay_locked(client: httpx.Client, tokens: Tokens) -> None:
    sql = (
        "SELECT name, value FROM duckdb_settings() WHERE name IN "
        "('enable_external_access', 'lock_configuration', 'python_enable_replacements', "
        "'autoinstall_known_extensions', 'autoload_known_extensions', 'threads') ORDER BY name"
    )
    response = client.post("/v1/query", json={"sql": sql}, headers=bearer(tokens.org()))
    assert response.status_code == 200, response.text
    assert dict(response.json()["rows"]) == {
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "enable_external_access": "false",
        "lock_configuration": "true",
        "python_enable_replacements": "false",
        "threads": "1",
    }


EXHAUSTION = {
    "long scan": "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3",
    "huge cross join": "SELECT count(*) FROM transactions a, transactions b, transactions c",
    "infinite recursive CTE": (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    ),
    "exponential recursive CTE": (
        "WITH RECURSIVE r(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM r) "
        "SELECT max(length(s)) FROM r"
    ),
    "memory hog": "SELECT list(i) FROM range(1000000000) t(i)",
    "string bomb": "SELECT string_agg(repeat('x', 1000000), '') FROM range(100000)",
}


@pytest.mark.parametrize("name", sorted(EXHAUSTION))
def test_exhausting_queries_are_stopped_within_the_time_limit(
    client: httpx.Client, tokens: Tokens, name: str
) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/query", json={"sql": EXHAUSTION[name]}, headers=bearer(tokens.org("acme", name))
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    limits = ("query_timeout", "memory_limit", "cpu_limit", "sandbox_failed")
    assert response.json()["error"]["code"] in limits, response.text
    assert elapsed < QUERY_TIMEOUT_S + 3, f"{name} took {elapsed:.1f} s"
    # the sandbox is usable again at once
    after = client.post("/v1/query", json={"sql": "SELECT 1"}, headers=bearer(tokens.org()))
    assert after.status_code == 200 and after.json()["rows"] == [[1]]


def test_unbounded_results_stream_one_page(client: httpx.Client, tokens: Tokens) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/query",
        json={"sql": "SELECT i FROM range(1000000000000) t(i)", "limit": 100},
        headers=bearer(tokens.org()),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r[0] for r in body["rows"]] == list(range(100)) and body["next_cursor"]
    assert time.monotonic() - started < QUERY_TIMEOUT_S


def test_pages_stay_within_the_byte_budget_whatever_their_encoding(
    client: httpx.Client, tokens: Tokens, world: World
) -> None:
    """Control characters cost six bytes each in JSON: the page is shortened until its body
    fits, and the cursor goes on from where it ended; no row is lost or repeated."""
    budget = world.settings.query_max_response_bytes
    sql = "SELECT i, repeat(chr(1), 200000) AS s FROM range(30) t(i) ORDER BY i"
    seen: list[int] = []
    body = {"sql": sql}
    for _ in range(10):
        response = client.post("/v1/query", json=body, headers=bearer(tokens.org()))
        assert response.status_code == 200, response.text[:300]
        assert len(response.content) <= budget
        page = response.json()
        assert all(len(row[1]) == 200000 for row in page["rows"])
        seen += [row[0] for row in page["rows"]]
        if page["next_cursor"] is None:
            break
        assert "byte budget" in (page["notice"] or "")
        body = {"sql": sql, "cursor": page["next_cursor"]}
    assert seen == list(range(30))
    # one row larger than the budget: a 422 naming the limit, not a huge body
    huge = client.post(
        "/v1/query",
        json={"sql": f"SELECT repeat(chr(1), {budget // 4}) AS s"},
        headers=bearer(tokens.org()),
    )
    assert huge.status_code == 422, huge.text[:300]
    assert huge.json()["error"]["code"] == "response_too_large"
    assert len(huge.content) < 10_000
