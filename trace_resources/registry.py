"""The dataset registry: every dataset, raw and derived, declared as data in
`trace_assets/datasets/*.yaml` and validated on load.

A declaration names the dataset, says what it means, which datasets it reads, its schema with
column docs, its partitioning and commit mode, its quality rules and the lineage of each
column. Assets, asset checks, the catalogue (`trace docs`) and the query service's discovery
(`catalogue()`) are built from these declarations, so there is one source of truth.

Errors name the file, line and field: the YAML is composed into nodes (which keep their
positions) before it is turned into Python values, and pydantic's error locations are mapped
back onto those nodes.

It lives in `trace_resources` (it needs no Dagster) so that the query service, which may not
import `trace_assets`, serves the same declarations: a dataset declared `public: true` (the
default) is readable by every organisation, with its declared description and column docs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trace_resources.errors import TraceError

__all__ = [
    "FORMAT_VERSION",
    "DATASETS_DIR",
    "ARROW_TYPES",
    "Column",
    "DEFAULT_OWNER",
    "DatasetDeclaration",
    "DeclarationError",
    "RetentionPolicy",
    "Rule",
    "arrow_schema",
    "parse_duration",
    "catalogue",
    "declarations",
    "load_declarations",
    "impacted_datasets",
    "catalogue_markdown",
    "check_description",
    "public_declared",
    "compose_with_lines",
    "line_of",
]

FORMAT_VERSION = 1
# the declarations ship beside the assets built from them
DATASETS_DIR = Path(__file__).resolve().parents[1] / "trace_assets" / "datasets"

# The column types a declaration may use, by the name pyarrow prints for them.
ARROW_TYPES: dict[str, pa.DataType] = {
    t_name: t
    for t_name, t in (
        (str(t), t)
        for t in (
            pa.bool_(),
            pa.uint8(),
            pa.uint32(),
            pa.uint64(),
            pa.int32(),
            pa.int64(),
            pa.float64(),
            pa.string(),
            pa.binary(),
            pa.date32(),
            pa.timestamp("us", tz="UTC"),
            pa.list_(pa.string()),
        )
    )
}
_NAME = r"^[a-z][a-z0-9_]*$"
# who answers for a dataset, shown as the asset's owner in the Dagster UI; Dagster accepts an
# email address or a team name prefixed with `team:` (the same test as dagster's
# `is_valid_owner`, kept here because the registry does not import Dagster)
DEFAULT_OWNER = "team:data-platform"
_OWNER = r"^(team:\S+|[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7})$"


class DeclarationError(TraceError):
    """A dataset declaration is invalid; the message names the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    name: Annotated[str, Field(pattern=_NAME, description="column name")]
    type: str = Field(description=f"Arrow type, one of {', '.join(ARROW_TYPES)}")
    doc: str = Field(min_length=1, description="what the column holds, with units")
    nullable: bool = Field(default=False, description="whether the column may hold nulls")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ARROW_TYPES:
            raise ValueError(f"unknown type {value!r}; use one of {', '.join(ARROW_TYPES)}")
        return value

    @property
    def arrow_type(self) -> pa.DataType:
        return ARROW_TYPES[self.type]


class _RuleBase(_Strict):
    name: Annotated[str, Field(pattern=_NAME, description="asset check name")]
    description: str = Field(default="", description="why the rule exists")
    threshold: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="largest tolerated error rate (failing rows / rows); above it, the rule fails",
    )
    blocking: bool = Field(
        default=True,
        description="a failure stops the commit (derived) or blocks downstream (raw)",
    )

    def columns_used(self) -> list[str]:
        return []


class NotNullRule(_RuleBase):
    kind: Literal["not_null"]
    columns: list[str] = Field(min_length=1)

    def columns_used(self) -> list[str]:
        return list(self.columns)


class UniqueRule(_RuleBase):
    kind: Literal["unique"]
    columns: list[str] = Field(min_length=1, description="together form the key")

    def columns_used(self) -> list[str]:
        return list(self.columns)


