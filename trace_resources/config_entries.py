"""A setting that holds a JSON list of declared entries (`TRACE_CHAINS`, `TRACE_TAPS`,
`TRACE_TRIGGERS`): parsed, each entry validated by its pydantic model, and any mistake refused
in one line naming the setting, the entry (`<entry> <position> ('<its name>')`) and the field."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import ValidationError

__all__ = ["validated_entries"]

M = TypeVar("M")


def _problems(exc: ValidationError, skip: int) -> str:
    errors = exc.errors()
    # a nested item's error also fails its list's length: name the nested one only
    deepest = [
        e
        for e in errors
        if not any(o is not e and o["loc"][: len(e["loc"])] == e["loc"] for o in errors)
    ]
    return "; ".join(
        f"{'.'.join(map(str, e['loc'][skip : skip + 3])) or 'entry'}: "
        + e["msg"].removeprefix("Value error, ")
        for e in deepest[:3]
    )


def validated_entries(
    text: str,
    validate: Callable[[Any], M],
    *,
    setting: str,
    entry: str,
    example: str,
    fields: Iterable[str],
    empty_ok: bool,
    skip_loc: int = 0,
) -> list[M]:
    """`validate` each item of the JSON list `text`, with `fields` (if any) listed in its
    errors. `validate` raises pydantic's ValidationError (the field is named from its location,
    less `skip_loc` leading parts such as a union's tag) or ValueError (its message used as it
    is)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(
            f"{setting} is not JSON ({exc}); expected a list such as {example}"
        ) from None
    if not isinstance(raw, list) or not (raw or empty_ok):
        kind = "a JSON list" if empty_ok else "a non-empty JSON list"
        raise ValueError(f"{setting} must be {kind} such as {example}")
    parsed: list[M] = []
    for position, item in enumerate(raw, start=1):
        where = f"{entry} {position}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            where += f" ({item['name']!r})"
        try:
            parsed.append(validate(item))
        except ValidationError as exc:
            named = f" (fields: {', '.join(fields)})" if fields else ""
            raise ValueError(f"{where}: {_problems(exc, skip_loc)}{named}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return parsed
