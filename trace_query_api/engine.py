"""The sandboxed DuckDB engine.

A pool of in-memory DuckDB databases, each configured once and then locked:

    enable_external_access=false   no file, no network, no ATTACH/INSTALL/LOAD/COPY
    autoinstall/autoload_known_extensions=false, allow_community_extensions=false
    python_enable_replacements=false   SQL cannot reach Python variables by name
    temp_directory=''              nothing spills to disk
    memory_limit, threads          per database (the pool size is the concurrency cap)
    lock_configuration=true        no SET / RESET / PRAGMA can undo any of it

The databases hold no data. Each request takes a database from the pool and opens a *fresh
connection* (a cursor) on it, registers the committed data of the datasets it may read as
connection-local views over Arrow objects (see `files.py`), runs exactly one SELECT under a
timer that interrupts it at the time limit, and closes the connection, which drops the views.

Statements are checked with DuckDB's own parser before anything runs: exactly one statement,
of type SELECT; the dataset names it reads come from its syntax tree (`json_serialize_sql`),
not from pattern matching.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from trace_query_api.errors import (
    ApiError,
    GoneError,
    InvalidSqlError,
    QueryTimeoutError,
    RateLimitedError,
    ResourceLimitError,
    UnknownDatasetError,
)

__all__ = ["ParsedQuery", "QueryPage", "Sandbox", "SandboxSession", "MAX_SQL_CHARS"]

log = logging.getLogger(__name__)

MAX_SQL_CHARS = 100_000
_BATCH_ROWS = 8192


def _sandbox_config(
    memory_limit: str, threads: int
) -> dict[str, str | bool | int | float | list[str]]:
    return {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "python_enable_replacements": False,
        "temp_directory": "",
        "memory_limit": memory_limit,
        "threads": threads,
        "lock_configuration": True,
    }


@dataclass(frozen=True)
class ParsedQuery:
    sql: str
    datasets: frozenset[str]


@dataclass
class QueryPage:
    table: pa.Table
    columns: list[tuple[str, str]]
    has_more: bool
    elapsed_ms: float


class _Parser:
    """DuckDB's parser on a database of its own (never holds data, never runs a query).

    A statement's parse depends on its text only, so accepted statements are remembered
    (dashboards and tasks send the same SQL again and again).
    """

    def __init__(self) -> None:
        self._db = duckdb.connect(":memory:", config=_sandbox_config("64MB", 1))
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
        for catalog, schema, table in tables:
            name = table.lower()
            if catalog or schema:
                raise UnknownDatasetError(".".join(p for p in (catalog, schema, table) if p))
            if name not in ctes:
                names.add(name)
        return ParsedQuery(sql, frozenset(names))

    def close(self) -> None:
        self._db.close()


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


class SandboxSession:
    """One fresh connection on a locked database, for one request."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self._timer_lock = threading.Lock()
        self._running = False
        self.timed_out = False
        self.invalidated = False

    def register(self, name: str, data: pa.Table | pads.Dataset) -> None:
        self.conn.register(name, data)

    @contextmanager
    def _deadline(self, timeout_s: float) -> Iterator[None]:
        """Interrupt the connection at the time limit (a hard stop inside DuckDB)."""

        def fire() -> None:
            with self._timer_lock:
                if self._running:
                    self.timed_out = True
                    self.conn.interrupt()

        timer = threading.Timer(timeout_s, fire)
        timer.daemon = True
        with self._timer_lock:
            self._running = True
        timer.start()
        try:
            yield
        finally:
            with self._timer_lock:
                self._running = False
            timer.cancel()

    def page(self, sql: str, *, offset: int, limit: int, timeout_s: float) -> QueryPage:
        """Rows offset..offset+limit of the result, and whether more follow."""
        started = time.perf_counter()
        collected: list[pa.RecordBatch] = []
        kept = 0
        skipped = 0
        with self._errors(timeout_s), self._deadline(timeout_s):
            relation = self.conn.sql(sql)
            columns = [(n, str(t)) for n, t in zip(relation.columns, relation.types, strict=True)]
            reader = relation.to_arrow_reader(_BATCH_ROWS)
            schema = reader.schema
            for batch in reader:
                if skipped < offset:
                    drop = min(offset - skipped, batch.num_rows)
                    skipped += drop
                    batch = batch.slice(drop)
                if batch.num_rows == 0:
                    continue
                take = min(batch.num_rows, limit + 1 - kept)
                collected.append(batch.slice(0, take))
                kept += take
                if kept > limit:
                    break
            reader.close()
        table = pa.Table.from_batches(collected, schema=schema)
        has_more = table.num_rows > limit
        if has_more:
            table = table.slice(0, limit)
        return QueryPage(table, columns, has_more, (time.perf_counter() - started) * 1000)

    def batches(self, sql: str, *, timeout_s: float) -> Iterator[pa.RecordBatch]:
        """The whole result as a stream of batches (exports), under the time limit."""
        with self._errors(timeout_s), self._deadline(timeout_s):
            reader = self.conn.sql(sql).to_arrow_reader(_BATCH_ROWS * 8)
            empty = True
            for batch in reader:
                empty = False
                yield batch
            if empty:  # still one (empty) batch, so that the writer knows the columns
                yield pa.RecordBatch.from_pylist([], schema=reader.schema)

    @contextmanager
    def _errors(self, timeout_s: float) -> Iterator[None]:
        """DuckDB's errors as the service's errors."""
        try:
            yield
        except ApiError:
            raise
        except duckdb.InterruptException:
            if self.timed_out:
                raise QueryTimeoutError(
                    f"the query ran longer than its {timeout_s:g} s limit and was stopped; "
                    "narrow it (fewer partitions, a WHERE on block_number) or export the result"
                ) from None
            raise
        except duckdb.OutOfMemoryException:
            raise ResourceLimitError(
                "the query needed more memory than a sandbox has and was stopped; aggregate "
                "more, select fewer columns, or narrow the blocks it reads"
            ) from None
        except duckdb.CatalogException as exc:
            message = _first_line(exc)
            if message.startswith("Catalog Error: Table with name "):
                name = message.removeprefix("Catalog Error: Table with name ").split(" ")[0]
                raise UnknownDatasetError(name) from None
            raise InvalidSqlError(message) from None
        except duckdb.PermissionException as exc:
            raise InvalidSqlError(
                f"{_first_line(exc)}: the sandbox reaches only the datasets by their names",
                code="statement_not_allowed",
            ) from None
        except (duckdb.InternalException, duckdb.FatalException) as exc:
            self.invalidated = True
            log.error("DuckDB internal error, discarding the sandbox database: %s", exc)
            raise InvalidSqlError(
                f"the query hit an internal error of the engine: {_first_line(exc)}",
                code="query_failed",
            ) from None
        except duckdb.Error as exc:
            raise InvalidSqlError(_first_line(exc)) from None
        except FileNotFoundError:
            raise GoneError(
                "a file of a version this query reads is no longer stored (garbage-collected); "
                "query the current versions instead"
            ) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidSqlError(f"reading the data failed: {exc}", code="query_failed") from None


