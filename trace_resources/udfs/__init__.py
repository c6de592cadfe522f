"""Organisations' own transforms (UDFs): datasets `org_<org>__<name>` an organisation declares
in a versioned YAML file and the platform computes, verifies and commits like its own
derived datasets: `kind: sql`, one SELECT run in the query sandbox, or `kind: python`, a
module's function run as an external process through Dagster Pipes.

    declaration.py  the declaration's model and its line/field diagnostics (`load_udf`)
    sql.py          the SELECT's check: one statement, reads only its inputs, binds
    catalogue.py    what an organisation's transform may read (the one access rule)
    python.py       how a Python transform's process is started (`udf_launch`, the Pipes client)
    runner.py       the runtime that process runs (imports nothing of the platform)

The registry of applied versions is `trace_resources.storage.udfs`; the Dagster assets built
from it are `trace_assets.udfs`. Imports: trace_resources only.
"""

from trace_resources.udfs.declaration import (
    InputDataset,
    UdfDeclaration,
    UdfError,
    as_dataset_declaration,
    load_udf,
    parse_udf,
)

__all__ = [
    "InputDataset",
    "UdfDeclaration",
    "UdfError",
    "as_dataset_declaration",
    "load_udf",
    "parse_udf",
]
