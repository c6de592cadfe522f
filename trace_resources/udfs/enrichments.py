"""Enrichment uploads: an organisation's own rows (labels for addresses, ...) as an org-owned,
unpartitioned dataset `org_<org>__<name>`, uploaded as CSV or Parquet and committed through
the commit protocol like every dataset (staged under an attempt, verified, committed fenced;
each upload a new version, replace mode). The one access rule makes it readable by its
organisation only, and its transforms join it like any input (`catalogue.input_catalogue`).

    parse_schema   `address:binary,label:string`: the declared columns (a CSV needs them)
    read_upload    the file's rows as an Arrow table of Trace's types, or `EnrichmentError`
                   with one line saying what is wrong (for a CSV: line and column)
    upload         name checks (the organisation's own, no transform's, no platform
                   dataset's), then the commit

`upload` is the one path of `PUT /v1/enrichments/{name}` and `trace enrich upload`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from trace_resources.errors import SchemaIncompatibleError, TraceError
from trace_resources.registry import ARROW_TYPES, DatasetDeclaration, declarations
from trace_resources.storage import enrichments as registry
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.version_store import VersionStore

__all__ = [
    "EnrichmentError",
    "Limits",
    "Uploaded",
    "dataset_name",
    "detect_format",
    "enrichment_declarations",
    "parse_schema",
    "read_upload",
    "upload",
]

Format = Literal["csv", "parquet"]
_SHORT = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*$")
MAX_NAME = 63
# a Parquet file may decode to at most this many times the upload limit (a decompression bomb
# is refused from its footer, before any page is decoded)
DECODED_FACTOR = 4
_INTS = {
    "uint8": (0, 2**8 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


class EnrichmentError(TraceError):
    """An upload is refused; the message says what is wrong and how to fix it (one line)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_rows: int
    max_columns: int

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            settings.enrichment_max_bytes,
            settings.enrichment_max_rows,
            settings.enrichment_max_columns,
        )


@dataclass(frozen=True)
class Uploaded:
    dataset: str
    version: int
    rows: int
    columns: list[tuple[str, str]]
    changed: bool  # False: the file held exactly the current version's rows


# -- names ---------------------------------------------------------------------------------


def dataset_name(org: str, name: str) -> str:
    """The dataset `org_<org>__<name>` an upload named `name` (or `org_<org>__<name>`) goes
    to, or `EnrichmentError` for a name that is not the organisation's or not a name."""
    short = name
    if name.startswith("org_"):
        owner, sep, short = name[4:].partition("__")
        if not sep:
            raise EnrichmentError(
                f"name {name[:80]!r}: names starting with org_ are full dataset names, "
                f"org_<org>__<name>; send just the name (e.g. 'labels', stored as "
                f"org_{org}__labels)"
            )
        if owner != org:
            raise EnrichmentError(
                f"name {name[:80]!r} belongs to organisation {owner[:40]!r}; organisation "
                f"{org!r} uploads to its own datasets, org_{org}__<name>"
            )
    if len(short) > MAX_NAME or not _SHORT.match(short):
        raise EnrichmentError(
            f"name {name[:80]!r} is not a dataset name: lowercase letters and digits joined "
            f"by single underscores, starting with a letter, at most {MAX_NAME} characters "
            "(e.g. address_labels)"
        )
    if short in declarations():
        raise EnrichmentError(
            f"name {short!r} is a platform dataset's name; choose another (e.g. "
            f"{short}_labels) so a query can not mistake one for the other"
        )
    return f"org_{org}__{short}"