class Sandbox:
    """The pool of locked databases; its size is the number of queries run at once."""

    def __init__(self, size: int, *, memory_limit: str, threads: int) -> None:
        self.size = size
        self.memory_limit = memory_limit
        self.threads = threads
        self._free: queue.LifoQueue[duckdb.DuckDBPyConnection] = queue.LifoQueue()
        for _ in range(size):
            self._free.put(self._new_database())
        self._parser = _Parser()
        self._in_use = 0
        self._count_lock = threading.Lock()

    def _new_database(self) -> duckdb.DuckDBPyConnection:
        return duckdb.connect(":memory:", config=_sandbox_config(self.memory_limit, self.threads))

    def parse(self, sql: str) -> ParsedQuery:
        return self._parser.parse(sql)

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def session(self, wait_s: float) -> Iterator[SandboxSession]:
        """A fresh connection on a free database; 429 if none frees up within `wait_s`."""
        try:
            database = self._free.get(timeout=wait_s) if wait_s > 0 else self._free.get_nowait()
        except queue.Empty:
            raise RateLimitedError(
                f"all {self.size} query slots of this server are busy; retry shortly",
                retry_after_s=1,
                code="too_many_concurrent_queries",
            ) from None
        with self._count_lock:
            self._in_use += 1
        session = SandboxSession(database.cursor())
        try:
            yield session
        finally:
            try:
                session.conn.close()
            except duckdb.Error:
                session.invalidated = True
            if session.invalidated:
                database.close()
                database = self._new_database()
            with self._count_lock:
                self._in_use -= 1
            self._free.put(database)

    def close(self) -> None:
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break
        self._parser.close()