class RangeRule(_RuleBase):
    kind: Literal["range"]
    column: str
    min: float | None = None
    max: float | None = None

    def columns_used(self) -> list[str]:
        return [self.column]


class RegexRule(_RuleBase):
    kind: Literal["regex"]
    column: str
    pattern: str = Field(description="the whole value must match (DuckDB regexp_full_match)")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return value

    def columns_used(self) -> list[str]:
        return [self.column]


class SqlRule(_RuleBase):
    kind: Literal["sql"]
    query: str = Field(
        description="DuckDB SELECT over the table `data` returning the failing rows; "
        "{first_block} and {last_block} are the partition's bounds"
    )


class ChainContinuityRule(_RuleBase):
    kind: Literal["chain_continuity"]


Rule = Annotated[
    NotNullRule | UniqueRule | RangeRule | RegexRule | SqlRule | ChainContinuityRule,
    Field(discriminator="kind"),
]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `12h`, `7d` (or plain seconds) as a timedelta; ValueError says how to fix."""
    value = text.strip()
    try:
        if value and value[-1] in _DURATION_UNITS:
            seconds = float(value[:-1]) * _DURATION_UNITS[value[-1]]
        else:
            seconds = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 30m, 12h or 7d") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a finite duration of at least 0s; use e.g. 30d")
    return timedelta(seconds=seconds)


class RetentionPolicy(_Strict):
    """Which superseded versions the retention schedule removes: those beyond the newest
    `keep_last` of their partition (the current one included) AND superseded more than
    `older_than` ago. Never a current version, one a reader pinned, or a live attempt's files."""

    keep_last: int = Field(ge=1, description="versions kept per partition, the current included")
    older_than: timedelta = Field(
        description="remove only versions superseded longer ago than this, e.g. 30d, 12h"
    )

    @field_validator("older_than", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 30m, 12h or 7d")
        return parse_duration(str(value))


class DatasetDeclaration(_Strict):
    format_version: Literal[1] = Field(description="version of the declaration format")
    name: Annotated[str, Field(pattern=_NAME)]
    kind: Literal["raw", "derived"]
    description: str = Field(min_length=1)
    owner: str = Field(
        default=DEFAULT_OWNER,
        description="who answers for the dataset: an email address or `team:<name>` (the "
        "asset's owner in the Dagster UI)",
    )
    upstream: list[str] = Field(default_factory=list, description="datasets it reads")
    partitioning: Literal["block_range", "none"]
    commit_mode: Literal["replace", "append"]
    columns: list[Column] = Field(alias="schema", min_length=1)
    row_filter: list[str] = Field(
        default_factory=list,
        description="upstream columns (`dataset.column`) that decide which rows exist; every "
        "column depends on them",
    )
    lineage: dict[str, list[str]] = Field(
        default_factory=dict,
        description="for each column, the upstream columns (`dataset.column`) it is computed from",
    )
    quality: list[Rule] = Field(default_factory=list)
    public: bool = Field(
        default=True,
        description="served by the query service to every organisation (false: internal to "
        "the platform)",
    )
    retention: RetentionPolicy | None = Field(
        default=None,
        description="automatic GC of superseded versions (`retention_gc_schedule`, `trace gc "
        "--policy`); without it every version is kept",
    )
    # where it came from, for error messages (not part of the YAML)
    source_file: str = Field(default="", exclude=True)

    @field_validator("owner")
    @classmethod
    def _owner_dagster_accepts(cls, value: str) -> str:
        if not re.fullmatch(_OWNER, value):
            raise ValueError(
                f"{value!r} is neither an email address nor a team name prefixed with 'team:' "
                f"(e.g. {DEFAULT_OWNER})"
            )
        return value

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column_deps(self, column: str) -> list[str]:
        """Upstream `dataset.column`s one output column depends on (row filter included)."""
        return list(dict.fromkeys([*self.lineage.get(column, []), *self.row_filter]))


# -- YAML with positions ----------------------------------------------------------------------


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    """Turn a composed node into Python values, noting the line of every path on the way."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1  # the key's line, not the value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _line_of(loc: Sequence[Any], lines: dict[tuple[Any, ...], int]) -> tuple[int, str]:
    """The line of the deepest part of `loc` present in the file, and the field path.

    pydantic puts a discriminated union's tag into the location (`quality.0.regex.pattern`);
    parts that are not in the document are skipped.
    """
    path: tuple[Any, ...] = ()
    shown: list[str] = []
    for part in loc:
        if (*path, part) in lines:
            path = (*path, part)
            shown.append(str(part))
        elif part == loc[-1]:
            shown.append(str(part))  # a missing field: point at its parent
    return lines.get(path, 1), ".".join(shown) or "<document>"


def compose_with_lines(text: str, source: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """A YAML document as Python values, with the line of every field path (for other
    declarations, such as organisations' transforms, to report errors as these do)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise DeclarationError(f"{source}:{line}: invalid YAML: {exc.problem}") from None
    if not isinstance(node, yaml.MappingNode):
        raise DeclarationError(f"{source}:1: a declaration is a mapping of fields")
    lines: dict[tuple[Any, ...], int] = {}
    return _to_python(node, (), lines), lines


def line_of(loc: Sequence[Any], lines: dict[tuple[Any, ...], int]) -> tuple[int, str]:
    """The line of a field path (a pydantic error location) and the path as shown."""
    return _line_of(loc, lines)


def _parse_file(path: Path) -> tuple[DatasetDeclaration, dict[tuple[Any, ...], int]]:
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise DeclarationError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    if not isinstance(node, yaml.MappingNode):
        raise DeclarationError(f"{path}:1: a declaration is a mapping of fields")
    lines: dict[tuple[Any, ...], int] = {}
    data = _to_python(node, (), lines)
    if data.get("format_version") not in (None, FORMAT_VERSION):
        line = lines.get(("format_version",), 1)
        raise DeclarationError(
            f"{path}:{line}: format_version: {data['format_version']!r} is not supported; this "
            f"Trace reads format_version {FORMAT_VERSION}"
        )
    try:
        declaration = DatasetDeclaration.model_validate({**data, "source_file": str(path)})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line, field = _line_of(error["loc"], lines)
            problems.append(f"{path}:{line}: {field}: {error['msg']}")
        raise DeclarationError("\n".join(problems)) from None
    if declaration.name != path.stem:
        raise DeclarationError(
            f"{path}:{lines[('name',)]}: name: {declaration.name!r} must match the file name "
            f"{path.stem!r}"
        )
    return declaration, lines


def _check_references(
    parsed: dict[str, tuple[DatasetDeclaration, dict[tuple[Any, ...], int]]],
) -> None:
    """Cross-file checks: upstreams exist, lineage and rules name real columns."""
    problems: list[str] = []
    for decl, lines in parsed.values():
        problems += _reference_problems(decl, lines, parsed)
    if problems:
        raise DeclarationError("\n".join(problems))


def _reference_problems(
    decl: DatasetDeclaration,
    lines: dict[tuple[Any, ...], int],
    parsed: dict[str, tuple[DatasetDeclaration, dict[tuple[Any, ...], int]]],
) -> list[str]:
    problems: list[str] = []

    def report(path: tuple[Any, ...], message: str) -> None:
        line, field = _line_of(path, lines)
        problems.append(f"{decl.source_file}:{line}: {field}: {message}")

    def check_ref(path: tuple[Any, ...], ref: str) -> None:
        dataset, _, column = ref.partition(".")
        if dataset not in decl.upstream:
            report(
                path,
                f"{ref!r} does not name a column of an upstream dataset "
                f"({', '.join(decl.upstream) or 'none declared'}) as `dataset.column`",
            )
        elif dataset in parsed and parsed[dataset][0].column(column) is None:
            report(path, f"{dataset} has no column {column!r}")

    for i, up in enumerate(decl.upstream):
        if up not in parsed:
            report(("upstream", i), f"unknown dataset {up!r}; known: {', '.join(parsed)}")
        elif up == decl.name:
            report(("upstream", i), "a dataset can not read itself")
    for i, ref in enumerate(decl.row_filter):
        check_ref(("row_filter", i), ref)
    for column, refs in decl.lineage.items():
        if decl.column(column) is None:
            report(("lineage", column), f"{column!r} is not a column of {decl.name}")
        for i, ref in enumerate(refs):
            check_ref(("lineage", column, i), ref)
    if decl.kind == "derived":
        for i, column in enumerate(decl.column_names):
            if column not in decl.lineage:
                report(("schema", i, "name"), f"derived column {column!r} has no lineage")
        if not decl.upstream:
            report(("upstream",), "a derived dataset reads at least one upstream dataset")
    elif decl.upstream or decl.lineage:
        report(("kind",), "a raw dataset has no upstream datasets or lineage")
    names = [r.name for r in decl.quality]
    for i, rule in enumerate(decl.quality):
        if names.count(rule.name) > 1:
            report(("quality", i, "name"), f"rule name {rule.name!r} is used twice")
        for column in rule.columns_used():
            if decl.column(column) is None:
                report(("quality", i), f"{column!r} is not a column of {decl.name}")
        if isinstance(rule, ChainContinuityRule) and decl.name != "blocks":
            report(("quality", i, "kind"), "chain_continuity applies to blocks only")
    return problems


def load_declarations(directory: Path | str = DATASETS_DIR) -> dict[str, DatasetDeclaration]:
    """Every `*.yaml` declaration of the directory, validated, by dataset name."""
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise DeclarationError(f"{directory}: no dataset declarations (*.yaml) found")
    parsed = {}
    for path in files:
        decl, lines = _parse_file(path)
        parsed[decl.name] = (decl, lines)
    _check_references(parsed)
    return {name: decl for name, (decl, _) in parsed.items()}


@cache
def declarations() -> dict[str, DatasetDeclaration]:
    """The declarations shipped with Trace (loaded once)."""
    return load_declarations()


def public_declared() -> dict[str, str]:
    """The declared datasets every organisation may read, with their descriptions."""
    return {name: d.description for name, d in declarations().items() if d.public}


def arrow_schema(decl: DatasetDeclaration) -> pa.Schema:
    return pa.schema(
        [
            pa.field(c.name, c.arrow_type, nullable=c.nullable, metadata={"doc": c.doc})
            for c in decl.columns
        ]
    )


def catalogue(decls: dict[str, DatasetDeclaration] | None = None) -> list[dict[str, Any]]:
    """The declarations as plain dicts, for the query service's dataset discovery."""
    decls = decls if decls is not None else declarations()
    return [d.model_dump(mode="json", by_alias=True) for d in decls.values()]


def impacted_datasets(
    dataset: str, columns: Iterable[str], decls: dict[str, DatasetDeclaration] | None = None
) -> dict[str, list[str]]:
    """Downstream datasets (transitively) with the columns that read the changed columns.

    Returns `{dataset: [impacted columns]}` in dependency order; a dataset whose columns do not
    depend on a changed column is left out.
    """
    decls = decls if decls is not None else declarations()
    if dataset not in decls:
        raise DeclarationError(f"unknown dataset {dataset!r}; known: {', '.join(decls)}")
    unknown = [c for c in columns if decls[dataset].column(c) is None]
    if unknown:
        raise DeclarationError(
            f"{dataset} has no column(s) {', '.join(unknown)}; its columns are "
            f"{', '.join(decls[dataset].column_names)}"
        )
    changed = {f"{dataset}.{c}" for c in columns}
    impacted: dict[str, list[str]] = {}
    progress = True
    while progress:
        progress = False
        for decl in decls.values():
            hit = [c for c in decl.column_names if changed & set(decl.column_deps(c))]
            if hit and sorted(hit) != sorted(impacted.get(decl.name, [])):
                impacted[decl.name] = hit
                changed |= {f"{decl.name}.{c}" for c in hit}
                progress = True
    order = _topological(decls)
    return {name: impacted[name] for name in order if name in impacted}


def _topological(decls: dict[str, DatasetDeclaration]) -> list[str]:
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for up in decls[name].upstream:
            visit(up)
        done.append(name)

    for name in sorted(decls):
        visit(name)
    return done


def catalogue_markdown(decls: dict[str, DatasetDeclaration] | None = None) -> str:
    """The dataset catalogue as Markdown (what `trace docs` writes)."""
    decls = decls if decls is not None else declarations()
    out = [
        "# Trace dataset catalogue",
        "",
        "Generated by `trace docs` from `trace_assets/datasets/*.yaml`; do not edit by hand.",
        "",
    ]
    for name in _topological(decls):
        d = decls[name]
        out += [f"## {name}", "", d.description.strip(), ""]
        out += [
            f"- kind: {d.kind}; partitioning: {d.partitioning}; commit mode: {d.commit_mode}",
            f"- owner: {d.owner}",
            f"- upstream: {', '.join(d.upstream) or 'none (extracted from the chain)'}",
        ]
        if d.row_filter:
            out.append(f"- rows selected by: {', '.join(d.row_filter)}")
        out += ["", "| column | type | nullable | description | from |", "|---|---|---|---|---|"]
        for c in d.columns:
            source = ", ".join(d.lineage.get(c.name, [])) or "—"
            doc = c.doc.replace("|", "\\|")
            out.append(
                f"| `{c.name}` | {c.type} | {'yes' if c.nullable else 'no'} | {doc} | {source} |"
            )
        if d.quality:
            out += ["", "Quality rules:", ""]
            out += [f"- `{r.name}`: {check_description(d, r)}" for r in d.quality]
        out.append("")
    return "\n".join(out)


def _columns(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _rule_assertion(decl: DatasetDeclaration, rule: Any) -> str:
    """What a rule asserts, in words (the rule's own `description` says why, when given)."""
    if isinstance(rule, NotNullRule):
        return f"{_columns(rule.columns)} {'is' if len(rule.columns) == 1 else 'are'} never null"
    if isinstance(rule, UniqueRule):
        key = _columns(rule.columns)
        same = "the same " if len(rule.columns) == 1 else ""
        return f"no two rows of {decl.name} share {same}{key}"
    if isinstance(rule, RangeRule):
        column = f"`{rule.column}`"
        if rule.min is not None and rule.max is not None:
            return f"{column} is between {rule.min:g} and {rule.max:g}"
        if rule.min is not None:
            return f"{column} is at least {rule.min:g}"
        if rule.max is not None:
            return f"{column} is at most {rule.max:g}"
        return f"{column} has no bounds (the rule never fails)"
    if isinstance(rule, RegexRule):
        return f"every `{rule.column}` matches the pattern `{rule.pattern}` in full"
    if isinstance(rule, SqlRule):
        return f"no row is returned by `{' '.join(rule.query.split())}`"
    return "every block's parent hash is the hash of the block before it"


def check_description(decl: DatasetDeclaration, rule: Any) -> str:
    """One rule in words: what it asserts, why (its declared description), whether it blocks
    and what error rate it tolerates. `trace docs` lists a dataset's rules with this text and
    the asset checks built from them carry it as their description in the Dagster UI, so the
    two always agree."""
    what = _rule_assertion(decl, rule)
    if isinstance(rule, ChainContinuityRule) and rule.description:
        what = rule.description  # says the same, in the declaration's own words
    elif rule.description:
        what = f"{rule.description}: {what}"
    if not rule.blocking:
        gate = "warning: a failure is reported, nothing is stopped"
    elif decl.kind == "derived":
        gate = "blocking: a failure stops the commit"
    else:
        gate = "blocking: a failure stops the datasets derived from it"
    tolerance = (
        f"fails when more than {rule.threshold * 100:g}% of the rows fail"
        if rule.threshold
        else "fails on any failing row"
    )
    return f"{what[:1].upper()}{what[1:]} ({rule.kind} rule; {gate}; {tolerance})"
