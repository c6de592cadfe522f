"""Trace's query service: organisation-scoped reads over committed datasets.

Follow a request in this order: `app.py` (the FastAPI app) → `api/deps.py` (token, revocation,
rate limits) → `api/routes/` → `services.py` (the query path) → `catalog.py` (what a token may
read, the committed files of a query) → `files.py` (Arrow data from manifests) → `engine.py`
(the locked DuckDB sandbox) → `encode.py` (JSON, CSV, Arrow IPC). Token verification:
`tokens.py` (issuing is `trace_resources.tokens`); who may read what is
`trace_resources.storage.access`; exports: `exports.py`; saved queries: `saved.py`;
dashboards, their parameters and embed tokens: `dashboards.py`, the `/ui/` page
`api/routes/ui.py` and `ui/`. The service's tables and all their SQL are in
`trace_resources/storage/` (snapshots, saved queries, dashboards, exports, rate limits,
access).

Imports only `trace_resources` among Trace's packages.
"""
