"""One organisation can not reach another's data by any id or path: datasets (discovery,
queries, pins), snapshots (direct, in a query, inside a cursor), saved queries (get, run,
delete, list) and exports (get, list, download links). "Exists elsewhere" and "does not exist"
answer the same, so nothing about another organisation leaks."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from infra.local.query_service import QueryServer
from tests.query.conftest import SECRET, Tokens, World, bearer

ACME_ONLY = "org_acme__labels"
GLOBEX_ONLY = "org_globex__secret"


def query(client: httpx.Client, token: str, sql: str, **body: Any) -> httpx.Response:
    return client.post("/v1/query", json={"sql": sql, **body}, headers=bearer(token))


def refused(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    assert SECRET not in response.text
    message: str = response.json()["error"]["message"]
    return message


def same_refusal(
    existing: httpx.Response, missing: httpx.Response, existing_id: str, missing_id: str
) -> None:
    """Another org's object and a made-up one read exactly alike (but for the id itself)."""
    assert existing.status_code == missing.status_code, (existing.text, missing.text)
    a, b = existing.json()["error"], missing.json()["error"]
    assert a["code"] == b["code"]
    assert a["message"].replace(existing_id, "ID") == b["message"].replace(missing_id, "ID")


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT * FROM {GLOBEX_ONLY}",
        f"SELECT * FROM {GLOBEX_ONLY.upper()}",
        f'SELECT * FROM "{GLOBEX_ONLY}"',
        f"SELECT * FROM main.{GLOBEX_ONLY}",
        f"SELECT * FROM memory.main.{GLOBEX_ONLY}",
        f"SELECT * FROM temp.main.{GLOBEX_ONLY}",
        f"SELECT n FROM blocks, (SELECT n FROM {GLOBEX_ONLY}) s LIMIT 1",
        f"SELECT 1 WHERE EXISTS (SELECT 1 FROM {GLOBEX_ONLY})",
        f"WITH x AS (SELECT * FROM {GLOBEX_ONLY}) SELECT * FROM x",
        f"SELECT * FROM blocks b JOIN {GLOBEX_ONLY} s ON true",
        f"SELECT * FROM query_table('{GLOBEX_ONLY}')",
        f"SELECT * FROM query('SELECT * FROM {GLOBEX_ONLY}')",
        f"DESCRIBE {GLOBEX_ONLY}",
        f"SUMMARIZE {GLOBEX_ONLY}",
    ],
)
def test_queries_cannot_name_another_orgs_dataset(
    client: httpx.Client, tokens: Tokens, sql: str
) -> None:
    response = query(client, tokens.org("acme"), sql)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["code"] in ("unknown_dataset", "invalid_sql")
    assert SECRET not in response.text
    # and the owner does read it the plain way
    owner = query(client, tokens.org("globex"), f"SELECT secret FROM {GLOBEX_ONLY}")
    assert owner.status_code == 200 and owner.json()["rows"] == [[SECRET]]


def test_unknown_and_forbidden_datasets_read_alike(client: httpx.Client, tokens: Tokens) -> None:
    acme = tokens.org("acme")
    made_up = "org_globex__does_not_exist"
    same_refusal(
        client.get(f"/v1/datasets/{GLOBEX_ONLY}", headers=bearer(acme)),
        client.get(f"/v1/datasets/{made_up}", headers=bearer(acme)),
        GLOBEX_ONLY,
        made_up,
    )
    same_refusal(
        query(client, acme, f"SELECT * FROM {GLOBEX_ONLY}"),
        query(client, acme, f"SELECT * FROM {made_up}"),
        GLOBEX_ONLY,
        made_up,
    )
    same_refusal(
        query(client, acme, f"SELECT * FROM {GLOBEX_ONLY}", pin={GLOBEX_ONLY: {"__all__": 1}}),
        query(client, acme, f"SELECT * FROM {made_up}", pin={made_up: {"__all__": 1}}),
        GLOBEX_ONLY,
        made_up,
    )
    # platform-internal datasets (neither public nor owned) are just as unknown
    refused(query(client, acme, "SELECT * FROM platform_stats"), 404, "unknown_dataset")
    refused(client.get("/v1/datasets/platform_stats", headers=bearer(acme)), 404, "unknown_dataset")
    for path in ("/v1/datasets/..%2F..%2Fetc", "/v1/datasets/ORG_GLOBEX__SECRET"):
        assert client.get(path, headers=bearer(acme)).status_code == 404


