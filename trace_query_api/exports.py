"""Exports: a query's whole result written to the results bucket by a background job.

`POST /v1/exports` resolves the versions at once (so the export reads the data as it was when
it was asked for, recorded as a snapshot), stores a `queued` row and hands the job to a small
thread pool with sandboxes of its own (exports never take the interactive query slots). The
job streams the result in Arrow batches into Parquet or CSV at
`exports/<org>/<export id>.<format>` in the results bucket, then marks the row `succeeded` with
rows and bytes, or `failed` with the error (the table and its SQL:
`trace_resources.storage.exports`). An organisation has at most
`TRACE_QUERY_ORG_MAX_EXPORTS` exports queued or running in a process (429 beyond).

`DELETE /v1/exports/{id}` cancels: a queued job is dropped before it starts, a running one is
interrupted (`_interrupt`, the one place that stops a job), and any partial file is removed.

Downloads: on S3 a presigned GET URL (boto3); on the local object store a link to this
service, `/v1/exports/{id}/download?expires=..&signature=..`, signed with HMAC-SHA256 under
`TRACE_QUERY_URL_SIGNING_KEY`. Either link is the capability: it works without a token until it
expires, as a presigned URL does.

Only the subject that asked for an export sees it (other subjects of the same organisation may
hold narrower tokens). A job whose process died is reported failed once its time is up.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import sqlalchemy as sa

from trace_query_api.encode import text_table
from trace_query_api.engine import api_error, with_aliases
from trace_query_api.errors import (
    ApiError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    ResourceLimitError,
)
from trace_query_api.files import FileCache
from trace_query_api.metrics import Metrics
from trace_resources.sandbox import FileSource, SandboxError, SandboxPool, SandboxWorker
from trace_resources.tokens import Principal

if TYPE_CHECKING:
    from trace_query_api.services import Plan
from trace_resources.settings import QuerySettings
from trace_resources.storage import exports as store
from trace_resources.storage.exports import ExportJob
from trace_resources.storage.object_store import ObjectStore

__all__ = ["Exports"]

log = logging.getLogger(__name__)

_EXTENSIONS = {"parquet": "parquet", "csv": "csv"}
_MEDIA_TYPES = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv"}
_INTERRUPTED = {"code": "interrupted", "message": "the service stopped; submit the export again"}


class Exports:
    def __init__(
        self,
        engine: sa.Engine,
        files: FileCache,
        results: ObjectStore,
        settings: QuerySettings,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.files = files
        self.results = results
        self.settings = settings
        self.metrics = metrics
        self.sandbox = SandboxPool(
            settings.query_export_workers,
            memory_bytes=settings.query_memory_bytes,
            threads=settings.query_threads,
            cache_bytes=0,  # exports scan their files; they do not repeat
            name="export-sandbox",
        )
        self.pool = ThreadPoolExecutor(
            settings.query_export_workers, thread_name_prefix="trace-export"
        )
        self._key = settings.query_url_signing_key.get_secret_value().encode()
        self._presigner: Any = None
        self._mine: dict[str, str] = {}  # jobs of this process not finished yet -> their org
        self._running: dict[str, SandboxWorker] = {}  # export id -> the worker running it
        self._cancelled: set[str] = set()  # jobs of this process cancelled by their owner
        self._stopping = False
        self._lock = threading.Lock()

    # -- jobs ----------------------------------------------------------------------------------

    def submit(
        self, plan: Plan, snapshot_id: str, fmt: str, on_done: Callable[[Plan], None]
    ) -> ExportJob:
        """Record the job and queue it; `on_done(plan)` runs when it ends (releases pins)."""
        export_id = str(uuid.uuid4())
        self._reserve(plan.principal.org, export_id)
        try:
            job = store.queue_export(
                self.engine,
                export_id=export_id,
                org=plan.principal.org,
                subject=plan.principal.subject,
                sql=plan.parsed.sql,
                fmt=fmt,
                snapshot_id=snapshot_id,
            )
        except BaseException:
            with self._lock:
                self._mine.pop(export_id, None)
            raise
        self.pool.submit(self._run, export_id, plan, fmt, on_done)
        return job

    def _reserve(self, org: str, export_id: str) -> None:
        """Count the job against its organisation's exports, or refuse it (429)."""
        cap = self.settings.query_org_max_exports
        with self._lock:
            if sum(1 for owner in self._mine.values() if owner == org) >= cap:
                raise RateLimitedError(
                    f"organisation {org!r} already has {cap} exports queued or running, its "
                    "share (TRACE_QUERY_ORG_MAX_EXPORTS); wait for one to finish or cancel one "
                    "(DELETE /v1/exports/{id}), then retry",
                    retry_after_s=5,
                    code="org_export_limited",
                )
            self._mine[export_id] = org

    def _run(self, export_id: str, plan: Plan, fmt: str, on_done: Callable[[Plan], None]) -> None:
        key = f"exports/{plan.principal.org}/{export_id}.{_EXTENSIONS[fmt]}"
        resolution = plan.resolution
        try:
            if not store.start_export(self.engine, export_id):
                return  # cancelled while queued
            timeout_s = self.settings.query_export_timeout_s
            handles: list[int] = []
            sources = []
            try:
                for name in sorted(plan.parsed.datasets):
                    mine: list[int] = []
                    for entry in resolution.files[name]:
                        mine.append(self.files.handle(entry))
                        handles.append(mine[-1])
                    sources.append(
                        FileSource(
                            name,
                            resolution.schemas[name],
                            [(f.sha256 or f.key, f.size) for f in resolution.files[name]],
                            lambda j, mine=mine: os.dup(mine[j]),  # type: ignore[misc]
                        )
                    )
                with self.sandbox.lease(wait_s=timeout_s) as worker:
                    self._track(export_id, worker)
                    try:
                        batches = worker.stream(
                            plan.parsed.sql,
                            with_aliases(plan.parsed, sources),
                            max_batch_bytes=self.settings.query_max_response_bytes,
                            timeout_s=timeout_s,
                        )
                        rows, size = self._write(
                            key, fmt, self._unless_cancelled(export_id, batches)
                        )
                    finally:
                        with self._lock:
                            self._running.pop(export_id, None)
            except SandboxError as exc:
                raise api_error(exc, timeout_s) from None
            finally:
                for fd in handles:
                    os.close(fd)
        except Exception as exc:  # the job must end in a state the client can read
            self._remove_partial(key)
            if export_id in self._cancelled:
                self.metrics.exports.labels("cancelled").inc()
            elif self._stopping:
                self._fail(export_id, _INTERRUPTED)
            elif isinstance(exc, ApiError):
                self._fail(export_id, exc.body()["error"])
            else:
                log.exception("export %s failed", export_id)
                self._fail(
                    export_id, {"code": "export_failed", "message": f"the export failed: {exc}"}
                )
            return
        finally:
            with self._lock:
                self._mine.pop(export_id, None)
                self._cancelled.discard(export_id)
            on_done(plan)
        if not store.finish_export(self.engine, export_id, key, rows, size):
            self._remove_partial(key)  # cancelled as it finished: the result is not delivered
            self.metrics.exports.labels("cancelled").inc()
            return
        self.metrics.exports.labels("succeeded").inc()

    def _track(self, export_id: str, worker: SandboxWorker) -> None:
        """Make the running job interruptible, unless it was cancelled already."""
        with self._lock:
            if export_id in self._cancelled:
                raise _Cancelled
            self._running[export_id] = worker

    def _unless_cancelled(self, export_id: str, batches: Any) -> Any:
        for batch in batches:
            if export_id in self._cancelled:
                raise _Cancelled
            yield batch

    def _remove_partial(self, key: str) -> None:
        try:
            self.results.fs.delete_file(self.results.path(key))
        except (FileNotFoundError, OSError):
            pass  # nothing was written, or it is gone already

    def _write(self, key: str, fmt: str, batches: Any) -> tuple[int, int]:
        path = self.results.path(key)
        if isinstance(self.results.fs, pafs.LocalFileSystem):
            self.results.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        rows = 0
        cap = self.settings.query_export_row_cap
        with self.results.fs.open_output_stream(path) as out:
            writer: Any = None
            try:
                for batch in batches:
                    rows += batch.num_rows
                    if rows > cap:
                        raise ResourceLimitError(
                            f"the result has more than {cap} rows, the export limit "
                            "(TRACE_QUERY_EXPORT_ROW_CAP); aggregate or narrow the query",
                            code="export_row_cap",
                        )
                    table = pa.Table.from_batches([batch])
                    if fmt == "csv":
                        table = text_table(table)
                        if writer is None:
                            writer = pacsv.CSVWriter(out, table.schema)
                    elif writer is None:
                        writer = pq.ParquetWriter(out, table.schema, compression="zstd")
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
        size = self.results.size(key) or 0
        return rows, size

    def _fail(self, export_id: str, error: dict[str, Any]) -> None:
        store.fail_export(self.engine, export_id, error)
        self.metrics.exports.labels("failed").inc()

    def cancel(self, principal: Principal, export_id: str) -> ExportJob:
        """Cancel the owner's queued or running export (409 once it has finished)."""
        job = self.get(principal, export_id)
        if job["status"] in ("queued", "running"):
            with self._lock:
                if export_id in self._mine:
                    self._cancelled.add(export_id)
            if store.cancel_export(self.engine, export_id):
                self._interrupt(export_id)
                return self.get(principal, export_id)
            job = self.get(principal, export_id)  # it finished meanwhile
        raise ConflictError(
            f"export {export_id} has already {_FINISHED_AS.get(job['status'], 'finished')}; "
            "only a queued or running export can be cancelled",
            code="export_finished",
        )

    def _interrupt(self, export_id: str) -> None:
        """Stop the job's query now, if it runs in this process (the job then fails or is
        recorded cancelled; a job running in another process delivers nothing once cancelled).
        """
        with self._lock:  # the job leaves `_running` under this lock before its lease ends
            worker = self._running.get(export_id)
            if worker is not None:
                worker.kill("cancelled")  # the pool replaces the worker

    def shutdown(self) -> None:
        """Stop: running jobs are interrupted and queued ones dropped, all marked failed."""
        self._stopping = True
        with self._lock:
            running = list(self._running)
        for export_id in running:
            self._interrupt(export_id)
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            never_started = list(self._mine)
        for export_id in never_started:
            self._fail(export_id, _INTERRUPTED)
        self.sandbox.close()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, principal: Principal, export_id: str) -> ExportJob:
        job = None
        if _is_uuid(export_id):
            job = store.owned_export(self.engine, principal.org, principal.subject, export_id)
        if job is None:
            raise NotFoundError(
                f"no export {export_id[:40]!r} for this token", code="unknown_export"
            )
        return self._settle(job)

    def latest(self, principal: Principal, limit: int = 100) -> list[ExportJob]:
        jobs = store.latest_exports(self.engine, principal.org, principal.subject, limit)
        return [self._settle(job) for job in jobs]

    def _settle(self, row: ExportJob) -> ExportJob:
        """A job whose process died never finishes: report it failed once its time is up."""
        now = dt.datetime.now(dt.UTC)
        timeout = dt.timedelta(seconds=self.settings.query_export_timeout_s + 60)
        started = row["started_at"]
        stale = (
            row["status"] == "running" and started is not None and started + timeout < now
        ) or (row["status"] == "queued" and row["created_at"] + 4 * timeout < now)
        if stale:
            row["status"], row["error"] = "failed", _INTERRUPTED
        return row

    def public(self, row: ExportJob, base_url: str) -> dict[str, Any]:
        url, expires = (None, None)
        object_key = row["object_key"]
        if row["status"] == "succeeded" and object_key:
            url, expires = self.download_url(row["id"], row["format"], object_key, base_url)
        return {
            "id": str(row["id"]),
            "status": row["status"],
            "format": row["format"],
            "sql": row["sql"],
            "snapshot": row["snapshot_id"],
            "rows": row["rows"],
            "bytes": row["bytes"],
            "error": row["error"],
            "download_url": url,
            "download_expires_at": expires,
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
        }

    # -- download links ------------------------------------------------------------------------

    def download_url(
        self, export_id: str, fmt: str, object_key: str, base_url: str
    ) -> tuple[str, dt.datetime]:
        ttl = self.settings.query_export_url_ttl_s
        expires = int(time.time()) + ttl
        filename = f"{export_id}.{_EXTENSIONS[fmt]}"
        if isinstance(self.results.fs, pafs.S3FileSystem):
            url = self._presign(object_key, filename, ttl)
        else:
            signature = self.signature(export_id, expires)
            url = (
                f"{base_url.rstrip('/')}/v1/exports/{export_id}/download"
                f"?expires={expires}&signature={signature}"
            )
        return url, dt.datetime.fromtimestamp(expires, dt.UTC)

    def _presign(self, key: str, filename: str, ttl: int) -> str:
        if self._presigner is None:
            import boto3  # lazily: only the S3 backend needs it

            self._presigner = boto3.client(
                "s3",
                endpoint_url=self.settings.s3_endpoint_url,
                region_name=self.settings.s3_region,
            )
        url: str = self._presigner.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.settings.bucket_results,
                "Key": key,
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=ttl,
        )
        return url

    def signature(self, export_id: str, expires: int) -> str:
        message = f"{export_id}:{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def signed_object(self, export_id: str, expires: int, signature: str) -> tuple[str, str, str]:
        """(path in the results store, media type, file name) of a validly signed link."""
        valid = hmac.compare_digest(self.signature(export_id, expires).encode(), signature.encode())
        if not valid or expires < time.time():
            raise ForbiddenError(
                "the download link is invalid or has expired; GET the export for a new one",
                code="invalid_signature",
            )
        found = store.finished_export_object(self.engine, export_id)
        if found is None:
            raise NotFoundError("no finished export behind this link", code="unknown_export")
        object_key, fmt = found
        filename = f"{export_id}.{_EXTENSIONS[fmt]}"
        return self.results.path(object_key), _MEDIA_TYPES[fmt], filename


class _Cancelled(Exception):
    """The job's owner cancelled it while it ran."""


_FINISHED_AS = {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
