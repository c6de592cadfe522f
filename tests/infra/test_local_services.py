"""The local services start and stop cleanly, leak no process, and keep their data (the chain,
Postgres state and the object store) across a restart, as `make dev` / `make demo` need."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pyarrow as pa

from infra.local.services import AnvilNode, LocalServices, free_port
from trace_resources.storage.commit import DatasetReader, DatasetWriter, PartitionData
from trace_resources.storage.object_store import local_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting to be reaped has exited already
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_services_keep_data_across_restart(tmp_path: Path) -> None:
    services = LocalServices(
        tmp_path / "local", pg_port=free_port(), anvil_port=free_port(), sqs_port=free_port()
    )
    services.up()
    try:
        env = services.env()
        services.anvil.rpc("anvil_mine", ["0x20"])
        head = services.anvil.rpc("eth_getBlockByNumber", ["0x20", False])["hash"]
        store = local_store(env["TRACE_LOCAL_STORE_ROOT"], "trace-datasets")
        versions = VersionStore(engine_for(env["TRACE_STATE_DSN"]))
        DatasetWriter(store, versions).write(
            "blocks",
            "000000000000-000000000031",
            PartitionData(pa.table({"block_number": pa.array(range(32), pa.uint64())})),
        )
        engine_for(env["TRACE_STATE_DSN"]).dispose()
        # the alert buffer's SQS API answers (its queues are transient: the sink drains them)
        sqs = boto3.client(
            "sqs", endpoint_url=env["TRACE_SQS_ENDPOINT_URL"], region_name="us-east-1"
        )
        assert sqs.create_queue(QueueName="trace-alerts")["QueueUrl"]
        pids = [services.postgres.pid, services.anvil.pid, services.sqs.pid]
        assert all(pid and _alive(pid) for pid in pids)
    finally:
        services.down()
    assert not any(_alive(pid) for pid in pids if pid)
    assert all(not item.running for item in services.status() if item.name != "objectstore")

    # the same root and ports again (never the defaults: a developer's `make dev` may hold them)
    again = LocalServices(
        tmp_path / "local",
        pg_port=services.postgres.port,
        anvil_port=services.anvil.port,
        sqs_port=services.sqs.port,
    )
    again.up()
    try:
        assert again.anvil.rpc("eth_getBlockByNumber", ["0x20", False])["hash"] == head
        env = again.env()
        reader = DatasetReader(
            local_store(env["TRACE_LOCAL_STORE_ROOT"], "trace-datasets"),
            VersionStore(engine_for(env["TRACE_STATE_DSN"])),
        )
        assert reader.read("blocks", ["000000000000-000000000031"]).num_rows == 32
        engine_for(env["TRACE_STATE_DSN"]).dispose()
        # other users (the Python UDFs' uids) can not enter the root: every org's data is there
        assert not (tmp_path / "local").stat().st_mode & 0o007
    finally:
        again.down()


def test_anvil_leaves_no_state_cache_behind(tmp_path: Path) -> None:
    """Past a few hundred blocks anvil writes old states to disk (~1 GB per 1,000 generated
    blocks); by default under ~/.foundry/anvil/tmp, where they outlived every devnet."""
    home_cache = Path.home() / ".foundry" / "anvil" / "tmp"
    before = set(home_cache.iterdir()) if home_cache.exists() else set()
    node = AnvilNode(tmp_path, free_port(), persist=False)
    node.start()
    try:
        node.rpc("anvil_mine", [hex(1000)], timeout=60)
        assert [p.name[:12] for p in node.cache_dir.iterdir()] == ["anvil-state-"]
    finally:
        node.stop()
    assert not node.cache_dir.exists()
    after = set(home_cache.iterdir()) if home_cache.exists() else set()
    assert after == before
