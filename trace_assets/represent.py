"""`Represent` jobs: a dashboard panel materialised as an asset.

A panel with `represent: true` (a line, bar, area, scatter or number panel whose SQL takes no
parameters: one fixed picture) becomes the asset `represent_<org>__<dashboard>_<panel>` of its
organisation's group when the code location loads (like the organisations' transforms,
`trace_assets.udfs`). It depends on the datasets its SQL reads and is requested again when any
of them gets a new version (`any_deps_updated`, as the rollups). A run:

1. reads the current version of every partition of each dataset the SQL names, checked again
   against what the organisation may read (the one access rule) and refusing a version whose
   blocking quality rules failed; the versions read are the snapshot's pins;
2. runs the panel's SELECT in a sandbox worker (the SQL transforms' pool: OS limits, no
   network, no files but what it is handed);
3. draws the chart from the rows with the Vega-Lite spec the page draws (`vega_lite`),
   rendered to SVG and PNG by `vl-convert` (no browser, no network);
4. writes `chart.svg`, `chart.png`, `data.parquet` and `manifest.json` (the dashboard version,
   the SQL, the dataset versions read, the rows) to the results bucket under
   `represent/<org>/<dashboard id>/<panel>/<digest>/`, where the digest hashes the rows and the
   spec: the same inputs give the same objects (a chart is reproducible from its pins), and
   the asset's data version is that digest.
"""

import datetime as dt
import decimal
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from trace_assets.udfs import UDF_GROUP_PREFIX, sandboxed_select
from trace_resources.alert_pipeline.rules import referenced_tables
from trace_resources.failures import as_dagster_failure
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.sandbox import InlineSource
from trace_resources.settings import get_settings
from trace_resources.storage import dashboards as store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.udfs.catalogue import input_catalogue

__all__ = [
    "RepresentedPanel",
    "asset_name",
    "build_represent_asset",
    "load_represent_assets",
    "vega_lite",
]

log = logging.getLogger(__name__)

_XY = {"line": "line", "bar": "bar", "area": "area", "scatter": "point"}
CHART_WIDTH, CHART_HEIGHT = 520, 220  # as the page draws it


@dataclass(frozen=True)
class RepresentedPanel:
    org: str
    dashboard_id: str
    dashboard_name: str
    version: int
    panel_id: str
    title: str
    sql: str
    chart: dict[str, Any]


def asset_name(panel: RepresentedPanel) -> str:
    """`represent_<org>__<first 8 of the dashboard id>_<panel id>`."""
    return f"represent_{panel.org}__{panel.dashboard_id.replace('-', '')[:8]}_{panel.panel_id}"


def _field_type(table: pa.Table, name: str, kind: str) -> str:
    if kind == "bar":
        return "ordinal"  # one bar per day, block or key
    field = table.schema.field(name)
    if pa.types.is_temporal(field.type):
        return "temporal"
    if pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
        return "quantitative"
    if pa.types.is_decimal(field.type):
        return "quantitative"
    return "nominal"


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def vega_lite(panel: RepresentedPanel, table: pa.Table) -> dict[str, Any]:
    """The Vega-Lite spec of the panel's chart over its rows (the page's `chartSpec`)."""
    chart = panel.chart
    kind = chart["kind"]
    rows = [{k: _json_value(v) for k, v in row.items()} for row in table.to_pylist()]
    spec: dict[str, Any] = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": panel.title,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "data": {"values": rows},
    }
    if kind == "number":
        spec["mark"] = {"type": "text", "fontSize": 48}
        spec["data"] = {"values": rows[:1]}
        spec["encoding"] = {"text": {"field": chart["y"], "type": "nominal"}}
        return spec
    for column in (chart["x"], chart["y"]):
        if column not in table.column_names:
            raise dg.Failure(
                description=f"{asset_name(panel)}: the chart's column {column!r} is not in the "
                f"result ({', '.join(table.column_names)}): fix chart.x / chart.y of panel "
                f"{panel.panel_id!r}",
                allow_retries=False,
            )
    x_type = _field_type(table, chart["x"], kind)
    x: dict[str, Any] = {"field": chart["x"], "type": x_type, "title": chart["x"]}
    if x_type == "quantitative" and "block" in chart["x"].lower():
        x["axis"] = {"format": "d"}
        x["scale"] = {"zero": False}
    if x_type == "temporal":
        x["scale"] = {"type": "utc"}
        if pa.types.is_date(table.schema.field(chart["x"]).type):
            x["timeUnit"] = "utcyearmonthdate"
            x["axis"] = {"format": "%Y-%m-%d"}
    spec["mark"] = {"type": _XY[kind]}
    spec["encoding"] = {
        "x": x,
        "y": {"field": chart["y"], "type": "quantitative", "title": chart["y"]},
    }
    return spec


def _failure(panel: RepresentedPanel, why: str) -> dg.Failure:
    return dg.Failure(description=f"{asset_name(panel)}: {why}", allow_retries=False)


def _run_select(panel: RepresentedPanel, sources: list[InlineSource]) -> pa.Table:
    settings = get_settings()
    page = sandboxed_select(asset_name(panel), panel.sql, sources, settings)
    if page.has_more:
        raise _failure(
            panel,
            f"its SQL returned more than {settings.udf_sql_max_output} "
            "(TRACE_UDF_SQL_MAX_OUTPUT): aggregate it for a chart",
        )
    return page.table


