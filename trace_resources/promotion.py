"""Environment promotion (`trace promote --from dev --to staging`): dataset declarations, UDF
declarations, alert rules and saved queries of one environment (`environments.py`) copied to
another, so that the target holds what the source holds.

    plan(source, target)      the diff: per kind, the items added, changed and removed, each
                              changed item with a readable diff; nothing is written
    apply(source, target, …)  the same diff, checked (schema compatibility with the target's
                              committed versions, each store's own validation), then applied
                              all or nothing and recorded in the target's promotion log with
                              every touched item's prior state
    rollback(target, id, …)   restores every item that promotion touched to its prior state

What "removed" means per kind: a dataset declaration's file is deleted (refused while the
target holds committed versions of it); an alert rule is disabled (a new version, as
`trace alerts rule disable`); a saved query is deleted; a transform is kept, since Trace has
no way to retire one (the plan says so in its notes).

Atomicity: the state commit decides. One transaction of the target's state database writes
the UDFs, the saved queries and the log entry; the alert rules (data database, a transaction
held open until then) and the declaration files (staged beside their final names, tagged with
the step) are written after it, and the entry is marked complete. A step killed in between is
finished by the next promotion or rollback into the target (`_finish`), before it does
anything else; files staged by a step killed before its state commit are deleted then.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import yaml

from trace_resources.alert_pipeline import rules as rule_store
from trace_resources.alert_pipeline.rules import AlertRule, RuleError, RuleStore, parse_rule
from trace_resources.alert_pipeline.tables import data_engine
from trace_resources.environments import Environment
from trace_resources.errors import TraceError
from trace_resources.registry import (
    DatasetDeclaration,
    DeclarationError,
    arrow_schema,
    load_declarations,
)
from trace_resources.sealed import SECRET_FIELDS
from trace_resources.storage import promotions as log
from trace_resources.storage import saved_queries as query_store
from trace_resources.storage import udfs as udf_store
from trace_resources.storage.crash import crash_point
from trace_resources.storage.read_model import ReadModel
from trace_resources.storage.schemas import breaking_change, schema_fields
from trace_resources.storage.state import engine_for
from trace_resources.udfs.declaration import UdfError, as_dataset_declaration
from trace_resources.udfs.registry import validate as validate_udf

__all__ = [
    "KINDS",
    "Change",
    "Plan",
    "PromotionError",
    "plan",
    "apply",
    "rollback",
    "promotion_log",
    "summary",
    "as_json",
]

Kind = Literal["datasets", "udfs", "alert_rules", "saved_queries"]
KINDS: tuple[Kind, ...] = ("datasets", "udfs", "alert_rules", "saved_queries")
Action = Literal["added", "changed", "removed"]
RuleCheck = Callable[[AlertRule], None]
_MARKS: tuple[tuple[Action, str], ...] = (("added", "+"), ("changed", "~"), ("removed", "-"))


class PromotionError(TraceError):
    """A promotion or rollback was refused; the message names each item and what is wrong."""


@dataclass(frozen=True)
class Change:
    """One item the promotion writes: `old` is the target's content, `new` the source's (None:
    absent), in the form the diff shows; `source` is what the source's store holds."""

    kind: Kind
    key: str
    action: Action
    old: Any
    new: Any
    source: Any = None

    def diff(self) -> str:
        """A unified diff, target to source (channel secrets shown as fingerprints)."""
        before = _shown(_redacted(self.old)).splitlines(keepends=True)
        after = _shown(_redacted(self.new)).splitlines(keepends=True)
        lines = difflib.unified_diff(before, after, "target", "source", n=2)
        return "".join(lines)


