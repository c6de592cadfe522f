"""Storage: the object store (S3 or local, `object_store.py`, path layout in `paths.py`),
the schema of Postgres state (`state.py`) and its migrations (`migrations/`), the version store
one module per concern (`version_store.py` builds them: `attempts.py`, `fenced_commit.py`,
`read_model.py`, `pins.py`, `retention.py`, `outbox.py`, `quality_results.py`; the records in
`records.py`, the schema registry in `schemas.py`), the write path (`commit.py`, the IO manager
`io_manager.py`), the access rule and its tables (`access.py`), the query service's records
(`snapshots.py`, `saved_queries.py`, `dashboards.py`, `exports.py`, `rate_limits.py`), leases,
crash points and GC (`lease.py`, `crash.py`, `gc.py`), the compaction of open append
partitions (`compaction.py`), and the log of environment promotions (`promotions.py`).

The only code that speaks SQL to Trace's state tables. May import other `trace_resources`
modules except `alert_pipeline` and `instance`; no other trace_* package.
"""
