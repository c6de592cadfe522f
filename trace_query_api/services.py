"""Everything a request needs, built once per process from the settings, and the query path
shared by `/v1/query`, saved-query runs and exports:

    parse (one SELECT, dataset names)  ->  versions asked for (pin, snapshot or cursor)
    ->  resolve the committed files the token may read
    ->  Arrow data: from memory, or from files pinned against GC for the request
    ->  record the snapshot  ->  sandbox: register, run under the time limit, page  ->  result
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import sqlalchemy as sa

from trace_query_api.alerts import AlertService
from trace_query_api.catalog import Catalog, Pins, Resolution, pins_covering
from trace_query_api.current import CurrentFilesCache
from trace_query_api.dashboards import Dashboards, EmbedTokens
from trace_query_api.encode import Cursor, sql_fingerprint
from trace_query_api.engine import ParsedQuery, Parser, api_error, with_aliases
from trace_query_api.errors import (
    ApiError,
    BadPaginationError,
    BadRequestError,
    ResourceLimitError,
    RowCapExceededError,
)
from trace_query_api.exports import Exports
from trace_query_api.fairshare import FairShare
from trace_query_api.files import FileCache
from trace_query_api.limits import RateLimits
from trace_query_api.metrics import Metrics
from trace_query_api.models import ExportRequest
from trace_query_api.saved import SavedQueries
from trace_query_api.tokens import TokenVerifier
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.sandbox import FileSource, SandboxError, SandboxPage, SandboxPool
from trace_resources.settings import QuerySettings
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.exports import ExportJob
from trace_resources.storage.object_store import ObjectStore, local_store, s3_store
from trace_resources.storage.pool_ping import ping_when_idle
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.telemetry import Tracing
from trace_resources.tokens import Keyring, Principal

__all__ = ["Services", "Plan", "PageResult", "bucket"]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _raise_open_files_limit() -> None:
    """Committed files are held open (and handed to the sandboxes): take every descriptor the
    system allows this process, not the shell's default soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass


def bucket(settings: QuerySettings, name: str) -> ObjectStore:
    """A bucket of the configured object store (S3 API or local folder)."""
    if settings.object_store == "local":
        return local_store(settings.local_store_root, name)
    return s3_store(name, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)


@dataclass
class Plan:
    """A query's parse, requested pins and resolved versions, and its reader id for GC pins."""

    principal: Principal
    parsed: ParsedQuery
    pins: Pins
    resolution: Resolution
    reader_id: str
    pinned: bool = False


