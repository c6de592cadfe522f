"""The head follower against real services: a dedicated anvil mining sub-second blocks with
live traffic, PostgreSQL, and moto (S3 for the lake, SQS for the alert buffer).

The chain (one per module) is anvil without automine; a miner thread sends a few native
transfers between anvil's unlocked dev accounts and mines a block every `BLOCK_TIME_S`, so
anvil's `finalized` (latest - 64) and `safe` (latest - 32) heads move like a live chain's.
Tests can hold the miner (`chain.held()`) to act on a still chain (a reorg at an exact depth).

Each test gets a `Lake` of its own: a fresh state and data database, a bucket, an SQS queue,
and the settings of a follower at a given range size. The follower runs as
`python -m trace_assets.head` in its own process group (so it can be SIGKILLed); sealing a
range is its Dagster run (raw_chain, the derived datasets and alert_evaluations for the
partition key), materialised in process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa

from infra.devnet.compile import load_artifact
from infra.devnet.generate import encode_constructor
from infra.local.query_service import settings_env
from infra.local.services import AnvilNode, MotoS3Server, PostgresServer, free_port
from tests.conftest import CHAIN_ID, NewDatabase
from trace_assets.alerts.assets import alert_evaluations
from trace_assets.definitions import build_resources
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.head.follower import HEAD_DATASETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_resources.alert_pipeline import tables as alert_tables
from trace_resources.alert_pipeline.rules import RuleStore, StoredRule, parse_rule
from trace_resources.registry import arrow_schema, declarations
from trace_resources.settings import Settings
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.records import VersionRecord
from trace_resources.storage.state import dispose_engine, engine_for
from trace_resources.storage.version_store import VersionStore

ROOT = Path(__file__).resolve().parents[2]
BLOCK_TIME_S = 0.2
FINALITY = 64  # anvil: finalized = latest - 64
SAFETY = 32  # anvil: safe = latest - 32
SECRET = "head-webhook-secret-0123456789abcdef"
WATCHED = "0x" + "5a" * 20  # an address no dev account is: only the tests send to it
_counter = itertools.count()

PARTITIONED_DERIVED = [a for a in DERIVED_ASSETS if a.partitions_def is not None]
SEALING_ASSETS = [raw_chain, *PARTITIONED_DERIVED, alert_evaluations]


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = 120.0,
    detail: Callable[[], object] = lambda: "",
) -> None:
    """Poll until `predicate()` (a deadline only against hangs: nothing asserts a duration)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}: {detail()}"
            )
        time.sleep(0.1)


# -- the chain ---------------------------------------------------------------------------------


