"""`make bench-scale`: how Trace's cost grows with data (issue 19), against the direct path.

Data: generated raw ranges (`infra/bench/synthetic.py`: ~30 transactions and ~38 logs per
block, ERC-20 Transfer logs with real encodings, blooms and parent links that verify), no
anvil. Services: PostgreSQL (registry and Dagster instance) and the local object store (the
local default, a directory), started in a temporary folder and removed at the end.

At each size (a number of ranges; sizes nest, the ranges of a size are committed once, as
the data grows):
- ingest-side commit: per new range, what the raw ingest step does after extraction:
  `verify_range`, then `_stage_range` of `trace_assets/raw/chain.py` (the three datasets staged
  as Parquet under their attempts, verified, committed in one fenced transaction, row rules
  evaluated), against the same tables written as Parquet directly (pyarrow).
- derived materialisation: one in-process Dagster run (Postgres-backed instance, single-run
  backfill) of erc20_transfers, native_transfers, transaction_fees and contracts over every
  range of the size (reads, transforms, rules, staging, commit), against the same transforms
  over the same committed files read with pyarrow and written as one Parquet file per dataset;
  and Dagster's floor: the same run shape whose assets do nothing.
- query: three scanning queries through the query service (uvicorn, token, sandbox) against the
  same SQL in DuckDB on the same files.

Fits fixed cost + per-row cost (least squares over the sizes, rows = raw rows read) for Trace
and direct; prints `scale: fixed_s=<> per_mrow_s=<> direct_per_mrow_s=<> slope_ratio=<>` for
the derived datasets (slope_ratio = direct per-row / Trace per-row), `scale_floor: ...`,
`scale_ingest: ...` and `scale_query: ...`, a capacity table for Monad mainnet, and draws the
curve (`--plot`, default bench-scale.png beside BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from infra.bench.derived import _empty_asset, _NothingIOManager
from infra.bench.derived import time_trace as time_derived_trace
from infra.bench.ingest import dagster_instance, range_tags
from infra.bench.synthetic import MONAD_BLOCK_S, ChainShape, generate_range
from infra.local.query_service import QueryServer, settings_env
from infra.local.services import REPO_ROOT, PostgresServer, free_port
from trace_assets.derived.assets import PARTITIONED_TRANSFORMS
from trace_assets.partitions import add_finalized_partitions
from trace_assets.raw.chain import _stage_range
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.schemas import RAW_DATASETS
from trace_resources.chain.verify import verify_range
from trace_resources.registry import arrow_schema, declarations
from trace_resources.settings import QuerySettings
from trace_resources.storage.commit import DatasetReader, DatasetWriter, StepIdentity
from trace_resources.storage.io_manager import Staging
from trace_resources.storage.object_store import ObjectStore, local_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.tokens import Keyring, generate_key, issue_token

DERIVED = ("erc20_transfers", "native_transfers", "transaction_fees", "contracts")
TRANSFER = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
QUERIES = {
    "transfers per token": (
        "SELECT token, count(*) AS transfers FROM erc20_transfers GROUP BY 1 ORDER BY 2 DESC "
        "LIMIT 10"
    ),
    "gas and fees": "SELECT count(*), sum(gas_used), sum(gas_price) FROM transactions",
    "Transfer logs per emitter": (
        f"SELECT address, count(*) AS n FROM logs WHERE topic0 = unhex('{TRANSFER}') "
        "GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
    ),
}
# the direct path writes the Parquet Trace writes (`ObjectStore.write_parquet`): same codec and
# row groups, so the comparison is of the work around the bytes, not of the encoding chosen
PARQUET: dict[str, Any] = {"compression": "zstd", "row_group_size": 131_072}
BLOCKS_PER_DAY = round(86_400 / MONAD_BLOCK_S)
PLOT = REPO_ROOT / "bench-scale.png"


def _say(message: str) -> None:
    print(f"[bench-scale] {message}", flush=True)


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass
class Point:
    """The measurements at one size."""

    ranges: int
    raw_rows: int = 0
    derived_rows: int = 0
    raw_bytes: int = 0
    derived_bytes: int = 0
    ingest_s: float = 0.0  # commit of every range of the size (summed over ranges)
    ingest_direct_s: float = 0.0
    trace: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    api: list[float] = field(default_factory=list)
    duck: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else float("nan")


def fit(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares seconds = fixed + per_mrow * rows / 1e6: (fixed, per_mrow).

    Relative residuals (each point weighted by 1 / its seconds): over sizes spanning 100x,
    plain residuals leave the fit to the largest size alone and the fixed cost to its noise;
    weighted, the small sizes set the fixed cost and the large ones the slope.
    """
    x = np.array(rows, dtype=float) / 1e6
    y = np.array(seconds, dtype=float)
    weight = 1 / np.maximum(y, 1e-9)
    design = np.vstack([np.ones_like(x), x]).T * weight[:, None]
    (fixed, slope), *_ = np.linalg.lstsq(design, y * weight, rcond=None)
    return float(fixed), float(slope)


