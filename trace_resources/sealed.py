"""Channel secrets at rest: envelope encryption under an operator keyring.

A sealed secret is one string, safe to store anywhere a clear one was:

    enc:v1:<kid>:<wrapped data key>:<nonce + ciphertext>     (both parts base64url)

Each secret gets a fresh 256-bit data key; the secret is encrypted with it (AES-256-GCM, the
associated data naming where the secret belongs, so a sealed value copied into another rule or
channel does not open), and the data key is wrapped (AES-256-GCM) by the key-encryption key
`kid` of the keyring `TRACE_SECRETS_KEYS` (`kid:base64key,...`). The first key seals, every key
opens: add a new key in front, run `trace secrets rotate` (re-wraps every stored secret under
it), then drop the old one.

`reseal_spec` applies this to the stored JSON of an alert rule (the secret fields of its
channels); it is shared by the rule store, the rotate command and the data migration that
sealed the secrets stored in clear before.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trace_resources.errors import TraceError

__all__ = [
    "SEALED_PREFIX",
    "SECRET_FIELDS",
    "Keyring",
    "SealError",
    "is_sealed",
    "reseal_spec",
    "secret_context",
]

SEALED_PREFIX = "enc:v1:"
# the channel fields of an alert rule that hold secrets (webhook HMAC key, SMTP password)
SECRET_FIELDS = ("secret", "password")
_KID = r"[A-Za-z0-9_-]{1,64}"
_NONCE = 12


class SealError(TraceError):
    """A keyring that does not parse, or a sealed secret that does not open."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def secret_context(org: str, rule_id: str, channel: str, field: str) -> str:
    """The associated data of one stored secret: where it belongs."""
    return f"trace-alert-rule:{org}/{rule_id}/{channel}/{field}"


@dataclass(frozen=True)
class Keyring:
    """Key-encryption keys by id; the first one seals."""

    keys: tuple[tuple[str, bytes], ...]

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        keys: list[tuple[str, bytes]] = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            kid, _, material = item.partition(":")
            if not re.fullmatch(_KID, kid) or not material:
                raise SealError(
                    f"TRACE_SECRETS_KEYS: {kid!r} is not `kid:base64key` (kid of letters, "
                    "digits, '-' or '_')"
                )
            try:
                key = base64.b64decode(material + "=" * (-len(material) % 4), altchars=b"-_")
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32:
                raise SealError(
                    f"TRACE_SECRETS_KEYS: key {kid!r} must be 32 bytes in base64, e.g. from "
                    "`python -c 'import base64, os; print(base64.b64encode(os.urandom(32))"
                    ".decode())'`"
                )
            if kid in dict(keys):
                raise SealError(f"TRACE_SECRETS_KEYS: key id {kid!r} appears twice")
            keys.append((kid, key))
        if not keys:
            raise SealError("TRACE_SECRETS_KEYS holds no key: give `kid:base64key`")
        return cls(tuple(keys))

    @property
    def current_kid(self) -> str:
        return self.keys[0][0]

    def seal(self, secret: str, context: str) -> str:
        # cryptography is imported where a secret is sealed or opened, not with the module:
        # the code location imports this module (through the rule store) for every run
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        kid, kek = self.keys[0]
        data_key = AESGCM.generate_key(bit_length=256)
        wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
        wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, kid.encode())
        sealed = AESGCM(data_key).encrypt(nonce, secret.encode(), context.encode())
        return f"{SEALED_PREFIX}{kid}:{_b64(wrap_nonce + wrapped)}:{_b64(nonce + sealed)}"

    def kid_of(self, value: str) -> str:
        return value[len(SEALED_PREFIX) :].split(":", 1)[0]

    def open(self, value: str, context: str) -> str:
        if not is_sealed(value):
            raise SealError("not a sealed secret")
        parts = value[len(SEALED_PREFIX) :].split(":")
        if len(parts) != 3:
            raise SealError("a sealed secret has the form enc:v1:<kid>:<key>:<data>")
        kid, wrapped_text, sealed_text = parts
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        kek = dict(self.keys).get(kid)
        if kek is None:
            raise SealError(
                f"sealed with key {kid!r}, which is not in TRACE_SECRETS_KEYS: keep a retired "
                "key in the keyring until `trace secrets rotate` has re-wrapped every secret"
            )
        try:
            wrapped, sealed = _unb64(wrapped_text), _unb64(sealed_text)
            data_key = AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], kid.encode())
            clear = AESGCM(data_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], context.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SealError(
                "sealed secret does not open (damaged, or sealed for another rule or channel)"
            ) from None
        return clear.decode()


def reseal_spec(spec: Mapping[str, Any], keyring: Keyring) -> dict[str, Any] | None:
    """The stored rule `spec` with every channel secret sealed under the keyring's current key
    (clear ones sealed, ones sealed under an older key re-wrapped), or None when nothing
    changes. Raises SealError for a sealed secret the keyring can not open."""
    channels = spec.get("channels")
    if not isinstance(channels, list):
        return None
    changed = False
    out = dict(spec)
    out["channels"] = []
    for channel in channels:
        channel = dict(channel)
        for field in SECRET_FIELDS:
            value = channel.get(field)
            if not isinstance(value, str):
                continue
            context = secret_context(
                str(spec.get("org")), str(spec.get("id")), str(channel.get("name")), field
            )
            if is_sealed(value) and keyring.kid_of(value) == keyring.current_kid:
                keyring.open(value, context)  # must open: never keep a broken value silently
                continue
            clear = keyring.open(value, context) if is_sealed(value) else value
            channel[field] = keyring.seal(clear, context)
            changed = True
        out["channels"].append(channel)
    return out if changed else None