@dataclass
class Plan:
    source: str
    target: str
    changes: list[Change]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what `apply` would refuse

    def of(self, kind: Kind, action: Action) -> list[str]:
        return [c.key for c in self.changes if c.kind == kind and c.action == action]

    def report(self) -> str:
        """The diff as an operator reads it: per kind, the keys added, changed and removed,
        then the diff of every item changed (or, for an alert rule, disabled)."""
        out = [f"promotion {self.source} -> {self.target}:"]
        for kind in KINDS:
            counts = ", ".join(f"{len(self.of(kind, a))} {a}" for a, _ in _MARKS)
            out.append(f"  {kind}: {counts}")
            for action, mark in _MARKS:
                out += [f"    {mark} {key}" for key in self.of(kind, action)]
        for change in self.changes:
            if change.old is not None and change.new is not None:
                out += [f"--- {change.kind} {change.key}", change.diff().rstrip("\n")]
        out += [f"  note: {n}" for n in self.notes]
        if self.problems:
            out.append("refused (apply would change nothing):")
            out += [f"  {p}" for p in self.problems]
        if not self.changes:
            out.append(
                f"  nothing to promote: {self.target} already holds what {self.source} holds"
            )
        return "\n".join(out)


def _redacted(value: Any) -> Any:
    """An alert rule's spec with each channel secret replaced by a fingerprint of it, so a
    diff shows that a secret changed without showing it."""
    if not isinstance(value, dict) or not isinstance(value.get("channels"), list):
        return value
    channels = []
    for channel in value["channels"]:
        channel = dict(channel)
        for name in SECRET_FIELDS:
            if isinstance(channel.get(name), str):
                digest = hashlib.sha256(channel[name].encode()).hexdigest()[:12]
                channel[name] = f"<secret sha256:{digest}>"
        channels.append(channel)
    return {**value, "channels": channels}


def _one_line(error: Exception) -> str:
    """An error's message on one line (its lines joined by "; ")."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, sort_keys=True, default_flow_style=False)


# ---- reading an environment's items ------------------------------------------------------


def _dataset_files(env: Environment) -> dict[str, str]:
    directory = env.datasets_dir
    if not directory.is_dir():
        raise PromotionError(
            f"environment {env.name}: datasets_dir {directory} is not a directory; create it or "
            "fix datasets_dir in the environments file"
        )
    return {p.stem: p.read_text() for p in sorted(directory.glob("*.yaml"))}


def _udfs(conn: sa.Connection) -> dict[str, udf_store.StoredUdf]:
    return {u.name: u for u in udf_store.latest(conn)}


def _rules(conn: sa.Connection) -> dict[str, tuple[int, dict[str, Any]]]:
    return {f"{org}/{rid}": found for (org, rid), found in rule_store.rules_in_force(conn).items()}


def _queries(conn: sa.Connection) -> dict[str, query_store.SavedQuery]:
    return {f"{q['org']}/{q['name']}": q for q in query_store.every_saved_query(conn)}


def _query_content(row: query_store.SavedQuery) -> dict[str, Any]:
    return {"sql": row["sql"], "description": row["description"]}


@dataclass
class _Items:
    datasets: dict[str, str]
    udfs: dict[str, udf_store.StoredUdf]
    rules: dict[str, tuple[int, dict[str, Any]]]
    queries: dict[str, query_store.SavedQuery]


def _read(env: Environment, state: sa.Connection, data: sa.Connection) -> _Items:
    return _Items(_dataset_files(env), _udfs(state), _rules(data), _queries(state))


@contextmanager
def _connections(env: Environment) -> Iterator[tuple[sa.Connection, sa.Connection]]:
    with (
        engine_for(env.state_dsn).connect() as state,
        data_engine(env.data_dsn).connect() as data,
    ):
        yield state, data


# ---- the diff ----------------------------------------------------------------------------


def _diff(
    kind: Kind, old: dict[str, Any], new: dict[str, Any], source: dict[str, Any]
) -> list[Change]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(Change(kind, key, "added", None, new[key], source[key]))
        elif key not in new:
            changes.append(Change(kind, key, "removed", old[key], None))
        elif old[key] != new[key]:
            changes.append(Change(kind, key, "changed", old[key], new[key], source[key]))
    return changes


def _compare(source: str, target: str, src: _Items, dst: _Items) -> Plan:
    changes = _diff("datasets", dst.datasets, src.datasets, src.datasets)
    udf_old = {k: u.declaration for k, u in dst.udfs.items()}
    udf_new = {k: u.declaration for k, u in src.udfs.items()}
    kept = sorted(set(udf_old) - set(udf_new))
    changes += [c for c in _diff("udfs", udf_old, udf_new, src.udfs) if c.action != "removed"]
    rule_old = {k: spec for k, (_, spec) in dst.rules.items()}
    rule_new = {k: spec for k, (_, spec) in src.rules.items()}
    for key in set(rule_old) - set(rule_new):
        if not rule_old[key].get("enabled", True):
            rule_new[key] = rule_old[key]  # absent in the source, already disabled here
    for change in _diff("alert_rules", rule_old, rule_new, rule_new):
        if change.action == "removed":  # removing a rule is disabling it
            disabled = {**change.old, "enabled": False}
            change = Change("alert_rules", change.key, "removed", change.old, disabled, disabled)
        changes.append(change)
    q_old = {k: _query_content(q) for k, q in dst.queries.items()}
    q_new = {k: _query_content(q) for k, q in src.queries.items()}
    changes += _diff("saved_queries", q_old, q_new, src.queries)
    notes = [
        f"transform {name} is in {target} but not in {source}; it is kept (Trace can not retire "
        "a transform)"
        for name in kept
    ]
    return Plan(source, target, changes, notes)


def plan(source: Environment, target: Environment, rule_check: RuleCheck | None = None) -> Plan:
    """What promoting `source` into `target` would change, and what `apply` would refuse
    (`Plan.problems`, alert rules checked as the target's rule store checks them, with
    `rule_check` as its scope check); nothing is written."""
    _refuse_same(source, target)
    with _connections(source) as (s_state, s_data), _connections(target) as (t_state, t_data):
        found = _compare(
            source.name, target.name, _read(source, s_state, s_data), _read(target, t_state, t_data)
        )
        found.problems = _problems(found, source, target, t_state)
    rules = RuleStore(data_engine(target.data_dsn), check=rule_check)
    found.problems += [p for c in found.changes if (p := _rule_problem(c, rules))]
    return found


def _rule_problem(change: Change, rules: RuleStore) -> str | None:
    """Why the target's rule store would refuse the rule (None: it would not, or no rule)."""
    if change.kind != "alert_rules":
        return None
    try:
        rules.validate(parse_rule(change.source, f"rule {change.key}"))
    except RuleError as exc:
        return f"alert rule {change.key}: {_one_line(exc)}"
    return None


