"""Dagster instance plug-ins, named in `dagster_home/dagster.yaml`: how runs start and where
Dagster keeps its own records on this single host.

- `run_launcher.WarmRunLauncher`: runs forked from a warm worker (`run_worker`) that has
  already imported dagster, the heavy libraries and the code location;
- `run_coordinator.TraceRunCoordinator`: the queued coordinator with a fast lane for the
  chain-head sensor's runs;
- `storage.PooledPostgresStorage`: dagster-postgres storage with a connection pool.

May import dagster and `trace_resources` modules; no other trace_* package.
"""
