"""An organisation's Python transform as a Dagster asset: each partition of a run is one
external process, run through Dagster Pipes, holding only that attempt's credentials.

For each partition the platform
1. begins the attempt (the commit protocol's fence) and mints a task token for it: it reads
   exactly the declared columns of the declared inputs, for exactly this partition, through
   the query service, and writes exactly the attempt's one staging key
   (`PUT /v1/tasks/uploads/{key}` on the query service, which stores it in the datasets
   bucket, S3 or local alike);
2. starts the transform's process (`trace_resources.udfs.python.udf_launch`: an environment
   from an allow-list, no platform secret, under the jail; or with `TRACE_UDF_LAUNCHER=k8s` a
   pod of its own through PipesK8sClient, `trace_resources.udfs.k8s.udf_pod`, with the same
   limits and environment) with the token, the inputs, the upload URL and the
   declared schema in the Pipes context; its logs and materialisation metadata come back
   through Pipes;
3. revokes the token when the process ends (nothing more is written after it), reads the
   staged file, checks it is Parquet of exactly the declared schema and evaluates the quality
   rules (the circuit breaker), then hands the staged file to the dataset IO manager, which
   commits it fenced by the attempt. Anything else (an error, no file, another schema, a
   tripped rule) fails the step with what happened, and nothing is committed.

A process that dies is retried by Dagster (`TRACE_UDF_PYTHON_RETRIES`) with new attempts and
new tokens; the commit key makes a step commit its output once however it is retried.
"""

import hashlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from trace_assets.derived.assets import _gated, dataset_metadata
from trace_assets.udfs import _conform, _failure, udf_asset
from trace_resources.failures import as_dagster_failure
from trace_resources.registry import arrow_schema
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings, get_query_settings, get_settings
from trace_resources.storage.access import revoke_token
from trace_resources.storage.commit import StagedPartition
from trace_resources.storage.io_manager import DatasetIOManager, Staging
from trace_resources.storage.paths import UNPARTITIONED, data_file_key
from trace_resources.storage.records import Attempt, FileEntry
from trace_resources.storage.state import engine_for
from trace_resources.tokens import Keyring, issue_token
from trace_resources.udfs import UdfDeclaration, as_dataset_declaration
from trace_resources.udfs.catalogue import input_catalogue
from trace_resources.udfs.declaration import PythonCode
from trace_resources.udfs.jail import JailLimits, read_stop
from trace_resources.udfs.python import (
    MODULE_FILE,
    ScopedPipesSubprocessClient,
    UdfTimeout,
    prepare_workdir,
    udf_launch,
)
from trace_resources.udfs.venvs import UdfVenvError, build_venv

if TYPE_CHECKING:
    from trace_resources.udfs.k8s import UdfPod

__all__ = ["build_python_udf_asset", "pod_launch"]

UPLOADS_ROUTE = "/v1/tasks/uploads/"


def _task_token(
    udf: UdfDeclaration,
    key: str,
    attempt: Attempt,
    file_key: str,
    readable: dict[str, Any],
    ttl_s: int,
) -> tuple[str, str]:
    """The attempt's task token (and its id): the declared columns of the declared inputs,
    this partition of each block-range input, this attempt's staging key."""
    settings = get_query_settings()
    partitions: dict[str, list[str]] = {}
    for item in udf.inputs:
        known = readable.get(item.dataset)
        if known is None:
            raise _failure(
                f"{udf.name} reads {item.dataset!r}, which organisation {udf.org!r} may no "
                "longer read (or which no longer exists); nothing was committed"
            )
        if known.partitioning == "none":
            partitions[item.dataset] = [UNPARTITIONED]
        elif key != UNPARTITIONED:
            partitions[item.dataset] = [key]
    token, claims = issue_token(
        Keyring.from_settings(settings),
        settings,
        org=udf.org,
        subject=f"udf:{udf.name}",
        task=f"{udf.name}/{key}/{attempt.attempt_id}",
        datasets=[i.dataset for i in udf.inputs],
        partitions=partitions or None,
        columns={i.dataset: list(i.columns) for i in udf.inputs},
        writes=[file_key],
        ttl_s=min(ttl_s, settings.query_token_max_ttl_s),
    )
    return token, str(claims["jti"])


def _extras(
    udf: UdfDeclaration,
    code: PythonCode,
    schema: pa.Schema,
    token: str,
    file_key: str,
    settings: Settings,
) -> dict[str, Any]:
    url = settings.udf_query_url.rstrip("/")
    return {
        "query_url": url,
        "token": token,
        "inputs": [{"dataset": i.dataset, "columns": list(i.columns)} for i in udf.inputs],
        "module_file": MODULE_FILE,
        "function": code.function,
        "frames": code.frames,
        "schema": schema.serialize().to_pybytes().hex(),
        "upload": {
            "url": f"{url}{UPLOADS_ROUTE}{file_key}",
            "headers": {"Authorization": f"Bearer {token}"},
        },
    }