class Bench:
    """The services, the committed data so far and the contenders."""

    def __init__(self, work: Path, pg: PostgresServer, range_size: int, seed: int) -> None:
        self.work = work
        self.range_size = range_size
        self.seed = seed
        self.shape = ChainShape()
        key, _ = generate_key("bench", "HS256")
        self.settings = QuerySettings(
            environment="test",
            range_size=range_size,
            chain_id=self.shape.chain_id,
            state_dsn=pg.dsn("trace_state"),
            object_store="local",
            local_store_root=work / "objectstore",
            query_token_keys=key,
            query_timeout_s=300.0,
            query_memory_limit="4GB",
            query_rate_org_per_s=1e6,
            query_rate_org_burst=1_000_000,
            query_rate_user_per_s=1e6,
            query_rate_user_burst=1_000_000,
        )
        self.store: ObjectStore = local_store(
            self.settings.local_store_root, self.settings.bucket_datasets
        )
        self.versions = VersionStore(engine_for(self.settings.state_dsn))
        self.reader = DatasetReader(self.store, self.versions)
        self.instance = dagster_instance(work / "dagster_home", pg)
        # the ingest step's staging, under a step identity of the benchmark's own
        self.writer = DatasetWriter(self.store, self.versions)
        self.staging = Staging(self.writer, StepIdentity("bench-scale", "raw_chain"))
        self.committed: list[str] = []
        self.raw_rows_by_range: dict[str, int] = {}
        self.direct_root = work / "direct"

    def close(self) -> None:
        self.writer.close()
        self.instance.dispose()

    # ingest side -----------------------------------------------------------------------
    def commit_ranges(self, upto: int) -> tuple[float, float]:
        """Generate (not timed) and commit ranges until `upto` are committed: (Trace seconds,
        direct seconds) for the new ones."""
        trace_s = direct_s = 0.0
        evaluated: dict[str, dict[str, Any]] = {name: {} for name in RAW_DATASETS}
        while len(self.committed) < upto:
            start = len(self.committed) * self.range_size
            block_range = BlockRange(start, start + self.range_size - 1)
            data = generate_range(block_range, self.seed, self.shape)
            started = time.perf_counter()
            verify_range(
                block_range, *(data.tables[name] for name in RAW_DATASETS)
            ).raise_if_incomplete()
            _stage_range(self.staging, data, evaluated=evaluated)
            trace_s += time.perf_counter() - started
            started = time.perf_counter()
            for name in RAW_DATASETS:
                out = self.direct_root / "raw" / name / f"{block_range.key}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(data.tables[name], out, **PARQUET)
            direct_s += time.perf_counter() - started
            failed = [
                o.rule
                for done in evaluated.values()
                for r in done.values()
                for o in r.outcomes
                if o.failing
            ]
            if failed:
                raise SystemExit(f"generated range {block_range.key} fails rules {failed}")
            self.committed.append(block_range.key)
            self.raw_rows_by_range[block_range.key] = sum(t.num_rows for t in data.tables.values())
        return trace_s, direct_s

    # derived ----------------------------------------------------------------------------
    def time_trace(self, keys: list[str]) -> float:
        return time_derived_trace(self.settings, self.instance, keys)

    def files(self, dataset: str, keys: list[str]) -> list[str]:
        records = self.reader.resolve(dataset, keys)
        return [
            self.store.path(f.key) for key in sorted(records) for f in records[key].manifest.files
        ]

    def time_direct(self, keys: list[str], round_number: int) -> tuple[float, int]:
        """The same transforms over the same committed files (resolved before the clock
        starts), read with pyarrow, written as one Parquet file per dataset."""
        inputs = {name: self.files(name, keys) for name in ("blocks", "transactions", "logs")}
        rows = 0
        started = time.perf_counter()
        tables: dict[str, pa.Table] = {}
        for name in DERIVED:
            decl = declarations()[name]
            for up in decl.upstream:
                if up not in tables:
                    tables[up] = pads.dataset(inputs[up], format="parquet").to_table()
            table = PARTITIONED_TRANSFORMS[name](**{u: tables[u] for u in decl.upstream}).cast(
                arrow_schema(decl)
            )
            out = self.direct_root / "derived" / name / f"round-{round_number}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out, **PARQUET)
            rows += table.num_rows
        return time.perf_counter() - started, rows

    def time_floor(self, keys: list[str]) -> float:
        assets = [_empty_asset(name) for name in DERIVED]
        started = time.perf_counter()
        result = dg.materialize(
            assets,
            instance=self.instance,
            resources={"nothing": _NothingIOManager()},
            tags=range_tags(keys),
        )
        seconds = time.perf_counter() - started
        assert result.success
        return seconds

    def committed_size(self, datasets: tuple[str, ...], keys: list[str]) -> tuple[int, int]:
        rows = size = 0
        for name in datasets:
            for record in self.reader.resolve(name, keys).values():
                rows += record.manifest.rows
                size += sum(f.size for f in record.manifest.files)
        return rows, size

    # query ------------------------------------------------------------------------------
    def direct_connection(self) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(":memory:", config={"threads": self.settings.query_threads})
        for name in ("blocks", "transactions", "logs", *DERIVED):
            paths = self.files(name, self.committed)
            conn.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({paths!r})")
        return conn

    def time_queries(self, client: httpx.Client, rounds: int) -> tuple[list[float], list[float]]:
        conn = self.direct_connection()
        api: list[float] = []
        duck: list[float] = []
        try:
            for round_number in range(rounds + 1):  # the first round warms both up
                order = ("api", "direct") if round_number % 2 == 0 else ("direct", "api")
                for contender in order:
                    started = time.perf_counter()
                    for sql in QUERIES.values():
                        if contender == "api":
                            response = client.post("/v1/query", json={"sql": sql})
                            if response.status_code != 200:
                                raise SystemExit(f"query failed: {response.text[:500]}")
                            rows = len(response.json()["rows"])
                        else:
                            rows = len(conn.execute(sql).fetchall())
                        assert rows > 0, (contender, sql)
                    if round_number:
                        (api if contender == "api" else duck).append(time.perf_counter() - started)
        finally:
            conn.close()
        return api, duck