class Chain:
    """anvil with a miner thread: a block every BLOCK_TIME_S with a few native transfers."""

    def __init__(self, node: AnvilNode) -> None:
        self.node = node
        self.accounts: list[str] = node.rpc("eth_accounts")
        self._lock = threading.Lock()  # held while mining a block (and by `held()`)
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._rng = random.Random(10143)
        self._thread = threading.Thread(target=self._mine_loop, name="head-miner", daemon=True)
        self.error: BaseException | None = None
        self.token: str | None = None

    @property
    def url(self) -> str:
        return self.node.url

    def rpc(self, method: str, params: list[Any] | tuple[Any, ...] = ()) -> Any:
        return self.node.rpc(method, params, timeout=30.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def deploy_token(self) -> None:
        """Deploy the devnet's ERC-20 (TraceToken) from dev account 8, which then holds the
        supply the miner's token transfers move."""
        artifact = load_artifact("TraceToken")
        data = "0x" + str(artifact["bytecode"])[2:]
        data += encode_constructor("Head", "HEAD", 18, 10**30)
        with self._lock:
            tx = self.rpc(
                "eth_sendTransaction",
                [{"from": self.accounts[8], "data": data, "gas": hex(3_000_000)}],
            )
            self.rpc("evm_mine")
        self.token = str(self.rpc("eth_getTransactionReceipt", [tx])["contractAddress"])

    def _traffic(self) -> None:
        for _ in range(self._rng.randint(0, 3)):
            sender, receiver = self._rng.sample(self.accounts[:8], 2)
            value = self._rng.randint(1, 10**15)
            self.rpc("eth_sendTransaction", [{"from": sender, "to": receiver, "value": hex(value)}])
        if self.token is not None and self._rng.random() < 0.5:
            to = self._rng.choice(self.accounts[:8])
            call = "0xa9059cbb" + to[2:].lower().rjust(64, "0")
            call += hex(self._rng.randint(1, 10**20))[2:].rjust(64, "0")
            self.rpc(
                "eth_sendTransaction",
                [{"from": self.accounts[8], "to": self.token, "data": call, "gas": hex(90_000)}],
            )

    def mine(self, blocks: int = 1) -> None:
        """Mine `blocks` blocks with traffic now (as fast as anvil goes)."""
        for _ in range(blocks):
            with self._lock:
                self._traffic()
                self.rpc("evm_mine")

    def _mine_loop(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(BLOCK_TIME_S)
                continue
            try:
                self.mine()
            except BaseException as exc:  # recorded; the tests' waits report it
                self.error = exc
                return
            self._stop.wait(BLOCK_TIME_S)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The miner mines nothing inside the block (`mine` still does)."""
        self._paused.set()
        try:
            with self._lock:  # a block being mined is finished
                pass
            yield
        finally:
            self._paused.clear()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No block is mined inside the block (the chain stands still)."""
        with self._lock:
            yield

    def send(self, to: str, value: int, sender: int = 9) -> str:
        """A native transfer from dev account `sender` (the miner's traffic uses 0..7),
        mined into the next block; its transaction hash."""
        return str(
            self.rpc(
                "eth_sendTransaction",
                [{"from": self.accounts[sender], "to": to, "value": hex(value)}],
            )
        )

    def receipt(self, tx_hash: str) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def mined() -> bool:
            found["r"] = self.rpc("eth_getTransactionReceipt", [tx_hash])
            return bool(found["r"])

        wait_for(mined, f"transaction {tx_hash} mined", 60, lambda: self.error)
        return found["r"]

    def head(self, tag: str) -> int:
        return int(self.rpc("eth_getBlockByNumber", [tag, False])["number"], 16)

    def wait_finalized(self, number: int, timeout_s: float = 120) -> None:
        wait_for(
            lambda: self.head("finalized") >= number,
            f"block {number} finalized",
            timeout_s,
            lambda: (self.head("finalized"), self.error),
        )

    def wait_latest(self, number: int, timeout_s: float = 120) -> None:
        wait_for(
            lambda: self.head("latest") >= number,
            f"block {number} mined",
            timeout_s,
            lambda: (self.head("latest"), self.error),
        )

    def block(self, number: int) -> dict[str, Any]:
        return dict(self.rpc("eth_getBlockByNumber", [hex(number), False]))

    def canonical(self, first: int, last: int) -> dict[int, tuple[str, list[str]]]:
        """number -> (hash, transaction hashes in order), as the node says now."""
        out = {}
        for number in range(first, last + 1):
            block = self.block(number)
            out[number] = (block["hash"], list(block["transactions"]))
        return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    node = AnvilNode(
        tmp_path_factory.mktemp("head-anvil"),
        free_port(),
        chain_id=CHAIN_ID,
        persist=False,
        extra_args=["--no-mining"],
    )
    node.start()
    miner = Chain(node)
    try:
        miner.deploy_token()
        miner.mine(FINALITY + 2)  # a first finalized block
        miner.start()
        yield miner
    finally:
        miner.stop()
        node.stop()


# -- one test's lake ---------------------------------------------------------------------------


class FollowerProcess:
    """`python -m trace_assets.head` in its own session (process group), logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trace_assets.head"],
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until this start logged that it leads (it holds the leader lease)."""
        assert self.proc is not None
        proc = self.proc
        wait_for(
            lambda: self.log().count("follower ready") >= self.starts or proc.poll() is not None,
            "the follower to start",
            60,
            lambda: self.log()[-3000:],
        )
        assert proc.poll() is None, self.log()[-3000:]

    def kill(self) -> None:
        """SIGKILL the whole process group, and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM (the follower finishes its cycle and exits 0), SIGKILL after 60 s."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.proc.returncode
        with contextlib.suppress(ProcessLookupError):  # anything left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        return code


@dataclass
class Lake:
    """One test's databases, bucket and queue, and the settings of its follower."""

    settings: Settings
    env: dict[str, str]
    root: Path
    followers: list[FollowerProcess] = field(default_factory=list)
    instance: dg.DagsterInstance = field(default_factory=dg.DagsterInstance.ephemeral)

    @property
    def range_size(self) -> int:
        return self.settings.range_size

    def versions(self) -> VersionStore:
        return VersionStore(engine_for(self.settings.state_dsn))

    def reader(self) -> DatasetReader:
        store = s3_store(self.settings.bucket_datasets, endpoint_url=self.settings.s3_endpoint_url)
        return DatasetReader(store, self.versions())

    def data_engine(self) -> sa.Engine:
        return alert_tables.data_engine(self.settings.data_dsn)

    def process(self, name: str = "follower") -> FollowerProcess:
        follower = FollowerProcess(self.env, self.root / f"{name}.log")
        self.followers.append(follower)
        return follower

    def rule(self, org: str, rule_id: str, hook_url: str, **extra: Any) -> StoredRule:
        """A watched-addresses rule on WATCHED's native transfers, webhooked to `hook_url`."""
        spec = {
            "org": org,
            "id": rule_id,
            "condition": {
                "kind": "watched_addresses",
                "addresses": [WATCHED],
                "datasets": ["native_transfers"],
            },
            "channels": [
                {
                    "kind": "webhook",
                    "name": "hook",
                    "url": hook_url,
                    "secret": SECRET,
                    "rate_per_s": 1000,
                }
            ],
            **extra,
        }
        return RuleStore(self.data_engine()).create(parse_rule(spec))

    # -- what is committed -------------------------------------------------------------------

    def current(self, dataset: str, key: str) -> VersionRecord | None:
        return self.versions().read.current_versions(dataset, [key]).get(key)

    def last_committed(self, key: str) -> int | None:
        """The newest block committed to the partition's current version of `blocks`."""
        record = self.current("blocks", key)
        if record is None or record.manifest.source is None:
            return None
        return int(record.manifest.source["last"]["number"])

    def wait_committed(self, key: str, number: int, timeout_s: float = 180) -> None:
        def detail() -> object:
            logs = [f.log()[-2000:] for f in self.followers]
            return (self.last_committed(key), logs)

        wait_for(
            lambda: (self.last_committed(key) or -1) >= number,
            f"block {number} committed to {key}",
            timeout_s,
            detail,
        )

    def read(self, dataset: str, key: str) -> pa.Table:
        schema = arrow_schema(declarations()[dataset])
        return self.reader().read(dataset, [key], schema)

    def alerts(self, kind: str = "alert") -> dict[str, dict[str, Any]]:
        """trace_alerts rows of a kind: dedupe_key -> payload."""
        with self.data_engine().connect() as conn:
            rows = conn.execute(
                sa.text("SELECT dedupe_key, payload FROM trace_alerts WHERE kind = :k"),
                {"k": kind},
            ).all()
        return {r.dedupe_key: r.payload for r in rows}

    # -- sealing -----------------------------------------------------------------------------

    def seal(self, key: str) -> dg.ExecuteInProcessResult:
        """The range's Dagster run: raw_chain, the derived datasets and alert_evaluations."""
        assert block_ranges.name is not None
        self.instance.add_dynamic_partitions(block_ranges.name, [key])
        result = dg.materialize(
            SEALING_ASSETS,
            instance=self.instance,
            resources=build_resources(self.settings),
            partition_key=key,
        )
        assert result.success
        return result

    def close(self) -> None:
        for follower in self.followers:
            follower.stop()
        self.instance.dispose()
        dispose_engine(self.settings.state_dsn)
        alert_tables.data_engine(self.settings.data_dsn).dispose()


MakeLake = Callable[..., Lake]


@pytest.fixture
def make_lake(
    chain: Chain,
    postgres: PostgresServer,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    tmp_path: Path,
) -> Iterator[MakeLake]:
    """`make_lake(range_size, **settings)`: a fresh lake; its followers stop at teardown.
    `pg=` another PostgresServer for the state and data databases."""
    made: list[Lake] = []

    def make(range_size: int, pg: PostgresServer | None = None, **overrides: Any) -> Lake:
        n = next(_counter)
        tag = f"head{os.getpid()}_{n}"
        if pg is None:
            state_dsn = new_database(f"{tag}_state", "state")
            data_dsn = new_database(f"{tag}_data", "data")
        else:
            from trace_resources.storage import migrations

            for name, kind in ((f"{tag}_state", "state"), (f"{tag}_data", "data")):
                pg.psql(f'CREATE DATABASE "{name}" OWNER trace')
                migrations.upgrade(pg.dsn(name), kind)  # type: ignore[arg-type]
            state_dsn, data_dsn = pg.dsn(f"{tag}_state"), pg.dsn(f"{tag}_data")
        bucket = f"trace-head-{os.getpid()}-{n}"
        s3_server.s3_client().create_bucket(Bucket=bucket)
        settings = Settings(
            environment="test",
            rpc_url=chain.url,
            chain_id=CHAIN_ID,
            range_size=range_size,
            state_dsn=state_dsn,
            data_dsn=data_dsn,
            object_store="s3",
            s3_endpoint_url=s3_server.endpoint_url,
            bucket_datasets=bucket,
            sqs_endpoint_url=s3_server.endpoint_url,
            alerts_queue=f"head-alerts-{os.getpid()}-{n}",
            alerts_visibility_timeout_s=2,
            rpc_retry_budget_s=20,
            rpc_max_attempts=5,
            head_max_batch_blocks=overrides.pop("head_max_batch_blocks", 50),
            **overrides,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACE_", "DAGSTER_"))}
        env.update(s3_server.env())
        env.update(settings_env(settings))
        env["PYTHONPATH"] = str(ROOT)
        root = tmp_path / tag
        root.mkdir()
        lake = Lake(settings, env, root)
        made.append(lake)
        return lake

    try:
        yield make
    finally:
        for lake in made:
            lake.close()


# -- what a user checks ------------------------------------------------------------------------


def hexed(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def sorted_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """A table's rows as sorted tuples (order-free comparison of two versions)."""
    return sorted(tuple(row.values()) for row in table.to_pylist())


def snapshot(lake: Lake, key: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every head dataset's rows of one partition, as committed now."""
    return {name: sorted_rows(lake.read(name, key)) for name in HEAD_DATASETS}


def assert_range_matches_chain(lake: Lake, chain: Chain, key: str, first: int, last: int) -> None:
    """The partition holds blocks first..last exactly once each, without duplicate
    transactions or logs, and every block's hash and transactions are the chain's."""
    blocks = lake.read("blocks", key)
    numbers = blocks["block_number"].to_pylist()
    assert sorted(numbers) == list(range(first, last + 1)), (first, last, sorted(numbers))
    txs = lake.read("transactions", key)
    tx_hashes = [hexed(h) for h in txs["transaction_hash"].to_pylist()]
    assert len(tx_hashes) == len(set(tx_hashes)), "a transaction appears twice"
    logs = lake.read("logs", key)
    log_ids = list(
        zip(logs["block_number"].to_pylist(), logs["log_index"].to_pylist(), strict=True)
    )
    assert len(log_ids) == len(set(log_ids)), "a log appears twice"
    in_lake: dict[int, tuple[str, list[str]]] = {
        n: (hexed(h), []) for n, h in zip(numbers, blocks["block_hash"].to_pylist(), strict=True)
    }
    ordered = sorted(
        zip(
            txs["block_number"].to_pylist(),
            txs["transaction_index"].to_pylist(),
            tx_hashes,
            strict=True,
        )
    )
    for number, _, tx_hash in ordered:
        in_lake[number][1].append(tx_hash)
    assert in_lake == chain.canonical(first, last)
    chain_logs = chain.rpc("eth_getLogs", [{"fromBlock": hex(first), "toBlock": hex(last)}])
    assert sorted(log_ids) == sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16)) for x in chain_logs
    )
