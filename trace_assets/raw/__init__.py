"""Raw chain datasets: blocks, transactions and logs of finalized block ranges, extracted with
cryo through the chain resource, verified and committed by the dataset IO manager (`chain.py`).

May import `trace_resources` and other `trace_assets` modules; never `trace_query_api` or
`trace_sensors`.
"""
