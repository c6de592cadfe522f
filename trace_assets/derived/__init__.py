"""Derived datasets (ERC-20 and native transfers, contracts, daily volumes, holders): assets
built from the declarations in `trace_assets/datasets/*.yaml` (`assets.py`) over pure Arrow
transforms (`transforms.py`).

May import `trace_resources` and other `trace_assets` modules; never `trace_query_api` or
`trace_sensors`.
"""