def _refuse_same(source: Environment, target: Environment) -> None:
    if source.name == target.name or source.state_dsn == target.state_dsn:
        raise PromotionError(
            f"--from {source.name} and --to {target.name} are the same environment; promote "
            "between two different ones, e.g. --from dev --to staging"
        )


# ---- checks ------------------------------------------------------------------------------


def _schema_problem(
    read: ReadModel, name: str, decl: DatasetDeclaration, target: str
) -> str | None:
    registered = read.registered_schema(name)
    if registered is None:
        return None
    version, fields = registered
    problem = breaking_change(fields, schema_fields(arrow_schema(decl)))
    if problem is None:
        return None
    return (
        f"{name}: its new schema breaks the versions committed in {target} under schema "
        f"v{version} ({problem}); keep the old columns and types (new columns nullable) or "
        "declare a new dataset"
    )


def _problems(
    plan_: Plan, source: Environment, target: Environment, state: sa.Connection
) -> list[str]:
    """Every reason the target would break, each naming the item and the change."""
    problems: list[str] = []
    read = ReadModel(state.engine)
    writes = plan_.of("datasets", "added") + plan_.of("datasets", "changed")
    try:
        decls = load_declarations(source.datasets_dir) if writes else {}
    except DeclarationError as exc:
        return [f"dataset declarations of {source.name} are invalid: {_one_line(exc)}"]
    for change in plan_.changes:
        if change.kind == "datasets" and change.action != "removed":
            problem = _schema_problem(read, change.key, decls[change.key], target.name)
            problems += [f"dataset {problem}"] if problem else []
        elif change.kind == "datasets":
            committed = read.current_version_numbers(change.key)
            if committed:
                problems.append(
                    f"dataset {change.key}: {target.name} holds {len(committed)} committed "
                    f"partition(s) of it; removing its declaration would orphan them (GC them "
                    f"in {target.name} first, or keep the declaration in {source.name})"
                )
        elif change.kind == "udfs":
            problems += _udf_problems(change, target, state)
    return problems


