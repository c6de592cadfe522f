"""Routes of the query service, one module per resource (datasets, query, exports, saved
queries, alerts, health).

May import `trace_query_api` and `trace_resources` modules; no other trace_* package.
"""
