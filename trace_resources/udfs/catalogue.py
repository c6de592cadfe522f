"""What a transform of organisation `org` may read, with the columns and partitioning of each
dataset: Trace's one access rule (`readable_datasets`) decides which datasets; their columns
come from the platform's declarations, the organisation's other transforms (applied, maybe
not yet materialised) or, for any other committed dataset, its registered schema."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import sqlalchemy as sa

from trace_resources.registry import ARROW_TYPES, arrow_schema, declarations
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.access import readable_datasets
from trace_resources.storage.paths import UNPARTITIONED
from trace_resources.storage.read_model import ReadModel
from trace_resources.tokens import Principal
from trace_resources.udfs.declaration import InputDataset, UdfDeclaration, as_dataset_declaration

__all__ = ["input_catalogue", "registered_udfs"]


def registered_udfs(engine: sa.Engine, org: str | None = None) -> dict[str, UdfDeclaration]:
    """The newest version of every applied transform (of `org`), by name."""
    return {
        stored.name: UdfDeclaration.model_validate(stored.declaration)
        for stored in udf_store.latest(engine, org)
    }


def input_catalogue(
    engine: sa.Engine, org: str, principal: Principal | None = None
) -> dict[str, InputDataset]:
    """Every dataset organisation `org` may read (narrowed to what `principal`, a token of
    `org`, may read), by name."""
    decls = declarations()
    own = {
        name: udf
        for name, udf in registered_udfs(engine, org).items()
        if principal is None or principal.scope_allows(name)
    }
    read = ReadModel(engine)
    out: dict[str, InputDataset] = {}
    for name in sorted(set(readable_datasets(engine, org, principal)) | set(own)):
        if name in decls:
            decl = decls[name]
            out[name] = InputDataset(name, arrow_schema(decl), decl.partitioning)
        elif name in own:
            udf = own[name]
            out[name] = InputDataset(
                name, arrow_schema(as_dataset_declaration(udf)), udf.partitioning
            )
        elif (found := _committed(read, name)) is not None:
            out[name] = found
    return out


def _committed(read: ReadModel, name: str) -> InputDataset | None:
    """A committed dataset nobody declared: its registered schema (types Trace knows) and
    whether its partitions are block ranges."""
    registered = read.registered_schema(name)
    if registered is None:
        return None
    fields = [
        pa.field(f["name"], ARROW_TYPES[f["type"]], nullable=bool(f.get("nullable", True)))
        for f in registered[1]
        if f["type"] in ARROW_TYPES
    ]
    keys = set(read.current_version_numbers(name))
    partitioning: Literal["block_range", "none"] = (
        "none" if keys <= {UNPARTITIONED} else "block_range"
    )
    return InputDataset(name, pa.schema(fields), partitioning)
