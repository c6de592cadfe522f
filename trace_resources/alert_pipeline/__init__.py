"""The alert pipeline: rules, the SQS buffer, the sink, delivery and dead letters.

alert evaluation -> `queue.SqsBuffer` (SQS API; dedupe_key, payload, destination)
-> `sink.Sink` (upsert into Postgres data, ack after commit) -> `delivery.Deliverer`
(webhook / Slack / email, retries on a schedule for a period, rate limits) -> `dlq` (dead
letters, replay).
Rules (`rules.py`) are versioned declarations per organisation in Postgres data; `history`
lists an organisation's alerts with their deliveries. Every query of the pipeline's tables
(`tables.py`, the evaluation ledger in `resource.py`) lives in this package; their schema is
made by the data migrations (`trace_resources/storage/migrations/data/`).

May import `trace_resources` (settings, errors, storage); no other trace_* package.
"""