def _process_failure(udf: UdfDeclaration, key: str, invocation: Any, why: str) -> dg.Failure:
    said = (
        [m["error"] for m in invocation.get_custom_messages() if isinstance(m, dict)]
        if (invocation is not None)
        else []
    )
    where = f"{udf.name} partition {key}" if key != UNPARTITIONED else udf.name
    detail = f": {said[-1]}" if said else ""
    return _failure(f"{where}: the Python transform {why}{detail}; nothing was committed")


def _staged_file(
    udf: UdfDeclaration, schema: pa.Schema, objects: ObjectStoreResource, file_key: str, key: str
) -> tuple[pa.Table, FileEntry]:
    """The attempt's staged file, verified: Parquet of exactly the declared schema."""
    where = f"{udf.name} partition {key}" if key != UNPARTITIONED else udf.name
    store = objects.datasets()
    try:
        data = store.get_bytes(file_key)
    except (FileNotFoundError, OSError):
        raise _failure(
            f"{where}: the Python transform wrote no output (nothing at its staging key); "
            "nothing was committed"
        ) from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise _failure(
            f"{where}: the Python transform's output is not a Parquet file ({exc}); nothing "
            "was committed"
        ) from None
    _conform(udf, schema, table, key, what="the Python transform")
    if not table.schema.equals(schema, check_metadata=False):
        got = ", ".join(
            f"{f.name} {f.type}{'' if f.nullable else ' not null'}" for f in table.schema
        )
        raise _failure(
            f"{where}: the Python transform's file has the schema ({got}), not the declared "
            "one; nothing was committed"
        )
    entry = FileEntry(file_key, len(data), hashlib.sha256(data).hexdigest(), table.num_rows)
    return table, entry


def _venv(context: dg.AssetExecutionContext, udf: UdfDeclaration, code: PythonCode) -> Path:
    """The interpreter of the transform's own venv (local launcher)."""
    try:
        venv = build_venv(list(code.requirements))
    except UdfVenvError as exc:
        raise _failure(f"{udf.name}: its environment could not be built: {exc}") from None
    if not venv.cache_hit:
        context.log.info(f"{udf.name}: built its environment {venv.path}")
    return venv.python


def _run_in_jail(
    context: dg.AssetExecutionContext,
    udf: UdfDeclaration,
    code: PythonCode,
    python: Path,
    key: str,
    extras: dict[str, Any],
    limits: JailLimits,
) -> tuple[Any, int, str | None]:
    """The attempt's process beside this step, under the jail: (its Pipes invocation, its
    exit code, why the jail stopped it or None)."""
    workdir = Path(tempfile.mkdtemp(prefix="trace-udf-"))
    private = Path(tempfile.mkdtemp(prefix="trace-udf-status-"))  # the launcher's only
    status = private / "jail.json"
    try:
        runner = prepare_workdir(workdir, code.source)
        launch = udf_launch(str(python), runner, workdir, jail=(limits, status))
        try:
            # the jail stops it at its wall time; this is the launcher's own backstop
            invocation, code_ = ScopedPipesSubprocessClient().run_launch(
                context=context, launch=launch, extras=extras, timeout_s=limits.timeout_s + 30
            )
        except UdfTimeout as exc:
            raise _process_failure(
                udf, key, None, f"{exc} (TRACE_UDF_PY_TIMEOUT_S) and was killed"
            ) from None
        stop = read_stop(status)
        return invocation, code_, None if stop is None else stop.message
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def pod_launch(
    udf: UdfDeclaration,
    code: PythonCode,
    key: str,
    extras: dict[str, Any],
    limits: JailLimits,
    settings: Settings,
) -> "tuple[UdfPod, dict[str, Any]]":
    """The attempt's pod and its Pipes extras: the image holds the runner only, so the
    module's source travels in the context."""
    # imported here: the Kubernetes client takes seconds to import, and only k8s runs need it
    from trace_resources.udfs.k8s import udf_pod

    pod = udf_pod(
        limits,
        repository=settings.udf_k8s_image,
        namespace=settings.udf_k8s_namespace,
        requirements=code.requirements,
        labels={"trace.dev/org": udf.org},
        annotations={"trace.dev/udf": udf.name, "trace.dev/partition": key},
    )
    return pod, {**extras, "module_source": code.source}


