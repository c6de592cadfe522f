"""Wire taps: copies of an event stream (committed versions, accepted alerts, Dagster run
events) sent to a secondary destination (an S3 prefix as newline-delimited JSON, or an SQS
queue), declared in `TRACE_TAPS` (`trace_resources.settings.TapConfig`).

The primary path only `offer`s an event: a bounded in-memory buffer per tap and process takes
it or, when full, drops it and counts the drop; a writer thread sends the buffer's events, in
order, with one sequence number per (tap, producing process). `replay` re-sends a tap's records
to a queue, a webhook or another prefix.

May import `trace_resources.settings` and `trace_resources.storage` (its counters table);
imported by the storage commit path, the alert sink and the Dagster event log storage.
"""

from trace_resources.taps.hub import Hub, Tap, configure, hub, offer, reset

__all__ = ["Hub", "Tap", "configure", "hub", "offer", "reset"]