def run(args: argparse.Namespace) -> list[Point]:
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    work = Path(tempfile.mkdtemp(prefix="trace-bench-scale-"))
    pg = PostgresServer(work / "pg", free_port())
    server: QueryServer | None = None
    bench: Bench | None = None
    points: list[Point] = []
    try:
        pg.start()
        pg.ensure_databases(("dagster", "trace_state"))
        pg.migrate({"trace_state": "state"})
        bench = Bench(work, pg, args.range_size, args.seed)
        all_keys = add_finalized_partitions(
            bench.instance, max(sizes) * args.range_size - 1, args.range_size
        )
        token, _ = issue_token(
            Keyring.from_settings(bench.settings),
            bench.settings,
            org="bench",
            subject="bench",
            ttl_s=7200,
        )
        server = QueryServer(settings_env(bench.settings), log_file=work / "query.log").start()
        client = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=600
        )
        warmed = False
        ingest_s = ingest_direct_s = 0.0
        for size in sizes:
            point = Point(size)
            keys = all_keys[:size]
            new_trace, new_direct = bench.commit_ranges(size)
            ingest_s += new_trace
            ingest_direct_s += new_direct
            point.ingest_s, point.ingest_direct_s = ingest_s, ingest_direct_s
            point.raw_rows = sum(bench.raw_rows_by_range[k] for k in keys)
            _say(
                f"{size} range(s), {point.raw_rows:,} raw rows committed; ingest-side commit "
                f"{ingest_s:.2f} s (direct Parquet writes {ingest_direct_s:.2f} s); load {_load()}"
            )
            if not warmed:  # imports, first schema registrations, Dagster's first run
                bench.time_trace(keys)
                bench.time_floor(keys)
                warmed = True
            rounds = (
                args.rounds
                if point.raw_rows <= args.many_rounds_below
                else (2 if point.raw_rows <= 3 * args.many_rounds_below else 1)
            )
            contenders: list[tuple[str, Callable[[int], float]]] = [
                ("trace", lambda _, k=keys: bench.time_trace(k)),
                ("direct", lambda r, k=keys: bench.time_direct(k, r)[0]),
            ]
            for round_number in range(rounds):
                order = contenders if round_number % 2 == 0 else contenders[::-1]
                for name, contender in order:
                    seconds = contender(round_number)
                    getattr(point, name).append(seconds)
                    _say(f"  round {round_number + 1}: derived {name:<6} {seconds:7.2f} s")
                point.floor.append(bench.time_floor(keys))
            point.derived_rows, point.derived_bytes = bench.committed_size(DERIVED, keys)
            _, point.raw_bytes = bench.committed_size(tuple(RAW_DATASETS), keys)
            point.api, point.duck = bench.time_queries(client, rounds)
            _say(
                f"  {size} range(s): derived trace {point.median('trace'):.2f} s, direct "
                f"{point.median('direct'):.2f} s, floor {point.median('floor'):.2f} s; "
                f"{point.derived_rows:,} derived rows; queries api {point.median('api'):.2f} s, "
                f"DuckDB {point.median('duck'):.2f} s; load {_load()}"
            )
            points.append(point)
        client.close()
    finally:
        if server is not None:
            server.stop()
        if bench is not None:
            bench.close()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return points


