"""`trace_outbox_by_version`: the outbox event of one committed version, found by (dataset,
partition key, version), for the correlation id its unit of work carries (`storage.outbox`:
a derived run inherits its inputs' id, an alert evaluation the id of the versions it read;
the head follower stamps its commits' events by it).

Revision ID: state_0012
"""

from __future__ import annotations

from alembic import op

revision = "state_0012"
down_revision = "state_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "trace_outbox_by_version",
        "trace_outbox",
        ["dataset", "partition_key", "version"],
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("trace_outbox_by_version", table_name="trace_outbox")
