"""The schema registry: a dataset's registered schema versions, the fingerprint a commit is
checked by, and the drift between two versions (added, removed, retyped columns).

A commit registers its staged schema here inside its own transaction (`register_schema`);
what is registered is read through the read model (`ReadModel.registered_schema`,
`ReadModel.schema_history`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.errors import SchemaIncompatibleError
from trace_resources.storage import state as t
from trace_resources.storage.records import CommitMode

__all__ = ["breaking_change", "register_schema", "schema_drift", "schema_fingerprint"]


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


def schema_fingerprint(schema: pa.Schema) -> str:
    """Hash of names, types and nullability (not of documentation metadata)."""
    encoded = json.dumps(schema_fields(schema), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def schema_drift(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns added, removed and retyped between two registered schemas."""
    before = {f["name"]: f for f in old}
    after = {f["name"]: f for f in new}
    return {
        "added": [n for n in after if n not in before],
        "removed": [n for n in before if n not in after],
        "retyped": [
            {"column": n, "from": before[n]["type"], "to": after[n]["type"]}
            for n in after
            if n in before and before[n]["type"] != after[n]["type"]
        ],
        "nullability": [
            n for n in after if n in before and before[n]["nullable"] != after[n]["nullable"]
        ],
    }


def breaking_change(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str | None:
    """What makes `new` unreadable beside versions committed under `old` (removed or retyped
    columns, a new non-nullable column, changed nullability), in words; None if compatible."""
    drift = schema_drift(old, new)
    breaking = drift["removed"] + [r["column"] for r in drift["retyped"]]
    added_required = [f["name"] for f in new if f["name"] in drift["added"] and not f["nullable"]]
    if not (breaking or added_required or drift["nullability"]):
        return None
    return (
        f"removed columns {drift['removed'] or 'none'}, retyped "
        f"{[r['column'] for r in drift['retyped']] or 'none'}, new non-nullable "
        f"{added_required or 'none'}, nullability changed {drift['nullability'] or 'none'}"
    )


def _registered(
    conn: sa.Connection, dataset: str, lock: Literal["none", "share", "update"]
) -> tuple[int, sa.Row[Any] | None]:
    """The dataset's current schema version and its registered schema."""
    query = sa.select(t.datasets.c.current_schema_version).where(t.datasets.c.name == dataset)
    if lock != "none":
        query = query.with_for_update(read=lock == "share")
    current_version = conn.execute(query).scalar_one()
    registered = conn.execute(
        sa.select(t.dataset_schemas)
        .where(t.dataset_schemas.c.dataset == dataset)
        .where(t.dataset_schemas.c.schema_version == current_version)
    ).one_or_none()
    return current_version, registered


def register_schema(
    conn: sa.Connection, dataset: str, schema: pa.Schema, mode: CommitMode
) -> tuple[int, dict[str, Any] | None]:
    """Check the staged schema against the registry; keep every version; refuse breaks."""
    fields = schema_fields(schema)
    fingerprint = schema_fingerprint(schema)
    conn.execute(
        pg_insert(t.datasets)
        .values(name=dataset, commit_mode=mode, current_schema_version=1)
        .on_conflict_do_nothing()
    )
    # Commits whose schema matches the registry (nearly all) share the registry row, so
    # commits of different partitions run concurrently; one that registers a schema
    # version takes the row exclusively. Which lock is decided by an unlocked look first,
    # so no transaction upgrades a share lock (two upgrades would deadlock), except when a
    # registration lands between the look and the lock (then Postgres may abort one and
    # the writer retries the commit by its attempt id).
    _, seen = _registered(conn, dataset, "none")
    matches = seen is not None and seen.schema_hash == fingerprint
    current_version, registered = _registered(conn, dataset, "share" if matches else "update")
    if matches and (registered is None or registered.schema_hash != fingerprint):
        current_version, registered = _registered(conn, dataset, "update")
    if registered is None:
        conn.execute(
            t.dataset_schemas.insert().values(
                dataset=dataset,
                schema_version=current_version,
                schema_hash=fingerprint,
                schema_json=fields,
            )
        )
        return current_version, None
    if registered.schema_hash == fingerprint:
        return current_version, None
    drift = schema_drift(registered.schema_json, fields)
    problem = breaking_change(registered.schema_json, fields)
    if problem is not None:
        raise SchemaIncompatibleError(
            f"the data staged for {dataset} does not match its registered schema "
            f"v{current_version}: {problem}. "
            "Keep the old columns and types (new columns must be nullable), or declare a "
            "new dataset"
        )
    new_version = current_version + 1
    conn.execute(
        t.dataset_schemas.insert().values(
            dataset=dataset,
            schema_version=new_version,
            schema_hash=fingerprint,
            schema_json=fields,
            drift=drift,
        )
    )
    conn.execute(
        t.datasets.update()
        .where(t.datasets.c.name == dataset)
        .values(current_schema_version=new_version)
    )
    return new_version, drift
