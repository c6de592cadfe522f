"""The HTTP edge against a real uvicorn (issue 15, hostile tenants): body size cap before
parsing and auth, per-organisation fair share of query slots and exports, export cancel,
secure defaults (placeholder keys, no server banner) and /docs without a CDN."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from infra.local.query_service import QueryServer, settings_env
from infra.local.services import REPO_ROOT, ServiceError
from tests.query.conftest import QUERY_TIMEOUT_S, Tokens, World, bearer

CAP = 1024**2  # TRACE_QUERY_MAX_BODY_BYTES (the default)
SLOW_SQL = "SELECT count(*) FROM org_acme__numbers a, org_acme__numbers b, org_acme__numbers c"


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def raw_request(url: str, head: bytes, body: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send `head` then `body` on one socket while reading the answer, as a client that keeps
    sending after the server has answered would; the server may close before all is sent."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=20)

    def send_all() -> None:
        try:
            sock.sendall(head)
            for chunk in body:
                sock.sendall(chunk)
        except OSError:
            pass  # refused and closed: what we test

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
        sender.join(10)
    head_part, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = head_part.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    return int(status_line.split()[1]), headers, payload


def _expected_length(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.decode(errors="replace").split("\r\n"):
        if line.lower().startswith("content-length:"):
            return len(head) + len(sep) + int(line.split(":", 1)[1])
    return len(data) + 1


def zeros(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield b"0" * n


def chunked(total: int) -> Iterator[bytes]:
    for piece in zeros(total, 64 * 1024):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def head(path: str, *lines: str) -> bytes:
    return ("\r\n".join([f"POST {path} HTTP/1.1", "Host: x", *lines]) + "\r\n\r\n").encode()


# -- request size ------------------------------------------------------------------------------


def test_a_50_mb_body_is_refused_at_once_without_being_read(local_server: QueryServer) -> None:
    assert local_server.proc is not None
    pid = local_server.proc.pid
    before = vm_rss_kib(pid)
    size = 50 * 1024**2
    for auth in ([], ["Authorization: Bearer not-even-a-token"]):
        started = time.monotonic()
        status, headers, payload = raw_request(
            local_server.url,
            head("/v1/query", "Content-Type: application/json", f"Content-Length: {size}", *auth),
            zeros(size),
        )
        assert time.monotonic() - started < 5
        assert status == 413, payload
        error = json.loads(payload)["error"]
        assert error["code"] == "request_too_large"
        assert str(CAP) in error["message"] and "TRACE_QUERY_MAX_BODY_BYTES" in error["message"]
        assert headers["connection"] == "close"
    grown_kib = vm_rss_kib(pid) - before
    assert grown_kib < 10 * 1024, f"the server's RSS grew by {grown_kib} KiB"


def test_a_chunked_body_past_the_cap_is_refused(
    local_server: QueryServer, local_world: World
) -> None:
    token = Tokens(local_world.settings).org()
    status, _, payload = raw_request(
        local_server.url,
        head(
            "/v1/query",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            f"Authorization: Bearer {token}",
        ),
        chunked(8 * CAP),
    )
    assert status == 413, payload
    assert json.loads(payload)["error"]["code"] == "request_too_large"


def test_bodies_up_to_the_cap_are_served(local_server: QueryServer, local_world: World) -> None:
    token = Tokens(local_world.settings).org()
    body = json.dumps({"sql": "SELECT 41 + 1 AS answer"}).encode()
    just_under = body + b" " * (CAP - len(body))  # JSON allows trailing whitespace
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        headers = {**bearer(token), "Content-Type": "application/json"}
        served = client.post("/v1/query", content=just_under, headers=headers)
        assert served.status_code == 200, served.text
        assert served.json()["rows"] == [[42]]
        # the same, sent chunked (no Content-Length): counted while read, then parsed
        streamed = client.post("/v1/query", content=iter([just_under]), headers=headers)
        assert streamed.status_code == 200, streamed.text
        over = client.post("/v1/query", content=just_under + b" ", headers=headers)
        assert over.status_code == 413


def test_a_v1_request_without_a_token_is_refused_before_its_body_is_read(
    local_server: QueryServer,
) -> None:
    status, headers, payload = raw_request(
        local_server.url,
        head("/v1/query", "Content-Type: application/json", "Transfer-Encoding: chunked"),
        chunked(4 * CAP),
    )
    assert status == 401, payload
    assert json.loads(payload)["error"]["code"] == "missing_token"
    assert headers["www-authenticate"] == 'Bearer realm="trace"'


# -- fair share ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_server(
    local_world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueryServer]:
    """Two query slots, one per organisation; one export worker, two exports per org."""
    settings = local_world.settings.model_copy(
        update={
            "query_max_concurrent": 2,
            "query_org_max_concurrent": 1,
            "query_queue_timeout_s": 0.5,
            "query_export_workers": 1,
            "query_org_max_exports": 2,
        }
    )
    log = tmp_path_factory.mktemp("uvicorn") / "shared.log"
    with QueryServer(settings_env(settings), log_file=log) as server:
        yield server


def test_an_org_at_its_share_is_refused_while_another_org_still_runs(
    shared_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    results: dict[str, httpx.Response] = {}

    def slow() -> None:
        with httpx.Client(base_url=shared_server.url, timeout=30) as own:
            results["slow"] = own.post(
                "/v1/query", json={"sql": SLOW_SQL}, headers=bearer(tokens.org(subject="slow"))
            )

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        time.sleep(0.7)  # acme's slow query holds acme's one slot now
        with httpx.Client(base_url=shared_server.url, timeout=30) as client:
            refused = client.post(
                "/v1/query",
                json={"sql": "SELECT count(*) FROM org_acme__numbers"},
                headers=bearer(tokens.org(subject="quick")),
            )
            other = client.post(
                "/v1/query", json={"sql": "SELECT 1 AS one"}, headers=bearer(tokens.org("globex"))
            )
    finally:
        worker.join(QUERY_TIMEOUT_S + 10)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "org_concurrency_limited"
    assert "'acme'" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200, other.text
    assert other.json()["rows"] == [[1]]
    assert results["slow"].json()["error"]["code"] == "query_timeout"


# -- exports: per-org cap and cancel ----------------------------------------------------------


def wait_status(client: httpx.Client, export_id: str, token: str, *wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        body: dict[str, Any] = client.get(f"/v1/exports/{export_id}", headers=bearer(token)).json()
        if body["status"] in wanted or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_exports_are_capped_per_org_and_cancel_queued_and_running(
    shared_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    alice = tokens.org(subject="exporter")
    results_dir = Path(local_world.settings.local_store_root) / "trace-results" / "exports"
    with httpx.Client(base_url=shared_server.url, timeout=30) as client:

        def export(sql: str = SLOW_SQL) -> httpx.Response:
            return client.post(
                "/v1/exports", json={"sql": sql, "format": "csv"}, headers=bearer(alice)
            )

        running = export().json()["id"]
        assert wait_status(client, running, alice, "running")["status"] == "running"
        queued = export().json()["id"]  # the one export worker is busy
        over = export()
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "org_export_limited"
        assert "retry-after" in over.headers

        # not the owner: the same 404 as an unknown export
        bob = tokens.org(subject="bob")
        assert client.delete(f"/v1/exports/{queued}", headers=bearer(bob)).status_code == 404

        dropped = client.delete(f"/v1/exports/{queued}", headers=bearer(alice))
        assert dropped.status_code == 200, dropped.text
        assert dropped.json()["status"] == "cancelled"
        assert dropped.json()["started_at"] is None

        started = time.monotonic()
        stopped = client.delete(f"/v1/exports/{running}", headers=bearer(alice))
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "cancelled"
        # the query stops long before its 30 s export limit, and the pool is free again
        quick = None
        while time.monotonic() - started < 10:
            quick = export("SELECT n FROM org_acme__numbers")
            if quick.status_code == 202:
                break
            time.sleep(0.2)
        assert quick is not None and quick.status_code == 202, quick.text if quick else None
        done = wait_status(client, quick.json()["id"], alice, "succeeded", "failed")
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15

        for export_id in (queued, running):
            body = client.get(f"/v1/exports/{export_id}", headers=bearer(alice)).json()
            assert body["status"] == "cancelled" and body["download_url"] is None
            assert not list(results_dir.rglob(f"{export_id}*"))
            again = client.delete(f"/v1/exports/{export_id}", headers=bearer(alice))
            assert again.status_code == 409
        finished = client.delete(f"/v1/exports/{quick.json()['id']}", headers=bearer(alice))
        assert finished.status_code == 409
        assert finished.json()["error"]["code"] == "export_finished"
        unknown = client.delete(
            "/v1/exports/00000000-0000-4000-8000-000000000000", headers=bearer(alice)
        )
        assert unknown.status_code == 404


# -- secure defaults -----------------------------------------------------------------------


def test_the_service_refuses_to_start_with_the_placeholder_key_outside_dev_mode(
    local_world: World, tmp_path: Path
) -> None:
    assert "change-me" in local_world.settings.query_url_signing_key.get_secret_value()
    server = QueryServer(
        settings_env(local_world.settings), log_file=tmp_path / "refused.log", dev_mode=False
    )
    with pytest.raises(ServiceError) as refused:
        server.start()
    assert "TRACE_QUERY_URL_SIGNING_KEY" in str(refused.value)
    assert "TRACE_QUERY_DEV_MODE=true" in str(refused.value)


def test_python_m_trace_query_api_refuses_the_placeholder_key_on_all_interfaces(
    local_world: World,
) -> None:
    env = {
        **os.environ,
        **settings_env(local_world.settings),
        "TRACE_QUERY_HOST": "0.0.0.0",
        "TRACE_QUERY_DEV_MODE": "true",
    }
    done = subprocess.run(
        [sys.executable, "-m", "trace_query_api"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "TRACE_QUERY_HOST=0.0.0.0 is not loopback" in done.stderr
    assert "Uvicorn running" not in done.stderr


def test_no_answer_names_the_server_software(local_server: QueryServer, local_world: World) -> None:
    token = Tokens(local_world.settings).org()
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        answers = [
            client.get("/healthz"),
            client.get("/v1/datasets"),  # refused at the edge
            client.get("/v1/datasets", headers=bearer(token)),
            client.get("/no-such-page"),
            client.get("/docs"),
        ]
    for answer in answers:
        assert "server" not in answer.headers, (answer.url, answer.headers)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_load_nothing_from_outside_the_service(local_server: QueryServer) -> None:
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        links = _Links()
        links.feed(docs.text)
        assert len(links.urls) >= 3  # stylesheet, icon, script
        origin = urlsplit(local_server.url).netloc
        for url in links.urls:
            absolute = urlsplit(urljoin(f"{local_server.url}/docs", url))
            assert absolute.netloc == origin, url
            asset = client.get(absolute.path)
            assert asset.status_code == 200, url
            assert len(asset.content) > 0
        assert "http://" not in docs.text and "https://" not in docs.text
        policy = docs.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "http" not in policy
        assert client.get("/redoc").status_code == 404
