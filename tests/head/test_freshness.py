"""Freshness is visible: the follower's Prometheus lag, `trace datasets`, and in Dagster the
open range's appends as observations with the block height and the `head_freshness` check;
and the open range stays a few files (background compaction) however many blocks it holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import httpx
import pytest

from infra.local.services import free_port
from tests.head.conftest import Chain, MakeLake, wait_for
from trace_assets.head.follower import HEAD_DATASETS
from trace_resources.freshness import HEAD_FRESHNESS_CHECK
from trace_resources.resources import ChainResource, StateStoreResource
from trace_sensors.freshness import build_head_freshness_sensor

BIN = Path(sys.executable).parent


def _metric(text: str, name: str, dataset: str) -> float:
    prefix = f'{name}{{dataset="{dataset}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"no {prefix!r} in the follower's /metrics")


def _heights(instance: dg.DagsterInstance) -> dict[str, int]:
    """The newest observation's `trace/head_block` of each head dataset."""
    out = {}
    for name in HEAD_DATASETS:
        records = instance.fetch_observations(dg.AssetKey(name), limit=1).records
        if records and records[0].asset_observation is not None:
            out[name] = int(records[0].asset_observation.metadata["trace/head_block"].value)
    return out


def _checks(instance: dg.DagsterInstance) -> dict[str, tuple[bool, dict[str, object]]]:
    """The latest `head_freshness` evaluation of each head dataset: (passed, metadata)."""
    keys = [dg.AssetCheckKey(dg.AssetKey(n), HEAD_FRESHNESS_CHECK) for n in HEAD_DATASETS]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    out = {}
    for key, record in latest.items():
        assert record.event is not None and record.event.dagster_event is not None
        data = record.event.dagster_event.event_specific_data
        out[key.asset_key.to_user_string()] = (
            bool(data.passed),
            {k: getattr(v, "value", v) for k, v in data.metadata.items()},
        )
    return out


def test_lag_is_visible_and_the_open_range_stays_compact(
    chain: Chain, make_lake: MakeLake, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    lake = make_lake(
        10_000,
        head_metrics_port=port,
        head_compact_min_segments=4,
        head_compact_interval_s=0.5,
    )
    follower = lake.process()
    follower.start()
    follower.wait_ready()
    start = chain.head("finalized")
    key = f"{start // 10_000 * 10_000:012d}-{start // 10_000 * 10_000 + 9_999:012d}"
    # at least 12 more finalized blocks, appended one or a few at a time
    chain.wait_finalized(start + 12)
    lake.wait_committed(key, start + 12)

    # Prometheus: the lag of every head dataset, and the blocks appended
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for name in HEAD_DATASETS:
        assert _metric(metrics, "trace_dataset_lag_blocks", name) >= 0
        assert _metric(metrics, "trace_dataset_head_block", name) >= start
    assert "trace_head_blocks_total" in metrics

    # compaction merged the open range's segments: few files, every block once
    def compacted() -> bool:
        record = lake.current("blocks", key)
        return record is not None and len(record.manifest.files) <= 8

    wait_for(compacted, "the open range compacted", 60, lambda: follower.log()[-2000:])
    blocks = lake.read("blocks", key)["block_number"].to_pylist()
    assert sorted(blocks) == list(range(blocks and min(blocks) or 0, max(blocks) + 1))
    assert len(blocks) == len(set(blocks))
    assert "compacted blocks" in follower.log()

    # `trace datasets`: each head dataset with its head block and lag
    listed = subprocess.run(
        [str(BIN / "trace"), "datasets"], env=lake.env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:] if line}
    for name in ("blocks", "transactions", "native_transfers"):
        head, lag = int(lines[name][5]), int(lines[name][6])
        assert head >= start + 12 and lag >= 0, listed.stdout
    assert "behind the finalized head" in listed.stdout

    # Dagster: observations with the block height, and the freshness check passing
    resources = {
        "chain": ChainResource(rpc_url=chain.url, chain_id=10143, range_size=10_000),
        "state": StateStoreResource(dsn=lake.settings.state_dsn),
    }
    sensor = build_head_freshness_sensor(HEAD_DATASETS)
    monkeypatch.setenv("TRACE_HEAD_MAX_LAG_BLOCKS", "20")
    with dg.build_sensor_context(instance=lake.instance, resources=resources) as context:
        sensor.evaluate_tick(context)
        cursor = context.cursor
    heights = _heights(lake.instance)
    assert set(heights) == set(HEAD_DATASETS)
    assert all(h >= start + 12 for h in heights.values())
    assert {n: passed for n, (passed, _) in _checks(lake.instance).items()} == {
        name: True for name in HEAD_DATASETS
    }

    # the follower stops; the chain goes on: the check fails once the lag passes the limit
    follower.stop()
    stopped_at = lake.last_committed(key)
    assert stopped_at is not None
    chain.wait_finalized(stopped_at + 25)
    with dg.build_sensor_context(
        instance=lake.instance, resources=resources, cursor=cursor
    ) as context:
        sensor.evaluate_tick(context)
    newest = _checks(lake.instance)
    assert set(newest) == set(HEAD_DATASETS)
    assert all(not passed for passed, _ in newest.values()), newest
    assert all(int(meta["trace/lag_blocks"]) >= 21 for _, meta in newest.values())  # type: ignore[call-overload]
