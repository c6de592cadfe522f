"""`/v1/dashboards` and `/v1/embed` over HTTP against the real service: versions, another
organisation's view, refused input, panel runs with typed parameters, and what an embed token
can and cannot do."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pyarrow as pa
import pytest

from tests.dashboards.conftest import ALICE, BOB, DAYS, TRANSFERS, Service, bearer, spec
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.paths import UNPARTITIONED


def _create(client: httpx.Client, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/dashboards", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def _run(
    client: httpx.Client,
    headers: dict[str, str],
    dashboard_id: str,
    panel: str,
    **body: Any,
) -> httpx.Response:
    return client.post(
        f"/v1/dashboards/{dashboard_id}/panels/{panel}/run", json=body, headers=headers
    )


def test_create_update_versions_list_and_delete(client: httpx.Client, acme: dict[str, str]) -> None:
    created = _create(client, acme, spec("Versions"))
    dashboard_id = created["id"]
    assert (created["version"], created["current_version"]) == (1, 1)
    assert created["spec"]["panels"][0]["sql"].startswith("SELECT day, sum(amount)")

    changed = spec("Versions renamed")
    changed["panels"][1]["title"] = "Transfers of the day"
    updated = client.put(f"/v1/dashboards/{dashboard_id}", json=changed, headers=acme)
    assert updated.status_code == 200, updated.text
    assert (updated.json()["version"], updated.json()["name"]) == (2, "Versions renamed")

    versions = client.get(f"/v1/dashboards/{dashboard_id}/versions", headers=acme).json()
    assert [v["version"] for v in versions["data"]] == [1, 2]
    assert {v["created_by"] for v in versions["data"]} == {"alice"}
    newest = client.get(f"/v1/dashboards/{dashboard_id}", headers=acme).json()
    assert newest["spec"]["panels"][1]["title"] == "Transfers of the day"
    first = client.get(f"/v1/dashboards/{dashboard_id}?version=1", headers=acme).json()
    assert (first["version"], first["spec"]["panels"][1]["title"]) == (1, "Transfers")
    missing = client.get(f"/v1/dashboards/{dashboard_id}?version=9", headers=acme)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "unknown_version")

    listed = client.get("/v1/dashboards", headers=acme).json()
    assert dashboard_id in {d["id"] for d in listed["data"]}

    assert client.delete(f"/v1/dashboards/{dashboard_id}", headers=acme).status_code == 204
    gone = client.get(f"/v1/dashboards/{dashboard_id}", headers=acme)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "unknown_dashboard")
    listed = client.get("/v1/dashboards", headers=acme).json()
    assert dashboard_id not in {d["id"] for d in listed["data"]}


def test_panel_runs_bind_typed_parameters(client: httpx.Client, acme: dict[str, str]) -> None:
    dashboard_id = _create(client, acme, spec("Runs"))["id"]
    daily = _run(client, acme, dashboard_id, "daily").json()
    assert daily["rows"] == [[DAYS[0], 60], [DAYS[1], 12], [DAYS[2], 10]]
    narrowed = _run(
        client, acme, dashboard_id, "daily", parameters={"from_block": 103, "to_block": "106"}
    ).json()
    assert narrowed["rows"] == [[DAYS[1], 12], [DAYS[2], 3]]

    # the drill-down's query: the transfers of one day, then of one sender that day
    day = _run(client, acme, dashboard_id, "transfers", parameters={"day": DAYS[2]}).json()
    assert [r[0] for r in day["rows"]] == [105, 106, 107, 108]
    bob = _run(
        client, acme, dashboard_id, "transfers", parameters={"day": DAYS[2], "address": BOB}
    ).json()
    assert bob["rows"] == [[107, 3, BOB]]
    every = _run(client, acme, dashboard_id, "transfers").json()
    assert len(every["rows"]) == len(TRANSFERS)


@pytest.mark.parametrize(
    ("parameters", "needle"),
    [
        ({"day": "2026-01-01' OR 1=1 --"}, "give YYYY-MM-DD"),
        ({"day": "2026-02-30"}, "no calendar date"),
        ({"address": "0x1234"}, "0x and 40 hex digits"),
        ({"address": ALICE + "' OR 1=1"}, "0x and 40 hex digits"),
        ({"from_block": "1; DROP TABLE x"}, "whole number"),
        ({"from_block": -1}, "block number is >= 0"),
        ({"nope": 1}, "unknown parameter 'nope'"),
    ],
)
def test_bad_parameter_values_are_refused_with_what_to_give(
    client: httpx.Client, acme: dict[str, str], parameters: dict[str, Any], needle: str
) -> None:
    dashboard_id = _create(client, acme, spec("Bad values"))["id"]
    response = _run(client, acme, dashboard_id, "transfers", parameters=parameters)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dashboard" and needle in error["message"], error


def _broken(change: str) -> dict[str, Any]:
    body = spec("Broken")
    panels = body["panels"]
    if change == "unknown_placeholder":
        panels[0]["sql"] = "SELECT {{missing}} AS x"
    elif change == "drill_panel":
        panels[0]["drill"]["panel"] = "nowhere"
    elif change == "drill_parameter":
        panels[0]["drill"]["parameter"] = "week"
    elif change == "sql_and_query":
        panels[0]["query_id"] = str(uuid.uuid4())
    elif change == "unknown_saved_query":
        del panels[0]["sql"]
        panels[0]["query_id"] = str(uuid.uuid4())
    elif change == "not_select":
        panels[0]["sql"] = "DELETE FROM org_acme__transfers"
    elif change == "chart_axes":
        panels[0]["chart"] = {"kind": "line", "x": "day"}
    elif change == "duplicate_panel":
        panels[1]["id"] = "daily"
    elif change == "bad_default":
        body["parameters"] = [{"name": "day", "type": "date", "default": "yesterday"}]
    return body


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("unknown_placeholder", "declares no parameter 'missing'"),
        ("drill_panel", "drill.panel 'nowhere' is neither `self` nor a panel id"),
        ("drill_parameter", "drill.parameter 'week' is not a declared parameter"),
        ("sql_and_query", "exactly one of `sql`"),
        ("unknown_saved_query", "no saved query"),
        ("not_select", "only SELECT statements run here"),
        ("chart_axes", "needs `chart.x` and `chart.y`"),
        ("duplicate_panel", "panel id 'daily' is given twice"),
        ("bad_default", "give YYYY-MM-DD"),
    ],
)
def test_bad_dashboards_get_one_clear_error(
    client: httpx.Client, acme: dict[str, str], change: str, needle: str
) -> None:
    response = client.post("/v1/dashboards", json=_broken(change), headers=acme)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dashboard" and needle in error["message"], error


def test_malformed_specs_name_the_field(client: httpx.Client, acme: dict[str, str]) -> None:
    body = spec("Malformed")
    body["panels"][0]["chart"]["kind"] = "pie"
    response = client.post("/v1/dashboards", json=body, headers=acme)
    assert response.status_code == 422
    assert "panels.0.chart.kind" in response.json()["error"]["message"]
    body = spec("Extra", colour="red")
    response = client.post("/v1/dashboards", json=body, headers=acme)
    assert response.status_code == 422 and "colour" in response.json()["error"]["message"]


def test_a_saved_query_panel_keeps_its_sql_in_the_version(
    client: httpx.Client, acme: dict[str, str]
) -> None:
    saved = client.post(
        "/v1/saved-queries",
        json={"name": f"count-{uuid.uuid4()}", "sql": "SELECT count(*) AS n FROM org_acme__other"},
        headers=acme,
    ).json()
    body = spec(
        "Saved",
        panels=[
            {
                "id": "count",
                "title": "Count",
                "query_id": saved["id"],
                "chart": {"kind": "number", "y": "n"},
            }
        ],
    )
    created = _create(client, acme, body)
    assert created["spec"]["panels"][0]["sql"] == saved["sql"]
    assert _run(client, acme, created["id"], "count").json()["rows"] == [[2]]


def _same_as_unknown(response: httpx.Response, unknown: httpx.Response, ids: tuple[str, str]):
    assert response.status_code == unknown.status_code == 404
    assert response.json() == {
        "error": {
            **unknown.json()["error"],
            "message": unknown.json()["error"]["message"].replace(ids[1], ids[0]),
        }
    }


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "", None),
        ("GET", "/versions", None),
        ("PUT", "", spec("Taken over")),
        ("DELETE", "", None),
        ("POST", "/panels/daily/run", {}),
        ("POST", "/embeds", {"ttl_s": 60}),
        ("GET", "/embeds", None),
    ],
)
def test_another_organisations_dashboard_reads_as_unknown(
    client: httpx.Client,
    acme: dict[str, str],
    globex: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    dashboard_id = _create(client, acme, spec("Acme only"))["id"]
    unknown_id = str(uuid.uuid4())
    theirs = client.request(
        method, f"/v1/dashboards/{dashboard_id}{path}", json=body, headers=globex
    )
    unknown = client.request(
        method, f"/v1/dashboards/{unknown_id}{path}", json=body, headers=globex
    )
    _same_as_unknown(theirs, unknown, (dashboard_id, unknown_id))
    assert theirs.json()["error"]["code"] == "unknown_dashboard"
    # and nothing changed for acme
    mine = client.get(f"/v1/dashboards/{dashboard_id}", headers=acme).json()
    assert (mine["name"], mine["current_version"]) == ("Acme only", 1)
    assert dashboard_id not in {
        d["id"] for d in client.get("/v1/dashboards", headers=globex).json()["data"]
    }


# -- embeds --------------------------------------------------------------------------------------


def _embed(
    client: httpx.Client, headers: dict[str, str], dashboard_id: str, **body: Any
) -> dict[str, Any]:
    response = client.post(f"/v1/dashboards/{dashboard_id}/embeds", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_an_embed_token_runs_its_panels_and_nothing_else(
    client: httpx.Client, acme: dict[str, str], service: Service
) -> None:
    dashboard_id = _create(client, acme, spec("Shared"))["id"]
    embed = _embed(client, acme, dashboard_id, ttl_s=600)
    assert embed["url"] == f"/ui/embed/{embed['id']}#token={embed['token']}"
    viewer = bearer(embed["token"])

    shared = client.get("/v1/embed/dashboard", headers=viewer)
    assert shared.status_code == 200, shared.text
    assert [p["id"] for p in shared.json()["panels"]] == ["daily", "transfers"]
    assert "sql" not in shared.json()["panels"][0]
    run = client.post(
        "/v1/embed/panels/transfers/run", json={"parameters": {"day": DAYS[1]}}, headers=viewer
    )
    assert run.status_code == 200, run.text
    assert [r[0] for r in run.json()["rows"]] == [103, 104]

    # no other SQL, no other dataset, no listing, no other route
    refused = [
        client.post("/v1/query", json={"sql": "SELECT * FROM org_acme__transfers"}, headers=viewer),
        client.post("/v1/query", json={"sql": "SELECT * FROM org_acme__other"}, headers=viewer),
        client.get("/v1/datasets", headers=viewer),
        client.get("/v1/datasets/org_acme__other", headers=viewer),
        client.get("/v1/dashboards", headers=viewer),
        client.get(f"/v1/dashboards/{dashboard_id}", headers=viewer),
        client.post(f"/v1/dashboards/{dashboard_id}/panels/daily/run", json={}, headers=viewer),
        client.post(f"/v1/dashboards/{dashboard_id}/embeds", json={}, headers=viewer),
        client.get("/v1/saved-queries", headers=viewer),
    ]
    assert [r.status_code for r in refused] == [401] * len(refused), [r.text for r in refused]
    sneaky = client.post(
        "/v1/embed/panels/transfers/run",
        json={"parameters": {}, "sql": "SELECT * FROM org_acme__other"},
        headers=viewer,
    )
    assert sneaky.status_code == 422 and "sql" in sneaky.json()["error"]["message"]
    unknown = client.post("/v1/embed/panels/other/run", json={}, headers=viewer)
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_panel")
    injected = client.post(
        "/v1/embed/panels/transfers/run",
        json={"parameters": {"address": "0x00' UNION SELECT * FROM org_acme__other --"}},
        headers=viewer,
    )
    assert injected.status_code == 400, injected.text
    # an org token is no embed token
    assert client.get("/v1/embed/dashboard", headers=acme).status_code == 401

    listed = client.get(f"/v1/dashboards/{dashboard_id}/embeds", headers=acme).json()
    assert [e["id"] for e in listed["data"]] == [embed["id"]] and "token" not in listed["data"][0]
    revoked = client.delete(f"/v1/dashboards/{dashboard_id}/embeds/{embed['id']}", headers=acme)
    assert revoked.status_code == 204
    after = client.post("/v1/embed/panels/transfers/run", json={}, headers=viewer)
    assert (after.status_code, after.json()["error"]["code"]) == (401, "embed_revoked")
    assert client.get("/v1/embed/dashboard", headers=viewer).status_code == 401


def test_a_panel_embed_shares_that_panel_and_its_drill_target(
    client: httpx.Client, acme: dict[str, str]
) -> None:
    body = spec("Three panels")
    body["panels"].append(
        {
            "id": "other",
            "title": "Other",
            "sql": "SELECT n FROM org_acme__other",
            "chart": {"kind": "table"},
        }
    )
    dashboard_id = _create(client, acme, body)["id"]
    viewer = bearer(_embed(client, acme, dashboard_id, panel="daily")["token"])
    shared = client.get("/v1/embed/dashboard", headers=viewer).json()
    assert sorted(p["id"] for p in shared["panels"]) == ["daily", "transfers"]
    assert client.post("/v1/embed/panels/daily/run", json={}, headers=viewer).status_code == 200
    other = client.post("/v1/embed/panels/other/run", json={}, headers=viewer)
    assert (other.status_code, other.json()["error"]["code"]) == (404, "unknown_panel")


def test_an_embed_stops_at_its_expiry_and_with_its_dashboard(
    client: httpx.Client, acme: dict[str, str]
) -> None:
    dashboard_id = _create(client, acme, spec("Short-lived"))["id"]
    short = bearer(_embed(client, acme, dashboard_id, ttl_s=2)["token"])
    long = bearer(_embed(client, acme, dashboard_id, ttl_s=600)["token"])
    assert client.post("/v1/embed/panels/daily/run", json={}, headers=short).status_code == 200
    time.sleep(2.5)  # past the embed's expiry (the token's own leeway does not extend it)
    expired = client.post("/v1/embed/panels/daily/run", json={}, headers=short)
    assert (expired.status_code, expired.json()["error"]["code"]) == (401, "embed_revoked")
    assert client.post("/v1/embed/panels/daily/run", json={}, headers=long).status_code == 200
    assert client.delete(f"/v1/dashboards/{dashboard_id}", headers=acme).status_code == 204
    assert client.post("/v1/embed/panels/daily/run", json={}, headers=long).status_code == 401


def test_an_embed_reads_the_dataset_versions_pinned_when_it_was_made(
    client: httpx.Client, acme: dict[str, str], service: Service
) -> None:
    body = spec(
        "Pinned",
        parameters=[],
        panels=[
            {
                "id": "n",
                "title": "N",
                "sql": "SELECT sum(n) AS n FROM org_acme__pinned",
                "chart": {"kind": "number", "y": "n"},
            }
        ],
    )
    dashboard_id = _create(client, acme, body)["id"]
    embed = _embed(client, acme, dashboard_id)
    assert set(embed["pins"]) == {"org_acme__pinned"}
    pinned = bearer(_embed(client, acme, dashboard_id)["token"])
    floating = bearer(_embed(client, acme, dashboard_id, pin_versions=False)["token"])
    service.writer.write(
        "org_acme__pinned", UNPARTITIONED, PartitionData(pa.table({"n": [1, 2, 3]}))
    )
    run = lambda h, path: client.post(path, json={}, headers=h).json()["rows"]  # noqa: E731
    assert run(bearer(embed["token"]), "/v1/embed/panels/n/run") == [[1]]
    assert run(pinned, "/v1/embed/panels/n/run") == [[1]]
    assert run(floating, "/v1/embed/panels/n/run") == [[6]]
    assert run(acme, f"/v1/dashboards/{dashboard_id}/panels/n/run") == [[6]]
