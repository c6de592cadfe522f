"""The HTTP API: dependencies (`deps.py`: token, organisation, admission) and routes
(`routes/`), thin over `trace_query_api.services`.

May import `trace_query_api` and `trace_resources` modules; no other trace_* package.
"""
