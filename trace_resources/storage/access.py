"""Who may read which dataset: Trace's one access rule, and the two tables it rests on.

    trace_query_public_datasets  datasets published to every organisation (`trace public add`)
    trace_query_revoked_tokens   token ids refused from now on (`trace token revoke`)

Every SQL statement on these tables is in this module. The query service (`Catalog`, the alert
rule routes), the alert evaluation (`AlertScope`) and the `trace` CLI all ask
`readable_datasets`; none of them decides readability on its own.

The rule. A dataset is readable by organisation `org` when it **exists** and is

- **public**: declared `public` in the registry (`trace_assets/datasets/*.yaml`, the default:
  the raw chain datasets and the derived ones, with their declared descriptions), or published
  by an operator with `trace public add NAME`; or
- **owned by `org`**: named `org_<org>__<name>` (e.g. `org_acme__wallet_labels`). Org ids are
  lowercase words of letters and digits joined by single underscores, so the name says its
  owner unambiguously and no registration can hand it to another organisation.

A dataset exists when it is public or committed (it has a row in `trace_datasets`). Names that
are not dataset names (`DATASET_PATTERN`) are never readable. Everything else is internal to
the platform. A token (`Principal`) can only narrow this: to its listed datasets and, for a
task token, to the listed partitions of a dataset (`ReadableDataset.partitions`), and an org
token to the datasets of its listed chains (`Principal.chains`).

Chains (`trace_resources.chains`). The primary chain's datasets have plain names; a secondary
chain's are `<chain>.<dataset>`, and its datasets (`SECONDARY_DATASETS`: raw and derived) are
public when the primary's are. A name qualified by a chain that is not configured is no dataset. An
organisation's own datasets belong to no chain, so a token limited to chains still reads them.

A dataset a caller may not read is absent from the answer, exactly like one that does not
exist, so no caller can tell the two apart.

Decision (issue 13): the alert evaluation used to admit, besides this rule, the alert datasets
`erc20_transfers` and `native_transfers` unconditionally and every declared dataset as a
candidate, and the rule routes admitted the alert datasets even to a token narrowed to other
datasets. Both alert datasets are declared public (`public` defaults to true and no
declaration sets it to false), so the extra clause granted nothing the rule does not; it is
gone, and a token narrowed to some datasets may now alert only on those. The built-in rule
kinds are the platform's own and are not checked against this rule (only custom SQL is); an
organisation's own dataset that was never committed does not exist, for the query service as
for alerts. Table names in SQL are identifiers, which SQL compares case-insensitively: the
query service and custom SQL conditions both read `FROM BLOCKS` as the dataset `blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from trace_resources.chains import SECONDARY_DATASETS, ChainNames, chain_names, chain_of
from trace_resources.registry import public_declared
from trace_resources.storage import state
from trace_resources.tokens import DATASET_PATTERN, Principal

__all__ = [
    "OWNED_PATTERN",
    "REVOKED_JTI_EXISTS",
    "ReadableDataset",
    "owner_of",
    "publish",
    "published",
    "readable_datasets",
    "published_table",
    "revoke_token",
    "revoked_table",
    "unpublish",
]

_now = sa.func.now()

published_table = sa.Table(
    "trace_query_public_datasets",
    state.metadata,
    sa.Column("dataset", sa.Text, primary_key=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("published_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

revoked_table = sa.Table(
    "trace_query_revoked_tokens",
    state.metadata,
    sa.Column("jti", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), server_default=_now, nullable=False),
)

OWNED_PATTERN = re.compile(r"^org_(?P<org>[a-z][a-z0-9]*(?:_[a-z0-9]+)*)__[a-z0-9][a-z0-9_]*$")

# for admission's one round trip (`trace_query_api.limits`), bound as `:jti`
REVOKED_JTI_EXISTS = "EXISTS (SELECT 1 FROM trace_query_revoked_tokens WHERE jti = :jti)"


def owner_of(dataset: str) -> str | None:
    """The organisation owning a dataset by its name, or None."""
    match = OWNED_PATTERN.match(dataset)
    return match.group("org") if match else None


# -- publishing ----------------------------------------------------------------------------


def publish(conn: sa.Connection, dataset: str, description: str | None) -> None:
    """Make `dataset` readable by every organisation (again: update its description)."""
    conn.execute(
        pg_insert(published_table)
        .values(dataset=dataset, description=description)
        .on_conflict_do_update(index_elements=["dataset"], set_={"description": description})
    )


def unpublish(conn: sa.Connection, dataset: str) -> None:
    conn.execute(published_table.delete().where(published_table.c.dataset == dataset))


def published(conn: sa.Connection, among: Iterable[str] | None = None) -> dict[str, str | None]:
    """The datasets published with `trace public add` (of `among`, if given), by name, with
    their descriptions."""
    table = published_table
    query = sa.select(table.c.dataset, table.c.description).order_by(table.c.dataset)
    if among is not None:
        query = query.where(table.c.dataset.in_(sorted(set(among))))
    return {name: description for name, description in conn.execute(query)}


# -- the rule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadableDataset:
    """A dataset a caller may read, and how."""

    name: str
    public: bool
    description: str | None  # public datasets only
    partitions: frozenset[str] | None = None  # None: every partition

    @property
    def owner(self) -> str | None:
        return owner_of(self.name)


def readable_datasets(
    db: sa.Engine | sa.Connection,
    org: str,
    principal: Principal | None = None,
    *,
    among: Iterable[str] | None = None,
) -> dict[str, ReadableDataset]:
    """The datasets organisation `org` may read, narrowed to what `principal` (a token of
    `org`) may read, by name. `among` limits the answer to those names (a query's tables),
    which spares the lookup of every committed dataset; names the rule decides alone (declared
    public, or not dataset names) cost no SQL, and given an engine no connection either."""
    if principal is not None and principal.org != org:
        raise ValueError(f"a token of {principal.org!r} does not read for {org!r}")
    chains = chain_names()
    wanted = None if among is None else {n for n in among if _may_name(principal, n, chains)}
    declared = _public_by_chain(public_declared(), chains)
    public, committed = _published_and_committed(db, wanted, declared)
    public = {**public, **declared}
    names = wanted if wanted is not None else set(public) | committed
    readable: dict[str, ReadableDataset] = {}
    for name in sorted(names):
        if not _may_name(principal, name, chains):
            continue
        partitions = principal.partitions_for(name) if principal is not None else None
        if name in public:
            readable[name] = ReadableDataset(name, True, public[name], partitions)
        elif name in committed and owner_of(name) == org:
            readable[name] = ReadableDataset(name, False, None, partitions)
    return readable


def _may_name(principal: Principal | None, name: str, chains: ChainNames) -> bool:
    """What the rule and the token decide from the name alone (publishing aside)."""
    if not DATASET_PATTERN.match(name):
        return False
    chain = chain_of(name, chains)
    if chain is None and "." in name:  # qualified by a chain that is not configured
        return False
    return principal is None or (principal.scope_allows(name) and principal.chain_allows(chain))


def _public_by_chain(declared: dict[str, str], chains: ChainNames) -> dict[str, str]:
    """The declared public datasets, and each secondary chain's datasets among them."""
    public = dict(declared)
    for chain in chains.secondaries:
        for dataset in SECONDARY_DATASETS:
            if dataset in declared:
                public[f"{chain}.{dataset}"] = declared[dataset]
    return public


def _published_and_committed(
    db: sa.Engine | sa.Connection, wanted: set[str] | None, declared: dict[str, str]
) -> tuple[dict[str, str | None], set[str]]:
    """Published datasets and committed dataset names (of `wanted`), in one round trip; none
    when every wanted name is declared public."""
    if wanted is not None:
        wanted = {n for n in wanted if n not in declared}
        if not wanted:
            return {}, set()
    pub, committed = published_table, state.datasets
    pub_query = sa.select(pub.c.dataset, pub.c.description, sa.true().label("is_published"))
    committed_query = sa.select(
        committed.c.name, sa.null().label("description"), sa.false().label("is_published")
    )
    if wanted is not None:
        pub_query = pub_query.where(pub.c.dataset.in_(sorted(wanted)))
        committed_query = committed_query.where(committed.c.name.in_(sorted(wanted)))
    published_rows: dict[str, str | None] = {}
    committed_names: set[str] = set()
    query = sa.union_all(pub_query, committed_query)
    if isinstance(db, sa.Engine):
        with db.connect() as conn:
            rows = conn.execute(query).all()
    else:
        rows = db.execute(query).all()
    for name, description, is_published in rows:
        if is_published:
            published_rows[name] = description
        else:
            committed_names.add(name)
    return published_rows, committed_names


# -- revocation ----------------------------------------------------------------------------


def revoke_token(engine: sa.Engine, jti: str, reason: str | None = None) -> bool:
    """Refuse a token id from now on; False if it was already revoked."""
    with engine.begin() as conn:
        inserted = conn.execute(
            pg_insert(revoked_table)
            .values(jti=jti, reason=reason)
            .on_conflict_do_nothing()
            .returning(revoked_table.c.jti)
        ).first()
    return inserted is not None
