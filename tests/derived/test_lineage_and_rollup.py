"""Selective re-materialisation through `trace lineage impacted`, and the rollup folding in a
re-committed range incrementally (only the affected days, only what changed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.derived.conftest import ALL_ASSETS, ROLLUP, Env
from trace_assets import cli
from trace_assets.derived import transforms
from trace_assets.derived.assets import rollup_update
from trace_resources.registry import declarations
from trace_resources.storage.commit import PartitionData

REPO = Path(__file__).resolve().parents[2]


def trace_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("trace")), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_impacted_lists_only_readers_of_the_columns() -> None:
    done = trace_cli("lineage", "impacted", "--dataset", "logs", "--columns", "topic1,data")
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == [
        "erc20_transfers",
        "token_daily_volume",
        "token_holders",
    ]
    done = trace_cli("lineage", "impacted", "--dataset", "transactions", "--columns", "nonce")
    assert done.stdout.splitlines() == ["contracts\tdeployer_nonce,contract_address"]
    done = trace_cli("lineage", "impacted", "--dataset", "logs", "--columns", "block_hash")
    assert done.stdout.startswith("no downstream dataset reads logs.")
    done = trace_cli("lineage", "impacted", "--dataset", "logs", "--columns", "topic9")
    assert done.returncode == 2 and "logs has no column(s) topic9" in done.stderr


def test_launch_rematerialises_only_the_impacted_assets(
    derived_env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = derived_env
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("block_ranges", env.keys)
    s = env.settings
    for name, value in {
        "DAGSTER_HOME": str(home),
        "TRACE_RPC_URL": s.rpc_url,
        "TRACE_CHAIN_ID": str(s.chain_id),
        "TRACE_RANGE_SIZE": str(s.range_size),
        "TRACE_STATE_DSN": s.state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s.s3_endpoint_url or "",
        "TRACE_BUCKET_DATASETS": s.bucket_datasets,
        "TRACE_ENVIRONMENT": "test",
    }.items():
        monkeypatch.setenv(name, value)
    before = {
        d: env.reader.resolve(d) for d in declarations() if declarations()[d].kind == "derived"
    }
    key = env.keys[4]
    code = cli.main(
        [
            "lineage",
            "impacted",
            "--dataset",
            "logs",
            "--columns",
            "topic2",
            "--launch",
            "--partition",
            key,
        ]
    )
    assert code == 0
    # what the launch ran, by Dagster's records: the impacted assets (token_holders reads
    # from_address and to_address too; native_transfers and contracts read no changed column)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launched = {
            step.step_key
            for run in instance.get_runs()
            for step in instance.get_run_step_stats(run.run_id)
        }
        ran = {
            d: [
                (r.asset_materialization.partition, r.asset_materialization.metadata)
                for r in instance.fetch_materializations(dg.AssetKey(d), limit=10).records
                if r.asset_materialization is not None
            ]
            for d in before
        }
    assert launched == {"erc20_transfers", "token_daily_volume", "token_holders"}
    # the logs did not change, so the range's erc20_transfers kept its version (a recorded
    # no-op) and the rollups, seeing no range changed, wrote nothing
    assert {d: [p for p, _ in mats] for d, mats in ran.items()} == {d: [] for d in before} | {
        "erc20_transfers": [key]
    }
    assert ran["erc20_transfers"][0][1]["trace/unchanged"].value is True
    assert {d: env.reader.resolve(d) for d in before} == before


def test_rollup_folds_in_a_recommitted_range(derived_env: Env) -> None:
    env = derived_env
    decl = declarations()["token_daily_volume"]
    assert rollup_update(env.reader, decl) is None  # nothing changed: nothing to do
    key = env.keys[0]
    current = env.reader.read("erc20_transfers", [key])
    dropped = current.slice(0, 25)  # as if these transfers had been decoded wrongly before
    with env.state.writer(env.objects) as writer:
        writer.write("erc20_transfers", key, PartitionData(current.slice(25)))
    result = dg.materialize(
        [*ALL_ASSETS], instance=env.instance, resources=env.resources(), selection=ROLLUP
    )
    assert result.success
    rollup = env.reader.read("token_daily_volume")
    everything = env.reader.read("erc20_transfers")
    versions = env.reader.resolve("erc20_transfers")
    expected = transforms.daily_volume(
        everything, {k: f"{k}@v{r.version}" for k, r in versions.items()}
    ).cast(rollup.schema)
    assert rollup.to_pylist() == expected.to_pylist()
    total = sum(int(v) for v in rollup["volume_string"].to_pylist())
    assert total == sum(int(v) for v in everything["value_string"].to_pylist())
    assert pc.sum(rollup["transfer_count"]).as_py() == everything.num_rows
    assert dropped.num_rows == 25 and everything.num_rows > 0
    tags = {t for r in rollup.to_pylist() for t in r["source_ranges"]}
    assert f"{key}@v{versions[key].version}" in tags
    assert not any(t.startswith(key) and t != f"{key}@v{versions[key].version}" for t in tags)
    assert isinstance(rollup, pa.Table)
