"""Organisations' own transforms as Dagster assets: one asset per applied transform, built from
the registry (`trace_udf_versions`, newest version of each) when the code location loads, so
a reload shows the transforms applied since.

An asset is partitioned like its inputs (block ranges, or none), depends on its inputs (its
lineage in the UI, column lineage included), and runs like the platform's derived datasets:
for each partition of the run it reads exactly that partition's committed version of each
block-range input (an unpartitioned input whole, in its current version), refusing a version
whose blocking rules failed, hands the declared columns only to a sandbox worker
(`trace_resources.sandbox`: OS limits, no network, no files but what it is handed) that runs
the organisation's SELECT, checks the result against the declared schema, evaluates the
declared quality rules (the circuit breaker) and returns the partitions to the dataset IO
manager, which stages and commits them fenced by their attempts. What may be read is decided
again at run time by the one access rule. Python transforms' assets: `trace_assets.udf_python`.
"""

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import pyarrow as pa
import sqlalchemy as sa
from dagster_shared.utils.warnings import BetaWarning

from trace_assets.derived.assets import _gated, dataset_metadata
from trace_assets.partitions import block_ranges
from trace_assets.quality import rule_check_specs
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import DatasetDeclaration, arrow_schema
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.sandbox import InlineSource, SandboxError
from trace_resources.sandbox.shared import udf_sql_pool
from trace_resources.settings import Settings, byte_size, get_settings
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.commit import DatasetReader, PartitionData
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.udfs import UdfDeclaration, as_dataset_declaration
from trace_resources.udfs.catalogue import input_catalogue
from trace_resources.udfs.declaration import PythonCode, SqlCode
from trace_resources.udfs.enrichments import enrichment_declarations

__all__ = [
    "build_udf_asset",
    "load_enrichment_specs",
    "load_udf_assets",
    "sandboxed_select",
    "UDF_GROUP_PREFIX",
]

log = logging.getLogger(__name__)

UDF_GROUP_PREFIX = "org_"  # each organisation's transforms are one group: org_<org>


def _failure(message: str, *, retry: bool = False) -> dg.Failure:
    return dg.Failure(description=message, allow_retries=retry)


def _sandbox_failure(name: str, exc: SandboxError, settings: Settings) -> dg.Failure:
    if exc.kind == "timeout":
        why = f"ran longer than {settings.udf_sql_timeout_s:g} s (TRACE_UDF_SQL_TIMEOUT_S)"
    elif exc.kind in ("memory", "crashed"):
        why = f"needed more than {settings.udf_sql_memory_limit} (TRACE_UDF_SQL_MEMORY_LIMIT)"
    elif exc.kind == "cpu":
        why = f"used too much CPU time: {exc.message}"
    elif exc.kind == "too_large":
        why = f"returned more than {settings.udf_sql_max_output} (TRACE_UDF_SQL_MAX_OUTPUT)"
    else:
        why = f"failed: {exc.message}"
    return _failure(
        f"the SQL of {name} {why}; nothing was committed",
        retry=exc.kind in ("crashed", "internal", "busy"),
    )


def _input_tables(
    reader: DatasetReader, udf: UdfDeclaration, key: str, readable: dict[str, Any]
) -> list[InlineSource]:
    """The declared columns of each input for one partition of the transform."""
    sources = []
    for item in udf.inputs:
        known = readable.get(item.dataset)
        if known is None:
            raise _failure(
                f"{udf.name} reads {item.dataset!r}, which organisation {udf.org!r} may no "
                "longer read (or which no longer exists); nothing was committed"
            )
        keys = [key] if known.partitioning == "block_range" and key != UNPARTITIONED else None
        if known.partitioning == "none":
            keys = [UNPARTITIONED]
        table = reader.read(item.dataset, keys, schema=known.schema, refuse_failed_checks=True)
        sources.append(InlineSource(item.dataset, table.select(item.columns)))
    return sources


def _conform(
    udf: UdfDeclaration, schema: pa.Schema, table: pa.Table, key: str, what: str = "the SELECT"
) -> pa.Table:
    """The SELECT's result as the declared schema, or a failure saying how it differs."""
    where = f"{udf.name} partition {key}" if key != UNPARTITIONED else udf.name
    if table.column_names != schema.names:
        raise _failure(
            f"{where}: {what} returned the columns {', '.join(table.column_names)}; the "
            f"declaration's schema is {', '.join(schema.names)}; nothing was committed"
        )
    for field in schema:
        nulls = table[field.name].null_count
        if not field.nullable and nulls:
            raise _failure(
                f"{where}: column {field.name!r} holds {nulls} null(s) but is declared not "
                "nullable (declare `nullable: true` or filter them out); nothing was committed"
            )
    try:
        conformed = table.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise _failure(
            f"{where}: {what}'s result does not fit the declared schema ({exc}); nothing "
            "was committed"
        ) from None
    return conformed


def sandboxed_select(name: str, sql: str, sources: list[InlineSource], settings: Settings) -> Any:
    """An organisation's SELECT over `sources` in a worker of the SQL transforms' sandbox pool:
    its page of results (`has_more` when it outgrew TRACE_UDF_SQL_MAX_OUTPUT); a sandbox
    refusal as the step's failure, naming `name`."""
    timeout_s = settings.udf_sql_timeout_s
    try:
        with udf_sql_pool(settings).lease(wait_s=60 + timeout_s) as worker:
            return worker.page(
                sql,
                sources,
                offset=0,
                limit=1 << 62,
                max_bytes=byte_size(settings.udf_sql_max_output),
                timeout_s=timeout_s,
            )
    except SandboxError as exc:
        raise _sandbox_failure(name, exc, settings) from None