def test_snapshots_belong_to_their_org(client: httpx.Client, tokens: Tokens) -> None:
    globex, acme = tokens.org("globex"), tokens.org("acme")
    sql = f"SELECT n FROM {GLOBEX_ONLY} UNION ALL SELECT 1 FROM blocks"
    theirs = query(client, globex, sql, limit=1).json()
    snapshot, cursor = theirs["snapshot"], theirs["next_cursor"]
    assert cursor is not None
    made_up = uuid.uuid4().hex
    same_refusal(
        client.get(f"/v1/snapshots/{snapshot}", headers=bearer(acme)),
        client.get(f"/v1/snapshots/{made_up}", headers=bearer(acme)),
        snapshot,
        made_up,
    )
    # a public-only snapshot of globex is not usable by acme either
    public = query(client, globex, "SELECT count(*) FROM blocks").json()["snapshot"]
    refused(
        query(client, acme, "SELECT count(*) FROM blocks", snapshot=public), 404, "unknown_snapshot"
    )
    # nor is globex's cursor, even with the same SQL
    refused(query(client, acme, sql, cursor=cursor), 404, "unknown_snapshot")


def test_saved_queries_belong_to_their_org(client: httpx.Client, tokens: Tokens) -> None:
    globex, acme = tokens.org("globex", "gina"), tokens.org("acme")
    created = client.post(
        "/v1/saved-queries",
        json={"name": "globex secret", "sql": f"SELECT * FROM {GLOBEX_ONLY}"},
        headers=bearer(globex),
    )
    assert created.status_code == 201
    saved_id, made_up = created.json()["id"], str(uuid.uuid4())
    for method, suffix, body in (("GET", "", None), ("POST", "/run", {}), ("DELETE", "", None)):
        same_refusal(
            client.request(
                method, f"/v1/saved-queries/{saved_id}{suffix}", json=body, headers=bearer(acme)
            ),
            client.request(
                method, f"/v1/saved-queries/{made_up}{suffix}", json=body, headers=bearer(acme)
            ),
            saved_id,
            made_up,
        )
    listed = client.get("/v1/saved-queries", headers=bearer(acme)).json()
    assert saved_id not in [q["id"] for q in listed["data"]]
    # still there for globex, and it runs for globex
    ran = client.post(f"/v1/saved-queries/{saved_id}/run", json={}, headers=bearer(globex))
    assert ran.status_code == 200 and ran.json()["rows"] == [[SECRET, 42]]
    # acme's copy of the same SQL fails on the dataset, not on the saved query
    mine = client.post(
        "/v1/saved-queries",
        json={"name": "globex secret", "sql": f"SELECT * FROM {GLOBEX_ONLY}"},
        headers=bearer(acme),
    )
    assert mine.status_code == 201  # names are per organisation
    refused(
        client.post(f"/v1/saved-queries/{mine.json()['id']}/run", json={}, headers=bearer(acme)),
        404,
        "unknown_dataset",
    )


def _export(client: httpx.Client, token: str, sql: str) -> dict[str, Any]:
    created = client.post("/v1/exports", json={"sql": sql}, headers=bearer(token))
    assert created.status_code == 202, created.text
    export_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/exports/{export_id}", headers=bearer(token)).json()
        if body["status"] in ("succeeded", "failed"):
            return body
        time.sleep(0.1)
    raise AssertionError("export did not finish")


def test_exports_belong_to_their_subject(client: httpx.Client, tokens: Tokens) -> None:
    globex = tokens.org("globex", "gina")
    done = _export(client, globex, f"SELECT * FROM {GLOBEX_ONLY}")
    assert done["status"] == "succeeded"
    made_up = str(uuid.uuid4())
    for other in (tokens.org("acme"), tokens.org("globex", "another-globex-user")):
        same_refusal(
            client.get(f"/v1/exports/{done['id']}", headers=bearer(other)),
            client.get(f"/v1/exports/{made_up}", headers=bearer(other)),
            done["id"],
            made_up,
        )
        listed = client.get("/v1/exports", headers=bearer(other)).json()
        assert done["id"] not in [e["id"] for e in listed["data"]]
    refused(
        client.post(
            "/v1/exports",
            json={"sql": f"SELECT * FROM {GLOBEX_ONLY}"},
            headers=bearer(tokens.org("acme")),
        ),
        404,
        "unknown_dataset",
    )


def test_local_download_links_are_bound_to_their_export(
    local_server: QueryServer, local_world: World
) -> None:
    tokens = Tokens(local_world.settings)
    with httpx.Client(base_url=local_server.url, timeout=30) as client:
        globex = _export(client, tokens.org("globex"), f"SELECT * FROM {GLOBEX_ONLY}")
        acme = _export(client, tokens.org("acme"), "SELECT n FROM org_acme__numbers LIMIT 3")
        assert globex["status"] == acme["status"] == "succeeded"
        link = httpx.URL(acme["download_url"])
        assert link.host == "127.0.0.1" and link.path == f"/v1/exports/{acme['id']}/download"
        assert SECRET not in client.get(acme["download_url"]).text
        # acme's signature does not open globex's export
        stolen = link.copy_with(path=f"/v1/exports/{globex['id']}/download")
        refused(client.get(str(stolen)), 403, "invalid_signature")
        # nor does a later expiry with the same signature
        later = link.copy_merge_params({"expires": str(int(link.params["expires"]) + 3600)})
        refused(client.get(str(later)), 403, "invalid_signature")
