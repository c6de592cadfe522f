"""The query service's side of capability tokens: verifying a bearer token into a `Principal`.

The tokens themselves (claims, keyring, issuing) are `trace_resources.tokens`, shared with the
`trace` CLI; whether a token was revoked is answered at admission (`limits.py`).
"""

from __future__ import annotations

import jwt
from pydantic import ValidationError

from trace_query_api.errors import AuthError
from trace_resources.settings import QuerySettings
from trace_resources.tokens import (
    REQUIRED_CLAIMS,
    Claims,
    Keyring,
    Principal,
    validation_message,
)

__all__ = ["TokenVerifier"]


class TokenVerifier:
    """Checks signature, algorithm, registered claims, lifetime and the scope claim."""

    def __init__(self, keyring: Keyring, settings: QuerySettings) -> None:
        self.keyring = keyring
        self.issuer = settings.query_token_issuer
        self.audience = settings.query_token_audience
        self.leeway = settings.query_token_leeway_s
        self.max_ttl = settings.query_token_max_ttl_s

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a well-formed JWT") from None
        kid = header.get("kid")
        key = self.keyring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("the token's key id (kid) is not one this service knows")
        try:
            payload = jwt.decode(
                token,
                key.verifying_key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS, "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(
                "the token has expired; ask for a new one", code="token_expired"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                f"the token is not meant for this service (aud {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"the token was not issued by {self.issuer!r}") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("the token is not valid yet (iat or nbf in the future)") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"the token is invalid: {exc}") from None
        try:
            claims = Claims.model_validate(payload)
        except ValidationError as exc:
            raise AuthError(
                f"the token's claims are malformed: {validation_message(exc)}"
            ) from None
        if claims.exp - claims.iat > self.max_ttl:
            raise AuthError(
                f"the token lives longer than the {self.max_ttl} s this service accepts"
            )
        if claims.scope.kind == "task" and not claims.scope.datasets:
            raise AuthError("a task token must list the datasets it reads")
        if claims.scope.kind == "org" and (
            claims.scope.partitions or claims.scope.columns or claims.scope.writes
        ):
            raise AuthError("only task tokens carry partitions, columns or writes")
        if claims.scope.kind == "task" and claims.scope.capabilities:
            raise AuthError("only org tokens carry capabilities")
        return Principal.from_claims(claims)
