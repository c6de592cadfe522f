"""Trace's exception hierarchy, written down in one place.

Every error says what was wrong and what to do about it. Errors that retrying cannot fix
(`permanent = True`) are not retried by Trace's own backoff, and assets turn them into a
`dagster.Failure` that Dagster's retry policies do not retry either.
"""

from __future__ import annotations

__all__ = [
    "TraceError",
    "ConfigError",
    "SchemaNotCurrentError",
    "ChainError",
    "RpcUnreachableError",
    "WrongChainIdError",
    "RangeNotFinalizedError",
    "RpcFaultError",
    "RpcRefusedError",
    "MethodUnsupportedError",
    "RangeIncompleteError",
    "ChainContinuityError",
    "DatasetError",
    "UnknownDatasetError",
    "MalformedPartitionKeyError",
    "CommitError",
    "AttemptFencedError",
    "SchemaIncompatibleError",
    "StagedObjectError",
    "StagingError",
    "LeaseExpiredError",
    "SegmentConflictError",
    "PartitionSealedError",
    "VersionRemovedError",
    "LeaseLostError",
]


class TraceError(Exception):
    """Base of every error Trace raises on purpose."""

    permanent: bool = True


class ConfigError(TraceError):
    """A setting or declaration is invalid."""


class SchemaNotCurrentError(ConfigError):
    """A Postgres database is not at the schema revision this code needs (`trace db upgrade`)."""


class ChainError(TraceError):
    """The chain endpoint or the chain data is not what Trace needs."""


class RpcUnreachableError(ChainError):
    """The JSON-RPC endpoint does not answer."""

    permanent = False


class WrongChainIdError(ChainError):
    """The endpoint serves another chain than the one configured."""


class RangeNotFinalizedError(ChainError):
    """A block range reaches past the chain's finalized head."""


class RpcFaultError(ChainError):
    """Transient RPC faults outlasted the retry budget."""

    permanent = False


class RpcRefusedError(ChainError):
    """The endpoint answered, but not as a JSON-RPC node of the chain does (HTTP 404, a
    method it does not serve): a wrong TRACE_RPC_URL or node, which retrying cannot fix."""


class MethodUnsupportedError(RpcRefusedError):
    """The endpoint does not serve a method a dataset needs (JSON-RPC -32601, e.g. no
    `debug_*` namespace for call traces): that dataset cannot be extracted from it."""


class RangeIncompleteError(ChainError):
    """Extracted data failed verification: blocks, transactions or logs are missing."""

    permanent = False


class ChainContinuityError(ChainError):
    """A range does not link to its committed neighbour (parent hash mismatch): a fork."""


class DatasetError(TraceError):
    """A dataset or partition named by the caller does not exist or is malformed."""


class UnknownDatasetError(DatasetError):
    """No dataset of that name is declared."""


class MalformedPartitionKeyError(DatasetError):
    """A partition key is not of the form `{start:012d}-{end:012d}`."""


class CommitError(TraceError):
    """A commit was refused; nothing of it became visible."""


class AttemptFencedError(CommitError):
    """A newer attempt holds the fence for this (dataset, partition)."""


class SchemaIncompatibleError(CommitError):
    """The staged data does not match the dataset's registered schema."""


class StagedObjectError(CommitError):
    """A staged file is missing or differs from what the writer recorded."""

    permanent = False


class StagingError(CommitError):
    """Uploading an attempt's files failed; nothing was committed."""

    permanent = False


class LeaseExpiredError(CommitError):
    """The attempt's lease ran out (its writer stalled); GC may already have removed its files."""

    permanent = False


class SegmentConflictError(CommitError):
    """An append carries some segment keys the dataset already holds, and some it does not."""

    permanent = False


class PartitionSealedError(CommitError):
    """An append to a partition whose current version is a replace (sealed) version: the
    range was sealed, nothing was appended. Retrying cannot change that."""

    permanent = True


class VersionRemovedError(CommitError):
    """A retried commit had landed, but its version was superseded and removed by GC since."""


class LeaseLostError(TraceError):
    """A singleton's write was refused: its copy no longer holds the leader lease (another copy
    took over while it was paused or cut off). Nothing was written; the copy steps down."""

    permanent = True
