"""Trace's resources and state: settings, the chain (RPC, cryo extraction, verification), the
storage (object store, Postgres state, the commit protocol, the read model, the access rule),
capability tokens, the dataset registry, the alert pipeline, the Dagster instance plug-ins, and
observability (`telemetry.py` traces, `worker_metrics.py` and `pushed_metrics.py` metrics);
the environments that `trace promote` copies configuration between (`environments`, `promotion`).

The bottom layer: imports no other trace_* package (checked by import-linter, `make lint`).
"""
