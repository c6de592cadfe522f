"""Storage: the object store (S3 or local, `object_store.py`, path layout in `paths.py`),
Postgres state (`state.py`), the version store and the fenced commit protocol (`versions.py`,
`commit.py`, `io_manager.py`), the read model every reader uses (`read_model.py`), the access
rule and its tables (`access.py`), leases, crash recovery and GC.

The only code that speaks SQL to Trace's state tables. May import other `trace_resources`
modules except `alert_pipeline` and `instance`; no other trace_* package.
"""
