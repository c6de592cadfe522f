"""The runtime of an organisation's Python transform: the script its external process runs.

It is copied into the attempt's working folder and run by the transform's own interpreter
(its own virtual environment), so it imports nothing of the platform: only the standard
library, `pyarrow`, `dagster_pipes` (and `polars` when the transform asks for polars frames).
Everything it needs comes from the Pipes context's extras, and it holds only the attempt's
task token:

1. reads the declared columns of each input, for exactly this partition, from the query
   service (`POST /v1/query`, Arrow IPC, paged with `next_cursor`);
2. imports the transform's module from the working folder (or, in a pod, from the context's
   `module_source`) and calls its function with
   `{dataset: table}` (pyarrow Tables or polars DataFrames);
3. writes the returned rows as one Parquet file (cast to the declared schema when they fit
   it) and uploads it to the one staging key the token may write;
4. reports through Dagster Pipes: log lines, then the materialisation's metadata (rows,
   bytes, input rows). On any error it reports the error as a custom message
   `{"error": "..."}` (the platform's failure names it) and exits non-zero.

The platform, not this script, verifies the file and commits it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as paipc
import pyarrow.parquet as pq
from dagster_pipes import PipesContext, open_dagster_pipes

ARROW = "application/vnd.apache.arrow.stream"
PAGE_ROWS = 10_000


class TransformError(Exception):
    """What went wrong, in one line the platform shows in Dagster."""


def _request(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:2000].decode("utf-8", "replace")
        try:
            error = json.loads(detail)["error"]
            detail = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            pass
        raise TransformError(
            f"HTTP {exc.code} from {method} {url.split('?')[0]}: {detail}"
        ) from None
    except urllib.error.URLError as exc:
        raise TransformError(f"{method} {url.split('?')[0]} failed: {exc.reason}") from None


def read_input(query_url: str, token: str, dataset: str, columns: list[str]) -> pa.Table:
    """The columns of `dataset` the token may read (its partitions of this attempt), in
    pages."""
    sql = f"SELECT {', '.join(columns)} FROM {dataset}"
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": ARROW,
    }
    batches: list[pa.RecordBatch] = []
    schema: pa.Schema | None = None
    cursor: str | None = None
    while True:
        body: dict[str, Any] = {"sql": sql, "limit": PAGE_ROWS}
        if cursor is not None:
            body["cursor"] = cursor
        raw = _request(f"{query_url}/v1/query", "POST", json.dumps(body).encode(), headers)
        with paipc.open_stream(pa.py_buffer(raw)) as reader:
            page = reader.read_all()
        meta = json.loads((page.schema.metadata or {}).get(b"trace", b"{}"))
        schema = page.schema.remove_metadata()
        batches += page.replace_schema_metadata(None).to_batches()
        cursor = meta.get("next_cursor")
        if not cursor:
            if meta.get("truncated"):
                raise TransformError(
                    f"{dataset} holds more rows for this partition than the query service "
                    "pages through (TRACE_QUERY_ROW_CAP)"
                )
            break
    assert schema is not None
    return pa.Table.from_batches(batches, schema=schema)


def _load_function(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location("trace_udf_module", path)
    if spec is None or spec.loader is None:
        raise TransformError(f"can not load the module {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise TransformError(f"the module defines no function {name!r}")
    return function


def _as_arrow(result: Any) -> pa.Table:
    if isinstance(result, pa.Table):
        return result
    to_arrow = getattr(result, "to_arrow", None)  # a polars DataFrame
    if callable(to_arrow):
        table = to_arrow()
        if isinstance(table, pa.Table):
            return table
    raise TransformError(
        f"the function returned {type(result).__name__}; return a pyarrow.Table (or a "
        "polars DataFrame)"
    )


def parquet_bytes(table: pa.Table, schema: pa.Schema) -> bytes:
    """The rows as Parquet, cast to the declared schema when they fit it (the platform
    checks the file either way)."""
    if table.column_names == schema.names:
        try:
            table = table.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            pass  # written as returned: the platform names the difference
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def run(pipes: PipesContext, spec: Mapping[str, Any], workdir: Path) -> None:
    started = time.monotonic()
    token = spec["token"]
    inputs: dict[str, Any] = {}
    for item in spec["inputs"]:
        inputs[item["dataset"]] = read_input(
            spec["query_url"], token, item["dataset"], item["columns"]
        )
    input_rows = sum(t.num_rows for t in inputs.values())
    pipes.log.info(f"read {input_rows} input rows in {time.monotonic() - started:.2f} s")
    if spec["frames"] == "polars":
        import polars  # the transform declares it in its requirements

        inputs = {name: polars.from_arrow(table) for name, table in inputs.items()}
    function = _load_function(workdir / spec["module_file"], spec["function"])
    table = _as_arrow(function(inputs))
    schema = paipc.read_schema(pa.py_buffer(bytes.fromhex(spec["schema"])))
    data = parquet_bytes(table, schema)
    upload = spec["upload"]
    _request(
        upload["url"], "PUT", data, {**upload["headers"], "Content-Type": "application/x-parquet"}
    )
    pipes.log.info(f"wrote {table.num_rows} rows ({len(data)} bytes) to the attempt's staging key")
    pipes.report_asset_materialization(
        metadata={
            "udf/rows": {"raw_value": table.num_rows, "type": "int"},
            "udf/bytes": {"raw_value": len(data), "type": "int"},
            "udf/input_rows": {"raw_value": input_rows, "type": "int"},
            "udf/seconds": {"raw_value": round(time.monotonic() - started, 3), "type": "float"},
        }
    )


def module_folder(spec: Mapping[str, Any]) -> Path:
    """Where the transform's module is: beside this script (the local launcher copies both
    into the attempt's folder), or written from the context's `module_source` into a fresh
    temporary folder (a pod, whose image holds the runner only)."""
    source = spec.get("module_source")
    if source is None:
        return Path(__file__).resolve().parent
    folder = Path(tempfile.mkdtemp(prefix="trace-udf-module-"))
    (folder / spec["module_file"]).write_text(source)
    return folder


def main() -> int:
    runner = os.getpid()
    with open_dagster_pipes() as pipes:
        spec = pipes.extras
        try:
            run(pipes, spec, module_folder(spec))
        except BaseException as exc:
            if os.getpid() != runner:  # a process the transform forked: it reports nothing
                os._exit(1)
            message = (
                str(exc) if isinstance(exc, TransformError) else f"{type(exc).__name__}: {exc}"
            )
            pipes.report_custom_message({"error": message[:2000]})
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
