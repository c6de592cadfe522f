"""Validating and applying a transform's declaration against Postgres state: the one path
of `trace udf validate|apply` (and of the query service's `POST /v1/transforms`)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from trace_resources.registry import line_of
from trace_resources.storage import enrichments as enrichment_store
from trace_resources.storage import udfs as udf_store
from trace_resources.tokens import Principal
from trace_resources.udfs.catalogue import input_catalogue, registered_udfs
from trace_resources.udfs.declaration import UdfDeclaration, UdfError, load_udf, parse_udf

__all__ = ["validate", "apply"]


def validate(
    engine: sa.Engine,
    text: str,
    source: str,
    org: str | None = None,
    principal: Principal | None = None,
    base_dir: Path | None = None,
) -> UdfDeclaration:
    """The declaration, checked against what its organisation may read (narrowed to what
    `principal`, the caller's token, may read); with `org` (the caller's organisation), its
    name must be that organisation's. A Python transform's `module:` is read from `base_dir`
    (the file's folder; None: the module must be inline)."""
    decl, lines = parse_udf(text, source, base_dir)
    if org is not None and decl.org != org:
        line, _ = line_of(("name",), lines)
        raise UdfError(
            f"{source}:{line}: name: {decl.name!r} belongs to organisation {decl.org!r}; "
            f"organisation {org!r} declares org_{org}__<name>"
        )
    if enrichment_store.is_enrichment(engine, decl.name):
        line, _ = line_of(("name",), lines)
        raise UdfError(
            f"{source}:{line}: name: {decl.name!r} is an uploaded enrichment dataset; name the "
            "transform differently"
        )
    checked = load_udf(text, source, input_catalogue(engine, decl.org, principal), base_dir)
    _refuse_cycles(engine, checked, source, lines)
    return checked


def _refuse_cycles(
    engine: sa.Engine, decl: UdfDeclaration, source: str, lines: dict[tuple[object, ...], int]
) -> None:
    """A transform may not read its own output through other transforms (the asset graph
    would have a cycle, and no code location could load it)."""
    reads = {name: [i.dataset for i in udf.inputs] for name, udf in registered_udfs(engine).items()}
    reads[decl.name] = [i.dataset for i in decl.inputs]

    def path_back(start: str, seen: frozenset[str]) -> list[str] | None:
        for upstream in reads.get(start, []):
            if upstream == decl.name:
                return [start]
            if upstream not in seen:
                found = path_back(upstream, seen | {upstream})
                if found is not None:
                    return [start, *found]
        return None

    for i, item in enumerate(decl.inputs):
        if item.dataset == decl.name or item.dataset not in reads:
            continue
        through = path_back(item.dataset, frozenset({item.dataset}))
        if through is not None:
            line, _ = line_of(("inputs", i, "dataset"), lines)
            chain = " -> ".join([decl.name, *through, decl.name])
            raise UdfError(
                f"{source}:{line}: inputs[{i}].dataset: {item.dataset!r} reads this "
                f"transform's output ({chain}); a transform can not read itself, even through "
                "others"
            )


def apply(
    engine: sa.Engine,
    text: str,
    source: str,
    applied_by: str,
    org: str | None = None,
    principal: Principal | None = None,
    base_dir: Path | None = None,
) -> udf_store.StoredUdf:
    """Validate, then store as the transform's next version (unless it is unchanged)."""
    decl = validate(engine, text, source, org, principal, base_dir)
    return udf_store.apply_version(
        engine,
        name=decl.name,
        org=decl.org,
        source_file=source,
        source=text,
        declaration=decl.model_dump(mode="json", by_alias=True),
        applied_by=applied_by,
    )
