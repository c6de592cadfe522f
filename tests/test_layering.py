"""The import direction of DESIGN.md holds, and the check that says so fails on a violation.

`lint-imports` reads the contracts in pyproject.toml (`[tool.importlinter]`). To show it is not
a check that can not fail, it also runs on a copy of the packages into which one import against
the direction was added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["trace_resources", "trace_assets", "trace_sensors", "trace_query_api"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},  # the packages under `root`, not ours
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_packages_keep_the_layering() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("trace_sensors.outbox", "trace_assets.partitions"),
        ("trace_assets.alerts.scope", "trace_query_api.catalog"),
        ("trace_resources.storage.access", "trace_resources.alert_pipeline.rules"),
        ("trace_assets.cli.chain", "trace_sensors.chain_head"),  # only definitions.py may
        ("trace_query_api.catalog", "trace_assets.partitions"),
    ],
)
def test_an_import_against_the_layering_fails_the_check(
    tmp_path: Path, importer: str, imported: str
) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    assert lint_imports(tmp_path).returncode == 0  # the copy alone is clean
    target = tmp_path / (importer.replace(".", "/") + ".py")
    target.write_text(target.read_text() + f"\nimport {imported}  # noqa: E402\n")

    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "1 broken" in result.stdout, result.stdout
    assert f"{importer} -> {imported}" in result.stdout
