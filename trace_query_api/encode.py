"""Query results as JSON, CSV or Arrow IPC, and the opaque pagination cursor.

JSON has no bytes and no NaN, so: binary values (hashes, addresses) become `0x` hex strings,
NaN/Infinity strings, decimals with a fraction decimal strings (exact), dates and times
ISO 8601. Integers of any size (uint64, 128-bit sums) stay JSON integers, exact in the text;
clients whose JSON numbers are doubles should ask for Arrow. CSV gets the same text forms.
Arrow IPC keeps the native types.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import hashlib
import io
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as paipc

from trace_query_api.errors import BadPaginationError

__all__ = [
    "ARROW_MEDIA_TYPE",
    "CSV_MEDIA_TYPE",
    "JSON_MEDIA_TYPE",
    "Cursor",
    "sql_fingerprint",
    "json_rows",
    "text_table",
    "arrow_bytes",
    "csv_bytes",
    "dumps",
]

ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
CSV_MEDIA_TYPE = "text/csv"
JSON_MEDIA_TYPE = "application/json"


def sql_fingerprint(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts, on which snapshot, for which SQL."""

    offset: int
    snapshot: str
    sql: str  # fingerprint of the query text

    def encode(self) -> str:
        raw = json.dumps({"o": self.offset, "s": self.snapshot, "q": self.sql}).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str, sql: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = json.loads(raw)
            cursor = cls(int(data["o"]), str(data["s"]), str(data["q"]))
        except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
            raise BadPaginationError(
                "the cursor is not one this service returned; pass `next_cursor` unchanged"
            ) from None
        if cursor.offset < 0:
            raise BadPaginationError("the cursor's offset is negative")
        if cursor.sql != sql_fingerprint(sql):
            raise BadPaginationError(
                "the cursor belongs to another query; send the same SQL with its cursor"
            )
        return cursor


# -- JSON ------------------------------------------------------------------------------------


def _hex(value: bytes | None) -> str | None:
    return None if value is None else "0x" + value.hex()


def _float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _jsonable(value: Any) -> Any:
    """Any Python value from Arrow as JSON (nested values too)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # maps come out of Arrow as lists of (key, value) tuples
        return [_jsonable(v) for v in value]
    return str(value)


def _converter(type_: pa.DataType) -> Callable[[list[Any]], list[Any]] | None:
    """A whole-column conversion, or None when the Python values are already JSON."""
    if pa.types.is_boolean(type_) or pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return None
    if pa.types.is_integer(type_):
        return None
    if pa.types.is_decimal(type_) and type_.scale == 0:  # HUGEINT sums: exact JSON integers
        return lambda values: [None if v is None else int(v) for v in values]
    if pa.types.is_floating(type_):
        return lambda values: [_float(v) for v in values]
    if (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or pa.types.is_fixed_size_binary(type_)
    ):
        return lambda values: [_hex(v) for v in values]
    return lambda values: [_jsonable(v) for v in values]


def json_rows(table: pa.Table) -> list[list[Any]]:
    columns = []
    for column in table.columns:
        values = column.to_pylist()
        convert = _converter(column.type)
        columns.append(values if convert is None else convert(values))
    return [list(row) for row in zip(*columns, strict=True)] if columns else []


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False, default=_jsonable).encode()


# -- CSV and Arrow -----------------------------------------------------------------------------


def text_table(table: pa.Table) -> pa.Table:
    """Binary and nested columns as text, for CSV."""
    columns = []
    for column in table.columns:
        type_ = column.type
        if (
            pa.types.is_binary(type_)
            or pa.types.is_large_binary(type_)
            or pa.types.is_fixed_size_binary(type_)
        ):
            columns.append(pa.array([_hex(v) for v in column.to_pylist()], pa.string()))
        elif pa.types.is_nested(type_):
            columns.append(
                pa.array(
                    [None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()],
                    pa.string(),
                )
            )
        else:
            columns.append(column)
    return pa.table(columns, names=table.column_names)


def csv_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pacsv.write_csv(text_table(table), sink)
    return sink.getvalue()


def arrow_bytes(table: pa.Table, metadata: dict[str, Any]) -> bytes:
    """An Arrow IPC stream; pagination and versions ride in the schema metadata `trace`."""
    schema = table.schema.with_metadata({"trace": json.dumps(metadata)})
    sink = pa.BufferOutputStream()
    with paipc.new_stream(sink, schema) as writer:
        writer.write_table(table.replace_schema_metadata(schema.metadata))
    return sink.getvalue().to_pybytes()
