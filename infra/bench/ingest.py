"""`make bench-ingest`: Trace's ingest through Dagster against bare cryo, alternated in one run.

Trace: one run materialising blocks, transactions and logs for every range of the devnet, as a
single-run backfill would (in-process executor, Postgres-backed Dagster instance), from RPC to
committed Parquet on the S3 API (moto server on loopback) and the Postgres registry.
cryo: `cryo.collect` of the same blocks for the same three datasets, written as Parquet to
local disk. One untimed round of each goes first (`--warmup`): anvil answers its first reads
of a freshly loaded state slower, which would count against whichever contender ran first.
The devnet (>= 3,000 blocks, ~30 transactions and ~35 logs per block) is generated once and
cached as an anvil state file.

cli: the operator's command, `trace backfill` as a new process (interpreter start included),
launching the run on the running deployment (`dagster dev`, started once as `make dev` starts it)
and following it to its end.

dagster-cli: `dagster asset materialize --select blocks,transactions,logs --partition-range
first...last` as a new process on the same instance (interpreter start, Dagster's import, the
code-location import and the run included): the path without a running deployment (CI).

ui: a backfill of the three over every range launched as the Dagster UI launches it, through
`dagster dev`'s webserver and daemon (started once, as `make dev` starts them, before the
rounds), from the submission to the backfill's completion (`infra/bench/ui_backfill.py`);
with where its time went (daemon ticks, queue, launch, step), from the run's events.

remote (issue 18; `--profiles`): the same datasets over a smaller window of the devnet behind a
provider's limits (30 ms each way, 25 requests/s, batches of 100), Trace in-process against
cryo told the limits, with each side's CPU per 1,000 blocks (`infra/bench/remote.py`).

Last lines: `ingest: trace=<blocks/s> cryo=<blocks/s> ratio=<trace/cryo>`,
`ingest_cli: trace_s=<s> cryo_s=<s> ratio=<cryo_s/trace_s>`, the same for `ingest_dagster_cli`
and `ingest_ui` (medians); with the remote profile, `ingest_remote: trace_s=<s> cryo_s=<s>
ratio=<cryo_s/trace_s>` and `ingest_cpu_per_1000_blocks: ...` for both profiles.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from infra.bench.remote import (
    collect_with_cryo,
    cpu_of,
    cpu_self,
    postgres_and_s3_pids,
    run_remote_profile,
)
from infra.bench.ui_backfill import Breakdown, DagsterDev, run_breakdown, time_ui
from infra.devnet.generate import GENESIS_TIMESTAMP, generate
from infra.local.dagster_cli import materialize_command
from infra.local.services import REPO_ROOT, AnvilNode, MotoS3Server, PostgresServer, free_port
from trace_assets.definitions import build_resources
from trace_assets.partitions import add_finalized_partitions
from trace_assets.raw.chain import raw_chain
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.settings import Settings
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.state import engine_for

CACHE = REPO_ROOT / ".local" / "bench"
REMOTE_DB = "trace_state_remote"  # the remote profile's registry and bucket: its ranges are
REMOTE_BUCKET = "trace-remote"  # smaller than the loopback profile's, over the same blocks
PATHS = ("trace", "cli", "dagster-cli", "ui")
CHAIN_ID = 10143


def _say(message: str) -> None:
    print(f"[bench-ingest] {message}", flush=True)


def devnet_state(blocks: int) -> Path:
    """An anvil state file with `blocks` blocks of traffic (generated once, then reused)."""
    path = CACHE / f"devnet-{blocks}.json"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="trace-bench-gen-"))
    # --prune-history: the states of old blocks are not kept (a reloaded state file has none
    # either); keeping them cost ~1 GB of disk per 1,000 blocks and slowed generation down
    node = AnvilNode(
        work,
        free_port(),
        chain_id=CHAIN_ID,
        state_file=work / "state.json",
        extra_args=["--timestamp", str(GENESIS_TIMESTAMP), "--prune-history"],
    )
    node.start()
    try:
        _say(f"generating a devnet of {blocks} blocks (once; cached in {path}) ...")
        _say(generate(node.url, blocks=blocks, finalize=True).one_line())
    finally:
        node.stop()  # dumps the state file
    shutil.move(work / "state.json", path)
    shutil.rmtree(work, ignore_errors=True)
    return path


def dagster_instance(home: Path, pg: PostgresServer) -> dg.DagsterInstance:
    """A Dagster instance with the deployment's storage (dagster_home/dagster.yaml) on `pg`."""
    deployed = yaml.safe_load((REPO_ROOT / "dagster_home" / "dagster.yaml").read_text())
    storage = deployed["storage"]
    storage["custom"]["config"]["postgres_db"].update(
        username=pg.user,
        password=pg.password,
        hostname="127.0.0.1",
        db_name="dagster",
        port=pg.port,
    )
    home.mkdir(parents=True, exist_ok=True)
    config = {"storage": storage, "telemetry": {"enabled": False}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dg.DagsterInstance.from_config(str(home))


@dataclass
class BenchServices:
    """One benchmark's services: PostgreSQL, the S3 API and anvil with the cached devnet."""

    work: Path
    pg: PostgresServer
    s3: MotoS3Server
    node: AnvilNode
    settings: Settings
    instance: dg.DagsterInstance
    keys: list[str]  # every finalized range, added as partitions


@contextlib.contextmanager
def bench_services(
    blocks: int, range_size: int, prefix: str, extract_concurrency: int = 1
) -> Iterator[BenchServices]:
    """Start the services on free loopback ports in a temporary folder; stop and remove them."""
    state_file = devnet_state(blocks)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    pg = PostgresServer(work / "pg", free_port())
    s3 = MotoS3Server(free_port())
    node = AnvilNode(
        work / "anvil",
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--load-state", str(state_file)],
    )
    try:
        pg.start()
        pg.ensure_databases(("dagster", "trace_state", REMOTE_DB))
        pg.migrate({"trace_state": "state", REMOTE_DB: "state"})
        s3.start()
        s3.create_buckets(["trace-datasets", REMOTE_BUCKET])
        node.start()
        os.environ.update(s3.env())
        settings = Settings(
            environment="test",
            rpc_url=node.url,
            chain_id=CHAIN_ID,
            range_size=range_size,
            state_dsn=pg.dsn("trace_state"),
            object_store="s3",
            s3_endpoint_url=s3.endpoint_url,
            extract_concurrency=extract_concurrency,
        )
        finalized = int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16)
        instance = dagster_instance(work / "dagster_home", pg)
        try:
            keys = add_finalized_partitions(instance, finalized, range_size)
            yield BenchServices(work, pg, s3, node, settings, instance, keys)
        finally:
            instance.dispose()
    finally:
        node.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def range_tags(keys: list[str]) -> dict[str, str]:
    """The tags of one run over the ranges `keys[0]` .. `keys[-1]` (a single-run backfill)."""
    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


