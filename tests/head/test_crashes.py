"""The follower loses nothing and duplicates nothing when it, or PostgreSQL under it, dies at
any point: each cycle is all or nothing, and a restart resumes after the newest committed
block. Two copies, one leader lease: a leader paused (a real SIGSTOP, mid-append: its segments
staged, not committed) beyond its lease is taken over by the standby, the blocks keep coming,
and the old leader, woken with SIGCONT, has its late append refused (logged), writes nothing,
and stands by. (Same chain fixture: one anvil per module.)"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local.services import PostgresServer, free_port
from tests.head.conftest import (
    FINALITY,
    Chain,
    FollowerProcess,
    Lake,
    MakeLake,
    assert_range_matches_chain,
    snapshot,
    wait_for,
)
from trace_resources.chain.ranges import BlockRange, range_containing
from trace_resources.leases import lease_rows
from trace_resources.storage.state import dispose_engine, engine_for

RANGE = 50


def followed_ranges(lake: Lake) -> list[BlockRange]:
    """Every range the follower committed to (it starts at the range the finalized head is in
    when it first commits), in block order."""
    keys = sorted(lake.versions().read.current_versions("blocks"))
    return [BlockRange(int(k[:12]), int(k[13:])) for k in keys]


def check_and_seal(lake: Lake, chain: Chain) -> None:
    """Every range the follower appended to holds each block from its start to the newest
    appended one exactly once, as the chain has it (the open range: up to the finalized head);
    sealing a complete range gives the chain's rows, and the appended ones unchanged.

    (A follower restarted after being down for more than a range resumes at the open range;
    the ranges it passed over, and the rest of one it had partly appended, are the sealing
    runs' work.)"""
    first = followed_ranges(lake)[0]
    if chain.head("finalized") <= first.last:  # make sure the follower crosses a boundary
        chain.mine(first.last + 1 + FINALITY - chain.head("latest"))
    with chain.paused():  # no block past `target` while the followers catch up and stop
        target = chain.head("finalized")
        open_key = range_containing(target, lake.range_size).key
        lake.wait_committed(open_key, target)
        for follower in lake.followers:
            assert follower.stop() == 0
    ranges = followed_ranges(lake)
    skipped = [
        f"{r.start}-{r.last}: {lake.last_committed(r.key)}"
        for r in ranges
        if (lake.last_committed(r.key) or 0) < min(r.last, target)
    ]
    print("ranges the follower left partly appended (resumed past them):", skipped)
    assert ranges[-1].key == open_key
    appended = {}
    for block_range in ranges:
        last = lake.last_committed(block_range.key)
        assert last is not None
        assert_range_matches_chain(lake, chain, block_range.key, block_range.start, last)
        appended[block_range.key] = last
    assert appended[open_key] >= target
    complete = [r for r in ranges if r.last <= appended[open_key]]
    assert complete, "the follower should have crossed a range boundary"
    block_range = complete[-1]
    before = snapshot(lake, block_range.key)
    lake.seal(block_range.key)
    record = lake.current("blocks", block_range.key)
    assert record is not None and record.commit_mode == "replace"
    assert_range_matches_chain(lake, chain, block_range.key, block_range.start, block_range.last)
    if appended[block_range.key] == block_range.last:
        assert snapshot(lake, block_range.key) == before


def test_sigkilled_ten_times_the_follower_appends_every_block_once(
    chain: Chain, make_lake: MakeLake
) -> None:
    # small batches: most kills land in the middle of a cycle (extract, stage or commit)
    lake = make_lake(RANGE, head_max_batch_blocks=4)
    rng = random.Random(2026)
    follower = lake.process()
    kills = 0
    while kills < 10:
        with chain.paused():  # while it boots (seconds on a busy machine): it stays in range
            follower.start()
            follower.wait_ready()
        chain.mine(12)  # behind by 3 batches or more: the kill lands mid-cycle
        time.sleep(rng.uniform(0.05, 1.5))
        follower.kill()
        kills += 1
    assert follower.starts == 10
    assert "follower stopped" not in follower.log()  # each one died by SIGKILL
    follower.start()
    follower.wait_ready()
    check_and_seal(lake, chain)


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test alone (it is killed); requested before `make_lake`,
    so it stops after the lake's followers."""
    pg = PostgresServer(tmp_path / "pg", free_port())
    pg.start()
    try:
        pg.ensure_databases(("dagster",))
        yield pg
    finally:
        pg.stop()


def kill_postgres(pg: PostgresServer) -> None:
    """`pg_ctl stop -m immediate`: every server process quits at once, like a crash (the
    restart replays the WAL)."""
    argv = [pg._tool("pg_ctl"), "stop", "-D", str(pg.data_dir), "-m", "immediate", "-w"]
    stopped = pg._run(pg._pg_argv(argv))
    assert stopped.returncode == 0, stopped.stderr


def test_postgres_killed_mid_append_the_follower_recovers_by_itself(
    private_postgres: PostgresServer, chain: Chain, make_lake: MakeLake
) -> None:
    pg = private_postgres
    lake = make_lake(RANGE, pg=pg, head_max_batch_blocks=4)
    follower = lake.process()
    follower.start()
    follower.wait_ready()
    wait_for(lambda: bool(followed_ranges(lake)), "a first append", 60)
    for _ in range(2):
        chain.mine(20)  # 20 blocks at once: the follower is behind (batches of 4), appending
        # the chain stands still until the follower is back (else, down for longer than a
        # range, it would resume at the open range and leave the rest to the sealing runs)
        with chain.paused():
            behind = chain.head("finalized")
            seen = len(follower.log())
            kill_postgres(pg)
            # a cycle fails, or the lease renewal finds the database gone first
            wait_for(
                lambda seen=seen: any(
                    sign in follower.log()[seen:]
                    for sign in ("cycle failed", "lost the leader lease", "not renewed")
                ),
                "the follower to see the database gone",
                60,
                lambda: follower.log()[-2000:],
            )
            time.sleep(3)
            pg.start()
            dispose_engine(lake.settings.state_dsn)  # this process's connections died too
            lake.wait_committed(range_containing(behind, RANGE).key, behind)
        assert follower.proc is not None and follower.proc.poll() is None  # never restarted
    check_and_seal(lake, chain)


# -- two copies, one leader lease --------------------------------------------------------

LEASE_S = 2.0


def newest_committed(lake: Lake) -> int:
    """The newest block appended to any range (-1: none yet)."""
    keys = lake.versions().read.current_versions("blocks")
    return max((lake.last_committed(k) or -1 for k in keys), default=-1)


def paused(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_a_paused_leader_is_fenced_and_the_standby_keeps_the_blocks_flowing(
    chain: Chain, make_lake: MakeLake
) -> None:
    # batches of up to 100 blocks: the leader's first append catches up with the whole range
    lake = make_lake(
        RANGE, head_max_batch_blocks=100, leader_lease_s=LEASE_S, leader_renew_s=LEASE_S / 4
    )
    # the leader stops itself (SIGSTOP) in its third append, its segments staged and not
    # committed: its first append catches up while the chain stands still, the next two follow
    env = {**lake.env, "TRACE_CRASH_POINT": "head.before_commit@3:stop"}
    leader = FollowerProcess(env, lake.root / "leader.log")
    lake.followers.append(leader)
    standby = lake.process("standby")
    with chain.paused():
        leader.start()
        leader.wait_ready()
        finalized = chain.head("finalized")
        wait_for(lambda: newest_committed(lake) >= finalized, "the leader to catch up", 60)
        standby.start()
        wait_for(lambda: "standing by" in standby.log(), "the standby", 60, standby.log)
    assert leader.proc is not None
    pid = leader.proc.pid
    try:
        wait_for(lambda: paused(pid), "the leader to pause mid-append", 60, leader.log)
        at_pause = newest_committed(lake)
        assert at_pause >= 0, "the leader appended before it paused"

        # the lease runs out; the standby takes it, with the next token, and appends on
        standby.wait_ready()
        wait_for(
            lambda: newest_committed(lake) >= at_pause + 8,
            "the standby to append after the paused leader",
            60,
            lambda: standby.log()[-2000:],
        )
        [lease] = lease_rows(engine_for(lake.settings.state_dsn))
        assert lease.name == f"head-follower:{lake.settings.chain_id}"
        assert lease.token == 2 and lease.holder.startswith("head-follower@")
        assert str(standby.proc.pid if standby.proc else "") in lease.holder

        seen = len(leader.log())
        os.kill(pid, signal.SIGCONT)  # the old leader wakes up and goes on with its append
        wait_for(
            lambda: "standing by" in leader.log()[seen:],
            "the old leader to step down",
            60,
            lambda: leader.log()[-3000:],
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    late = leader.log()[seen:]
    assert "fenced: write refused, nothing written" in late, late[-3000:]
    assert "now held by head-follower@" in late and "with token 2" in late
    [lease] = lease_rows(engine_for(lake.settings.state_dsn))
    assert lease.token == 2  # the old leader did not take the lease back

    with chain.paused():  # the standby (now leader) catches up; both stop
        target = chain.head("finalized")
        lake.wait_committed(range_containing(target, RANGE).key, target)
        assert leader.stop() == 0
        assert standby.stop() == 0
    for block_range in followed_ranges(lake):  # every block once, as the chain has it
        last = lake.last_committed(block_range.key)
        assert last is not None  # (a fresh follower starts at its range's first block)
        assert_range_matches_chain(lake, chain, block_range.key, block_range.start, last)
