"""Trace's Dagster assets: partitions, the raw chain datasets (`raw/`), the derived datasets
(`derived/`, declared in `datasets/*.yaml`), alert evaluation (`alerts/`), asset checks,
lineage, and `definitions.py`, the one `Definitions` object (the composition root). Also the
operator's `trace` CLI (`cli.py`).

May import `trace_resources`; imports `trace_sensors` only in `definitions.py`, which hands
each sensor builder what it needs from the assets; never imports `trace_query_api`.
"""
