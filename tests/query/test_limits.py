"""Rate limits per organisation and per subject (429 with Retry-After, shared through
Postgres), the per-process concurrency cap, and the local object store's signed download
route — on servers configured for them (`local_server`: one query slot and no queueing;
`throttled_server`: bursts of 5 per subject and 8 per organisation, refilled at 0.2/s)."""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from infra.local.query_service import QueryServer, settings_env
from tests.query.conftest import QUERY_TIMEOUT_S, THROTTLE, Tokens, World, bearer


def test_rate_limits_per_subject_then_per_org(
    throttled_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    user_burst, org_burst = THROTTLE["query_rate_user_burst"], THROTTLE["query_rate_org_burst"]
    with httpx.Client(base_url=throttled_server.url, timeout=30) as client:
        alice = tokens.org("ratelimited", "alice")
        statuses = [
            client.get("/v1/datasets", headers=bearer(alice)).status_code for _ in range(user_burst)
        ]
        assert statuses == [200] * user_burst
        refused = client.get("/v1/datasets", headers=bearer(alice))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "user_rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 10
        # another subject of the org still gets in, until the organisation's burst is used up
        used = user_burst  # a refused request takes nothing from either bucket
        bob = tokens.org("ratelimited", "bob")
        for _ in range(org_burst - used):
            assert client.get("/v1/datasets", headers=bearer(bob)).status_code == 200
        org_refused = client.get("/v1/datasets", headers=bearer(tokens.org("ratelimited", "eve")))
        assert org_refused.status_code == 429, org_refused.text
        assert org_refused.json()["error"]["code"] == "org_rate_limited"
        assert int(org_refused.headers["retry-after"]) >= 1
        # another organisation is not affected
        assert client.get("/v1/datasets", headers=bearer(tokens.org("calm"))).status_code == 200
        # and the bucket refills: after Retry-After, alice gets in again
        time.sleep(int(refused.headers["retry-after"]) + 0.2)
        assert client.get("/v1/datasets", headers=bearer(alice)).status_code == 200


def test_concurrency_cap_refuses_with_retry_after(
    local_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    slow_sql = "SELECT count(*) FROM org_acme__numbers a, org_acme__numbers b, org_acme__numbers c"
    results: dict[str, Any] = {}

    def slow() -> None:
        with httpx.Client(base_url=local_server.url, timeout=30) as own:
            results["slow"] = own.post(
                "/v1/query", json={"sql": slow_sql}, headers=bearer(tokens.org(subject="slow"))
            )

    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.7)  # the slow query holds the only slot now
        busy = client.post(
            "/v1/query",
            json={"sql": "SELECT count(*) FROM org_acme__numbers"},
            headers=bearer(tokens.org(subject="quick")),
        )
        worker.join(QUERY_TIMEOUT_S + 10)
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["code"] == "too_many_concurrent_queries"
        assert busy.headers["retry-after"] == "1"
        assert results["slow"].status_code == 422
        assert results["slow"].json()["error"]["code"] == "query_timeout"
        again = client.post(
            "/v1/query",
            json={"sql": "SELECT count(*) FROM org_acme__numbers"},
            headers=bearer(tokens.org(subject="quick")),
        )
        assert again.status_code == 200 and again.json()["rows"] == [[10_000]]


def test_local_store_export_downloads_through_a_signed_link(
    local_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    token = tokens.org(subject="exporter")
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        created = client.post(
            "/v1/exports",
            json={
                "sql": "SELECT n, n * n AS sq FROM org_acme__numbers ORDER BY n",
                "format": "csv",
            },
            headers=bearer(token),
        )
        assert created.status_code == 202, created.text
        export_id = created.json()["id"]
        deadline = time.monotonic() + 30
        body = created.json()
        while body["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
            body = client.get(f"/v1/exports/{export_id}", headers=bearer(token)).json()
        assert body["status"] == "succeeded", body
        assert body["rows"] == 10_000
        url = httpx.URL(body["download_url"])
        assert str(url).startswith(local_server.url)
        # no token needed: the signed link is the capability
        download = httpx.get(str(url), timeout=30)
        assert download.status_code == 200
        assert 'filename="' in download.headers["content-disposition"]
        rows = list(csv.reader(io.StringIO(download.text)))
        assert rows[0] == ["n", "sq"] and len(rows) == 10_001
        assert rows[1:4] == [["0", "0"], ["1", "1"], ["2", "4"]]
        assert len(download.content) == body["bytes"]
        forged = url.copy_merge_params({"signature": "0" * 64})
        assert httpx.get(str(forged)).status_code == 403
        expired = url.copy_merge_params({"expires": "1000"})
        assert httpx.get(str(expired)).status_code == 403


def test_stopping_the_service_fails_its_running_exports(
    local_server: QueryServer, local_world: World, tmp_path: Path
) -> None:
    tokens = Tokens(local_world.settings)
    token = tokens.org(subject="stopper")
    slow = "SELECT count(*) FROM org_acme__numbers a, org_acme__numbers b, org_acme__numbers c"
    doomed = QueryServer(settings_env(local_world.settings), log_file=tmp_path / "doomed.log")
    doomed.start()
    try:
        with httpx.Client(base_url=doomed.url, timeout=30) as client:
            created = client.post("/v1/exports", json={"sql": slow}, headers=bearer(token))
            assert created.status_code == 202, created.text
            time.sleep(0.5)  # the job is running its query now
    finally:
        started = time.monotonic()
        doomed.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 10, f"stopping took {stopped_in:.1f} s"
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        body = client.get(f"/v1/exports/{created.json()['id']}", headers=bearer(token)).json()
    assert body["status"] == "failed" and body["error"]["code"] == "interrupted", body
