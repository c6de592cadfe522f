"""Custom-SQL alert rules are an organisation's own code: each runs in a sandbox process with a
time and a memory limit, so one organisation's rule can neither exhaust the evaluating process
nor hold back the other organisations' alerts; it fails, for that range, naming the limit."""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa
import pytest

from trace_assets.alerts.evaluate import RangeData, evaluate_rules
from trace_resources.alert_pipeline.rules import StoredRule, parse_rule
from trace_resources.sandbox.shared import alert_sql_pool
from trace_resources.settings import get_settings

SECRET = "s" * 32
TIMEOUT_S = 2.0

HOSTILE = {
    "spins forever": (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
        "SELECT count(*) AS alert_key FROM r"
    ),
    "cross join of ranges": (
        "SELECT sum(a.range % 7 + b.range % 5) AS alert_key FROM range(100000) a, range(100000) b"
    ),
    "list bomb": "SELECT len(list(i)) AS alert_key FROM range(2000000000) t(i)",
    "string bomb": (
        "SELECT length(string_agg(repeat('x', 1000000), '')) AS alert_key FROM range(5000)"
    ),
    "doubling strings": (
        "WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL SELECT s || s, n + 1 FROM r "
        "WHERE n < 40) SELECT max(length(s)) AS alert_key FROM r"
    ),
    "floods alerts": "SELECT i AS alert_key FROM range(1000000) t(i)",
    "reads the engine's settings": "SELECT count(*) AS alert_key FROM duckdb_settings() "
    "WHERE value LIKE '%/work%' OR value LIKE '%/root%'",
}


def rule(org: str, rule_id: str, sql: str) -> StoredRule:
    spec: dict[str, Any] = {
        "org": org,
        "id": rule_id,
        "condition": {"kind": "custom_sql", "sql": sql},
        "channels": [
            {"kind": "webhook", "name": "h", "url": "http://127.0.0.1:9/", "secret": SECRET}
        ],
    }
    return StoredRule(parse_rule(spec), 1)


def range_data() -> RangeData:
    blocks = pa.table({"block_number": pa.array([100, 101, 102], pa.uint64())})
    return RangeData("000000000100-000000000102", {"blocks": (1, blocks)})


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(autouse=True)
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACE_ALERT_SQL_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.setenv("TRACE_ALERT_SQL_MAX_ROWS", "1000")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_rule_fails_alone_and_the_others_still_alert(name: str) -> None:
    before = rss_mb()
    honest = rule("globex", "big-blocks", "SELECT block_number AS alert_key FROM blocks")
    hostile = rule("acme", "hostile", HOSTILE[name])
    started = time.monotonic()
    evaluation = evaluate_rules([hostile, honest], range_data())
    elapsed = time.monotonic() - started

    if name == "reads the engine's settings":
        # allowed, but it sees no path of the host: no row alerts (count 0 -> one alert of 0)
        assert not evaluation.errors, evaluation.errors
        keys = sorted(m.payload["row"]["alert_key"] for m in evaluation.messages)
        assert keys == [0, 100, 101, 102], keys
        return
    # the hostile rule failed for this range, saying which limit stopped it
    assert set(evaluation.errors) == {hostile.key}, evaluation.errors
    assert evaluation.skipped == {("acme", "hostile")}
    error = evaluation.errors[hostile.key]
    # memory bombs are stopped by the memory limit, or, on a slow machine, by the time limit
    # first: either way by a limit the message names
    memory_or_time = ("TRACE_ALERT_SQL_MEMORY_LIMIT", "TRACE_ALERT_SQL_TIMEOUT_S")
    expected = {
        "spins forever": ("TRACE_ALERT_SQL_TIMEOUT_S",),
        "cross join of ranges": ("TRACE_ALERT_SQL_TIMEOUT_S",),
        "list bomb": memory_or_time,
        "string bomb": memory_or_time,
        "doubling strings": memory_or_time,
        "floods alerts": ("TRACE_ALERT_SQL_MAX_ROWS",),
    }[name]
    assert any(limit in error for limit in expected), error
    # the other organisation's rule was evaluated in the same pass
    assert sorted(m.payload["row"]["alert_key"] for m in evaluation.messages) == [100, 101, 102]
    # stopped at the limit, not whenever the statement would have ended
    assert elapsed < TIMEOUT_S + 10, f"{name}: {elapsed:.1f} s"
    # the evaluating process did not carry the statement's memory
    assert rss_mb() - before < 150, f"{name}: RSS {before:.0f} -> {rss_mb():.0f} MB"


def test_the_rule_sandbox_is_locked_in() -> None:
    """What the rule's process is, seen from outside: another user, another root, no network
    of the host, an address-space limit."""
    pool = alert_sql_pool(get_settings())
    assert pool.wait_ready(60)
    [pid] = pool.pids()
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    with open(f"/proc/{pid}/limits") as limits:
        text = limits.read()
    address_space = next(line for line in text.splitlines() if line.startswith("Max address"))
    assert "unlimited" not in address_space, address_space
    if os.geteuid() == 0:
        with open(f"/proc/{pid}/status") as status:
            uid = next(line for line in status if line.startswith("Uid:")).split()[1]
        assert uid == "65534"  # nobody
        assert os.readlink(f"/proc/{pid}/root") != "/"
