"""`make bench-derived`: derived materialisation through Dagster against the same transforms run
directly, alternated in one run.

Setup (not timed): the cached devnet of `bench-ingest` (>= 3,000 blocks) is extracted once
into committed raw ranges on the S3 API (moto server) with the Postgres registry.
Trace: one Dagster run (single-run backfill, in-process, Postgres-backed instance) of
erc20_transfers, native_transfers and contracts over every range: read the committed upstream
files, transform, evaluate every quality rule, stage, verify and commit a version per range.
Direct: the same transform functions over the same committed files read from the S3 API with
pyarrow, written back as one Parquet file per dataset with pyarrow — no rules, no commit.

Also timed: Dagster's own floor, a run of the same shape (three assets over every range, one
check per quality rule) whose assets and IO manager do nothing: no Dagster run of these assets
can take less.

Last line: `derived: trace_rows_per_s=<> direct_rows_per_s=<> ratio=<trace/direct>`, rows being
the derived rows produced (medians of the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import pyarrow.parquet as pq

from infra.bench.ingest import bench_services, range_tags
from trace_assets.definitions import build_resources
from trace_assets.derived.assets import DERIVED_ASSETS, PARTITIONED_TRANSFORMS
from trace_assets.raw.chain import raw_chain
from trace_resources.registry import arrow_schema, declarations
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.settings import Settings


def _say(message: str) -> None:
    print(f"[bench-derived] {message}", flush=True)


PARTITIONED = [a for a in DERIVED_ASSETS if a.partitions_def is not None]


def time_trace(settings: Settings, instance: dg.DagsterInstance, keys: list[str]) -> float:
    resources = build_resources(settings)
    started = time.perf_counter()
    result = dg.materialize(
        [raw_chain, *DERIVED_ASSETS],
        selection=PARTITIONED,
        instance=instance,
        resources=resources,
        tags=range_tags(keys),
    )
    seconds = time.perf_counter() - started
    assert result.success
    return seconds


class _NothingIOManager(dg.IOManager):
    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        return None

    def load_input(self, context: dg.InputContext) -> None:
        return None


def _empty_asset(name: str) -> dg.AssetsDefinition:
    """An asset shaped like `name` (partitions, single-run backfill, one check per rule) that
    reads, computes and writes nothing."""
    rules = declarations()[name].quality
    asset = f"floor_{name}"  # its own key: no events on the real asset's history

    @dg.asset(
        name=asset,
        partitions_def=PARTITIONED[0].partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[dg.AssetCheckSpec(r.name, asset=asset, blocking=r.blocking) for r in rules],
        io_manager_key="nothing",
    )
    def _asset() -> Iterator[Any]:
        for rule in rules:
            yield dg.AssetCheckResult(check_name=rule.name, passed=True)
        yield dg.Output(None)

    return _asset


def time_dagster_floor(instance: dg.DagsterInstance, keys: list[str]) -> float:
    assets = [_empty_asset(name) for name in PARTITIONED_TRANSFORMS]
    started = time.perf_counter()
    result = dg.materialize(
        assets, instance=instance, resources={"nothing": _NothingIOManager()}, tags=range_tags(keys)
    )
    seconds = time.perf_counter() - started
    assert result.success
    return seconds


def time_direct(
    objects: ObjectStoreResource, state: StateStoreResource, keys: list[str], round_number: int
) -> tuple[float, int]:
    reader = state.reader(objects)
    store = objects.datasets()
    started = time.perf_counter()
    rows = 0
    for name, transform in PARTITIONED_TRANSFORMS.items():
        decl = declarations()[name]
        inputs = {up: reader.read(up, keys) for up in decl.upstream}
        table = transform(**inputs).cast(arrow_schema(decl))
        path = store.path(f"bench-direct/{name}/round-{round_number}.parquet")
        with store.fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        rows += table.num_rows
    return time.perf_counter() - started, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=3000, help="devnet traffic blocks")
    parser.add_argument("--range-size", type=int, default=250, help="blocks per partition")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of each")
    args = parser.parse_args()

    with bench_services(args.blocks, args.range_size, "trace-bench-derived-") as bench:
        settings, instance, keys = bench.settings, bench.instance, bench.keys
        resources = build_resources(settings)
        objects, state = resources["objects"], resources["state"]
        assert isinstance(objects, ObjectStoreResource) and isinstance(state, StateStoreResource)
        _say(f"extracting {len(keys)} raw ranges once (not timed) ...")
        assert dg.materialize(
            [raw_chain], instance=instance, resources=resources, tags=range_tags(keys)
        ).success
        upstream_rows = sum(
            state.reader(objects).read(d, keys).num_rows for d in ("logs", "transactions")
        )
        _say(f"{upstream_rows} upstream rows (logs + transactions); {args.rounds} rounds each")

        runs: dict[str, list[float]] = {"trace": [], "direct": []}
        rows_out = 0

        def direct(round_number: int) -> float:
            nonlocal rows_out
            seconds, rows_out = time_direct(objects, state, keys, round_number)
            return seconds

        contenders: list[tuple[str, Callable[[int], float]]] = [
            ("trace", lambda _: time_trace(settings, instance, keys)),
            ("direct", direct),
        ]
        time_trace(settings, instance, keys)  # warm-up (imports, first schema registration)
        for round_number in range(args.rounds):
            order = contenders if round_number % 2 == 0 else contenders[::-1]
            for name, run in order:
                seconds = run(round_number)
                runs[name].append(seconds)
                _say(f"round {round_number + 1}: {name:<6} {seconds:6.2f} s")
        time_dagster_floor(instance, keys)  # warm-up
        floor = statistics.median(time_dagster_floor(instance, keys) for _ in range(3))
        _say(
            f"Dagster's floor: {floor:.2f} s for a run of the same shape whose assets do nothing "
            "(no reads, rules, uploads or commits)"
        )
        committed = sum(
            state.reader(objects).read(name, keys).num_rows for name in PARTITIONED_TRANSFORMS
        )
        assert committed == rows_out, (committed, rows_out)
        direct_s = statistics.median(runs["direct"])
        trace_rate = rows_out / statistics.median(runs["trace"])
        direct_rate = rows_out / direct_s
        spread = {k: f"{min(v):.2f}-{max(v):.2f} s" for k, v in runs.items()}
        _say(f"{rows_out} derived rows per round; min-max per run: {spread}")
        _say(
            "the direct work plus Dagster's floor alone would give "
            f"ratio={direct_s / (direct_s + floor):.2f}"
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        _say(f"load average (1, 5, 15 min): {load} on {os.cpu_count()} cores")
        print(
            f"derived: trace_rows_per_s={trace_rate:.0f} direct_rows_per_s={direct_rate:.0f} "
            f"ratio={trace_rate / direct_rate:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