def _check(plan_: Plan, source: Environment, target: Environment, state: sa.Connection) -> None:
    problems = _problems(plan_, source, target, state)
    if problems:
        raise PromotionError(
            f"promotion {source.name} -> {target.name} refused, nothing applied: "
            + "; ".join(problems)
        )


def _udf_problems(change: Change, target: Environment, state: sa.Connection) -> list[str]:
    stored: udf_store.StoredUdf = change.source
    text = yaml.safe_dump(stored.declaration, sort_keys=False)
    try:
        decl = validate_udf(state.engine, text, f"{stored.name} (from {stored.source_file})")
    except (UdfError, DeclarationError) as exc:
        return [f"transform {change.key}: not valid in {target.name}: {_one_line(exc)}"]
    problem = _schema_problem(
        ReadModel(state.engine), decl.name, as_dataset_declaration(decl), target.name
    )
    return [f"transform {problem}"] if problem else []


# ---- applying ----------------------------------------------------------------------------


_STAGED = re.compile(
    r"^\.(?P<name>[a-z][a-z0-9_]*)\.yaml\.(?P<tag>(promotion|rollback)-\d+)(?P<remove>\.remove)?$"
)


class _Files:
    """Declaration files staged beside their final names (a removal as an empty `.remove`
    marker), tagged with the promotion and step, and published (renamed into place) once the
    step's state commit decided it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pending: dict[str, str | None] = {}

    def put(self, name: str, text: str | None) -> None:
        self.pending[name] = text

    def stage(self, tag: str) -> None:
        for name, text in self.pending.items():
            staged = self.directory / f".{name}.yaml.{tag}"
            if text is None:
                staged.with_name(staged.name + ".remove").write_text("")
            else:
                staged.write_text(text)

    def discard(self) -> None:
        self.finish(None)

    def finish(self, decided: str | None) -> None:
        """Publish what the step tagged `decided` staged; delete anything else staged (what
        an undecided step, killed before its state commit, left behind)."""
        for staged in sorted(self.directory.iterdir()):
            match = _STAGED.match(staged.name)
            if match is None:
                continue
            final = self.directory / f"{match['name']}.yaml"
            if match["tag"] != decided:
                staged.unlink(missing_ok=True)
            elif match["remove"]:
                final.unlink(missing_ok=True)
                staged.unlink()
            else:
                os.replace(staged, final)


def _apply_change(
    change: Change,
    actor: str,
    state: sa.Connection,
    data: sa.Connection,
    rules: RuleStore,
    files: _Files,
    prior: _Items,
) -> dict[str, Any]:
    """Write one change; returns its log entry (prior and new state, for the rollback)."""
    entry: dict[str, Any] = {"kind": change.kind, "key": change.key, "action": change.action}
    if change.kind == "datasets":
        files.put(change.key, change.new)
        entry |= {"before": change.old, "after": change.new}
    elif change.kind == "udfs":
        stored: udf_store.StoredUdf = change.source
        done = udf_store.apply_version(
            state,
            name=stored.name,
            org=stored.org,
            source_file=stored.source_file,
            source=stored.source,
            declaration=stored.declaration,
            applied_by=actor,
        )
        before = prior.udfs.get(change.key)
        entry |= {"before": before.version if before else 0, "after": done.version}
    elif change.kind == "alert_rules":
        try:
            done_rule = rules.put_in(data, parse_rule(change.source, f"rule {change.key}"))
        except RuleError as exc:
            raise PromotionError(
                f"alert rule {change.key}: refused by the target, nothing applied: {_one_line(exc)}"
            ) from None
        before_rule = prior.rules.get(change.key)
        entry |= {
            "before": before_rule[0] if before_rule else 0,
            "after": done_rule.version,
            "spec": change.source,  # what a stopped promotion's finish writes again
        }
    else:
        org, name = change.key.split("/", 1)
        old = prior.queries.get(change.key)
        if change.new is None:
            query_store.restore_saved_query(state, org, name, None)
        else:
            query_store.put_saved_query(state, org=org, name=name, created_by=actor, **change.new)
        entry |= {"before": _jsonable(old), "after": change.new}
    return entry


def _jsonable(row: query_store.SavedQuery | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def apply(
    source: Environment,
    target: Environment,
    actor: str,
    rule_check: RuleCheck | None = None,
) -> tuple[Plan, log.Promotion | None]:
    """Check and apply the promotion all or nothing; returns the plan and the log entry
    (None when there was nothing to promote). PromotionError names every item refused.

    The state commit (transforms, saved queries, the log entry) decides the promotion; the
    alert rules (data database) and declaration files follow it. A process stopped between
    the two leaves the entry unfinished, and the next promotion or rollback into the target
    finishes it first (`_finish`)."""
    _refuse_same(source, target)
    with _connections(source) as (s_state, s_data):
        src = _read(source, s_state, s_data)
    rules = RuleStore(data_engine(target.data_dsn), check=rule_check)
    with _connections(target) as (state, data), _locked(target, state, data, rules):
        files = _Files(target.datasets_dir)
        state_tx, data_tx = state.begin(), data.begin()
        try:
            prior = _read(target, state, data)
            found = _compare(source.name, target.name, src, prior)
            if not found.changes:
                state_tx.rollback()
                data_tx.rollback()
                return found, None
            _check(found, source, target, state)
            entries = [
                _apply_change(c, actor, state, data, rules, files, prior) for c in found.changes
            ]
            promotion = log.record(
                state,
                source_env=source.name,
                target_env=target.name,
                actor=actor,
                changes=entries,
            )
            files.stage(f"promotion-{promotion.id}")
            state_tx.commit()
        except BaseException:
            files.discard()
            data_tx.rollback()
            state_tx.rollback()
            raise
        crash_point("promote.after_state_commit")
        _complete(target, state, data_tx, files, promotion, rollback=False)
    return found, promotion


def _complete(
    target: Environment,
    state: sa.Connection,
    data_tx: sa.RootTransaction,
    files: _Files,
    promotion: log.Promotion,
    *,
    rollback: bool,
) -> None:
    """The writes after a decided step: commit the rules, publish the files, mark it done."""
    step = "rollback" if rollback else "promotion"
    try:
        data_tx.commit()
    except sa.exc.SQLAlchemyError as exc:
        raise PromotionError(
            f"{step} {promotion.id} is recorded in {target.name} but its alert rules did not "
            f"commit ({_one_line(exc)}); the next `trace promote` into {target.name} finishes it"
        ) from None
    files.finish(f"{step}-{promotion.id}")
    with state.begin():
        log.mark_completed(state, promotion.id, rollback, _without_specs(promotion.changes))


def _without_specs(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log entries without the rules' specs (their sealed channel secrets): only
    finishing a stopped promotion needs them, and the data database keeps the rules."""
    return [{k: v for k, v in entry.items() if k != "spec"} for entry in changes]


