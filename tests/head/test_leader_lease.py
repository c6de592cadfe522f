"""Two copies of the head follower, one leader lease: the leader is paused (a real SIGSTOP, in
the middle of an append: its segments staged, not committed) beyond its lease; the standby takes
over and the blocks keep coming; the old leader, woken with SIGCONT, has its late append
refused (logged), writes nothing, and stands by. Every block is in the lake exactly once, as
the chain has it."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.head.conftest import (
    Chain,
    FollowerProcess,
    Lake,
    MakeLake,
    assert_range_matches_chain,
    wait_for,
)
from trace_resources.chain.ranges import BlockRange, range_containing
from trace_resources.leases import lease_rows
from trace_resources.storage.state import engine_for

RANGE = 50
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
    keys = sorted(lake.versions().read.current_versions("blocks"))
    for key in keys:  # every block once, with the chain's hash, transactions and logs
        block_range = BlockRange(int(key[:12]), int(key[13:]))
        last = lake.last_committed(key)
        assert last is not None
        first = block_range.start if key != keys[0] else _first_appended(lake, key)
        assert_range_matches_chain(lake, chain, key, first, last)


def _first_appended(lake: Lake, key: str) -> int:
    """The first block of the first range the leader appended to (it starts mid-range)."""
    numbers = lake.read("blocks", key)["block_number"].to_pylist()
    return int(min(numbers))
