"""The remote profile of `make bench-ingest` (issue 18): the devnet behind a provider's limits.

A public Monad endpoint answers tens of milliseconds away and limits requests per second and
batch sizes. Here the benchmark's devnet (anvil, the cached state) sits behind
`infra/local/rpc_provider.py` run as a process of its own (so its CPU is nobody's): 30 ms of
latency each way, 25 HTTP requests per second, JSON-RPC batches of at most 100.

Trace: one in-process run of the raw datasets (blocks, transactions, logs) over the window's
ranges, with the endpoint declared with its limits (`TRACE_RPC_ENDPOINTS`), committed to the
S3 API and the registry of a database of its own. cryo: `cryo.collect` of the same three
datasets over the same blocks, with what its README recommends for a rate-limited node: the
endpoint's rate less one (`requests_per_second` 24: cryo does not throttle its one
`eth_chainId` per collect), and as many blocks per `eth_getLogs` as the endpoint allows
(`inner_request_size`). Each contender gets a fresh proxy, whose counters (the most
requests in any one second, refusals) are printed with its time.

CPU: the seconds of CPU the benchmark's own process used during each contender (getrusage;
every thread, the proxy excluded), and for Trace also the S3 API server's and PostgreSQL's
(the node's CPU is excluded on both sides: in production it is another machine's), per 1,000
blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryo
import dagster as dg

from infra.local.services import REPO_ROOT
from trace_assets.definitions import build_resources
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.settings import Settings

LATENCY_MS = 30.0
RPS = 25
BATCH = 100
LOGS_RANGE = 1000


def _say(message: str) -> None:
    sys.stderr.write(f"[bench-ingest] {message}\n")
    sys.stderr.flush()


@dataclass
class ProxyStats:
    http_requests: int
    max_rps: int
    max_batch: int
    refused: dict[str, int]
    calls: dict[str, int]

    def line(self) -> str:
        calls = ", ".join(f"{m} {n}" for m, n in sorted(self.calls.items(), key=lambda i: -i[1]))
        return (
            f"{self.http_requests} HTTP requests, at most {self.max_rps} in one second, "
            f"largest batch {self.max_batch}, refused {self.refused or 'none'}; calls: {calls}"
        )


@contextmanager
def provider(upstream: str) -> Iterator[tuple[str, Callable[[], ProxyStats]]]:
    """The provider proxy as a process of its own; yields its URL and a function that stops it
    and returns what it saw."""
    command = [
        sys.executable,
        "-m",
        "infra.local.rpc_provider",
        upstream,
        "--latency-ms",
        str(LATENCY_MS),
        "--rps",
        str(RPS),
        "--batch",
        str(BATCH),
        "--logs-range",
        str(LOGS_RANGE),
        "--stats-on-exit",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stats: list[ProxyStats] = []

    def stop() -> ProxyStats:
        if not stats:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=30)
            stats.append(ProxyStats(**json.loads(out.strip().splitlines()[-1])))
        return stats[0]

    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        if not first.startswith("provider proxy "):
            raise SystemExit(f"the provider proxy did not start: {first!r}")
        yield first.split()[2], stop
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pids: list[int]) -> float:
    """CPU seconds of these processes and of their children that ended (PostgreSQL's
    backends), read from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(f) for f in fields[11:15]) / ticks  # utime stime cutime cstime
    return total


def _postgres_pids(postmaster: int | None) -> list[int]:
    if postmaster is None:
        return []
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


@dataclass
class Timed:
    seconds: float
    cpu_s: float  # the benchmark process's own
    services_cpu_s: float  # the S3 API server's and PostgreSQL's (Trace only)
    stats: ProxyStats


def time_trace_remote(
    settings: Settings, proxy_url: str, keys: list[str], services: Callable[[], list[int]]
) -> tuple[float, float, float]:
    endpoint = {
        "url": proxy_url,
        "name": "remote",
        "requests_per_second": RPS,
        "max_batch": BATCH,
        "max_logs_range": LOGS_RANGE,
    }
    remote = settings.model_copy(update={"rpc_endpoints": json.dumps([endpoint])})
    instance = dg.DagsterInstance.ephemeral()
    try:
        instance.add_dynamic_partitions(block_ranges.name or "", keys)
        cpu0, services0 = cpu_self(), cpu_of(services())
        started = time.perf_counter()
        result = dg.materialize(
            [raw_chain],
            instance=instance,
            resources=build_resources(remote),
            tags={
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[-1],
            },
        )
        seconds = time.perf_counter() - started
        cpu, services_cpu = cpu_self() - cpu0, cpu_of(services()) - services0
    finally:
        instance.dispose()
    if not result.success:
        raise SystemExit("the remote-profile Trace run failed; its log is above")
    return seconds, cpu, services_cpu


