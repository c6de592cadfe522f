"""Dagster sensors: the chain head (adds block-range partitions and requests their runs,
`chain_head.py`), gap repair (re-requests finalized ranges a failed or killed run left
missing, `gap_repair.py`) and the outbox relay and automation (`outbox.py`).

May import `trace_resources` only: what a sensor needs from the assets (partitions, asset
keys) is passed to its builder by `trace_assets.definitions`.
"""
