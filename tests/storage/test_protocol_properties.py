"""A stateful property test of the commit protocol against the real Postgres and S3 API.

Hypothesis drives random sequences of stage / commit (and re-commit) / crash / GC / staging
cleanup / read / pin and unpin of an old version, over a replace dataset with two partitions
and an append dataset, and compares every outcome with a model: which commits must land
(and as which version), which must be refused (fenced, lease expired, abandoned), which are
idempotent no-ops, which versions GC removes, what a reader sees. After every step the
protocol's invariants are checked on the real state and objects.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.utils.invariants import check_invariants, table_of
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import AttemptFencedError, CommitError, VersionRemovedError
from trace_resources.storage import state as t
from trace_resources.storage.commit import (
    DatasetReader,
    DatasetWriter,
    PartitionData,
    StagedPartition,
)
from trace_resources.storage.gc import GarbageCollector, GcPolicy
from trace_resources.storage.object_store import ObjectStore
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.records import VersionRecord
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore

PARTITIONS = ["000000000000-000000000049", "000000000050-000000000099"]
# long histories on one partition (for fences, GC and pins), a little traffic on the other
PARTITION = st.sampled_from([PARTITIONS[0]] * 3 + [PARTITIONS[1]])
MODE = st.sampled_from(["replace", "append"])
MAX_EXAMPLES = 30
STEPS = 40
STATS: Counter[str] = Counter()


@dataclass
class Handle:
    """A staged attempt and what the model knows of it."""

    staged: StagedPartition
    dataset: str
    partition: str
    mode: str
    ids: list[int]
    segment: str | None
    status: str = "staged"  # staged | committed | refused | crashed
    version: int | None = None

    def __repr__(self) -> str:  # readable falsifying examples
        return f"Handle({self.mode} {self.partition[:6]} ids={self.ids[:2]}… {self.status})"


def build_machine(store: ObjectStore, versions: VersionStore) -> type[RuleBasedStateMachine]:
    example_numbers = itertools.count()

    class CommitProtocol(RuleBasedStateMachine):
        handles = Bundle("handles")

        @initialize()
        def setup(self) -> None:
            n = next(example_numbers)
            STATS["examples"] += 1
            self.replace_ds, self.append_ds = f"prop_replace_{n}", f"prop_append_{n}"
            self.writer = DatasetWriter(store, versions, max_rows_per_file=3)
            self.reader = DatasetReader(store, versions)
            self.gc = GarbageCollector(store, versions)
            self.ids = itertools.count()
            self.all: list[Handle] = []
            self.current: dict[tuple[str, str], list[int]] = {}
            self.kept: dict[tuple[str, str], dict[int, list[int]]] = {}
            self.segments: dict[tuple[str, str], set[str]] = {}
            self.latest_fence: dict[tuple[str, str], int] = {}
            self.pins: list[tuple[contextlib.ExitStack, tuple[str, str], VersionRecord]] = []
            self.verified: dict[str, tuple[int, str, int]] = {}

        # -- writers ----------------------------------------------------------------------

        @rule(
            target=handles,
            mode=MODE,
            partition=PARTITION,
            rows=st.integers(1, 5),
            segment=st.integers(0, 2),
        )
        def stage(self, mode: str, partition: str, rows: int, segment: int) -> Handle:
            STATS["stage"] += 1
            dataset = self.replace_ds if mode == "replace" else self.append_ds
            partition = partition if mode == "replace" else UNPARTITIONED
            ids = [next(self.ids) for _ in range(rows)]
            key = f"seg-{segment}" if mode == "append" else None
            staged = stage_one(
                self.writer,
                dataset,
                partition,
                PartitionData(table_of(ids), segment_key=key),
                mode=mode,  # type: ignore[arg-type]
            )
            if mode == "replace":
                self.latest_fence[(dataset, partition)] = staged.attempt.fence
            handle = Handle(staged, dataset, partition, mode, ids, key)
            self.all.append(handle)
            return handle

        @rule(
            target=handles,
            mode=MODE,
            partition=PARTITION,
            rows=st.integers(1, 5),
            segment=st.integers(0, 2),
        )
        def stage_and_commit(self, mode: str, partition: str, rows: int, segment: int) -> Handle:
            """The common path, so that histories grow long enough for GC and pins to matter."""
            handle = self.stage(mode, partition, rows, segment)
            self.commit(handle)
            return handle

        @rule(partition=PARTITION, older_first=st.booleans())
        def two_replace_attempts_race(self, partition: str, older_first: bool) -> None:
            """Two writers of one partition: whichever commits, the older attempt is fenced."""
            older = self.stage("replace", partition, 2, 0)
            newer = self.stage("replace", partition, 3, 0)
            for handle in (older, newer) if older_first else (newer, older):
                self.commit(handle)
            assert (older.status, newer.status) == ("refused", "committed")

        @rule(handle=handles)
        def commit(self, handle: Handle) -> None:
            STATS["commit"] += 1
            key = (handle.dataset, handle.partition)
            mode = handle.mode

            def attempt() -> Any:
                return commit_one(self.writer, handle.staged)

            if handle.status == "committed" and handle.version in self.kept.get(key, {}):
                STATS["recommit (idempotent)"] += 1
                result = attempt()
                assert result.already_committed and result.version.version == handle.version
            elif handle.status == "committed" and mode == "append":
                STATS["recommit of an append whose version GC removed"] += 1
                result = attempt()  # later versions carry its segments: the current one
                assert result.already_committed and result.version.version == max(self.kept[key])
            elif handle.status == "committed":
                STATS["recommit of a version GC removed"] += 1
                with pytest.raises(VersionRemovedError, match="Nothing was written again"):
                    attempt()
            elif handle.status in ("refused", "crashed"):
                STATS["refused (dead attempt)"] += 1
                with pytest.raises(CommitError):
                    attempt()
                handle.status = "refused"
            elif mode == "replace" and handle.staged.attempt.fence != self.latest_fence[key]:
                STATS["refused (fenced)"] += 1
                with pytest.raises(AttemptFencedError, match="newer attempt holds fence"):
                    attempt()
                handle.status = "refused"
                # and it stays refused: retrying a refused (dead) attempt never commits it
                STATS["refused (dead attempt)"] += 1
                with pytest.raises(CommitError):
                    attempt()
            else:
                result = attempt()
                handle.status, handle.version = "committed", result.version.version
                present = self.segments.setdefault(key, set())
                if mode == "append" and handle.segment in present:
                    STATS["append no-op (segment present)"] += 1
                    assert result.already_committed
                    assert result.version.version == max(self.kept[key])
                    return
                STATS["committed"] += 1
                assert not result.already_committed
                versions_of = self.kept.setdefault(key, {})
                expected = max(versions_of, default=0) + 1
                assert result.version.version == expected
                if mode == "append":
                    present.add(handle.segment or "")
                    self.current[key] = self.current.get(key, []) + handle.ids
                else:
                    self.current[key] = list(handle.ids)
                versions_of[expected] = list(self.current[key])

        @rule(data=st.data())
        def commit_pending(self, data: st.DataObject) -> None:
            """Commit an attempt that has not committed (maybe stale, maybe dead)."""
            pending = [h for h in self.all if h.status in ("staged", "crashed")]
            if pending:
                self.commit(data.draw(st.sampled_from(pending)))

        @rule(data=st.data())
        def crash(self, data: st.DataObject) -> None:
            """A writer dies after staging: no more heartbeats, and its lease runs out."""
            staged = [h for h in self.all if h.status == "staged"]
            if not staged:
                return
            handle = data.draw(st.sampled_from(staged))
            STATS["crash"] += 1
            self.writer.leases.release(handle.staged.attempt)
            with versions.engine.begin() as conn:
                conn.execute(
                    t.attempts.update()
                    .where(t.attempts.c.attempt_id == handle.staged.attempt.attempt_id)
                    .values(lease_expires_at=sa.func.now() - sa.text("interval '1 second'"))
                )
            handle.status = "crashed"

        # -- operators ---------------------------------------------------------------------

        @rule(keep_last=st.integers(1, 3))
        def gc(self, keep_last: int) -> None:
            STATS["gc"] += 1
            pinned = {(k, r.version) for _, k, r in self.pins}
            expected = set()
            for key, versions_of in self.kept.items():
                newest_first = sorted(versions_of, reverse=True)
                for rank, version in enumerate(newest_first, start=1):
                    if rank > keep_last and (key, version) not in pinned:
                        expected.add((key[0], key[1], version))
            report = self.gc.collect(
                GcPolicy(keep_last=keep_last, older_than=timedelta(0)),
                apply=True,
                datasets=[self.replace_ds, self.append_ds],
            )
            removed = {(v.dataset, v.partition_key, v.version) for v in report.versions}
            assert removed == expected
            STATS["versions removed by gc"] += len(removed)
            for dataset, partition, version in removed:
                del self.kept[(dataset, partition)][version]

        @rule()
        def cleanup(self) -> None:
            STATS["staging cleanup"] += 1
            report = self.gc.cleanup_staging(
                grace=timedelta(0), apply=True, datasets=[self.replace_ds, self.append_ds]
            )
            crashed = {h.staged.attempt.attempt_id for h in self.all if h.status == "crashed"}
            assert {a.attempt_id for a in report.abandoned} == crashed
            for handle in self.all:
                if handle.status == "crashed":
                    handle.status = "refused"  # abandoned: it can never commit
                    assert all(store.size(f.key) is None for f in handle.staged.files)

        @rule(partition=st.sampled_from(PARTITIONS))
        def read(self, partition: str) -> None:
            STATS["read"] += 1
            for key in ((self.replace_ds, partition), (self.append_ds, UNPARTITIONED)):
                if key in self.current:
                    table = self.reader.read(key[0], [key[1]])
                    assert sorted(table.column("id").to_pylist()) == sorted(self.current[key])
                else:
                    with pytest.raises(FileNotFoundError):
                        self.reader.read(key[0], [key[1]])

        @rule(data=st.data())
        def pin_old_version(self, data: st.DataObject) -> None:
            choices = sorted((k, v) for k, vs in self.kept.items() for v in vs)
            if not choices:
                return
            STATS["pin"] += 1
            key, version = data.draw(st.sampled_from(choices))
            stack = contextlib.ExitStack()
            record = stack.enter_context(self.reader.pinned_version(key[0], key[1], version))
            self.pins.append((stack, key, record))

        @rule()
        def read_pinned_and_unpin(self) -> None:
            if not self.pins:
                return
            STATS["read pinned old version"] += 1
            stack, key, record = self.pins.pop(0)
            table = self.reader.read_versions([record])
            assert sorted(table.column("id").to_pylist()) == sorted(self.kept[key][record.version])
            stack.close()

        # -- after every step --------------------------------------------------------------

        @invariant()
        def protocol_invariants(self) -> None:
            if not hasattr(self, "writer"):
                return
            STATS["invariant checks"] += 1
            check_invariants(versions, store, [self.replace_ds, self.append_ds], self.verified)
            for handle in self.all:
                if handle.status == "staged":  # a live attempt's files are never touched
                    assert all(store.size(f.key) == f.size for f in handle.staged.files)
            for key, content in self.current.items():
                current = versions.read.current_versions(key[0], [key[1]])[key[1]]
                assert current.version == max(self.kept[key])
                assert current.manifest.rows == len(content)

        def teardown(self) -> None:
            if hasattr(self, "writer"):
                for stack, _, _ in self.pins:
                    stack.close()
                self.writer.close()

    return CommitProtocol


def test_commit_protocol_state_machine(state_dsn: str, store: ObjectStore) -> None:
    versions = VersionStore(engine_for(state_dsn))
    STATS.clear()
    run_state_machine_as_test(
        build_machine(store, versions),
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            # no "explain" phase: its line tracing makes shrinking against real services crawl
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print("property test:", dict(sorted(STATS.items())))
    assert STATS["examples"] >= MAX_EXAMPLES
    exercised = (
        "committed",
        "refused (fenced)",
        "refused (dead attempt)",
        "recommit (idempotent)",
        "append no-op (segment present)",
        "crash",
        "staging cleanup",
        "versions removed by gc",
        "read pinned old version",
    )
    for kind in exercised:
        assert STATS[kind] > 0, f"no {kind!r} step was exercised: {dict(STATS)}"
