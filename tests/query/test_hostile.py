"""Hostile tenants against a real running service (issue 15): per class of attack, hostile
inputs beyond the escape attempts of `test_sandbox.py`, checked the way a user or an operator
would check them from outside — status codes and error codes, the HTTP body's size, the
service process's own memory (/proc/<uvicorn pid>/status), latency of another organisation,
and the sandbox workers' OS isolation (/proc/<worker pid>/...).

One service for the module (`hostile_server`): four sandboxes, two per organisation, a 3 s
time limit, 256 MB per sandbox and a 2 MB response budget, with the S3 credentials of the test
world in its environment (so that a leak of them would show).

Custom-SQL alert rules are not covered here (they are moving into the sandbox).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import REPO_ROOT
from tests.query.conftest import SECRET, Tokens, World, bearer
from trace_resources.settings import QuerySettings

TIMEOUT_S = 3.0
MAX_RESPONSE = 2 * 1024**2
# what JSON adds around a page: columns, cursor, snapshot, versions, notice
ENVELOPE = 64 * 1024
MEMORY_BUDGET_KIB = 300 * 1024  # the service process's growth allowed over its idle RSS
LIMIT_CODES = ("query_timeout", "memory_limit", "cpu_limit", "sandbox_failed")
WORKER_MODULE = b"trace_resources.sandbox.worker"
WORKERS = 5  # four query sandboxes and one export sandbox


@pytest.fixture(scope="module")
def hostile_settings(local_world: World) -> QuerySettings:
    return local_world.settings.model_copy(
        update={
            "query_max_concurrent": 4,
            "query_org_max_concurrent": 2,
            "query_queue_timeout_s": 0.3,
            "query_timeout_s": TIMEOUT_S,
            "query_memory_limit": "256MB",
            "query_max_response_bytes": MAX_RESPONSE,
            "query_page_rows_max": 10_000,
            "query_row_cap": 100_000,
            "query_export_workers": 1,
        }
    )


@pytest.fixture(scope="module")
def hostile_server(
    hostile_settings: QuerySettings,
    aws_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[QueryServer]:
    log = tmp_path_factory.mktemp("uvicorn") / "hostile.log"
    with QueryServer({**aws_env, **settings_env(hostile_settings)}, log_file=log) as server:
        assert wait_for_workers(server, WORKERS), worker_pids(server)
        yield server


@pytest.fixture(scope="module")
def htokens(hostile_settings: QuerySettings) -> Tokens:
    return Tokens(hostile_settings)


@pytest.fixture
def hclient(hostile_server: QueryServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_server.url, timeout=60) as http:
        yield http


# -- the service process, seen from /proc -------------------------------------------------------


def service_pid(server: QueryServer) -> int:
    assert server.proc is not None
    return server.proc.pid


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM back to the current RSS (root only; otherwise the peak since start counts)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def worker_pids(server: QueryServer) -> list[int]:
    """The live sandbox workers: children of the uvicorn process running the worker module."""
    parent = service_pid(server)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == parent and WORKER_MODULE in cmdline and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def wait_for_workers(server: QueryServer, count: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = worker_pids(server)
        # ready means locked in: running as nobody in its own root (when we are root)
        if len(pids) == count and all(_isolated(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _isolated(pid: int) -> bool:
    try:
        return os.geteuid() != 0 or os.readlink(f"/proc/{pid}/root") != "/"
    except OSError:
        return False


def query(
    client: httpx.Client, token: str, sql: str, accept: str | None = None, **body: Any
) -> httpx.Response:
    headers = bearer(token)
    if accept:
        headers["Accept"] = accept
    return client.post("/v1/query", json={"sql": sql, **body}, headers=headers)


def healthy(client: httpx.Client) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200, answer.text


def limit_or_ok(response: httpx.Response, name: str) -> None:
    if response.status_code == 200:
        return
    assert response.status_code == 422, f"{name}: {response.status_code} {response.text[:500]}"
    error = response.json()["error"]
    assert error["code"] in (*LIMIT_CODES, "response_too_large"), f"{name}: {error}"


# -- 1. memory ------------------------------------------------------------------------------

# allocations inside and outside DuckDB's memory_limit, and results that are small in Arrow
# but enormous once the service renders them (lists of NULLs have no Arrow buffer at all)
MEMORY = {
    "range to list": "SELECT list(i) FROM range(300000000) t(i)",
    "list_concat chain": (
        "WITH RECURSIVE r(l, n) AS (SELECT [1, 2, 3, 4], 0 UNION ALL "
        "SELECT list_concat(l, l), n + 1 FROM r WHERE n < 40) SELECT max(len(l)) FROM r"
    ),
    "recursive string doubling": (
        "WITH RECURSIVE r(s, n) AS (SELECT 'xy', 0 UNION ALL SELECT s || s, n + 1 FROM r "
        "WHERE n < 40) SELECT max(length(s)) FROM r"
    ),
    "array_agg of big strings": "SELECT array_agg(repeat('z', 1000000)) FROM range(2000)",
    "string_agg of big strings": "SELECT length(string_agg(repeat('q', 10000000), '')) "
    "FROM range(200)",
    "huge repeat": "SELECT length(repeat('x', 4000000000))",
    "lpad huge width": "SELECT length(lpad('x', 2000000000, 'y'))",
    "printf huge width": "SELECT length(printf('%2000000000d', 1))",
    "regexp_replace blowup": (
        "SELECT length(regexp_replace(repeat('a', 50000000), 'a', repeat('b', 100), 'g'))"
    ),
    "list_resize of NULLs": "SELECT list_resize([NULL], 1000000000)",
    "map packing": (
        "SELECT cardinality(map(list(i), list(repeat('v', 100)))) FROM range(5000000) t(i)"
    ),
    "struct packing": (
        "SELECT count(*) FROM (SELECT list({'a': repeat('s', 1000), 'b': i}) AS l "
        "FROM range(2000000) t(i))"
    ),
    "nested unnest": (
        "SELECT count(*) FROM (SELECT unnest(range(100000)) AS a, "
        "unnest(list_resize([repeat('u', 1000)], 100000, repeat('u', 1000))) AS b)"
    ),
    "array_agg of NULL (tiny in Arrow)": "SELECT array_agg(NULL) FROM range(30000000)",
    "list of booleans": "SELECT list(i % 2 = 0) FROM range(30000000) t(i)",
}


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_memory_attacks_stop_at_a_limit_outside_the_service(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens, name: str
) -> None:
    pid = service_pid(hostile_server)
    idle = status_kib(pid, "VmRSS")
    reset_peak(pid)
    response = query(hclient, htokens.org("acme", "hog"), MEMORY[name])
    limit_or_ok(response, name)
    if response.status_code == 200:
        assert len(response.content) <= MAX_RESPONSE + ENVELOPE, len(response.content)
    peak, after = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
    assert peak - idle < MEMORY_BUDGET_KIB, (
        f"{name}: the service process grew from {idle} KiB to a peak of {peak} KiB "
        f"({after} KiB after); budget {MEMORY_BUDGET_KIB} KiB over idle"
    )
    healthy(hclient)


def test_two_memory_attacks_at_once_leave_the_service_standing(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens
) -> None:
    pid = service_pid(hostile_server)
    idle = status_kib(pid, "VmRSS")
    reset_peak(pid)
    answers: dict[str, httpx.Response] = {}
    names = ["list_resize of NULLs", "array_agg of big strings", "range to list"]
    # two organisations, each within its share of the slots (2 of 4): all three run at once
    # (chosen up front: picked by whichever answer came back first, all three could be evil's,
    # and the third was then refused 429 for its organisation's concurrency, not its memory)
    orgs = dict(zip(names, ["evil", "acme", "evil"], strict=True))

    def attack(name: str) -> None:
        with httpx.Client(base_url=hostile_server.url, timeout=60) as own:
            answers[name] = query(own, htokens.org(orgs[name]), MEMORY[name])

    threads = [threading.Thread(target=attack, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name in names:
        limit_or_ok(answers[name], name)
    peak = status_kib(pid, "VmHWM")
    assert peak - idle < MEMORY_BUDGET_KIB, f"idle {idle} KiB, peak {peak} KiB"
    healthy(hclient)
    after = query(hclient, htokens.org("globex"), "SELECT count(*) FROM org_globex__secret")
    assert after.status_code == 200 and after.json()["rows"] == [[1]]
    print(f"two attacks at once: service RSS idle {idle} KiB, peak {peak} KiB")


# -- 2. wall and CPU time ---------------------------------------------------------------------

SPIN = {
    "cross join of ranges": "SELECT count(*) FROM range(1000000) a, range(1000000) b",
    "non-equi self join": (
        "SELECT count(*) FROM org_acme__numbers a JOIN org_acme__numbers b ON a.n < b.n "
        "JOIN org_acme__numbers c ON b.n < c.n"
    ),
    "recursive CTE with lists": (
        "WITH RECURSIVE r(n, l) AS (SELECT 0, [0] UNION ALL SELECT n + 1, list_append(l, n) "
        "FROM r WHERE n < 100000000) SELECT count(*) FROM r"
    ),
    "regex backtracking": (
        "SELECT count(*) FROM range(100000000) t(i) "
        "WHERE regexp_matches(repeat('a', 30) || i::varchar, '(a|aa)*(a|aa)*(a|aa)*b')"
    ),
    "generate_series huge": "SELECT sum(x) FROM generate_series(1, 1000000000000) g(x)",
    "sort a huge range": ("SELECT i FROM range(1000000000) t(i) ORDER BY hash(i) DESC LIMIT 1"),
    "md5 chain": "SELECT max(md5(md5(md5(i::varchar)))) FROM range(1000000000) t(i)",
    "window over a huge range": (
        "SELECT max(s) FROM (SELECT sum(i) OVER (ORDER BY i DESC) AS s FROM range(500000000) t(i))"
    ),
}


@pytest.mark.parametrize("name", sorted(SPIN))
def test_spinning_statements_end_within_the_time_limit(
    hclient: httpx.Client, htokens: Tokens, name: str
) -> None:
    started = time.monotonic()
    response = query(hclient, htokens.org("acme", "spinner"), SPIN[name])
    elapsed = time.monotonic() - started
    limit_or_ok(response, name)
    assert elapsed < TIMEOUT_S + 3, f"{name}: answered after {elapsed:.1f} s"


# -- 3. response size ------------------------------------------------------------------------

ACCEPTS = {
    "json": "application/json",
    "arrow": "application/vnd.apache.arrow.stream",
    "csv": "text/csv",
}

BIG = {
    "few rows of huge strings": "SELECT repeat('x', 50000000) AS s FROM range(20)",
    "many rows of 100 kB": "SELECT i, repeat('x', 100000) AS s FROM range(10000) t(i)",
    "many rows of 5 kB": "SELECT i, repeat('x', 5000) AS s FROM range(10000) t(i)",
    "wide rows": "SELECT i, "
    + ", ".join(f"repeat('{c}', 2000) AS {c}" for c in "abcdefghijklmnopqrst")
    + " FROM range(10000) t(i)",
    "control characters (6x in JSON)": "SELECT repeat(chr(1), 200000) AS s FROM range(100)",
    "quotes (2x in CSV)": "SELECT repeat('\"', 200000) AS s FROM range(100)",
    "non-ASCII (3x escaped)": "SELECT repeat('é', 200000) AS s FROM range(100)",
    "lists of NULL": "SELECT array_agg(NULL) AS l FROM range(5000000) GROUP BY ALL",
    "rows of NULL lists": "SELECT list_resize([NULL], 100000) AS l FROM range(1000)",
    "lists of booleans": "SELECT list(true) AS l FROM range(3000000)",
    "struct with a long key": ("SELECT {'" + "k" * 5000 + "': NULL} AS s FROM range(10000)"),
    "binary as hex": "SELECT repeat('\\xAA'::blob, 200000) AS b FROM range(100)",
}


def bounded_body(client: httpx.Client, token: str, sql: str, accept: str) -> tuple[int, bytes]:
    """Read at most the bound (plus one chunk): a huge body fails here without filling memory."""
    headers = {**bearer(token), "Accept": accept}
    with client.stream("POST", "/v1/query", json={"sql": sql}, headers=headers) as answer:
        body = b""
        for chunk in answer.iter_raw():
            body += chunk
            if len(body) > MAX_RESPONSE + ENVELOPE:
                break
        return answer.status_code, body


@pytest.mark.parametrize("accept", sorted(ACCEPTS))
@pytest.mark.parametrize("name", sorted(BIG))
def test_response_bodies_stay_within_the_budget(
    hclient: httpx.Client,
    hostile_server: QueryServer,
    htokens: Tokens,
    name: str,
    accept: str,
) -> None:
    pid = service_pid(hostile_server)
    idle = status_kib(pid, "VmRSS")
    reset_peak(pid)
    status, body = bounded_body(hclient, htokens.org("acme", "big"), BIG[name], ACCEPTS[accept])
    peak = status_kib(pid, "VmHWM")
    assert len(body) <= MAX_RESPONSE + ENVELOPE, (
        f"{name} as {accept}: the body is over {MAX_RESPONSE + ENVELOPE} bytes "
        f"(status {status}, service RSS {idle} -> peak {peak} KiB)"
    )
    assert peak - idle < MEMORY_BUDGET_KIB, f"{name}: service RSS {idle} -> peak {peak} KiB"
    if status == 422:
        assert json.loads(body)["error"]["code"] in (*LIMIT_CODES, "response_too_large"), body
        return
    assert status == 200, body[:500]
    if accept == "json":
        page = json.loads(body)
        if page["row_count"] and page["next_cursor"] is None:
            return  # it all fitted
        assert page["next_cursor"], f"{name}: a partial page without next_cursor"


def test_a_page_cut_at_the_byte_budget_continues_with_its_cursor(
    hclient: httpx.Client, htokens: Tokens
) -> None:
    sql = "SELECT i, repeat('x', 100000) AS s FROM range(50) t(i)"
    token = htokens.org("acme", "pager")
    seen: list[int] = []
    cursor = None
    for _ in range(20):
        response = query(hclient, token, sql, **({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text[:500]
        assert len(response.content) <= MAX_RESPONSE + ENVELOPE
        page = response.json()
        seen += [row[0] for row in page["rows"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert "TRACE_QUERY_MAX_RESPONSE_BYTES" in page["notice"]
    assert seen == list(range(50))


# -- 4. request size (what test_edge.py does not cover) ---------------------------------------


def nested_parens(chars: int) -> str:
    depth = (chars - len("SELECT 1")) // 2
    return "SELECT " + "(" * depth + "1" + ")" * depth


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            '{"sql": "SELECT 1", "x": ' + "[" * 200_000 + "]" * 200_000 + "}", id="deep JSON"
        ),
        pytest.param(
            '{"sql": "SELECT 1", "x": ' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "}",
            id="deep JSON objects",
        ),
        pytest.param(
            json.dumps({"sql": "SELECT 1", **{f"k{i}": i for i in range(60_000)}}),
            id="60,000 keys",
        ),
        pytest.param(json.dumps({"sql": nested_parens(100_010)}), id="SQL over the cap"),
        pytest.param(json.dumps({"sql": nested_parens(99_990)}), id="99,990 chars of parens"),
        pytest.param(json.dumps({"sql": nested_parens(20_000)}), id="10,000 nested parens"),
        pytest.param(json.dumps({"sql": "SELECT " + "-" * 99_000 + "1"}), id="99,000 unary minus"),
        pytest.param(
            json.dumps({"sql": "SELECT 1" + " UNION ALL SELECT 1" * 5_000}),
            id="5,000 unions",
        ),
        pytest.param(
            json.dumps({"sql": "SELECT " + "+".join(["1"] * 45_000)}), id="45,000 additions"
        ),
        pytest.param(
            json.dumps({"sql": "SELECT " + "[" * 40_000 + "]" * 40_000}), id="nested lists"
        ),
    ],
)
def test_hostile_request_bodies_get_a_clear_answer(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens, body: str
) -> None:
    assert len(body.encode()) <= 1024**2  # within the body cap: the parser sees it
    started = time.monotonic()
    response = hclient.post(
        "/v1/query",
        content=body.encode(),
        headers={**bearer(htokens.org("acme", "parser")), "Content-Type": "application/json"},
    )
    elapsed = time.monotonic() - started
    assert response.status_code in (200, 400, 422), f"{response.status_code} {response.text[:300]}"
    if response.status_code != 200:
        assert set(response.json()) == {"error"}, response.text[:300]
        assert "Traceback" not in response.text
    assert elapsed < TIMEOUT_S + 5, f"answered after {elapsed:.1f} s"
    healthy(hclient)
    assert hostile_server.proc is not None and hostile_server.proc.poll() is None


# -- 5. fairness -------------------------------------------------------------------------------

SMALL = "SELECT count(*) FROM org_globex__secret"
EXHAUSTING = "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3"


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def timed_small_queries(client: httpx.Client, token: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        response = query(client, token, SMALL)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["rows"] == [[1]], response.text
    return out


def test_another_orgs_p99_stays_within_twice_idle_while_one_org_attacks(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens
) -> None:
    globex = htokens.org("globex", "bystander")
    timed_small_queries(hclient, globex, 5)  # warm: parse cache, files decoded in workers
    # 100 samples each: the p99 of 30 would be their maximum, one stall of the machine
    idle = timed_small_queries(hclient, globex, 100)
    stop = threading.Event()
    outcomes: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()

    def attacker(i: int) -> None:
        with httpx.Client(base_url=hostile_server.url, timeout=60) as own:
            token = htokens.org("acme", f"attacker-{i}")
            while not stop.is_set():
                answer = query(own, token, EXHAUSTING)
                code = answer.json()["error"]["code"] if answer.status_code != 200 else ""
                with lock:
                    outcomes.append((answer.status_code, code, answer.headers.get("retry-after")))
                if answer.status_code == 429:
                    time.sleep(0.2)

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)  # acme holds its two slots now
        attacked = timed_small_queries(hclient, globex, 100)
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT_S + 10)
    idle_p99, attack_p99 = p99(idle), p99(attacked)
    bound = max(2 * idle_p99, idle_p99 + 0.050)
    figures = (
        f"globex p99 idle {idle_p99 * 1000:.1f} ms (median {statistics.median(idle) * 1000:.1f}),"
        f" under attack {attack_p99 * 1000:.1f} ms "
        f"(median {statistics.median(attacked) * 1000:.1f}); bound {bound * 1000:.1f} ms"
    )
    print(figures)
    assert attack_p99 <= bound, figures
    refused = [o for o in outcomes if o[0] == 429]
    assert refused, f"acme was never refused beyond its share: {outcomes}"
    assert all(code == "org_concurrency_limited" and retry for _, code, retry in refused)
    ran = [o for o in outcomes if o[0] != 429]
    assert all(o[0] == 422 and o[1] in LIMIT_CODES for o in ran), ran


# -- 6. leaks ----------------------------------------------------------------------------------

LEAK_QUERIES = {
    "duckdb_settings": "SELECT * FROM duckdb_settings()",
    "duckdb_extensions": "SELECT * FROM duckdb_extensions()",
    "duckdb_databases": "SELECT * FROM duckdb_databases()",
    "pragma_database_list": "SELECT * FROM pragma_database_list",
    "home_directory": "SELECT current_setting('home_directory')",
    "temp_directory": "SELECT current_setting('temp_directory')",
    "extension_directory": "SELECT current_setting('extension_directory')",
    "secret_directory": "SELECT current_setting('secret_directory')",
    "temporary files": "SELECT * FROM duckdb_temporary_files()",
    "getenv": "SELECT getenv('HOME'), getenv('PWD'), getenv('USER')",
    "getenv of secrets": "SELECT getenv('TRACE_STATE_DSN'), getenv('AWS_SECRET_ACCESS_KEY')",
    "version": "SELECT version(), * FROM pragma_version()",
    "platform": "SELECT * FROM pragma_platform()",
    "current user": "SELECT current_user, session_user, user",
    "secrets": "SELECT * FROM duckdb_secrets()",
    "which_secret": "SELECT * FROM which_secret('s3://x/y', 's3')",
    "memory": "SELECT * FROM duckdb_memory()",
    "views": "SELECT * FROM duckdb_views()",
    "tables": "SELECT * FROM duckdb_tables()",
    "columns": "SELECT * FROM duckdb_columns()",
    "log": "SELECT * FROM duckdb_logs()",
    "error: division": "SELECT 1 / 0 :: INTEGER",
    "error: cast": "SELECT 'abc'::INTEGER",
    "error: error()": "SELECT error('boom')",
    "error: unknown function": "SELECT no_such_function(1)",
    "error: unknown table": "SELECT * FROM no_such_table",
    "error: read a path": "SELECT * FROM read_parquet('x.parquet')",
    "error: relative path": "SELECT * FROM 'secrets.csv'",
    "error: deep failure": "SELECT list_resize([NULL], 1000000000)",
    "error: timeout": "SELECT count(*) FROM range(100000000000)",
}


@pytest.fixture(scope="module")
def secrets(hostile_settings: QuerySettings, aws_env: dict[str, str]) -> list[str]:
    """Text that must never appear in an answer."""
    s = hostile_settings
    out = [
        str(REPO_ROOT),
        os.getcwd(),
        "/root",
        "/work",
        s.query_token_keys.get_secret_value(),
        s.query_url_signing_key.get_secret_value(),
        s.state_dsn,
        s.data_dsn,
        SECRET,
        str(s.query_cache_dir),
        str(s.local_store_root),
    ]
    for spec in s.query_token_keys.get_secret_value().split(","):
        out += [part for part in spec.split(":") if len(part) >= 16]  # the key material
    for dsn in (s.state_dsn, s.data_dsn):
        url = make_url(dsn)
        if url.password:
            out.append(str(url.password))
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        if aws_env.get(key):
            out.append(aws_env[key])
    # the test database's password is the word "trace": it counts as part of the DSN only
    return [o for o in out if len(o) >= 8]


def assert_no_leak(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{where} leaks {secret!r}"
    assert not re.search(r"\broot\b", text), f"{where} names the user root: {text[:2000]}"
    assert "Traceback" not in text and 'File "/' not in text, f"{where}: a traceback"


@pytest.mark.parametrize("name", sorted(LEAK_QUERIES))
def test_no_answer_reveals_paths_users_or_secrets(
    hclient: httpx.Client, htokens: Tokens, secrets: list[str], name: str
) -> None:
    response = query(hclient, htokens.org("acme", "curious"), LEAK_QUERIES[name], limit=10_000)
    assert response.status_code in (200, 400, 404, 422), response.text[:500]
    assert "server" not in response.headers
    if response.status_code != 200:
        assert set(response.json()) == {"error"}, response.text[:500]
    assert_no_leak(response.text, secrets, name)
    assert_no_leak(json.dumps(dict(response.headers)), secrets, f"{name} headers")


def test_error_bodies_of_every_route_reveal_nothing(
    hclient: httpx.Client, htokens: Tokens, secrets: list[str]
) -> None:
    token = htokens.org("acme", "prober")
    answers = [
        hclient.post("/v1/query", content=b"{not json", headers=bearer(token)),
        hclient.post("/v1/query", json={"sql": 1}, headers=bearer(token)),
        hclient.post("/v1/query", json={"sql": "SELECT 1", "cursor": "!!"}, headers=bearer(token)),
        hclient.post(
            "/v1/exports", json={"sql": "SELECT 1", "format": "exe"}, headers=bearer(token)
        ),
        hclient.get("/v1/exports/../../etc/passwd", headers=bearer(token)),
        hclient.get("/v1/datasets/%2e%2e%2f%2e%2e", headers=bearer(token)),
        hclient.get("/v1/datasets", headers={"Authorization": "Bearer a.b.c"}),
        hclient.get("/metrics"),
        hclient.get("/readyz"),
    ]
    for answer in answers:
        assert answer.status_code < 500, (answer.url, answer.text[:300])
        assert "server" not in answer.headers
        assert_no_leak(answer.text, secrets, str(answer.url))


# -- 7. the sandbox's OS isolation, from outside -----------------------------------------------


def limits_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name = line[:26].strip()
        out[name] = line[26:47].strip()  # the soft limit
    return out


def test_a_running_worker_is_locked_in(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens
) -> None:
    answers: dict[str, httpx.Response] = {}

    def slow() -> None:
        with httpx.Client(base_url=hostile_server.url, timeout=60) as own:
            answers["slow"] = query(own, htokens.org("acme", "slow"), EXHAUSTING)

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        time.sleep(1.0)
        parent = service_pid(hostile_server)
        pids = worker_pids(hostile_server)
        assert len(pids) == WORKERS, pids
        parent_net = os.readlink(f"/proc/{parent}/ns/net")
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            if os.geteuid() == 0:
                assert uid == 65534, f"worker {pid} runs as uid {uid}, not nobody"
                root = os.readlink(f"/proc/{pid}/root")
                assert root != "/", f"worker {pid} sees the host's root"
            assert os.readlink(f"/proc/{pid}/ns/net") != parent_net, f"{pid} shares the network"
            limits = limits_of(pid)
            assert limits["Max address space"] != "unlimited", limits
            # its size when ready plus the 256 MB budget and the 64 MB file cache
            size = status_kib(pid, "VmSize") * 1024
            assert int(limits["Max address space"]) < size + 1024**3, (size, limits)
            assert limits["Max file size"] == "0", limits
            assert limits["Max core file size"] == "0", limits
            assert int(limits["Max open files"]) <= 16384, limits
            assert "NoNewPrivs:\t1" in status
        # a worker that served a request keeps the CPU-time limit of its last one
        cpu = [limits_of(pid)["Max cpu time"] for pid in pids]
        assert any(c != "unlimited" for c in cpu), cpu
        if os.geteuid() != 0:
            pytest.skip("not root: the workers can not switch user or chroot")
    finally:
        thread.join(TIMEOUT_S + 10)
    assert answers["slow"].json()["error"]["code"] == "query_timeout"


def test_a_killed_worker_is_replaced_and_only_its_request_fails(
    hclient: httpx.Client, hostile_server: QueryServer, htokens: Tokens
) -> None:
    assert wait_for_workers(hostile_server, WORKERS)
    before = set(worker_pids(hostile_server))
    answers: dict[str, httpx.Response] = {}
    # one function call of ~10 s CPU that does not stop for DuckDB's interrupt: the parent kills
    # the worker one second after the time limit (or the kernel at its CPU limit)
    killer = "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))"

    def attack() -> None:
        with httpx.Client(base_url=hostile_server.url, timeout=60) as own:
            answers["attack"] = query(own, htokens.org("acme", "killer"), killer)

    thread = threading.Thread(target=attack)
    thread.start()
    small: list[httpx.Response] = []
    while thread.is_alive():
        small.append(query(hclient, htokens.org("globex", "neighbour"), SMALL))
        time.sleep(0.1)
    thread.join()
    failed = answers["attack"]
    assert failed.status_code == 422, failed.text
    assert failed.json()["error"]["code"] in LIMIT_CODES
    assert small and all(r.status_code == 200 and r.json()["rows"] == [[1]] for r in small)
    assert wait_for_workers(hostile_server, WORKERS), worker_pids(hostile_server)
    after = set(worker_pids(hostile_server))
    assert before - after, f"no worker was replaced: {before} -> {after} ({failed.text})"
    assert len(after) == WORKERS
    assert query(hclient, htokens.org("acme"), "SELECT 1").json()["rows"] == [[1]]
