"""The version store: Trace's Postgres state for the commit protocol, one object per concern.

`VersionStore(engine)` only builds the concerns and hands them out; each owns its SQL:

- `attempts`: attempts, fences and leases (`attempts.py`);
- `commits`: the fenced commit of one attempt or a batch (`fenced_commit.py`);
- `read`: the read model, what is committed as every reader sees it (`read_model.py`);
- `pins`: reader pins that keep versions from GC (`pins.py`);
- `retention`: what GC may remove and the queue of files to delete (`retention.py`);
- `outbox`: committed-version events to relay (`outbox.py`);
- `quality`: quality rule outcomes of committed versions (`quality_results.py`);
- `quarantine`: committed versions judged wrong and replaced (`quarantine.py`).

The tables themselves are defined in `state.py`, the records in `records.py`.
"""

from __future__ import annotations

import sqlalchemy as sa

from trace_resources.storage.attempts import Attempts
from trace_resources.storage.fenced_commit import FencedCommits
from trace_resources.storage.outbox import Outbox
from trace_resources.storage.pins import Pins
from trace_resources.storage.quality_results import QualityResults
from trace_resources.storage.quarantine import Quarantine
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.retention import Retention

__all__ = ["VersionStore"]


class VersionStore:
    """The concerns of the version store over one engine (`lease_s`: attempts' lease)."""

    def __init__(self, engine: sa.Engine, lease_s: float = 600.0) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.attempts = Attempts(engine, lease_s)
        self.commits = FencedCommits(engine)
        self.read = ReadModel(engine)
        self.pins = Pins(engine)
        self.retention = Retention(engine)
        self.outbox = Outbox(engine)
        self.quality = QualityResults(engine)
        self.quarantine = Quarantine(engine)
