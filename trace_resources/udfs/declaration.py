"""An organisation's own transform: its declaration (a versioned YAML file), validated field by
field with the file's line numbers.

    format_version: 1
    name: org_acme__big_transfers          # org_<org>__<name>: the organisation owns it
    description: ERC-20 transfers of at least 10^18 base units
    inputs:                                # datasets the organisation may read, and the
      - dataset: erc20_transfers           # columns the code reads (it is handed no others)
        columns: [block_number, log_index, token, value_string]
    partitioning: block_range              # like its block-range inputs, or none
    mode: replace                          # or append
    schema:                                # the output, exactly as the SELECT returns it
      - {name: block_number, type: uint64, doc: block height}
    quality:                               # the rule kinds of the platform's declarations
      - {name: one_row_per_log, kind: unique, columns: [block_number, log_index]}
    code:
      kind: sql
      sql: SELECT block_number, ... FROM erc20_transfers WHERE ...

or, for a Python transform run as an external process through Dagster Pipes
(`trace_resources.udfs.python`):

    code:
      kind: python
      module: big_transfers.py             # a file beside the YAML (read by `trace udf apply`)
      # source: |                          # or the module inline (the API takes only this)
      function: transform                  # transform(inputs) -> pyarrow.Table
      frames: arrow                        # inputs as pyarrow.Table (or `polars` DataFrames)
      requirements: [polars>=1.0]          # PEP 508 requirements of its own environment

The function is handed `{dataset: table}` with exactly the declared columns of ONE partition
of each input and returns the partition's rows (a pyarrow.Table, or a polars DataFrame). The
module's text is stored with the version (`source`), so every version is reproducible.

`load_udf(text, source, catalogue)` returns the declaration or raises `UdfError` with one
line per problem, `<file>:<line>: <field>: <what is wrong and how to fix it>`. The catalogue
(`trace_resources.udfs.catalogue`) says which datasets the organisation may read, with their
columns; the SELECT is parsed and bound against empty tables of the declared input columns
(`trace_resources.udfs.sql`), so the file is refused before anything runs when it reads an
undeclared dataset or column, or returns other columns or types than its schema declares.

`as_dataset_declaration` turns a transform into the platform's `DatasetDeclaration`, so its
asset gets the same column schema, lineage, quality checks and circuit breaker as the
platform's derived datasets.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pyarrow as pa
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trace_resources.errors import TraceError
from trace_resources.registry import (
    Column,
    DatasetDeclaration,
    Rule,
    arrow_schema,
    compose_with_lines,
    line_of,
)
from trace_resources.storage.access import OWNED_PATTERN, owner_of
from trace_resources.udfs.sql import SqlProblem, check_select, duckdb_types

__all__ = [
    "FORMAT_VERSION",
    "InputDataset",
    "PythonCode",
    "SqlCode",
    "UdfDeclaration",
    "UdfError",
    "UdfInput",
    "as_dataset_declaration",
    "load_udf",
    "parse_udf",
]

FORMAT_VERSION = 1
_COLUMN = r"^[a-z_][a-z0-9_]*$"
_DATASET = r"^[a-z][a-z0-9_]*$"
_OWNER = r"^(team:\S+|[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7})$"
# rule kinds an organisation may declare: `sql` rules and `chain_continuity` are the platform's
# (an organisation's statements run only in the sandbox, never in the platform's process)
ORG_RULE_KINDS = ("not_null", "unique", "range", "regex")

Lines = dict[tuple[Any, ...], int]


class UdfError(TraceError):
    """A transform's declaration is invalid; one line per problem, naming file, line, field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UdfInput(_Strict):
    dataset: str = Field(pattern=_DATASET, description="a dataset the organisation may read")
    columns: list[Annotated[str, Field(pattern=_COLUMN)]] = Field(
        min_length=1, description="the columns the code reads; it is handed no others"
    )


class SqlCode(_Strict):
    kind: Literal["sql"]
    sql: str = Field(
        min_length=1,
        description="one DuckDB SELECT over the inputs (by dataset name), run in the query "
        "sandbox once per partition over exactly that partition of each block-range input",
    )


MAX_PYTHON_CHARS = 1_000_000


