"""Reader pins: the versions a reader is reading, which GC never removes while the pin lives;
and the per-dataset advisory lock that makes pinning atomic with respect to GC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.storage import state as t
from trace_resources.storage.read_model import current_query, expand, find_version
from trace_resources.storage.records import VersionRecord, interval

__all__ = ["Pins", "gc_lock"]

# pg_advisory_xact_lock(class, hashtext(dataset)): GC takes it exclusively while it chooses and
# removes versions, readers take it shared while they pin; so no version is removed between a
# reader resolving it and the reader's pin becoming visible.
_GC_LOCK_CLASS = 72601


def gc_lock(conn: sa.Connection, dataset: str, *, shared: bool) -> None:
    lock = sa.func.pg_advisory_xact_lock_shared if shared else sa.func.pg_advisory_xact_lock
    conn.execute(sa.select(lock(_GC_LOCK_CLASS, sa.func.hashtext(dataset))))


class Pins:
    """Pin current or given versions for a reader; unpin; drop pins of dead readers."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def pin_current(
        self,
        reader_id: str,
        dataset: str,
        partition_keys: Sequence[str] | None,
        ttl_s: float,
    ) -> dict[str, VersionRecord]:
        """Resolve the current versions and pin them, atomically with respect to GC."""
        with self.engine.begin() as conn:
            gc_lock(conn, dataset, shared=True)
            query = current_query(dataset, partition_keys)
            rows = conn.execute(query).all()
            records = {r.partition_key: r for r in expand(conn, rows)}
            self._insert_pins(conn, reader_id, dataset, records.values(), ttl_s)
        return records

    def pin_version(
        self, reader_id: str, dataset: str, partition_key: str, version: int, ttl_s: float
    ) -> VersionRecord:
        """Pin one (possibly superseded) version; FileNotFoundError if it is gone."""
        with self.engine.begin() as conn:
            gc_lock(conn, dataset, shared=True)
            record = find_version(conn, dataset, partition_key, version)
            if record is None:
                raise FileNotFoundError(
                    f"{dataset} partition {partition_key} has no version {version}: it was never "
                    "committed or GC removed it; `trace versions` lists what is kept"
                )
            self._insert_pins(conn, reader_id, dataset, [record], ttl_s)
        return record

    def unpin(self, reader_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(t.pins.delete().where(t.pins.c.reader_id == reader_id))

    @staticmethod
    def _insert_pins(
        conn: sa.Connection,
        reader_id: str,
        dataset: str,
        records: Iterable[VersionRecord],
        ttl_s: float,
    ) -> None:
        values = [
            {
                "reader_id": reader_id,
                "dataset": dataset,
                "partition_key": r.partition_key,
                "version": r.version,
                "expires_at": sa.func.now() + interval(ttl_s),
            }
            for r in records
        ]
        if values:
            statement = pg_insert(t.pins).values(values)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["reader_id", "dataset", "partition_key", "version"],
                    set_={"expires_at": statement.excluded.expires_at},
                )
            )

    def drop_expired(self) -> int:
        """Pins of readers that died without unpinning."""
        with self.engine.begin() as conn:
            return conn.execute(t.pins.delete().where(t.pins.c.expires_at < sa.func.now())).rowcount