def _run_in_pod(
    context: dg.AssetExecutionContext,
    udf: UdfDeclaration,
    code: PythonCode,
    key: str,
    extras: dict[str, Any],
    limits: JailLimits,
    settings: Settings,
) -> tuple[Any, int, str | None]:
    """The attempt's process in a pod of its own (`TRACE_UDF_LAUNCHER=k8s`), same result."""
    from trace_resources.udfs.k8s import ScopedPipesK8sClient, UdfPodError

    try:
        pod, pod_extras = pod_launch(udf, code, key, extras, limits, settings)
        return ScopedPipesK8sClient().run_launch(
            context=context, pod=pod, extras=pod_extras, limits=limits
        )
    except (UdfPodError, UdfVenvError) as exc:
        raise _process_failure(udf, key, None, f"could not run: {exc}") from None


def _run_partition(
    context: dg.AssetExecutionContext,
    udf: UdfDeclaration,
    code: PythonCode,
    schema: pa.Schema,
    key: str,
    staging: Staging,
    objects: ObjectStoreResource,
    engine: Any,
    readable: dict[str, Any],
) -> tuple[pa.Table, StagedPartition]:
    settings = get_settings()
    limits = JailLimits.from_settings(settings)
    local = settings.udf_launcher == "local"
    python = _venv(context, udf, code) if local else None
    attempt = staging.begin(udf.name, key, mode=udf.mode)
    file_key = data_file_key(udf.name, key, attempt.attempt_id, 0)
    ttl = int(limits.timeout_s) + 120
    if not local:
        from trace_resources.udfs.k8s import POD_START_S

        ttl += POD_START_S  # the pod may wait that long to start (the deadline counts from it)
    token, jti = _task_token(udf, key, attempt, file_key, readable, ttl)
    try:
        extras = _extras(udf, code, schema, token, file_key, settings)
        try:
            if python is not None:
                invocation, code_, stop = _run_in_jail(
                    context, udf, code, python, key, extras, limits
                )
            else:
                invocation, code_, stop = _run_in_pod(
                    context, udf, code, key, extras, limits, settings
                )
        except (ValueError, dg.DagsterError) as exc:  # what it wrote to Pipes is not Pipes'
            raise _process_failure(
                udf, key, None, f"sent messages Dagster Pipes can not read ({exc})"
            ) from None
        if stop is not None:
            raise _process_failure(udf, key, invocation, stop)
        if code_ != 0:
            how = f"was killed by signal {-code_}" if code_ < 0 else f"failed (exit code {code_})"
            failure = _process_failure(udf, key, invocation, how)
            failure.allow_retries = code_ < 0  # a killed process is retried; an error is not
            raise failure
    finally:
        revoke_token(engine, jti, "the attempt's process ended")  # nothing is written after it
    table, entry = _staged_file(udf, schema, objects, file_key, key)
    reported = invocation.get_results(implicit_materializations=False)
    reported_metadata = {
        k: v
        for r in reported
        if isinstance(r, dg.MaterializeResult)
        for k, v in (r.metadata or {}).items()
    }
    if key != UNPARTITIONED:
        context.add_asset_metadata(reported_metadata, partition_key=key)
    context.log.info(f"{udf.name} {key}: {table.num_rows} rows staged by the Python transform")
    return table, staging.adopt(attempt, [entry], schema)


def build_python_udf_asset(
    udf: UdfDeclaration, code: PythonCode, version: int
) -> dg.AssetsDefinition:
    """The asset of one applied version of a Python transform."""
    decl = as_dataset_declaration(udf, source_file=f"trace_udf_versions/{udf.name}@v{version}")
    schema = arrow_schema(decl)
    partitioned = udf.partitioning == "block_range"
    metadata = {
        **dataset_metadata(decl),
        "trace/udf_version": version,
        "trace/udf_python": dg.MetadataValue.md(
            f"`{code.function}` ({code.frames} frames; requirements: "
            f"{', '.join(code.requirements) or 'none'})\n\n```python\n{code.source.strip()}\n```"
        ),
    }

    def compute(
        context: dg.AssetExecutionContext,
        state: StateStoreResource,
        objects: ObjectStoreResource,
        dataset_io_manager: dg.ResourceParam[DatasetIOManager],
    ) -> Iterator[Any]:
        keys = list(context.partition_keys) if partitioned else [UNPARTITIONED]
        engine = engine_for(state.dsn)
        staged: dict[str, StagedPartition] = {}
        with as_dagster_failure(), dataset_io_manager.staging(context) as staging:
            readable = dict(input_catalogue(engine, udf.org))
            tables: dict[str | None, pa.Table] = {}
            for key in keys:
                table, staged[key] = _run_partition(
                    context, udf, code, schema, key, staging, objects, engine, readable
                )
                tables[None if key == UNPARTITIONED else key] = table
            yield from _gated(decl, tables)
        yield dg.Output(dict(staged))

    return udf_asset(
        udf,
        decl,
        metadata,
        kinds={"python", "parquet"},
        retry_policy=dg.RetryPolicy(max_retries=get_settings().udf_python_retries),
    )(compute)
