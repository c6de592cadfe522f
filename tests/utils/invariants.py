"""The invariants of the commit protocol, checked against the real Postgres and object store
after every fault-injection case:

- every pointer names an existing version, and it is the newest version of its partition;
- every kept version's manifest lists files that exist with exactly the recorded size and
  sha256 and hold the recorded rows (never a missing or partial object), each file once;
- every file a manifest references was staged by an attempt that committed (a failed, fenced
  or abandoned attempt is never visible);
- append segments carry each key once;
- what a reader sees (`visible_ids`) can be compared with a model of what was committed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from trace_resources.storage import state as t
from trace_resources.storage.commit import DatasetReader
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import parse_data_key
from trace_resources.storage.read_model import expand
from trace_resources.storage.records import Manifest
from trace_resources.storage.version_store import VersionStore

__all__ = ["InvariantReport", "check_invariants", "table_of", "visible_ids"]


@dataclass
class InvariantReport:
    pointers: int = 0
    versions: int = 0
    files_checked: int = 0
    attempts: Counter[str] = field(default_factory=Counter)


def table_of(ids: list[int], writer: str = "w") -> pa.Table:
    """The tests' data: one row per id, tagged with the writer that wrote it."""
    return pa.table(
        {"id": pa.array(ids, pa.int64()), "writer": pa.array([writer] * len(ids), pa.string())}
    )


def check_invariants(
    versions: VersionStore,
    store: ObjectStore,
    datasets: list[str] | None = None,
    verified: dict[str, tuple[int, str, int]] | None = None,
) -> InvariantReport:
    """Check every invariant; raise AssertionError (or FileNotFoundError) on the first breach.

    `verified` (a dict kept across calls) remembers files already read and hashed: objects are
    immutable, so later calls check those by a listing (present, same size) instead of reading
    them again.
    """
    report = InvariantReport()
    pointer_query, version_query = sa.select(t.pointers), sa.select(t.versions)
    if datasets is not None:
        pointer_query = pointer_query.where(t.pointers.c.dataset.in_(datasets))
        version_query = version_query.where(t.versions.c.dataset.in_(datasets))
    with versions.engine.connect() as conn:
        pointers = conn.execute(pointer_query).all()
        rows = conn.execute(version_query).all()
        # open versions' files: their base files and their live segments' (read model)
        manifests = {
            (r.dataset, r.partition_key, r.version): r.manifest for r in expand(conn, rows)
        }
        states = {
            str(r.attempt_id): r.state
            for r in conn.execute(sa.select(t.attempts.c.attempt_id, t.attempts.c.state))
        }
    report.attempts.update(states.values())
    newest: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.dataset, r.partition_key)
        newest[key] = max(newest.get(key, 0), r.version)
    by_version = {(r.dataset, r.partition_key, r.version): r for r in rows}
    for p in pointers:
        report.pointers += 1
        assert (p.dataset, p.partition_key, p.current_version) in by_version, (
            f"pointer {p.dataset}/{p.partition_key} -> v{p.current_version} has no version row"
        )
        assert newest[(p.dataset, p.partition_key)] == p.current_version, (
            f"pointer {p.dataset}/{p.partition_key} is at v{p.current_version}, "
            f"not at the newest version v{newest[(p.dataset, p.partition_key)]}"
        )
    checked: dict[str, tuple[int, str, int]] = {}
    if verified:
        prefixes = [f"{d}/" for d in datasets] if datasets is not None else [""]
        listed = {o.key: o.size for p in prefixes for o in store.list_objects(p)}
        for key, facts in verified.items():
            if listed.get(key) == facts[0]:
                checked[key] = facts
    for r in rows:
        report.versions += 1
        manifest: Manifest = manifests[(r.dataset, r.partition_key, r.version)]
        where = f"{r.dataset}/{r.partition_key} v{r.version}"
        keys = [f.key for f in manifest.files]
        assert len(keys) == len(set(keys)), f"{where} lists a file twice"
        assert manifest.rows == r.row_count and manifest.bytes == r.byte_count, where
        segment_keys = [k for s in manifest.segments for k in s.get("keys") or [s["segment_key"]]]
        assert len(segment_keys) == len(set(segment_keys)), f"{where} repeats a segment key"
        for entry in manifest.files:
            parsed = parse_data_key(entry.key)
            assert parsed is not None and parsed[0] == r.dataset, f"{where}: odd key {entry.key}"
            assert states.get(parsed[2]) == "committed", (
                f"{where} references {entry.key} of attempt {parsed[2]} which is "
                f"{states.get(parsed[2])!r}, not committed"
            )
            if entry.key not in checked:
                data = store.get_bytes(entry.key)  # FileNotFoundError: a missing object
                rows_in_file = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
                checked[entry.key] = (len(data), hashlib.sha256(data).hexdigest(), rows_in_file)
                report.files_checked += 1
            size, digest, rows_in_file = checked[entry.key]
            assert (size, digest, rows_in_file) == (entry.size, entry.sha256, entry.rows), (
                f"{where}: {entry.key} is {size} bytes / {rows_in_file} rows / sha256 {digest}, "
                f"the manifest says {entry.size} / {entry.rows} / {entry.sha256}: a partial or "
                "foreign object"
            )
    if verified is not None:
        verified.update(checked)
    return report


def visible_ids(reader: DatasetReader, dataset: str, partition_key: str) -> list[int]:
    """The ids a reader sees in the current version (sorted, duplicates kept)."""
    table = reader.read(dataset, [partition_key])
    return sorted(table.column("id").to_pylist())