def collect_with_cryo(
    rpc_url: str, first: int, last: int, options: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Bare cryo's three datasets of blocks `first`..`last` as polars frames; `options(dataset)`
    are extra `cryo.collect` settings (the limits it is told by hand)."""
    frames = {}
    for dataset in RAW_DATASETS:
        frames[dataset] = asyncio.run(
            cryo.async_collect(
                dataset,
                blocks=[f"{first}:{last + 1}"],
                rpc=rpc_url,
                output_format="polars",
                include_columns=["all"],
                verbose=False,
                **(options(dataset) if options else {}),
            )
        )
    return frames


def _cryo_limits(window: int) -> Callable[[str], dict[str, Any]]:
    def options(dataset: str) -> dict[str, Any]:
        # one below the endpoint's rate: cryo does not throttle its one eth_chainId per collect
        told: dict[str, Any] = {"requests_per_second": RPS - 1}
        if dataset == "logs":
            told["inner_request_size"] = min(LOGS_RANGE, window)
        return told

    return options


def time_cryo_remote(proxy_url: str, first: int, last: int) -> tuple[float, float]:
    cpu0 = cpu_self()
    started = time.perf_counter()
    collect_with_cryo(proxy_url, first, last, _cryo_limits(last - first + 1))
    return time.perf_counter() - started, cpu_self() - cpu0


def remote_keys(first_block: int, blocks: int, range_size: int) -> list[str]:
    start = first_block - first_block % range_size
    count = max(1, blocks // range_size)
    return [
        BlockRange(start + i * range_size, start + (i + 1) * range_size - 1).key
        for i in range(count)
    ]


def run_remote_profile(
    settings: Settings,
    node_url: str,
    first_block: int,
    blocks: int,
    range_size: int,
    rounds: int,
    services: Callable[[], list[int]],
) -> dict[str, list[Timed]]:
    """Alternated rounds of Trace and cryo behind a fresh provider proxy each."""
    keys = remote_keys(first_block, blocks, range_size)
    first, last = int(keys[0][:12]), int(keys[-1][13:])
    remote = settings.model_copy(update={"range_size": range_size})
    _say(
        f"remote profile: blocks {first}-{last} in {len(keys)} ranges of {range_size}, behind "
        f"a provider proxy ({LATENCY_MS:.0f} ms each way, {RPS} rps, batches of {BATCH})"
    )
    timed: dict[str, list[Timed]] = {"trace": [], "cryo": []}
    # round 0, not counted: anvil reads a loaded state's blocks slowly the first time (the
    # window's, and the finalized blocks Trace's checks probe), which would count against
    # whichever contender reads them first
    for round_number in range(-1, rounds):
        order = ("cryo", "trace") if round_number % 2 == 0 else ("trace", "cryo")
        for name in order:
            with provider(node_url) as (url, stop):
                if name == "trace":
                    seconds, cpu, services_cpu = time_trace_remote(remote, url, keys, services)
                else:
                    seconds, cpu = time_cryo_remote(url, first, last)
                    services_cpu = 0.0
                stats = stop()
            if round_number >= 0:
                timed[name].append(Timed(seconds, cpu, services_cpu, stats))
            label = f"round {round_number + 1}" if round_number >= 0 else "warm-up"
            _say(
                f"remote {label}: {name:<6} {seconds:7.2f} s, CPU {cpu:.2f} s"
                + (f" (+ S3 API and PostgreSQL {services_cpu:.2f} s)" if name == "trace" else "")
            )
            _say(f"        endpoint saw: {stats.line()}")
    return timed


def postgres_and_s3_pids(pg: Any, s3: Any) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        found = _postgres_pids(pg.pid)
        s3_pid = s3.pid
        return found + ([s3_pid] if s3_pid else [])

    return pids
