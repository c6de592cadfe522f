"""How the `trace` command fails: `CliError` for an operator's mistake found by a command,
`unknown` for a name that does not exist (with what does), `require_dagster_home` before the
Dagster instance is opened, and `explain`, which `main` calls on every exception to turn the
mistakes and missing services an operator can fix into one line saying how.

An exception `explain` does not know is a bug in Trace: `main` says so in one line and shows
the traceback with `--debug` or `TRACE_DEBUG=1`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path

from trace_resources.errors import RpcFaultError, RpcUnreachableError, TraceError

__all__ = ["CliError", "explain", "require_dagster_home", "unknown"]

SERVICES_UP = "start the local services with `make services-up` (`make dev` starts them too)"
# how many names a message lists before it lists only the closest ones
_LIST_AT_MOST = 20


class CliError(TraceError):
    """An operator's mistake a command found (an unknown name, a missing setting): one line."""


def unknown(
    kind: str, name: str, existing: Iterable[str], *, where: str = "", hint: str = ""
) -> CliError:
    """`unknown dataset 'blockz'; datasets: blocks, logs, transactions` (or, when there are many,
    the closest matches), as the error to raise; `where` qualifies the kind ("of blocks"),
    `hint` ends the message."""
    names = sorted(set(existing))
    plural = kind if kind.endswith("s") else f"{kind}s"
    place = f" {where}" if where else ""
    end = f" ({hint})" if hint else ""
    if not names:
        return CliError(f"unknown {kind} {name!r}{place}: there are no {plural}{place} yet{end}")
    if len(names) <= _LIST_AT_MOST:
        return CliError(f"unknown {kind} {name!r}{place}; {plural}{place}: {', '.join(names)}{end}")
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    found = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
    return CliError(f"unknown {kind} {name!r}{place} (one of {len(names)} {plural}; {found}){end}")


def require_dagster_home() -> Path:
    """$DAGSTER_HOME, checked before Dagster opens its instance (whose own error is a screen of
    text, or a traceback)."""
    value = os.environ.get("DAGSTER_HOME")
    fix = (
        'set it for the local services with `eval "$(.venv/bin/python -m infra.local.services '
        'env)"` (`make dev` sets it), or `export DAGSTER_HOME=$PWD/dagster_home`'
    )
    if not value:
        raise CliError(f"DAGSTER_HOME is not set (the Dagster instance's directory): {fix}")
    home = Path(value)
    if not home.is_absolute() or not home.is_dir():
        problem = "is not an absolute path" if not home.is_absolute() else "is not a directory"
        raise CliError(f"DAGSTER_HOME={value} {problem}: {fix}")
    return home


def explain(exc: BaseException) -> str | None:
    """One line saying what went wrong and how to fix it, or None for a bug in Trace."""
    for explainer in (
        _trace_error,
        _settings_error,
        _database_error,
        _object_store_error,
        _dagster_error,
        _file_error,
    ):
        message = explainer(exc)
        if message is not None:
            return message
    return None


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _trace_error(exc: BaseException) -> str | None:
    if isinstance(exc, CliError):
        return str(exc)
    if not isinstance(exc, TraceError):
        return None
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RpcUnreachableError):
        message += "; locally `make services-up` (or `make dev`) starts the anvil devnet"
    elif isinstance(exc, RpcFaultError) and "HTTP 4" in str(exc):
        message += " (is TRACE_RPC_URL the node's JSON-RPC URL?)"
    return message


def _settings_error(exc: BaseException) -> str | None:
    from pydantic import ValidationError

    from trace_resources.settings import Settings

    settings_classes = {Settings.__name__, *(c.__name__ for c in Settings.__subclasses__())}
    if not isinstance(exc, ValidationError) or exc.title not in settings_classes:
        return None
    problems = []
    for error in exc.errors():
        field = "_".join(str(p) for p in error["loc"]).upper()
        text = error["msg"].removeprefix("Value error, ")
        problems.append(f"TRACE_{field}: {text}" if field else text)
    return f"invalid setting: {'; '.join(problems)} (see trace_resources/settings.py)"


def _database_error(exc: BaseException) -> str | None:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if isinstance(exc, OperationalError):
        reason = _first_line(exc.orig)
        if "does not exist" in reason:
            return f"PostgreSQL: {reason}: {SERVICES_UP}, or check TRACE_STATE_DSN/TRACE_DATA_DSN"
        return (
            f"PostgreSQL does not answer ({reason}): {SERVICES_UP}, or point "
            "TRACE_STATE_DSN/TRACE_DATA_DSN at a running server"
        )
    if isinstance(exc, ProgrammingError) and "does not exist" in str(exc.orig):
        return (
            f"PostgreSQL: {_first_line(exc.orig)}: the database is not migrated; run "
            "`trace db upgrade`"
        )
    return None


def _object_store_error(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, OSError) and "AWS Error" in str(exc):  # pyarrow's S3 filesystem
        text = str(exc)
        if "NETWORK_CONNECTION" in text:
            return (
                f"the object store does not answer ({text.split(';')[0]}): {SERVICES_UP}, or "
                "check TRACE_S3_ENDPOINT_URL"
            )
        if "NO_SUCH_BUCKET" in text:
            return (
                f"{text.split(';')[0]}: {SERVICES_UP} (it creates the buckets), or check "
                "TRACE_BUCKET_DATASETS"
            )
        return f"the object store refused the request: {_first_line(text)}"
    if isinstance(exc, EndpointConnectionError):
        return (
            f"the object store does not answer ({exc}): {SERVICES_UP}, or check "
            "TRACE_S3_ENDPOINT_URL"
        )
    if isinstance(exc, NoCredentialsError):
        return (
            "no AWS credentials for the object store: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or use an instance role)"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        if error.get("Code") == "NoSuchBucket":
            return (
                f"the object store has no bucket {error.get('BucketName', '')!r}: "
                f"{SERVICES_UP} (it creates the buckets), or check TRACE_BUCKET_DATASETS"
            )
        return f"the object store refused the request: {exc}"
    return None


def _dagster_error(exc: BaseException) -> str | None:
    from dagster._core.errors import DagsterHomeNotSetError

    if isinstance(exc, DagsterHomeNotSetError):
        try:
            require_dagster_home()
        except CliError as explained:
            return str(explained)
    return None


def _file_error(exc: BaseException) -> str | None:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None