def _check_column_names(names: list[str], limits: Limits, where: str) -> None:
    if len(names) > limits.max_columns:
        raise EnrichmentError(
            f"{where} has {len(names)} columns, more than {limits.max_columns} "
            "(TRACE_ENRICHMENT_MAX_COLUMNS)"
        )
    if not names:
        raise EnrichmentError(f"{where} has no columns")
    seen: set[str] = set()
    for name in names:
        if len(name) > MAX_NAME or not _COLUMN.match(name):
            raise EnrichmentError(
                f"{where}: column {name[:80]!r} is not a column name: lowercase letters, "
                f"digits and underscores, not starting with a digit, at most {MAX_NAME} "
                "characters"
            )
        if name in seen:
            raise EnrichmentError(f"{where}: column {name!r} appears twice")
        seen.add(name)


# -- schema --------------------------------------------------------------------------------


def parse_schema(spec: str, limits: Limits) -> pa.Schema:
    """`address:binary,label:string` as an Arrow schema of Trace's types (every column
    nullable)."""
    fields = []
    for part in (p.strip() for p in spec.split(",")):
        name, sep, type_name = part.partition(":")
        if not sep or not name.strip() or not type_name.strip():
            raise EnrichmentError(
                f"schema: {part[:80]!r} is not name:type; write the columns as "
                "name:type,name:type (e.g. address:binary,label:string)"
            )
        type_name = type_name.strip()
        if type_name not in ARROW_TYPES:
            raise EnrichmentError(
                f"schema: column {name.strip()!r} has unknown type {type_name[:40]!r}; use one "
                f"of {', '.join(ARROW_TYPES)}"
            )
        fields.append(pa.field(name.strip(), ARROW_TYPES[type_name], nullable=True))
    _check_column_names([f.name for f in fields], limits, "schema")
    return pa.schema(fields)


# -- CSV -----------------------------------------------------------------------------------


def _converter(type_name: str) -> Callable[[str], Any]:
    if type_name in _INTS:
        low, high = _INTS[type_name]

        def integer(value: str) -> int:
            number = int(value)
            if not low <= number <= high:
                raise ValueError(f"out of range {low}..{high}")
            return number

        return integer
    if type_name == "float64":
        return float
    if type_name == "bool":
        truth = {"true": True, "1": True, "false": False, "0": False}

        def boolean(value: str) -> bool:
            try:
                return truth[value.lower()]
            except KeyError:
                raise ValueError("write true, false, 1 or 0") from None

        return boolean
    if type_name == "binary":

        def hex_bytes(value: str) -> bytes:
            if not value.startswith(("0x", "0X")):
                raise ValueError("write bytes as 0x-prefixed hex, e.g. 0x00ab")
            return bytes.fromhex(value[2:])

        return hex_bytes
    if type_name == "date32[day]":
        return date.fromisoformat
    if type_name.startswith("timestamp"):

        def timestamp(value: str) -> datetime:
            moment = datetime.fromisoformat(value)
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

        return timestamp
    return str


