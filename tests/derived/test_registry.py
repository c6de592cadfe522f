"""Declarations: the raw ones match the extraction schemas, the assets carry what they declare,
and a declaration with an error names the exact file, line and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from trace_assets.definitions import build_definitions
from trace_assets.head.follower import HEAD_DATASETS
from trace_resources.chain.schemas import (
    RAW_DESCRIPTIONS,
    RAW_SCHEMAS,
    TRACE_DESCRIPTIONS,
    TRACE_SCHEMAS,
)
from trace_resources.registry import (
    DATASETS_DIR,
    DeclarationError,
    catalogue,
    catalogue_markdown,
    check_description,
    declarations,
    load_declarations,
)
from trace_resources.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_raw_declarations_match_the_extraction_schemas() -> None:
    descriptions = {**RAW_DESCRIPTIONS, **TRACE_DESCRIPTIONS}
    for name, schema in {**RAW_SCHEMAS, **TRACE_SCHEMAS}.items():
        decl = declarations()[name]
        assert decl.kind == "raw" and decl.partitioning == "block_range"
        assert [(c.name, c.arrow_type, c.nullable, c.doc) for c in decl.columns] == [
            (f.name, f.type, f.nullable, f.metadata[b"doc"].decode()) for f in schema
        ]
        assert " ".join(decl.description.split()) == " ".join(descriptions[name].split())


def test_assets_carry_their_declarations() -> None:
    graph = build_definitions(Settings()).resolve_asset_graph()
    for decl in declarations().values():
        node = graph.get(dg.AssetKey(decl.name))
        schema = node.metadata["dagster/column_schema"]
        assert [c.name for c in schema.columns] == decl.column_names
        checks = {k.name for k in graph.asset_check_keys if k.asset_key.path == [decl.name]}
        # the declared quality rules, the schema check, and the head tier's freshness check on
        # the datasets the head follower appends to
        head = {"head_freshness"} if decl.name in HEAD_DATASETS else set()
        assert checks == {r.name for r in decl.quality} | {"schema_matches_declaration"} | head
        assert node.owners == [decl.owner]
        for rule in decl.quality:  # described in words, as `trace docs` lists the rule
            spec = graph.get_check_spec(dg.AssetCheckKey(dg.AssetKey(decl.name), rule.name))
            assert spec.description == check_description(decl, rule)
            assert f"- `{rule.name}`: {spec.description}" in catalogue_markdown()
            assert '"kind"' not in spec.description  # no JSON dump of the rule
        if decl.kind == "derived":
            assert node.description == decl.description
            assert set(node.parent_keys) == {dg.AssetKey(u) for u in decl.upstream}
            lineage = node.metadata["dagster/column_lineage"]
            assert set(lineage.deps_by_column) == set(decl.column_names)
    lineage = graph.get(dg.AssetKey("erc20_transfers")).metadata["dagster/column_lineage"]
    assert (
        dg.TableColumnDep(asset_key=dg.AssetKey("logs"), column_name="topic1")
        in (lineage.deps_by_column["from_address"])
    )


def _write(tmp: Path, name: str, text: str) -> Path:
    for f in DATASETS_DIR.glob("*.yaml"):
        shutil.copy(f, tmp / f.name)
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    return path


def _mutate(tmp: Path, name: str, old: str, new: str, marker: str) -> tuple[Path, int]:
    """Write `name` with `old` replaced by `new`; the expected line is the one with `marker`."""
    text = (DATASETS_DIR / f"{name}.yaml").read_text()
    assert old in text
    text = text.replace(old, new, 1)
    line = text[: text.index(marker)].count("\n") + 1
    return _write(tmp, name, text), line


@pytest.mark.parametrize(
    ("name", "old", "new", "marker", "field", "says"),
    [
        (
            "contracts",
            "commit_mode: replace",
            "commit_mode: upsert",
            "upsert",
            "commit_mode",
            "'replace'",
        ),
        (
            "contracts",
            "kind: unique\n",
            "kind: unique\n    colums: [x]\n",
            "colums",
            "quality.0.colums",
            "Extra inputs are not permitted",
        ),
        (
            "native_transfers",
            "type: double",
            "type: float128",
            "float128",
            "schema.9.type",
            "unknown type 'float128'",
        ),
        (
            "erc20_transfers",
            'pattern: "0|[1-9][0-9]{0,77}"',
            'pattern: "0|[1-9"',
            '[1-9"',
            "quality.2.pattern",
            "does not compile",
        ),
        (
            "erc20_transfers",
            "  token: [logs.address]",
            "  token: [logs.adress]",
            "adress",
            "lineage.token.0",
            "logs has no column 'adress'",
        ),
        (
            "contracts",
            "owner: team:data-platform",
            "owner: data platform",
            "data platform",
            "owner",
            "neither an email address nor a team name prefixed with 'team:'",
        ),
        (
            "contracts",
            "upstream: [transactions]",
            "upstream: [transactions, receipts]",
            "transactions, receipts",
            "upstream.1",
            "unknown dataset 'receipts'",
        ),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, name: str, old: str, new: str, marker: str, field: str, says: str
) -> None:
    path, line = _mutate(tmp_path, name, old, new, marker)
    with pytest.raises(DeclarationError) as caught:
        load_declarations(tmp_path)
    message = str(caught.value)
    assert f"{path}:{line}: {field}: " in message, message
    assert says in message


def test_a_rule_threshold_out_of_bounds(tmp_path: Path) -> None:
    path, line = _mutate(
        tmp_path,
        "contracts",
        "    kind: unique\n",
        "    kind: unique\n    threshold: 1.5\n",
        "threshold: 1.5",
    )
    with pytest.raises(DeclarationError, match=rf"{path}:{line}: quality.0.threshold: .*1"):
        load_declarations(tmp_path)


def test_missing_field_and_yaml_syntax_errors(tmp_path: Path) -> None:
    text = (DATASETS_DIR / "contracts.yaml").read_text()
    path = _write(tmp_path, "contracts", text.replace("partitioning: block_range\n", ""))
    with pytest.raises(DeclarationError, match=rf"{path}:1: partitioning: Field required"):
        load_declarations(tmp_path)
    lines = text.splitlines()
    broken = next(i for i, line in enumerate(lines) if "{name:" in line)
    lines[broken] = lines[broken].replace("{name:", "{name: [")
    path = _write(tmp_path, "contracts", "\n".join(lines))
    with pytest.raises(DeclarationError, match=rf"{path}:{broken + 1}: invalid YAML"):
        load_declarations(tmp_path)
    path = _write(tmp_path, "contracts", text.replace("format_version: 1", "format_version: 2"))
    with pytest.raises(DeclarationError, match=rf"{path}:1: format_version: 2 is not supported"):
        load_declarations(tmp_path)


def test_catalogue_and_docs_command(tmp_path: Path) -> None:
    entries = {e["name"]: e for e in catalogue()}
    assert set(entries) == set(declarations())
    assert entries["erc20_transfers"]["schema"][6]["name"] == "token"
    assert entries["erc20_transfers"]["lineage"]["from_address"] == ["logs.topic1"]
    out = tmp_path / "catalogue.md"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("trace")), "docs", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == catalogue_markdown()
    text = out.read_text()
    assert "## token_daily_volume" in text
    assert "- owner: team:data-platform" in text
    assert (
        "- `transaction_index_plausible`: `transaction_index` is between 0 and 100000 (range "
        "rule; blocking: a failure stops the commit; fails on any failing row)" in text
    )
    assert (
        "| `from_address` | binary | no | sender (20 bytes); the zero address for mints | "
        "logs.topic1 |" in text
    )