@contextmanager
def _locked(
    target: Environment, state: sa.Connection, data: sa.Connection, rules: RuleStore
) -> Iterator[None]:
    """Hold the target's promotion lock, having first finished a step a stopped process left
    unfinished."""
    log.lock(state)
    try:
        _finish(target, state, data, rules)
        yield
    finally:
        log.unlock(state)


def _finish(
    target: Environment, state: sa.Connection, data: sa.Connection, rules: RuleStore
) -> None:
    """Finish the one step (apply or rollback) whose state commit happened but whose rules or
    files were not written, and delete what undecided steps staged."""
    with state.begin():
        found = log.latest_unfinished(state)
    files = _Files(target.datasets_dir)
    if found is None:
        files.discard()
        return
    promotion, rollback = found
    with data.begin():
        for entry in promotion.changes:
            if entry["kind"] != "alert_rules":
                continue
            org, rule_id = entry["key"].split("/", 1)
            version = rule_store.rules_in_force(data).get((org, rule_id), (0, None))[0]
            if rollback and version > entry["before"]:
                rule_store.undo_rule_versions_after(data, org, rule_id, entry["before"])
            elif not rollback and version < entry["after"]:
                rules.put_in(data, parse_rule(entry["spec"], f"rule {entry['key']}"))
    step = "rollback" if rollback else "promotion"
    files.finish(f"{step}-{promotion.id}")
    with state.begin():
        log.mark_completed(state, promotion.id, rollback, _without_specs(promotion.changes))


# ---- rollback ----------------------------------------------------------------------------


