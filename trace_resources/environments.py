"""Trace's environments (dev, staging, prod …): named deployments, each with its own state and
data databases and its own directory of dataset declarations, listed in one YAML file (the
setting TRACE_ENVIRONMENTS_FILE, default `trace-environments.yaml`):

    format_version: 1
    environments:
      dev:
        state_dsn: postgresql+psycopg2://trace:${DEV_PG_PASSWORD}@dev-db/trace_state
        data_dsn: postgresql+psycopg2://trace:${DEV_PG_PASSWORD}@dev-db/trace_data
        datasets_dir: dev/datasets        # relative to this file
        dagster_url: http://dev-dagster:3000   # optional: reloaded after a promotion
      staging: {...}

`${NAME}` in a value is read from the environment when the file is loaded, so passwords stay
in the platform's secret store, not in the file. `trace promote` (`trace_resources.promotion`)
copies configuration from one environment to another.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trace_resources.errors import ConfigError

__all__ = ["Environment", "EnvironmentsError", "load_environments", "environment"]

_NAME = r"^[a-z][a-z0-9_-]{0,31}$"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class EnvironmentsError(ConfigError):
    """The environments file is missing or invalid, or names no such environment."""


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="the environment's name, e.g. staging")
    state_dsn: str = Field(min_length=1, description="SQLAlchemy URL of its state database")
    data_dsn: str = Field(min_length=1, description="SQLAlchemy URL of its data database")
    datasets_dir: Path = Field(description="the directory of its dataset declarations (*.yaml)")
    dagster_url: str | None = Field(
        default=None,
        description="its Dagster webserver, told to reload the code location after a promotion "
        "or rollback changed transforms or declarations (unset: reload by hand)",
    )
    dagster_location: str = Field(default="trace", description="the code location to reload")


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    environments: dict[str, dict[str, Any]] = Field(min_length=1)


def _expand(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise EnvironmentsError(f"{where}: ${{{name}}} is not set; export {name}")
        return os.environ[name]

    return _VAR.sub(lookup, value)


def load_environments(path: Path | str) -> dict[str, Environment]:
    """Every environment of the file, by name; EnvironmentsError says what to fix."""
    path = Path(path)
    if not path.is_file():
        raise EnvironmentsError(
            f"{path}: no environments file; write one (see README, 'Environment promotion') or "
            "point TRACE_ENVIRONMENTS_FILE at it"
        )
    try:
        raw = yaml.safe_load(path.read_text())
        parsed = _File.model_validate(raw)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise EnvironmentsError(f"{path}: line {line}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise EnvironmentsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<document>"
        raise EnvironmentsError(f"{path}: {where}: {first['msg']}") from None
    out: dict[str, Environment] = {}
    for name, fields in parsed.environments.items():
        where = f"{path}: environments.{name}"
        if not isinstance(fields, dict):
            raise EnvironmentsError(f"{where}: give state_dsn, data_dsn and datasets_dir")
        values = {k: _expand(v, f"{where}.{k}") for k, v in fields.items()}
        try:
            env = Environment.model_validate({"name": name, **values})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise EnvironmentsError(f"{where}.{field}: {first['msg']}") from None
        if not env.datasets_dir.is_absolute():
            env = env.model_copy(update={"datasets_dir": path.parent / env.datasets_dir})
        out[name] = env
    return out


def environment(path: Path | str, name: str) -> Environment:
    """One environment of the file; EnvironmentsError lists the known names."""
    found = load_environments(path)
    if name not in found:
        raise EnvironmentsError(
            f"unknown environment {name!r}; {path} declares {', '.join(sorted(found))}"
        )
    return found[name]