@dataclass
class PageResult:
    table: pa.Table
    columns: list[tuple[str, str]]
    offset: int
    next_cursor: str | None
    truncated: bool
    snapshot: str
    versions: Pins
    elapsed_ms: float
    byte_limited: bool = False
    fingerprint: str = ""  # of the SQL, for a cursor after a shortened page

    def shortened(self, rows: int) -> PageResult:
        """The first `rows` rows of this page, the rest behind `next_cursor` (a page whose
        encoding came out larger than the byte budget)."""
        cursor = Cursor(self.offset + rows, self.snapshot, self.fingerprint).encode()
        return replace(
            self,
            table=self.table.slice(0, rows),
            next_cursor=cursor,
            truncated=False,
            byte_limited=True,
        )

    def notice(self, row_cap: int) -> str | None:
        if self.byte_limited and self.next_cursor:
            return (
                "this page ended early at the response byte budget "
                "(TRACE_QUERY_MAX_RESPONSE_BYTES); `next_cursor` continues, or POST /v1/exports "
                "with the same SQL writes all of it to a file"
            )
        if not self.truncated:
            return None
        return (
            f"the result has more than {row_cap} rows, the interactive row cap; "
            "POST /v1/exports with the same SQL writes all of it to a file"
        )

    def meta(self, row_cap: int) -> dict[str, Any]:
        return {
            "row_count": self.table.num_rows,
            "offset": self.offset,
            "next_cursor": self.next_cursor,
            "truncated": self.truncated,
            "notice": self.notice(row_cap),
            "snapshot": self.snapshot,
            "versions": self.versions,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


class Services:
    def __init__(self, settings: QuerySettings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = tracing or Tracing("trace-query")
        self.keyring = Keyring.from_settings(settings)
        self.verifier = TokenVerifier(self.keyring, settings)
        self.limits = RateLimits(
            settings.query_rate_org_per_s,
            settings.query_rate_org_burst,
            settings.query_rate_user_per_s,
            settings.query_rate_user_burst,
        )
        _raise_open_files_limit()
        self.engine = engine_for(settings.state_dsn)
        # single statements every request makes (admission): autocommit connections of their
        # own pool, so neither BEGIN/COMMIT nor an isolation-level reset costs a round trip
        self.autocommit = ping_when_idle(
            sa.create_engine(settings.state_dsn, isolation_level="AUTOCOMMIT", future=True)
        )
        self.versions = VersionStore(self.engine)
        self.datasets = bucket(settings, settings.bucket_datasets)
        self.results = bucket(settings, settings.bucket_results)
        self.files = FileCache(
            self.datasets,
            memory_bytes=settings.query_cache_memory_bytes,
            disk_dir=settings.query_cache_dir,
            disk_bytes=settings.query_cache_disk_bytes,
        )
        self.current = (
            CurrentFilesCache(
                self.engine,
                count=lambda source, n: self.metrics.current_versions.labels(source).inc(n),
            )
            if settings.query_version_cache
            else None
        )
        self.catalog = Catalog(self.engine, self.files, self.current)
        self.saved = SavedQueries(self.engine)
        self.parser = Parser()
        self.dashboards = Dashboards(self.engine, self.parser)
        self.embeds = EmbedTokens(self.keyring, settings, self.engine)
        self.sandbox = SandboxPool(
            settings.query_max_concurrent,
            memory_bytes=settings.query_memory_bytes,
            threads=settings.query_threads,
            cache_bytes=settings.query_sandbox_cache_bytes,
            name="query-sandbox",
        )
        self.fairshare = FairShare(settings.query_max_concurrent, settings.query_org_max_concurrent)
        self.exports = Exports(self.engine, self.files, self.results, settings, self.metrics)
        self.alerts = AlertService(
            lambda: alert_tables.data_engine(settings.data_dsn), self.catalog
        )
        if self.current is not None:  # last: nothing built after it can fail and leak it
            self.current.start()

    def close(self) -> None:
        self.exports.shutdown()
        self.tracing.shutdown()
        self.sandbox.close()
        self.parser.close()
        self.files.close()
        if self.current is not None:
            self.current.close()
        self.autocommit.dispose()

    # -- readiness -------------------------------------------------------------------------

    def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__}"
        for label, store in (("datasets_bucket", self.datasets), ("results_bucket", self.results)):
            try:
                found = store.fs.get_file_info(store.root).type != pafs.FileType.NotFound
                checks[label] = "ok" if found else f"error: {store.uri_prefix} does not exist"
            except Exception as exc:
                checks[label] = f"error: {type(exc).__name__}"
        return checks

    # -- the query path ----------------------------------------------------------------------

    def plan(
        self,
        principal: Principal,
        sql: str,
        *,
        pin: Pins | None,
        snapshot: str | None,
        cursor: Cursor | None = None,
    ) -> Plan:
        """Parse, choose the versions (request, snapshot or cursor) and resolve the files."""
        parsed = self.parser.parse(sql)
        if pin is not None and snapshot is not None:
            raise BadRequestError("give `pin` or `snapshot`, not both", code="invalid_request")
        pins: Pins = {}
        if cursor is not None:
            pins = pins_covering(
                self.catalog.snapshot(principal, cursor.snapshot), parsed.datasets, cursor.snapshot
            )
        elif snapshot is not None:
            pins = pins_covering(
                self.catalog.snapshot(principal, snapshot), parsed.datasets, snapshot
            )
        elif pin is not None:
            pins = {name: versions for name, versions in pin.items() if name in parsed.datasets}
        resolution = self.catalog.resolve(principal, parsed.datasets, pins)
        return Plan(principal, parsed, pins, resolution, DatasetReader.new_reader_id())

    def pin(self, plan: Plan, name: str, ttl_s: float) -> None:
        """Pin one dataset of the plan against GC (`unpin` releases every pin of the plan)."""
        self.catalog.pin(
            self.versions,
            plan.reader_id,
            plan.principal,
            name,
            plan.pins.get(name),
            plan.resolution,
            ttl_s,
        )
        plan.pinned = True

    def unpin(self, plan: Plan) -> None:
        if plan.pinned:
            self.versions.pins.unpin(plan.reader_id)
            plan.pinned = False

    def sources(self, plan: Plan, ttl_s: float) -> tuple[list[FileSource], list[int]]:
        """The files of every dataset the query reads, for the sandbox, and the descriptors
        taken for them now (the caller closes them when the request ends): an open file stays
        readable whatever GC does, so files this process holds open already need no pin; the
        others are pinned first."""
        out: list[FileSource] = []
        handles: list[int] = []
        try:
            for name in sorted(plan.parsed.datasets):
                files = plan.resolution.files[name]
                size = sum(f.size for f in files)
                if self.files.in_memory and size > self.settings.query_cache_memory_bytes:
                    raise ResourceLimitError(
                        f"{name} is {size} bytes of files for this query, more than this "
                        "service holds in memory (TRACE_QUERY_CACHE_MEMORY_BYTES; it has no "
                        "disk cache): narrow the query to fewer partitions or export it",
                        code="memory_limit",
                    )
                if not self.files.held(files):
                    self.pin(plan, name, ttl_s)
                    files = plan.resolution.files[name]
                mine = []
                for entry in files:
                    mine.append(self.files.handle(entry))
                    handles.append(mine[-1])
                out.append(
                    FileSource(
                        name,
                        plan.resolution.schemas[name],
                        [(f.sha256 or f.key, f.size) for f in files],
                        lambda j, mine=mine: os.dup(mine[j]),  # type: ignore[misc]
                    )
                )
        except BaseException:
            close_all(handles)
            raise
        return with_aliases(plan.parsed, out), handles

    def run_page(
        self,
        principal: Principal,
        sql: str,
        *,
        limit: int | None,
        offset: int | None,
        cursor: str | None,
        pin: Pins | None,
        snapshot: str | None,
    ) -> PageResult:
        s = self.settings
        try:
            page_size = (
                min(s.query_page_rows_default, s.query_page_rows_max) if limit is None else limit
            )
            if page_size > s.query_page_rows_max:
                raise BadPaginationError(
                    f"limit {page_size} is above the largest page, {s.query_page_rows_max} "
                    "rows; page with `next_cursor`, or export the result"
                )
            decoded = None
            if cursor is not None:
                if offset is not None or pin is not None or snapshot is not None:
                    raise BadPaginationError(
                        "a cursor already fixes the offset and the versions; send it without "
                        "`offset`, `pin` or `snapshot`"
                    )
                decoded = Cursor.decode(cursor, sql)
            start = decoded.offset if decoded else (offset or 0)
            if start >= s.query_row_cap:
                raise RowCapExceededError(
                    f"interactive queries page through at most {s.query_row_cap} rows; "
                    "POST /v1/exports with the same SQL writes the whole result to a file"
                )
            plan = self.plan(principal, sql, pin=pin, snapshot=snapshot, cursor=decoded)
            # the organisation's share first: nothing is opened for a request that waits
            with self.fairshare.acquire(principal.org, s.query_queue_timeout_s):
                handles: list[int] = []
                try:
                    sources, handles = self.sources(plan, ttl_s=s.query_timeout_s + 60)
                    snapshot_id = self.catalog.record_snapshot(principal, plan.resolution)
                    size = min(page_size, s.query_row_cap - start)
                    page = self._traced_run(principal, plan, sql, sources, start, size)
                finally:
                    close_all(handles)
                    self.unpin(plan)
        except ApiError as exc:
            self.metrics.queries.labels(exc.code).inc()
            raise
        self.metrics.queries.labels("ok").inc()
        self.metrics.query_seconds.observe(page.elapsed_ms / 1000)
        self.metrics.rows.inc(page.table.num_rows)
        end = start + page.table.num_rows
        truncated = page.has_more and end >= s.query_row_cap
        next_cursor = None
        if page.has_more and not truncated:
            next_cursor = Cursor(end, snapshot_id, sql_fingerprint(sql)).encode()
        return PageResult(
            page.table,
            page.columns,
            start,
            next_cursor,
            truncated,
            snapshot_id,
            plan.resolution.versions,
            page.elapsed_ms,
            page.byte_limited,
            sql_fingerprint(sql),
        )

    def _traced_run(
        self,
        principal: Principal,
        plan: Plan,
        sql: str,
        sources: list[FileSource],
        offset: int,
        limit: int,
    ) -> SandboxPage:
        """`_run` inside a `duckdb.query` span: the datasets, the org, the rows returned and
        the bytes of the committed files the query was given (DuckDB reads what it needs of
        them; the sandbox does not report what it scanned). The SQL itself is not recorded
        (it may hold what the organisation queries for): its fingerprint is."""
        attributes = {
            "db.system": "duckdb",
            "trace.org": principal.org,
            "trace.datasets": sorted(plan.parsed.datasets),
            "trace.sql_fingerprint": sql_fingerprint(sql),
            "trace.files": sum(len(source.files) for source in sources),
            "trace.files_bytes": sum(size for source in sources for _, size in source.files),
        }
        with self.tracing.span("duckdb.query", attributes) as span:
            page = self._run(sql, sources, offset, limit)
            span.set_attribute("db.response.returned_rows", page.table.num_rows)
            return page

    def _run(self, sql: str, sources: list[FileSource], offset: int, limit: int) -> SandboxPage:
        s = self.settings
        try:
            with self.sandbox.lease(s.query_queue_timeout_s) as worker:
                self.metrics.sandboxes_busy.inc()
                try:
                    return worker.page(
                        sql,
                        sources,
                        offset=offset,
                        limit=limit,
                        # JSON spells binary as hex: half the budget in Arrow bytes
                        max_bytes=max(1, s.query_max_response_bytes // 2),
                        timeout_s=s.query_timeout_s,
                    )
                finally:
                    self.metrics.sandboxes_busy.dec()
        except SandboxError as exc:
            raise api_error(exc, s.query_timeout_s) from None

    def submit_export(self, principal: Principal, body: ExportRequest) -> ExportJob:
        """Resolve and pin the versions now; the export job reads them and unpins."""
        plan = self.plan(principal, body.sql, pin=body.pin, snapshot=body.snapshot)
        ttl_s = 4 * self.settings.query_export_timeout_s + 300  # queueing included
        try:
            for name in sorted(plan.parsed.datasets):
                self.pin(plan, name, ttl_s)
            snapshot_id = self.catalog.record_snapshot(principal, plan.resolution)
            return self.exports.submit(plan, snapshot_id, body.format, on_done=self.unpin)
        except BaseException:
            self.unpin(plan)
            raise
