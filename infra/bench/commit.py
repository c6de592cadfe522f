"""`make bench-commit`: the commit protocol's latency and throughput on the real Postgres, and
its share of Trace's ingest.

1. Latency: attempts are staged on the S3 API (moto server on loopback) first, then committed
   one by one; only the commit is timed (`DatasetWriter.commit`: the fenced transaction
   with schema check, version, pointer, commit key and outbox event). Replace commits rotate
   over partitions of one dataset; append commits add one segment each to one partition (its
   manifest grows with every append, as in production). Staging time is reported apart.
2. Throughput: `--writers` threads commit pre-staged attempts of different partitions of one
   dataset at once; commits/s is the number of commits over the wall time.
3. Ingest share: the ingest benchmark's devnet backfill (infra/bench/ingest.py: one Dagster run
   materialising blocks, transactions and logs for every range, RPC to committed Parquet),
   with the time spent inside commits measured around the IO manager's commit calls:
   `ingest_share` = commit time / run time (median over rounds).

4. Open partitions ("segments as rows"): `--segments` appends (one block each, one segment
   key "block:<n>") to the open partition of each of two datasets, in turn: one never
   compacted, one compacted every 256 appends (`Compactor.compact_open`, as the head
   follower would).
   At 1, 1,000 and 10,000 segments it reports the append commit p50/p99 over the 50 appends
   before that point, and the read of the open partition (resolve its files and read every
   row, pinned, as `DatasetReader.read`) without and with compaction (the compacted partition
   is compacted on demand just before its read; that compaction's time is reported too).

Last line: `commit: replace_p50_ms=<> replace_p99_ms=<> append_p50_ms=<> commits_per_s=<>
ingest_share=<fraction>`, after a `segments: ...` line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from infra.bench.ingest import CHAIN_ID, dagster_instance, devnet_state, time_trace
from infra.local.services import AnvilNode, MotoS3Server, PostgresServer, free_port
from trace_assets.partitions import add_finalized_partitions
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetWriter, PartitionData, StagedPartition
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore


def _say(message: str) -> None:
    print(f"[bench-commit] {message}", flush=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _table(rows: int, seed: int) -> pa.Table:
    return pa.table(
        {
            "block_number": pa.array(range(seed * rows, seed * rows + rows), pa.uint64()),
            "value": pa.array([float(i) for i in range(rows)], pa.float64()),
        }
    )


def _key(i: int) -> str:
    return f"{i * 100:012d}-{i * 100 + 99:012d}"


def measure_latency(
    writer: DatasetWriter, commits: int, partitions: int, rows: int
) -> dict[str, list[float]]:
    """Stage then commit, one at a time; the commit alone is timed."""
    times: dict[str, list[float]] = {"replace": [], "append": [], "stage": []}
    for i in range(commits):
        started = time.perf_counter()
        staged = writer.stage("bench_replace", {_key(i % partitions): _data(rows, i)})
        times["stage"].append(time.perf_counter() - started)
        started = time.perf_counter()
        writer.commit(staged)
        times["replace"].append(time.perf_counter() - started)
    for i in range(commits):
        data = _data(rows, i, segment_key=f"segment-{i}")
        staged = writer.stage("bench_append", {UNPARTITIONED: data}, mode="append")
        started = time.perf_counter()
        writer.commit(staged)
        times["append"].append(time.perf_counter() - started)
    return times


def _data(rows: int, seed: int, segment_key: str | None = None) -> PartitionData:
    return PartitionData(_table(rows, seed), segment_key=segment_key)


def measure_throughput(writer: DatasetWriter, writers: int, per_writer: int, rows: int) -> float:
    """Commits/s of `writers` threads committing pre-staged attempts on distinct partitions."""
    staged: list[list[StagedPartition]] = [
        writer.stage(
            "bench_concurrent",
            {_key(w * per_writer + i): _data(rows, w * per_writer + i) for i in range(per_writer)},
        )
        for w in range(writers)
    ]
    start = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def commit_all(attempts: list[StagedPartition]) -> None:
        start.wait()
        try:
            for attempt in attempts:
                writer.commit([attempt])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit_all, args=(s,)) for s in staged]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    return writers * per_writer / wall


SEGMENT_POINTS = (1, 1_000, 10_000)
SEGMENT_WINDOW = 50  # appends each point's percentiles are taken over
COMPACT_EVERY = 256


@dataclass
class SegmentPoint:
    segments: int
    append_p50_ms: float
    append_p99_ms: float
    compacted_append_p50_ms: float
    read_ms: float
    read_files: int
    compacted_read_ms: float
    compacted_files: int
    compact_ms: float


def measure_segments(
    store: Any, versions: VersionStore, writer: DatasetWriter, total: int
) -> list[SegmentPoint]:
    """Append `total` one-block segments to an open partition, timing each commit; read it at
    the points of SEGMENT_POINTS (up to `total`), without and with compaction. A point's
    append percentiles are over the SEGMENT_WINDOW appends before it (at 1: the first ones)."""
    from trace_resources.storage.commit import DatasetReader
    from trace_resources.storage.compaction import Compactor

    key = _key(0)
    plain, compacted = "bench_segments", "bench_segments_compacted"  # datasets
    reader = DatasetReader(store, versions)
    compactor = Compactor(store, versions, writer=writer)
    times: dict[str, list[float]] = {plain: [], compacted: []}
    points = [p for p in SEGMENT_POINTS if p <= total] or [total]
    reads: dict[int, tuple[float, int, float, int, float]] = {}
    for n in range(1, total + 1):
        for dataset in (plain, compacted):
            block = {"number": n, "hash": f"0x{n:064x}", "parent_hash": f"0x{n - 1:064x}"}
            data = PartitionData(
                pa.table({"block_number": pa.array([n], pa.uint64())}),
                source={"first": block, "last": block},
                segment_keys=[f"block:{n}"],
            )
            staged = writer.stage(dataset, {key: data}, mode="append")
            started = time.perf_counter()
            writer.commit(staged)
            times[dataset].append(time.perf_counter() - started)
        if n % COMPACT_EVERY == 0:
            compactor.compact_open(compacted, key, min_segments=COMPACT_EVERY)
        if n % 1000 == 0:
            _say(f"segments: {n} appended to each partition")
        if n in points:
            reads[n] = _read_both(versions, reader, compactor, plain, compacted, key, n)
    found = []
    for n in points:
        end = max(n, min(SEGMENT_WINDOW, total))
        ms = [t * 1000 for t in times[plain][end - min(SEGMENT_WINDOW, end) : end]]
        compacted_ms = [t * 1000 for t in times[compacted][end - min(SEGMENT_WINDOW, end) : end]]
        read_ms, files, compacted_read_ms, compacted_files, compact_ms = reads[n]
        point = SegmentPoint(
            n,
            _percentile(ms, 0.5),
            _percentile(ms, 0.99),
            _percentile(compacted_ms, 0.5),
            read_ms,
            files,
            compacted_read_ms,
            compacted_files,
            compact_ms,
        )
        found.append(point)
        _say(
            f"segments {n:>6}: append p50 {point.append_p50_ms:6.2f} ms p99 "
            f"{point.append_p99_ms:6.2f} ms (appends {end - min(SEGMENT_WINDOW, end) + 1}-{end}; "
            f"compacted partition p50 {point.compacted_append_p50_ms:6.2f} ms); read "
            f"{read_ms:8.1f} ms over {files} files, compacted {compacted_read_ms:7.1f} ms over "
            f"{compacted_files} file(s) (compaction on demand {compact_ms:7.1f} ms)"
        )
    return found


def _read_both(
    versions: VersionStore,
    reader: Any,
    compactor: Any,
    plain: str,
    compacted: str,
    key: str,
    rows: int,
) -> tuple[float, int, float, int, float]:
    """Read the open partition (resolve + every row) of both datasets, compacting the second
    on demand first: (read ms, files, compacted read ms, files, compaction ms)."""
    started = time.perf_counter()
    assert reader.read(plain, [key]).num_rows == rows
    read_ms = (time.perf_counter() - started) * 1000
    files = len(versions.read.current_versions(plain)[key].manifest.files)
    started = time.perf_counter()
    compactor.compact_open(compacted, key, min_segments=1)
    compact_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    assert reader.read(compacted, [key]).num_rows == rows
    compacted_read_ms = (time.perf_counter() - started) * 1000
    compacted_files = len(versions.read.current_versions(compacted)[key].manifest.files)
    return read_ms, files, compacted_read_ms, compacted_files, compact_ms


@dataclass
class CommitTimes:
    durations: list[float] = field(default_factory=list)  # one per commit call
    partitions: int = 0  # partitions those calls committed


@contextmanager
def timed_commits() -> Iterator[CommitTimes]:
    """Time every commit the IO manager makes in this process: `DatasetWriter.commit` (an
    output's partitions, one transaction). The real method runs; it is only wrapped with a
    timer."""
    times = CommitTimes()
    lock = threading.Lock()
    original = DatasetWriter.commit

    def timed(self: DatasetWriter, staged: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, staged, *args, **kwargs)
        finally:
            with lock:
                times.durations.append(time.perf_counter() - started)
                times.partitions += len(staged)

    DatasetWriter.commit = timed  # type: ignore[method-assign]
    try:
        yield times
    finally:
        DatasetWriter.commit = original  # type: ignore[method-assign]


def measure_ingest_share(
    pg: PostgresServer, s3: MotoS3Server, work: Path, args: argparse.Namespace
) -> tuple[float, list[float], int]:
    state_file = devnet_state(args.blocks)
    node = AnvilNode(
        work / "anvil",
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--load-state", str(state_file)],
    )
    node.start()
    try:
        pg.ensure_databases(("dagster", "trace_state_ingest"))
        pg.migrate({"trace_state_ingest": "state"})
        settings = Settings(
            environment="test",
            rpc_url=node.url,
            chain_id=CHAIN_ID,
            range_size=args.range_size,
            state_dsn=pg.dsn("trace_state_ingest"),
            object_store="s3",
            s3_endpoint_url=s3.endpoint_url,
        )
        finalized = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        instance = dagster_instance(work / "dagster_home", pg)
        keys = add_finalized_partitions(instance, finalized, args.range_size)
        shares: list[float] = []
        commits = 0
        for round_number in range(args.ingest_rounds):
            with timed_commits() as times:
                seconds = time_trace(settings, instance, keys)
            shares.append(sum(times.durations) / seconds)
            commits = times.partitions
            _say(
                f"ingest round {round_number + 1}: run {seconds:5.2f} s, {times.partitions} "
                f"partitions committed in {len(times.durations)} commit calls taking "
                f"{sum(times.durations) * 1000:7.1f} ms: share {shares[-1]:.4f}"
            )
        instance.dispose()
        return statistics.median(shares), shares, commits
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=400, help="timed commits of each mode")
    parser.add_argument("--partitions", type=int, default=20, help="replace partitions")
    parser.add_argument("--rows", type=int, default=1000, help="rows per staged table")
    parser.add_argument("--writers", type=int, default=8, help="concurrent committers")
    parser.add_argument("--per-writer", type=int, default=50, help="commits per writer")
    parser.add_argument("--blocks", type=int, default=3000, help="ingest devnet blocks")
    parser.add_argument("--range-size", type=int, default=250, help="ingest blocks per range")
    parser.add_argument("--ingest-rounds", type=int, default=3, help="ingest runs timed")
    parser.add_argument(
        "--segments", type=int, default=10_000, help="appends to each open partition (0: skip)"
    )
    parser.add_argument(
        "--only-segments", action="store_true", help="run only the open-partition benchmark"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trace-bench-commit-"))
    pg = PostgresServer(work / "pg", free_port())
    s3 = MotoS3Server(free_port())
    try:
        pg.start()
        pg.ensure_databases(("trace_state",))
        pg.migrate({"trace_state": "state"})
        s3.start()
        s3.create_buckets(["trace-datasets"])
        os.environ.update(s3.env())
        versions = VersionStore(engine_for(pg.dsn("trace_state")))
        store = s3_store("trace-datasets", endpoint_url=s3.endpoint_url)
        with DatasetWriter(store, versions) as writer:
            if args.segments:
                _say(f"open partitions: {args.segments} one-block appends to each of two")
                points = measure_segments(store, versions, writer, args.segments)
                print(
                    "segments: "
                    + " ".join(
                        f"at_{p.segments}: append_p50_ms={p.append_p50_ms:.2f} "
                        f"append_p99_ms={p.append_p99_ms:.2f} read_ms={p.read_ms:.0f} "
                        f"compacted_read_ms={p.compacted_read_ms:.0f};"
                        for p in points
                    ),
                    flush=True,
                )
            if args.only_segments:
                return 0
            _say(f"{args.commits} replace and {args.commits} append commits, one at a time")
            times = measure_latency(writer, args.commits, args.partitions, args.rows)
            replace_ms = [t * 1000 for t in times["replace"]]
            append_ms = [t * 1000 for t in times["append"]]
            stage_ms = [t * 1000 for t in times["stage"]]
            tenth = max(args.commits // 10, 1)
            for name, values in (("replace", replace_ms), ("append", append_ms)):
                first, last = values[:tenth], values[-tenth:]
                _say(
                    f"{name:<8} commit p50 {_percentile(values, 0.5):6.2f} ms  "
                    f"p90 {_percentile(values, 0.9):6.2f} ms  p99 {_percentile(values, 0.99):6.2f}"
                    f" ms  max {max(values):6.2f} ms  (p50 of the first {tenth}: "
                    f"{_percentile(first, 0.5):.2f} ms, of the last {tenth}: "
                    f"{_percentile(last, 0.5):.2f} ms)"
                )
            _say(
                f"staging (begin attempt + upload + verify, excluded above) p50 "
                f"{_percentile(stage_ms, 0.5):.2f} ms"
            )
            sequential = len(replace_ms) / (sum(replace_ms) / 1000)
            concurrent = measure_throughput(writer, args.writers, args.per_writer, args.rows)
            _say(
                f"throughput: {sequential:.0f} commits/s from one writer, {concurrent:.0f} "
                f"commits/s from {args.writers} writers on distinct partitions of one dataset"
            )
        share, shares, commits = measure_ingest_share(pg, s3, work, args)
        _say(
            f"ingest: {commits} commits per backfill run; commit share median {share:.4f} "
            f"(min-max {min(shares):.4f}-{max(shares):.4f}); target < 0.05"
        )
        print(
            f"commit: replace_p50_ms={_percentile(replace_ms, 0.5):.2f} "
            f"replace_p99_ms={_percentile(replace_ms, 0.99):.2f} "
            f"append_p50_ms={_percentile(append_ms, 0.5):.2f} "
            f"commits_per_s={concurrent:.0f} ingest_share={share:.4f}"
        )
    finally:
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
