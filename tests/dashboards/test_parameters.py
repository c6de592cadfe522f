"""Parameter values become typed SQL literals built from the parsed value, never from the
caller's text: what each type gives, and what each refuses."""

from __future__ import annotations

import pytest

from trace_query_api.dashboards import InvalidDashboardError, ParameterSpec, literal, render_sql


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("block", 12345, "CAST(12345 AS BIGINT)"),
        ("block", " 7 ", "CAST(7 AS BIGINT)"),
        ("integer", "-3", "CAST(-3 AS BIGINT)"),
        ("date", "2026-01-02", "CAST('2026-01-02' AS DATE)"),
        ("timestamp", "2026-01-02T03:04:05Z", "CAST('2026-01-02 03:04:05+00:00' AS TIMESTAMPTZ)"),
        (
            "timestamp",
            "2026-01-02T05:04:05+02:00",
            "CAST('2026-01-02 03:04:05+00:00' AS TIMESTAMPTZ)",
        ),
        ("timestamp", "2026-01-02 03:04", "CAST('2026-01-02 03:04:00+00:00' AS TIMESTAMPTZ)"),
        ("address", "0x" + "AB" * 20, "from_hex('" + "ab" * 20 + "')"),
        ("address", None, "CAST(NULL AS BLOB)"),
        ("date", "", "CAST(NULL AS DATE)"),
    ],
)
def test_values_become_typed_literals(kind: str, value: object, expected: str) -> None:
    assert literal(kind, value, "p") == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("block", "1 OR 1=1"),
        ("block", True),
        ("block", 2**63),
        ("integer", "1e3"),
        ("date", "2026-01-02'); SELECT 1; --"),
        ("date", 20260102),
        ("timestamp", "yesterday"),
        ("timestamp", "9999-12-31T23:59:59-01:00"),  # past the last timestamp in UTC
        ("address", "0x" + "ab" * 19),
        ("address", "0x" + "zz" * 20),
        ("address", "0x" + "ab" * 20 + "'"),
    ],
)
def test_anything_else_is_refused(kind: str, value: object) -> None:
    with pytest.raises(InvalidDashboardError) as refused:
        literal(kind, value, "p")  # type: ignore[arg-type]
    assert "parameter 'p'" in refused.value.message


def test_placeholders_take_the_value_then_the_default_then_null() -> None:
    parameters = [
        ParameterSpec(name="from_block", type="block", default=10),
        ParameterSpec(name="day", type="date"),
    ]
    sql = "SELECT {{ from_block }}, {{day}}, '{{from_block}}'"
    assert render_sql(sql, parameters, {}) == (
        "SELECT CAST(10 AS BIGINT), CAST(NULL AS DATE), 'CAST(10 AS BIGINT)'"
    )
    assert render_sql(sql, parameters, {"from_block": 99, "day": "2026-01-01"}).startswith(
        "SELECT CAST(99 AS BIGINT), CAST('2026-01-01' AS DATE)"
    )
    with pytest.raises(InvalidDashboardError, match="declares no parameter 'week'"):
        render_sql("SELECT {{week}}", parameters, {})