def _drifted(entry: dict[str, Any], now: _Items) -> bool:
    """Whether the item changed since the promotion wrote it (then it is not rolled back)."""
    kind, key, after = entry["kind"], entry["key"], entry["after"]
    if kind == "datasets":
        return now.datasets.get(key) != after
    if kind == "udfs":
        current = now.udfs.get(key)
        return current is None or current.version != after
    if kind == "alert_rules":
        found = now.rules.get(key)
        return found is None or found[0] != after
    row = now.queries.get(key)
    return (None if row is None else _query_content(row)) != after


def rollback(target: Environment, promotion_id: int, actor: str) -> log.Promotion:
    """Restore every item promotion `promotion_id` touched to its state before it, all or
    nothing (decided by the state commit, as `apply`); refused if a later promotion is still
    applied or an item changed since."""
    rules = RuleStore(data_engine(target.data_dsn))
    with _connections(target) as (state, data), _locked(target, state, data, rules):
        files = _Files(target.datasets_dir)
        state_tx, data_tx = state.begin(), data.begin()
        try:
            promotion = _rollbackable(state, promotion_id, target)
            now = _read(target, state, data)
            drifted = [f"{e['kind']} {e['key']}" for e in promotion.changes if _drifted(e, now)]
            if drifted:
                raise PromotionError(
                    f"promotion {promotion_id} can not be rolled back: changed in {target.name} "
                    f"since: {', '.join(drifted)}; promote or edit them back by hand"
                )
            for entry in promotion.changes:
                _restore(entry, state, data, files)
            log.mark_rolled_back(state, promotion_id, actor)
            files.stage(f"rollback-{promotion_id}")
            state_tx.commit()
        except BaseException:
            files.discard()
            data_tx.rollback()
            state_tx.rollback()
            raise
        _complete(target, state, data_tx, files, promotion, rollback=True)
    return promotion


def _rollbackable(state: sa.Connection, promotion_id: int, target: Environment) -> log.Promotion:
    promotion = log.get(state, promotion_id)
    if promotion is None:
        raise PromotionError(
            f"no promotion {promotion_id} in {target.name}; `trace promote log --env "
            f"{target.name}` lists them"
        )
    if promotion.rolled_back_at is not None:
        raise PromotionError(
            f"promotion {promotion_id} was already rolled back by {promotion.rolled_back_by} "
            f"at {promotion.rolled_back_at:%Y-%m-%d %H:%M:%S}"
        )
    later = log.later_than(state, promotion_id)
    if later:
        raise PromotionError(
            f"promotion {promotion_id} is followed by promotion(s) {', '.join(map(str, later))} "
            f"in {target.name}; roll those back first, newest first"
        )
    return promotion


def _restore(
    entry: dict[str, Any], state: sa.Connection, data: sa.Connection, files: _Files
) -> None:
    kind, key, before = entry["kind"], entry["key"], entry["before"]
    if kind == "datasets":
        files.put(key, before)
    elif kind == "udfs":
        udf_store.undo_versions_after(state, key, before)
    elif kind == "alert_rules":
        org, rule_id = key.split("/", 1)
        rule_store.undo_rule_versions_after(data, org, rule_id, before)
    else:
        org, name = key.split("/", 1)
        row = None
        if before is not None:
            row = {**before, "created_at": datetime.fromisoformat(before["created_at"])}
        query_store.restore_saved_query(state, org, name, row)  # type: ignore[arg-type]


def promotion_log(target: Environment) -> list[log.Promotion]:
    """Every promotion into `target`, newest first."""
    return log.listed(engine_for(target.state_dsn))


def summary(promotion: log.Promotion) -> str:
    """`3 datasets, 1 alert_rules` — what a promotion touched, per kind."""
    counts: dict[str, int] = {}
    for entry in promotion.changes:
        counts[entry["kind"]] = counts.get(entry["kind"], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing"


def as_json(plan_: Plan) -> dict[str, Any]:
    """The plan for `--json`: per kind, the keys added, changed and removed."""
    return {
        "source": plan_.source,
        "target": plan_.target,
        "kinds": {kind: {a: plan_.of(kind, a) for a, _ in _MARKS} for kind in KINDS},
        "notes": plan_.notes,
        "refused": plan_.problems,
    }
