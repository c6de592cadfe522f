"""The sandbox pool on its own: real worker processes, real files handed over as descriptors.

What a caller relies on: answers are right whatever the worker has cached; a worker that dies
costs only its own request and is replaced; nothing the worker is handed leaks (descriptors);
answers and streams stay within their byte budgets; the worker is locked in."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_resources.sandbox import (
    FileSource,
    InlineSource,
    SandboxBusy,
    SandboxError,
    SandboxPool,
)


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    # a small decoded-file cache, so that one request's decoding evicts another's tables
    pool = SandboxPool(2, memory_bytes=512 << 20, cache_bytes=400_000)
    assert pool.wait_ready(60)
    yield pool
    pool.close()


def files_of(tmp: Path, name: str, count: int, rows: int = 1000) -> FileSource:
    schema = pa.schema([("n", pa.int64()), ("label", pa.string())])
    paths = []
    for i in range(count):
        path = tmp / f"{name}-{i}.parquet"
        table = pa.table(
            {"n": pa.array(range(i * rows, (i + 1) * rows), pa.int64()), "label": [name] * rows},
            schema=schema,
        )
        pq.write_table(table, path)
        paths.append(path)
    return FileSource(
        name,
        schema,
        [(f"{name}-{i}", p.stat().st_size) for i, p in enumerate(paths)],
        lambda j: os.open(paths[j], os.O_RDONLY),
    )


def page(pool: SandboxPool, sql: str, sources: list, **kw: object) -> pa.Table:  # type: ignore[type-arg]
    with pool.lease(10) as worker:
        result = worker.page(
            sql,
            sources,
            offset=int(kw.get("offset", 0)),  # type: ignore[call-overload]
            limit=int(kw.get("limit", 1000)),  # type: ignore[call-overload]
            max_bytes=int(kw.get("max_bytes", 8 << 20)),  # type: ignore[call-overload]
            timeout_s=float(kw.get("timeout_s", 5)),  # type: ignore[arg-type]
        )
        return result.table


def worker_fds(pool: SandboxPool) -> dict[int, int]:
    return {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in pool.pids()}


def test_answers_are_right_whatever_the_worker_cached(pool: SandboxPool, tmp_path: Path) -> None:
    a = files_of(tmp_path, "a", 6)
    b = files_of(tmp_path, "b", 6)
    for _ in range(4):  # a and b take turns evicting each other's decoded files
        for source, offset in ((a, 0), (b, 0)):
            got = page(pool, f"SELECT count(*) AS c, sum(n) AS s FROM {source.name}", [source])
            assert got.to_pylist() == [{"c": 6000, "s": sum(range(offset, 6000))}]
        both = page(pool, "SELECT count(*) AS c FROM a JOIN b USING (n)", [a, b])
        assert both.to_pylist() == [{"c": 6000}]


def test_more_files_than_a_worker_used_to_hold_open(pool: SandboxPool, tmp_path: Path) -> None:
    many = files_of(tmp_path, "many", 300, rows=10)
    got = page(pool, "SELECT count(*) AS c, count(DISTINCT n) AS d FROM many", [many])
    assert got.to_pylist() == [{"c": 3000, "d": 3000}]


def test_no_descriptor_outlives_its_request(pool: SandboxPool, tmp_path: Path) -> None:
    source = files_of(tmp_path, "fd", 20, rows=5000)  # lazily scanned: 20 descriptors held
    page(pool, "SELECT 1", [])
    before = worker_fds(pool)
    for sql in (
        "SELECT count(*) FROM fd",
        "SELECT no_such_column FROM fd",  # fails after the descriptors arrived
        "SELECT * FROM fd WHERE n = 7",
    ):
        try:
            page(pool, sql, [source])
        except SandboxError as exc:
            assert exc.kind == "invalid_sql", exc
    assert worker_fds(pool) == before


def test_a_killed_worker_fails_only_its_request_and_is_replaced(
    pool: SandboxPool, tmp_path: Path
) -> None:
    source = files_of(tmp_path, "k", 2)
    outcome: dict[str, object] = {}
    leased = threading.Event()

    def slow() -> None:
        with pool.lease(10) as worker:
            outcome["pid"] = worker.pid
            leased.set()
            try:
                worker.page(
                    "SELECT count(*) FROM range(100000000000)",
                    [],
                    offset=0,
                    limit=10,
                    max_bytes=1 << 20,
                    timeout_s=30,
                )
            except SandboxError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    assert leased.wait(10)
    time.sleep(0.3)
    victim = int(outcome["pid"])  # type: ignore[call-overload]
    os.kill(victim, signal.SIGKILL)
    # meanwhile the other worker answers
    assert page(pool, "SELECT count(*) AS c FROM k", [source]).to_pylist() == [{"c": 2000}]
    thread.join(10)
    error = outcome["error"]
    assert isinstance(error, SandboxError) and error.kind in ("crashed", "memory"), error
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(pool.pids()) < 2 or victim in pool.pids()):
        time.sleep(0.1)
    assert len(pool.pids()) == 2 and victim not in pool.pids()
    assert page(pool, "SELECT 42 AS x", []).to_pylist() == [{"x": 42}]


def test_a_file_that_can_not_be_opened_fails_the_request_not_the_pool(
    pool: SandboxPool, tmp_path: Path
) -> None:
    good = files_of(tmp_path, "g", 2)

    def vanished(j: int) -> int:
        raise FileNotFoundError("garbage-collected")

    gone = FileSource("gone", good.schema, [("gone-0", 100), ("gone-1", 100)], vanished)
    with pytest.raises(FileNotFoundError):
        page(pool, "SELECT count(*) FROM gone", [gone])
    assert page(pool, "SELECT count(*) AS c FROM g", [good]).to_pylist() == [{"c": 2000}]


def test_pages_and_streams_stay_within_their_byte_budget(pool: SandboxPool) -> None:
    sql = "SELECT i, repeat('x', 100000) AS s FROM range(100) t(i)"
    with pool.lease(10) as worker:
        first = worker.page(sql, [], offset=0, limit=100, max_bytes=1_000_000, timeout_s=5)
    assert 0 < first.table.num_rows < 100 and first.has_more and first.byte_limited
    assert first.table.nbytes <= 1_000_000
    with pool.lease(10) as worker:
        batches = list(worker.stream(sql, [], max_batch_bytes=500_000, timeout_s=5))
    assert sum(b.num_rows for b in batches) == 100
    assert all(b.nbytes <= 500_000 for b in batches)
    with pool.lease(10) as worker, pytest.raises(SandboxError) as raised:
        worker.page(
            "SELECT repeat('x', 3000000) AS s",
            [],
            offset=0,
            limit=1,
            max_bytes=1_000_000,
            timeout_s=5,
        )
    assert raised.value.kind == "too_large"


def test_inline_tables_and_a_busy_pool(pool: SandboxPool) -> None:
    table = pa.table({"v": [1, 2, 3]})
    assert page(pool, "SELECT sum(v) AS s FROM t", [InlineSource("t", table)]).to_pylist() == [
        {"s": 6}
    ]
    with pool.lease(10), pool.lease(10), pytest.raises(SandboxBusy):
        with pool.lease(0.2):
            pass


def test_a_worker_is_locked_in(pool: SandboxPool) -> None:
    pid = pool.pids()[0]
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    row = {line[:26].strip(): line[26:].split() for line in limits[1:]}
    assert row["Max address space"][0] != "unlimited"
    assert row["Max file size"][0] == "0"
    if os.geteuid() != 0:
        pytest.skip("not root: no chroot and no user switch to check")
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nUid:\t65534\t65534\t65534\t65534" in status
    assert os.readlink(f"/proc/{pid}/root") != "/"
    # nothing to read in its root
    with pytest.raises(SandboxError) as raised:
        page(pool, "SELECT * FROM read_text('/etc/passwd')", [])
    assert raised.value.kind == "not_allowed"


def test_a_long_statement_yields_the_cpu_and_gets_it_back(pool: SandboxPool) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: the service can not give a worker its priority back")

    def nices(pid: int) -> set[int]:
        out = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            out.add(int(stat.rsplit(")", 1)[1].split()[16]))
        return out

    seen: dict[str, set[int]] = {}
    with pool.lease(10) as worker:

        def watch() -> None:
            time.sleep(0.1)
            seen["early"] = nices(worker.pid)
            time.sleep(0.6)
            seen["late"] = nices(worker.pid)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with pytest.raises(SandboxError):
            worker.page(
                "SELECT count(*) FROM range(100000000000) t(i) WHERE i % 7 = 3",
                [],
                offset=0,
                limit=1,
                max_bytes=1 << 20,
                timeout_s=1.5,
            )
        watcher.join()
        assert seen == {"early": {0}, "late": {19}}
        assert nices(worker.pid) == {0}  # the next request runs at normal priority