def build_represent_asset(panel: RepresentedPanel, deps: list[str]) -> dg.AssetsDefinition:
    """The asset of one represented panel (of its dashboard's current version)."""
    name = asset_name(panel)

    @dg.asset(
        name=name,
        description=f"{panel.dashboard_name} / {panel.title}: the panel's chart (SVG, PNG) and "
        f"data snapshot, dashboard {panel.dashboard_id} version {panel.version}",
        deps=deps,
        group_name=f"{UDF_GROUP_PREFIX}{panel.org}",
        owners=[f"team:{panel.org}"],
        pool=f"{UDF_GROUP_PREFIX}{panel.org}",
        kinds={"vega-lite", "svg", "png"},
        metadata={
            "trace/dashboard": panel.dashboard_id,
            "trace/dashboard_version": panel.version,
            "trace/panel": panel.panel_id,
            "trace/sql": dg.MetadataValue.md(f"```sql\n{panel.sql.strip()}\n```"),
        },
        automation_condition=(
            dg.AutomationCondition.any_deps_updated().since_last_handled()
            & ~dg.AutomationCondition.in_progress()
        ),
    )
    def represent(
        context: dg.AssetExecutionContext, state: StateStoreResource, objects: ObjectStoreResource
    ) -> dg.MaterializeResult:
        import vl_convert

        with as_dagster_failure():
            readable = input_catalogue(engine_for(state.dsn), panel.org)
            tables = referenced_tables(panel.sql)
            refused = [t for t in tables if t not in readable]
            if refused:
                raise _failure(
                    panel,
                    f"its SQL reads {', '.join(refused)}, which organisation {panel.org!r} may "
                    "not read (or which does not exist); nothing was drawn",
                )
            reader = state.reader(objects)
            read: dict[tuple[str, str], int] = {}
            sources = []
            for table_name in tables:
                known = readable[table_name]
                keys = [UNPARTITIONED] if known.partitioning == "none" else None
                table = reader.read(
                    table_name, keys, schema=known.schema, refuse_failed_checks=True, read=read
                )
                sources.append(InlineSource(table_name, table))
            result = _run_select(panel, sources)
            spec = vega_lite(panel, result)
            data = io.BytesIO()
            pq.write_table(result, data, compression="zstd")
            pins: dict[str, dict[str, int]] = {}
            for (dataset, key), version in sorted(read.items()):
                pins.setdefault(dataset, {})[key] = version
            manifest = {
                "org": panel.org,
                "dashboard": panel.dashboard_id,
                "dashboard_version": panel.version,
                "panel": panel.panel_id,
                "sql": panel.sql,
                "rows": result.num_rows,
                "versions_read": pins,
                "vega_lite": {k: v for k, v in spec.items() if k != "data"},
            }
            body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            digest = hashlib.sha256(body + json.dumps(spec, sort_keys=True).encode()).hexdigest()
            svg = vl_convert.vegalite_to_svg(spec).encode()
            png = vl_convert.vegalite_to_png(spec, scale=2)
            bucket = objects.bucket(objects.bucket_results)
            prefix = f"represent/{panel.org}/{panel.dashboard_id}/{panel.panel_id}/{digest[:16]}/"
            for key, payload in (
                ("chart.svg", svg),
                ("chart.png", png),
                ("data.parquet", data.getvalue()),
                ("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode()),
            ):
                bucket.put_bytes(prefix + key, payload)
            context.log.info(
                f"{name}: {result.num_rows} row(s) from {sum(len(v) for v in pins.values())} "
                f"dataset version(s), drawn to {bucket.uri(prefix)}"
            )
        return dg.MaterializeResult(
            metadata={
                "trace/rows": result.num_rows,
                "trace/chart_svg": dg.MetadataValue.path(bucket.uri(prefix + "chart.svg")),
                "trace/chart_png": dg.MetadataValue.path(bucket.uri(prefix + "chart.png")),
                "trace/data": dg.MetadataValue.path(bucket.uri(prefix + "data.parquet")),
                "trace/versions_read": dg.MetadataValue.json(pins),
                "trace/snapshot": digest,
            },
            data_version=dg.DataVersion(digest),
        )

    return represent


def load_represent_assets(state_dsn: str) -> list[dg.AssetsDefinition]:
    """An asset per represented panel of every dashboard's current version. A state database
    that does not answer, or is not migrated, loads none (with a warning); a panel whose SQL
    reads nothing the organisation may read is left out (with a warning)."""
    engine = sa.create_engine(state_dsn, poolclass=sa.NullPool, connect_args={"connect_timeout": 5})
    assets = []
    try:
        specs = store.current_specs(engine)
        readable: dict[str, set[str]] = {}
        for board, version in specs:
            for item in version["spec"].get("panels", []):
                if not item.get("represent"):
                    continue
                panel = RepresentedPanel(
                    org=board["org"],
                    dashboard_id=str(board["id"]),
                    dashboard_name=board["name"],
                    version=version["version"],
                    panel_id=item["id"],
                    title=item["title"],
                    sql=item["sql"],
                    chart=item["chart"],
                )
                try:
                    if panel.org not in readable:
                        readable[panel.org] = set(input_catalogue(engine, panel.org))
                    deps = [t for t in referenced_tables(panel.sql) if t in readable[panel.org]]
                    assets.append(build_represent_asset(panel, deps))
                except Exception as exc:  # one broken panel must not hide the others
                    log.warning("represented panel %s not loaded: %s", asset_name(panel), exc)
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        log.warning("represented dashboard panels not loaded (Postgres state: %s)", reason)
        return []
    finally:
        engine.dispose()
    return assets
