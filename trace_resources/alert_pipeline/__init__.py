"""The alert pipeline: rules, the SQS buffer, the sink, delivery and dead letters.

alert evaluation -> `queue.SqsBuffer` (SQS API; dedupe_key, payload, destination)
-> `sink.Sink` (upsert into Postgres data, ack after commit) -> `delivery.Deliverer`
(webhook / Slack, backoff with jitter, rate limits) -> `dlq` (dead letters, replay).
Rules (`rules.py`) are versioned declarations per organisation in Postgres data.
"""
