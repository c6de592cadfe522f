"""The statement check in front of the sandbox, and the sandbox's failures as API errors.

Statements are checked with DuckDB's own parser (on a database that never holds data and never
runs a query) before anything runs: exactly one statement, of type SELECT; the dataset names it
reads come from its syntax tree (`json_serialize_sql`), not from pattern matching. A chain is a
schema (`trace_resources.chains`): `devnet2.blocks` is that chain's `blocks`, and `monad.blocks`
the primary chain's, the dataset `blocks` (an alias the sandbox is given as a view); any other
qualified name is an unknown dataset. The statement
itself then runs in a sandbox worker process (`trace_resources.sandbox`): OS-enforced limits on
memory, CPU and wall time, an empty root, no network, an unprivileged user, and DuckDB locked
(no file or network access, no extensions, configuration locked).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace

import duckdb

from trace_query_api.errors import (
    ApiError,
    InvalidSqlError,
    QueryTimeoutError,
    RateLimitedError,
    ResourceLimitError,
    UnknownDatasetError,
)
from trace_resources.chains import qualified_reference
from trace_resources.sandbox import FileSource, SandboxError
from trace_resources.sandbox.worker import duckdb_config

__all__ = ["ParsedQuery", "Parser", "api_error", "with_aliases", "MAX_SQL_CHARS"]

log = logging.getLogger(__name__)

MAX_SQL_CHARS = 100_000


@dataclass(frozen=True)
class ParsedQuery:
    sql: str
    datasets: frozenset[str]
    # (name in the SQL, dataset) where they differ: the primary chain's `monad.blocks`
    aliases: tuple[tuple[str, str], ...] = ()


class Parser:
    """DuckDB's parser on a database of its own (never holds data, never runs a query).

    A statement's parse depends on its text only, so accepted statements are remembered
    (dashboards and tasks send the same SQL again and again).
    """

    def __init__(self) -> None:
        self._db = duckdb.connect(":memory:", config=duckdb_config("64MB", 1))
        self._remembered = functools.lru_cache(maxsize=2048)(self._parse)

    def parse(self, sql: str) -> ParsedQuery:
        return self._remembered(sql)

    def _parse(self, sql: str) -> ParsedQuery:
        if len(sql) > MAX_SQL_CHARS:
            raise InvalidSqlError(f"the SQL is longer than {MAX_SQL_CHARS} characters")
        if "\x00" in sql:
            raise InvalidSqlError("the SQL contains a NUL character")
        conn = self._db.cursor()
        try:
            try:
                statements = conn.extract_statements(sql)
            except duckdb.Error as exc:
                raise InvalidSqlError(f"the SQL does not parse: {_first_line(exc)}") from None
            if len(statements) != 1:
                raise InvalidSqlError(
                    f"send exactly one SELECT statement, not {len(statements)} statements"
                )
            kind = statements[0].type
            if kind != duckdb.StatementType.SELECT:
                raise InvalidSqlError(
                    f"only SELECT statements run here, this is {kind.name}; files, settings, "
                    "extensions and other databases are out of reach by design",
                    code="statement_not_allowed",
                )
            tree = conn.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
        except duckdb.Error as exc:
            raise InvalidSqlError(f"the SQL does not parse: {_first_line(exc)}") from None
        finally:
            conn.close()
        assert tree is not None
        try:
            parsed = json.loads(tree[0])
            if parsed.get("error"):
                raise InvalidSqlError(f"the SQL does not parse: {parsed.get('error_message')}")
            tables: set[tuple[str, str, str]] = set()
            ctes: set[str] = set()
            _walk(parsed["statements"], tables, ctes)
        except RecursionError:
            raise InvalidSqlError("the SQL is nested too deeply") from None
        names: set[str] = set()
        aliases: set[tuple[str, str]] = set()
        for catalog, schema, table in tables:
            name = table.lower()
            if catalog or schema:
                written = ".".join(p for p in (catalog, schema, table) if p)
                dataset = None if catalog else qualified_reference(schema, table)
                if dataset is None:
                    raise UnknownDatasetError(written)
                names.add(dataset)
                if dataset != written.lower():
                    aliases.add((written.lower(), dataset))
            elif name not in ctes:
                names.add(name)
        return ParsedQuery(sql, frozenset(names), tuple(sorted(aliases)))

    def close(self) -> None:
        self._db.close()


def with_aliases(parsed: ParsedQuery, sources: list[FileSource]) -> list[FileSource]:
    """The sources, and each alias the statement uses (`monad.blocks` for `blocks`) as the
    same files under the name it is written with."""
    by_name = {source.name: source for source in sources}
    return sources + [replace(by_name[dataset], name=alias) for alias, dataset in parsed.aliases]


def _walk(node: object, tables: set[tuple[str, str, str]], ctes: set[str]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE":
            tables.add(
                (node.get("catalog_name") or "", node.get("schema_name") or "", node["table_name"])
            )
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map") or []:
                ctes.add(str(entry.get("key", "")).lower())
        for value in node.values():
            if isinstance(value, dict | list):
                _walk(value, tables, ctes)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                _walk(value, tables, ctes)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def api_error(exc: SandboxError, timeout_s: float) -> ApiError:
    """A sandbox's failure as the service's error: the limit, or what was wrong, by name."""
    kind, message = exc.kind, exc.message
    if kind == "timeout":
        return QueryTimeoutError(
            f"the query ran longer than its {timeout_s:g} s limit and was stopped; narrow it "
            "(fewer partitions, a WHERE on block_number) or export the result"
        )
    if kind == "memory":
        return ResourceLimitError(
            "the query needed more memory than a sandbox has and was stopped; aggregate more, "
            "select fewer columns, or narrow the blocks it reads",
            code="memory_limit",
        )
    if kind == "cpu":
        return ResourceLimitError(f"{message}; the query was stopped", code="cpu_limit")
    if kind == "too_large":
        return ResourceLimitError(
            f"{message} (TRACE_QUERY_MAX_RESPONSE_BYTES): select fewer or shorter columns, or "
            "POST /v1/exports with the same SQL to write the result to a file",
            code="response_too_large",
        )
    if kind == "unknown_table":
        return UnknownDatasetError(message)
    if kind == "not_allowed":
        return InvalidSqlError(
            f"{message}: the sandbox reaches only the datasets by their names",
            code="statement_not_allowed",
        )
    if kind == "read_failed":
        return InvalidSqlError(message, code="query_failed")
    if kind == "busy":
        return RateLimitedError(
            f"{message}; retry shortly", retry_after_s=1, code="too_many_concurrent_queries"
        )
    if kind in ("crashed", "internal"):
        log.warning("sandbox failure (%s): %s", kind, message)
        return ResourceLimitError(
            "the query's sandbox failed and was replaced; if it happens again, the query "
            "is hitting a limit of the engine: narrow it or export the result",
            code="sandbox_failed",
        )
    return InvalidSqlError(message)
