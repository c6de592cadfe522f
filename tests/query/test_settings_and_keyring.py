"""The query service's settings refuse development secrets in production, and a keyring that
can not work is refused at start with a message that says how to fix it."""

from __future__ import annotations

import pydantic
import pytest

from trace_resources.errors import ConfigError
from trace_resources.settings import QuerySettings
from trace_resources.tokens import Keyring, generate_key, issue_token

# a real TRACE_SECRETS_KEYS (the alert channels' one is checked by Settings itself)
SECRETS_KEYS = "k1:" + "A" * 43 + "="


def test_prod_refuses_the_development_placeholders() -> None:
    with pytest.raises(pydantic.ValidationError, match="TRACE_QUERY_TOKEN_KEYS"):
        QuerySettings(environment="prod", secrets_keys=SECRETS_KEYS)
    real_keys = generate_key("k1", "HS256")[0]
    with pytest.raises(pydantic.ValidationError, match="TRACE_QUERY_URL_SIGNING_KEY"):
        QuerySettings(environment="prod", secrets_keys=SECRETS_KEYS, query_token_keys=real_keys)
    settings = QuerySettings(
        environment="prod",
        secrets_keys=SECRETS_KEYS,
        query_token_keys=real_keys,
        query_url_signing_key="x" * 48,
    )
    token, claims = issue_token(
        Keyring.from_settings(settings), settings, org="acme", subject="alice"
    )
    assert token.count(".") == 2 and claims["org"] == "acme"
    # development and tests may use them
    assert QuerySettings(environment="local").query_token_keys.get_secret_value()


@pytest.mark.parametrize(
    ("spec", "signing_kid", "fragment"),
    [
        ("", None, "holds no key"),
        ("k1:HS256:too-short", None, "shorter than 32 bytes"),
        ("k1:RS256:" + "x" * 40, None, "use HS256, EdDSA"),
        ("k1:EdDSA:not-base64-key", None, "not a base64url 32-byte Ed25519 key"),
        ("no-colons-here", None, "KID:ALG:MATERIAL"),
        ("k1:HS256:" + "x" * 40 + ",k1:HS256:" + "y" * 40, None, "names a key id twice"),
        ("k1:HS256:" + "x" * 40, "k2", "names no key"),
    ],
)
def test_broken_keyrings_are_refused(spec: str, signing_kid: str | None, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Keyring.parse(spec, signing_kid)


def test_a_verify_only_keyring_cannot_sign() -> None:
    _, public = generate_key("k1", "EdDSA")
    assert public is not None
    settings = QuerySettings(query_token_keys=public)
    with pytest.raises(ConfigError, match="can sign"):
        issue_token(Keyring.from_settings(settings), settings, org="acme", subject="alice")
