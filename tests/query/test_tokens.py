"""A battery of forged, expired, mis-scoped and malformed tokens. Each is refused with a clear
JSON error (401 and a `WWW-Authenticate: Bearer` header for bad credentials), and none reads a
row."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.query.conftest import Tokens, World, bearer
from trace_resources.storage.access import revoke_token
from trace_resources.storage.state import engine_for

SQL = "SELECT count(*) FROM blocks"


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Forge:
    """Builds tokens around the real keys of the test keyring."""

    def __init__(self, tokens: Tokens) -> None:
        self.settings = tokens.settings
        self.keyring = tokens.keyring
        hs_secret, ed_key = (tokens.keyring.keys[k].signing_key for k in ("k-old", "k-new"))
        assert isinstance(hs_secret, str) and isinstance(ed_key, Ed25519PrivateKey)
        self.hs_secret, self.ed_key = hs_secret, ed_key

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.settings.query_token_issuer,
            "aud": self.settings.query_token_audience,
            "sub": "mallory",
            "org": "acme",
            "iat": now,
            "exp": now + 600,
            "jti": str(uuid.uuid4()),
            "scope": {"kind": "org"},
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def hs(self, claims: dict[str, Any], kid: str | None = "k-old", key: Any = None) -> str:
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(claims, key or self.hs_secret, algorithm="HS256", headers=headers)

    def ed(self, claims: dict[str, Any], kid: str = "k-new", key: Any = None) -> str:
        return jwt.encode(claims, key or self.ed_key, algorithm="EdDSA", headers={"kid": kid})


def _alg_none(f: Forge) -> str:
    return f"{_b64({'alg': 'none', 'kid': 'k-new', 'typ': 'JWT'})}.{_b64(f.claims())}."


def _hs256_with_public_key(f: Forge) -> str:
    # algorithm confusion: HMAC keyed with the (public) EdDSA key, under the EdDSA key id
    public = f.ed_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return jwt.encode(f.claims(), public * 2, algorithm="HS256", headers={"kid": "k-new"})


def _tampered_org(f: Forge) -> str:
    header, _, signature = f.ed(f.claims()).split(".")
    return f"{header}.{_b64(f.claims(org='globex'))}.{signature}"


def _other_ed_key(f: Forge) -> str:
    return f.ed(f.claims(), key=Ed25519PrivateKey.generate())


FORGED: dict[str, tuple[Callable[[Forge], str | None], str]] = {
    "no token": (lambda f: None, "missing_token"),
    "not a jwt": (lambda f: "not-a-jwt", "invalid_token"),
    "two segments": (lambda f: "eyJhbGciOiJIUzI1NiJ9.e30", "invalid_token"),
    "alg none": (_alg_none, "invalid_token"),
    "wrong hmac secret": (lambda f: f.hs(f.claims(), key="x" * 48), "invalid_token"),
    "unknown kid": (lambda f: f.hs(f.claims(), kid="k-retired"), "invalid_token"),
    "no kid": (lambda f: f.hs(f.claims(), kid=None), "invalid_token"),
    "hs256 under the eddsa kid": (_hs256_with_public_key, "invalid_token"),
    "eddsa under the hs256 kid": (lambda f: f.ed(f.claims(), kid="k-old"), "invalid_token"),
    "signed by another ed25519 key": (_other_ed_key, "invalid_token"),
    "payload edited after signing": (_tampered_org, "invalid_token"),
    "expired": (
        lambda f: f.ed(f.claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        "token_expired",
    ),
    "issued in the future": (
        lambda f: f.ed(f.claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200)),
        "invalid_token",
    ),
    "lives too long": (
        lambda f: f.ed(f.claims(exp=int(time.time()) + f.settings.query_token_max_ttl_s + 3600)),
        "invalid_token",
    ),
    "wrong audience": (lambda f: f.ed(f.claims(aud="another-service")), "invalid_token"),
    "wrong issuer": (lambda f: f.ed(f.claims(iss="someone-else")), "invalid_token"),
    "no exp": (lambda f: f.ed(f.claims(exp=None)), "invalid_token"),
    "no jti": (lambda f: f.ed(f.claims(jti=None)), "invalid_token"),
    "no aud": (lambda f: f.ed(f.claims(aud=None)), "invalid_token"),
    "no org": (lambda f: f.ed(f.claims(org=None)), "invalid_token"),
    "malformed org": (lambda f: f.ed(f.claims(org="../globex")), "invalid_token"),
    "uppercase org": (lambda f: f.ed(f.claims(org="ACME")), "invalid_token"),
    "no scope": (lambda f: f.ed(f.claims(scope=None)), "invalid_token"),
    "unknown scope kind": (lambda f: f.ed(f.claims(scope={"kind": "admin"})), "invalid_token"),
    "extra scope field": (
        lambda f: f.ed(f.claims(scope={"kind": "org", "admin": True})),
        "invalid_token",
    ),
    "task token without datasets": (
        lambda f: f.ed(f.claims(scope={"kind": "task", "task": "t"})),
        "invalid_token",
    ),
    "org token with partitions": (
        lambda f: f.ed(f.claims(scope={"kind": "org", "partitions": {"blocks": ["x"]}})),
        "invalid_token",
    ),
    "dataset name with a path": (
        lambda f: f.ed(f.claims(scope={"kind": "org", "datasets": ["../blocks"]})),
        "invalid_token",
    ),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_and_malformed_tokens_are_refused(
    client: httpx.Client, tokens: Tokens, case: str
) -> None:
    make, code = FORGED[case]
    token = make(Forge(tokens))
    headers = {} if token is None else bearer(token)
    for response in (
        client.post("/v1/query", json={"sql": SQL}, headers=headers),
        client.get("/v1/datasets", headers=headers),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == code, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "rows" not in response.json()


def test_other_schemes_are_no_token(client: httpx.Client) -> None:
    for value in ("Basic YWxpY2U6cGFzcw==", "Bearer", "Token abc"):
        response = client.get("/v1/datasets", headers={"Authorization": value})
        assert response.status_code == 401 and response.json()["error"]["code"] in (
            "missing_token",
            "invalid_token",
        )


def test_both_keys_of_the_keyring_verify(client: httpx.Client, tokens: Tokens) -> None:
    """Rotation: the new EdDSA key signs, the old HS256 key still verifies its tokens."""
    forge = Forge(tokens)
    issued = tokens.org()
    assert jwt.get_unverified_header(issued)["kid"] == "k-new"
    for token in (issued, forge.hs(forge.claims()), forge.ed(forge.claims())):
        response = client.post("/v1/query", json={"sql": SQL}, headers=bearer(token))
        assert response.status_code == 200, response.text


def test_revoked_token_ids_are_refused(client: httpx.Client, tokens: Tokens, world: World) -> None:
    token = tokens.org(subject="leaky")
    assert client.get("/v1/datasets", headers=bearer(token)).status_code == 200
    revoke_token(
        engine_for(world.settings.state_dsn),
        jwt.decode(token, options={"verify_signature": False})["jti"],
        "leaked in a log",
    )
    response = client.get("/v1/datasets", headers=bearer(token))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_revoked"
    # other tokens of the same subject still work
    assert (
        client.get("/v1/datasets", headers=bearer(tokens.org(subject="leaky"))).status_code == 200
    )


def test_mis_scoped_tokens_read_nothing_more(client: httpx.Client, tokens: Tokens) -> None:
    forge = Forge(tokens)
    cases = [
        # an org token narrowed to blocks
        (tokens.org(datasets=["blocks"]), "SELECT count(*) FROM transactions", 404),
        # a task token reading a dataset it does not list
        (tokens.task(["logs"]), "SELECT count(*) FROM blocks", 404),
        # a token that lists another org's dataset is still not that org
        (
            forge.ed(forge.claims(scope={"kind": "org", "datasets": ["org_globex__secret"]})),
            "SELECT * FROM org_globex__secret",
            404,
        ),
        # a task token that lists another org's dataset and partitions
        (
            tokens.task(["org_globex__secret"], partitions={"org_globex__secret": ["__all__"]}),
            "SELECT * FROM org_globex__secret",
            404,
        ),
    ]
    for token, sql, status in cases:
        response = client.post("/v1/query", json={"sql": sql}, headers=bearer(token))
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == "unknown_dataset"
