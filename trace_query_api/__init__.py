"""Trace's query service: organisation-scoped reads over committed datasets.

Follow a request in this order: `app.py` (the FastAPI app) → `api/deps.py` (token, revocation,
rate limits) → `api/routes/` → `services.py` (the query path) → `catalog.py` (who may read
what; the committed files of a query) → `files.py` (Arrow data from manifests) → `engine.py`
(the locked DuckDB sandbox) → `encode.py` (JSON, CSV, Arrow IPC). Tokens: `tokens.py`;
exports: `exports.py`; saved queries: `saved.py`; the service's tables: `db.py` and, with
their SQL, `trace_resources/storage/` (snapshots, saved queries, exports, rate limits).

Imports only `trace_resources` among Trace's packages.
"""