def time_trace(settings: Settings, instance: dg.DagsterInstance, keys: list[str]) -> float:
    resources = build_resources(settings)
    started = time.perf_counter()
    result = dg.materialize(
        [raw_chain], instance=instance, resources=resources, tags=range_tags(keys)
    )
    seconds = time.perf_counter() - started
    assert result.success
    return seconds


def settings_env(settings: Settings, home: Path) -> dict[str, str]:
    """The environment an operator's shell has for the dagster CLI: TRACE_* and DAGSTER_HOME."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is not None and isinstance(value, str | int | float | bool | Path):
            env[f"TRACE_{name.upper()}"] = str(value)
    env["DAGSTER_HOME"] = str(home)
    return env


def time_trace_cli(env: dict[str, str], dagster_url: str) -> tuple[float, str, float]:
    """`trace backfill` of the raw datasets over every range on the running deployment, as a
    new process, from its start to its exit after the run ended: (seconds, run id, start as
    wall-clock time)."""
    command = [str(Path(sys.executable).with_name("trace")), "backfill"]
    started_wall = time.time()
    started = time.perf_counter()
    done = subprocess.run(
        command,
        env={**env, "TRACE_DAGSTER_URL": dagster_url},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"`trace backfill` failed (exit {done.returncode}); its output is above")
    run_id = done.stderr.split("launched run ", 1)[1].split(":", 1)[0]
    return seconds, run_id, started_wall


def time_cli(env: dict[str, str], keys: list[str]) -> float:
    """The path without a deployment: `dagster asset materialize` of the raw datasets over
    every range, as a new process (interpreter start and code-location import included)."""
    command = materialize_command("blocks,transactions,logs", keys[0], keys[-1])
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"the CLI backfill failed (exit {done.returncode}); its log is above")
    return seconds


def time_cryo(rpc_url: str, first: int, last: int, out: Path) -> float:
    started = time.perf_counter()
    for dataset, frame in collect_with_cryo(rpc_url, first, last).items():
        frame.write_parquet(out / f"{dataset}.parquet")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=3000, help="devnet traffic blocks (>= 3000)")
    parser.add_argument(
        "--range-size",
        type=int,
        default=1000,
        help="blocks per partition (Monad runs 10,000 per range; 1,000 here)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of each")
    parser.add_argument(
        "--extract-concurrency", type=int, default=1, help="ranges extracted at once"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds of both first (anvil serves its first reads of a loaded state "
        "slower, which would count against whichever contender goes first)",
    )
    parser.add_argument(
        "--paths",
        default="trace,cli,dagster-cli,ui",
        help="the Trace paths timed against cryo, comma-separated: trace (in-process), cli "
        "(`trace backfill` on the running deployment), dagster-cli (`dagster asset "
        "materialize`), ui (a backfill through the webserver and daemon)",
    )
    parser.add_argument(
        "--profiles",
        default="loopback,remote",
        help="loopback (the devnet on loopback) and remote (a window of it behind a "
        "provider's limits: 30 ms each way, 25 requests/s, batches of 100), comma-separated",
    )
    parser.add_argument(
        "--remote-blocks", type=int, default=100, help="blocks of the remote profile's window"
    )
    parser.add_argument(
        "--remote-range-size", type=int, default=50, help="blocks per range, remote profile"
    )
    parser.add_argument("--remote-rounds", type=int, default=2, help="rounds, remote profile")
    args = parser.parse_args()
    profiles = {p.strip() for p in args.profiles.split(",") if p.strip()}
    if not profiles or profiles - {"loopback", "remote"}:
        parser.error(f"--profiles: choose from loopback, remote (got {args.profiles!r})")
    if "loopback" not in profiles:
        args.rounds = args.warmup = 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        parser.error(f"--paths: unknown {unknown or 'none given'}; choose from {', '.join(PATHS)}")

    with contextlib.ExitStack() as stack:
        bench = stack.enter_context(
            bench_services(args.blocks, args.range_size, "trace-bench-", args.extract_concurrency)
        )
        settings, instance, keys = bench.settings, bench.instance, bench.keys
        node, work = bench.node, bench.work
        first, last = int(keys[0][:12]), int(keys[-1][13:])
        blocks = last - first + 1
        _say(
            f"{blocks} blocks in {len(keys)} ranges of {args.range_size}; "
            f"{args.rounds} rounds each, alternated"
        )

        env = settings_env(settings, work / "dagster_home")
        breakdowns: list[Breakdown] = []
        cli_breakdowns: list[Breakdown] = []
        available: dict[str, Callable[[], float]] = {
            "trace": lambda: time_trace(settings, instance, keys),
            "cryo": lambda: time_cryo(node.url, first, last, work),
            "dagster-cli": lambda: time_cli(env, keys),
        }
        if "ui" in paths or "cli" in paths:
            # up for the whole benchmark, as `make dev` is for an operator
            dev = stack.enter_context(DagsterDev(env, bench.pg, work))

            def cli() -> float:
                seconds, run_id, started_wall = time_trace_cli(env, dev.url)
                parts = run_breakdown(instance, run_id, started_wall, started_wall + seconds)
                cli_breakdowns.append(parts)
                _say(f"        cli breakdown: {parts.line(direct=True)}")
                return seconds

            available["cli"] = cli

            def ui() -> float:
                seconds, parts = time_ui(dev, instance, keys, list(RAW_DATASETS))
                breakdowns.append(parts)
                _say(f"        ui breakdown: {parts.line()}")
                return seconds

            available["ui"] = ui
        contenders = [(n, available[n]) for n in ("cryo", *PATHS) if n == "cryo" or n in paths]
        runs: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for round_number in range(args.warmup):
            for name, run in contenders:
                _say(f"warm-up {round_number + 1}: {name:<11} {run():6.2f} s (not counted)")
        breakdowns.clear()
        cli_breakdowns.clear()
        cpu: dict[str, list[float]] = {"trace": [], "cryo": []}
        services = postgres_and_s3_pids(bench.pg, bench.s3)
        for round_number in range(args.rounds):
            order = contenders if round_number % 2 == 0 else contenders[::-1]
            for name, run in order:
                cpu0, services0 = cpu_self(), cpu_of(services())
                seconds = run()
                if name in cpu:  # in-process: this process's CPU is theirs
                    extra = cpu_of(services()) - services0 if name == "trace" else 0.0
                    cpu[name].append(cpu_self() - cpu0 + extra)
                runs[name].append(seconds)
                _say(
                    f"round {round_number + 1}: {name:<11} {seconds:6.2f} s  "
                    f"{blocks / seconds:7.0f} blocks/s"
                )

        summary = {
            r.dataset: r.rows for r in ReadModel(engine_for(settings.state_dsn)).dataset_summaries()
        }
        _say(f"committed rows per dataset (current versions): {summary}")
        spread = {k: f"{min(v):.2f}-{max(v):.2f} s" for k, v in runs.items() if v}
        _say(f"min-max per run: {spread}")
        if breakdowns:
            _say(f"ui breakdown (medians): {Breakdown.median(breakdowns).line()}")
        if cli_breakdowns:
            _say(f"cli breakdown (medians): {Breakdown.median(cli_breakdowns).line(direct=True)}")
        cryo_s = statistics.median(runs["cryo"] or [0.0])
        if "trace" in runs and runs["trace"]:
            trace_rate = blocks / statistics.median(runs["trace"])
            cryo_rate = blocks / cryo_s
            print(
                f"ingest: trace={trace_rate:.0f} cryo={cryo_rate:.0f} "
                f"ratio={trace_rate / cryo_rate:.2f}"
            )
        for path in ("cli", "dagster-cli", "ui"):
            if runs.get(path):
                path_s = statistics.median(runs[path])
                print(
                    f"ingest_{path.replace('-', '_')}: trace_s={path_s:.2f} cryo_s={cryo_s:.2f} "
                    f"ratio={cryo_s / path_s:.2f}"
                )
        if cpu["trace"]:
            per = {k: statistics.median(v) * 1000 / blocks for k, v in cpu.items()}
            print(
                f"ingest_cpu_per_1000_blocks: profile=loopback trace_cpu_s={per['trace']:.2f} "
                f"cryo_cpu_s={per['cryo']:.2f}"
            )
        if "remote" in profiles:
            timed = run_remote_profile(
                settings.model_copy(
                    update={"state_dsn": bench.pg.dsn(REMOTE_DB), "bucket_datasets": REMOTE_BUCKET}
                ),
                node.url,
                first + 1000,  # in the devnet's traffic
                args.remote_blocks,
                args.remote_range_size,
                args.remote_rounds,
                services,
            )
            trace_s = statistics.median(t.seconds for t in timed["trace"])
            remote_cryo_s = statistics.median(t.seconds for t in timed["cryo"])
            remote_blocks = args.remote_blocks - args.remote_blocks % args.remote_range_size
            trace_cpu = statistics.median(t.cpu_s + t.services_cpu_s for t in timed["trace"])
            cryo_cpu = statistics.median(t.cpu_s for t in timed["cryo"])
            print(
                f"ingest_remote: trace_s={trace_s:.2f} cryo_s={remote_cryo_s:.2f} "
                f"ratio={remote_cryo_s / trace_s:.2f}"
            )
            print(
                f"ingest_cpu_per_1000_blocks: profile=remote "
                f"trace_cpu_s={trace_cpu * 1000 / remote_blocks:.2f} "
                f"cryo_cpu_s={cryo_cpu * 1000 / remote_blocks:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
