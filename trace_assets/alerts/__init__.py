"""Alert evaluation as a Dagster asset: the organisations' rules evaluated over each committed
block range (`assets.py`, `evaluate.py`), backtests (`backtest.py`) and which datasets a
condition may read (`scope.py`, through `trace_resources.storage.access`). Evaluated alerts go
to the alert pipeline (`trace_resources.alert_pipeline`).

May import `trace_resources` and other `trace_assets` modules; never `trace_query_api` or
`trace_sensors`.
"""
