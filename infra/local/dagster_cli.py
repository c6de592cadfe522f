"""The dagster commands Trace's scripts, benchmarks and tests run, built in one place."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["dagster_bin", "dagster_dev_command", "materialize_command"]


def dagster_bin() -> str:
    """The `dagster` executable of this interpreter's environment."""
    return str(Path(sys.executable).with_name("dagster"))


def dagster_dev_command(port: int) -> list[str]:
    """`dagster dev` of this workspace on loopback (`make dev`, the UI benchmark)."""
    return [dagster_bin(), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]


def materialize_command(select: str, first: str, last: str | None = None) -> list[str]:
    """`dagster asset materialize` of `select` over the ranges `first`..`last` in one run (or
    the one partition `first`), as an operator types it."""
    partitions = (
        ["--partition", first] if last is None else ["--partition-range", f"{first}...{last}"]
    )
    return [
        dagster_bin(),
        "asset",
        "materialize",
        "-m",
        "trace_assets.definitions",
        "--select",
        select,
        *partitions,
    ]