def report(points: list[Point], args: argparse.Namespace) -> dict[str, Any]:
    rows = [p.raw_rows for p in points]
    fits = {
        name: fit(rows, [p.median(name) for p in points])
        for name in ("trace", "direct", "floor", "api", "duck")
    }
    fits["ingest"] = fit(rows, [p.ingest_s for p in points])
    fits["ingest_direct"] = fit(rows, [p.ingest_direct_s for p in points])
    _say("size table (medians; rounds per size in brackets):")
    _say("  ranges  raw rows    trace s  direct s  floor s  ingest s  query api s  duckdb s")
    for p in points:
        _say(
            f"  {p.ranges:>6} {p.raw_rows:>10,} {p.median('trace'):>8.2f} "
            f"{p.median('direct'):>8.2f} {p.median('floor'):>8.2f} {p.ingest_s:>8.2f} "
            f"{p.median('api'):>10.2f} {p.median('duck'):>9.2f}  [{len(p.trace)}] "
            f"trace min-max {min(p.trace):.2f}-{max(p.trace):.2f}, direct "
            f"{min(p.direct):.2f}-{max(p.direct):.2f}"
        )
    for name, (fixed, slope) in fits.items():
        _say(f"fit {name:<13} fixed {fixed:7.3f} s  per M raw rows {slope:7.3f} s")
    capacity(points, fits, args)
    (fixed, slope), (_, direct_slope) = fits["trace"], fits["direct"]
    floor_fixed = fits["floor"][0]
    _say(
        f"targets: slope_ratio >= 0.9; fixed cost {fixed:.2f} s <= Dagster's floor "
        f"{floor_fixed:.2f} s + 0.2 s = {floor_fixed + 0.2:.2f} s"
    )
    print(
        f"scale_floor: fixed_s={floor_fixed:.3f} per_mrow_s={fits['floor'][1]:.3f}\n"
        f"scale_ingest: per_mrow_s={fits['ingest'][1]:.3f} "
        f"direct_per_mrow_s={fits['ingest_direct'][1]:.3f} "
        f"slope_ratio={fits['ingest_direct'][1] / fits['ingest'][1]:.2f}\n"
        f"scale_query: fixed_s={fits['api'][0]:.3f} per_mrow_s={fits['api'][1]:.3f} "
        f"direct_per_mrow_s={fits['duck'][1]:.3f} "
        f"slope_ratio={fits['duck'][1] / fits['api'][1]:.2f}"
    )
    print(
        f"scale: fixed_s={fixed:.3f} per_mrow_s={slope:.3f} "
        f"direct_per_mrow_s={direct_slope:.3f} slope_ratio={direct_slope / slope:.2f}"
    )
    return {"fits": fits}


