"""The chain: JSON-RPC client with retries and finality (`rpc.py`), cryo extraction of block
ranges (`extract.py`), range arithmetic (`ranges.py`), the raw Arrow schemas (`schemas.py`)
and the checks a range must pass before it is committed (`verify.py`).

May import `trace_resources` leaves (settings, errors); not `storage`, `alert_pipeline` or
`instance`, and no other trace_* package.
"""
