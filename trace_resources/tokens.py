"""Capability tokens: JWTs that carry an organisation, a subject and what it may read.

    header  {"alg": "HS256" | "EdDSA", "kid": KEY_ID, "typ": "JWT"}
    claims  {"iss", "aud", "sub", "iat", "exp", "jti",          all required
             "org": "acme",
             "scope": {"kind": "org" | "task",
                       "task": "nightly-rollup",                  task tokens only
                       "datasets": ["blocks", ...] | null,        null: all the org may read
                       "chains": ["monad", ...] | null,           org tokens: null: every chain
                       "partitions": {"blocks": ["000000000000-000000000049"]} | null,
                       "columns": {"blocks": ["number", "hash"]} | null,     task tokens only
                       "writes": ["<object key>", ...] | null,            task tokens only
                       "capabilities": ["alerts:manage"]}}              org tokens only; optional
             (or "triggers": ["rebuild"]: a trigger token, which only fires those webhooks)

An *org token* reads the public datasets and its organisation's own (optionally narrowed to
`datasets`, and to the datasets of the listed `chains`: another chain's dataset is then as
absent as one that does not exist, while the organisation's own `org_<org>__<name>` datasets,
which belong to no chain, stay readable), and its organisation's alert rules and alerts; a
*task token* reads only its listed
datasets and, where `partitions` names a dataset, only those partitions of it (and where
`columns` names one, only those columns); `writes` lists the exact object keys a task may upload
(`PUT /v1/tasks/uploads/{key}`: a Python transform's staged output). Ownership itself
is decided by `trace_resources.storage.access`, never by the token: a token can narrow what its
organisation may read, not widen it.

Capabilities grant an org token more than reading. `alerts:manage` creates, updates and
disables the organisation's alert rules through the service (`trace token issue --capability
alerts:manage`); a token without it reads rules and alerts but changes nothing.
`transforms:manage` applies the organisation's own transforms (`POST /v1/transforms`)
and uploads its enrichment datasets (`PUT /v1/enrichments/{name}`).

A *trigger token* (an org token with `"triggers": ["rebuild"]`, `trace token issue --trigger
rebuild`) fires only the listed webhook triggers (`POST /v1/triggers/{name}`); every other
route refuses it, so a caller outside holding it can start that work and read nothing.

Keys live in a keyring (`TRACE_QUERY_TOKEN_KEYS`): each has a key id written into the token
header, so a new key can sign while the old one still verifies the tokens it signed (rotation).
The verifier (`trace_query_api.tokens`) accepts exactly the algorithm of the key the `kid`
names, never the algorithm a token asks for.

Issuing, keys and the claims live here, beside the storage they need nothing from, so that the
`trace` CLI and the query service share them; revocation is a table (`storage/access.py`).
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trace_resources.errors import ConfigError
from trace_resources.settings import QuerySettings
from trace_resources.triggers import TRIGGER_NAME_PATTERN

# jwt and cryptography (~0.15 s) are imported where keys are parsed and tokens issued, not with
# the module: the Dagster code location imports it (through dataset access) for every run
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "ORG_PATTERN",
    "DATASET_PATTERN",
    "PARTITION_PATTERN",
    "CHAIN_PATTERN",
    "Algorithm",
    "Capability",
    "CAPABILITIES",
    "TokenKey",
    "Keyring",
    "Principal",
    "Claims",
    "REQUIRED_CLAIMS",
    "issue_token",
    "generate_key",
    "validation_message",
]

Algorithm = Literal["HS256", "EdDSA"]
Capability = Literal["alerts:manage", "transforms:manage"]
CAPABILITIES: tuple[Capability, ...] = ("alerts:manage", "transforms:manage")
ORG_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
# a secondary chain's datasets are `<chain>.<dataset>` (trace_resources.chains)
DATASET_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?$")
CHAIN_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
PARTITION_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
COLUMN_PATTERN = re.compile(r"^[a-z_][a-z0-9_]*$")
OBJECT_KEY_PATTERN = re.compile(
    r"^(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9_.=-]+(?:/[A-Za-z0-9_.=-]+)*$"
)
_KID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_HMAC_BYTES = 32
REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti"]


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenKey:
    """One key of the keyring. `signing_key` is None for verify-only (public) keys."""

    kid: str
    algorithm: Algorithm
    signing_key: str | Ed25519PrivateKey | None
    verifying_key: str | Ed25519PublicKey


class Keyring:
    """The keys that verify tokens, and the one that signs new ones."""

    def __init__(self, keys: list[TokenKey], signing_kid: str | None = None) -> None:
        if not keys:
            raise ConfigError("TRACE_QUERY_TOKEN_KEYS holds no key: add `KID:HS256:<secret>`")
        self.keys = {k.kid: k for k in keys}
        if len(self.keys) != len(keys):
            raise ConfigError("TRACE_QUERY_TOKEN_KEYS names a key id twice; key ids are unique")
        self.signing_kid = signing_kid
        if signing_kid is not None:
            key = self.keys.get(signing_kid)
            if key is None or key.signing_key is None:
                raise ConfigError(
                    f"TRACE_QUERY_TOKEN_SIGNING_KID={signing_kid!r} names no key of "
                    "TRACE_QUERY_TOKEN_KEYS that can sign (public keys only verify)"
                )

    @classmethod
    def parse(cls, spec: str, signing_kid: str | None = None) -> Keyring:
        """Parse `KID:ALG:MATERIAL[,KID:ALG:MATERIAL...]` (see QuerySettings)."""
        keys = [_parse_key(item.strip()) for item in spec.split(",") if item.strip()]
        return cls(keys, signing_kid)

    @classmethod
    def from_settings(cls, settings: QuerySettings) -> Keyring:
        return cls.parse(
            settings.query_token_keys.get_secret_value(), settings.query_token_signing_kid
        )

    def signer(self) -> TokenKey:
        if self.signing_kid is not None:
            return self.keys[self.signing_kid]
        for key in self.keys.values():
            if key.signing_key is not None:
                return key
        raise ConfigError(
            "no key of TRACE_QUERY_TOKEN_KEYS can sign (only EdDSA-public keys): tokens are "
            "issued where the private key is configured"
        )

    def get(self, kid: str) -> TokenKey | None:
        return self.keys.get(kid)


def _parse_key(item: str) -> TokenKey:
    parts = item.split(":", 2)
    if len(parts) != 3 or not _KID_PATTERN.match(parts[0]):
        raise ConfigError(
            "each entry of TRACE_QUERY_TOKEN_KEYS is `KID:ALG:MATERIAL` with a key id of "
            f"letters, digits, '.', '_' or '-', e.g. `k1:HS256:<secret>`; got {item[:12]!r}..."
        )
    kid, algorithm, material = parts
    if algorithm == "HS256":
        if len(material.encode()) < MIN_HMAC_BYTES:
            raise ConfigError(
                f"the HS256 secret of key {kid!r} is shorter than {MIN_HMAC_BYTES} bytes; "
                "generate one with `trace token keygen --kid KID`"
            )
        return TokenKey(kid, "HS256", material, material)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    try:
        raw = _b64decode(material)
        if algorithm == "EdDSA":
            private = Ed25519PrivateKey.from_private_bytes(raw)
            return TokenKey(kid, "EdDSA", private, private.public_key())
        if algorithm == "EdDSA-public":
            return TokenKey(kid, "EdDSA", None, Ed25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:
        raise ConfigError(
            f"key {kid!r} of TRACE_QUERY_TOKEN_KEYS is not a base64url 32-byte Ed25519 key: {exc}"
        ) from None
    raise ConfigError(
        f"key {kid!r} of TRACE_QUERY_TOKEN_KEYS has algorithm {algorithm!r}; use HS256, "
        "EdDSA (private key) or EdDSA-public (verify only)"
    )


def generate_key(kid: str, algorithm: Algorithm) -> tuple[str, str | None]:
    """A new keyring entry and, for EdDSA, the verify-only entry to give to other services."""
    if algorithm == "HS256":
        return f"{kid}:HS256:{_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes)}", None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return f"{kid}:EdDSA:{_b64encode(seed)}", f"{kid}:EdDSA-public:{_b64encode(public)}"


class Scope(BaseModel):
    """The `scope` claim."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["org", "task"]
    task: str | None = Field(None, min_length=1, max_length=200)
    datasets: list[str] | None = Field(None, max_length=200)
    chains: list[str] | None = Field(None, max_length=50)
    partitions: dict[str, list[str]] | None = None
    columns: dict[str, list[str]] | None = None
    writes: list[str] | None = Field(None, max_length=100)
    capabilities: list[Capability] | None = Field(None, max_length=len(CAPABILITIES))
    triggers: list[str] | None = Field(None, max_length=50)

    @field_validator("triggers")
    @classmethod
    def _trigger_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not TRIGGER_NAME_PATTERN.match(name):
                raise ValueError(f"not a trigger name: {name!r}")
        return value

    @field_validator("columns")
    @classmethod
    def _column_names(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for name, columns in (value or {}).items():
            if not DATASET_PATTERN.match(name):
                raise ValueError(f"not a dataset name: {name!r}")
            for column in columns:
                if not COLUMN_PATTERN.match(column):
                    raise ValueError(f"not a column name: {column!r}")
        return value

    @field_validator("writes")
    @classmethod
    def _object_keys(cls, value: list[str] | None) -> list[str] | None:
        for key in value or []:
            if len(key) > 1024 or not OBJECT_KEY_PATTERN.match(key):
                raise ValueError(f"not an object key: {key[:80]!r}")
        return value

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not DATASET_PATTERN.match(name):
                raise ValueError(f"not a dataset name: {name!r}")
        return value

    @field_validator("chains")
    @classmethod
    def _chain_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not CHAIN_PATTERN.match(name):
                raise ValueError(f"not a chain name: {name!r}")
        return value

    @field_validator("partitions")
    @classmethod
    def _partition_keys(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for name, keys in (value or {}).items():
            if not DATASET_PATTERN.match(name):
                raise ValueError(f"not a dataset name: {name!r}")
            for key in keys:
                if not PARTITION_PATTERN.match(key):
                    raise ValueError(f"not a partition key: {key!r}")
        return value


class Claims(BaseModel):
    """What the service reads from a verified token (registered claims checked by PyJWT)."""

    model_config = ConfigDict(extra="ignore")

    sub: str = Field(min_length=1, max_length=200)
    org: str = Field(min_length=1, max_length=40, pattern=ORG_PATTERN.pattern)
    jti: str = Field(min_length=1, max_length=100)
    iat: int
    exp: int
    scope: Scope


@dataclass(frozen=True)
class Principal:
    """Who is asking, and what the token narrows them to."""

    org: str
    subject: str
    kind: Literal["org", "task"]
    jti: str
    expires_at: int
    task: str | None = None
    datasets: frozenset[str] | None = None  # None: everything the org may read
    chains: frozenset[str] | None = None  # None: every chain's datasets
    partitions: dict[str, frozenset[str]] | None = None
    capabilities: frozenset[str] = frozenset()
    columns: dict[str, tuple[str, ...]] | None = None  # None: every column
    writes: frozenset[str] = frozenset()  # object keys a task may upload
    triggers: frozenset[str] = frozenset()  # a trigger token fires these, and does nothing else

    @property
    def is_trigger(self) -> bool:
        return bool(self.triggers)

    @property
    def is_task(self) -> bool:
        return self.kind == "task"

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def scope_allows(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets

    def chain_allows(self, chain: str | None) -> bool:
        """Whether a dataset of `chain` (None: of no chain, an organisation's) is in scope."""
        return self.chains is None or chain is None or chain in self.chains

    def partitions_for(self, dataset: str) -> frozenset[str] | None:
        """The partitions of `dataset` this token may read (None: all)."""
        if self.partitions is None:
            return None
        return self.partitions.get(dataset)

    def columns_for(self, dataset: str) -> tuple[str, ...] | None:
        """The columns of `dataset` this token may read (None: all)."""
        if self.columns is None:
            return None
        return self.columns.get(dataset)

    def may_write(self, key: str) -> bool:
        return self.is_task and key in self.writes

    @classmethod
    def from_claims(cls, claims: Claims) -> Principal:
        scope = claims.scope
        return cls(
            org=claims.org,
            subject=claims.sub,
            kind=scope.kind,
            jti=claims.jti,
            expires_at=claims.exp,
            task=scope.task,
            datasets=None if scope.datasets is None else frozenset(scope.datasets),
            chains=None if scope.chains is None else frozenset(scope.chains),
            partitions=None
            if scope.partitions is None
            else {k: frozenset(v) for k, v in scope.partitions.items()},
            capabilities=frozenset(scope.capabilities or ()),
            columns=None
            if scope.columns is None
            else {k: tuple(v) for k, v in scope.columns.items()},
            writes=frozenset(scope.writes or ()),
            triggers=frozenset(scope.triggers or ()),
        )


def issue_token(
    keyring: Keyring,
    settings: QuerySettings,
    *,
    org: str,
    subject: str,
    datasets: list[str] | None = None,
    chains: list[str] | None = None,
    ttl_s: int | None = None,
    task: str | None = None,
    partitions: dict[str, list[str]] | None = None,
    capabilities: list[str] | None = None,
    columns: dict[str, list[str]] | None = None,
    writes: list[str] | None = None,
    triggers: list[str] | None = None,
    now: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Sign a token; returns it and its claims. Task tokens must list their datasets and carry
    no capabilities; only they carry `columns` (dataset -> the columns it may read) and
    `writes` (object keys it may upload)."""
    ttl = settings.query_token_default_ttl_s if ttl_s is None else ttl_s
    if not 0 < ttl <= settings.query_token_max_ttl_s:
        raise ConfigError(
            f"--ttl must be between 1 and {settings.query_token_max_ttl_s} seconds "
            "(TRACE_QUERY_TOKEN_MAX_TTL_S)"
        )
    if task is not None and not datasets:
        raise ConfigError("a task token reads only its listed datasets: give --dataset")
    if partitions and task is None:
        raise ConfigError("--partition narrows a task token: give --task too")
    if partitions and datasets and not set(partitions) <= set(datasets):
        raise ConfigError("--partition DATASET:KEY names a dataset missing from --dataset")
    if chains and task is not None:
        raise ConfigError("--chain narrows an org token; a task token lists its datasets")
    for capability in capabilities or ():
        if capability not in CAPABILITIES:
            raise ConfigError(
                f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}"
            )
    if capabilities and task is not None:
        raise ConfigError("a task token only reads: capabilities go on org tokens (no --task)")
    if (columns or writes) and task is None:
        raise ConfigError("columns and writes narrow a task token: give --task too")
    if columns and datasets and not set(columns) <= set(datasets):
        raise ConfigError("columns name a dataset missing from --dataset")
    if triggers and (task is not None or capabilities or datasets or chains):
        raise ConfigError(
            "a trigger token only fires its triggers: give --trigger with --org and --subject "
            "alone (no --task, --dataset, --chain or --capability)"
        )
    issued = int(time.time()) if now is None else now
    scope = Scope(
        kind="task" if task is not None else "org",
        task=task,
        datasets=sorted(set(datasets)) if datasets else None,
        chains=sorted(set(chains)) if chains else None,
        partitions=partitions or None,
        columns=columns or None,
        writes=sorted(set(writes)) if writes else None,
        capabilities=sorted(set(capabilities)) if capabilities else None,
        triggers=sorted(set(triggers)) if triggers else None,
    )
    claims: dict[str, Any] = {
        "iss": settings.query_token_issuer,
        "aud": settings.query_token_audience,
        "sub": subject,
        "org": org,
        "iat": issued,
        "exp": issued + ttl,
        "jti": str(uuid.uuid4()),
        "scope": scope.model_dump(exclude_none=True),
    }
    try:
        Claims.model_validate(claims)
    except ValidationError as exc:
        raise ConfigError(f"cannot issue this token: {validation_message(exc)}") from None
    key = keyring.signer()
    assert key.signing_key is not None  # signer() returns only keys that sign
    import jwt

    token = jwt.encode(claims, key.signing_key, algorithm=key.algorithm, headers={"kid": key.kid})
    return token, claims


def validation_message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])