def _run_select(udf: UdfDeclaration, sources: list[InlineSource], settings: Settings) -> pa.Table:
    assert isinstance(udf.code, SqlCode)
    page = sandboxed_select(udf.name, udf.code.sql, sources, settings)
    if page.has_more:
        raise _failure(
            f"the SQL of {udf.name} returned more than {settings.udf_sql_max_output} for one "
            "partition (TRACE_UDF_SQL_MAX_OUTPUT); nothing was committed"
        )
    return page.table


def build_udf_asset(udf: UdfDeclaration, version: int) -> dg.AssetsDefinition:
    """The asset of one applied version of a transform."""
    decl = as_dataset_declaration(udf, source_file=f"trace_udf_versions/{udf.name}@v{version}")
    if isinstance(udf.code, PythonCode):
        from trace_assets.udf_python import build_python_udf_asset  # it builds on this module

        return build_python_udf_asset(udf, udf.code, version)
    assert isinstance(udf.code, SqlCode)
    schema = arrow_schema(decl)
    partitioned = udf.partitioning == "block_range"
    metadata = {
        **dataset_metadata(decl),
        "trace/udf_version": version,
        "trace/udf_sql": dg.MetadataValue.md(f"```sql\n{udf.code.sql.strip()}\n```"),
    }

    def compute(
        context: dg.AssetExecutionContext, state: StateStoreResource, objects: ObjectStoreResource
    ) -> Iterator[Any]:
        settings = get_settings()
        keys = list(context.partition_keys) if partitioned else [UNPARTITIONED]
        reader = state.reader(objects)
        tables: dict[str, pa.Table] = {}
        with as_dagster_failure():
            readable = input_catalogue(engine_for(state.dsn), udf.org)
            for key in keys:
                try:
                    sources = _input_tables(reader, udf, key, readable)
                except FileNotFoundError as exc:
                    raise _failure(f"{udf.name}: {exc}; nothing was committed") from None
                result = _run_select(udf, sources, settings)
                tables[key] = _conform(udf, schema, result, key)
                context.log.info(
                    f"{udf.name} {key}: {tables[key].num_rows} rows from "
                    f"{sum(s.table.num_rows for s in sources)} input rows"
                )
        if not partitioned:
            yield from _gated(decl, {None: tables[UNPARTITIONED]})
            yield dg.Output(tables[UNPARTITIONED])
            return
        by_key: dict[str | None, pa.Table] = {k: t for k, t in tables.items()}
        yield from _gated(decl, by_key)
        yield dg.Output({k: PartitionData(t) for k, t in tables.items()})

    return udf_asset(udf, decl, metadata, kinds={"sql", "parquet"})(compute)


def udf_asset(
    udf: UdfDeclaration, decl: DatasetDeclaration, metadata: dict[str, Any], **extra: Any
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """The `@asset` of a transform, SQL or Python: its lineage, partitioning (a single-run
    backfill policy over block ranges, or none), checks, owner, its organisation's group and
    pool; `extra` adds to them (kinds, a retry policy)."""
    partitioned = udf.partitioning == "block_range"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # backfill_policy on @asset
        return dg.asset(
            name=udf.name,
            description=udf.description,
            deps=[item.dataset for item in udf.inputs],
            partitions_def=block_ranges if partitioned else None,
            backfill_policy=dg.BackfillPolicy.single_run() if partitioned else None,
            io_manager_key="dataset_io_manager",
            metadata=metadata,
            check_specs=rule_check_specs(decl),
            owners=[decl.owner],
            group_name=f"{UDF_GROUP_PREFIX}{udf.org}",
            # the organisation's Dagster pool (limit: dagster.yaml `concurrency: pools:`): its
            # runs beyond the limit wait in the run queue without holding a run slot
            pool=f"{UDF_GROUP_PREFIX}{udf.org}",
            **extra,
        )


def load_udf_assets(state_dsn: str) -> list[dg.AssetsDefinition]:
    """An asset per applied transform (its newest version). A state database that does not
    answer, or is not migrated, loads none (with a warning), so the code location still loads
    the platform's own assets."""
    engine = sa.create_engine(state_dsn, poolclass=sa.NullPool, connect_args={"connect_timeout": 5})
    try:
        stored = udf_store.latest(engine)
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        log.warning("organisations' transforms not loaded (Postgres state: %s)", reason)
        return []
    finally:
        engine.dispose()
    assets = []
    for item in stored:
        try:
            udf = UdfDeclaration.model_validate(item.declaration)
            assets.append(build_udf_asset(udf, item.version))
        except Exception as exc:  # one broken transform must not hide the others
            log.warning("transform %s v%d not loaded: %s", item.name, item.version, exc)
    return assets


def load_enrichment_specs(state_dsn: str) -> list[dg.AssetSpec]:
    """An asset spec per uploaded enrichment dataset (`trace enrich upload`, `PUT
    /v1/enrichments/{name}`): the source of the transforms that join it, in its
    organisation's group, with its columns. Uploads commit it; Dagster does not materialise
    it. None when Postgres state does not answer (the transforms' loader warns)."""
    engine = sa.create_engine(state_dsn, poolclass=sa.NullPool, connect_args={"connect_timeout": 5})
    try:
        decls = enrichment_declarations(engine)
    except sa.exc.SQLAlchemyError:
        return []
    finally:
        engine.dispose()
    return [
        dg.AssetSpec(
            key=name,
            description=decl.description,
            metadata={**dataset_metadata(decl), "trace/enrichment": True},
            owners=[decl.owner],
            group_name=f"{UDF_GROUP_PREFIX}{decl.owner.removeprefix('team:')}",
            kinds={"parquet"},
        )
        for name, decl in decls.items()
    ]
