"""`make bench-taps`: what a wire tap costs the primary path (issue 20, B2).

1. Offer: `Tap.offer` alone, 200,000 events, with a writer that keeps up (a destination that
   returns at once) and with one that is stalled (the buffer fills, then every offer drops).
2. Commits: replace commits on the real PostgreSQL and the S3 API (moto on loopback), timed
   one by one (`DatasetWriter.commit`), with no tap, with a commits tap to an S3 prefix on the
   same moto server, and with a commits tap whose destination never answers (a TCP listener
   that accepts and stays silent). The three alternate, `--rounds` rounds each; medians.

Last line: `taps: offer_us=<> offer_stalled_us=<> commit_p50_ms_none=<> commit_p50_ms_tap=<>
commit_p50_ms_stalled=<> dropped_stalled=<>`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa

from infra.local.services import MotoS3Server, PostgresServer, free_port
from trace_resources import taps
from trace_resources.settings import Settings, TapConfig
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.taps.hub import Tap


def _say(message: str) -> None:
    print(f"[bench-taps] {message}", flush=True)


def measure_offer(n: int) -> tuple[float, float, int]:
    """Microseconds per offer with a writer that keeps up, and with a stalled one; drops."""
    event = {
        "dataset": "blocks",
        "partition_key": "000000000000-000000009999",
        "version": 3,
        "payload": {"attempt_id": "0" * 36, "rows": 10_000},
    }
    results = []
    dropped = 0
    for stalled in (False, True):
        gate = threading.Event()
        config = TapConfig(name=f"bench-{int(stalled)}", source="commits", to="s3://b/p")
        tap = Tap(
            config, (lambda r, g=gate: g.wait()) if stalled else (lambda r: None), producer="bench"
        )
        started = time.perf_counter()
        for _ in range(n):
            tap.offer(event)
        results.append((time.perf_counter() - started) / n * 1e6)
        dropped = tap.dropped if stalled else dropped
        gate.set()
        tap.stop(2)
    return results[0], results[1], dropped


def _silent_listener() -> tuple[socket.socket, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def _commit_times(writer: DatasetWriter, commits: int, offset: int) -> list[float]:
    times = []
    for i in range(commits):
        key = f"{(i % 20) * 100:012d}-{(i % 20) * 100 + 99:012d}"
        rows = pa.table(
            {"block_number": pa.array(range(offset + i, offset + i + 100), pa.uint64())}
        )
        staged = writer.stage("bench_taps", {key: PartitionData(rows)})
        started = time.perf_counter()
        writer.commit(staged)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--offers", type=int, default=200_000)
    parser.add_argument("--commits", type=int, default=200, help="timed commits per contender")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    offer_us, stalled_us, offer_drops = measure_offer(args.offers)
    _say(
        f"offer: {offer_us:.2f} us (writer keeps up), {stalled_us:.2f} us (stalled writer, "
        f"{offer_drops} of {args.offers} dropped)"
    )

    work = Path(tempfile.mkdtemp(prefix="trace-bench-taps-"))
    pg = PostgresServer(work / "pg", free_port())
    s3 = MotoS3Server(free_port())
    listener, silent = _silent_listener()
    try:
        pg.start()
        pg.ensure_databases(("trace_state",))
        pg.migrate({"trace_state": "state"})
        s3.start()
        s3.create_buckets(["trace-datasets", "trace-taps"])
        os.environ.update(s3.env())
        dsn = pg.dsn("trace_state")
        versions = VersionStore(engine_for(dsn))
        store = s3_store("trace-datasets", endpoint_url=s3.endpoint_url)
        base = {"state_dsn": dsn, "sqs_endpoint_url": s3.endpoint_url, "s3_region": "us-east-1"}
        contenders = {
            "none": None,
            "tap": Settings(**base, s3_endpoint_url=s3.endpoint_url),
            "stalled": Settings(**base, s3_endpoint_url=silent),
        }
        tap_config = TapConfig(
            name="bench", source="commits", to="s3://trace-taps/commits", buffer=100
        )
        times: dict[str, list[float]] = {name: [] for name in contenders}
        dropped = 0
        offset = 0
        with DatasetWriter(store, versions) as writer:
            _commit_times(writer, 20, 10_000_000)  # warm up
            for round_ in range(args.rounds):
                for name, settings in contenders.items():
                    if settings is None:
                        taps.configure([], Settings(**base))
                    else:
                        taps.configure([tap_config], settings)
                    times[name] += _commit_times(writer, args.commits, offset)
                    offset += args.commits * 100
                    if name == "stalled":
                        dropped += taps.hub().get("bench").dropped
                    if name == "tap":
                        assert taps.hub().get("bench").flush(30)
                    taps.reset(timeout_s=0.5)
                _say(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{n} p50 {statistics.median(v):.2f} ms" for n, v in times.items())
                )
        p50 = {n: statistics.median(v) for n, v in times.items()}
        p99 = {n: sorted(v)[int(0.99 * (len(v) - 1))] for n, v in times.items()}
        _say(
            "commit p50/p99 ms: "
            + json.dumps({n: [round(p50[n], 2), round(p99[n], 2)] for n in p50})
        )
        print(
            f"taps: offer_us={offer_us:.2f} offer_stalled_us={stalled_us:.2f} "
            f"commit_p50_ms_none={p50['none']:.2f} commit_p50_ms_tap={p50['tap']:.2f} "
            f"commit_p50_ms_stalled={p50['stalled']:.2f} dropped_stalled={dropped}",
            flush=True,
        )
    finally:
        taps.reset(timeout_s=0.5)
        listener.close()
        s3.stop()
        pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