class PythonCode(_Strict):
    kind: Literal["python"]
    module: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py$",
        description="the module's file, relative to the declaration's folder (read when the "
        "declaration is applied and stored as `source`)",
    )
    source: str = Field(min_length=1, max_length=MAX_PYTHON_CHARS, description="the module's text")
    function: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the module's function: {dataset: table} of one partition -> its rows",
    )
    frames: Literal["arrow", "polars"] = Field(
        "arrow", description="what the function is handed: pyarrow Tables or polars DataFrames"
    )
    requirements: list[str] = Field(
        default_factory=list, max_length=100, description="PEP 508 requirements of its venv"
    )


class UdfDeclaration(_Strict):
    format_version: Literal[1] = Field(description="version of the declaration format")
    name: str = Field(description="org_<org>__<name>: the organisation that owns the dataset")
    description: str = Field(min_length=1)
    owner: str | None = Field(
        default=None,
        description="who answers for it (an email address or `team:<name>`); default team:<org>",
    )
    inputs: list[UdfInput] = Field(min_length=1)
    partitioning: Literal["block_range", "none"]
    mode: Literal["replace", "append"] = Field(description="commit mode of each run's output")
    columns: list[Column] = Field(alias="schema", min_length=1)
    lineage: dict[str, list[str]] = Field(
        default_factory=dict,
        description="for each output column, the input columns (`dataset.column`) it is "
        "computed from; a column left out depends on every declared input column",
    )
    quality: list[Rule] = Field(default_factory=list)
    code: Annotated[SqlCode | PythonCode, Field(discriminator="kind")]

    @field_validator("name")
    @classmethod
    def _owned_name(cls, value: str) -> str:
        if not OWNED_PATTERN.match(value):
            raise ValueError(
                f"{value!r} must be named org_<org>__<name> (your organisation's id, two "
                "underscores, then the dataset's own name), e.g. org_acme__big_transfers"
            )
        return value

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_OWNER, value):
            raise ValueError(f"{value!r} is neither an email address nor 'team:<name>'")
        return value

    @property
    def org(self) -> str:
        org = owner_of(self.name)
        assert org is not None  # the name was validated
        return org

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def input_schemas(self, catalogue: Mapping[str, InputDataset]) -> dict[str, pa.Schema]:
        """Each input's declared columns, with the types the catalogue gives them."""
        out = {}
        for item in self.inputs:
            schema = catalogue[item.dataset].schema
            out[item.dataset] = pa.schema([schema.field(c) for c in item.columns])
        return out


@dataclass(frozen=True)
class InputDataset:
    """A dataset a transform may read: its columns and how it is partitioned."""

    name: str
    schema: pa.Schema
    partitioning: Literal["block_range", "none"]


