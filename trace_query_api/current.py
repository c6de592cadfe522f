"""The committed files of current versions, cached between commits.

Only what `ReadModel.current_files` answers is kept: for a dataset and a partition selection
(every partition, or a task token's list), the current version of each partition and its
files. Who may read a dataset (`storage.access`), token revocation and rate limits are decided
on every request as before; pinned versions and snapshots are read from the database as
before; GC protection is unchanged (files this process holds open need no pin, the others are
pinned by `pin_current`, which resolves the current versions again in its transaction).

Invalidation: every pointer move is announced by its own transaction (`pointer_events`), and
the listener drops the moved dataset's entries. Before a request uses the cache it calls
`PointerListener.sync()`, one round trip on the listening connection shared by concurrent
requests: a query therefore sees every commit acknowledged before the request arrived (read
your writes), not merely those whose notification happened to arrive first. While the
listening connection is lost, or a round trip takes over `SYNC_TIMEOUT_S`, the cache is
empty and bypassed (requests read the database) until the listener listens again.

An entry read from the database is kept only if no move of its dataset (and no listener
reset) was heard between the request's sync and the end of its read, so a read that raced a
commit never stores the older version.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from trace_resources.storage.pointer_events import PointerListener
from trace_resources.storage.read_model import CommittedFiles

__all__ = ["CurrentFilesCache", "Selection", "Stamp"]

SYNC_TIMEOUT_S = 0.5

# dataset -> the partition keys a token may read (sorted), or None for all
Selection = Mapping[str, Sequence[str] | None]
_Key = tuple[str, tuple[str, ...] | None]


@dataclass(frozen=True)
class Stamp:
    """What the cache had heard when a request looked: an entry it reads from the database
    afterwards is stored only if nothing newer was heard of its dataset meanwhile."""

    epoch: int
    generations: dict[str, int]


class CurrentFilesCache:
    """`current_files` answers per (dataset, partition selection), dropped on pointer moves."""

    def __init__(
        self,
        engine: sa.Engine,
        max_entries: int = 4096,
        count: Callable[[str, int], None] = lambda source, n: None,
    ) -> None:
        self.max_entries = max_entries
        self.count = count  # (source, datasets): "cache" hits, "database" reads
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, tuple[CommittedFiles, ...]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._epoch = 0
        self.listener = PointerListener(engine, self._moved, self._reset, name="version-cache")

    def start(self) -> CurrentFilesCache:
        self.listener.start()
        return self

    def close(self) -> None:
        self.listener.close()
        self._reset()

    def lookup(self, selection: Selection) -> tuple[dict[str, list[CommittedFiles]], Stamp] | None:
        """The cached answers of the selection's datasets (those cached), and the stamp to
        store the others with; None when the cache cannot be trusted now (read the database,
        store nothing)."""
        if not self.listener.sync(SYNC_TIMEOUT_S):
            self.count("database", len(selection))
            return None
        found: dict[str, list[CommittedFiles]] = {}
        with self._lock:
            stamp = Stamp(self._epoch, {name: self._generations.get(name, 0) for name in selection})
            for name, keys in selection.items():
                key = _key(name, keys)
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[name] = list(entry)
        self.count("cache", len(found))
        self.count("database", len(selection) - len(found))
        return found, stamp

    def store(self, stamp: Stamp, selection: Selection, committed: list[CommittedFiles]) -> None:
        """Keep what the database answered for `selection`, unless a move of the dataset (or a
        reset) was heard since `stamp`."""
        by_dataset: dict[str, list[CommittedFiles]] = {name: [] for name in selection}
        for item in committed:
            by_dataset[item[0]].append(item)
        with self._lock:
            if stamp.epoch != self._epoch:
                return
            for name, items in by_dataset.items():
                if self._generations.get(name, 0) != stamp.generations.get(name):
                    continue
                self._entries[_key(name, selection[name])] = tuple(items)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _moved(self, dataset: str) -> None:
        with self._lock:
            self._generations[dataset] = self._generations.get(dataset, 0) + 1
            for key in [k for k in self._entries if k[0] == dataset]:
                del self._entries[key]

    def _reset(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self._generations.clear()


def _key(name: str, keys: Sequence[str] | None) -> _Key:
    return (name, None if keys is None else tuple(keys))
