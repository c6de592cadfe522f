"""A writer process for the fault-injection tests: `python -m tests.storage.writer_proc SPEC`.

SPEC is JSON: where the state and the bucket are, and a list of writes to do in order, each
staged then committed through `DatasetWriter` (the code Dagster's IO manager runs). The
process prints one JSON line per event on stdout (`ready`, `staged`, `committed`, `refused`)
so the test can follow it, and can be made to wait on stdin at chosen points so the test can
SIGSTOP it, race another writer against it, or start several writers at once. Crash points
come from `TRACE_CRASH_POINT` in its environment.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.utils.invariants import table_of
from tests.utils.writes import commit_one, stage_one
from trace_resources.errors import CommitError
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.object_store import ObjectStore, local_store, s3_store
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore


def _say(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _wait_for_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected 'go' on stdin, got {line!r}")


def _store(spec: dict[str, Any]) -> ObjectStore:
    if spec.get("local_root"):
        return local_store(spec["local_root"], spec["bucket"])
    return s3_store(
        spec["bucket"],
        endpoint_url=spec["endpoint_url"],
        access_key="testing",
        secret_key="testing",
    )


def main(spec: dict[str, Any]) -> int:
    versions = VersionStore(engine_for(spec["dsn"]), lease_s=spec.get("lease_s", 600.0))
    writer = DatasetWriter(
        _store(spec),
        versions,
        max_rows_per_file=spec.get("rows_per_file", 2_000_000),
        heartbeat_s=spec.get("heartbeat_s"),
    )
    _say("ready")
    if spec.get("wait_before_start"):
        _wait_for_go()
    refused = 0
    for write in spec["writes"]:
        mode = write.get("mode", spec.get("mode", "replace"))
        data = PartitionData(
            table_of(list(range(*write["ids"])), spec.get("name", "w")),
            segment_keys=write.get("segment_keys"),
        )
        try:
            staged = stage_one(
                writer, spec["dataset"], write.get("partition", spec["partition"]), data, mode=mode
            )
            _say("staged", attempt_id=staged.attempt.attempt_id, fence=staged.attempt.fence)
            if write.get("wait_after_stage"):
                _wait_for_go()
            result = commit_one(writer, staged, commit_key=write.get("commit_key"))
        except CommitError as exc:
            refused += 1
            _say("refused", error=type(exc).__name__, message=str(exc), ids=write["ids"])
            continue
        _say(
            "committed",
            attempt_id=staged.attempt.attempt_id,
            fence=staged.attempt.fence,
            version=result.version.version,
            already=result.already_committed,
            ids=write["ids"],
            segment_keys=write.get("segment_keys"),
        )
    writer.close()
    return 3 if refused and spec.get("fail_on_refusal") else 0


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.argv[1])))