def _shown(field: str) -> str:
    """`inputs.0.columns.1` as `inputs[0].columns[1]`."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", field)


class _Problems:
    def __init__(self, source: str, lines: Lines) -> None:
        self.source, self.lines, self.found = source, lines, []  # type: ignore[var-annotated]

    def add(self, loc: Sequence[Any], message: str) -> None:
        line, field = line_of(loc, self.lines)
        self.found.append(f"{self.source}:{line}: {_shown(field)}: {message}")

    def raise_any(self) -> None:
        if self.found:
            raise UdfError("\n".join(self.found))


def parse_udf(text: str, source: str, base_dir: Path | None = None) -> tuple[UdfDeclaration, Lines]:
    """The declaration's fields validated on their own (no catalogue): types, names, kinds.
    A Python transform's `module:` is read from `base_dir` (the declaration's folder); without
    one (the API), the module must be given inline as `source:`."""
    try:
        data, lines = compose_with_lines(text, source)
    except TraceError as exc:
        raise UdfError(str(exc)) from None
    problems = _Problems(source, lines)
    code = data.get("code") if isinstance(data, dict) else None
    if isinstance(code, dict) and code.get("kind") == "python":
        _read_module(code, base_dir, problems)
        problems.raise_any()
    if data.get("format_version") not in (None, FORMAT_VERSION):
        problems.add(
            ("format_version",),
            f"{data['format_version']!r} is not supported; this Trace reads format_version "
            f"{FORMAT_VERSION}",
        )
        problems.raise_any()
    try:
        decl = UdfDeclaration.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = error["loc"]
            if len(loc) > 2 and loc[0] == "code" and loc[1] in ("sql", "python"):
                loc = ("code", *loc[2:])  # the kind's tag pydantic adds is no field of the file
            problems.add(loc, str(error["msg"]).removeprefix("Value error, "))
        problems.raise_any()
        raise AssertionError("unreachable") from None
    return decl, lines


def _read_module(code: dict[str, Any], base_dir: Path | None, problems: _Problems) -> None:
    module = code.get("module")
    if module is None:
        if code.get("source") is None:
            problems.add(
                ("code",),
                "a python transform needs its module: `module: <file>.py` (a file beside this "
                "declaration) or the module's text inline as `source: |`",
            )
        return
    if code.get("source") is not None:
        problems.add(("code", "source"), "give `module` or `source`, not both")
        return
    if not isinstance(module, str) or base_dir is None:
        problems.add(
            ("code", "module"),
            "modules are read from files by `trace udf apply`; here give the module's text "
            "inline as `source: |`",
        )
        return
    path = (base_dir / module).resolve()
    if ".." in Path(module).parts or Path(module).is_absolute():
        problems.add(("code", "module"), f"{module!r} must be a path inside this file's folder")
    elif not path.is_file():
        problems.add(("code", "module"), f"no file {module!r} beside this declaration ({path})")
    else:
        try:
            code["source"] = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            problems.add(("code", "module"), f"can not read {path}: {exc}")


def load_udf(
    text: str,
    source: str,
    catalogue: Mapping[str, InputDataset],
    base_dir: Path | None = None,
) -> UdfDeclaration:
    """The declaration, checked field by field and against what its organisation may read
    (`catalogue`: dataset -> its columns and partitioning); `UdfError` lists every problem."""
    decl, lines = parse_udf(text, source, base_dir)
    problems = _Problems(source, lines)
    _check_inputs(decl, catalogue, problems)
    _check_outputs(decl, problems)
    problems.raise_any()  # the SQL is bound against the inputs: they must be right first
    if isinstance(decl.code, SqlCode):
        _check_sql(decl, catalogue, problems)
    else:
        _check_python(decl.code, problems)
    problems.raise_any()
    return decl


def _check_python(code: PythonCode, problems: _Problems) -> None:
    """The module parses and defines the function at its top level; requirements are PEP 508."""
    where = ("code", "module") if code.module is not None else ("code", "source")
    try:
        tree = ast.parse(code.source, filename=code.module or "<source>")
    except SyntaxError as exc:
        problems.add(where, f"line {exc.lineno} of the module does not parse: {exc.msg}")
        return
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == code.function
    ]
    if not found:
        problems.add(
            ("code", "function"),
            f"the module defines no top-level function {code.function!r} "
            f"(def {code.function}(inputs): ... returning the partition's rows)",
        )
    elif not found[-1].args.args and not found[-1].args.vararg:
        problems.add(
            ("code", "function"),
            f"{code.function} takes no argument; it is called with {{dataset: table}}",
        )
    for i, requirement in enumerate(code.requirements):
        try:
            Requirement(requirement)
        except InvalidRequirement as exc:
            why = str(exc).strip().splitlines()[0]
            problems.add(
                ("code", "requirements", i), f"not a PEP 508 requirement ({why}), e.g. polars>=1.0"
            )


def _check_inputs(
    decl: UdfDeclaration, catalogue: Mapping[str, InputDataset], problems: _Problems
) -> None:
    seen: set[str] = set()
    for i, item in enumerate(decl.inputs):
        if item.dataset == decl.name:
            problems.add(("inputs", i, "dataset"), "a transform can not read its own output")
            continue
        if item.dataset in seen:
            problems.add(("inputs", i, "dataset"), f"{item.dataset!r} is listed twice")
        seen.add(item.dataset)
        known = catalogue.get(item.dataset)
        if known is None:
            problems.add(
                ("inputs", i, "dataset"),
                f"unknown dataset {item.dataset!r} (or not readable by organisation "
                f"{decl.org!r}); readable: {', '.join(sorted(catalogue)) or 'none'}",
            )
            continue
        for j, column in enumerate(item.columns):
            if column not in known.schema.names:
                problems.add(
                    ("inputs", i, "columns", j),
                    f"unknown column {column!r} of {item.dataset}; it has: "
                    f"{', '.join(known.schema.names)}",
                )
    if (
        decl.partitioning == "block_range"
        and not any(
            known.partitioning == "block_range"
            for item in decl.inputs
            if (known := catalogue.get(item.dataset)) is not None
        )
        and all(item.dataset in catalogue for item in decl.inputs)
    ):
        problems.add(
            ("partitioning",),
            "block_range needs at least one input partitioned by block range (its ranges are "
            "the transform's); declare `partitioning: none` to read whole datasets",
        )
    declared = {f"{i.dataset}.{c}" for i in decl.inputs for c in i.columns}
    for column, refs in decl.lineage.items():
        if column not in decl.column_names:
            problems.add(("lineage", column), f"{column!r} is not a column of the schema")
        for k, ref in enumerate(refs):
            if ref not in declared:
                problems.add(
                    ("lineage", column, k),
                    f"{ref!r} is not a declared input column (`dataset.column` of inputs)",
                )


def _check_outputs(decl: UdfDeclaration, problems: _Problems) -> None:
    names = decl.column_names
    for i, name in enumerate(names):
        if names.index(name) != i:
            problems.add(("schema", i, "name"), f"column {name!r} is declared twice")
    rule_names = [r.name for r in decl.quality]
    for i, rule in enumerate(decl.quality):
        if rule.kind not in ORG_RULE_KINDS:
            problems.add(
                ("quality", i, "kind"),
                f"{rule.kind!r} rules are the platform's; a transform's rules are "
                f"{', '.join(ORG_RULE_KINDS)}",
            )
        if rule_names.count(rule.name) > 1:
            problems.add(("quality", i, "name"), f"rule name {rule.name!r} is used twice")
        for column in rule.columns_used():
            if column not in names:
                problems.add(
                    ("quality", i), f"{column!r} is not a column of the schema ({', '.join(names)})"
                )


def _check_sql(
    decl: UdfDeclaration, catalogue: Mapping[str, InputDataset], problems: _Problems
) -> None:
    assert isinstance(decl.code, SqlCode)
    try:
        shape = check_select(decl.code.sql, decl.input_schemas(catalogue))
    except SqlProblem as exc:
        problems.add(("code", "sql"), str(exc))
        return
    got = [name for name, _ in shape.columns]
    if got != decl.column_names:
        problems.add(
            ("code", "sql"),
            f"the SELECT returns the columns {', '.join(got)}; the schema declares "
            f"{', '.join(decl.column_names)} (same names, same order)",
        )
        return
    declared_types = duckdb_types(arrow_schema(as_dataset_declaration(decl)))
    for i, ((name, returned), (_, declared)) in enumerate(
        zip(shape.columns, declared_types, strict=True)
    ):
        if returned != declared:
            problems.add(
                ("schema", i, "type"),
                f"the SELECT returns {name!r} as {returned}, declared {decl.columns[i].type} "
                f"({declared}): cast it in the SELECT (CAST(... AS {declared})) or declare the "
                "type it returns",
            )


def as_dataset_declaration(decl: UdfDeclaration, source_file: str = "") -> DatasetDeclaration:
    """The transform as a derived dataset of the platform's registry (not public: readable by
    its organisation only, through the one access rule)."""
    every_input = [f"{i.dataset}.{c}" for i in decl.inputs for c in i.columns]
    return DatasetDeclaration.model_validate(
        {
            "format_version": 1,
            "name": decl.name,
            "kind": "derived",
            "description": decl.description,
            "owner": decl.owner or f"team:{decl.org}",
            "upstream": [i.dataset for i in decl.inputs],
            "partitioning": decl.partitioning,
            "commit_mode": decl.mode,
            "schema": [c.model_dump() for c in decl.columns],
            "lineage": {c: decl.lineage.get(c, every_input) for c in decl.column_names},
            "quality": [r.model_dump() for r in decl.quality],
            "public": False,
            "source_file": source_file,
        }
    )
