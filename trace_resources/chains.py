"""Which chain a dataset belongs to, and the one mapping of (chain, dataset) to its name.

A deployment reads one or more chains (`TRACE_CHAINS`, `ChainConfig` in settings.py); the first
is the primary. Dataset names carry the chain:

    primary chain "monad"      blocks, transactions, erc20_transfers, ...  (names as ever)
    secondary chain "devnet2"  devnet2.blocks, devnet2.transactions, devnet2.erc20_transfers, ...
    no chain                   org_<org>__<name>  (an organisation's enrichments and transforms)

That one name is the registry row, the object-path prefix and the query API's name. In SQL a
chain is a schema: `monad.blocks` is the primary's `blocks`, `devnet2.blocks` the secondary's.
In Dagster a secondary chain's dataset is the asset key [<chain>, <dataset>] with partitions of
its own (`block_ranges__<chain>`). Secondary chains carry the raw datasets and the derived
datasets computed from them (`SECONDARY_DATASETS`); call traces and what is derived from them,
the head tier, the quality checks and alerts are the primary's.

The chain names are read from the environment when asked (`TRACE_CHAINS`, else
`TRACE_CHAIN_NAME`), remembered per value, so the access rule and the SQL parser pay nothing per
query.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from trace_resources.settings import CHAIN_NAME_PATTERN, ChainConfig, parse_chains

__all__ = [
    "ChainNames",
    "SECONDARY_DATASETS",
    "SECONDARY_DERIVED_DATASETS",
    "chain_names",
    "chain_of",
    "dataset_name",
    "split_dataset_name",
    "qualified_reference",
    "asset_path",
    "dataset_for_asset_key",
    "partitions_name",
    "resource_key",
]

# what a secondary chain derives from its raw datasets, as the primary does (not from call
# traces: `geth_calls` and what is derived from it are the primary's)
SECONDARY_DERIVED_DATASETS: tuple[str, ...] = (
    "erc20_transfers",
    "native_transfers",
    "transaction_fees",
    "contracts",
    "token_daily_volume",
    "token_holders",
)
SECONDARY_DATASETS: tuple[str, ...] = (
    "blocks",
    "transactions",
    "logs",
    *SECONDARY_DERIVED_DATASETS,
)
_OWNED = re.compile(r"^org_[a-z0-9_]+__[a-z0-9_]+$")
_BARE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ChainNames:
    """The configured chains by name, the primary first."""

    primary: str
    secondaries: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return (self.primary, *self.secondaries)

    def __contains__(self, name: object) -> bool:
        return name in self.all


def chain_names() -> ChainNames:
    """The chains configured in the environment now (TRACE_CHAINS, else TRACE_CHAIN_NAME)."""
    return _names(os.environ.get("TRACE_CHAINS", ""), os.environ.get("TRACE_CHAIN_NAME", ""))


@functools.lru_cache(maxsize=16)
def _names(chains: str, chain_name: str) -> ChainNames:
    if chains.strip():
        configs: list[ChainConfig] = parse_chains(chains)
        return ChainNames(configs[0].name, tuple(c.name for c in configs[1:]))
    name = chain_name.strip() or "monad"
    if not CHAIN_NAME_PATTERN.match(name):
        raise ValueError(f"TRACE_CHAIN_NAME={name!r} is not a chain name such as monad")
    return ChainNames(name)


def dataset_name(chain: str, dataset: str, names: ChainNames | None = None) -> str:
    """The registry / object-path / query name of `dataset` of `chain`: the plain name on the
    primary chain, `<chain>.<dataset>` on another."""
    names = names or chain_names()
    if chain not in names:
        raise ValueError(f"no chain {chain!r} is configured (chains: {', '.join(names.all)})")
    if not _BARE.match(dataset) or _OWNED.match(dataset):
        raise ValueError(f"{dataset!r} is not a chain dataset name such as blocks")
    return dataset if chain == names.primary else f"{chain}.{dataset}"


def split_dataset_name(name: str, names: ChainNames | None = None) -> tuple[str | None, str]:
    """(chain, dataset) of a registry name; chain None for an organisation's dataset
    (`org_<org>__<name>`) and for a name qualified by a chain that is not configured."""
    names = names or chain_names()
    chain, dot, dataset = name.partition(".")
    if dot:
        return (chain, dataset) if chain in names.secondaries else (None, name)
    if _OWNED.match(name):
        return None, name
    return names.primary, name


def chain_of(name: str, names: ChainNames | None = None) -> str | None:
    """The chain a dataset name belongs to (None: an organisation's dataset, or unknown)."""
    return split_dataset_name(name, names)[0]


def qualified_reference(schema: str, table: str, names: ChainNames | None = None) -> str | None:
    """The dataset SQL's `schema.table` names (case-insensitive), or None when `schema` is no
    configured chain: `monad.blocks` -> `blocks` on the primary, `devnet2.blocks` ->
    `devnet2.blocks`. An organisation's dataset belongs to no chain, so it has no such name."""
    names = names or chain_names()
    schema, table = schema.lower(), table.lower()
    if schema not in names or not _BARE.match(table) or _OWNED.match(table):
        return None
    return dataset_name(schema, table, names)


def asset_path(name: str, names: ChainNames | None = None) -> list[str]:
    """The Dagster asset key path of a dataset: [dataset] on the primary, [chain, dataset] on
    another chain."""
    chain, dataset = split_dataset_name(name, names)
    names = names or chain_names()
    return [dataset] if chain is None or chain == names.primary else [chain, dataset]


def partitions_name(chain: str, names: ChainNames | None = None) -> str:
    """The Dagster partitions definition of a chain's block ranges."""
    names = names or chain_names()
    return "block_ranges" if chain == names.primary else f"block_ranges__{chain}"


def dataset_for_asset_key(path: Sequence[str]) -> str:
    """The dataset a Dagster asset key stands for: [dataset] -> dataset, [chain, dataset] ->
    `<chain>.<dataset>` (the inverse of `asset_path`)."""
    return ".".join(path) if len(path) == 2 else path[-1]


def resource_key(chain: str, names: ChainNames | None = None) -> str:
    """The Dagster resource key of a chain's `ChainResource`: `chain` for the primary,
    `chain__<name>` for another."""
    names = names or chain_names()
    return "chain" if chain == names.primary else f"chain__{chain}"
