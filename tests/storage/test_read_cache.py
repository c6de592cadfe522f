"""The read cache of a run's inputs (`ReadCache`, `DatasetIOManager.input_cache_bytes`), on the
real Postgres and the S3 API: a read of the versions read before returns those rows without
reading the files again, and a new current version is read from its own files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import PartitionData, ReadCache
from trace_resources.storage.object_store import ObjectStore

KEY = "000000000000-000000000049"


def data(n: int) -> PartitionData:
    return PartitionData(pa.table({"block_number": pa.array(range(n), pa.uint64())}))


def test_cached_reads_follow_the_current_version(
    objects: ObjectStoreResource, state: StateStoreResource, store: ObjectStore
) -> None:
    reader = state.reader(objects)
    cache = ReadCache(max_bytes=1 << 20)
    with state.writer(objects) as writer:
        first = writer.write("blocks", KEY, data(10))
        assert reader.read("blocks", [KEY], cache=cache).num_rows == 10
        # the version's files gone: only a read that does not open them again still answers
        store.delete(f.key for f in first.version.manifest.files)
        assert reader.read("blocks", [KEY], cache=cache).num_rows == 10
        with pytest.raises(FileNotFoundError):
            reader.read("blocks", [KEY])
        # a new version is another key of the cache: read from its own files
        writer.write("blocks", KEY, data(20))
        assert reader.read("blocks", [KEY], cache=cache).num_rows == 20


def test_a_cache_keeps_no_more_than_its_bytes() -> None:
    small, large = pa.table({"x": list(range(10))}), pa.table({"x": list(range(1000))})
    cache = ReadCache(max_bytes=large.nbytes)
    cache.put("small", small)
    cache.put("large", large)  # the oldest goes to make room
    assert (cache.get("small"), cache.get("large")) == (None, large)
    cache.put("huge", pa.concat_tables([large, large]))  # larger than the cache: not kept
    assert (cache.get("huge"), cache.get("large")) == (None, large)
