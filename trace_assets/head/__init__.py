"""The head tier: a long-running follower that appends each finalized block to the open
range's partition of every head dataset and alerts on it within seconds (`follower.py`);
its process entry point is `python -m trace_assets.head` (`__main__.py`), its metrics
`metrics.py`. The sealed tier (the range's Dagster run) stays the source of truth."""
