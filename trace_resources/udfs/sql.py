"""A transform's SELECT checked before it is stored: DuckDB's own parser and binder on a locked
database of its own that holds only empty tables of the declared input columns (no files, no
network, no extensions; the statement is never run).

`check_select` says which datasets the statement reads (from its syntax tree, CTE names
excluded) and what columns, of which DuckDB types, it returns; a column it reads that the
declaration does not list fails to bind, as it would in the sandbox, which is handed exactly
those columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from trace_resources.sandbox.worker import duckdb_config

__all__ = ["SelectShape", "SqlProblem", "check_select", "duckdb_types"]

MAX_SQL_CHARS = 100_000
# table functions that compute rows and read nothing (any other, e.g. read_parquet, is refused)
_HARMLESS_FUNCTIONS = {"unnest", "range", "generate_series"}


class SqlProblem(ValueError):
    """The statement is not one SELECT over the declared inputs; the message says why."""


@dataclass(frozen=True)
class SelectShape:
    datasets: frozenset[str]
    columns: list[tuple[str, str]]  # (name, DuckDB type) of the result, in order


def _connect() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(":memory:", config=duckdb_config("64MB", 1))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _walk(node: object, tables: set[str], functions: set[str], ctes: set[str]) -> None:
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "BASE_TABLE":
            parts = [node.get("catalog_name"), node.get("schema_name"), node["table_name"]]
            tables.add(".".join(p for p in parts if p).lower())
        elif kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            functions.add(str(function.get("function_name", "?")))
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map") or []:
                ctes.add(str(entry.get("key", "")).lower())
        for value in node.values():
            _walk(value, tables, functions, ctes)
    elif isinstance(node, list):
        for value in node:
            _walk(value, tables, functions, ctes)


def _statement_tables(conn: duckdb.DuckDBPyConnection, sql: str) -> frozenset[str]:
    if len(sql) > MAX_SQL_CHARS:
        raise SqlProblem(f"the SQL is longer than {MAX_SQL_CHARS} characters")
    try:
        statements = conn.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlProblem(f"the SQL does not parse: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise SqlProblem(f"write exactly one SELECT statement, not {len(statements)} statements")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SqlProblem(
            f"only a SELECT may compute a transform, this is {statements[0].type.name}"
        )
    [(serialized,)] = conn.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    tree = json.loads(serialized)
    if tree.get("error"):
        raise SqlProblem(f"the SQL does not parse: {tree.get('error_message')}")
    tables: set[str] = set()
    functions: set[str] = set()
    ctes: set[str] = set()
    try:
        _walk(tree["statements"], tables, functions, ctes)
    except RecursionError:
        raise SqlProblem("the SQL is nested too deeply") from None
    refused = functions - _HARMLESS_FUNCTIONS
    if refused:
        raise SqlProblem(
            f"reads the table function(s) {', '.join(sorted(refused))}; a transform reads "
            "only its declared inputs, by their dataset names"
        )
    return frozenset(tables - ctes)


def duckdb_types(schema: pa.Schema) -> list[tuple[str, str]]:
    """The DuckDB type of each column of an Arrow schema (as DuckDB itself reads it)."""
    with _connect() as conn:
        conn.register("t", schema.empty_table())
        return [(r[0], r[1]) for r in conn.execute("DESCRIBE SELECT * FROM t").fetchall()]


def check_select(sql: str, inputs: Mapping[str, pa.Schema]) -> SelectShape:
    """The datasets one SELECT reads and the columns it returns, bound against empty tables of
    `inputs` (dataset -> its declared columns); `SqlProblem` if it is not one SELECT, reads a
    dataset that is not an input, or does not bind."""
    with _connect() as conn:
        datasets = _statement_tables(conn, sql)
        undeclared = sorted(datasets - set(inputs))
        if undeclared:
            raise SqlProblem(
                f"reads {', '.join(repr(d) for d in undeclared)}, not declared in inputs "
                f"({', '.join(sorted(inputs))}); add it to inputs with the columns it reads"
            )
        for name, schema in inputs.items():
            conn.register(name, schema.empty_table())
        try:
            # binds the statement (as the sandbox worker does) without running it
            relation = conn.sql(sql)
            columns = [(n, str(t)) for n, t in zip(relation.columns, relation.types, strict=True)]
        except duckdb.Error as exc:
            raise SqlProblem(
                f"{_first_line(exc)} (the inputs hold only their declared columns)"
            ) from None
    return SelectShape(datasets, columns)
