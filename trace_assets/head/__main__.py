"""`python -m trace_assets.head`: the head follower as a long-running worker.

Configured by the same `TRACE_*` settings as the rest of Trace (`TRACE_HEAD_*` for its own).
One follower per chain appends: it holds the chain's leader lease in Postgres state
(`head-follower:<chain id>`, `trace leases` shows it), and a second process waits as a standby
that takes over once the lease expires (TRACE_LEADER_LEASE_S after the leader stopped renewing
it); a leader paused for longer has its late appends refused and stands by. SIGTERM or
SIGINT stops it after the cycle in hand (a cycle is all or nothing, so a SIGKILL loses nothing
either: the next start resumes after the newest committed block).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from trace_assets.alerts.scope import AlertScope
from trace_assets.head.follower import HEAD_DATASETS, HeadFollower
from trace_assets.head.metrics import HeadMetrics
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.alert_pipeline.rules import RuleStore
from trace_resources.alert_pipeline.sink import buffer_from_settings
from trace_resources.leases import LeaderLease, bounded_transactions, default_holder
from trace_resources.resources import ChainResource, ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings, get_settings
from trace_resources.storage.compaction import Compactor
from trace_resources.telemetry import Tracing

log = logging.getLogger("trace_assets.head")


def objects_from(settings: Settings) -> ObjectStoreResource:
    if settings.object_store == "local":
        return ObjectStoreResource(kind="local", local_root=str(settings.local_store_root))
    return ObjectStoreResource(
        kind="s3",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        bucket_datasets=settings.bucket_datasets,
    )


def build_follower(
    settings: Settings, metrics: HeadMetrics | None = None, tracing: Tracing | None = None
) -> HeadFollower:
    """A follower wired to the services the settings name (chain, object store, Postgres
    state and data, the alert buffer)."""
    chain = ChainResource.from_settings(settings)
    objects = objects_from(settings)
    # a follower paused inside a commit has its session ended (its row locks released) once
    # it has been idle in that transaction for a lease: the standby's appends never wait on it
    state = StateStoreResource(
        dsn=bounded_transactions(settings.state_dsn, settings.leader_lease_s)
    )
    data_engine = alert_tables.data_engine(settings.data_dsn)
    return HeadFollower(
        chain.client(),
        state.versions(),
        state.writer(objects),
        settings.range_size,
        rules=RuleStore(data_engine),
        buffer=buffer_from_settings(settings),
        data_engine=data_engine,
        scope=AlertScope(settings.state_dsn),
        max_batch_blocks=settings.head_max_batch_blocks,
        metrics=metrics,
        tracing=tracing,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trace_assets.head", description=__doc__.split("\n\n")[0]
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s follower %(levelname)s %(message)s")
    settings = get_settings()
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    metrics = HeadMetrics(settings.head_metrics_port)
    tracing = Tracing.configured("trace-head-follower", settings.otlp_endpoint)
    follower = build_follower(settings, metrics, tracing)
    objects = objects_from(settings)
    leader = LeaderLease(
        follower.versions.engine,
        f"head-follower:{settings.chain_id}",
        lease_s=settings.leader_lease_s,
        renew_s=settings.leader_renew_s,
        holder=default_holder("head-follower"),
    )
    try:
        if not leader.acquire(stop):
            return 0
        log.info(
            "follower ready: chain %s, ranges of %d blocks, datasets %s%s",
            settings.chain_id,
            settings.range_size,
            ", ".join(HEAD_DATASETS),
            f", metrics on :{settings.head_metrics_port}" if settings.head_metrics_port else "",
        )
        with Compactor(objects.datasets(), follower.versions) as compactor:
            follower.run(
                stop,
                settings.head_poll_s,
                compactor=compactor,
                compact_every_s=settings.head_compact_interval_s,
                compact_min_segments=settings.head_compact_min_segments,
                leader=leader,
            )
    finally:
        leader.release()
        follower.close()
        metrics.close()
        tracing.shutdown()
    log.info("follower stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
