"""Secure defaults checked before the service starts serving.

The development placeholder keys (`PLACEHOLDER_MARK` in `trace_resources.settings`) sign tokens
and download links that anyone with this repository can forge. The service starts with them
only when it is bound to loopback AND development mode is set explicitly
(`TRACE_QUERY_DEV_MODE=true`, as `make dev`, `make demo`, the benchmarks and the tests do).
"""

from __future__ import annotations

import ipaddress

from trace_resources.settings import PLACEHOLDER_MARK, QuerySettings

__all__ = ["InsecureSettingsError", "refuse_insecure_settings", "is_loopback"]


class InsecureSettingsError(RuntimeError):
    """The settings would serve forgeable tokens or links: the service does not start."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_insecure_settings(settings: QuerySettings) -> None:
    """Raise unless every secret is real, or this is development mode on loopback."""
    placeholders = [
        name
        for name, secret in (
            ("TRACE_QUERY_TOKEN_KEYS", settings.query_token_keys),
            ("TRACE_QUERY_URL_SIGNING_KEY", settings.query_url_signing_key),
            ("TRACE_SECRETS_KEYS", settings.secrets_keys),
        )
        if PLACEHOLDER_MARK in secret.get_secret_value()
    ]
    if not placeholders:
        return
    named = " and ".join(placeholders)
    hold = "holds" if len(placeholders) == 1 else "hold"
    fix = (
        f"set {named} to real secrets (e.g. from `python -c 'import secrets; "
        "print(secrets.token_urlsafe(48))'`; TRACE_QUERY_TOKEN_KEYS as `k1:HS256:<secret>`, "
        "TRACE_SECRETS_KEYS as `k1:<base64 of 32 random bytes>`)"
    )
    if not settings.query_dev_mode:
        raise InsecureSettingsError(
            f"{named} still {hold} the development placeholder, which anyone can use to forge "
            f"tokens and download links; {fix}, or, on a development machine only, set "
            "TRACE_QUERY_DEV_MODE=true with TRACE_QUERY_HOST=127.0.0.1"
        )
    if not is_loopback(settings.query_host):
        raise InsecureSettingsError(
            f"TRACE_QUERY_DEV_MODE is set and {named} {hold} the development placeholder, but "
            f"TRACE_QUERY_HOST={settings.query_host} is not loopback: the placeholder keys are "
            f"only served on 127.0.0.1, ::1 or localhost; bind to loopback, or {fix} and unset "
            "TRACE_QUERY_DEV_MODE"
        )