def capacity(points: list[Point], fits: dict[str, tuple[float, float]], args: Any) -> None:
    """Rows, bytes, partitions and compute per day of Monad mainnet (300 ms blocks)."""
    last = points[-1]
    blocks = last.ranges * args.range_size
    rows_per_block = last.raw_rows / blocks
    raw_b = last.raw_bytes / last.raw_rows
    derived_b = last.derived_bytes / last.raw_rows  # derived bytes per raw row
    _say(
        f"capacity for Monad mainnet ({BLOCKS_PER_DAY:,} blocks/day at {MONAD_BLOCK_S} s), from "
        f"the measured per-row costs; {raw_b:.0f} raw + {derived_b:.0f} derived bytes per raw "
        "row (Parquet, as committed):"
    )
    _say(
        "  tx/block  raw rows/day  raw GB/day  derived GB/day  ranges/day (x7 datasets)  "
        "commit h/day  derived h/day  (range size; hours of this 2-core box)"
    )
    for factor in (1, 3, 10):
        rows_day = rows_per_block * factor * BLOCKS_PER_DAY
        for range_size in (args.range_size, 10_000):
            ranges_day = BLOCKS_PER_DAY / range_size
            ingest_h = fits["ingest"][1] * rows_day / 1e6 / 3600
            derived_h = (
                fits["trace"][1] * rows_day / 1e6 + max(fits["trace"][0], 0.0) * ranges_day
            ) / 3600  # one run per range, as the automation launches them
            _say(
                f"  {ChainShape().txs_per_block * factor:>8.0f} {rows_day / 1e6:>11.1f} M "
                f"{rows_day * raw_b / 1e9:>10.1f} {rows_day * derived_b / 1e9:>14.1f} "
                f"{ranges_day:>14.1f} ({ranges_day * 7:,.0f} partitions) {ingest_h:>14.2f} "
                f"{derived_h:>18.2f}  ({range_size:,} blocks)"
            )


def plot(points: list[Point], fits: dict[str, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([p.raw_rows for p in points]) / 1e6
    line = np.linspace(0, x.max(), 50)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [
        ("derived: Trace (Dagster run)", "trace", "C0"),
        ("derived: direct", "direct", "C1"),
        ("Dagster's floor (empty run)", "floor", "C7"),
    ]
    for label, name, colour in series:
        axes[0].plot(x, [p.median(name) for p in points], "o", color=colour, label=label)
        fixed, slope = fits[name]
        axes[0].plot(line, fixed + slope * line, "-", color=colour, alpha=0.5)
    axes[0].set_title("Derived materialisation (4 datasets) vs raw rows")
    other = [
        ("ingest-side commit: Trace", [p.ingest_s for p in points], "C2", "ingest"),
        ("ingest-side: direct Parquet", [p.ingest_direct_s for p in points], "C3", "ingest_direct"),
        ("query: service", [p.median("api") for p in points], "C4", "api"),
        ("query: DuckDB direct", [p.median("duck") for p in points], "C5", "duck"),
    ]
    for label, ys, colour, name in other:
        axes[1].plot(x, ys, "o", color=colour, label=label)
        fixed, slope = fits[name]
        axes[1].plot(line, fixed + slope * line, "-", color=colour, alpha=0.5)
    axes[1].set_title("Ingest-side commit and 3 scanning queries vs raw rows")
    for ax in axes:
        ax.set_xlabel("raw rows (millions: blocks + transactions + logs)")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _say(f"curve drawn to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes",
        default="1,5,25,100",
        help="sizes in ranges, comma-separated (default 1,5,25,100: ~0.2M to ~20M raw rows)",
    )
    parser.add_argument("--range-size", type=int, default=3000, help="blocks per range")
    parser.add_argument("--rounds", type=int, default=3, help="rounds at the small sizes")
    parser.add_argument(
        "--many-rounds-below",
        type=int,
        default=2_000_000,
        help="sizes up to this many raw rows get --rounds rounds, up to 3 x this 2, larger 1",
    )
    parser.add_argument("--seed", type=int, default=19, help="the generator's seed")
    parser.add_argument("--plot", type=Path, default=PLOT, help="PNG of the curve")
    parser.add_argument("--json", type=Path, default=None, help="write the points as JSON too")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="report and plot the points of an earlier --json file instead of measuring",
    )
    args = parser.parse_args()
    if args.range_size <= 0 or args.rounds <= 0:
        parser.error("--range-size and --rounds must be positive")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(
            f"--sizes: comma-separated numbers of ranges, e.g. 1,5,25,100 (got {args.sizes!r})"
        )
    if len(set(sizes)) < 2 or min(sizes) <= 0:
        parser.error("--sizes: at least two different positive sizes are needed for a fit")
    started = time.perf_counter()
    if args.from_json is not None:  # report and draw measured points again, measure nothing
        points = [Point(**p) for p in json.loads(args.from_json.read_text())]
    else:
        _say(f"load average at the start: {_load()} on {os.cpu_count()} cores")
        points = run(args)
    fits = report(points, args)["fits"]
    if args.json is not None:
        args.json.write_text(json.dumps([p.__dict__ for p in points], indent=1))
    plot(points, fits, args.plot)
    _say(f"done in {time.perf_counter() - started:.0f} s; load {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
