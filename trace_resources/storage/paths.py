"""Object layout of committed datasets (pure functions).

Each attempt writes under its own prefix; nothing is ever written where a reader looks,
because readers resolve files only from committed manifests. Committed files stay where the
attempt staged them (a manifest points at them), as in Iceberg: a commit moves a pointer,
never bytes.
"""

from __future__ import annotations

import re

__all__ = ["UNPARTITIONED", "attempt_prefix", "data_file_key", "dataset_prefix", "parse_data_key"]

UNPARTITIONED = "__all__"

_DATA_KEY = re.compile(
    r"^(?P<dataset>[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)/partition=(?P<partition>[^/]+)/attempt=(?P<attempt>[0-9a-f-]{36})/"
)


def dataset_prefix(dataset: str) -> str:
    return f"{dataset}/"


def attempt_prefix(dataset: str, partition_key: str, attempt_id: str) -> str:
    return f"{dataset}/partition={partition_key}/attempt={attempt_id}/"


def data_file_key(dataset: str, partition_key: str, attempt_id: str, index: int) -> str:
    return f"{attempt_prefix(dataset, partition_key, attempt_id)}part-{index:05d}.parquet"


def parse_data_key(key: str) -> tuple[str, str, str] | None:
    """(dataset, partition, attempt id) of a data file key, or None if it is not one."""
    match = _DATA_KEY.match(key)
    if match is None:
        return None
    return match.group("dataset"), match.group("partition"), match.group("attempt")