def _read_csv(data: bytes, schema: pa.Schema | None, limits: Limits) -> pa.Table:
    if schema is None:
        raise EnrichmentError(
            "a CSV upload needs its schema: name:type for each column, e.g. "
            f"schema=address:binary,label:string (types: {', '.join(ARROW_TYPES)})"
        )
    for field in schema:
        if pa.types.is_list(field.type):
            raise EnrichmentError(
                f"schema: column {field.name!r} is a list, which CSV can not hold; upload "
                "Parquet for list columns"
            )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EnrichmentError(f"line {line}: the CSV is not UTF-8 text ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise EnrichmentError("the CSV is empty: its first line names the columns")
        header = [h.strip() for h in header]
        _check_column_names(header, limits, "the CSV's header (line 1)")
        declared = schema.names
        if sorted(header) != sorted(declared):
            raise EnrichmentError(
                f"line 1: the CSV's columns are {', '.join(header)}; the schema declares "
                f"{', '.join(declared)}: name the same columns in both"
            )
        types = [schema.field(h).type for h in header]
        converters = [_converter(str(t)) for t in types]
        keeps_empty = [pa.types.is_string(t) for t in types]
        columns: list[list[Any]] = [[] for _ in header]
        records = 0  # blank lines count too: a file of empty lines is refused as fast
        for row in reader:
            records += 1
            if records > limits.max_rows:
                raise EnrichmentError(
                    f"line {reader.line_num}: the CSV has more than {limits.max_rows} rows "
                    "(TRACE_ENRICHMENT_MAX_ROWS)"
                )
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise EnrichmentError(
                    f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                )
            for i, value in enumerate(row):
                if value == "" and not keeps_empty[i]:
                    columns[i].append(None)
                    continue
                try:
                    columns[i].append(converters[i](value))
                except (ValueError, OverflowError) as exc:
                    raise EnrichmentError(
                        f"line {reader.line_num}, column {header[i]!r}: {value[:40]!r} is not "
                        f"a valid {types[i]} ({exc})"
                    ) from None
    except csv.Error as exc:
        raise EnrichmentError(f"line {reader.line_num}: the CSV does not parse: {exc}") from None
    arrays = [pa.array(c, type=t) for c, t in zip(columns, types, strict=True)]
    return pa.Table.from_arrays(arrays, schema=pa.schema([schema.field(h) for h in header])).select(
        declared
    )


# -- Parquet -------------------------------------------------------------------------------


def _trace_type(field: pa.Field) -> pa.DataType:
    kind = field.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        kind = pa.string()
    elif (
        pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_binary_view(kind)
    ):
        kind = pa.binary()
    elif pa.types.is_large_list(kind) and pa.types.is_string(kind.value_type):
        kind = pa.list_(pa.string())
    if str(kind) not in ARROW_TYPES:
        raise EnrichmentError(
            f"column {field.name!r} has type {field.type}, not one of Trace's types "
            f"({', '.join(ARROW_TYPES)}): cast it before uploading, or declare its type in "
            "the schema"
        )
    return kind


def _read_parquet(data: bytes, schema: pa.Schema | None, limits: Limits) -> pa.Table:
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        meta = parquet.metadata
    except (pa.ArrowException, OSError) as exc:
        raise EnrichmentError(f"the file is not Parquet: {str(exc).splitlines()[0]}") from None
    names = parquet.schema_arrow.names
    _check_column_names(names, limits, "the Parquet file")
    if meta.num_rows > limits.max_rows:
        raise EnrichmentError(
            f"the Parquet file has {meta.num_rows} rows, more than {limits.max_rows} "
            "(TRACE_ENRICHMENT_MAX_ROWS)"
        )
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if decoded > DECODED_FACTOR * limits.max_bytes:
        raise EnrichmentError(
            f"the Parquet file decodes to {decoded} bytes, more than {DECODED_FACTOR} times "
            f"the upload limit of {limits.max_bytes} (TRACE_ENRICHMENT_MAX_BYTES)"
        )
    try:
        table = parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise EnrichmentError(
            f"the Parquet file does not read: {str(exc).splitlines()[0]}"
        ) from None
    if schema is not None:
        if sorted(names) != sorted(schema.names):
            raise EnrichmentError(
                f"the Parquet file's columns are {', '.join(names)}; the schema declares "
                f"{', '.join(schema.names)}: name the same columns in both"
            )
        target = schema
    else:
        target = pa.schema(pa.field(f.name, _trace_type(f), nullable=True) for f in table.schema)
    table = table.select(target.names)
    for field in target:
        try:
            column = table[field.name].cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise EnrichmentError(
                f"column {field.name!r} ({table.schema.field(field.name).type}) can not be "
                f"read as {field.type}: {str(exc).splitlines()[0]}"
            ) from None
        table = table.set_column(table.schema.get_field_index(field.name), field, column)
    return table.cast(target)


def read_upload(data: bytes, fmt: Format, schema: pa.Schema | None, limits: Limits) -> pa.Table:
    """The upload's rows as a table of Trace's types (every column nullable)."""
    if len(data) > limits.max_bytes:
        raise EnrichmentError(
            f"the file has {len(data)} bytes, more than {limits.max_bytes} "
            "(TRACE_ENRICHMENT_MAX_BYTES)"
        )
    if fmt == "csv":
        return _read_csv(data, schema, limits)
    return _read_parquet(data, schema, limits)


def detect_format(data: bytes, declared: str | None) -> Format:
    """`csv` or `parquet`: as declared (a format or a content type), else from the bytes."""
    if declared:
        kind = declared.split(";")[0].strip().lower()
        if kind in ("csv", "text/csv"):
            return "csv"
        if kind in ("parquet", "application/vnd.apache.parquet", "application/x-parquet"):
            return "parquet"
        if kind not in ("application/octet-stream", ""):
            raise EnrichmentError(
                f"format {kind[:60]!r} is neither CSV nor Parquet; send text/csv or "
                "application/vnd.apache.parquet"
            )
    return "parquet" if data[:4] == b"PAR1" else "csv"


# -- the upload ----------------------------------------------------------------------------


def _refuse_clash(engine: sa.Engine, dataset: str) -> None:
    if udf_store.history(engine, dataset):
        raise EnrichmentError(
            f"{dataset} is a transform's dataset (`trace udf list`); upload under another name"
        )
    if ReadModel(engine).registered_schema(dataset) is not None and not registry.is_enrichment(
        engine, dataset
    ):
        raise EnrichmentError(
            f"{dataset} is a dataset that was not uploaded (it is computed); upload under "
            "another name"
        )


def upload(
    engine: sa.Engine,
    store: ObjectStore,
    *,
    org: str,
    name: str,
    data: bytes,
    fmt: Format,
    schema: pa.Schema | None,
    uploaded_by: str,
    limits: Limits,
    description: str | None = None,
) -> Uploaded:
    """Check the name and the file, then commit the rows as the enrichment's next version
    (replace mode, unpartitioned). Nothing is committed when anything is refused."""
    dataset = dataset_name(org, name)
    table = read_upload(data, fmt, schema, limits)
    _refuse_clash(engine, dataset)
    with engine.begin() as conn:
        registry.register(conn, dataset, org, uploaded_by, description)
    with DatasetWriter(store, VersionStore(engine)) as writer:
        try:
            result = writer.write(dataset, UNPARTITIONED, PartitionData(table), mode="replace")
        except SchemaIncompatibleError as exc:
            raise EnrichmentError(str(exc)) from None
    return Uploaded(
        dataset,
        result.version.version,
        table.num_rows,
        [(f.name, str(f.type)) for f in table.schema],
        changed=not (result.unchanged or result.already_committed),
    )


def enrichment_declarations(
    engine: sa.Engine, org: str | None = None
) -> dict[str, DatasetDeclaration]:
    """Every committed enrichment (of `org`) as a dataset declaration of the platform's
    registry (a source: it reads nothing, so lineage starts there), by name; for
    `trace lineage impacted` and the code location's asset graph."""
    read = ReadModel(engine)
    out: dict[str, DatasetDeclaration] = {}
    for item in registry.listed(engine, org):
        registered = read.registered_schema(item.name)
        if registered is None:
            continue  # its first upload failed
        columns = [
            {
                "name": f["name"],
                "type": f["type"],
                "doc": "uploaded column",
                "nullable": bool(f.get("nullable", True)),
            }
            for f in registered[1]
            if f["type"] in ARROW_TYPES
        ]
        if not columns:
            continue
        out[item.name] = DatasetDeclaration.model_validate(
            {
                "format_version": 1,
                "name": item.name,
                "kind": "raw",
                "description": item.description
                or f"Enrichment rows uploaded by organisation {item.org}",
                "owner": f"team:{item.org}",
                "partitioning": "none",
                "commit_mode": "replace",
                "schema": columns,
                "public": False,
                "source_file": f"trace_enrichments/{item.name}",
            }
        )
    return out
