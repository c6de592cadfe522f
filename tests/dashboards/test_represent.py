"""`Represent` jobs: a dashboard panel with `represent: true`, written through the real query
service, becomes a Dagster asset when the code location loads; materialised (the SQL in the
sandbox pool, the chart rendered by vl-convert) it writes its chart as SVG and PNG and its data
snapshot, pinned to the dataset versions it read, to the results bucket; the same inputs give
the same snapshot, a new version of an input a new one, and the new version requests the asset
again (its automation condition, evaluated by Dagster)."""

from __future__ import annotations

import io
import json
from typing import Any

import dagster as dg
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.dashboards.conftest import Service
from trace_assets.represent import load_represent_assets
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import PartitionData
from trace_resources.storage.object_store import local_store
from trace_resources.storage.paths import UNPARTITIONED

DATASET = "org_acme__flows"  # this module's own: the other tests' datasets stay as they are
SQL = f"SELECT kind, sum(amount) AS total FROM {DATASET} GROUP BY kind ORDER BY kind"


def flows(extra: int = 0) -> pa.Table:
    kinds = ["mint", "swap", "swap", "burn"] + ["swap"] * extra
    return pa.table({"kind": kinds, "amount": pa.array(range(1, len(kinds) + 1), pa.int64())})


def board(**panel: Any) -> dict[str, Any]:
    return {
        "name": "Represented",
        "panels": [
            {
                "id": "totals",
                "title": "Totals by kind",
                "sql": SQL,
                "chart": {"kind": "bar", "x": "kind", "y": "total"},
                "represent": True,
                **panel,
            }
        ],
    }


def _resources(service: Service) -> dict[str, Any]:
    return {
        "state": StateStoreResource(dsn=service.settings.state_dsn),
        "objects": ObjectStoreResource(
            kind="local",
            local_root=str(service.settings.local_store_root),
            bucket_datasets=service.settings.bucket_datasets,
            bucket_results=service.settings.bucket_results,
        ),
    }


def _materialise(
    asset: dg.AssetsDefinition, service: Service, instance: dg.DagsterInstance
) -> dict[str, Any]:
    result = dg.materialize([asset], resources=_resources(service), instance=instance)
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    return {k: v.value for k, v in metadata.items()}


@pytest.mark.parametrize(
    ("panel", "message"),
    [
        ({"chart": {"kind": "table"}}, "`represent` draws a chart: a table panel has none"),
        (
            {"sql": f"SELECT * FROM {DATASET} WHERE amount > {{{{n}}}}"},
            "`represent` materialises one fixed picture: its SQL may use no {{parameters}}",
        ),
    ],
)
def test_a_panel_that_cannot_be_one_picture_is_refused(
    client: httpx.Client, acme: dict[str, str], panel: dict[str, Any], message: str
) -> None:
    body = board(**panel)
    if "{{n}}" in body["panels"][0]["sql"]:
        body["parameters"] = [{"name": "n", "type": "integer", "default": 1}]
    answer = client.post("/v1/dashboards", headers=acme, json=body)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]


# dagster 1.13.27's own evaluate_automation_conditions selects with a beta parameter
@pytest.mark.filterwarnings("ignore:Parameter `include_sources` of function `AssetSelection.all`")
def test_a_represented_panel_is_an_asset_drawn_from_pinned_versions(
    service: Service, client: httpx.Client, acme: dict[str, str]
) -> None:
    service.writer.write(DATASET, UNPARTITIONED, PartitionData(flows()))
    made = client.post("/v1/dashboards", headers=acme, json=board())
    assert made.status_code == 201, made.text
    dashboard_id = made.json()["id"]

    [asset] = [
        a
        for a in load_represent_assets(service.settings.state_dsn)
        if dashboard_id.replace("-", "")[:8] in a.key.path[-1]
    ]
    assert asset.key.path[-1] == f"represent_acme__{dashboard_id.replace('-', '')[:8]}_totals"
    assert {d.path[-1] for d in asset.dependency_keys} == {DATASET}
    assert asset.automation_conditions_by_key[asset.key] is not None

    instance = dg.DagsterInstance.ephemeral()
    try:
        first = _materialise(asset, service, instance)
        results = local_store(service.settings.local_store_root, service.settings.bucket_results)
        prefix = first["trace/chart_svg"].split(f"{service.settings.bucket_results}/", 1)[1]
        prefix = prefix.rsplit("/", 1)[0] + "/"
        svg = results.get_bytes(prefix + "chart.svg").decode()
        assert svg.startswith("<svg") and "Totals by kind" in svg
        assert all(kind in svg for kind in ("mint", "swap", "burn"))  # an axis label per bar
        assert svg.count('role="graphics-symbol"') >= 3  # the three bars
        png = results.get_bytes(prefix + "chart.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2_000
        data = pq.read_table(io.BytesIO(results.get_bytes(prefix + "data.parquet")))
        assert data.to_pylist() == [
            {"kind": "burn", "total": 4},
            {"kind": "mint", "total": 1},
            {"kind": "swap", "total": 5},
        ]
        manifest = json.loads(results.get_bytes(prefix + "manifest.json"))
        current = service.writer.versions.read.current_versions(DATASET, [UNPARTITIONED])
        pinned = {DATASET: {UNPARTITIONED: current[UNPARTITIONED].version}}
        assert manifest["versions_read"] == pinned == first["trace/versions_read"]
        assert manifest["dashboard"] == dashboard_id and manifest["sql"] == SQL

        # the same inputs: the same snapshot (a chart is reproducible from its pins)
        assert _materialise(asset, service, instance)["trace/snapshot"] == first["trace/snapshot"]

        # a new version of the input requests the asset again, and draws a new snapshot
        defs = dg.Definitions(assets=[asset, dg.AssetSpec(DATASET)], resources=_resources(service))
        before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert before.total_requested == 0
        service.writer.write(DATASET, UNPARTITIONED, PartitionData(flows(extra=2)))
        instance.report_runless_asset_event(dg.AssetMaterialization(DATASET))  # the relay's
        after = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=before.cursor
        )
        assert after.get_requested_partitions(asset.key) == {None}
        second = _materialise(asset, service, instance)
        assert second["trace/snapshot"] != first["trace/snapshot"]
        assert second["trace/versions_read"][DATASET][UNPARTITIONED] == (
            pinned[DATASET][UNPARTITIONED] + 1
        )
        assert second["trace/rows"] == 3
    finally:
        instance.dispose()
